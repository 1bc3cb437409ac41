"""What each endpoint does, with the checks in the order a client must fix things: key,
body (size, JSON, fields), model, limits, then Triton.

Rate limits are reached through the ``Limiter`` interface only: a request reserves its
expected tokens before Triton sees it and settles the reservation with the real usage.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from tokenizers import Tokenizer

from kiln.gateway import protocol
from kiln.gateway.auth import KeyStore, Principal
from kiln.gateway.backend import Chunk, TritonBackend
from kiln.gateway.config import GatewayConfig, ServedModel, environ_keys, read_models
from kiln.gateway.http import FastJSON, SSEResponse, sse, until_disconnect
from kiln.gateway.limits import Limiter, RateLimited, TokenReservation
from kiln.gateway.metrics import Metrics
from kiln.gateway.protocol import APIError
from kiln_runtime import contract

DEFAULT_COMPLETION_ESTIMATE = 256  # tokens reserved against a TPM limit when max_tokens is not given
CHARS_PER_TOKEN = 4  # rough prompt estimate for the reservation; the real count settles it


def generation_estimate(max_tokens: int | None, prompt_chars: int) -> int:
    """Tokens a generation reserves before it runs: its completion budget and a rough prompt count."""
    return int(max_tokens or DEFAULT_COMPLETION_ESTIMATE) + prompt_chars // CHARS_PER_TOKEN


def token_counters(models: dict[str, ServedModel]) -> dict[str, Tokenizer]:
    """Encoders' tokenizers, to count and length-check inputs here before Triton."""
    counters = {}
    for name, m in models.items():
        if m.tokenizer_file is not None:
            tok = Tokenizer.from_file(str(m.tokenizer_file))
            tok.no_truncation()  # count what the client sent: too long is a 400, never cut silently
            tok.no_padding()
            counters[name] = tok
    return counters


class Gateway:
    def __init__(self, config: GatewayConfig, limiter: Limiter, backend: TritonBackend):
        self.config = config
        self.models: dict[str, ServedModel] = read_models(config.repositories)
        self.keys = KeyStore.load(config.keys_file, environ_keys(config), config.limits)
        self.limiter = limiter
        self.metrics = Metrics()
        self.backend = backend
        self.counters = token_counters(self.models)

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
            raise APIError(401, msg, None, "invalid_api_key")
        return who

    async def body(self, request: Request, model_cls):
        limit = self.config.max_body_bytes
        chunks, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise APIError(413, f"Request body exceeds {limit} bytes; send fewer or shorter inputs.", None,
                               "request_too_large")
            chunks.append(part)
        raw = b"".join(chunks)
        if not raw.strip():
            raise protocol.bad_request("The request body is empty; send a JSON object.", None, "invalid_json")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise protocol.bad_request(f"The request body is not valid UTF-8 (byte {err.start}); encode text as "
                                       "UTF-8.", None, "invalid_encoding") from None
        try:
            return model_cls.model_validate_json(raw)
        except ValidationError as err:
            e = err.errors()[0]
            if e["type"] == "json_invalid":
                raise protocol.bad_request(f"We could not parse the JSON body of your request ({e['msg']}); send "
                                           "valid JSON.", None, "invalid_json") from None
            if e["type"] in ("model_type", "model_attributes_type") and not e["loc"]:
                raise protocol.bad_request("The request body must be a JSON object.", None, "invalid_json") from None
            raise protocol.validation_error(err) from None

    def model(self, name: str, kind: str, endpoint: str) -> ServedModel:
        m = self.models.get(name)
        if m is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise APIError(400, f"The model {name!r} does not exist. Models served here: {known}.", "model",
                           "model_not_found")
        if m.kind != kind:
            use = {"chat": "/v1/chat/completions or /v1/completions", "embedding": "/v1/embeddings"}.get(m.kind, "none")
            raise APIError(400, f"The model {name!r} is a {m.task} model and does not serve {endpoint}; use {use}.",
                           "model", "model_not_supported")
        return m

    def check_request(self, who: Principal) -> None:
        try:
            self.limiter.check_request(who)
        except RateLimited as err:
            raise self._rate_limited(err) from None

    def reserve(self, who: Principal, tokens: int) -> TokenReservation:
        try:
            return self.limiter.reserve(who, tokens)
        except RateLimited as err:
            raise self._rate_limited(err) from None

    def _rate_limited(self, err: RateLimited) -> APIError:
        self.metrics.rate_limited.labels("tokens" if "token" in str(err) else "requests").inc()
        return APIError(429, str(err), None, "rate_limit_exceeded", retry_after=err.retry_after)

    def count_tokens(self, m: ServedModel, texts: list[str]) -> list[int]:
        tok = self.counters[m.name]
        counts = [len(tok.encode(texts[0]))] if len(texts) == 1 else [len(e) for e in tok.encode_batch(texts)]
        for i, n in enumerate(counts):
            if n > m.max_input_tokens:
                where = "input" if len(texts) == 1 and not i else f"input[{i}]"
                raise APIError(400, f"{where} is {n} tokens; model {m.name!r} takes at most {m.max_input_tokens} "
                                    "tokens per input. Shorten it or split it.", "input", "context_length_exceeded")
        return counts

    def _queue_rejected(self, err: APIError, model: str) -> None:
        if err.code == "queue_full":
            self.metrics.queue_rejections.labels(model).inc()

    # --- endpoints
    async def embeddings(self, request: Request) -> Response:
        who = self.principal(request)
        req = await self.body(request, protocol.EmbeddingRequest)
        m = self.model(req.model, "embedding", "/v1/embeddings")
        texts = req.texts()
        if req.dimensions is not None and m.dim and req.dimensions != m.dim:
            raise protocol.bad_request(f"dimensions: model {m.name!r} gives {m.dim}-dimensional embeddings and "
                                       f"cannot shorten them (got {req.dimensions}); leave it out", "dimensions")
        used = sum(self.count_tokens(m, texts))  # counted exactly: the reservation is the usage
        with self.reserve(who, used) as reservation:
            try:
                vectors = await self.backend.embed(m.name, texts, m.max_batch_size, request.state.request_id)
            except APIError as err:
                self._queue_rejected(err, m.name)
                reservation.release()
                raise
        self.metrics.tokens.labels(m.name, "prompt").inc(used)
        return FastJSON(protocol.embeddings_response(m.name, vectors, req.encoding_format, used))

    async def chat(self, request: Request) -> Response:
        who = self.principal(request)
        req = await self.body(request, protocol.ChatCompletionRequest)
        m = self.model(req.model, "chat", "/v1/chat/completions")
        values = req.triton_inputs()
        prompt_chars = sum(len(x["content"]) for x in req.chat_messages())
        return await self._generate(request, who, m, req, values, prompt_chars, chat=True)

    async def completions(self, request: Request) -> Response:
        who = self.principal(request)
        req = await self.body(request, protocol.CompletionRequest)
        m = self.model(req.model, "chat", "/v1/completions")
        return await self._generate(request, who, m, req, req.triton_inputs(), len(req.prompt), chat=False)

    async def _generate(self, request: Request, who: Principal, m: ServedModel, req, values: dict, prompt_chars: int,
                        chat: bool) -> Response:
        reservation = self.reserve(who, generation_estimate(values.get(contract.MAX_TOKENS), prompt_chars))
        rid = request.state.request_id
        start = time.perf_counter()
        gen = self.backend.generate(m.name, values, rid)

        def account(last: Chunk | None) -> dict:
            """Settle the reservation once: real usage when the generation ended, the whole
            reservation when it did not (a client cannot dodge its limit by disconnecting)."""
            use = protocol.usage(last.prompt_tokens, last.completion_tokens) if last else protocol.usage(0, 0)
            if not reservation.settled:
                reservation.settle(use["total_tokens"] if last else reservation.tokens)
                self.metrics.tokens.labels(m.name, "prompt").inc(use["prompt_tokens"])
                self.metrics.tokens.labels(m.name, "completion").inc(use["completion_tokens"])
            return use

        try:
            first = await gen.__anext__()  # errors before the first token still get a proper status
        except APIError as err:
            self._queue_rejected(err, m.name)
            reservation.release()  # refused before any work: nothing used
            raise
        except StopAsyncIteration:
            account(None)
            raise APIError(500, "The server had an error while processing your request.", None, "internal_error")
        self.metrics.ttft.labels(m.name).observe(time.perf_counter() - start)
        created, oid = protocol.now(), protocol.new_id("chatcmpl" if chat else "cmpl")

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
            reason = protocol.finish_reason(last.finish_reason)
            body = (protocol.chat_completion(oid, m.name, created, text, reason, use) if chat
                    else protocol.text_completion(oid, m.name, created, text, reason, use))
            return FastJSON(body)

        include_usage = req.include_usage()
        metrics = self.metrics

        def chunk(text: str | None, reason: str | None = None, use: dict | None = None, role: bool = False) -> bytes:
            if chat:
                delta = None if text is None else ({"role": "assistant", "content": text} if role else
                                                   ({"content": text} if text else {}))
                return sse(protocol.chat_chunk(oid, m.name, created, delta, reason, use, include_usage))
            return sse(protocol.text_completion(oid, m.name, created, text, reason, use, chunk=True,
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
                    tick = time.perf_counter()
                    metrics.itl.labels(m.name).observe(tick - stamp)
                    stamp = tick
                use = account(last)
                yield chunk("", protocol.finish_reason(last.finish_reason))
                if include_usage:
                    yield chunk(None, use=use)
                ended = True
            except APIError as err:  # after the first token: reported in-band, as OpenAI does
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
        self.check_request(self.principal(request))  # counts against the key's requests per minute
        data = [protocol.model_card(m.name, m.created, task=m.task, max_input_tokens=m.max_input_tokens)
                for m in self.models.values()]
        return FastJSON({"object": "list", "data": data})

    async def ready(self, request: Request) -> Response:
        server, states = await self.backend.ready(list(self.models))
        ok = server and all(states.values())
        body = {"status": "ready" if ok else "not ready", "triton": server, "models": states}
        return FastJSON(body, status_code=200 if ok else 503)
