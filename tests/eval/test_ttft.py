"""The TTFT benchmark's report and the dataset loader."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest

from chunkcache.config import Settings
from chunkcache.engine import ChunkCacheEngine
from chunkcache.errors import InvalidInputError, UnknownStrategyError
from chunkcache.eval.datasets import Example, load_examples
from chunkcache.eval.ttft import bench_ttft, format_table, plot_ttft
from chunkcache.model import LoadedModel

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def test_loads_ctxs_format_and_the_bundled_sample(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [
        {"question": "q1", "ctxs": [{"title": "T", "text": "a"}, {"title": "", "text": "b"}], "answers": [["x", "y"]]},
        {"question": "q2", "ctxs": [{"title": "", "text": "c"}], "answers": ["z"]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert load_examples(path) == [Example("q1", ("T\na", "b"), ("x", "y"), id="0"), Example("q2", ("c",), ("z",), id="1")]
    assert load_examples(path, limit=1, passages=1) == [Example("q1", ("T\na",), ("x", "y"), id="0")]
    demo = Path(__file__).resolve().parents[2] / "chunkcache" / "data" / "demo.json"
    assert len(load_examples(demo)) == 3 and len(load_examples(demo)[0].chunks) == 6


@pytest.mark.skipif(not (SHARED / "musique_s.jsonl").exists(), reason="shared data not present")
def test_loads_the_shared_musique_file() -> None:
    examples = load_examples(SHARED / "musique_s.jsonl", limit=2, passages=6)
    assert len(examples) == 2 and all(len(e.chunks) == 6 and e.answers for e in examples)


def test_bad_dataset_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"query": "no question here"}\n')
    with pytest.raises(InvalidInputError, match="unrecognised example format"):
        load_examples(path)


def test_report_puts_every_strategy_beside_full(smollm2: LoadedModel, store_path: Path) -> None:
    # disk only: every reuse reads and decodes the entry, so those stages must be reported
    settings = Settings.load(env={}, store_path=store_path, store_tiers="disk")
    engine = ChunkCacheEngine(settings, model=smollm2)
    example = Example("What is it?", ("One passage about a thing.", "Another passage."), ("thing",))
    report = bench_ttft(engine, [example], ["cacheblend:1.0", "cacheblend-random:0.5", "reuse"], repeats=1)
    (config,) = report["configs"]
    assert list(config["strategies"]) == ["full", "cacheblend:1.0", "cacheblend-random:0.5", "reuse"]
    full = config["strategies"]["full"]
    assert full["ttft_speedup_vs_full"] == 1.0 and full["recomputed_fraction"] == 1.0
    assert all(s["first_ttft_s"] > 0 for s in config["strategies"].values())  # the warm-up, reported apart
    assert full["stages_s_median"]["recompute_s"] > 0 and full["stages_s_median"]["store_read_s"] == 0
    reuse = config["strategies"]["reuse"]
    assert reuse["recomputed_fraction"] < 0.5
    assert reuse["stages_s_median"]["store_read_s"] > 0 and reuse["stages_s_median"]["codec_decode_s"] > 0
    assert reuse["stages_s_median"]["stream_load_s"] > 0
    assert "cacheblend-random:0.5" in format_table(report)
    assert report["device"].startswith(f"{platform.machine()} CPU")  # the model is on the CPU here
    with pytest.raises(UnknownStrategyError):
        bench_ttft(engine, [example], ["warp:2"], repeats=1)


def test_each_timed_round_asks_a_question_not_asked_before(smollm2: LoadedModel, store_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Rounds must bring new prompt shapes, as real requests do (a GPU plans kernels per shape),
    and every strategy of a round must answer the same prompt. With fixed-shape fusions a round
    whose question reaches a new bucket captures its graphs: a first request, listed under
    capture_ttft_s and left out of the steady-state medians (captures emulated here)."""
    engine = ChunkCacheEngine(Settings.load(env={}, store_path=store_path), model=smollm2)
    asked: list[tuple[str, str]] = []
    answer = engine.answer
    monkeypatch.setattr(engine, "answer", lambda q, c, strategy, **kw: asked.append((strategy, q)) or answer(
        q, c, strategy=strategy, **kw))
    # answers: warm-up full, reuse; round 0 full, reuse; round 1 full, reuse: the last one captures
    monkeypatch.setattr(engine, "fusion_graph_stats", lambda: {
        "eager": 0, "captures": int(len(asked) >= 6), "capture_s": 1.5, "replays": 0, "failures": [], "graphs": True})
    example = Example("What is it?", ("One passage about a thing.", "Another passage."), ("thing",))
    (config,) = bench_ttft(engine, [example], ["reuse"], repeats=2)["configs"]
    warm, first, second = asked[:2], asked[2:4], asked[4:6]
    assert [s for s, _ in asked] == ["full", "reuse"] * 3
    assert {q for _, q in warm} == {"What is it?"}
    assert len({q for _, q in first}) == 1 and len({q for _, q in second}) == 1
    assert len({warm[0][1], first[0][1], second[0][1]}) == 3
    reuse, full = config["strategies"]["reuse"], config["strategies"]["full"]
    assert len(reuse["capture_ttft_s"]) == 1 and full["capture_ttft_s"] == []
    assert config["fusion_graphs"]["captures"] == 1
    assert "1 captured" in format_table({"model": "m", "dtype": "d", "repeats": 2, "device": "cpu",
                                         "configs": [config]})


def test_sweep_builds_prompts_of_the_asked_size(smollm2: LoadedModel, store_path: Path, tmp_path: Path) -> None:
    engine = ChunkCacheEngine(Settings.load(env={}, store_path=store_path), model=smollm2)
    demo = load_examples(Path(__file__).resolve().parents[2] / "chunkcache" / "data" / "demo.json")
    report = bench_ttft(engine, demo, ["reuse"], repeats=1, lengths=[256, 512], chunk_counts=[2, 4])
    labels = [c["label"] for c in report["configs"]]
    assert labels == ["256 tokens / 2 chunks", "256 tokens / 4 chunks", "512 tokens / 2 chunks", "512 tokens / 4 chunks"]
    for config in report["configs"]:
        assert config["tokens"] <= config["prompt_tokens_median"] <= config["tokens"] + 120
    plot_ttft(report, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_joins_short_passages_for_long_contexts() -> None:
    """32K-token prompts from a dataset of ~600-token passages: consecutive passages are joined,
    each prompt's chunks distinct and each at least the asked size."""
    from chunkcache.eval.ttft import sweep_examples

    passages = tuple(f"passage {i} " + "word " * 50 for i in range(10))
    examples = [Example("q?", passages[:5], ()), Example("q?", passages[5:], ())]

    def count(text: str) -> int:
        return len(text.split())

    def cut(text: str, n: int) -> str:
        return " ".join(text.split()[:n])

    (prompt,) = sweep_examples(examples, 8 * 120, 8, count, cut)
    assert len(prompt.chunks) == 8 and len(set(prompt.chunks)) == 8
    assert all(count(c) == 120 for c in prompt.chunks)
    with pytest.raises(ValueError, match="passages have"):
        sweep_examples(examples, 11 * 60, 11, count, cut)  # fewer passages than chunks

