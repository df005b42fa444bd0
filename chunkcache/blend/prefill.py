"""Computing the stored caches: the fixed head alone, and each chunk independently behind it."""

from __future__ import annotations

import torch

from chunkcache.blend.base import selective_prefill
from chunkcache.blend.layout import assemble_cache, sequential_layout
from chunkcache.kv import ChunkKV
from chunkcache.model.executor import LayerExecutor
from chunkcache.model.prompt import PromptPieces


def prefill_head(executor: LayerExecutor, head_ids: tuple[int, ...], model_fingerprint: str) -> ChunkKV:
    """KV of the head at positions 0.. (it has nothing before it: empty prefix fingerprint)."""
    layout = sequential_layout(PromptPieces(head_ids, (), ()))
    buf = executor.empty_kv(layout.length)
    selective_prefill(executor, layout, buf, torch.arange(layout.length))
    return ChunkKV(buf, head_ids, 0, model_fingerprint, "")


def prefill_chunk(
    executor: LayerExecutor, head: ChunkKV, chunk_ids: tuple[int, ...], prefix_fingerprint: str
) -> ChunkKV:
    """KV of one chunk computed behind the head only, rotated for positions len(head)..."""
    layout = sequential_layout(PromptPieces(head.token_ids, (), chunk_ids))
    buf = assemble_cache(executor, layout, head, (), layout.length)
    span = layout.question  # the chunk sits where a question would
    selective_prefill(executor, layout, buf, torch.arange(span.start, span.stop))
    return ChunkKV(
        buf[:, :, :, span.start : span.stop].clone(), chunk_ids, span.start,
        head.model_fingerprint, prefix_fingerprint,
    )
