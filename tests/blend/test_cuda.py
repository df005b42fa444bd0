"""Every fusion strategy on a CUDA device (skipped without one): the selection's bookkeeping lives
on the CPU while the model and caches live on the GPU, and the results match the CPU's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chunkcache.blend import STRATEGIES
from chunkcache.config import Settings
from chunkcache.engine import ChunkCacheEngine
from chunkcache.model import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: fusion on the GPU")

QUESTION = "Which gate is in the capital of Germany?"
CHUNKS = [
    "Paris is the capital of France. It has the Eiffel tower and many museums along the river.",
    "Madrid is the capital of Spain. It has the Prado museum and a royal palace.",
    "Berlin is the capital of Germany. It has the Brandenburg gate and a famous wall.",
]
# spread on for both strategies that have it; cachecraft without stored variants falls back to
# CacheBlend's selection
PARAMS = {"cacheblend": {"recompute_ratio": 0.3}, "cachecraft": {"spread_k": 0.25, "spread_v": 0.25}}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_each_strategy_on_cuda_matches_the_cpu(strategy: str, tiny_dirs: dict[str, Path], models_dir: Path,
                                               tmp_path: Path) -> None:
    logits = {}
    for device in ("cpu", "cuda"):
        model = load_model(str(tiny_dirs["llama"]), models_dir, "float32", device, "sys")
        settings = Settings.load(env={}, store_path=tmp_path / device)
        with ChunkCacheEngine(settings, model=model) as engine:
            answer = engine.answer(QUESTION, CHUNKS, strategy=strategy, max_new_tokens=2, keep_logits=True,
                                   **PARAMS.get(strategy, {}))
        logits[device] = answer.first_token_logits.float().cpu()
    assert torch.allclose(logits["cuda"], logits["cpu"], atol=1e-3, rtol=1e-3), (logits["cuda"] - logits["cpu"]).abs().max()


@pytest.mark.parametrize("where", ["gpu", "pinned host"])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_no_strategy_synchronises_before_the_first_token(strategy: str, where: str, tiny_dirs: dict[str, Path],
                                                         models_dir: Path) -> None:
    """What tests/blend/test_device_path.py checks under an emulation, on a real GPU: the fused
    prefill runs under `torch.cuda.set_sync_debug_mode("error")`, with the caches on the device
    (GPU tier) or in pinned host memory, streamed layer by layer (CPU tier, decoded entries)."""
    from chunkcache.blend import FusionInput, make_strategy
    from chunkcache.blend.prefill import prefill_chunks, prefill_head
    from chunkcache.kv import ChunkKV
    from chunkcache.store.stream import LayerStream

    model = load_model(str(tiny_dirs["llama"]), models_dir, "bfloat16", "cuda", "sys")
    ex = model.executor
    pieces = model.template.pieces(QUESTION, CHUNKS)
    head = prefill_head(ex, pieces.head, "fp")
    chunks = prefill_chunks(ex, head, list(pieces.chunks), "p")
    if where == "pinned host":
        head = ChunkKV(head.kv.cpu().pin_memory(), head.token_ids, 0, "fp", "")
        streams = []
        for c in chunks:
            stream = LayerStream("k")
            stream.start_from(ChunkKV(c.kv.cpu().pin_memory(), c.token_ids, c.position_offset, "fp", "p"))
            streams.append(stream)
        chunks = streams
    fusion = make_strategy(strategy, **PARAMS.get(strategy, {}))
    inp = FusionInput(pieces, head, tuple(chunks) if fusion.uses_cache else (), max_new_tokens=2)
    fusion.fuse(ex, inp)  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits = fusion.fuse(ex, inp).logits
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("strategy", ["cacheblend", "reuse"])
def test_fusion_graphs_replay_what_the_request_computes(strategy: str, tiny_dirs: dict[str, Path],
                                                       models_dir: Path) -> None:
    """fusion_mode graphs: the first request of a bucket captures it, the next ones (other
    questions in the same bucket) replay it without one synchronisation, and every answer equals
    the request's own shapes'."""
    from chunkcache.blend import FusionInput, make_strategy
    from chunkcache.blend.buckets import use_fusion_mode
    from chunkcache.blend.fixed_fusion import run_fusion
    from chunkcache.blend.prefill import prefill_chunks, prefill_head

    model = load_model(str(tiny_dirs["llama"]), models_dir, "float32", "cuda", "sys")
    ex = model.executor
    fusion = make_strategy(strategy, **PARAMS.get(strategy, {}))
    questions = [QUESTION, QUESTION.replace("Which gate", "Which old gate"), QUESTION.replace("gate", "wall")]
    inputs = []
    for question in questions:
        pieces = model.template.pieces(question, CHUNKS)
        head = prefill_head(ex, pieces.head, "fp")
        inputs.append(FusionInput(pieces, head, tuple(prefill_chunks(ex, head, list(pieces.chunks), "p")), 2))
    use_fusion_mode(ex, "off")
    own = [run_fusion(fusion, ex, inp).logits for inp in inputs]
    runner = use_fusion_mode(ex, "graphs")
    try:
        got = [run_fusion(fusion, ex, inputs[0]).logits]
        assert runner.stats.captures == 1, runner.stats.failures
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got += [run_fusion(fusion, ex, inp).logits for inp in inputs[1:]]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert runner.stats.replays == 2 and not runner.stats.failures
    finally:
        use_fusion_mode(ex, "auto")
    for mine, theirs in zip(got, own):
        torch.testing.assert_close(mine, theirs, atol=1e-3, rtol=1e-3)
