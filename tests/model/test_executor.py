"""The layer executor reproduces the Hugging Face forward pass and computes token subsets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chunkcache.errors import UnsupportedModelError
from chunkcache.model import LoadedModel, load_model
from chunkcache.model.attention import folded_attention
from chunkcache.model.executor import LayerExecutor


def _full_prefill(executor: LayerExecutor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = ids.shape[0]
    buf = executor.empty_kv(n)
    hidden = executor.embed(ids)
    rows = executor.span_rows(range(0, n))
    for layer in range(executor.num_layers):
        hidden = executor.run_layer(layer, hidden, rows, buf[layer, 0], buf[layer, 1])
    return executor.logits(hidden), buf


@pytest.mark.parametrize("group", [1, 4])
def test_folded_attention_equals_each_head_over_its_kv_head(group: int) -> None:
    """The CUDA path's masked attention (grouped heads folded into the query length) computes
    what each query head computes alone over its own KV head (heads grouped KV-head-major)."""
    gen = torch.Generator().manual_seed(0)
    kv_heads, n, keys_n, d = 2, 5, 9, 8
    q = torch.randn(kv_heads * group, n, d, generator=gen)
    keys, values = torch.randn(2, kv_heads, keys_n, d, generator=gen)
    last = torch.tensor([3, 4, 6, 7, 8])  # each query sees the keys up to its own index
    mask = torch.arange(keys_n)[None, :] <= last[:, None]
    out = folded_attention(q, keys, values, mask, scale=0.3)
    for head in range(kv_heads * group):
        kv = head // group
        scores = (q[head] @ keys[kv].T * 0.3).masked_fill(~mask, float("-inf"))
        torch.testing.assert_close(out[head], torch.softmax(scores, -1) @ values[kv], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_prefill_matches_transformers_forward(family: str, tiny_dirs: dict[str, Path], models_dir: Path) -> None:
    loaded = load_model(str(tiny_dirs[family]), models_dir, "float32", "cpu", "sys")
    ids = torch.randint(3, 49152, (40,), generator=torch.Generator().manual_seed(0))
    ours, _ = _full_prefill(loaded.executor, ids)
    with torch.no_grad():
        ref = loaded.model(ids[None]).logits[0].float()
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()


def test_prefill_matches_transformers_on_smollm2(smollm2: LoadedModel) -> None:
    ids = torch.tensor(smollm2.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 8))
    ours, _ = _full_prefill(smollm2.executor, ids)
    with torch.no_grad():
        ref = smollm2.model(ids[None]).logits[0].float()
    assert (ours - ref).abs().max() <= 1e-3 * ref.abs().max()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_subset_over_exact_cache_equals_full(family: str, tiny_dirs: dict[str, Path], models_dir: Path) -> None:
    """Recomputing a few positions over a cache that already holds the exact KV of the others
    gives the same outputs as the full prefill at those positions."""
    executor = load_model(str(tiny_dirs[family]), models_dir, "float32", "cpu", "sys").executor
    ids = torch.randint(3, 49152, (32,), generator=torch.Generator().manual_seed(1))
    full_logits, exact = _full_prefill(executor, ids)
    subset = torch.tensor([3, 10, 11, 20, 31])
    buf = exact.clone()
    buf[:, :, :, subset] = 0  # the subset's KV must come from the recompute, not the cache
    hidden = executor.embed(ids[subset])
    rows = executor.rows(subset)
    for layer in range(executor.num_layers):
        hidden = executor.run_layer(layer, hidden, rows, buf[layer, 0], buf[layer, 1])
    assert torch.allclose(executor.logits(hidden), full_logits[subset], atol=1e-4)
    assert torch.allclose(buf, exact, atol=1e-5)


def test_rows_taken_from_rows_equal_rows_made_for_the_taken_positions(tiny_dirs: dict[str, Path],
                                                                       models_dir: Path) -> None:
    """Gradual filtering gathers the rows it keeps (tables included) instead of making their
    rotary tables again: the gathered rows must equal new ones to the bit."""
    executor = load_model(str(tiny_dirs["llama"]), models_dir, "float32", "cpu", "sys").executor
    rows = executor.rows(torch.tensor([2, 5, 9, 40, 41]), torch.tensor([7, 310, 2900, 4000, 4001]))
    keep = torch.tensor([1, 3, 4])
    taken, made = rows.take(keep), executor.rows(torch.tensor([5, 40, 41]), torch.tensor([310, 4000, 4001]))
    for name in ("index", "positions", "cos", "sin"):
        assert torch.equal(getattr(taken, name), getattr(made, name)), name
    assert taken.span is None and executor.span_rows(range(3, 6)).first(2).span == range(3, 5)


def test_rerotated_keys_match_keys_computed_in_place(smollm2: LoadedModel) -> None:
    """Layer-0 keys depend only on token and position, so re-rotating them must give the keys a
    prefill computes at the new position."""
    executor = smollm2.executor
    ids = torch.tensor(smollm2.tokenizer.encode("Paris is the capital and largest city of France. " * 6))
    hidden = executor.embed(ids)
    n = ids.shape[0]
    p, q = 40, 3600
    _, k_at_p, _ = executor.qkv(0, hidden, executor.rows(torch.arange(p, p + n)))
    _, k_at_q, _ = executor.qkv(0, hidden, executor.rows(torch.arange(q, q + n)))
    moved = executor.rerotate(k_at_p, q - p)
    scale = k_at_q.abs().max()
    assert (moved - k_at_q).abs().max() <= 1e-4 * scale
    assert (k_at_p - k_at_q).abs().max() > 1e-2 * scale  # without re-rotation they differ


@pytest.mark.parametrize(
    ("family", "overrides", "message"),
    [
        ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "dynamic NTK"),
        ("mistral", {"sliding_window": 16}, "sliding-window"),
        ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}, "partial rotary"),
    ],
)
def test_unsupported_rope_and_attention_modes_are_refused(
    family: str, overrides: dict, message: str, tmp_path: Path, models_dir: Path
) -> None:
    from tests.conftest import make_tiny_model

    folder = make_tiny_model(family, tmp_path / "m", models_dir, **overrides)
    with pytest.raises(UnsupportedModelError, match=message):
        load_model(str(folder), models_dir, "float32", "cpu", "sys")


def test_unsupported_architecture_is_refused(tmp_path: Path, models_dir: Path) -> None:
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported"):
        load_model(str(tmp_path), models_dir, "float32", "cpu", "sys")
