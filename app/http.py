"""Reading request bodies with a size limit, before anything is held in memory or on disk."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.types import Message, Receive

from app.errors import LambentError


async def read_limited(request: Request, max_bytes: int, too_large: LambentError) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def stream_limited(
    request: Request, max_bytes: int, too_large: LambentError
) -> AsyncIterator[bytes]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        yield chunk


def limited_request(request: Request, max_bytes: int, too_large: LambentError) -> Request:
    """The same request, whose body raises ``too_large`` once it passes ``max_bytes``.

    Multipart parsing spools the whole body before a route sees it; this keeps an oversized
    upload from filling the disk first.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    received = 0
    receive: Receive = request.receive

    async def limited_receive() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise too_large
        return message

    return Request(request.scope, limited_receive)
