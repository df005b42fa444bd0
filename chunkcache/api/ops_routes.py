"""Operations endpoints: `GET /health` (up, model, queue, index) and `GET /metrics` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from chunkcache.api import schemas as s
from chunkcache.api.service import RagService

router = APIRouter(tags=["service"])


def _service(request: Request) -> RagService:
    return request.app.state.service  # type: ignore[no-any-return]


@router.get("/health", response_model=s.Health)
async def health(request: Request) -> s.Health:
    service = _service(request)
    return s.Health(status="ok", model=service.model_id, queued=service.scheduler.waiting,
                    index=service.index is not None)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus exposition"}})
def metrics(request: Request) -> Response:  # sync: reading store sizes may touch disk or redis, off the event loop
    return Response(_service(request).metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")
