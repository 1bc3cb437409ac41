"""The gateway's one way to Triton: gRPC (asyncio), one channel shared by every request.

Embeddings go through unary ``ModelInfer`` on the public ensemble; generation goes
through a bidirectional ``ModelStreamInfer`` per request (the generation model is
decoupled). Closing a generation early cancels the gRPC call, which Triton turns into a
cancelled request that frees its slot in the running batch. Triton's errors are sorted
here into what the client must do (``map_error``): 400 fix the input, 429 retry later,
503 Triton or the model is not up, 500 a bug.

When a call finds Triton unreachable (it died, it restarts), the backend marks it down and
refuses every request at once with 503 until a background probe gets an answer again, so
clients hear "retry later" in microseconds rather than after a gRPC timeout. Readiness
asks each generation model itself (the ``HEALTH`` input), since Triton reports a python
model READY even when its engine is broken.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import (
    MAX_GRPC_MESSAGE_SIZE,
    InferInput,
    InferRequestedOutput,
    KeepAliveOptions,
)
from tritonclient.utils import InferenceServerException

from kiln.gateway.protocol import APIError
from kiln_runtime import contract as tensors
from kiln_runtime.contract import (
    EMBEDDING,
    GENERATION_INPUTS,
    GENERATION_OUTPUTS,
    HEALTH,
    HEALTH_FINISH_REASON,
    TEXT,
)

log = logging.getLogger("kiln.gateway")

# generation tensors: the contract the repository writer and the model read, so names and types never drift
_TRITON_TYPES = {"bytes": "BYTES", "int32": "INT32", "float32": "FP32", "uint64": "UINT64", "bool": "BOOL"}
_NUMPY_TYPES = {"bytes": np.object_, "int32": np.int32, "float32": np.float32, "uint64": np.uint64, "bool": np.bool_}
GEN_INPUTS = {t.name: (t.dtype, list(t.dims)) for t in GENERATION_INPUTS}
GEN_OUTPUTS = [t.name for t in GENERATION_OUTPUTS]

QUEUE_FULL = "Exceeds maximum queue size"  # Triton's phrase; the generation model uses it too
RETRY_AFTER_QUEUE_S = 1.0
RETRY_AFTER_DOWN_S = 2.0  # a restart under `kiln serve` takes a backoff second plus Triton's start
PROBE_INTERVAL_S = 0.25  # while Triton is down: how often the backend asks whether it is back
CHECK_TIMEOUT_S = 2.0  # readiness calls and the generation models' HEALTH probe
_UNREACHABLE = re.compile(r"failed to connect|connection refused|Socket closed|Connect Failed|DNS resolution|"
                          r"unavailable|Broken pipe|GOAWAY|Connection reset", re.I)
_NOT_READY = re.compile(r"unknown model|is not found|not ready|is not loaded|unavailable model", re.I)
_FIELD = re.compile(r"^\s*(?:\[request id: [^\]]*\]\s*)?([a-z_]+)(?:\[\d+\])?: ")
# the generation model names its fields as Triton does; OpenAI clients know other names
_PARAM_NAMES = {tensors.TEXT_INPUT: "prompt", tensors.RANDOM_SEED: "seed", tensors.STOP_WORDS: "stop"}


@dataclass(frozen=True)
class Chunk:
    """One response of a generation stream."""

    text: str
    finish_reason: str | None = None  # set on the last one
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def final(self) -> bool:
        return self.finish_reason is not None


def map_error(err: Exception, model: str) -> APIError:
    """Sort a Triton/gRPC failure by who must act."""
    msg = (err.message() if isinstance(err, InferenceServerException) else None) or str(err)
    status = str(err.status()) if isinstance(err, InferenceServerException) and err.status() else ""
    if QUEUE_FULL in msg:
        return APIError(429, f"Model {model!r} is at capacity (its queue is full); retry shortly.",
                        None, "queue_full", retry_after=RETRY_AFTER_QUEUE_S)
    if tensors.BROKEN_ENGINE in msg:  # the model is up but cannot generate: Triton itself is fine
        return APIError(503, f"Model {model!r} cannot generate right now; retry later.", None, "model_unavailable",
                        retry_after=5.0)
    if "INVALID_ARGUMENT" in status or "INVALID_ARG" in msg or _FIELD.match(msg) or "UTF-8" in msg:
        m = _FIELD.match(msg)
        param = _PARAM_NAMES.get(m.group(1), m.group(1)) if m else None
        clean = re.sub(r"^\s*\[request id: [^\]]*\]\s*", "", msg)
        for triton_name, openai_name in _PARAM_NAMES.items():
            clean = clean.replace(triton_name, openai_name)
        return APIError(400, clean.strip(), param, "invalid_value")
    if _NOT_READY.search(msg) and "UNAVAILABLE" not in status:
        return APIError(503, f"Model {model!r} is not loaded in Triton right now; retry later.", None, "model_not_ready",
                        retry_after=5.0)
    if "UNAVAILABLE" in status or _UNREACHABLE.search(msg) or "DEADLINE_EXCEEDED" in status:
        return triton_unavailable()
    if "CANCELLED" in status:
        return APIError(499, "request cancelled", None, "cancelled")
    return APIError(500, "The server had an error while processing your request.", None, "internal_error")


def triton_unavailable() -> APIError:
    return APIError(503, "The inference server (Triton) is not reachable right now; retry later.", None,
                    "triton_unavailable", retry_after=RETRY_AFTER_DOWN_S)


def unreachable(err: InferenceServerException) -> bool:
    """The call itself failed with gRPC UNAVAILABLE (no connection, the socket closed): Triton
    is not there. A model's own errors come in-band without a status, and a model that is not
    loaded is named in the message; neither marks all of Triton down."""
    return "UNAVAILABLE" in str(err.status() or "") and not _NOT_READY.search(err.message() or "")


def health_answer(result, error: InferenceServerException | None) -> bool:
    """A generation model is healthy when it answers the HEALTH probe with its health finish
    reason; an error (UNAVAILABLE: its engine is broken) or any other answer is not."""
    return error is None and result is not None and parse_chunk(result).finish_reason == HEALTH_FINISH_REASON


def channel_args() -> list[tuple[str, int]]:
    """tritonclient's own channel defaults, plus a reconnect backoff capped at 1 s: gRPC's
    default grows to 2 minutes, so after a long outage the channel would find the restarted
    Triton only long after it is up."""
    keep = KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keep.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keep.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keep.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keep.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


def rpc_exception(err: grpc.RpcError) -> InferenceServerException:
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    return InferenceServerException(msg=details or str(err), status=str(code) if code else None)


def _input(name: str, value: Any) -> InferInput:
    dtype, dims = GEN_INPUTS[name]
    if dims == [-1]:
        arr = np.array([v.encode("utf-8") if dtype == "bytes" else v for v in value], dtype=_NUMPY_TYPES[dtype])
    else:
        v = value.encode("utf-8") if dtype == "bytes" else value
        arr = np.array([v], dtype=_NUMPY_TYPES[dtype])
    if arr.size == 0:
        return None
    inp = InferInput(name, list(arr.shape), _TRITON_TYPES[dtype])
    inp.set_data_from_numpy(arr)
    return inp


def generation_inputs(values: dict[str, Any]) -> list[InferInput]:
    unknown = set(values) - set(GEN_INPUTS)
    if unknown:
        raise KeyError(f"not generation inputs: {sorted(unknown)}")
    return [i for i in (_input(k, v) for k, v in values.items()) if i is not None]


def _scalar(result, name: str):
    arr = result.as_numpy(name)
    if arr is None or arr.size == 0:
        return None
    v = arr.reshape(-1)[0]
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def parse_chunk(result) -> Chunk:
    reason = _scalar(result, tensors.FINISH_REASON)
    return Chunk(
        text=_scalar(result, tensors.TEXT_OUTPUT) or "",
        finish_reason=reason or None,
        prompt_tokens=int(_scalar(result, tensors.PROMPT_TOKENS) or 0),
        completion_tokens=int(_scalar(result, tensors.COMPLETION_TOKENS) or 0),
    )


async def _drain(call, timeout: float = 5.0) -> None:
    """Let a finished stream end on its own (our side already half-closed): cancelling it
    after the final response leaves Triton holding the model's stream state, and at
    shutdown it then waits for a "live" model until it is killed."""
    try:
        await asyncio.wait_for(call.__anext__(), timeout)
    except StopAsyncIteration:
        return
    except Exception:
        pass
    call.cancel()


class TritonBackend:
    def __init__(self, url: str, timeout_s: float = 600.0, probe_interval_s: float = PROBE_INTERVAL_S,
                 expected_id: str | None = None):
        self.url, self.timeout_s, self.probe_interval_s = url, timeout_s, probe_interval_s
        self.expected_id = expected_id  # the name our Triton gives (`--id`); None: any server on the address
        self._stranger_seen: str | None = None  # the last other name that answered (logged once per name)
        self._client: grpcaio.InferenceServerClient | None = None
        self.down_since: float | None = None  # monotonic time a call first found Triton unreachable
        self._probe: asyncio.Task | None = None
        self._generators: dict[str, bool] = {}  # model -> takes the HEALTH input (from its metadata)

    @property
    def client(self) -> grpcaio.InferenceServerClient:
        if self._client is None:  # made inside the running event loop (grpc.aio binds to it)
            self._client = grpcaio.InferenceServerClient(self.url, channel_args=channel_args())
        return self._client

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    # ------------------------------------------------------------------------- Triton up or down
    @property
    def up(self) -> bool:
        return self.down_since is None

    def _refuse_if_down(self) -> None:
        """While Triton is down every request is answered 503 at once; the probe ends it."""
        if self.down_since is not None:
            self._start_probe()
            raise triton_unavailable()

    def _failed(self, err: InferenceServerException, model: str) -> APIError:
        if unreachable(err):
            self._mark_down()
        return map_error(err, model)

    def _mark_down(self) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("Triton at %s is unreachable: answering 503 until it is back", self.url)
        self._start_probe()

    def _mark_up(self) -> None:
        if self.down_since is not None:
            log.warning("Triton at %s is back after %.1fs", self.url, time.monotonic() - self.down_since)
            self.down_since = None

    def _start_probe(self) -> None:
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_up())

    async def _ours(self) -> bool:
        """Whether the server on the address is the Triton this gateway was given (its id);
        True when no id was given. Raises what the call raises."""
        if self.expected_id is None:
            return True
        name = (await self.client.get_server_metadata(client_timeout=CHECK_TIMEOUT_S)).name
        if name != self.expected_id and name != self._stranger_seen:
            log.warning("the server at %s calls itself %r, not %r: not ready until ours answers there",
                        self.url, name, self.expected_id)
            self._stranger_seen = name
        return name == self.expected_id

    async def _probe_until_up(self) -> None:
        while self.down_since is not None:
            try:
                if await self.client.is_server_ready(client_timeout=CHECK_TIMEOUT_S) and await self._ours():
                    self._mark_up()
                    return
            except Exception:
                pass
            await asyncio.sleep(self.probe_interval_s)

    # ------------------------------------------------------------------------- readiness
    async def ready(self, models: list[str]) -> tuple[bool, dict[str, bool]]:
        """(Triton ready, {model: ready}); never raises. A generation model is ready only
        when it answers the HEALTH probe itself."""
        try:
            server = bool(await self.client.is_server_ready(client_timeout=CHECK_TIMEOUT_S)) and await self._ours()
        except InferenceServerException as err:
            if unreachable(err):
                self._mark_down()
            return False, {m: False for m in models}
        except Exception:
            return False, {m: False for m in models}
        if server:
            self._mark_up()
        return server, {m: await self._model_ready(m) for m in models}

    async def _model_ready(self, model: str) -> bool:
        try:
            if not await self.client.is_model_ready(model, client_timeout=CHECK_TIMEOUT_S):
                return False
            if model not in self._generators:
                meta = await self.client.get_model_metadata(model, client_timeout=CHECK_TIMEOUT_S)
                self._generators[model] = any(i.name == HEALTH for i in meta.inputs)
        except Exception:
            return False
        return await self.health(model) if self._generators[model] else True

    async def cache_counts(self, model: str) -> tuple[int, int] | None:
        """(hits, misses) of Triton's response cache for ``model``, from its statistics since
        Triton started; None when Triton does not answer."""
        if not self.up:
            return None
        try:
            stats = await self.client.get_inference_statistics(model, client_timeout=CHECK_TIMEOUT_S)
        except Exception:
            return None
        s = stats.model_stats[0].inference_stats if stats.model_stats else None
        return (int(s.cache_hit.count), int(s.cache_miss.count)) if s is not None else None

    async def health(self, model: str) -> bool:
        """Ask a generation model whether its engine works: one HEALTH request on a short
        stream; it answers at once, without generating."""
        inputs = generation_inputs({HEALTH: True})

        async def requests():
            yield {"model_name": model, "inputs": inputs, "outputs": [InferRequestedOutput(n) for n in GEN_OUTPUTS]}

        call = None
        try:
            call = self.client.stream_infer(requests(), stream_timeout=CHECK_TIMEOUT_S)
            result, error = await call.__anext__()
        except Exception:
            if call is not None:
                call.cancel()
            return False
        healthy = health_answer(result, error)
        if healthy:
            await _drain(call, CHECK_TIMEOUT_S)
        else:
            call.cancel()
            log.warning("generation model %s failed its health probe: %s", model,
                        error.message() if error is not None else parse_chunk(result))
        return healthy

    # ------------------------------------------------------------------------- requests
    async def embed(self, model: str, texts: list[str], max_batch: int, request_id: str = "") -> np.ndarray:
        """Pooled embeddings [N, D]; inputs beyond the model's batch size go as several requests."""
        self._refuse_if_down()

        async def one(part: list[str]) -> np.ndarray:
            data = np.array([t.encode("utf-8") for t in part], dtype=np.object_).reshape(-1, 1)
            inp = InferInput(TEXT, list(data.shape), "BYTES")
            inp.set_data_from_numpy(data)
            try:
                res = await self.client.infer(model, [inp], outputs=[InferRequestedOutput(EMBEDDING)],
                                              request_id=request_id, client_timeout=self.timeout_s)
            except InferenceServerException as err:
                raise self._failed(err, model) from err
            except grpc.RpcError as err:
                raise self._failed(rpc_exception(err), model) from err
            return res.as_numpy(EMBEDDING)

        parts = [texts[i:i + max_batch] for i in range(0, len(texts), max_batch)]
        if len(parts) == 1:
            return await one(parts[0])
        return np.concatenate(await asyncio.gather(*(one(p) for p in parts)))

    async def generate(self, model: str, values: dict[str, Any], request_id: str = "") -> AsyncIterator[Chunk]:
        """Stream a generation's chunks. Leaving the loop early (the client went away, an error)
        cancels the Triton request."""
        self._refuse_if_down()
        inputs = generation_inputs(values)

        async def requests():
            yield {"model_name": model, "inputs": inputs, "request_id": request_id,
                   "outputs": [InferRequestedOutput(n) for n in GEN_OUTPUTS]}

        try:
            call = self.client.stream_infer(requests(), stream_timeout=self.timeout_s)
        except InferenceServerException as err:
            raise self._failed(err, model) from err
        finished = False
        try:
            async for result, error in call:
                if error is not None:
                    # the model's error is its last response (a full queue, a bad input): let the
                    # stream end on its own. Cancelling it now races Triton 2.51's own completion of
                    # the request, which crashes the server (SIGSEGV) under a flood of refusals.
                    finished = True
                    await _drain(call)
                    raise map_error(error, model)
                chunk = parse_chunk(result)
                if chunk.final:
                    finished = True
                    await _drain(call)  # before handing it on: a consumer may never close us
                yield chunk
                if finished:
                    break
        except InferenceServerException as err:
            raise self._failed(err, model) from err
        except grpc.RpcError as err:
            raise self._failed(rpc_exception(err), model) from err
        finally:
            if not finished:  # the client went away, or the call failed: Triton sees the cancellation and stops
                call.cancel()
                log.info("generation %s on %s: closed before its end; Triton request cancelled", request_id, model)
        if not finished:
            log.error("generation %s on %s: the stream ended without a final response", request_id, model)
            raise APIError(500, "The server had an error while processing your request.", None, "internal_error")
