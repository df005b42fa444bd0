"""Loading a causal LM (packaged name or local Hugging Face folder) with its tokenizer, prompt
template, layer executor and fingerprint."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chunkcache.atomic import write_text_atomic
from chunkcache.errors import InvalidInputError, UnsupportedModelError
from chunkcache.model.arch import check_supported, rope_parameters
from chunkcache.model.executor import LayerExecutor
from chunkcache.model.prompt import PromptTemplate
from chunkcache.model.registry import resolve_model_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
    "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
)


@dataclass
class LoadedModel:
    """A model ready for chunk fusion."""

    name: str
    path: Path
    model: torch.nn.Module
    tokenizer: Any
    executor: LayerExecutor
    template: PromptTemplate
    fingerprint: str
    dtype: torch.dtype
    eos_token_ids: tuple[int, ...]

    @property
    def max_positions(self) -> int:
        return self.executor.max_positions


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InvalidInputError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(
    name_or_path: str,
    models_dir: Path,
    dtype: str = "float32",
    device: str = "auto",
    system_prompt: str = "",
    question_template: str = "Question: {question}",
) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_dir(name_or_path, models_dir)
    config = AutoConfig.from_pretrained(path)
    check_supported(config)  # before loading weights: a clear error costs nothing
    torch_dtype = parse_dtype(dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    model.to(pick_device(device)).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    executor = LayerExecutor(model)
    fingerprint = model_fingerprint(path, config, dtype)
    return LoadedModel(
        name=name_or_path,
        path=path,
        model=model,
        tokenizer=tokenizer,
        executor=executor,
        template=PromptTemplate(tokenizer, system_prompt, question_template),
        fingerprint=fingerprint,
        dtype=torch_dtype,
        eos_token_ids=_eos_ids(model, tokenizer),
    )


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> tuple[int, ...]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        raise UnsupportedModelError("the model defines no end-of-sequence token; set eos_token_id in its config")
    return tuple(sorted(ids))


def model_fingerprint(path: Path, config: Any, dtype: str) -> str:
    """sha256 over weights, tokenizer files, dtype and RoPE settings: any change gives new keys."""
    h = hashlib.sha256(b"chunkcache-model-v1\0")
    h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    h.update(json.dumps(rope_parameters(config), sort_keys=True, default=str).encode())
    h.update(dtype.encode())
    for file in sorted(path.iterdir()):
        if file.suffix in _WEIGHT_SUFFIXES:
            h.update(file.name.encode() + _file_digest(file).encode())
        elif file.name in _TOKENIZER_FILES:
            h.update(file.name.encode() + hashlib.sha256(file.read_bytes()).hexdigest().encode())
    return h.hexdigest()


def _file_digest(file: Path) -> str:
    """Content sha256 of a weight file, memoised on (path, size, mtime) to keep loads fast."""
    stat = file.stat()
    memo_key = hashlib.sha256(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    memo_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chunkcache" / "digests"
    memo = memo_dir / memo_key
    try:
        return memo.read_text(encoding="ascii").strip()
    except OSError:
        pass
    h = hashlib.sha256()
    with file.open("rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    digest = h.hexdigest()
    try:
        memo_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(memo, digest, encoding="ascii")
    except OSError as exc:  # a read-only cache only costs speed
        log.debug("could not memoise digest of %s: %s", file, exc)
    return digest
