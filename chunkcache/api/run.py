"""Running an answer on the engine's scheduler from a request handler: all at once (generation is
cancelled if the client disconnects) or as a stream of text pieces ending with the result.
Errors that come before the first piece (bad chunks, no index, a full queue) are raised before
any response starts, so a streaming request still gets its 4xx."""

from __future__ import annotations

import asyncio
import logging
import json
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from chunkcache.api.service import AnswerRequest, AnswerResult, RagService
from chunkcache.errors import ChunkCacheError

log = logging.getLogger(__name__)

_POLL_S = 0.25


async def answer_once(request: Request, service: RagService, req: AnswerRequest) -> AnswerResult:
    cancelled = threading.Event()
    future = asyncio.wrap_future(service.answer(req, cancelled=cancelled))
    watcher = asyncio.create_task(_watch(request, cancelled))
    try:
        return await future
    except BaseException:
        cancelled.set()  # the handler was cancelled (or the answer failed): nothing more is wanted
        raise
    finally:
        watcher.cancel()


async def _watch(request: Request, cancelled: threading.Event) -> None:
    while not cancelled.is_set():
        if await request.is_disconnected():
            cancelled.set()
            return
        await asyncio.sleep(_POLL_S)


@dataclass(frozen=True)
class _End:
    result: AnswerResult | None
    error: BaseException | None


async def answer_stream(request: Request, service: RagService, req: AnswerRequest) -> AsyncIterator[str | AnswerResult]:
    """Text pieces, then the `AnswerResult`. The first item is awaited (watching for a
    disconnect meanwhile) before this returns; a later error is raised by the iterator."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[str | _End] = asyncio.Queue()
    cancelled = threading.Event()

    def on_text(piece: str) -> bool:
        loop.call_soon_threadsafe(items.put_nowait, piece)
        return cancelled.is_set()

    def ended(done: Future[AnswerResult]) -> None:  # after every piece (same thread): nothing overtakes
        error = done.exception()
        end = _End(None if error is not None else done.result(), error)
        try:
            loop.call_soon_threadsafe(items.put_nowait, end)
        except RuntimeError:  # the event loop is gone (server shutting down)
            log.debug("dropped a result: the event loop is closed")

    service.answer(req, on_text, cancelled).add_done_callback(ended)
    watcher = asyncio.create_task(_watch(request, cancelled))
    try:
        first = await items.get()
    except BaseException:
        cancelled.set()
        raise
    finally:
        watcher.cancel()
    if isinstance(first, _End) and first.error is not None:
        raise first.error
    return _stream(first, items, cancelled)


async def _stream(first: str | _End, items: asyncio.Queue[str | _End],
                  cancelled: threading.Event) -> AsyncIterator[str | AnswerResult]:
    item = first
    try:
        while True:
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                yield item.result  # type: ignore[misc]
                return
            yield item
            item = await items.get()
    finally:
        cancelled.set()  # done, or the client went away: either way nothing more is wanted


def stream_error(exc: BaseException) -> str:
    """The SSE event for an error after the stream started (vLLM's convention), logged here."""
    log.error("a streamed answer failed", exc_info=exc)
    status = 500 if not isinstance(exc, ChunkCacheError) else 400
    return sse({"error": {"message": f"{type(exc).__name__}: {exc}", "type": "server_error" if status == 500
                          else "invalid_request_error", "param": None, "code": status}})


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"
