"""The cachecraft strategy through the engine on the real SmolLM2: variants recorded by a full
prefill are reused as they are when the same chunks come back in the same order, fixed where the
order changed, and chunks without metadata fall back to CacheBlend's selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import torch

from chunkcache.cli import main
from chunkcache.config import Settings
from chunkcache.engine import ChunkCacheEngine
from chunkcache.model import LoadedModel
from chunkcache.store.variants import VariantIndex

CHUNKS = [
    "The old mill was built in Tarnow in 1820 on the river Vela.",
    "The stone bridge of Tarnow was finished in 1846 by the engineer Ilse Marr.",
    "Tarnow's first school opened in 1871 next to the church, paid for by the mill's owner.",
]
QUESTION = "Who finished the bridge?"


def test_variants_from_a_full_prefill_are_reused_and_fixed(
    smollm2: LoadedModel, store_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # raw: variants come back exactly as the full prefill computed them
    settings = Settings.load(env={}, store_path=store_path, craft_variants=True, codec="raw")
    with ChunkCacheEngine(settings, model=smollm2) as engine:
        full = engine.answer(QUESTION, CHUNKS, strategy="full", max_new_tokens=8, keep_logits=True)
        same = engine.answer(QUESTION, CHUNKS, strategy="cachecraft", max_new_tokens=8, keep_logits=True)
        assert [c["beta_prime"] for c in same.chunks] == [1.0, 1.0, 1.0]
        assert [c["recomputed"] for c in same.chunks] == [0, 0, 0]
        assert all(c["variant"] != "independent" for c in same.chunks)
        assert same.text == full.text and same.recomputed_tokens < full.recomputed_tokens / 4
        torch.testing.assert_close(same.first_token_logits, full.first_token_logits, atol=1e-4, rtol=1e-4)

        turned = engine.answer(QUESTION, CHUNKS[::-1], strategy="cachecraft", max_new_tokens=8)
        later = turned.chunks[1:]
        assert all(c["beta_prime"] < 1.0 and c["recomputed"] > 0 for c in later)
        assert all(0 < c["cfo"] <= 1 for c in later)
        # every token choice keeps each chunk's CFO count; only their scoring passes cost more
        work = {"qattn": turned.recomputed_tokens}
        for select in ("blend", "inter"):
            picked = engine.answer(QUESTION, CHUNKS[::-1], strategy="cachecraft", select=select,
                                   max_new_tokens=8)
            assert picked.chunks == turned.chunks and picked.text
            work[select] = picked.recomputed_tokens
        assert work["inter"] < work["qattn"] < work["blend"]

    index = VariantIndex(store_path / "variants")
    stats = index.stats()
    assert stats["chunks"] == 3 and stats["variants"] == 3 and all(0.5 <= x <= 1 for x in stats["cci"])
    index.close()
    capsys.readouterr()
    assert main(["cache", "stats", "--json", "--store", str(store_path)]) == 0
    shown = json.loads(capsys.readouterr().out)["cachecraft_variants"]
    assert (shown["chunks"], shown["variants"], len(shown["cci_quartiles"])) == (3, 3, 3)


def test_chunks_without_metadata_fall_back_to_cacheblend(smollm2: LoadedModel, store_path: Path) -> None:
    with ChunkCacheEngine(Settings.load(env={}, store_path=store_path), model=smollm2) as engine:
        answer = engine.answer(QUESTION, CHUNKS, strategy="cachecraft", max_new_tokens=4)
        assert [c["variant"] for c in answer.chunks] == ["independent"] * 3
        assert all(c["recomputed"] is None and c["cci"] is None for c in answer.chunks)
        assert 0 < answer.recomputed_tokens < answer.prompt_tokens and answer.text
