"""The docstore: an lmdb environment beside the faiss index holding, as JSON (never pickle),
chunk id -> {text, doc_id, metadata, faiss_id, docs}, document id -> {chunk_ids, content_hash,
chunker, metadata}, and faiss int id -> chunk id, plus a generation number bumped by every write
(the manifest records the generation its index.faiss belongs to). Document keys are the sha256 of
the id, so ids of any length fit lmdb's key limit."""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lmdb

from chunkcache.errors import InvalidInputError
from chunkcache.retriever.errors import IndexCorruptError

_MAP_SIZE = 1 << 40  # virtual; the file grows only as data is written (sparse)
_CHUNKS, _DOCS, _IDS, _META = b"chunks", b"docs", b"faiss_ids", b"meta"
_GENERATION = b"generation"
_ID = struct.Struct(">q")
_MAX_CHUNK_ID_BYTES = 256

# lmdb allows one open environment per path and process: docstores on one folder share it.
_ENVS: dict[str, tuple[lmdb.Environment, int]] = {}
_ENVS_LOCK = threading.Lock()


def _doc_key(doc_id: str) -> bytes:
    return hashlib.sha256(doc_id.encode("utf-8")).digest()


def _chunk_key(chunk_id: str) -> bytes:
    key = chunk_id.encode("utf-8")
    if not key or len(key) > _MAX_CHUNK_ID_BYTES:
        raise InvalidInputError(f"chunk ids must be 1 to {_MAX_CHUNK_ID_BYTES} bytes long: {chunk_id[:80]!r}")
    return key


def _dumps(record: Mapping[str, Any], what: str) -> bytes:
    try:
        return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"the metadata of {what} is not JSON-serialisable ({exc}); "
                                "keep metadata to strings, numbers, lists and dicts") from None


def _loads(data: bytes | None, what: str) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        record = json.loads(bytes(data))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexCorruptError(f"docstore record of {what} is damaged ({exc}); rebuild the index") from None
    if not isinstance(record, dict):
        raise IndexCorruptError(f"docstore record of {what} is not an object; rebuild the index")
    return record


class DocStore:
    """Chunk texts and document records in lmdb (one writer at a time, any number of readers)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._key = str(self.path.resolve())
        with _ENVS_LOCK:
            env, users = _ENVS.get(self._key, (None, 0))
            if env is None:
                env = lmdb.open(str(self.path), map_size=_MAP_SIZE, max_dbs=4, max_readers=256)
            _ENVS[self._key] = (env, users + 1)
        self._env = env
        self._dbs = {name: env.open_db(name) for name in (_CHUNKS, _DOCS, _IDS, _META)}
        self._closed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with _ENVS_LOCK:
            env, users = _ENVS.pop(self._key, (self._env, 1))
            if users > 1:
                _ENVS[self._key] = (env, users - 1)
            else:
                env.close()

    def _get(self, db: bytes, key: bytes) -> bytes | None:
        with self._env.begin(db=self._dbs[db]) as txn:
            value = txn.get(key)
            return bytes(value) if value is not None else None

    def chunk(self, chunk_id: str) -> dict[str, Any] | None:
        return _loads(self._get(_CHUNKS, _chunk_key(chunk_id)), f"chunk {chunk_id}")

    def doc(self, doc_id: str) -> dict[str, Any] | None:
        return _loads(self._get(_DOCS, _doc_key(doc_id)), f"document {doc_id}")

    def chunk_id_for(self, faiss_id: int) -> str | None:
        value = self._get(_IDS, _ID.pack(faiss_id))
        return value.decode("utf-8") if value is not None else None

    def generation(self) -> int:
        value = self._get(_META, _GENERATION)
        return int(value) if value is not None else 0

    def counts(self) -> dict[str, int]:
        with self._env.begin() as txn:
            return {"chunks": txn.stat(self._dbs[_CHUNKS])["entries"],
                    "documents": txn.stat(self._dbs[_DOCS])["entries"]}

    def doc_ids(self) -> list[str]:
        with self._env.begin(db=self._dbs[_DOCS]) as txn:
            return sorted(str(_loads(v, "a document")["doc_id"]) for _, v in txn.cursor())  # type: ignore[index]

    def iter_chunks(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every (chunk id, record), in key order (a snapshot: one read transaction)."""
        with self._env.begin(db=self._dbs[_CHUNKS]) as txn:
            for key, value in txn.cursor():
                cid = bytes(key).decode("utf-8")
                yield cid, _loads(value, f"chunk {cid}")  # type: ignore[misc]

    def write(self, chunks: Mapping[str, dict[str, Any] | None], docs: Mapping[str, dict[str, Any] | None],
              removed_faiss_ids: Mapping[str, int]) -> int:
        """Apply record changes (None deletes) in one transaction; returns the new generation."""
        chunk_db, doc_db, id_db, meta_db = (self._dbs[n] for n in (_CHUNKS, _DOCS, _IDS, _META))
        payload = [(cid, _dumps(rec, f"chunk {cid}") if rec is not None else None) for cid, rec in chunks.items()]
        doc_payload = [(did, _dumps(rec, f"document {did}") if rec is not None else None) for did, rec in docs.items()]
        with self._env.begin(write=True) as txn:
            for cid, fid in removed_faiss_ids.items():
                if txn.get(_ID.pack(fid), db=id_db) == cid.encode("utf-8"):
                    txn.delete(_ID.pack(fid), db=id_db)
            for (cid, data), rec in zip(payload, chunks.values()):
                if data is None:
                    txn.delete(_chunk_key(cid), db=chunk_db)
                else:
                    txn.put(_chunk_key(cid), data, db=chunk_db)
                    txn.put(_ID.pack(int(rec["faiss_id"])), cid.encode("utf-8"), db=id_db)  # type: ignore[index]
            for did, data in doc_payload:
                if data is None:
                    txn.delete(_doc_key(did), db=doc_db)
                else:
                    txn.put(_doc_key(did), data, db=doc_db)
            generation = int(txn.get(_GENERATION, default=b"0", db=meta_db)) + 1
            txn.put(_GENERATION, str(generation).encode(), db=meta_db)
        return generation
