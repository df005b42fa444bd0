"""`chunkcache precompute --backend ray`: the same job as Ray Data `map_batches` over the index's
chunks, one actor per GPU (or ``workers`` CPU actors), each with its own engine writing to the
shared store (normally the remote tier, so that every server reads the result).

Workers get the settings as plain values (JSON-able), build their engine once, and skip chunks
that are already stored, so a rerun after a failure finishes the rest. Install with
``pip install 'chunkcache[ray]'``."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from chunkcache.config import Settings
from chunkcache.errors import InvalidInputError
from chunkcache.jobs.precompute import PrecomputeSummary, index_chunks
from chunkcache.retriever import ChunkIndex


def _plain(settings: Settings) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()}


class _Worker:
    """One Ray actor: an engine built once, then batches of chunk texts precomputed."""

    def __init__(self, settings: dict[str, Any], index: str) -> None:
        from chunkcache.engine import ChunkCacheEngine

        self.engine = ChunkCacheEngine(Settings.load(env={}, **settings))
        if self.engine.primes_with_neighbours:  # opened only when its chunks go behind their neighbours
            self.engine.use_index(ChunkIndex.load(index))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        # one row = one prefill batch, formed on the driver as the local backend forms it, so
        # both backends prefill the same chunks together and write the same bytes
        texts = [str(t) for group in batch["group"] for t in json.loads(str(group))]
        todo = [t for t in texts if not self.engine.stored(t)]
        if todo:
            self.engine.precompute(todo, len(todo))
        count = self.engine.model.template.chunk_ids
        keys = [self.engine.chunk_key(t) for t in texts]
        context = dict(zip(todo, self.engine.context_lengths(todo)))  # only computed chunks are counted
        sizes = getattr(self.engine.store, "encoded_bytes", lambda key: None)
        # keys and sizes travel back to the driver, never tensors: the caches are in the shared tier
        return {
            "key": keys,
            "computed": [t in todo for t in texts],
            "tokens": [len(count(t)) for t in texts],
            "context": [context.get(t, 0) for t in texts],
            "bytes": [(sizes(k) or 0) if t in todo else 0 for k, t in zip(keys, texts)],
        }


def precompute_ray(index: ChunkIndex, settings: Settings, workers: int = 2, batch_size: int | None = None,
                   address: str | None = None) -> tuple[PrecomputeSummary, list[str]]:
    """Precompute every chunk of ``index`` on a Ray cluster (``address``; a local one when None),
    ``batch_size`` chunks per batched prefill (default ``Settings.precompute_batch``)."""
    batch_size = settings.precompute_batch if batch_size is None else batch_size
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be at least 1, got {batch_size}")
    try:
        import ray
    except ImportError:
        raise InvalidInputError("the ray backend needs Ray: pip install 'chunkcache[ray]'") from None
    if address and not settings.remote_url:  # workers on other machines share no local disk
        raise InvalidInputError(
            "on a Ray cluster the workers share their results through the remote tier: set remote_url "
            "(redis://... or mooncake://...) and store_tiers=remote"
        )
    texts = list(index_chunks(index))
    started = ray.is_initialized()
    if not started:
        ray.init(address=address, num_cpus=None if address else max(workers, 1), include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True)
    try:
        import torch

        gpus = 1 if torch.cuda.is_available() else 0
        start = time.perf_counter()
        groups = [json.dumps(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        dataset = ray.data.from_items([{"group": g} for g in groups])
        out = dataset.map_batches(
            _Worker, fn_constructor_kwargs={"settings": _plain(settings), "index": str(index.directory)}, batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=workers), num_gpus=gpus, num_cpus=1,
        )
        rows = list(out.iter_rows())
        seconds = time.perf_counter() - start
    finally:
        if not started:
            ray.shutdown()
    computed = [r for r in rows if r["computed"]]
    summary = PrecomputeSummary(
        chunks=len(texts), skipped=len(rows) - len(computed), computed=len(computed),
        tokens=sum(int(r["tokens"]) for r in computed), seconds=seconds,
        context_tokens=sum(int(r["context"]) for r in computed),
        written_bytes=sum(int(r["bytes"]) for r in computed),
    )
    if summary.computed:
        summary.chunks_per_s = summary.computed / seconds
        summary.tokens_per_s = summary.tokens / seconds
    return summary, sorted(str(r["key"]) for r in rows)
