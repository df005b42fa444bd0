"""`GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/completions`, OpenAI-compatible (vLLM's conventions),
with RAG extras in the body: `documents`, `doc_ids`, `retrieval: {top_k}`, `cache: {strategy,
recompute_ratio}`. The last user message (or the prompt) is the question; system messages and
earlier turns go into the uncached question piece, so the cached head stays the same for all."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from chunkcache.api import schemas as s
from chunkcache.api.run import answer_once, answer_stream, sse, stream_error
from chunkcache.api.service import AnswerRequest, AnswerResult, ModelNotFoundError, RagService
from chunkcache.engine import Sampling, last_question, question_from_chat

router = APIRouter(tags=["openai"])
_SSE = {200: {"content": {"text/event-stream": {}}, "description": "with stream: true, server-sent events"}}


def _service(request: Request) -> RagService:
    return request.app.state.service  # type: ignore[no-any-return]


@router.get("/v1/models", response_model=s.ModelList)
async def models(request: Request) -> s.ModelList:
    service = _service(request)
    return s.ModelList(data=[s.ModelCard(id=service.model_id, created=service.started)])


@router.post("/v1/chat/completions", response_model=s.ChatCompletion, responses=_SSE)
async def chat_completions(body: s.ChatCompletionRequest, request: Request) -> Any:
    service = _service(request)
    turns = [(m.role, _text(m)) for m in body.messages]
    req = _answer_request(service, body, question_from_chat(turns), body.max_completion_tokens or body.max_tokens,
                          search=turns[last_question(turns)][1])
    return await _respond(request, service, body, req, chat=True)


@router.post("/v1/completions", response_model=s.Completion, responses=_SSE)
async def completions(body: s.CompletionRequest, request: Request) -> Any:
    service = _service(request)
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]  # the schema allows one
    asked = body.max_tokens if "max_tokens" in body.model_fields_set else min(body.max_tokens or 16,
                                                                           service.settings.max_tokens_limit)
    return await _respond(request, service, body, _answer_request(service, body, prompt, asked),
                          chat=False)


async def _respond(request: Request, service: RagService, body: Any, req: AnswerRequest, chat: bool) -> Any:
    rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        items = await answer_stream(request, service, req)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_events(items, chat, rid, created, service.model_id, include_usage),
                                 media_type="text/event-stream")
    result = await answer_once(request, service, req)
    common = {"id": rid, "created": created, "model": service.model_id, "usage": result.usage(),
              "chunkcache": result.info()}
    finish: Any = result.finish_reason
    if chat:
        message = s.AssistantMessage(content=result.text)
        return s.ChatCompletion(choices=[s.ChatChoice(index=0, message=message, finish_reason=finish)], **common)
    return s.Completion(choices=[s.CompletionChoice(index=0, text=result.text, finish_reason=finish)], **common)


def _text(message: s.ChatMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text for part in message.content)


def _answer_request(service: RagService, body: Any, question: str, max_tokens: int | None,
                    search: str | None = None) -> AnswerRequest:
    if body.model and body.model != service.model_id:
        raise ModelNotFoundError(f"model {body.model!r} is not served here; this server serves {service.model_id!r}")
    service.check_documents(body.documents)
    cache = body.cache or s.CacheOptions()
    params = {} if cache.recompute_ratio is None else {"recompute_ratio": cache.recompute_ratio}
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return AnswerRequest(
        question=question, search=search, documents=tuple(body.documents or ()), doc_ids=tuple(body.doc_ids or ()),
        top_k=body.retrieval.top_k if body.retrieval else None,
        retrieval=body.retrieval.mode if body.retrieval else None, strategy=cache.strategy, params=params,
        max_tokens=service.max_tokens(max_tokens),
        sampling=Sampling(body.temperature or 0.0, body.top_p if body.top_p is not None else 1.0,
                          None if body.seed is None else body.seed % 2**63),
        stop=tuple(x for x in stop if x),
    )


async def _events(items: AsyncIterator[str | AnswerResult], chat: bool, rid: str, created: int, model: str,
                  include_usage: bool) -> AsyncIterator[str]:
    """SSE chunks as OpenAI streams them: chat deltas (a first one with the role) or text pieces,
    one with the finish reason, with include_usage a last one with no choices and the usage."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def piece(text: str | None, **delta: Any) -> dict[str, Any]:
        if not chat:
            return {"text": text or ""}
        return {"delta": delta | ({} if text is None else {"content": text})}

    def chunk(content: dict[str, Any] | None, finish: str | None = None, usage: Any = None,
              **extra: Any) -> str:
        choices = [] if content is None else [{"index": 0, **content, "finish_reason": finish, "logprobs": None}]
        body: dict[str, Any] = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return sse(body | extra)

    if chat:
        yield chunk(piece("", role="assistant"))
    try:
        async for item in items:
            if isinstance(item, str):
                yield chunk(piece(item))
                continue
            yield chunk(piece(None), item.finish_reason, chunkcache=item.info().model_dump())  # references, cache
            if include_usage:
                yield chunk(None, usage=item.usage().model_dump())
    except Exception as exc:  # noqa: BLE001 - the status is sent: report it in the stream
        yield stream_error(exc)
    yield sse("[DONE]")
