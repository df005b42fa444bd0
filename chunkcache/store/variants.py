"""`VariantIndex`: for each chunk, the variants of its cache computed inside real requests
(Cache-Craft): which chunks preceded it there, how much it attended to each, its CCI and the
per-token inter-attention scores. The variants' KV live in the tiered store under their own key;
this index (lmdb, JSON values, no pickle) keeps at most ``limit`` per chunk, dropping the least
reused first, and says which KV entries to delete."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import lmdb

from chunkcache.errors import InvalidInputError
from chunkcache.kv import VariantMeta

_MAP_SIZE = 1 << 34  # sparse; metadata only


def variant_key(chunk_key: str, preceding: Sequence[str]) -> str:
    """Store key of a chunk's cache as computed behind ``preceding`` (chunk keys, in order)."""
    text = "variant-v1|" + chunk_key + "|" + "|".join(preceding)
    return hashlib.sha256(text.encode()).hexdigest()


class VariantIndex:
    def __init__(self, path: str | Path, limit: int = 4) -> None:
        if limit < 1:
            raise InvalidInputError(f"the variant limit per chunk must be at least 1, got {limit}")
        self.limit = limit
        Path(path).mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(str(path), map_size=_MAP_SIZE, subdir=True, max_dbs=1, lock=True)

    def close(self) -> None:
        self._env.close()

    def variants(self, chunk_key: str) -> list[VariantMeta]:
        with self._env.begin() as txn:
            return _decode(txn.get(chunk_key.encode()))

    def add(self, meta: VariantMeta) -> list[str]:
        """Record (or refresh, keeping its hits) a variant; returns the keys of variants dropped
        to stay within the limit (their KV entries should be deleted)."""
        with self._env.begin(write=True) as txn:
            current = _decode(txn.get(meta.chunk_key.encode()))
            old = next((v for v in current if v.key == meta.key), None)
            others = sorted((v for v in current if v.key != meta.key), key=lambda v: v.hits, reverse=True)
            # the new variant stays (it was just computed); the least reused others make room
            kept = others[: self.limit - 1] + [replace(meta, hits=old.hits if old else meta.hits)]
            txn.put(meta.chunk_key.encode(), _encode(kept))
        return [v.key for v in others[self.limit - 1 :]]

    def hit(self, chunk_key: str, key: str) -> None:
        with self._env.begin(write=True) as txn:
            current = _decode(txn.get(chunk_key.encode()))
            updated = [replace(v, hits=v.hits + 1) if v.key == key else v for v in current]
            if updated != current:
                txn.put(chunk_key.encode(), _encode(updated))

    def stats(self) -> dict[str, Any]:
        """Chunks with variants, variant count, and the CCI of each variant."""
        chunks = variants = 0
        ccis: list[float] = []
        with self._env.begin() as txn:
            for _, value in txn.cursor():
                found = _decode(value)
                chunks += 1
                variants += len(found)
                ccis.extend(v.cci for v in found)
        return {"chunks": chunks, "variants": variants, "cci": sorted(ccis)}


def _encode(variants: list[VariantMeta]) -> bytes:
    return json.dumps([v.to_json() for v in variants], separators=(",", ":")).encode()


def _decode(raw: bytes | None) -> list[VariantMeta]:
    if raw is None:
        return []
    try:
        return [VariantMeta.from_json(v) for v in json.loads(bytes(raw))]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"a variant index entry is damaged ({exc}); delete the variants folder") from None
