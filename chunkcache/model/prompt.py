"""The prompt layout shared by every strategy: a fixed head (chat template up to the user's
content), one piece per chunk, then the question and the assistant turn. Pieces are tokenized
separately so that a full prefill and a fused cache see exactly the same token ids. Text that
users send (documents, questions, chat turns) is tokenized with special tokens inert: a
``<|im_start|>`` typed in a document is plain characters, so user text cannot forge a turn of
the chat template; only the template's own head and tail carry control tokens."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

from chunkcache.errors import InvalidInputError

_SENTINEL = "\u2063CHUNKCACHE_USER_CONTENT\u2063"
# A character that is not white space, the same in Python's and JSON Schema's (ECMA-262) regexes
# (their \\S differ: Python counts U+0085 and U+001C-U+001F as space), so the API's schema and
# the server agree on what holds text.
TEXT_CHAR = r"[^\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"


def has_text(text: str) -> bool:
    return re.search(TEXT_CHAR, text) is not None


@dataclass(frozen=True)
class PromptPieces:
    head: tuple[int, ...]
    chunks: tuple[tuple[int, ...], ...]
    question: tuple[int, ...]

    @property
    def total(self) -> int:
        return len(self.head) + sum(map(len, self.chunks)) + len(self.question)

    def all_ids(self) -> list[int]:
        ids = list(self.head)
        for chunk in self.chunks:
            ids.extend(chunk)
        ids.extend(self.question)
        return ids


class PromptTemplate:
    """Splits the model's chat template around the user content."""

    def __init__(self, tokenizer: Any, system_prompt: str, question_template: str = "Question: {question}") -> None:
        if "{question}" not in question_template:
            raise InvalidInputError("question_template must contain {question}")
        self.tokenizer = tokenizer
        self.question_template = question_template
        self.head_text, self.tail_text = self._split(system_prompt)
        # `split_special_tokens` is a switch on the shared Rust tokenizer, set for the call and
        # set back: another thread encoding meanwhile would read special tokens as text (or the
        # other way round) and get other ids. Requests are planned on several threads at once.
        self._lock = threading.Lock()

    def _split(self, system: str) -> tuple[str, str]:
        if getattr(self.tokenizer, "chat_template", None):
            attempts = [
                [{"role": "system", "content": system}, {"role": "user", "content": _SENTINEL}],
                # Templates without a system role: the instruction goes in the user turn.
                [{"role": "user", "content": f"{system}\n\n{_SENTINEL}"}],
            ]
            for messages in attempts:
                try:
                    text = self.tokenizer.apply_chat_template(
                        messages, tokenize=False, add_generation_prompt=True
                    )
                except Exception:  # noqa: BLE001 - templates raise arbitrary errors for roles
                    continue
                if isinstance(text, str) and text.count(_SENTINEL) == 1:
                    head, tail = text.split(_SENTINEL)
                    return head, tail
        bos = self.tokenizer.bos_token or ""
        return f"{bos}{system}\n\n", "\nAnswer:"

    def encode(self, text: str, inert: bool = True) -> tuple[int, ...]:
        """Token ids of ``text``; ``inert``: special-token strings in it stay plain text."""
        with self._lock:
            if not inert:
                return tuple(self.tokenizer.encode(text, add_special_tokens=False))
            return tuple(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def head_ids(self) -> tuple[int, ...]:
        return self.encode(self.head_text, inert=False)

    def chunk_ids(self, chunk: str) -> tuple[int, ...]:
        return self.encode(chunk.strip() + "\n\n")

    def question_ids(self, question: str) -> tuple[int, ...]:
        text = self.question_template.replace("{question}", question.strip())
        return self.encode(text) + self.encode(self.tail_text, inert=False)

    def pieces(self, question: str, chunks: list[str]) -> PromptPieces:
        return PromptPieces(
            head=self.head_ids(),
            chunks=tuple(self.chunk_ids(c) for c in chunks),
            question=self.question_ids(question),
        )


def last_question(turns: list[tuple[str, str]]) -> int:
    """Index of the question in a chat: its last user message with text."""
    for i in range(len(turns) - 1, -1, -1):
        role, text = turns[i]
        if role == "user" and has_text(text):
            return i
    raise InvalidInputError("the messages hold no question: send at least one 'user' message with text")


def question_from_chat(turns: list[tuple[str, str]]) -> str:
    """The question piece for a chat: system instructions, the other turns, then the last user
    message with text. They all go into the uncached question, so the cached head stays the same
    for every request. ``turns`` are (role, text) with roles system/developer/user/assistant
    (others are dropped); turns after the question (an assistant's start) are kept as context."""
    at = last_question(turns)
    system = [text for role, text in turns if role in ("system", "developer") and text]
    others = [f"{role.capitalize()}: {text}" for i, (role, text) in enumerate(turns)
              if i != at and role in ("user", "assistant") and text]
    parts = system + (["Conversation so far:\n" + "\n".join(others)] if others else []) + [turns[at][1]]
    return "\n\n".join(parts)
