"""`RagService`: what every endpoint does once its body is validated, independent of HTTP: pick
the chunks (sent documents, named index documents, or retrieval), answer through the engine,
ingest documents as background jobs (api/jobs.py). All engine and index work runs on the engine's `Scheduler`
thread: answers are batched there, other work runs between decode steps."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chunkcache.api import schemas as s
from chunkcache.api.jobs import JOBS_DIR, DocumentJobs, JobWork
from chunkcache.api.metrics import ServiceMetrics
from chunkcache.config import Settings
from chunkcache.engine import Answer, ChunkCacheEngine, Sampling, StopText
from chunkcache.errors import ChunkCacheError, InvalidInputError
from chunkcache.pipeline import RAGPipeline
from chunkcache.scheduler import Scheduler, admitters_for
from chunkcache.store.policy import parse_bytes

log = logging.getLogger(__name__)


class RequestTooLargeError(ChunkCacheError):
    """More documents, or longer ones, than the server accepts (HTTP 413)."""


class ModelNotFoundError(InvalidInputError):
    """The request names a model this server does not serve (HTTP 404)."""


class NoIndexError(InvalidInputError):
    """Retrieval was asked of a server started without an index."""


@dataclass(frozen=True)
class AnswerRequest:
    question: str
    search: str | None = None  # what retrieval searches with (the last user message); default: question
    documents: tuple[s.DocumentIn, ...] = ()
    doc_ids: tuple[str, ...] = ()
    top_k: int | None = None
    retrieval: str | None = None  # dense | lexical | hybrid; default: settings.retrieval
    strategy: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    max_tokens: int | None = None
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()


@dataclass
class AnswerResult:
    answer: Answer
    text: str  # the answer cut at the first stop sequence
    finish_reason: str
    references: list[s.Reference]
    retrieve_s: float
    tier_hits: dict[str, int]

    def usage(self) -> s.Usage:
        a = self.answer
        return s.Usage(
            prompt_tokens=a.prompt_tokens, completion_tokens=len(a.token_ids),
            total_tokens=a.prompt_tokens + len(a.token_ids),
            prompt_tokens_details=s.PromptTokensDetails(cached_tokens=a.reused_tokens),
        )

    def info(self) -> s.RagInfo:
        a = self.answer
        return s.RagInfo(
            references=self.references,
            cache=s.CacheReport(hit_chunks=a.cache_hits, miss_chunks=a.cache_misses, reused_tokens=a.reused_tokens,
                                recomputed_tokens=a.recomputed_tokens, tier_hits=self.tier_hits),
            timings=s.Timings(retrieve_s=self.retrieve_s, load_s=a.timings.get("load_s", 0.0),
                              blend_s=a.timings.get("blend_s", 0.0), ttft_s=self.retrieve_s + a.ttft_s,
                              total_s=self.retrieve_s + a.timings.get("total_s", 0.0)),
            strategy=a.strategy,
        )


class RagService:
    """One engine (and optionally one index) behind a scheduler thread."""

    def __init__(self, settings: Settings, engine: ChunkCacheEngine | None = None, index: Any = None) -> None:
        self.settings = settings
        self.engine = engine or ChunkCacheEngine(settings)
        self.index = index if index is not None else _open_index(settings)
        self.engine.use_index(self.index)
        self.pipeline = None if self.index is None else RAGPipeline(self.index, self.engine)
        pool = self.engine.kv_pool(parse_bytes(settings.kv_budget) or 2**62)
        device = self.engine.model.executor.device
        admitters = admitters_for(settings.fusion_workers, device, settings.max_batch)
        self._threads = torch.get_num_threads()
        if admitters and device.type == "cpu" and settings.threads <= 0:
            # the fusing threads and the decoding one each get a share of the cores: teams of
            # fewer threads side by side beat one full team taking turns (the small matrices of
            # a fusion or a step scale poorly over threads; docs/results.md)
            torch.set_num_threads(max(1, self._threads // (admitters + 1)))
        self.scheduler = Scheduler(self.engine, pool, settings.max_batch, settings.max_queue, admitters=admitters)
        self.metrics = ServiceMetrics(self)
        work = JobWork(self._index_document, self._unstored_chunks, self._precompute, settings.precompute_batch)
        folder = None if self.index is None else Path(self.index.directory) / JOBS_DIR
        self.jobs = DocumentJobs(self.scheduler, work, folder, settings.max_queue)
        self.started = int(time.time())
        self._closed = False

    @property
    def model_id(self) -> str:
        return self.settings.model

    def close(self) -> None:
        """Cancel what waits, stop what runs at its next token, then close store and index
        (only once the engine thread has stopped: it may still be writing to them). Once."""
        if self._closed:
            return
        self._closed = True
        self.jobs.close()
        if not self.scheduler.close():
            log.error("the engine thread did not stop; store and index are left open")
            return
        self.engine.close()
        if self.index is not None:
            self.index.close()
        torch.set_num_threads(self._threads)

    # --- limits --------------------------------------------------------------------------
    def check_documents(self, documents: list[s.DocumentIn] | None) -> None:
        docs = documents or []
        if len(docs) > self.settings.max_documents:
            raise RequestTooLargeError(
                f"{len(docs)} documents sent; this server takes at most {self.settings.max_documents} per request"
            )
        for i, doc in enumerate(docs):
            if len(doc.text) > self.settings.max_document_chars:
                raise RequestTooLargeError(
                    f"document {doc.id or i} has {len(doc.text)} characters; the limit is "
                    f"{self.settings.max_document_chars}: split it into chunks"
                )

    def check_tokens(self, question: str, texts: list[str], what: str = "this request") -> None:
        """Refuse (413) a question and chunks or documents above ``max_request_tokens`` together:
        one request's work stays bounded, whatever the strategy."""
        limit = self.settings.max_request_tokens
        if limit <= 0:
            return
        template = self.engine.model.template
        total = len(template.question_ids(question)) if question else 0
        for text in texts:
            total += len(template.encode(text))
            if total > limit:
                break
        if total > limit:
            raise RequestTooLargeError(
                f"{what} holds more than {limit} tokens (the max_request_tokens setting): send a shorter "
                "question, fewer or shorter documents, or a smaller top_k"
            )

    def max_tokens(self, asked: int | None) -> int | None:
        if asked is not None and asked > self.settings.max_tokens_limit:
            raise InvalidInputError(
                f"max_tokens {asked} is above this server's limit of {self.settings.max_tokens_limit}"
            )
        return asked

    # --- answering ----------------------------------------------------------------------
    def answer(self, req: AnswerRequest, on_text: Callable[[str], bool | None] | None = None,
               cancelled: threading.Event | None = None) -> Future[AnswerResult]:
        """Queue ``req`` on the scheduler; its chunks are picked on the engine thread (retrieval
        uses the index there). ``on_text`` gets the text as it is generated (on that thread)."""
        cut = StopText(req.stop, on_text, cancelled)
        picked: dict[str, Any] = {}

        def plan() -> Any:
            start = time.perf_counter()
            chunks, picked["refs"] = self._chunks(req)
            picked["retrieve_s"] = time.perf_counter() - start
            self.check_tokens(req.question, chunks)
            return self.engine.plan(req.question, chunks, strategy=req.strategy, max_new_tokens=req.max_tokens,
                                    sampling=req.sampling, on_text=cut, **req.params)

        done: Future[AnswerResult] = Future()

        def finished(generated: Future[Answer]) -> None:
            try:
                answer = generated.result()
                if on_text is not None and not cut.stopped:
                    rest = cut.flush()
                    if rest:
                        on_text(rest)
                text = cut.text if req.stop else answer.text
                finish = "stop" if cut.stopped else answer.finish_reason
                result = AnswerResult(answer, text, finish, picked["refs"], picked["retrieve_s"], answer.tier_hits)
                self.metrics.observe(result)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
                result, error = None, exc
            else:
                error = None
            if not done.set_running_or_notify_cancel():  # the caller stopped waiting
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)

        self.scheduler.generate(plan, cancelled).add_done_callback(finished)
        return done

    def run(self, fn: Callable[[], Any], cancelled: threading.Event | None = None) -> Future[Any]:
        """Run other engine or index work on the engine thread, between decode steps."""
        return self.scheduler.call(fn, cancelled)

    def _chunks(self, req: AnswerRequest) -> tuple[list[str], list[s.Reference]]:
        if req.documents:
            refs = [s.Reference(doc_id=d.id or f"doc-{i}", chunk_id=_chunk_id(d.text), text=d.text)
                    for i, d in enumerate(req.documents)]
            return [d.text for d in req.documents], refs
        pipeline = self.require_pipeline("answer from doc_ids or retrieval")
        if req.doc_ids:
            hits = pipeline.documents(req.doc_ids)
        else:
            hits = pipeline.retrieve(req.search or req.question, req.top_k or self.settings.default_top_k,
                                     req.retrieval or self.settings.retrieval)
        refs = [_reference(h, None if req.doc_ids else h.score) for h in hits]
        return [h.text for h in hits], refs

    def retrieve(self, query: str, top_k: int, retrieval: str | None = None) -> list[s.Reference]:
        hits = self.require_pipeline("retrieve").search(query, top_k, retrieval or self.settings.retrieval)
        return [_reference(h, h.score) for h in hits]

    def require_pipeline(self, what: str) -> RAGPipeline:
        if self.pipeline is None:
            raise NoIndexError(
                f"this server has no index to {what}: send documents in the request, or start it "
                "with --index DIR (chunkcache serve --index DIR)"
            )
        return self.pipeline

    def require_index(self, what: str) -> Any:
        return self.require_pipeline(what).index

    # --- documents jobs (pieces run on the engine thread, see api/jobs.py) -----------------
    def _index_document(self, doc: s.DocumentIn) -> dict[str, int]:
        from chunkcache.jobs.ingest import add_documents
        from chunkcache.retriever import Document

        index = self.require_index("add documents to")
        template = self.engine.model.template
        # the model's token ids, through the template's lock: HTTP threads tokenize meanwhile
        report = add_documents(index, [Document(_doc_id(doc), doc.text)],
                               lambda text: template.encode(text, inert=False), self.settings.model)
        return {"added": report.added, "updated": report.updated, "unchanged": report.unchanged,
                "chunks_added": report.chunks_added, "chunks_removed": report.chunks_removed}

    def _unstored_chunks(self, documents: list[s.DocumentIn]) -> list[str]:
        index = self.require_index("add documents to")
        texts = [h.text for d in documents for h in (index.get(c) for c in index.doc_chunks(_doc_id(d))) if h]
        return [t for t in dict.fromkeys(texts) if not self.engine.stored(t)]

    def _precompute(self, texts: list[str]) -> None:
        self.engine.precompute(texts)
        self.metrics.precomputed(len(texts), sum(len(self.engine.model.template.chunk_ids(t)) for t in texts))


def _doc_id(doc: s.DocumentIn) -> str:
    return doc.id or f"doc-{_chunk_id(doc.text)[:16]}"


def _chunk_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _open_index(settings: Settings) -> Any:
    if not settings.index_path:
        return None
    from chunkcache.jobs.ingest import open_or_build
    from chunkcache.retriever import SearchOptions

    index = open_or_build(Path(settings.index_path).expanduser(), "Flat")
    index.options = SearchOptions.from_settings(settings)  # fusion knobs; the mode is passed per search
    return index


def _reference(hit: Any, score: float | None) -> s.Reference:
    return s.Reference(doc_id=hit.doc_id, chunk_id=hit.chunk_id, score=score, text=hit.text,
                       retrievers=dict(hit.ranks) or None)
