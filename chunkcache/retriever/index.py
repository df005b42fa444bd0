"""`ChunkIndex`: chunk vectors in faiss (an `IndexIDMap2` around any factory index; inner product on
L2-normalised vectors, i.e. cosine), the same chunks in a BM25 lexical index (lexical.py), chunk
texts in the lmdb docstore, described by manifest.json. `search` ranks by either retriever or
both fused (fusion.py; hybrid by default); each chunk is indexed under its document's title.

On disk: ``DIR/index.faiss`` (faiss ``write_index``), ``DIR/lexical.npz``, ``DIR/docstore/`` (lmdb)
and ``DIR/manifest.json`` (embedder name, dimension and fingerprint, metric, factory, counts, the
docstore generation the faiss file belongs to). Every update is worked out first, then embedded,
then committed to lmdb in one transaction, then index.faiss, lexical.npz and manifest.json are each
replaced atomically (temp file + ``os.replace``). If a crash leaves the faiss file behind the
docstore, `load` notices the generation mismatch and re-embeds the docstore's chunks; lexical.npz
records its own generation and is rebuilt (no embedding needed) when it is behind or missing. One writer at a time
(a file lock); several processes may share the directory: each takes in the others' commits
before it searches or writes (`refresh`).
GPU faiss is used for search when the installed faiss reports a GPU."""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from chunkcache.errors import InvalidInputError
from chunkcache.retriever.chunking import Chunk, Chunker, Document, content_hash
from chunkcache.retriever.docstore import DocStore
from chunkcache.retriever.embedder import Embedder
from chunkcache.retriever.errors import IndexChangedError, IndexCorruptError, IndexExistsError, UnknownDocumentError
from chunkcache.retriever.faiss_io import Searcher, new_index, write_atomic, writer_lock
from chunkcache.retriever.fusion import SearchOptions, check_mode, fuse, indexed_text, title_of
from chunkcache.retriever.lexical import LEXICAL_FILE, LexicalIndex
from chunkcache.retriever.manifest import (FAISS_FILE, DOCSTORE_DIR, LOCK_FILE, MANIFEST_FILE, Hit, IngestReport,
                                           check_embedder, embedder_for, make_manifest, read_manifest,
                                           write_manifest)
from chunkcache.retriever.plan import Plan

log = logging.getLogger(__name__)


class ChunkIndex:
    """Build with `ChunkIndex.build`, open with `ChunkIndex.load`; close when done (or use `with`)."""

    def __init__(self, directory: Path, embedder: Embedder, manifest: dict[str, Any],
                 index: faiss.IndexIDMap2, store: DocStore, options: SearchOptions | None = None) -> None:
        self.directory = directory
        self.embedder = embedder
        self.options = options or SearchOptions()  # how `search` ranks when a call names no mode
        self._manifest = manifest
        self._index = index
        self._store = store
        self._lexical = LexicalIndex.empty()
        self._lock = threading.RLock()
        self._searcher = Searcher()

    @classmethod
    def build(cls, directory: str | Path, embedder: Embedder | None = None, factory: str = "Flat",
              chunks: Iterable[Chunk] = (), *, overwrite: bool = False,
              options: SearchOptions | None = None) -> ChunkIndex:
        """A new index in ``directory`` (refused where one exists unless ``overwrite``), holding ``chunks``."""
        directory = Path(directory)
        exists = (directory / MANIFEST_FILE).exists() or (directory / DOCSTORE_DIR).exists()
        if exists and not overwrite:
            raise IndexExistsError(
                f"{directory} already holds a chunk index; open it with ChunkIndex.load to add to "
                "it, or pass overwrite=True to replace it"
            )
        if embedder is None:
            from chunkcache.retriever.embedder import MiniLMEmbedder
            embedder = MiniLMEmbedder()
        index = new_index(embedder.dim, factory)  # a bad factory string fails before anything is removed
        if exists:
            (directory / MANIFEST_FILE).unlink(missing_ok=True)
            (directory / FAISS_FILE).unlink(missing_ok=True)
            (directory / LEXICAL_FILE).unlink(missing_ok=True)
            shutil.rmtree(directory / DOCSTORE_DIR, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)
        self = cls(directory, embedder, make_manifest(embedder, factory), index, DocStore(directory / DOCSTORE_DIR),
                   options)
        self._save(self._store.generation())
        chunks = list(chunks)
        if chunks:
            self.add(chunks)
        return self

    @classmethod
    def load(cls, directory: str | Path, embedder: Embedder | None = None,
             options: SearchOptions | None = None) -> ChunkIndex:
        """Open an index; ``embedder`` defaults to the one its manifest names (refused if it differs)."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        embedder = embedder if embedder is not None else embedder_for(manifest, directory)
        check_embedder(manifest, embedder, directory)
        if not (directory / DOCSTORE_DIR / "data.mdb").is_file():
            raise IndexCorruptError(f"{directory / DOCSTORE_DIR} is missing; rebuild the index")
        faiss_path = directory / FAISS_FILE
        try:
            index = faiss.read_index(str(faiss_path)) if faiss_path.is_file() else None
        except RuntimeError as exc:
            raise IndexCorruptError(f"cannot read {faiss_path} ({exc}); delete it to re-embed the docstore") from None
        if index is not None and not isinstance(index, faiss.IndexIDMap2):
            raise IndexCorruptError(f"{faiss_path} is not a chunkcache index (no id map)")
        self = cls(directory, embedder, manifest, index or new_index(embedder.dim, manifest["factory"]),
                   DocStore(directory / DOCSTORE_DIR), options)
        if index is None or manifest.get("generation") != self._store.generation():
            log.warning("%s: index.faiss is missing or behind the docstore (interrupted write): "
                        "re-embedding the docstore's chunks", directory)
            self.rebuild_vectors()
        elif not self._read_lexical():
            self._rebuild_lexical()
        return self

    # ---- reading -------------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Take in what other processes committed to this directory since it was read (several
        servers over one index): the docstore is shared lmdb, the vectors are re-read from
        index.faiss when the docstore's generation moved. Called before every search and write;
        costs one lmdb read when nothing changed. True when something was re-read."""
        with self._lock:
            if self._store.generation() == self._manifest["generation"]:
                return False
            # under the writers' lock: the faiss file and manifest of one commit, never half of one
            with writer_lock(self.directory / DOCSTORE_DIR / LOCK_FILE):
                manifest = read_manifest(self.directory)
                generation = self._store.generation()
                behind = manifest.get("generation") != generation
                lexical_current = True
                if not behind:
                    try:
                        index = faiss.read_index(str(self.directory / FAISS_FILE))
                    except RuntimeError as exc:
                        raise IndexCorruptError(f"cannot read {self.directory / FAISS_FILE} ({exc}); "
                                                "delete it to re-embed the docstore") from None
                    self._index, self._manifest = index, manifest
                    self._searcher.invalidate()
                    lexical_current = self._read_lexical()
            if not behind and not lexical_current:
                self._rebuild_lexical()
            if behind:
                log.warning("%s: index.faiss is behind the docstore (a writer was interrupted): "
                            "re-embedding the docstore's chunks", self.directory)
                self._manifest = manifest
                self.rebuild_vectors()
                return True
            log.info("%s: took in generation %d written by another process", self.directory, generation)
            return True

    @property
    def manifest(self) -> dict[str, Any]:
        return dict(self._manifest)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def documents(self) -> list[str]:
        return self._store.doc_ids()

    def doc_chunks(self, doc_id: str) -> list[str]:
        doc = self._store.doc(doc_id)
        if doc is None:
            raise UnknownDocumentError(f"no document {doc_id!r} in {self.directory}; see .documents()")
        return list(doc["chunk_ids"])  # the docstore is shared lmdb: always current

    def get(self, chunk_id: str) -> Hit | None:
        """The stored chunk (score nan), or None."""
        return self._hit(chunk_id, float("nan"))

    def search(self, query: str, k: int = 5, retrieval: str | None = None) -> list[Hit]:
        return self.search_many([query], k, retrieval)[0]

    def search_many(self, queries: Sequence[str], k: int = 5, retrieval: str | None = None) -> list[list[Hit]]:
        """The ``k`` best chunks per query, best first. ``retrieval`` (default: ``options.retrieval``):
        "dense" (score: cosine similarity), "lexical" (score: BM25; only chunks sharing a word with
        the query) or "hybrid" (both lists fused; score: the fused score). `Hit.ranks` says which
        retriever found each chunk, at which rank."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidInputError(f"k must be a positive integer, got {k!r}")
        mode = check_mode(retrieval or self.options.retrieval)
        depth = k if mode != "hybrid" else max(k, self.options.candidates)
        with self._lock:
            self.refresh()
            if self._index.ntotal == 0 or not queries:
                return [[] for _ in queries]
            lists: list[dict[str, list[tuple[int, float]]]] = [{} for _ in queries]
            if mode != "lexical":
                vectors = self._vectors(list(queries))
                scores, ids = self._searcher.search(self._index, vectors, min(depth, int(self._index.ntotal)))
                for found, row_scores, row_ids in zip(lists, scores, ids):
                    found["dense"] = [(int(f), float(s)) for s, f in zip(row_scores, row_ids) if f >= 0]
            if mode != "dense":
                for found, query in zip(lists, queries):
                    scores, ids = self._lexical.search(query, depth, self.options.bm25)
                    found["lexical"] = [(int(f), float(s)) for s, f in zip(scores, ids)]
        out = []
        for found in lists:
            if mode == "hybrid":
                ranked = [(f.id, f.score, f.ranks) for f in fuse(found, k, self.options, self._named)]
            else:
                ranked = [(fid, score, {mode: r}) for r, (fid, score) in enumerate(found[mode], 1)]
            hits = []
            for fid, score, ranks in ranked:
                cid = self._store.chunk_id_for(fid)
                hit = self._hit(cid, score, ranks) if cid is not None else None
                if hit is not None:
                    hits.append(hit)
            out.append(hits)
        return out

    def neighbours(self, texts: Sequence[str], n: int) -> list[tuple[str, ...] | None]:
        """Each text's ``n`` nearest other chunks of the index by embedding similarity, least
        similar first (what `chunk_primer: neighbours` computes a chunk behind); None for a text
        that is not a chunk here. A chunk's neighbours leave out itself and the chunks next to it
        in its document (they overlap it), and depend only on the index's current contents."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidInputError(f"n must be a positive integer, got {n!r}")
        with self._lock:
            self.refresh()
            records = [self._store.chunk(content_hash(t)) for t in texts]
            known = [i for i, rec in enumerate(records) if rec is not None]
            out: list[tuple[str, ...] | None] = [None] * len(texts)
            if not known:
                return out
            vectors = self._stored_vectors([records[i] for i in known])  # type: ignore[misc]
            k = min(n + 3, int(self._index.ntotal))  # room for itself and the two chunks beside it
            _, ids = self._searcher.search(self._index, vectors, k)
            for i, row in zip(known, ids):
                skip = self._beside(content_hash(texts[i]), records[i])  # type: ignore[arg-type]
                found = [cid for cid in (self._store.chunk_id_for(int(f)) for f in row if f >= 0)
                         if cid is not None and cid not in skip]
                hits = [self._store.chunk(cid) for cid in found[:n]]
                out[i] = tuple(rec["text"] for rec in reversed(hits) if rec is not None)
            return out

    def _named(self, faiss_id: int) -> set[int]:
        """Ids of the chunks whose document title the chunk ``faiss_id`` names (the link step)."""
        cid = self._store.chunk_id_for(faiss_id)
        rec = self._store.chunk(cid) if cid is not None else None
        return self._lexical.named_in(rec["text"]) if rec is not None else set()

    def _stored_vectors(self, records: list[dict[str, Any]]) -> np.ndarray:
        """The stored vectors of these chunks (embedded again where the index cannot give them back)."""
        try:
            return np.stack([self._index.reconstruct(int(rec["faiss_id"])) for rec in records]).astype(np.float32)
        except RuntimeError:  # e.g. an IVF index without a direct map
            return self._vectors([_indexed(rec) for rec in records])

    def _beside(self, chunk_id: str, record: dict[str, Any]) -> set[str]:
        """The chunk itself and its neighbours in its document's order."""
        doc = self._store.doc(record["doc_id"]) or {}
        order = list(doc.get("chunk_ids", ()))
        at = order.index(chunk_id) if chunk_id in order else -1
        return {chunk_id, *(order[j] for j in (at - 1, at + 1) if at >= 0 and 0 <= j < len(order))}

    def _hit(self, chunk_id: str, score: float, ranks: dict[str, int] | None = None) -> Hit | None:
        rec = self._store.chunk(chunk_id)
        if rec is None:
            return None
        doc = self._store.doc(rec["doc_id"]) or {}
        meta = {**doc.get("metadata", {}), **rec.get("metadata", {})}
        return Hit(chunk_id, rec["doc_id"], score, rec["text"], meta, dict(ranks or {}))

    def _vectors(self, texts: list[str]) -> np.ndarray:
        vectors = np.asarray(self.embedder.embed(texts))
        if vectors.shape != (len(texts), self.embedder.dim):
            raise InvalidInputError(f"embedder {self.embedder.name!r} returned shape {vectors.shape} for "
                                    f"{len(texts)} texts; expected ({len(texts)}, {self.embedder.dim})")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).copy()
        faiss.normalize_L2(vectors)
        return vectors

    # ---- writing -------------------------------------------------------------------------------
    def add(self, chunks: Iterable[Chunk]) -> int:
        """Add chunks to their documents (new documents are created); returns new vectors."""
        self.refresh()
        plan = Plan(self._store)
        by_doc: dict[str, list[Chunk]] = {}
        for c in chunks:
            by_doc.setdefault(c.doc_id, []).append(c)
        for doc_id, doc_chunks in by_doc.items():
            plan.link(doc_id, doc_chunks, {}, None, None, append=True)
        return self._commit(plan)[0]

    def delete(self, doc_id: str) -> int:
        """Remove a document; returns how many chunk vectors went (shared chunks stay)."""
        self.refresh()
        plan = Plan(self._store)
        if plan.doc(doc_id) is None:
            raise UnknownDocumentError(f"no document {doc_id!r} in {self.directory}; see .documents()")
        plan.unlink(doc_id)
        return self._commit(plan)[1]

    def ingest_documents(self, documents: Iterable[Document], chunker: Chunker,
                         commit_every: int = 5000) -> IngestReport:
        """Chunk and index documents: unchanged ones (same text and chunker) are skipped, changed
        ones replace their chunks. Committed every ``commit_every`` documents."""
        self.refresh()
        report, seen, plan, pending = IngestReport(), set(), Plan(self._store), 0
        for doc in documents:
            if doc.doc_id in seen:
                raise InvalidInputError(f"document id {doc.doc_id!r} appears twice in one ingest")
            seen.add(doc.doc_id)
            old = plan.doc(doc.doc_id)
            if old is not None and old["content_hash"] == doc.content_hash and old["chunker"] == chunker.signature:
                report.unchanged += 1
                continue
            if old is not None:
                plan.unlink(doc.doc_id)
                report.updated += 1
            else:
                report.added += 1
            title = title_of(doc.text, doc.metadata, doc.doc_id)
            chunks = [c if title is None else replace(c, metadata={**c.metadata, "title": title})
                      for c in chunker.chunk(doc)]
            plan.link(doc.doc_id, chunks, doc.metadata, doc.content_hash, chunker.signature, False)
            pending += 1
            if pending >= commit_every:
                report.count(*self._commit(plan))
                plan, pending = Plan(self._store), 0
        if pending:
            report.count(*self._commit(plan))
        return report

    def rebuild_vectors(self) -> None:
        """Re-embed every chunk of the docstore into a fresh faiss index, rebuild the lexical
        index, and save both."""
        with self._lock, writer_lock(self.directory / DOCSTORE_DIR / LOCK_FILE):
            records = [rec for _, rec in self._store.iter_chunks()]
            index = new_index(self.embedder.dim, self._manifest["factory"])
            ids = [int(rec["faiss_id"]) for rec in records]
            if records:
                vectors = self._vectors([_indexed(rec) for rec in records])
                self._train(index, vectors)
                index.add_with_ids(vectors, np.array(ids, dtype=np.int64))
            self._index = index
            self._lexical = LexicalIndex.empty().added(ids, [_indexed(rec) for rec in records],
                                                       [_title(rec) for rec in records])
            self._searcher.invalidate()
            self._save(self._store.generation())

    def _read_lexical(self) -> bool:
        """Take lexical.npz when it belongs to the docstore's generation; False otherwise."""
        lexical = LexicalIndex.load(self.directory / LEXICAL_FILE)
        if lexical is None or lexical.generation != self._store.generation():
            return False
        self._lexical = lexical
        return True

    def _rebuild_lexical(self) -> None:
        """Index the docstore's chunks again in BM25 (after a crash, or for an index older than
        lexical search): no embedding, seconds for a large corpus."""
        log.warning("%s: %s is missing or behind the docstore: rebuilding it", self.directory, LEXICAL_FILE)
        with self._lock, writer_lock(self.directory / DOCSTORE_DIR / LOCK_FILE):
            records = [rec for _, rec in self._store.iter_chunks()]
            generation = self._store.generation()
            lexical = LexicalIndex.empty(generation).added([int(rec["faiss_id"]) for rec in records],
                                                           [_indexed(rec) for rec in records],
                                                           [_title(rec) for rec in records])
            lexical.save(self.directory / LEXICAL_FILE)
            self._lexical = lexical

    def _commit(self, plan: Plan) -> tuple[int, int]:
        if not plan.docs and not plan.chunks:
            return 0, 0
        new, removed = plan.finish()
        with self._lock:
            texts = [indexed_text(c.text, c.metadata.get("title")) for c in new]
            vectors = self._vectors(texts) if new else None
            with writer_lock(self.directory / DOCSTORE_DIR / LOCK_FILE):
                if self._store.generation() != self._manifest["generation"]:
                    raise IndexChangedError(
                        f"{self.directory} was changed by another process while this ingest was planned; "
                        "retry it (it takes in the other commit first)"
                    )
                ids = np.array(plan.assign_ids(new, removed), dtype=np.int64)
                lexical = self._lexical.removed(np.array(list(removed.values()), dtype=np.int64)).added(
                    ids, texts, [str(c.metadata.get("title") or "") for c in new])
                try:
                    if removed:
                        self._remove(np.array(sorted(removed.values()), dtype=np.int64))
                    if vectors is not None:
                        self._train(self._index, vectors)
                        self._index.add_with_ids(vectors, ids)
                    generation = self._store.write(plan.chunks, plan.docs, removed)
                    self._lexical = lexical  # only once the docstore holds the same chunks
                except BaseException:  # the faiss file on disk still matches the docstore
                    self._index = faiss.read_index(str(self.directory / FAISS_FILE))
                    raise
                finally:
                    self._searcher.invalidate()
                self._save(generation)
        return len(new), len(removed)

    def _train(self, index: faiss.Index, vectors: np.ndarray) -> None:
        if index.is_trained:
            return
        try:
            index.train(vectors)
        except RuntimeError as exc:
            raise InvalidInputError(
                f"faiss factory {self._manifest['factory']!r} must be trained, and {len(vectors)} "
                f"chunks are too few ({str(exc).strip().splitlines()[-1]}); add more chunks in the "
                "first call, or use 'Flat' or 'HNSW32,Flat'"
            ) from None

    def _remove(self, ids: np.ndarray) -> None:
        try:
            self._index.remove_ids(ids)
            return
        except RuntimeError:  # e.g. HNSW cannot remove: rebuild from the stored vectors
            pass
        keep_ids = faiss.vector_to_array(self._index.id_map)
        vectors = self._index.index.reconstruct_n(0, self._index.ntotal)
        mask = ~np.isin(keep_ids, ids)
        index = new_index(self.embedder.dim, self._manifest["factory"])
        self._train(index, vectors[mask] if mask.any() else vectors)
        index.add_with_ids(vectors[mask], keep_ids[mask])
        self._index = index

    def _save(self, generation: int) -> None:
        counts = {**self._store.counts(), "vectors": int(self._index.ntotal), "lexical": len(self._lexical)}
        self._manifest = {**self._manifest, "counts": counts, "generation": generation}
        write_atomic(self._index, self.directory / FAISS_FILE)
        self._lexical = self._lexical.at_generation(generation)
        self._lexical.save(self.directory / LEXICAL_FILE)
        write_manifest(self.directory, self._manifest)

    # ---- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._store.close()
            self._searcher.invalidate()

    def __enter__(self) -> ChunkIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ChunkIndex({str(self.directory)!r}, chunks={len(self)}, embedder={self.embedder.name!r})"


def _title(record: dict[str, Any]) -> str:
    return str((record.get("metadata") or {}).get("title") or "")


def _indexed(record: dict[str, Any]) -> str:
    """What both indexes saw of a stored chunk: its title (kept in its metadata), then its text."""
    return indexed_text(record["text"], _title(record))
