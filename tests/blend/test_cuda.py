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
