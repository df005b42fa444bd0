"""Computing the stored caches: the fixed head alone, and each chunk independently behind the head
and a fixed *primer*.

The primer is a few neutral passages placed between the head and the chunk while the chunk is
computed, then dropped. A chunk computed right behind the system prompt sees no passage before it,
so its tokens (the first ones most) settle into states they never have inside a real prompt,
where other passages precede them; behind the primer they start from a realistic state and
deviate less from a full prefill, which is what every fusion strategy has to repair."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from chunkcache.blend.base import selective_prefill
from chunkcache.blend.layout import assemble_cache, sequential_layout
from chunkcache.errors import InvalidInputError
from chunkcache.kv import ChunkKV
from chunkcache.model.executor import LayerExecutor
from chunkcache.model.prompt import PromptPieces, PromptTemplate


def primer_texts(setting: str) -> list[str]:
    """The primer's passages: ``builtin`` (shipped with chunkcache), ``none``, or a text file
    whose paragraphs (separated by blank lines) are the passages."""
    if setting.strip().lower() in {"", "none"}:
        return []
    if setting.strip().lower() == "builtin":
        text = resources.files("chunkcache").joinpath("data/primer.txt").read_text(encoding="utf-8")
    else:
        try:
            text = Path(setting).expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidInputError(
                f"chunk_primer {setting!r} is not 'builtin', 'none' or a readable text file: {exc.strerror}"
            ) from None
    passages = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not passages:
        raise InvalidInputError(f"chunk_primer file {setting!r} holds no text; use 'none' for no primer")
    return passages


def primer_ids(template: PromptTemplate, setting: str) -> tuple[int, ...]:
    """Token ids of the primer, each passage formatted as a chunk of the prompt."""
    return tuple(i for passage in primer_texts(setting) for i in template.chunk_ids(passage))


def prefill_head(executor: LayerExecutor, head_ids: tuple[int, ...], model_fingerprint: str) -> ChunkKV:
    """KV of a fixed prefix (the head, or head + primer) at positions 0.. (it has nothing before
    it: empty prefix fingerprint)."""
    layout = sequential_layout(PromptPieces(head_ids, (), ()))
    buf = executor.empty_kv(layout.length)
    selective_prefill(executor, layout, buf, torch.arange(layout.length))
    return ChunkKV(buf, head_ids, 0, model_fingerprint, "")


def prefill_chunk(
    executor: LayerExecutor, head: ChunkKV, chunk_ids: tuple[int, ...], prefix_fingerprint: str
) -> ChunkKV:
    """KV of one chunk computed behind ``head`` (the head, or head + primer), rotated for the
    positions right after it."""
    layout = sequential_layout(PromptPieces(head.token_ids, (), chunk_ids))
    buf = assemble_cache(executor, layout, head, (), layout.length)
    span = layout.question  # the chunk sits where a question would
    selective_prefill(executor, layout, buf, torch.arange(span.start, span.stop))
    return ChunkKV(
        buf[:, :, :, span.start : span.stop].clone(), chunk_ids, span.start,
        head.model_fingerprint, prefix_fingerprint,
    )
