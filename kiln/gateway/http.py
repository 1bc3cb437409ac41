"""The gateway's HTTP edges: what every request passes through before and after an endpoint.

The ``Edge`` middleware gives each request its id (the client's ``x-request-id`` when it
is sane), refuses an oversized body from its Content-Length before reading it, turns away
API requests beyond the in-flight cap at once (503, Retry-After), and counts requests by
route. Errors leave in OpenAI's envelope. Work waits for Triton under ``until_disconnect``
with the route's ``Deadline``: a client that leaves or a deadline that passes cancels it
(and with it the Triton request); streams are server-sent events that do the same.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from kiln.gateway.metrics import Metrics
from kiln.gateway.protocol import APIError

log = logging.getLogger("kiln.gateway")

ADMIN_ROUTES = ("/v1/admin/models/{model}/reload", "/v1/admin/models/{model}/rollback", "/v1/admin/jobs",
                "/v1/admin/jobs/{id}")
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/ready", "/metrics",
          *ADMIN_ROUTES)
_ADMIN_TEMPLATES = [(re.compile("^" + re.sub(r"\{\w+\}", "[^/]+", t) + "$"), t) for t in ADMIN_ROUTES]
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
RETRY_AFTER_BUSY_S = 1.0
CLIENT_GONE = "client_closed_request"


class Edge:
    """Pure ASGI middleware: request id, early 413 on Content-Length, the in-flight cap and
    load shedding on the API routes (health, readiness and metrics stay answerable), metrics
    by route."""

    def __init__(self, app, metrics: Metrics, max_body: int, max_in_flight: int,
                 refusal: Callable[[str], APIError | None] = lambda path: None):
        self.app, self.metrics, self.max_body, self.max_in_flight = app, metrics, max_body, max_in_flight
        self.refusal = refusal  # load shedding by route, before the body is read (Gateway.early_refusal)
        self.busy = 0  # API requests being answered (one event loop: no lock needed)

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
        route = route_label(scope["path"])
        status = [500]
        rid_header = (b"x-request-id", rid.encode())

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), rid_header]
            await send(message)

        metrics = self.metrics
        start = time.perf_counter()
        capped = route.startswith("/v1/")
        metrics.in_flight.inc()
        try:
            if capped and self.busy >= self.max_in_flight:
                capped = False  # not counted in: it is answered now
                err = APIError(503, f"The gateway is answering its limit of {self.max_in_flight} requests at once; "
                                    "retry shortly.", None, "overloaded", retry_after=RETRY_AFTER_BUSY_S)
                await error_response(err).__call__(scope, receive, send_with_id)
            elif capped and (shed := self.refusal(route)) is not None:
                capped = False
                await error_response(shed).__call__(scope, receive, send_with_id)
            elif length is not None and length.isdigit() and int(length) > self.max_body:
                err = APIError(413, f"Request body is {int(length)} bytes; this server accepts at most "
                                    f"{self.max_body} bytes. Send fewer or shorter inputs.", None, "request_too_large")
                await error_response(err).__call__(scope, receive, send_with_id)
            else:
                self.busy += capped
                await self.app(scope, receive, send_with_id)
        finally:
            self.busy -= capped
            metrics.in_flight.dec()
            metrics.requests.labels(route, str(status[0])).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - start)


def route_label(path: str) -> str:
    """A request's route for metrics: its template (``/v1/admin/jobs/{id}``), ``other`` when unknown."""
    if path in ROUTES:
        return path
    if path.startswith("/v1/admin/"):
        for pattern, template in _ADMIN_TEMPLATES:
            if pattern.match(path):
                return template
    return "other"


def retry_after_header(seconds: float) -> str:
    """Whole seconds, at least 1: what clients and proxies parse."""
    return str(max(1, math.ceil(seconds)))


def error_response(err: APIError) -> JSONResponse:
    headers = dict(err.headers)
    if err.retry_after is not None and err.status in (429, 503):
        headers["retry-after"] = retry_after_header(err.retry_after)
        # OpenAI's own header, which its clients read first: the wait to the millisecond
        headers["retry-after-ms"] = str(max(1, round(err.retry_after * 1000)))
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
    both. The body iterator is always closed and ``on_close`` always runs, even when the
    client left before the first event (a body never started runs no ``finally``): that is
    where the Triton request is cancelled and the reservation settled."""

    media_type = "text/event-stream"

    def __init__(self, content, on_close: Callable[[], Awaitable[None]], **kw):
        super().__init__(content, **kw)
        self.on_close = on_close

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
            try:
                await self.body_iterator.aclose()
            finally:
                await self.on_close()


def sse(obj: dict | str) -> bytes:
    data = obj.encode() if isinstance(obj, str) else orjson.dumps(obj)
    return b"data: " + data + b"\n\n"


@dataclass(frozen=True)
class Deadline:
    """A route's time budget for one request, on the event loop's clock."""

    seconds: float
    at: float

    @classmethod
    def after(cls, seconds: float) -> "Deadline":
        return cls(seconds, asyncio.get_running_loop().time() + seconds)

    def left(self) -> float:
        return max(0.0, self.at - asyncio.get_running_loop().time())

    def expired(self) -> APIError:
        return APIError(504, f"The request did not finish within its deadline of {self.seconds:g} s and was "
                             "cancelled; retry later, or ask for less work.", None, "deadline_exceeded")


async def until_disconnect(request: Request, work: Awaitable, deadline: Deadline):
    """Run ``work`` until it ends, the client disconnects (499, nobody reads it) or the
    deadline passes (504). In the last two cases it is cancelled: a generator waiting on
    Triton closes, which cancels the Triton request. Cancelled itself, it cancels ``work``."""
    task = asyncio.ensure_future(work)

    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    stopped = False
    try:
        await asyncio.wait({task, watcher}, timeout=deadline.left(), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            stopped = True
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
    if not stopped:
        return task.result()
    if watcher.done() and not watcher.cancelled():
        raise APIError(499, "client closed the request", None, CLIENT_GONE)
    raise deadline.expired()


QUIET_CODES = ("triton_unavailable", "shutting_down", "overloaded", "limits_unavailable")


def guarded(handler: Callable[[Request], Awaitable[Response]]):
    """APIError -> its envelope; anything else is a bug: logged with the request id, answered
    as a generic 500 without internals."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except APIError as err:
            # an outage is logged once by the backend ("unreachable" / "back"), not per refused request
            if err.status >= 500 and err.code not in QUIET_CODES:
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
