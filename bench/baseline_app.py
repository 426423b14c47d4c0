"""The baseline: the benchmark handlers behind a bare Starlette app, served by uvicorn.

It has the same route shape as Lambent's invoke API, so the load generator sends byte-for-byte
the same requests to both, and it does only what any web app hosting the handler must: read the
body, decode the JSON, call the handler, encode its result.

Run it with ``python -m uvicorn bench.baseline_app:app`` from the repository root.
"""

from __future__ import annotations

import json

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench.handlers import noop, sleepy

HANDLERS = {"noop": noop.handler, "sleepy": sleepy.handler}


async def invoke(request: Request) -> Response:
    handler = HANDLERS.get(request.path_params["name"])
    if handler is None:
        return Response(status_code=404)
    body = await request.body()
    event = json.loads(body) if body.strip() else {}
    # Handlers are blocking code (sleepy sleeps); the thread pool is how Starlette runs a
    # synchronous endpoint, and it lets concurrent requests overlap as they would in production.
    result = await run_in_threadpool(handler, event, None)
    return Response(json.dumps(result), media_type="application/json")


app = Starlette(routes=[Route("/v1/functions/{name}/invocations", invoke, methods=["POST"])])
