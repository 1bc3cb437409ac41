"""The gateway's HTTP edges: what every request passes through before and after an endpoint.

The ``Edge`` middleware gives each request its id (the client's ``x-request-id`` when it
is sane), refuses an oversized body from its Content-Length before reading it, and counts
requests by route. Errors leave in OpenAI's envelope; streams are server-sent events that
end the generation as soon as the client goes away.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable

import anyio
import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from kiln.gateway.metrics import Metrics
from kiln.gateway.protocol import APIError

log = logging.getLogger("kiln.gateway")

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/ready", "/metrics")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class Edge:
    """Pure ASGI middleware: request id, early 413 on Content-Length, metrics by route."""

    def __init__(self, app, metrics: Metrics, max_body: int):
        self.app, self.metrics, self.max_body = app, metrics, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = None
        length = None
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                got = v.decode("latin-1")
                rid = got if _REQUEST_ID.match(got) else None
            elif k == b"content-length":
                length = v
        rid = rid or f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = rid
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = [500]
        rid_header = (b"x-request-id", rid.encode())

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), rid_header]
            await send(message)

        metrics = self.metrics
        start = time.perf_counter()
        metrics.in_flight.inc()
        try:
            if length is not None and length.isdigit() and int(length) > self.max_body:
                err = APIError(413, f"Request body is {int(length)} bytes; this server accepts at most "
                                    f"{self.max_body} bytes. Send fewer or shorter inputs.", None, "request_too_large")
                await error_response(err).__call__(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            metrics.in_flight.dec()
            metrics.requests.labels(route, str(status[0])).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - start)


def retry_after_header(seconds: float) -> str:
    """Whole seconds, at least 1: what clients and proxies parse."""
    return str(max(1, math.ceil(seconds)))


def error_response(err: APIError) -> JSONResponse:
    headers = dict(err.headers)
    if err.retry_after is not None and err.status in (429, 503):
        headers["retry-after"] = retry_after_header(err.retry_after)
    return FastJSON(err.body(), status_code=err.status, headers=headers)


async def http_exception_response(request: Request, exc: HTTPException) -> Response:
    """Starlette's own 404 / 405 (and the like) in OpenAI's envelope, saying what to do instead."""
    code = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
    msg = (f"Unknown path {request.url.path}; see GET /v1/models and the OpenAI API." if exc.status_code == 404
           else f"{request.method} is not allowed on {request.url.path}." if exc.status_code == 405 else str(exc.detail))
    return error_response(APIError(exc.status_code, msg, None, code))


class FastJSON(JSONResponse):
    """orjson: numpy arrays written directly (an embedding is never turned into Python floats)."""

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class SSEResponse(StreamingResponse):
    """Server-sent events that stop the generation the moment the client goes away:
    the stream runs beside a listener for ``http.disconnect``; whichever ends first ends
    both, and the body iterator is always closed (which cancels the Triton request)."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send):
        try:
            async with anyio.create_task_group() as tg:
                async def stream():
                    try:
                        await self.stream_response(send)
                    except OSError:  # the socket went away while writing
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()


def sse(obj: dict | str) -> bytes:
    data = obj.encode() if isinstance(obj, str) else orjson.dumps(obj)
    return b"data: " + data + b"\n\n"


async def until_disconnect(request: Request, work: Awaitable):
    """Run ``work``; if the client disconnects first, cancel it (its generator closes and
    the Triton request is cancelled) and answer nothing."""
    task = asyncio.ensure_future(work)

    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
    raise APIError(499, "client closed the request", None, "client_closed_request")


def guarded(handler: Callable[[Request], Awaitable[Response]]):
    """APIError -> its envelope; anything else is a bug: logged with the request id, answered
    as a generic 500 without internals."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except APIError as err:
            if err.status >= 500:
                log.warning("request %s: %s %s", request.state.request_id, err.status, err.message)
            return error_response(err)
        except Exception:
            log.exception("request %s failed (bug)", request.state.request_id)
            return error_response(APIError(500, "The server had an error while processing your request. "
                                                f"Quote request id {request.state.request_id} when reporting it.",
                                           None, "internal_error"))

    endpoint.__name__ = handler.__name__
    endpoint.__doc__ = handler.__doc__
    return endpoint
