"""Computing the stored caches: the fixed head alone, and each chunk independently behind the head
and a fixed *primer*.

The primer is a few neutral passages placed between the head and the chunk while the chunk is
computed, then dropped. A chunk computed right behind the system prompt sees no passage before it,
so its tokens (the first ones most) settle into states they never have inside a real prompt,
where other passages precede them; behind the primer they start from a realistic state and
deviate less from a full prefill, which is what every fusion strategy has to repair."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch

from chunkcache.blend.base import selective_prefill
from chunkcache.blend.layout import sequential_layout
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
    layout = sequential_layout(PromptPieces(head_ids, (), ()), executor.device)
    buf = executor.empty_kv(layout.length)
    selective_prefill(executor, layout, buf, layout.span_rows(executor, range(0, layout.length)))
    return ChunkKV(buf, head_ids, 0, model_fingerprint, "")


def prefill_chunk(
    executor: LayerExecutor, head: ChunkKV, chunk_ids: tuple[int, ...], prefix_fingerprint: str
) -> ChunkKV:
    """KV of one chunk computed behind ``head`` (the head, or head + primer), rotated for the
    positions right after it."""
    return prefill_chunks(executor, head, [chunk_ids], prefix_fingerprint)[0]


def prefill_chunks(
    executor: LayerExecutor, head: ChunkKV, chunks: Sequence[tuple[int, ...]], prefix_fingerprint: str
) -> list[ChunkKV]:
    """`prefill_chunk` for several chunks at once (each still behind ``head`` alone): the chunks
    are right-padded into one batch so the projections and MLP run as large matrix products."""
    if not chunks:
        return []
    if any(len(ids) == 0 for ids in chunks):
        raise InvalidInputError("a chunk has no tokens; drop empty chunks before precomputing")
    start = len(head.token_ids)
    lengths = [len(ids) for ids in chunks]
    longest = max(lengths)
    tokens = torch.zeros(len(chunks), longest, dtype=torch.long)
    for row, ids in enumerate(chunks):
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    positions = torch.arange(start, start + longest, device=executor.device)
    rows = executor.rows(torch.arange(len(chunks) * longest, device=executor.device), positions.repeat(len(chunks)))
    hidden = executor.embed(tokens)
    out = executor.empty_kv(0).new_empty(
        (len(chunks), executor.num_layers, 2, executor.num_kv_heads, longest, executor.head_dim)
    )
    for layer in range(executor.num_layers):
        prefix = head.kv[layer].to(executor.device)
        hidden, k, v = executor.run_layer_batch(layer, hidden, rows, lengths, prefix[0], prefix[1])
        out[:, layer, 0], out[:, layer, 1] = k, v
    return [
        ChunkKV(out[row, :, :, :, : len(ids)].clone(), tuple(ids), start, head.model_fingerprint, prefix_fingerprint)
        for row, ids in enumerate(chunks)
    ]
