"""What each endpoint does, with the checks in the order a client must fix things and
cheapest first: key and requests per minute, body (size, JSON, fields), model, tokens
(counted off the event loop), token limits, then Triton under the route's deadline.

Rate limits are reached through the ``Limiter`` interface only: a request reserves its
expected tokens before Triton sees it and every path ends that reservation explicitly.
Before the first generated token only a client that leaves pays it (a refusal or a
failure costs nothing); once output exists the real usage settles it, or, when the
request ends any other way (the client left, a failure half-way), the whole reservation
stays charged, so a limit cannot be dodged by disconnecting.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from tokenizers import Tokenizer

from kiln.gateway import protocol
from kiln.gateway.admission import Admission, Overloaded
from kiln.gateway.auth import KeyStore, Principal
from kiln.gateway.backend import Chunk, TritonBackend
from kiln.gateway.config import (
    GatewayConfig,
    GatewayError,
    ServedModel,
    environ_keys,
    is_loopback,
    read_models,
)
from kiln.gateway.http import (
    CLIENT_GONE,
    Deadline,
    FastJSON,
    SSEResponse,
    sse,
    until_disconnect,
)
from kiln.gateway.limits import (
    Limiter,
    LimitsUnavailable,
    RateLimited,
    TokenReservation,
    TooLarge,
)
from kiln.gateway.metrics import Metrics
from kiln.gateway.protocol import APIError
from kiln_core.card import RepositoryCard
from kiln_runtime import contract

DEFAULT_COMPLETION_ESTIMATE = 256  # tokens reserved against a TPM limit when max_tokens is not given
CHARS_PER_TOKEN = 4  # rough prompt estimate for the reservation; the real count settles it
GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions")
INLINE_TOKENIZE_CHARS = 2048  # inputs up to this size are counted on the event loop (~10 µs a sentence)
MIN_IN_FLIGHT = 4  # an encoder always admits at least this many (or its batch size) whatever its queue


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


CARD_CHECK_S = 1.0  # how often a gateway looks whether a repository card was rewritten (a version switch)
log = logging.getLogger("kiln.gateway")


def card_stamps(repositories: list[Path]) -> tuple:
    """What tells a rewritten card: each card's modification time and size."""
    out = []
    for repo in repositories:
        try:
            st = RepositoryCard.path(repo).stat()
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


def limits_unavailable(err: LimitsUnavailable) -> APIError:
    """The shared limit store is out and the gateway fails closed: the server's fault, not the key's."""
    return APIError(503, str(err), None, "limits_unavailable", retry_after=err.retry_after)


class Gateway:
    def __init__(self, config: GatewayConfig, limiter: Limiter, backend: TritonBackend):
        self.config = config
        self.models: dict[str, ServedModel] = read_models(config.repositories)
        self._card_stamps, self._cards_checked = card_stamps(config.repositories), time.monotonic()
        self.keys = KeyStore.load(config.keys_file, environ_keys(config), config.limits)
        if not self.keys.enabled and not is_loopback(config.host) and not config.allow_unauthenticated:
            raise GatewayError(
                f"refusing to listen on {config.host} without API keys: anyone who reaches it could use the models. "
                f"Configure keys (--keys-file or ${config.keys_env}), listen on 127.0.0.1, or pass "
                "--allow-unauthenticated to serve everyone on purpose")
        self.limiter = limiter
        self.metrics = Metrics()
        self.backend = backend
        self.counters = token_counters(self.models)
        self.admission = Admission()
        self.encoders = [m.name for m in self.models.values() if m.kind == "embedding"]
        for name in self.encoders:
            self.admission.configure(name, config.embeddings_queue_s,
                                     max(MIN_IN_FLIGHT, self.models[name].max_batch_size))
        self.generators = [m.name for m in self.models.values() if m.kind == "chat" and m.engine_slots]
        for m in self.models.values():
            # a generation model's own queue is fixed (running + waiting): the gateway holds the
            # same count, so Triton never has to refuse a flood itself (Triton 2.51's gRPC stream
            # crashed under a burst of the model's own refusals)
            if m.kind == "chat" and m.engine_slots:  # each replica holds as many
                self.admission.configure(m.name, 0.0, m.engine_slots * (1 + len(config.triton_replicas)))

    async def refresh_cache_counts(self) -> None:
        """Triton's response-cache hits and misses of the cached models, for /metrics."""
        for m in self.models.values():
            if m.response_cache and hasattr(self.backend, "cache_counts"):
                counts = await self.backend.cache_counts(m.name)
                if counts is not None:
                    self.metrics.cache.set(m.name, *counts)

    # --- checks, in the order a client must fix things
    def admit(self, request: Request) -> Principal:
        """The key, then one request of its per-minute budget: both before the body is read."""
        who = self.principal(request)
        self.check_request(who)
        return who

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

    async def raw_body(self, request: Request) -> bytes:
        """The body's bytes, 413 past ``max_body_bytes`` (counted as it arrives)."""
        limit = self.config.max_body_bytes
        chunks, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise APIError(413, f"Request body exceeds {limit} bytes; send fewer or shorter inputs.", None,
                               "request_too_large")
            chunks.append(part)
        return b"".join(chunks)

    async def body(self, request: Request, model_cls):
        raw = await self.raw_body(request)
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

    def watch_cards(self) -> None:
        """`kiln reload` switched a model to a new version and rewrote its card: read the
        models (and the new version's tokenizer) again, at most once a second, with no
        restart; the ids stay. A card that cannot be read keeps the models as they were."""
        now = time.monotonic()
        if now - self._cards_checked < CARD_CHECK_S:
            return
        self._cards_checked = now
        stamps = card_stamps(self.config.repositories)
        if stamps == self._card_stamps:
            return
        try:
            models = read_models(self.config.repositories)
            counters = token_counters(models)
        except Exception as err:  # a card half written, a tokenizer not there yet: look again next time
            log.warning("a repository card changed but cannot be read (%s); serving as before", err)
            return
        self.models, self.counters, self._card_stamps = models, counters, stamps
        log.info("repository cards re-read: %s", ", ".join(f"{m.name} ({m.repository})" for m in models.values()))

    def model(self, name: str, kind: str, endpoint: str) -> ServedModel:
        self.watch_cards()
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
        except LimitsUnavailable as err:
            raise limits_unavailable(err) from None

    def reserve(self, who: Principal, tokens: int, param: str) -> TokenReservation:
        """Reserve ``tokens``; one that can never fit the key's budget is the client's to fix (400)."""
        try:
            return self.limiter.reserve(who, tokens)
        except RateLimited as err:
            raise self._rate_limited(err) from None
        except LimitsUnavailable as err:
            raise limits_unavailable(err) from None
        except TooLarge as err:
            raise APIError(400, f"{param}: request too large: {err} for key {who.name!r}, so it can never be "
                                "admitted; send less input or ask for fewer tokens.", param,
                           "request_too_large") from None

    def _rate_limited(self, err: RateLimited) -> APIError:
        self.metrics.rate_limited.labels("tokens" if "token" in str(err) else "requests").inc()
        return APIError(429, str(err), None, "rate_limit_exceeded", retry_after=err.retry_after)

    def check_budget(self, m: ServedModel, budget: int | None, field: str) -> None:
        """A completion budget that can never fit the model's context (a prompt takes a token at least) is a 400."""
        room = m.max_input_tokens - 1
        if budget is not None and budget > room:
            raise APIError(400, f"{field}: at most {room} tokens fit model {m.name!r}'s context of "
                                f"{m.max_input_tokens} tokens (prompt + completion) (got {budget})", field,
                           "context_length_exceeded")

    def count_tokens(self, m: ServedModel, texts: list[str]) -> list[int]:
        tok = self.counters[m.name]
        counts = [len(tok.encode(texts[0]))] if len(texts) == 1 else [len(e) for e in tok.encode_batch(texts)]
        for i, n in enumerate(counts):
            if n > m.max_input_tokens:
                where = "input" if len(texts) == 1 and not i else f"input[{i}]"
                raise APIError(400, f"{where} is {n} tokens; model {m.name!r} takes at most {m.max_input_tokens} "
                                    "tokens per input. Shorten it or split it.", "input", "context_length_exceeded")
        return counts

    def enter(self, m: ServedModel) -> None:
        """One more request for ``m``'s queue, or 503 at once when it would wait past the budget."""
        try:
            self.admission.enter(m.name)
        except Overloaded as err:
            raise self._shed(err) from None

    def early_refusal(self, path: str) -> APIError | None:
        """For the HTTP edge, before the body is read: a 503 when every model the route serves
        is shedding now (one model: exactly its own verdict), so a refusal under overload
        costs no parsing at all. Otherwise the endpoint decides per model."""
        models = self.encoders if path == "/v1/embeddings" else self.generators if path in GENERATION_ROUTES else []
        refusals = [self.admission.refusal(name) for name in models]
        if not refusals or any(r is None for r in refusals):
            return None
        return self._shed(min(refusals, key=lambda r: r.retry_after))

    def _shed(self, err: Overloaded) -> APIError:
        self.metrics.shed.labels(err.model).inc()
        return APIError(503, str(err), None, "overloaded", retry_after=err.retry_after)

    def _queue_rejected(self, err: APIError, model: str) -> None:
        if err.code == "queue_full":
            self.metrics.queue_rejections.labels(model).inc()

    # --- canary (`kiln reload --canary`)
    def arm(self, m: ServedModel) -> tuple[str, str | None]:
        """(the Triton model to call, the arm counted): while a canary runs, its share of the
        requests goes to the canary model; otherwise the public model, uncounted."""
        if m.canary_model is None:
            return m.name, None
        return (m.canary_model, "canary") if random.random() < m.canary_share else (m.name, "stable")

    def count_arm(self, m: ServedModel, arm: str | None, started: float, failed: bool) -> None:
        if arm is None:
            return
        self.metrics.canary_requests.labels(m.name, arm, "error" if failed else "ok").inc()
        if not failed:
            self.metrics.canary_latency.labels(m.name, arm).observe(time.perf_counter() - started)

    # --- endpoints
    async def embeddings(self, request: Request) -> Response:
        deadline = Deadline.after(self.config.embeddings_deadline_s)
        who = self.admit(request)
        req = await self.body(request, protocol.EmbeddingRequest)
        m = self.model(req.model, "embedding", "/v1/embeddings")
        texts = req.texts()
        if req.dimensions is not None and m.dim and req.dimensions != m.dim:
            raise protocol.bad_request(f"dimensions: model {m.name!r} gives {m.dim}-dimensional embeddings and "
                                       f"cannot shorten them (got {req.dimensions}); leave it out", "dimensions")
        self.enter(m)  # shed before any tokenizing: a refusal must cost next to nothing
        answered = False
        try:
            if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:  # microseconds: a thread hop would cost more
                counts = self.count_tokens(m, texts)
            else:  # a long batch must not stall the event loop
                counts = await anyio.to_thread.run_sync(self.count_tokens, m, texts)
            used = sum(counts)  # counted exactly: the reservation is the usage
            reservation = self.reserve(who, used, "input")
            try:
                target, arm = self.arm(m)
                started = time.perf_counter()
                try:
                    vectors = await until_disconnect(
                        request, self.backend.embed(target, texts, m.max_batch_size, request.state.request_id), deadline)
                except APIError as err:
                    self.count_arm(m, arm, started, err.code != CLIENT_GONE and err.status >= 500)
                    raise
                self.count_arm(m, arm, started, False)
            except APIError as err:
                self._queue_rejected(err, m.name)
                reservation.settle(used if err.code == CLIENT_GONE else 0)  # a client that left pays; a refusal not
                raise
            except BaseException:
                reservation.release()  # a bug: the client is not charged for it
                raise
            answered = True
        finally:
            self.admission.leave(m.name, answered)
        reservation.settle(used)
        self.metrics.tokens.labels(m.name, "prompt").inc(used)
        return FastJSON(protocol.embeddings_response(m.name, vectors, req.encoding_format, used))

    async def chat(self, request: Request) -> Response:
        deadline = Deadline.after(self.config.generation_deadline_s)
        who = self.admit(request)
        req = await self.body(request, protocol.ChatCompletionRequest)
        m = self.model(req.model, "chat", "/v1/chat/completions")
        values = req.triton_inputs()
        prompt_chars = sum(len(x["content"]) for x in req.chat_messages())
        return await self._generate(request, deadline, who, m, req, values, prompt_chars, chat=True)

    async def completions(self, request: Request) -> Response:
        deadline = Deadline.after(self.config.generation_deadline_s)
        who = self.admit(request)
        req = await self.body(request, protocol.CompletionRequest)
        m = self.model(req.model, "chat", "/v1/completions")
        return await self._generate(request, deadline, who, m, req, req.triton_inputs(), len(req.prompt), chat=False)

    def _reserve_generation(self, who: Principal, budget: int | None, field: str, prompt_chars: int,
                            prompt_field: str) -> TokenReservation:
        need = generation_estimate(budget, prompt_chars)
        if budget is None and who.limits.tpm:
            need = min(need, who.limits.tpm)  # our own guess at the length must not make a request unfittable
        param = field if (budget or 0) >= prompt_chars // CHARS_PER_TOKEN else prompt_field
        return self.reserve(who, need, param)

    async def _generate(self, request: Request, deadline: Deadline, who: Principal, m: ServedModel, req, values: dict,
                        prompt_chars: int, chat: bool) -> Response:
        budget = values.get(contract.MAX_TOKENS)
        self.check_budget(m, budget, req.budget_field())
        reservation = self._reserve_generation(who, budget, req.budget_field(), prompt_chars,
                                               "messages" if chat else "prompt")
        rid = request.state.request_id
        self.enter(m)
        left = False

        def leave(answered: bool) -> None:
            """Its place in the model's queue back, once, whichever way it ended."""
            nonlocal left
            if not left:
                left = True
                self.admission.leave(m.name, answered)

        start = time.perf_counter()
        gen = self.backend.generate(m.name, values, rid)
        metrics = self.metrics

        def account(last: Chunk | None) -> dict:
            """Settle the reservation once: the real usage when the generation ended, else the
            whole reservation (the client left, or it failed half-way)."""
            use = protocol.usage(last.prompt_tokens, last.completion_tokens) if last else protocol.usage(0, 0)
            if not reservation.settled:
                reservation.settle(use["total_tokens"] if last else reservation.tokens)
                metrics.tokens.labels(m.name, "prompt").inc(use["prompt_tokens"])
                metrics.tokens.labels(m.name, "completion").inc(use["completion_tokens"])
            return use

        def gone(err: BaseException) -> bool:
            left = isinstance(err, APIError) and err.code == CLIENT_GONE
            if left:
                metrics.cancelled.labels(m.name).inc()
            return left

        try:  # errors before the first token still get a proper status
            first = await until_disconnect(request, anext(gen, None), deadline)
            if first is None:
                raise APIError(500, "The server had an error while processing your request.", None, "internal_error")
        except BaseException as err:
            if isinstance(err, APIError):
                self._queue_rejected(err, m.name)
            if gone(err):
                account(None)  # it left while Triton worked on it: it pays, as it would have later
            else:
                reservation.release()  # refused or failed before any output: nothing used
            leave(False)
            await gen.aclose()
            raise
        metrics.ttft.labels(m.name).observe(time.perf_counter() - start)
        created, oid = protocol.now(), protocol.new_id("chatcmpl" if chat else "cmpl")

        if not req.stream:
            async def collect() -> tuple[str, Chunk]:
                parts, last = [first.text], first
                while not last.final:
                    last = await gen.__anext__()
                    parts.append(last.text)
                return "".join(parts), last

            try:
                text, last = await until_disconnect(request, collect(), deadline)
            except BaseException as err:
                if isinstance(err, APIError):
                    self._queue_rejected(err, m.name)
                gone(err)
                account(None)
                raise
            finally:
                leave(True)
                await gen.aclose()
            use = account(last)
            reason = protocol.finish_reason(last.finish_reason)
            body = (protocol.chat_completion(oid, m.name, created, text, reason, use) if chat
                    else protocol.text_completion(oid, m.name, created, text, reason, use))
            return FastJSON(body)

        include_usage = req.include_usage()

        def chunk(text: str | None, reason: str | None = None, use: dict | None = None, role: bool = False) -> bytes:
            if chat:
                delta = None if text is None else ({"role": "assistant", "content": text} if role else
                                                   ({"content": text} if text else {}))
                return sse(protocol.chat_chunk(oid, m.name, created, delta, reason, use, include_usage))
            return sse(protocol.text_completion(oid, m.name, created, text, reason, use, chunk=True,
                                                with_usage_field=include_usage))

        async def next_chunk() -> Chunk:
            try:
                async with asyncio.timeout_at(deadline.at):
                    return await gen.__anext__()
            except TimeoutError:
                raise deadline.expired() from None

        async def events() -> AsyncIterator[bytes]:
            last, stamp = first, time.perf_counter()
            try:
                if chat:
                    yield chunk("", role=True)
                while True:
                    if last.text:
                        yield chunk(last.text)
                    if last.final:
                        break
                    last = await next_chunk()
                    tick = time.perf_counter()
                    metrics.itl.labels(m.name).observe(tick - stamp)
                    stamp = tick
                use = account(last)
                yield chunk("", protocol.finish_reason(last.finish_reason))
                if include_usage:
                    yield chunk(None, use=use)
            except APIError as err:  # after the first token: reported in-band, as OpenAI does
                self._queue_rejected(err, m.name)
                account(None)
                await gen.aclose()
                yield sse(err.body())
            yield sse("[DONE]")

        async def close() -> None:
            """Whatever ended the stream (its end, an error, the client leaving before or
            during it): the reservation is settled and the Triton request closed."""
            if not reservation.settled:
                metrics.cancelled.labels(m.name).inc()
                account(None)
            leave(True)
            await gen.aclose()

        return SSEResponse(events(), on_close=close, headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def list_models(self, request: Request) -> Response:
        self.admit(request)  # counts against the key's requests per minute
        self.watch_cards()
        data = [protocol.model_card(m.name, m.created, task=m.task, max_input_tokens=m.max_input_tokens)
                for m in self.models.values()]
        return FastJSON({"object": "list", "data": data})

    async def ready(self, request: Request) -> Response:
        server, states = await self.backend.ready(list(self.models))
        limits = await anyio.to_thread.run_sync(self.limiter.status)  # a round trip to Redis, when shared
        # limits "degraded" (Redis out, failing open) still serves: ready, and it says so
        ok = server and all(states.values()) and limits != "down"
        body = {"status": "ready" if ok else "not ready", "triton": server, "models": states, "limits": limits}
        return FastJSON(body, status_code=200 if ok else 503)
