"""Computing the stored caches: the fixed head alone, and each chunk independently behind the head
and a fixed *primer*.

The primer is a few neutral passages placed between the head and the chunk while the chunk is
computed, then dropped. A chunk computed right behind the system prompt sees no passage before it,
so its tokens (the first ones most) settle into states they never have inside a real prompt,
where other passages precede them; behind the primer they start from a realistic state and
deviate less from a full prefill, which is what every fusion strategy has to repair.

A chunk that lives in an index can go one step further (``chunk_primer: neighbours``): it is
computed behind its nearest chunks of the corpus (the passages most likely to precede it in a real
prompt), placed after the primer and cut to a token budget (`context_ids`). What a chunk was
computed behind is part of its cache key, so a changed neighbour set is a different entry."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Protocol

import torch

from chunkcache.blend.base import selective_prefill
from chunkcache.blend.layout import sequential_layout
from chunkcache.errors import InvalidInputError
from chunkcache.kv import ChunkKV
from chunkcache.model.executor import LayerExecutor
from chunkcache.model.prompt import PromptPieces, PromptTemplate


NEIGHBOURS = "neighbours"


class ChunkNeighbours(Protocol):
    """Where a chunk's nearest passages come from (a `chunkcache.retriever.ChunkIndex`)."""

    def neighbours(self, texts: Sequence[str], n: int) -> list[tuple[str, ...] | None]:
        """Each text's ``n`` nearest other chunks, least similar first; None for a text that is
        not a chunk of the corpus (an ad-hoc passage keeps the plain primer)."""
        ...


def context_ids(template: PromptTemplate, neighbours: Sequence[str], budget: int) -> tuple[int, ...]:
    """Token ids of the ``neighbours`` (least similar first, each formatted as a chunk), at most
    ``budget`` of them: the least similar passages go first, and one cut short keeps its end
    (the part next to the chunk)."""
    pieces = [template.chunk_ids(text) for text in neighbours]
    kept: list[tuple[int, ...]] = []
    room = budget
    for ids in reversed(pieces):  # the most similar is last: kept first
        if room <= 0:
            break
        kept.append(ids[-room:])
        room -= len(kept[-1])
    return tuple(i for ids in reversed(kept) for i in ids)


def primer_texts(setting: str) -> list[str]:
    """The primer's passages: ``builtin`` (shipped with chunkcache), ``none``, or a text file
    whose paragraphs (separated by blank lines) are the passages. ``neighbours`` primes with the
    builtin passages; chunks of an index then add their neighbours behind them."""
    if setting.strip().lower() in {"", "none"}:
        return []
    if setting.strip().lower() in {"builtin", NEIGHBOURS}:
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
    executor: LayerExecutor, head: ChunkKV, chunks: Sequence[tuple[int, ...]], prefix_fingerprint: str | Sequence[str],
    contexts: Sequence[tuple[int, ...]] | None = None,
) -> list[ChunkKV]:
    """`prefill_chunk` for several chunks at once (each still behind ``head`` alone): the chunks
    are right-padded into one batch so the projections and MLP run as large matrix products.

    ``contexts``: tokens computed between ``head`` and each chunk and then dropped (its
    neighbours); ``prefix_fingerprint`` is then one per chunk, naming head + context."""
    if not chunks:
        return []
    if any(len(ids) == 0 for ids in chunks):
        raise InvalidInputError("a chunk has no tokens; drop empty chunks before precomputing")
    contexts = list(contexts) if contexts is not None else [()] * len(chunks)
    prints = [prefix_fingerprint] * len(chunks) if isinstance(prefix_fingerprint, str) else list(prefix_fingerprint)
    if len(contexts) != len(chunks) or len(prints) != len(chunks):
        raise InvalidInputError("prefill_chunks needs one context and one prefix fingerprint per chunk")
    start = len(head.token_ids)
    rows_ids = [ctx + ids for ctx, ids in zip(contexts, chunks)]
    lengths = [len(ids) for ids in rows_ids]
    longest = max(lengths)
    tokens = torch.zeros(len(chunks), longest, dtype=torch.long)
    for row, ids in enumerate(rows_ids):
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
        ChunkKV(out[row, :, :, :, len(ctx) : len(ctx) + len(ids)].clone(), tuple(ids), start + len(ctx),
                head.model_fingerprint, fp)
        for row, (ctx, ids, fp) in enumerate(zip(contexts, chunks, prints))
    ]
