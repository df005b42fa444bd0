"""``chunkcache check-model`` and serve's gate: SmolLM2 passes in float32; unsupported configs are
refused with their reason; each check fails when what it guards is broken; a stored verdict
decides serve's start without a recheck."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from chunkcache.config import Settings
from chunkcache.engine import ChunkCacheEngine
from chunkcache.errors import UnsupportedModelError
from chunkcache.jobs.check_model import check_model, identity_check, serve_gate
from chunkcache.model import LoadedModel, load_model
from chunkcache.model.check import (
    Measurement, Verdict, read_verdict, reference_check, rerotation_check, verdict_of, write_verdict,
)
from tests.conftest import make_tiny_model
from tests.test_cli import chunkcache

NAMES = ("executor_vs_hf_logit_max_abs_diff", "rerotation_rel_err", "cacheblend1_logit_max_abs_diff")


@pytest.fixture()
def settings() -> Settings:
    return Settings.load(env={}, device="cpu")


def _load(path: Path, settings: Settings) -> LoadedModel:
    return load_model(str(path), settings.models_dir, "float32", "cpu", settings.system_prompt,
                      settings.question_template)


def test_smollm2_passes_in_float32_and_its_verdict_is_kept(settings: Settings, smollm2: LoadedModel,
                                                           tmp_path: Path) -> None:
    verdict = check_model("smollm2-135m", settings, tmp_path)
    assert verdict.status == "pass" and verdict.passed, verdict.summary()
    assert [m.name for m in verdict.measurements] == list(NAMES)
    for m in verdict.measurements:
        assert 0 <= m.value < m.tolerance / 10, m.line()  # a real margin, not a near miss
    assert verdict.fingerprint == smollm2.fingerprint  # the key serve's gate looks it up by
    assert read_verdict(tmp_path, smollm2.fingerprint) == verdict
    assert "PASS smollm2-135m: executor_vs_hf" in verdict.summary()


@pytest.mark.parametrize(("family", "overrides", "reason"), [
    ("mistral", {"sliding_window": 16}, r"sliding-window attention \(window=16\) is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
     "dynamic NTK RoPE scaling is not supported: its rotation angles depend on sequence length"),
])
def test_unsupported_configs_are_refused_with_the_reason(family: str, overrides: dict[str, Any], reason: str,
                                                         settings: Settings, tmp_path: Path) -> None:
    folder = make_tiny_model(family, tmp_path / "model", settings.models_dir, **overrides)
    verdict = check_model(str(folder), settings, tmp_path / "checks")
    assert verdict.status == "unsupported" and not verdict.passed and not verdict.measurements
    assert re.search(reason, verdict.reason), verdict.reason
    assert not (tmp_path / "checks").exists()  # nothing was measured, nothing stored
    with pytest.raises(UnsupportedModelError, match=reason):
        serve_gate(dataclasses.replace(settings, model=str(folder)), checks_dir=tmp_path / "checks")


def test_cli_refuses_an_unsupported_model_in_one_line_and_passes_a_tiny_one(
    settings: Settings, tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    folder = make_tiny_model("mistral", tmp_path / "windowed", settings.models_dir, sliding_window=16)
    out = chunkcache("check-model", str(folder), "--checks-dir", str(tmp_path / "checks"), store=tmp_path / "s")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("chunkcache: error: sliding-window attention (window=16) is not supported")

    out = chunkcache("check-model", str(tiny_dirs["qwen2"]), "--checks-dir", str(tmp_path / "checks"), "--json",
                     store=tmp_path / "s")
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout)
    assert found["status"] == "pass" and found["passed"] and [m["name"] for m in found["measurements"]] == list(NAMES)
    assert (tmp_path / "checks" / f"{found['fingerprint']}.json").is_file()


def test_help_names_check_model_and_the_serve_flag(tmp_path: Path) -> None:
    assert "check-model" in chunkcache("--help", store=tmp_path).stdout
    assert "--allow-unchecked-model" in chunkcache("serve", "--help", store=tmp_path).stdout


# --- each check fails when what it guards is broken -----------------------------------------
def test_rerotation_check_fails_when_angles_are_not_linear_in_position(
    settings: Settings, tiny_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = _load(tiny_dirs["llama"], settings)
    assert rerotation_check(loaded).passed
    angles = loaded.executor._angles  # what dynamic NTK does: the angle of a position is not p x freq
    monkeypatch.setattr(loaded.executor, "_angles", lambda positions: angles(positions.double() ** 1.01))
    broken = rerotation_check(loaded)
    assert not broken.passed and broken.value > 100 * broken.tolerance, broken.line()


def test_reference_check_fails_on_a_model_quirk_the_executor_ignores(settings: Settings,
                                                                     tiny_dirs: dict[str, Path]) -> None:
    loaded = _load(tiny_dirs["llama"], settings)
    assert reference_check(loaded).passed
    loaded.model.model.layers[0].self_attn.scaling = 1.0  # another attention scale (as Gemma's)
    broken = reference_check(loaded)
    assert not broken.passed and broken.value > 10 * broken.tolerance, broken.line()


def test_identity_check_compares_the_fused_answer_with_full_prefill(
    settings: Settings, tiny_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = _load(tiny_dirs["llama"], settings)
    engine = ChunkCacheEngine(dataclasses.replace(settings, store_tiers="cpu", codec="raw"), model=loaded)
    assert identity_check(engine).passed
    answer = engine.answer

    def skewed(question: str, chunks: list[str], strategy: str | None = None, **kw: Any) -> Any:
        got = answer(question, chunks, strategy=strategy, **kw)
        if strategy != "full":  # a fusion that drifts from full prefill by 0.01 in one logit
            logits = got.first_token_logits.clone()
            logits[7] += 0.01
            got = dataclasses.replace(got, first_token_logits=logits)
        return got

    monkeypatch.setattr(engine, "answer", skewed)
    broken = identity_check(engine)
    assert not broken.passed and math.isclose(broken.value, 0.01, rel_tol=1e-3), broken.line()


# --- serve's gate ---------------------------------------------------------------------------
def _stored(checks: Path, model: str, fingerprint: str, value: float) -> Verdict:
    verdict = verdict_of(model, fingerprint, [Measurement("rerotation_rel_err", value, 1e-4)])
    write_verdict(checks, verdict)
    return verdict


def test_a_stored_failing_verdict_refuses_serve_unless_allowed(settings: Settings, tiny_dirs: dict[str, Path],
                                                              tmp_path: Path) -> None:
    folder = str(tiny_dirs["llama"])
    fingerprint = _load(tiny_dirs["llama"], settings).fingerprint
    _stored(tmp_path, folder, fingerprint, 0.5)
    served = dataclasses.replace(settings, model=folder)
    with pytest.raises(UnsupportedModelError, match="failed chunkcache's model check .*--allow-unchecked-model"):
        serve_gate(served, checks_dir=tmp_path)
    assert not read_verdict(tmp_path, fingerprint).passed  # refused from the stored verdict, not rechecked
    skipped = serve_gate(served, allow_unchecked=True, checks_dir=tmp_path)
    assert skipped.verdict is None and "skipped" in skipped.message
    from_settings = Settings.load(env={"CHUNKCACHE_ALLOW_UNCHECKED_MODEL": "true"}, model=folder, device="cpu")
    assert serve_gate(from_settings, checks_dir=tmp_path).verdict is None


def test_a_stored_pass_is_reused_and_a_missing_one_is_checked_once(settings: Settings, tiny_dirs: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    served = dataclasses.replace(settings, model=str(tiny_dirs["qwen2"]))
    first = serve_gate(served, checks_dir=tmp_path / "checks")  # no verdict yet: checked now, then stored
    assert first.verdict is not None and first.verdict.passed and not first.reused
    assert "checked now" in first.message
    stored = _stored(tmp_path / "checks", served.model, first.verdict.fingerprint, 1.25e-9)  # a value no check gives
    again = serve_gate(served, checks_dir=tmp_path / "checks")
    assert again.reused and again.verdict == stored and "verdict reused" in again.message


def test_an_unreadable_or_outdated_verdict_is_not_trusted(tmp_path: Path) -> None:
    fingerprint = "ab" * 32
    (tmp_path / f"{fingerprint}.json").write_text("{not json", encoding="utf-8")
    assert read_verdict(tmp_path, fingerprint) is None
    old = dataclasses.replace(verdict_of("m", fingerprint, [Measurement("x", 0.0, 1.0)]), check_version=0)
    write_verdict(tmp_path, old)
    assert read_verdict(tmp_path, fingerprint) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{fingerprint}.json"]  # no temporary file left
    nan = verdict_of("m", fingerprint, [Measurement("x", float("nan"), 1.0)])
    assert nan.status == "fail"  # a NaN never passes
