"""The synchronous invoke route, served ahead of FastAPI's router.

Invoking is the one route whose every microsecond is the product's. Through FastAPI it pays for
matching the path against every route of the API, resolving its dependencies (each a coroutine
with its own signature inspection), building a Request and a Response object, and FastAPI's and
Starlette's middleware (error handling, telemetry, body limits), each wrapping the next one's
``send``; measured, that was about as much as the rest of the warm path together.

This ASGI layer, the application's outermost (app.main.LambentApp), recognises
``POST /v1/functions/{name}/invocations`` and answers it itself, through the same key
resolution, body limit and ``invoke_reply`` as the FastAPI route. It steps aside for anything it
does not handle identically (a name the route would refuse as invalid, a request that is not
plain HTTP), so FastAPI's route stays the reference: the OpenAPI document describes it, and
every answer the two give is the same. Unexpected errors are answered as the application's own
handler answers them.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth import resolve_key, tenant_of
from app.errors import LambentError
from app.invocations.routes import JSON, event_too_large, invoke_reply
from app.logging import get_logger
from app.platform import Platform

log = get_logger(__name__)

# The same names as app.tenants.schemas.ResourceName; anything else goes to FastAPI, which
# answers it with its validation error.
INVOKE_PATH = re.compile(r"/v1/functions/([A-Za-z0-9_-]{1,64})/invocations")


class InvokeFastPath:
    """Answers invocations itself and passes everything else to ``app``.

    ``state`` is where the platform is found (``state.platform``): the FastAPI application's
    state, set up by its lifespan.
    """

    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = INVOKE_PATH.fullmatch(scope["path"])
            if match is not None:
                await self._invoke(scope, receive, send, match.group(1))
                return
        await self.app(scope, receive, send)

    async def _invoke(self, scope: Scope, receive: Receive, send: Send, name: str) -> None:
        platform: Platform = self.state.platform
        authorization, declared_length = _headers(scope)
        try:
            tenant_id = tenant_of(await resolve_key(platform, _bearer(authorization)))
            limit = platform.settings.max_payload_bytes
            if declared_length is not None and declared_length > limit:
                raise event_too_large(limit)
            payload = await _read_body(receive, limit)
            status, headers, body = await invoke_reply(platform, tenant_id, name, payload)
        except LambentError as error:
            status, headers = error.status_code, error.headers() or {}
            # As Starlette's JSONResponse renders it, so that both paths answer the same bytes.
            body = json.dumps(error.body(), ensure_ascii=False, separators=(",", ":")).encode()
        except _Disconnected:
            return  # before the whole event arrived: nothing was invoked, and nobody to answer
        except Exception:
            # What the application's handler of unexpected errors answers, as FastAPI's
            # middleware is not around this path.
            log.exception("unhandled error", path=scope["path"])
            status, headers = 500, {}
            body = json.dumps(
                {"type": "ServiceException", "message": "an internal error occurred"},
                separators=(",", ":"),
            ).encode()
        await _answer(send, status, headers, body)


class _Disconnected(Exception):
    pass


def _headers(scope: Scope) -> tuple[str | None, int | None]:
    authorization: str | None = None
    length: int | None = None
    for key, value in scope["headers"]:
        if key == b"authorization":
            authorization = value.decode("latin-1")
        elif key == b"content-length" and value.isdigit():
            length = int(value)
    return authorization, length


def _bearer(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header, read as FastAPI's HTTPBearer does."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials or None


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise event_too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _answer(send: Send, status: int, headers: dict[str, str], body: bytes) -> None:
    raw: list[tuple[bytes, bytes]] = [
        (b"content-type", JSON.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    raw += [
        (key.lower().encode("latin-1"), value.encode("latin-1")) for key, value in headers.items()
    ]
    start: dict[str, Any] = {"type": "http.response.start", "status": status, "headers": raw}
    await send(start)
    await send({"type": "http.response.body", "body": body})
