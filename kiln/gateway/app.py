"""The OpenAI-compatible HTTP gateway in front of Triton (FastAPI on uvicorn).

    POST /v1/chat/completions   chat, streamed (SSE) or not       -> the generation model
    POST /v1/completions        a prompt string                   -> the generation model
    POST /v1/embeddings         a string or a list of them        -> the encoder ensemble
    GET  /v1/models             the public models of the repositories
    GET  /health                the gateway process is up
    GET  /ready                 Triton is ready and every model is loaded (else 503)
    GET  /metrics               Prometheus

Every answer carries ``x-request-id`` (the client's, when it sent a sane one); errors use
OpenAI's envelope. The order of checks is the order a client must fix things in: body
size, key, JSON, fields, model, limits, then Triton.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable

import anyio
import orjson
from fastapi import FastAPI, Request
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from kiln.gateway import protocol as P
from kiln.gateway.auth import (
    KeyStore,
    Principal,
    RateLimited,
    RateLimiter,
    retry_after_header,
)
from kiln.gateway.backend import Chunk, TritonBackend
from kiln.gateway.config import GatewayConfig, ServedModel, environ_keys, read_models
from kiln.gateway.metrics import Metrics

log = logging.getLogger("kiln.gateway")

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/ready", "/metrics")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
DEFAULT_COMPLETION_ESTIMATE = 256  # tokens reserved against a TPM limit when max_tokens is not given
CHARS_PER_TOKEN = 4  # rough prompt estimate for the reservation; the real count settles it


# ----------------------------------------------------------------------------- edges
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

        m = self.metrics
        start = time.perf_counter()
        m.in_flight.inc()
        try:
            if length is not None and length.isdigit() and int(length) > self.max_body:
                err = P.APIError(413, f"Request body is {int(length)} bytes; this server accepts at most "
                                      f"{self.max_body} bytes. Send fewer or shorter inputs.", None, "request_too_large")
                await error_response(err).__call__(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            m.in_flight.dec()
            m.requests.labels(route, str(status[0])).inc()
            m.latency.labels(route).observe(time.perf_counter() - start)


def error_response(err: P.APIError) -> JSONResponse:
    headers = dict(err.headers)
    if err.retry_after is not None and err.status in (429, 503):
        headers["retry-after"] = retry_after_header(err.retry_after)
    return FastJSON(err.body(), status_code=err.status, headers=headers)


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


# ----------------------------------------------------------------------------- the gateway
class Gateway:
    def __init__(self, config: GatewayConfig, backend: TritonBackend | None = None):
        from tokenizers import Tokenizer

        self.config = config
        self.models: dict[str, ServedModel] = read_models(config.repositories)
        self.keys = KeyStore.load(config.keys_file, environ_keys(config), config.limits)
        self.limiter = RateLimiter()
        self.metrics = Metrics()
        self.backend = backend or TritonBackend(config.triton_grpc, config.request_timeout_s)
        self.counters = {}
        for name, m in self.models.items():
            if m.tokenizer_file is not None:
                tok = Tokenizer.from_file(str(m.tokenizer_file))
                tok.no_truncation()  # count what the client sent: too long is a 400, never cut silently
                tok.no_padding()
                self.counters[name] = tok

    # --- checks, in the order a client must fix things
    def principal(self, request: Request) -> Principal:
        header = request.headers.get("authorization")
        key = None
        if header:
            scheme, _, value = header.partition(" ")
            key = value.strip() if scheme.lower() == "bearer" else None
        who = self.keys.check(key)
        if who is None:
            msg = ("Incorrect API key provided. Send a valid key as `Authorization: Bearer <key>`." if key else
                   "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.")
            raise P.APIError(401, msg, None, "invalid_api_key")
        return who

    async def body(self, request: Request, model_cls):
        limit = self.config.max_body_bytes
        chunks, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise P.APIError(413, f"Request body exceeds {limit} bytes; send fewer or shorter inputs.", None,
                                 "request_too_large")
            chunks.append(part)
        raw = b"".join(chunks)
        if not raw.strip():
            raise P.bad_request("The request body is empty; send a JSON object.", None, "invalid_json")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise P.bad_request(f"The request body is not valid UTF-8 (byte {err.start}); encode text as UTF-8.",
                                None, "invalid_encoding") from None
        try:
            return model_cls.model_validate_json(raw)
        except ValidationError as err:
            e = err.errors()[0]
            if e["type"] == "json_invalid":
                raise P.bad_request(f"We could not parse the JSON body of your request ({e['msg']}); send valid JSON.",
                                    None, "invalid_json") from None
            if e["type"] in ("model_type", "model_attributes_type") and not e["loc"]:
                raise P.bad_request("The request body must be a JSON object.", None, "invalid_json") from None
            raise P.validation_error(err) from None

    def model(self, name: str, kind: str, endpoint: str) -> ServedModel:
        m = self.models.get(name)
        if m is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise P.APIError(400, f"The model {name!r} does not exist. Models served here: {known}.", "model",
                             "model_not_found")
        if m.kind != kind:
            use = {"chat": "/v1/chat/completions or /v1/completions", "embedding": "/v1/embeddings"}.get(m.kind, "none")
            raise P.APIError(400, f"The model {name!r} is a {m.task} model and does not serve {endpoint}; use {use}.",
                             "model", "model_not_supported")
        return m

    def admit(self, who: Principal, tokens: int) -> None:
        try:
            self.limiter.admit(who, tokens)
        except RateLimited as err:
            self.metrics.rate_limited.labels("tokens" if "token" in str(err) else "requests").inc()
            raise P.APIError(429, str(err), None, "rate_limit_exceeded", retry_after=err.retry_after) from None

    def count_tokens(self, m: ServedModel, texts: list[str]) -> list[int]:
        tok = self.counters[m.name]
        counts = [len(tok.encode(texts[0]))] if len(texts) == 1 else [len(e) for e in tok.encode_batch(texts)]
        for i, n in enumerate(counts):
            if n > m.max_input_tokens:
                where = "input" if len(texts) == 1 and not i else f"input[{i}]"
                raise P.APIError(400, f"{where} is {n} tokens; model {m.name!r} takes at most {m.max_input_tokens} "
                                      "tokens per input. Shorten it or split it.", "input", "context_length_exceeded")
        return counts

    def _queue_rejected(self, err: P.APIError, model: str) -> None:
        if err.code == "queue_full":
            self.metrics.queue_rejections.labels(model).inc()

    # --- endpoints
    async def embeddings(self, request: Request) -> Response:
        who = self.principal(request)
        req = await self.body(request, P.EmbeddingRequest)
        m = self.model(req.model, "embedding", "/v1/embeddings")
        texts = req.texts()
        if req.dimensions is not None and m.dim and req.dimensions != m.dim:
            raise P.bad_request(f"dimensions: model {m.name!r} gives {m.dim}-dimensional embeddings and cannot "
                                f"shorten them (got {req.dimensions}); leave it out", "dimensions")
        counts = self.count_tokens(m, texts)
        used = sum(counts)
        self.admit(who, used)
        try:
            vectors = await self.backend.embed(m.name, texts, m.max_batch_size, request.state.request_id)
        except P.APIError as err:
            self._queue_rejected(err, m.name)
            self.limiter.settle(who, used, 0)
            raise
        self.metrics.tokens.labels(m.name, "prompt").inc(used)
        return FastJSON(P.embeddings_response(m.name, vectors, req.encoding_format, used))

    async def chat(self, request: Request) -> Response:
        who = self.principal(request)
        req = await self.body(request, P.ChatCompletionRequest)
        m = self.model(req.model, "chat", "/v1/chat/completions")
        values = req.triton_inputs()
        prompt_chars = sum(len(x["content"]) for x in req.chat_messages())
        return await self._generate(request, who, m, req, values, prompt_chars, chat=True)

    async def completions(self, request: Request) -> Response:
        who = self.principal(request)
        req = await self.body(request, P.CompletionRequest)
        m = self.model(req.model, "chat", "/v1/completions")
        return await self._generate(request, who, m, req, req.triton_inputs(), len(req.prompt), chat=False)

    async def _generate(self, request: Request, who: Principal, m: ServedModel, req, values: dict, prompt_chars: int,
                        chat: bool) -> Response:
        reserved = int(values.get("max_tokens") or DEFAULT_COMPLETION_ESTIMATE) + prompt_chars // CHARS_PER_TOKEN
        self.admit(who, reserved)
        rid = request.state.request_id
        start = time.perf_counter()
        gen = self.backend.generate(m.name, values, rid)
        settled = [False]

        def account(last: Chunk | None) -> dict:
            """Settle the reservation once: real usage when the generation ended, the whole
            reservation when it did not (a client cannot dodge its limit by disconnecting)."""
            use = P.usage(last.prompt_tokens, last.completion_tokens) if last else P.usage(0, 0)
            if not settled[0]:
                settled[0] = True
                self.limiter.settle(who, reserved, use["total_tokens"] if last else reserved)
                self.metrics.tokens.labels(m.name, "prompt").inc(use["prompt_tokens"])
                self.metrics.tokens.labels(m.name, "completion").inc(use["completion_tokens"])
            return use

        try:
            first = await gen.__anext__()  # errors before the first token still get a proper status
        except P.APIError as err:
            self._queue_rejected(err, m.name)
            settled[0] = True
            self.limiter.settle(who, reserved, 0)  # refused before any work: nothing used
            raise
        except StopAsyncIteration:
            account(None)
            raise P.APIError(500, "The server had an error while processing your request.", None, "internal_error")
        self.metrics.ttft.labels(m.name).observe(time.perf_counter() - start)
        created, oid = P.now(), P.new_id("chatcmpl" if chat else "cmpl")

        if not req.stream:
            async def collect() -> tuple[str, Chunk]:
                parts, last = [first.text], first
                while not last.final:
                    last = await gen.__anext__()
                    parts.append(last.text)
                return "".join(parts), last

            try:
                text, last = await until_disconnect(request, collect())
            finally:
                await gen.aclose()
            use = account(last)
            reason = P.finish_reason(last.finish_reason)
            body = (P.chat_completion(oid, m.name, created, text, reason, use) if chat
                    else P.text_completion(oid, m.name, created, text, reason, use))
            return FastJSON(body)

        include_usage = req.include_usage()
        metrics = self.metrics

        def chunk(text: str | None, reason: str | None = None, use: dict | None = None, role: bool = False) -> bytes:
            if chat:
                delta = None if text is None else ({"role": "assistant", "content": text} if role else
                                                   ({"content": text} if text else {}))
                return sse(P.chat_chunk(oid, m.name, created, delta, reason, use, include_usage))
            return sse(P.text_completion(oid, m.name, created, text, reason, use, chunk=True,
                                         with_usage_field=include_usage))

        async def events() -> AsyncIterator[bytes]:
            last, stamp, ended = first, time.perf_counter(), False
            try:
                if chat:
                    yield chunk("", role=True)
                while True:
                    if last.text:
                        yield chunk(last.text)
                    if last.final:
                        break
                    last = await gen.__anext__()
                    now = time.perf_counter()
                    metrics.itl.labels(m.name).observe(now - stamp)
                    stamp = now
                use = account(last)
                yield chunk("", P.finish_reason(last.finish_reason))
                if include_usage:
                    yield chunk(None, use=use)
                ended = True
            except P.APIError as err:  # after the first token: reported in-band, as OpenAI does
                self._queue_rejected(err, m.name)
                account(None)
                yield sse(err.body())
                ended = True
            finally:
                if not ended:
                    metrics.cancelled.labels(m.name).inc()
                    account(None)
                await gen.aclose()
            yield sse("[DONE]")

        return SSEResponse(events(), headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def list_models(self, request: Request) -> Response:
        self.admit(self.principal(request), 0)  # counts against the key's requests per minute
        data = [P.model_card(m.name, m.created, task=m.task, max_input_tokens=m.max_input_tokens)
                for m in self.models.values()]
        return FastJSON({"object": "list", "data": data})

    async def ready(self, request: Request) -> Response:
        server, states = await self.backend.ready(list(self.models))
        ok = server and all(states.values())
        body = {"status": "ready" if ok else "not ready", "triton": server, "models": states}
        return FastJSON(body, status_code=200 if ok else 503)


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
    raise P.APIError(499, "client closed the request", None, "client_closed_request")


def guarded(handler: Callable[[Request], Awaitable[Response]]):
    """APIError -> its envelope; anything else is a bug: logged with the request id, answered
    as a generic 500 without internals."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except P.APIError as err:
            if err.status >= 500:
                log.warning("request %s: %s %s", request.state.request_id, err.status, err.message)
            return error_response(err)
        except Exception:
            log.exception("request %s failed (bug)", request.state.request_id)
            return error_response(P.APIError(500, "The server had an error while processing your request. "
                                                  f"Quote request id {request.state.request_id} when reporting it.",
                                             None, "internal_error"))

    endpoint.__name__ = handler.__name__
    endpoint.__doc__ = handler.__doc__
    return endpoint


def build_app(config: GatewayConfig, backend: TritonBackend | None = None) -> FastAPI:
    gw = Gateway(config, backend)

    @asynccontextmanager
    async def lifespan(app):
        if not gw.keys.enabled:
            log.warning("no API keys configured: the gateway accepts every request (set %s or --keys-file)",
                        config.keys_env)
        yield
        await gw.backend.close()

    app = FastAPI(title="kiln gateway", version="1", summary="OpenAI-compatible API in front of Triton",
                  lifespan=lifespan)
    app.state.gateway = gw

    def schema(model) -> dict:
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}

    app.add_api_route("/v1/chat/completions", guarded(gw.chat), methods=["POST"],
                      openapi_extra=schema(P.ChatCompletionRequest))
    app.add_api_route("/v1/completions", guarded(gw.completions), methods=["POST"],
                      openapi_extra=schema(P.CompletionRequest))
    app.add_api_route("/v1/embeddings", guarded(gw.embeddings), methods=["POST"], openapi_extra=schema(P.EmbeddingRequest))
    app.add_api_route("/v1/models", guarded(gw.list_models), methods=["GET"])
    app.add_api_route("/ready", guarded(gw.ready), methods=["GET"])

    @app.get("/health")
    async def health() -> Response:
        return FastJSON({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gw.metrics.render(), media_type=gw.metrics.content_type)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
        msg = (f"Unknown path {request.url.path}; see GET /v1/models and the OpenAI API." if exc.status_code == 404
               else f"{request.method} is not allowed on {request.url.path}." if exc.status_code == 405 else str(exc.detail))
        return error_response(P.APIError(exc.status_code, msg, None, code))

    app.add_middleware(Edge, metrics=gw.metrics, max_body=config.max_body_bytes)
    return app
