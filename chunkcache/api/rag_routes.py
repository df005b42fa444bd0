"""Native RAG endpoints: `POST /v1/rag/answer` (answer, references, cache report, timings),
`POST /v1/retrieve`, `POST /v1/documents` (ingest + precompute as a background job) and
`GET /v1/jobs/{id}` and `POST /v1/jobs/{id}/cancel`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from chunkcache.api import schemas as s
from chunkcache.api.run import answer_once, answer_stream, sse, stream_error
from chunkcache.api.service import AnswerRequest, AnswerResult, RagService

router = APIRouter(tags=["rag"])


def _service(request: Request) -> RagService:
    return request.app.state.service  # type: ignore[no-any-return]


@router.post("/v1/rag/answer", response_model=s.RagAnswer, responses={
    200: {"content": {"text/event-stream": {}},
          "description": "with stream: true, server-sent events: {\"text\": ...} pieces, then the full answer object"}})
async def rag_answer(body: s.RagAnswerRequest, request: Request) -> Any:
    service = _service(request)
    service.check_documents(body.documents)
    params = {} if body.recompute_ratio is None else {"recompute_ratio": body.recompute_ratio}
    req = AnswerRequest(question=body.query, documents=tuple(body.documents or ()), top_k=body.top_k,
                        retrieval=body.retrieval, strategy=body.strategy, params=params, max_tokens=service.max_tokens(body.max_tokens))
    if body.stream:
        return StreamingResponse(_events(await answer_stream(request, service, req)), media_type="text/event-stream")
    return _rag_answer(await answer_once(request, service, req))


def _rag_answer(result: AnswerResult) -> s.RagAnswer:
    info = result.info()
    return s.RagAnswer(answer=result.text, references=info.references, usage=result.usage(), cache=info.cache,
                       timings=info.timings, strategy=info.strategy,
                       finish_reason=result.finish_reason)  # type: ignore[arg-type]


async def _events(items: AsyncIterator[str | AnswerResult]) -> AsyncIterator[str]:
    try:
        async for item in items:
            yield sse({"text": item} if isinstance(item, str) else _rag_answer(item).model_dump())
    except Exception as exc:  # noqa: BLE001 - the status is sent: report it in the stream
        yield stream_error(exc)
    yield sse("[DONE]")


@router.post("/v1/retrieve", response_model=s.RetrieveResponse)
async def retrieve(body: s.RetrieveRequest, request: Request) -> s.RetrieveResponse:
    service = _service(request)
    refs = await asyncio.wrap_future(service.run(lambda: service.retrieve(body.query, body.top_k, body.retrieval)))
    return s.RetrieveResponse(results=refs)


@router.post("/v1/documents", response_model=s.Job, status_code=202)
async def add_documents(body: s.DocumentsRequest, request: Request) -> s.Job:
    service = _service(request)
    service.check_documents(body.documents)
    service.check_tokens("", [d.text for d in body.documents], "this documents request")
    service.require_index("add documents to")
    return service.jobs.submit(body.documents, body.precompute)


@router.get("/v1/jobs/{job_id}", response_model=s.Job)
async def get_job(job_id: str, request: Request) -> s.Job:
    return _service(request).jobs.get(job_id)


@router.post("/v1/jobs/{job_id}/cancel", response_model=s.Job)
async def cancel_job(job_id: str, request: Request) -> s.Job:
    """Cancel a document job (as OpenAI's batches are cancelled): it stops before its next piece
    and what it committed stays; its record is kept. A finished job is returned as it is."""
    return _service(request).jobs.cancel(job_id)
