"""ASGI middleware around the API: request bodies are bounded in bytes and in time."""

from __future__ import annotations

import asyncio
import time

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` while FastAPI parses the form: FastAPI re-raises HTTPExceptions as they are."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds {limit:,} bytes (upload limit plus form overhead)")


class BodyTimeout(StarletteHTTPException):
    """The request body did not arrive in time (408); the connection is closed after the answer."""

    def __init__(self, timeout: float) -> None:
        super().__init__(
            408,
            f"the request body did not arrive within {timeout:g} s (--body-timeout); send it faster or in one go",
            headers={"Connection": "close"},
        )


class RequestBodyGuard:
    """Refuse request bodies over `max_body` bytes while they stream in, and bodies slower than `timeout`.

    The declared Content-Length is checked before any byte is read, and chunked
    bodies are counted, so an oversized upload never reaches memory or disk. The
    whole body must arrive within `timeout` seconds of the request's headers: a
    client trickling a byte now and then holds its connection (which is not idle,
    so never closed to make room) for no longer than that.
    """

    def __init__(self, app: ASGIApp, max_body: int, timeout: float) -> None:
        """Args: app: the wrapped app; max_body: bytes; timeout: seconds for the whole body."""
        self.app = app
        self.max_body = max_body
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        too_long = declared.isdigit() and int(declared) > self.max_body
        deadline = time.monotonic() + self.timeout
        received = 0
        complete = False

        async def guarded() -> Message:
            nonlocal received, complete
            if too_long:
                raise BodyTooLarge(self.max_body)
            if complete:  # after the body only a disconnect can come: no deadline for that wait
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise BodyTimeout(self.timeout) from None
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise BodyTooLarge(self.max_body)
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, guarded, send)
