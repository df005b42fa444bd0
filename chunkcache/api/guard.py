"""The door of the service, as plain ASGI (not Starlette's ``BaseHTTPMiddleware``, whose wrapped
``receive`` hid a client's disconnect from the handlers, so a non-streaming answer kept
generating for nobody): the API key, the body-size limit checked before a body is read, and the
request count and latency of every answer, 500s included."""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Refusal = Callable[[int, str, str, dict[str, str] | None], JSONResponse]
Count = Callable[[Scope, int, float | None], None]


def key_matches(authorization: str, key: str) -> bool:
    """``Bearer <key>`` with the scheme in any case (RFC 9110: schemes are case-insensitive),
    compared in constant time."""
    scheme, _, token = authorization.strip().partition(" ")
    return hmac.compare_digest(scheme.lower().encode(), b"bearer") & hmac.compare_digest(
        token.strip().encode(), key.encode()
    )


class Guard:
    """Wraps the application: ``refuse(status, message, kind, headers)`` builds the error answers,
    ``count(scope, status, seconds)`` records each request (seconds None: refused at the door)."""

    def __init__(self, app: ASGIApp, key: str, max_body: int, refuse: Refusal, count: Count) -> None:
        self.app, self.key, self.max_body = app, key, max_body
        self.refuse, self.count = refuse, count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self.key and scope["path"] != "/health" and not key_matches(headers.get("authorization", ""), self.key):
            await self._refuse(scope, receive, send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               "authentication_error", {"WWW-Authenticate": "Bearer"})
            return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await self._too_large(scope, receive, send)
            return
        if length is None and headers.get("transfer-encoding", "").lower() == "chunked":
            receive = await self._buffered(receive)  # no length given: read it here, up to the limit
            if receive is None:
                await self._too_large(scope, receive_nothing, send)
                return
        await self._answer(scope, receive, send)

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        start, status = time.perf_counter(), 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:  # a 500 answered by the error handler outside the routes is counted here too
            self.count(scope, status, time.perf_counter() - start)

    async def _buffered(self, receive: Receive) -> Receive | None:
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                messages.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.max_body:
                return None
            messages.append(message)
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        return replay

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._refuse(scope, receive, send, 413,
                           f"request body larger than the server's limit of {self.max_body:,} bytes "
                           "(the max_body setting): send fewer or shorter documents", "invalid_request_error",
                           {"Connection": "close"})  # the unread rest of the body is not waited for

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, message: str, kind: str,
                      headers: dict[str, str] | None) -> None:
        self.count(scope, status, None)
        await self.refuse(status, message, kind, headers)(scope, receive, send)


async def receive_nothing() -> Message:
    return {"type": "http.disconnect"}
