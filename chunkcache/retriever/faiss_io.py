"""faiss plumbing for `ChunkIndex`: building an id-mapped index from a factory string (inner
product), writing it atomically, the cross-process writer lock, and searching on a GPU copy when
the installed faiss has GPUs (falls back to the CPU index otherwise)."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from chunkcache.errors import InvalidInputError

log = logging.getLogger(__name__)

def new_index(dim: int, factory: str) -> faiss.IndexIDMap2:
    """An empty `IndexIDMap2` (removable, reconstructible ids) around ``factory``, inner product."""
    try:
        base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown"
        raise InvalidInputError(
            f"faiss cannot build the factory string {factory!r} ({reason}); "
            "try 'Flat' (exact), 'HNSW32,Flat' (fast on large corpora) or 'IVF1024,Flat'"
        ) from None
    return faiss.IndexIDMap2(base)


def write_atomic(index: faiss.Index, path: Path) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        faiss.write_index(index, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def writer_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on the file ``path`` (where fcntl exists), held while writing."""
    try:
        import fcntl
    except ImportError:  # Windows: one writer is the caller's job
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def gpu_count() -> int:
    count = getattr(faiss, "get_num_gpus", None)
    try:
        return int(count()) if callable(count) else 0
    except RuntimeError:
        return 0


class Searcher:
    """Searches an `IndexIDMap2`, through a GPU copy of its inner index when one can be made.
    Call `invalidate` after every change to the index."""

    def __init__(self) -> None:
        self._gpu: Any = None  # None: not tried since the last change; False: CPU only

    def invalidate(self) -> None:
        self._gpu = None

    def search(self, index: faiss.IndexIDMap2, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._gpu is None:
            self._gpu = False
            if gpu_count() > 0:
                try:
                    res = faiss.StandardGpuResources()
                    self._gpu = (res, faiss.index_cpu_to_gpu(res, 0, index.index),
                                 faiss.vector_to_array(index.id_map))
                except (RuntimeError, AttributeError) as exc:  # e.g. HNSW has no GPU version
                    log.info("faiss index stays on the CPU (%s)", exc)
        if self._gpu:
            _, gpu_index, id_map = self._gpu
            scores, positions = gpu_index.search(vectors, k)
            return scores, np.where(positions >= 0, id_map[np.clip(positions, 0, None)], -1)
        return index.search(vectors, k)
