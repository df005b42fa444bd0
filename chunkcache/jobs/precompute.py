"""`chunkcache precompute`: compute and store the KV cache of every chunk of an index, once.

Idempotent and resumable: chunks whose cache is already stored are skipped (checked without
decoding), so after Ctrl-C or kill -9 a rerun finishes the rest; every stored entry was written
atomically. The summary compares its throughput with the bare batched prefill loop (no store,
no codec) on a sample of the same batches, each timed right before or after its precompute."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from chunkcache.engine import ChunkCacheEngine
from chunkcache.errors import InvalidInputError
from chunkcache.retriever import ChunkIndex


@dataclass
class PrecomputeSummary:
    chunks: int = 0  # in the index
    skipped: int = 0  # already stored
    computed: int = 0
    tokens: int = 0  # of the computed chunks
    context_tokens: int = 0  # computed in front of them and dropped (chunk_primer: neighbours)
    seconds: float = 0.0  # precompute only (the bare loop's time is not in it)
    chunks_per_s: float = 0.0
    tokens_per_s: float = 0.0
    stored_bytes: int | None = None  # of the store's byte tiers after the run
    written_bytes: int | None = None  # encoded bytes of the computed chunks (ray: as its workers report)
    batch_size: int = 0
    bare_batches: int = 0  # batches also run through the bare loop, right after precompute
    bare_tokens_per_s: float | None = None  # the bare batched prefill loop on those batches
    vs_bare: float | None = None  # precompute's tokens/s over the bare loop's, on the same batches

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def index_chunks(index: ChunkIndex) -> Iterator[str]:
    """Every chunk text of the index, each once, in document order."""
    seen: set[str] = set()
    for doc_id in index.documents():
        for chunk_id in index.doc_chunks(doc_id):
            if chunk_id in seen:
                continue
            seen.add(chunk_id)
            hit = index.get(chunk_id)
            if hit is not None:
                yield hit.text


def precompute_index(
    engine: ChunkCacheEngine, index: ChunkIndex, batch_size: int | None = None, progress: bool = True,
    bare_every: int = 10,
) -> PrecomputeSummary:
    """Precompute every chunk of ``index`` not yet stored (see `precompute_texts`); with
    ``chunk_primer: neighbours`` each behind its nearest chunks of the index."""
    engine.use_index(index)
    return precompute_texts(engine, list(index_chunks(index)), batch_size, progress, bare_every)


def precompute_texts(
    engine: ChunkCacheEngine, texts: Sequence[str], batch_size: int | None = None, progress: bool = True,
    bare_every: int = 10,
) -> PrecomputeSummary:
    """Store every chunk's cache, ``batch_size`` chunks per batched prefill. Every
    ``bare_every``-th batch (and the first; 0: never) is also run through the bare batched
    prefill loop (no store, no codec) right after or before it (alternating), so the two are
    compared side by side on the same chunks while the machine is in the same state."""
    batch_size = engine.settings.precompute_batch if batch_size is None else batch_size
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be at least 1, got {batch_size}")
    todo = [t for t in texts if not engine.stored(t)]
    summary = PrecomputeSummary(chunks=len(texts), skipped=len(texts) - len(todo), batch_size=batch_size)
    count = engine.model.template.chunk_ids
    matched_s = bare_s = 0.0
    matched_tokens = 0
    with _progress(progress, len(todo)) as advance:
        for number, start in enumerate(range(0, len(todo), batch_size)):
            batch = todo[start : start + batch_size]
            tokens = sum(len(count(t)) for t in batch)
            sampled = bare_every > 0 and number % bare_every == 0
            bare_first = sampled and summary.bare_batches % 2 == 1  # alternate who runs warm
            if bare_first:
                bare_s += _timed(engine.prefill_only, batch)
            took = _timed(engine.precompute, batch, batch_size)
            if sampled and not bare_first:
                bare_s += _timed(engine.prefill_only, batch)
            if sampled:
                matched_s += took
                matched_tokens += tokens
                summary.bare_batches += 1
            summary.seconds += took
            summary.computed += len(batch)
            summary.tokens += tokens
            summary.context_tokens += sum(engine.context_lengths(batch))
            advance(len(batch), tokens)
    if summary.computed:
        summary.chunks_per_s = summary.computed / summary.seconds
        summary.tokens_per_s = summary.tokens / summary.seconds
    if matched_tokens:
        summary.bare_tokens_per_s = matched_tokens / bare_s
        summary.vs_bare = bare_s / matched_s
    from chunkcache.store import PERSISTENT_TIERS

    sizes = [t.size() for t in getattr(engine.store, "tiers", []) if t.name in PERSISTENT_TIERS]
    summary.stored_bytes = sum(sizes) if sizes else None
    return summary


def _timed(fn: Callable[..., object], *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


class _progress:
    """A rich progress bar with chunks/s and tokens/s (or nothing when disabled)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total
        self._bar: Any = None
        self._tokens = 0
        self._start = time.perf_counter()

    def __enter__(self):  # type: ignore[no-untyped-def]
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("precompute"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
            self._bar.start()
            self._task = self._bar.add_task("chunks", total=self.total, rate="")
        return self.advance

    def advance(self, chunks: int, tokens: int) -> None:
        self._tokens += tokens
        if self._bar is not None:
            elapsed = max(time.perf_counter() - self._start, 1e-9)
            done = self._bar.tasks[0].completed + chunks
            self._bar.update(self._task, advance=chunks,
                             rate=f"{done / elapsed:.1f} chunks/s, {self._tokens / elapsed:.0f} tokens/s")

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
