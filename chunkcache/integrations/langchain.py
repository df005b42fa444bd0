"""LangChain adapters: `ChunkCacheChatModel` (a chat model answering from ``documents`` passed at
call time, one chunk each: ``model.invoke(messages, documents=docs)``) and `ChunkCacheRetriever`
(a ``BaseRetriever`` over a `ChunkIndex`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from chunkcache.integrations import answer_meta, require

require("langchain_core", "langchain")

from langchain_core.callbacks import CallbackManagerForLLMRun, CallbackManagerForRetrieverRun  # noqa: E402
from langchain_core.documents import Document  # noqa: E402
from langchain_core.language_models.chat_models import BaseChatModel  # noqa: E402
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage  # noqa: E402
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult  # noqa: E402
from langchain_core.retrievers import BaseRetriever  # noqa: E402
from pydantic import ConfigDict  # noqa: E402

from chunkcache.engine import StopText, question_from_chat  # noqa: E402
from chunkcache.errors import InvalidInputError  # noqa: E402

_ROLES = {"human": "user", "ai": "assistant", "system": "system"}


class ChunkCacheRetriever(BaseRetriever):
    """The top ``k`` chunks of a `ChunkIndex` (metadata: doc_id, chunk_id, score)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    index: Any
    k: int = 5

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return [Document(page_content=h.text, metadata={"doc_id": h.doc_id, "chunk_id": h.chunk_id, "score": h.score})
                for h in self.index.search(query, k=self.k)]


class ChunkCacheChatModel(BaseChatModel):
    """Answers the last human message from ``documents`` (LangChain documents or strings) given
    to ``invoke``/``stream`` (or bound with ``.bind(documents=...)``)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    engine: Any
    strategy: str | None = None
    max_new_tokens: int | None = None

    @property
    def _llm_type(self) -> str:
        return "chunkcache"

    def _inputs(self, messages: list[BaseMessage], documents: Sequence[Any] | None) -> tuple[str, list[str]]:
        turns = [(_ROLES.get(m.type, m.type), _content(m)) for m in messages]
        chunks = [d.page_content if isinstance(d, Document) else str(d) for d in documents or ()]
        if not chunks:
            raise InvalidInputError("pass documents=[...] to the call: ChunkCacheChatModel answers from them")
        return question_from_chat(turns), chunks

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, documents: Sequence[Any] | None = None,
                  **kwargs: Any) -> ChatResult:
        question, chunks = self._inputs(messages, documents)
        cut = StopText(tuple(stop or ()), None, None)  # generation stops at a stop sequence
        answer = self.engine.answer(question, chunks, strategy=self.strategy, max_new_tokens=self.max_new_tokens,
                                    on_text=cut)
        meta = answer_meta(answer) | ({"finish_reason": "stop"} if cut.stopped else {})
        text = cut.text if stop else answer.text
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text, response_metadata=meta))],
                          llm_output=meta)

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, documents: Sequence[Any] | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        question, chunks = self._inputs(messages, documents)
        ready: list[str] = []
        cut = StopText(tuple(stop or ()), ready.append, None)
        pieces = self.engine.stream(question, chunks, strategy=self.strategy, max_new_tokens=self.max_new_tokens)
        for piece in pieces:
            stopped = cut(piece)
            yield from self._chunks(ready, run_manager)
            if stopped:
                pieces.close()  # stops generating
                return
        ready.append(cut.flush())
        yield from self._chunks(ready, run_manager)

    @staticmethod
    def _chunks(ready: list[str], run_manager: CallbackManagerForLLMRun | None) -> Iterator[ChatGenerationChunk]:
        for text in ready:
            if text:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=text))
                if run_manager is not None:
                    run_manager.on_llm_new_token(text, chunk=chunk)
                yield chunk
        ready.clear()


def _content(message: BaseMessage) -> str:
    """A message's text: string content as it is, content blocks' text parts joined."""
    if isinstance(message.content, str):
        return message.content
    return "".join(b if isinstance(b, str) else str(b.get("text", "")) for b in message.content
                   if isinstance(b, str) or b.get("type") == "text")
