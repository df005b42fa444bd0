"""A request on its way to an `Answer`: planned (`Plan`: the prompt's pieces, the strategy, the
bytes its fused cache will hold), begun (`Generation`: fused, first logits ready), then decoded
one token per step, alone or in a batch with other requests (`decode_step`), and finished.

The engine makes plans and begins generations; whoever drives the steps (`ChunkCacheEngine.answer`
for one request, the `Scheduler` for many) calls `decode_step` until each is done."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from chunkcache.blend import FusionStrategy, Sampling
from chunkcache.blend.decode import DecodeSequence, step
from chunkcache.model import PromptPieces
from chunkcache.model.executor import LayerExecutor

OnText = Callable[[str], bool | None]


@dataclass(frozen=True)
class Answer:
    text: str
    ttft_s: float  # call -> first token: loading and fusion included
    # load_s, blend_s, decode_s, total_s, and the stages inside them: store_read_s,
    # codec_decode_s, miss_prefill_s, rerotate_s, select_s, recompute_s, first_token_s
    timings: dict[str, float]
    prompt_tokens: int
    reused_tokens: int
    recomputed_tokens: int
    strategy: str
    params: dict[str, Any] = field(default_factory=dict)
    cache_hits: int = 0
    cache_misses: int = 0
    token_ids: tuple[int, ...] = ()
    finish_reason: str = "stop"  # stop: EOS, a stop request or a full context; length: max_new_tokens
    chunks: tuple[dict[str, Any], ...] = ()  # cachecraft: per chunk the variant, CCI, beta', CFO, recomputed
    tier_hits: dict[str, int] = field(default_factory=dict)  # chunk caches served per store tier
    # next-token logits after the prompt, kept only when asked for (evaluation)
    first_token_logits: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("first_token_logits")
        out["token_ids"] = list(self.token_ids)
        return out


@dataclass(frozen=True)
class Plan:
    """A request the engine has checked and tokenized but not yet fused."""

    question: str
    pieces: PromptPieces
    fusion: FusionStrategy
    strategy: str
    max_new_tokens: int
    sampling: Sampling
    on_text: OnText | None
    record_variants: bool
    keep_logits: bool
    kv_tokens: int  # what its fused cache holds: prompt + max_new_tokens
    # per chunk: the neighbours' tokens it was computed behind (empty: the primer only)
    contexts: tuple[tuple[int, ...], ...] = ()


@dataclass
class Fused:
    """What the engine hands a `Generation`: the fusion's result and its accounting."""

    result: Any  # `FusionResult`
    started: float
    first_token_from: float
    timings: dict[str, float]
    hits: int
    misses: int
    params: dict[str, Any]
    chunk_stats: tuple[dict[str, Any], ...] = ()
    tier_hits: dict[str, int] = field(default_factory=dict)


class Generation:
    """One request being decoded: its sequence, its text so far, when it ended and why."""

    def __init__(self, plan: Plan, fused: Fused, eos_token_ids: tuple[int, ...],
                 detokenize: Callable[[list[int]], str]) -> None:
        self.plan, self.fused = plan, fused
        self.first_logits = fused.result.logits.clone() if plan.keep_logits else None
        self.seq = DecodeSequence(fused.result.cache, fused.result.logits, plan.max_new_tokens, eos_token_ids,
                                  plan.sampling)
        self.tokens: list[int] = []
        self._detokenize = detokenize
        self._deltas = _TextDeltas(detokenize)
        self._eos = eos_token_ids
        self.finish_reason = "length"
        self.ttft_s = 0.0
        self._decode_start = time.perf_counter()
        self._finished_at: float | None = None
        self.error: Exception | None = None  # ``on_text`` failed: this generation ended with it

    @property
    def done(self) -> bool:
        return self.seq.done

    def accept(self, token: int) -> None:
        """The next token: counted, its text passed to ``on_text`` (which may end the answer)."""
        if not self.tokens:
            now = time.perf_counter()
            self.ttft_s = now - self.fused.started
            self._decode_start = now
            self.fused.timings["first_token_s"] = now - self.fused.first_token_from
        self.tokens.append(token)
        self.seq.accept(token)
        if token in self._eos:
            self.finish_reason = "stop"
        on_text = self.plan.on_text
        try:
            if on_text is not None:
                piece = self._deltas.add(token)
                if piece and on_text(piece):
                    self.finish_reason = "stop"
                    self.seq.stop()
                    self._finished_at = time.perf_counter()
                    return
            if self.seq.done:
                self._end()
        except Exception as exc:  # noqa: BLE001 - one caller's callback must not end a whole batch
            self.error = exc
            self.stop()

    def stop(self) -> None:
        """End now (the request was cancelled): what was generated so far is the answer."""
        if not self.seq.done:
            self.seq.stop()
            self.finish_reason = "stop"
            self._finished_at = time.perf_counter()

    def _end(self) -> None:
        """The answer ended by itself: pass on text held back (an incomplete character)."""
        self._finished_at = time.perf_counter()
        if self.plan.on_text is not None:
            tail = self._deltas.rest()
            if tail:
                self.plan.on_text(tail)
        if self.finish_reason == "length" and len(self.tokens) < self.plan.max_new_tokens:
            self.finish_reason = "stop"  # the context is full: nothing more can follow

    def answer(self) -> Answer:
        fused, result = self.fused, self.fused.result
        end = self._finished_at or time.perf_counter()
        timings = dict(fused.timings)
        timings["decode_s"] = end - self._decode_start
        timings["total_s"] = end - fused.started
        return Answer(
            text=self._detokenize(self.tokens), ttft_s=self.ttft_s, timings=timings,
            prompt_tokens=self.plan.pieces.total, reused_tokens=result.reused_tokens,
            recomputed_tokens=result.recomputed_tokens, strategy=self.plan.strategy, params=fused.params,
            cache_hits=fused.hits, cache_misses=fused.misses, token_ids=tuple(self.tokens),
            finish_reason=self.finish_reason, chunks=fused.chunk_stats, tier_hits=fused.tier_hits,
            first_token_logits=self.first_logits,
        )


def decode_step(executor: LayerExecutor, generations: Sequence[Generation]) -> None:
    """One token for every generation not yet done, in one batched forward."""
    by_seq = {id(g.seq): g for g in generations}
    step(executor, [g.seq for g in generations], lambda seq, token: by_seq[id(seq)].accept(token))


class _TextDeltas:
    """The new text each token adds to the detokenized answer, in whole characters only."""

    def __init__(self, detokenize: Callable[[list[int]], str]) -> None:
        self._detokenize = detokenize
        self._tokens: list[int] = []
        self._emitted = ""

    def add(self, token: int) -> str:
        self._tokens.append(token)
        text = self._detokenize(self._tokens)
        if not text.startswith(self._emitted) or text.endswith("\ufffd"):
            return ""  # a multi-byte character is not complete yet
        piece, self._emitted = text[len(self._emitted) :], text
        return piece

    def rest(self) -> str:
        """What the final text adds to what was emitted (empty if it no longer extends it)."""
        text = self._detokenize(self._tokens)
        piece = text[len(self._emitted) :] if text.startswith(self._emitted) else ""
        self._emitted = text
        return piece
