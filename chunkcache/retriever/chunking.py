"""Token-aware chunking: a `Document` becomes `Chunk`s of at most `chunk_tokens` tokens (counted by
the serving model's tokenizer), cut at paragraph ends where possible, else at sentence ends, else
between words; consecutive chunks share up to `overlap_tokens` tokens. Chunk ids are the sha256 of
the chunk text, so the same text always gets the same id. Reading files lives in `readers.py`."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from chunkcache.errors import InvalidInputError

_LINE_START = re.compile(r"\n(?=[ \t]*(?:[-*+#>|]|\d+[.)])\s)")
_SENTENCE_END = re.compile(r"[.!?\u2026][\"'\u201d\u2019)\]]*(?=\s)")
_WORD = re.compile(r"\S+")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def content_hash(text: str) -> str:
    """sha256 of the UTF-8 text: chunk ids and document versions."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Document:
    """One source document: its id (file path or jsonl id), full text and metadata."""

    doc_id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def content_hash(self) -> str:
        return content_hash(self.text)


@dataclass(frozen=True)
class Chunk:
    """A piece of a document; `chunk_id` is the sha256 of `text`."""

    chunk_id: str
    doc_id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_text(cls, text: str, doc_id: str, metadata: Mapping[str, Any] | None = None) -> Chunk:
        return cls(content_hash(text), doc_id, text, dict(metadata or {}))


def token_counter(tokenizer: Any) -> Callable[[str], int]:
    """A function counting the tokens of a text (no special tokens) for a Hugging Face tokenizer,
    any object with ``encode(text)``, or a callable returning token ids."""
    encode = getattr(tokenizer, "encode", None)
    if callable(encode):
        try:
            encode("a", add_special_tokens=False)
        except TypeError:
            return lambda text: len(encode(text))
        return lambda text: len(encode(text, add_special_tokens=False))
    if callable(tokenizer):
        def count(text: str) -> int:
            out = tokenizer(text)
            return len(out["input_ids"] if isinstance(out, Mapping) else out)
        return count
    raise InvalidInputError(
        f"cannot count tokens with a {type(tokenizer).__name__}: pass a Hugging Face tokenizer, an "
        "object with encode(text), or a callable that returns a text's token ids"
    )


@dataclass(frozen=True)
class _Unit:  # a sentence (or a piece of one) that chunks are built from
    start: int
    end: int
    tokens: int
    paragraph_end: bool


class Chunker:
    """Splits texts into token-bounded chunks (see the module docstring)."""

    def __init__(self, tokenizer: Any, chunk_tokens: int = 256, overlap_tokens: int = 32,
                 name: str | None = None) -> None:
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise InvalidInputError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
        if (isinstance(overlap_tokens, bool) or not isinstance(overlap_tokens, int)
                or not 0 <= overlap_tokens < chunk_tokens):
            raise InvalidInputError(
                f"overlap_tokens must be an integer from 0 to chunk_tokens - 1 ({chunk_tokens - 1}), "
                f"got {overlap_tokens!r}"
            )
        self.size = chunk_tokens
        self.overlap = overlap_tokens
        self.count = token_counter(tokenizer)
        self.name = name or str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)

    @property
    def signature(self) -> str:
        """What decides the chunks besides the text: re-ingesting under another signature re-chunks."""
        return f"chunker-v1|{self.name}|{self.size}|{self.overlap}"

    def chunk(self, document: Document) -> list[Chunk]:
        """The document's chunks, in order; their metadata holds the index and character span."""
        return [
            Chunk.from_text(document.text[s:e], document.doc_id, {"chunk_index": n, "start": s, "end": e})
            for n, (s, e) in enumerate(self.split(document.text))
        ]

    def split(self, text: str) -> list[tuple[int, int]]:
        """Character spans ``(start, end)`` of the chunks of ``text``."""
        units = self._units(text)
        spans: list[tuple[int, int]] = []
        i, start = 0, units[0].start if units else 0
        while i < len(units):
            j = self._fill(text, units, i, start, spans[-1][1] if spans else -1)
            if j + 1 < len(units) and not units[j].paragraph_end:
                j = self._prefer_paragraph_end(units, i, start, j, spans[-1][1] if spans else -1)
            spans.append((start, units[j].end))
            if j + 1 >= len(units):
                break
            start, i = self._next_start(text, units, i, start, j)
        return spans

    def _fill(self, text: str, units: list[_Unit], i: int, start: int, prev_end: int) -> int:
        """Index of the last unit of the chunk starting at ``start`` (inside unit ``i``)."""
        est = self.count(text[start:units[i].end]) if start != units[i].start else units[i].tokens
        j = i  # at least up to the first unit past the previous chunk, then while the estimate fits
        while j + 1 < len(units) and (units[j].end <= prev_end or est + units[j + 1].tokens <= self.size):
            j += 1
            est += units[j].tokens
        # Token counts of pieces need not add up exactly: shrink until the real count fits, but
        # always go past the previous chunk's end (the overlap start guarantees that one unit fits).
        while j > i and units[j - 1].end > prev_end and self.count(text[start:units[j].end]) > self.size:
            j -= 1
        return j

    def _prefer_paragraph_end(self, units: list[_Unit], i: int, start: int, j: int, prev_end: int) -> int:
        """End the chunk at the last paragraph end that keeps it at least half full."""
        tokens = [u.tokens for u in units[i:j + 1]]
        filled = 0
        best = j
        for k in range(i, j):
            filled += tokens[k - i]
            if units[k].paragraph_end and units[k].end > prev_end and filled >= self.size // 2:
                best = k
        return best

    def _next_start(self, text: str, units: list[_Unit], i: int, start: int, j: int) -> tuple[int, int]:
        """(character, unit index) where the chunk after the one ending with unit ``j`` starts:
        whole trailing sentences of at most ``overlap`` tokens, else trailing words."""
        nxt = units[j + 1]
        if self.overlap == 0:
            return nxt.start, j + 1
        end = units[j].end
        budget = min(self.overlap, self.size - nxt.tokens)  # leave room for the next sentence
        k, est = j, units[j].tokens
        while k - 1 >= i and units[k - 1].start >= start and est + units[k - 1].tokens <= budget:
            k -= 1
            est += units[k].tokens
        candidate, unit = None, j
        while k <= j and units[k].start >= start:
            if self.count(text[units[k].start:end]) <= budget:
                candidate, unit = units[k].start, k
                break
            k += 1
        if candidate is None:  # no whole sentence fits: the last words of the last one
            words = [m.start() for m in _WORD.finditer(text, units[j].start, end)]
            words = [w for w in words[1:] if w >= start]  # never the whole unit (checked above)
            lo, hi = 0, len(words)
            while lo < hi:  # first word whose suffix fits (shorter suffixes have fewer tokens)
                mid = (lo + hi) // 2
                if self.count(text[words[mid]:end]) <= budget:
                    hi = mid
                else:
                    lo = mid + 1
            if lo == len(words) or budget <= 0:
                return nxt.start, j + 1
            candidate = words[lo]
        if self.count(text[candidate:nxt.end]) > self.size:  # overlap + the next sentence too long
            return nxt.start, j + 1
        return candidate, unit

    def _units(self, text: str) -> list[_Unit]:
        units: list[_Unit] = []
        for p_start, p_end in _paragraphs(text):
            pieces: list[tuple[int, int, int]] = []
            for s, e in _sentences(text, p_start, p_end):
                n = self.count(text[s:e])
                pieces.extend([(s, e, n)] if n <= self.size else self._split_long(text, s, e))
            units.extend(_Unit(s, e, n, k == len(pieces) - 1) for k, (s, e, n) in enumerate(pieces))
        return units

    def _split_long(self, text: str, s: int, e: int) -> list[tuple[int, int, int]]:
        """A sentence longer than the chunk size, cut between words (or inside a huge word) into
        pieces that leave room for the overlap."""
        out: list[tuple[int, int, int]] = []
        limit = self.size - self.overlap
        words = [(m.start(), m.end()) for m in _WORD.finditer(text, s, e)]
        w = 0
        while w < len(words):
            start = words[w][0]
            if self.count(text[start:words[w][1]]) > limit:
                out.extend(self._split_chars(text, start, words[w][1], limit))
                w += 1
                continue
            lo, hi = w, len(words) - 1  # last word such that start..its end fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self.count(text[start:words[mid][1]]) <= limit:
                    lo = mid
                else:
                    hi = mid - 1
            out.append((start, words[lo][1], self.count(text[start:words[lo][1]])))
            w = lo + 1
        return out

    def _split_chars(self, text: str, s: int, e: int, limit: int) -> list[tuple[int, int, int]]:
        out: list[tuple[int, int, int]] = []
        while s < e:
            lo, hi = s + 1, e
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self.count(text[s:mid]) <= limit:
                    lo = mid
                else:
                    hi = mid - 1
            out.append((s, lo, self.count(text[s:lo])))
            s = lo
        return out


def _paragraphs(text: str) -> list[tuple[int, int]]:
    """Spans of the blank-line separated paragraphs, without surrounding whitespace."""
    spans, pos = [], 0
    for m in [*_BLANK_LINE.finditer(text), None]:
        end = m.start() if m is not None else len(text)
        words = list(_WORD.finditer(text, pos, end))
        if words:
            spans.append((words[0].start(), words[-1].end()))
        if m is not None:
            pos = m.end()
    return spans


def _sentences(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Spans of the sentences of one paragraph; a line break ends a sentence only before a list
    item, heading, quote or table row (hard-wrapped lines are joined)."""
    cuts = {m.end() for m in _SENTENCE_END.finditer(text, start, end)}
    cuts.update(m.start() for m in _LINE_START.finditer(text, start, end))
    out, pos = [], start
    for cut in [*sorted(cuts), end]:
        words = list(_WORD.finditer(text, pos, cut))
        if words:
            out.append((words[0].start(), words[-1].end()))
        pos = max(pos, cut)
    return out
