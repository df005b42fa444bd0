"""Running an answer on the engine worker from a request handler: all at once (generation is
cancelled if the client disconnects) or as a stream of text pieces ending with the result.
Errors that come before the first piece (bad chunks, no index, a full queue) are raised before
any response starts, so a streaming request still gets its 4xx."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from chunkcache.api.service import AnswerRequest, AnswerResult, RagService

_POLL_S = 0.25


async def answer_once(request: Request, service: RagService, req: AnswerRequest) -> AnswerResult:
    cancelled = threading.Event()
    future = service.worker.submit(lambda: service.answer(req, cancelled=cancelled), cancelled)
    watcher = asyncio.create_task(_watch(request, cancelled))
    try:
        return await future
    finally:
        watcher.cancel()


async def _watch(request: Request, cancelled: threading.Event) -> None:
    while not cancelled.is_set():
        if await request.is_disconnected():
            cancelled.set()
            return
        await asyncio.sleep(_POLL_S)


async def answer_stream(service: RagService, req: AnswerRequest) -> AsyncIterator[str | AnswerResult]:
    """Text pieces, then the `AnswerResult`. The first item is awaited before this returns."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str] = asyncio.Queue()
    cancelled = threading.Event()

    def on_text(piece: str) -> bool:
        loop.call_soon_threadsafe(pieces.put_nowait, piece)
        return cancelled.is_set()

    future = service.worker.submit(lambda: service.answer(req, on_text, cancelled), cancelled)
    events = _events(pieces, future, cancelled)
    try:
        first = await events.__anext__()
    except BaseException:
        cancelled.set()
        raise
    return _prepend(first, events)


async def _events(pieces: asyncio.Queue[str], future: asyncio.Future[AnswerResult],
                  cancelled: threading.Event) -> AsyncIterator[str | AnswerResult]:
    try:
        while True:
            getter = asyncio.ensure_future(pieces.get())
            done, _ = await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield getter.result()
                continue
            getter.cancel()
            while not pieces.empty():  # pieces are queued before the result: none is lost
                yield pieces.get_nowait()
            yield future.result()
            return
    finally:
        if not future.done():
            cancelled.set()  # the client went away: stop generating


async def _prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"
