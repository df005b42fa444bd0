"""Deterministic, position-independent content keys for chunk caches (sha256, never ``hash()``)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def _ids_bytes(token_ids: Sequence[int]) -> bytes:
    return np.asarray(token_ids, dtype="<i8").tobytes()  # fixed width and byte order


def prefix_fingerprint(model_fingerprint: str, head_ids: Sequence[int]) -> str:
    """Identifies the fixed head a chunk was computed behind."""
    h = hashlib.sha256(b"chunkcache-prefix-v1\0")
    h.update(model_fingerprint.encode() + b"\0" + _ids_bytes(head_ids))
    return h.hexdigest()


def chunk_key(model_fingerprint: str, prefix: str, codec: str, token_ids: Sequence[int]) -> str:
    """sha256 of model fingerprint + prefix fingerprint + codec + token ids."""
    h = hashlib.sha256(b"chunkcache-chunk-v1\0")
    for part in (model_fingerprint, prefix, codec):
        h.update(part.encode() + b"\0")
    h.update(_ids_bytes(token_ids))
    return h.hexdigest()
