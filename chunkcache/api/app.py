"""The FastAPI application: error mapping (every client error is a 4xx with a message, in OpenAI's
error shape), the optional API key, request metrics, /health, /metrics, /v1/models, and the
routers of the OpenAI-compatible and native RAG endpoints."""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from chunkcache.api import schemas as s
from chunkcache.api.guard import Guard
from chunkcache.api.jobs import JobNotFoundError
from chunkcache.api.service import ModelNotFoundError, NoIndexError, RagService, RequestTooLargeError
from chunkcache.errors import ChunkCacheError, ContextTooLongError, InvalidInputError, UnknownStrategyError
from chunkcache.pipeline import EmptyIndexError, NotFoundError
from chunkcache.scheduler import CancelledRequestError, QueueFullError
from chunkcache.store.policy import parse_bytes

log = logging.getLogger(__name__)

_STATUS: list[tuple[type[Exception], int, str]] = [  # most specific first
    (QueueFullError, 429, "rate_limit_error"),
    (RequestTooLargeError, 413, "invalid_request_error"),
    (ContextTooLongError, 413, "invalid_request_error"),
    (NoIndexError, 400, "invalid_request_error"),
    (NotFoundError, 404, "invalid_request_error"),
    (JobNotFoundError, 404, "invalid_request_error"),
    (EmptyIndexError, 409, "invalid_request_error"),
    (ModelNotFoundError, 404, "invalid_request_error"),
    (UnknownStrategyError, 400, "invalid_request_error"),
    (InvalidInputError, 400, "invalid_request_error"),  # 400, as OpenAI and vLLM answer
    (CancelledRequestError, 499, "cancelled"),
]


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = s.ErrorResponse(error=s.ErrorBody(message=message, type=kind, param=param, code=status))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def status_of(exc: Exception) -> tuple[int, str] | None:
    for cls, status, kind in _STATUS:
        if isinstance(exc, cls):
            return status, kind
    return None


def create_app(service: RagService) -> FastAPI:
    from chunkcache.api.openai_routes import router as openai_router
    from chunkcache.api.ops_routes import router as ops_router
    from chunkcache.api.rag_routes import router as rag_router

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    app = FastAPI(
        title="chunkcache", version="0.1.0", lifespan=lifespan,
        description="RAG answers from precomputed chunk KV caches: OpenAI-compatible and native endpoints.",
        responses={k: {"model": s.ErrorResponse} for k in (400, 401, 404, 409, 413, 429, 500)},
    )
    app.state.service = service
    key = os.environ.get(service.settings.api_key_env, "") if service.settings.api_key_env else ""

    def count(scope: dict[str, Any], status: int, seconds: float | None) -> None:
        endpoint = _endpoint(scope, app)
        service.metrics.requests.labels(endpoint, str(status)).inc()
        if seconds is not None:
            service.metrics.request_seconds.labels(endpoint).observe(seconds)

    app.add_middleware(
        Guard, key=key, max_body=parse_bytes(service.settings.max_body) or 2**62, count=count,
        refuse=lambda status, message, kind, headers: error_response(status, message, kind, headers=headers),
    )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                            for e in exc.errors()[:5])
        return error_response(400, message or "invalid request body", param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500
                              else "server_error", headers=getattr(exc, "headers", None))

    @app.exception_handler(ChunkCacheError)
    async def refused(request: Request, exc: ChunkCacheError) -> JSONResponse:
        mapped = status_of(exc)
        if mapped is None:
            return _internal(exc)
        if isinstance(exc, QueueFullError):
            service.metrics.rejected.inc()
        return error_response(mapped[0], str(exc), mapped[1])

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        return _internal(exc)

    app.include_router(ops_router)
    app.include_router(openai_router)
    app.include_router(rag_router)

    def openapi() -> dict[str, Any]:
        """FastAPI's schema without its default 422 responses: invalid bodies get a 400 in
        `ErrorResponse`'s shape here, which every operation lists."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            limits = service.settings
            s.state_limits(schema, limits.max_tokens_limit, limits.max_documents, limits.max_document_chars)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _internal(exc: BaseException) -> JSONResponse:
    """A 500 whose body names only an id to find the logged error by: what failed inside stays in
    the server's log (exception text can carry paths, keys or other users' data)."""
    ref = secrets.token_hex(4)
    log.error("request failed (error id %s)", ref, exc_info=exc)
    return error_response(500, f"internal error (id {ref}, in the server's log)", "server_error")


def _endpoint(scope: dict[str, Any], app: FastAPI) -> str:
    """The route's path template (bounded label values); refused before routing: the template
    the path fits (from the OpenAPI paths: routers are included lazily, so `app.routes` does not
    list their routes), else 'unmatched'."""
    route = scope.get("route")
    if route is not None:
        return str(getattr(route, "path", "unmatched"))
    path = scope.get("path", "")
    templates = getattr(app.state, "path_templates", None)
    if templates is None:
        paths = [str(r.path) for r in app.routes if getattr(r, "path", None)] + list(app.openapi().get("paths", {}))
        templates = app.state.path_templates = [
            (re.compile(re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(p))), p) for p in dict.fromkeys(paths)]
    return next((template for pattern, template in templates if pattern.fullmatch(path)), "unmatched")
