"""Batched chunk prefill on the real SmolLM2: each chunk's KV is what a plain prefill of head +
chunk computes, whatever it was batched with (up to float rounding)."""

from __future__ import annotations

import pytest
import torch

from chunkcache.blend.base import selective_prefill
from chunkcache.blend.layout import sequential_layout
from chunkcache.blend.prefill import prefill_chunks, prefill_head
from chunkcache.errors import InvalidInputError
from chunkcache.model import LoadedModel, PromptPieces

TEXTS = [
    "The mill on the river was built in 1820 and ground wheat for the town.",
    "Anna Berg wrote three novels about the coast, the last one in 1975 after a long silence.",
    "Copper conducts heat well.",
    "The observatory sits on a hill north of the harbour; its telescope was made in Jena in 1911.",
]


def _plain(smollm2: LoadedModel, head_ids: tuple[int, ...], chunk: tuple[int, ...]) -> torch.Tensor:
    """The chunk's KV from one causal prefill of head + chunk (no batching)."""
    layout = sequential_layout(PromptPieces(head_ids + chunk, (), ()))
    buf = smollm2.executor.empty_kv(layout.length)
    selective_prefill(smollm2.executor, layout, buf, layout.span_rows(smollm2.executor, range(0, layout.length)))
    return buf[:, :, :, len(head_ids) :]


def test_batched_chunks_match_a_plain_prefill_whatever_their_batch(smollm2: LoadedModel) -> None:
    head_ids = smollm2.template.pieces("q", ["x"]).head
    head = prefill_head(smollm2.executor, head_ids, smollm2.fingerprint)
    chunks = [smollm2.template.chunk_ids(t) for t in TEXTS]
    batched = prefill_chunks(smollm2.executor, head, chunks, "p")
    assert [kv.token_ids for kv in batched] == chunks
    assert {kv.position_offset for kv in batched} == {len(head_ids)}
    for kv, ids in zip(batched, chunks):
        reference = _plain(smollm2, head_ids, ids)
        assert kv.kv.shape == reference.shape
        torch.testing.assert_close(kv.kv, reference, atol=1e-4, rtol=1e-4)
    alone = prefill_chunks(smollm2.executor, head, chunks[2:3], "p")[0]
    pair = prefill_chunks(smollm2.executor, head, [chunks[0], chunks[2]], "p")[1]
    torch.testing.assert_close(alone.kv, batched[2].kv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pair.kv, batched[2].kv, atol=1e-5, rtol=1e-5)


def test_a_chunk_behind_a_context_is_what_a_plain_prefill_behind_it_computes(smollm2: LoadedModel) -> None:
    head_ids = smollm2.template.pieces("q", ["x"]).head
    head = prefill_head(smollm2.executor, head_ids, smollm2.fingerprint)
    chunks = [smollm2.template.chunk_ids(t) for t in TEXTS[:3]]
    contexts = [smollm2.template.chunk_ids(TEXTS[3]), (), smollm2.template.chunk_ids(TEXTS[0] + " " + TEXTS[3])]
    batched = prefill_chunks(smollm2.executor, head, chunks, ["a", "b", "c"], contexts)
    assert [kv.prefix_fingerprint for kv in batched] == ["a", "b", "c"]
    for kv, ids, ctx in zip(batched, chunks, contexts):
        assert kv.token_ids == ids and kv.position_offset == len(head_ids) + len(ctx)
        torch.testing.assert_close(kv.kv, _plain(smollm2, head_ids + ctx, ids), atol=1e-4, rtol=1e-4)
    with pytest.raises(InvalidInputError, match="one context"):
        prefill_chunks(smollm2.executor, head, chunks, "p", contexts[:2])


def test_an_empty_chunk_is_refused(smollm2: LoadedModel) -> None:
    head_ids = smollm2.template.pieces("q", ["x"]).head
    head = prefill_head(smollm2.executor, head_ids, smollm2.fingerprint)
    with pytest.raises(InvalidInputError, match="no tokens"):
        prefill_chunks(smollm2.executor, head, [smollm2.template.chunk_ids("a"), ()], "p")
    assert prefill_chunks(smollm2.executor, head, [], "p") == []
