"""Request body limits, enforced before the body is read (ASGI middleware).

`BodyLimit` refuses a request whose `Content-Length` exceeds the limit with 413 before reading
a byte of it, and counts the bytes of bodies sent without a length (chunked) as they stream in:
at the limit, reading raises `BodyTooLarge` (an `ApiError`, answered 413) inside whatever reads
the body (JSON parsing, the multipart parser), so nothing beyond the limit is ever held or
spooled to disk. A multipart body may be given a smaller limit (`max_multipart_bytes`: the
ingress allows the largest upload plus `MULTIPART_OVERHEAD`), so an oversized upload is stopped
while it streams, not after it was spooled; the exact per-file limit is checked after parsing.
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable

from serving.api import ApiError

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyTooLarge(ApiError):
    def __init__(self, limit: int, seen: int | None = None) -> None:
        size = f" ({seen} bytes)" if seen is not None else ""
        super().__init__(413, f"request body too large{size}: at most {limit} bytes are accepted")


MULTIPART_OVERHEAD = 1024 * 1024
"""What a multipart body may hold beyond its file: boundaries, headers, the text fields."""


class BodyLimit:
    """ASGI middleware: at most `max_body_bytes` of request body, `max_multipart_bytes` (when
    given and smaller) for multipart bodies (see the module docstring)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_multipart_bytes: int | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_multipart_bytes = max_multipart_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        if self.max_multipart_bytes is not None and _header(scope, b"content-type").startswith(b"multipart/"):
            limit = min(limit, self.max_multipart_bytes)
        length = _content_length(scope)
        if length == -1:
            await _answer(scope, receive, send, ApiError(400, "Content-Length must be a non-negative integer"))
            return
        if length is not None and length > limit:
            await _answer(scope, receive, send, BodyTooLarge(limit, length))  # the body is never read
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.lower()
    return b""


def _content_length(scope: Scope) -> int | None:
    """The declared length; None when absent, -1 when malformed."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                n = int(value)
            except ValueError:
                return -1
            return n if n >= 0 else -1
    return None


async def _answer(scope: Scope, receive: Receive, send: Send, error: ApiError) -> None:
    response = error.response()
    response.headers["connection"] = "close"  # the unread body must not be taken for a request
    await response(scope, receive, send)
