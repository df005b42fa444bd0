"""One index update, worked out before anything is written: which document and chunk records
change, which chunks are new (need a vector) and which lost their last document (their vector
goes). A chunk shared by several documents (same text, same id) keeps one vector and one record
listing every document; it goes only when the last one does."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from chunkcache.errors import InvalidInputError
from chunkcache.retriever.chunking import Chunk
from chunkcache.retriever.docstore import DocStore

_ID_MASK = (1 << 63) - 1


def faiss_id(chunk_id: str) -> int:
    """The chunk's int64 id in faiss: the first 8 bytes of sha256(chunk id), non-negative."""
    return int.from_bytes(hashlib.sha256(chunk_id.encode("utf-8")).digest()[:8], "big") & _ID_MASK


class Plan:
    def __init__(self, store: DocStore) -> None:
        self.store = store
        self.chunks: dict[str, dict[str, Any] | None] = {}
        self.docs: dict[str, dict[str, Any] | None] = {}
        self.new: dict[str, Chunk] = {}

    def chunk(self, chunk_id: str) -> dict[str, Any] | None:
        if chunk_id not in self.chunks:
            self.chunks[chunk_id] = self.store.chunk(chunk_id)
        return self.chunks[chunk_id]

    def doc(self, doc_id: str) -> dict[str, Any] | None:
        if doc_id not in self.docs:
            self.docs[doc_id] = self.store.doc(doc_id)
        return self.docs[doc_id]

    def unlink(self, doc_id: str) -> None:
        """Drop the document and its references from its chunks."""
        doc = self.doc(doc_id)
        if doc is None:
            return
        for cid in doc["chunk_ids"]:
            rec = self.chunk(cid)
            if rec is None or doc_id not in rec["docs"]:
                continue
            del rec["docs"][doc_id]
            if rec["doc_id"] == doc_id and rec["docs"]:
                rec["doc_id"], rec["metadata"] = next(iter(rec["docs"].items()))
        self.docs[doc_id] = None

    def link(self, doc_id: str, chunks: Iterable[Chunk], metadata: Mapping[str, Any],
             content_hash: str | None, chunker: str | None, append: bool) -> None:
        """Record the document with these chunks (after its current ones when ``append``)."""
        doc = self.doc(doc_id) if append else None
        if doc is None:
            doc = {"doc_id": doc_id, "chunk_ids": [], "content_hash": content_hash,
                   "chunker": chunker, "metadata": copy.deepcopy(dict(metadata))}
        else:
            doc = {**doc, "content_hash": None, "chunker": None}  # no longer one known version
        ids: list[str] = list(doc["chunk_ids"])
        known = set(ids)
        for c in chunks:
            if c.doc_id != doc_id:
                raise InvalidInputError(f"chunk {c.chunk_id[:16]} belongs to {c.doc_id!r}, not {doc_id!r}")
            if c.chunk_id not in known:
                known.add(c.chunk_id)
                ids.append(c.chunk_id)
            rec = self.chunk(c.chunk_id)
            meta = copy.deepcopy(dict(c.metadata))
            if rec is None:
                self.chunks[c.chunk_id] = {"text": c.text, "doc_id": doc_id, "metadata": meta,
                                           "faiss_id": None, "docs": {doc_id: meta}}
                self.new[c.chunk_id] = c
                continue
            if rec["text"] != c.text:
                raise InvalidInputError(
                    f"chunk id {c.chunk_id[:80]!r} already names another text; chunk ids must be "
                    "content hashes (use Chunk.from_text or a Chunker)"
                )
            if doc_id not in rec["docs"]:
                rec["docs"][doc_id] = meta
            if rec["doc_id"] not in rec["docs"]:  # it had lost every document earlier in this plan
                rec["doc_id"], rec["metadata"] = doc_id, meta
        doc["chunk_ids"] = ids
        self.docs[doc_id] = doc

    def finish(self) -> tuple[list[Chunk], dict[str, int]]:
        """(chunks that need a vector, {chunk id: faiss id} of vectors to remove); records of
        chunks left without a document become deletions."""
        removed: dict[str, int] = {}
        for cid, rec in self.chunks.items():
            if rec is not None and not rec["docs"]:
                if rec["faiss_id"] is not None:
                    removed[cid] = int(rec["faiss_id"])
                self.chunks[cid] = None
                self.new.pop(cid, None)
        return list(self.new.values()), removed

    def assign_ids(self, chunks: list[Chunk], removed: Mapping[str, int]) -> list[int]:
        """Faiss ids for new chunks, probing past (astronomically rare) collisions."""
        taken = set(removed.values())
        ids = []
        for c in chunks:
            fid = faiss_id(c.chunk_id)
            while fid in taken or self.store.chunk_id_for(fid) not in (None, c.chunk_id):
                fid = (fid + 1) & _ID_MASK
            taken.add(fid)
            ids.append(fid)
            self.chunks[c.chunk_id]["faiss_id"] = fid  # type: ignore[index]
        return ids
