"""The gateway's one way to Triton: gRPC (asyncio), one channel shared by every request.

Embeddings go through unary ``ModelInfer`` on the public ensemble; generation goes
through a bidirectional ``ModelStreamInfer`` per request (the generation model is
decoupled). Closing a generation early cancels the gRPC call, which Triton turns into a
cancelled request that frees its slot in the running batch. Triton's errors are sorted
here into what the client must do (``map_error``): 400 fix the input, 429 retry later,
503 Triton or the model is not up, 500 a bug.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, AsyncIterator

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from kiln.gateway.protocol import APIError
from kiln_runtime import contract as tensors
from kiln_runtime.contract import EMBEDDING, GENERATION_INPUTS, GENERATION_OUTPUTS, TEXT

log = logging.getLogger("kiln.gateway")

# generation tensors: the contract the repository writer and the model read, so names and types never drift
_TRITON_TYPES = {"bytes": "BYTES", "int32": "INT32", "float32": "FP32", "uint64": "UINT64", "bool": "BOOL"}
_NUMPY_TYPES = {"bytes": np.object_, "int32": np.int32, "float32": np.float32, "uint64": np.uint64, "bool": np.bool_}
GEN_INPUTS = {t.name: (t.dtype, list(t.dims)) for t in GENERATION_INPUTS}
GEN_OUTPUTS = [t.name for t in GENERATION_OUTPUTS]

QUEUE_FULL = "Exceeds maximum queue size"  # Triton's phrase; the generation model uses it too
RETRY_AFTER_QUEUE_S = 1.0
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
        return APIError(503, "The inference server (Triton) is not reachable right now; retry later.", None,
                        "triton_unavailable", retry_after=5.0)
    if "CANCELLED" in status:
        return APIError(499, "request cancelled", None, "cancelled")
    return APIError(500, "The server had an error while processing your request.", None, "internal_error")


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
    import asyncio

    try:
        await asyncio.wait_for(call.__anext__(), timeout)
    except StopAsyncIteration:
        return
    except Exception:
        pass
    call.cancel()


class TritonBackend:
    def __init__(self, url: str, timeout_s: float = 600.0):
        self.url, self.timeout_s = url, timeout_s
        self._client: grpcaio.InferenceServerClient | None = None

    @property
    def client(self) -> grpcaio.InferenceServerClient:
        if self._client is None:  # made inside the running event loop (grpc.aio binds to it)
            self._client = grpcaio.InferenceServerClient(self.url)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def ready(self, models: list[str]) -> tuple[bool, dict[str, bool]]:
        """(Triton ready, {model: ready}); never raises."""
        try:
            server = await self.client.is_server_ready(client_timeout=2.0)
        except Exception:
            return False, {m: False for m in models}
        states = {}
        for m in models:
            try:
                states[m] = bool(await self.client.is_model_ready(m, client_timeout=2.0))
            except Exception:
                states[m] = False
        return bool(server), states

    async def embed(self, model: str, texts: list[str], max_batch: int, request_id: str = "") -> np.ndarray:
        """Pooled embeddings [N, D]; inputs beyond the model's batch size go as several requests."""
        import asyncio

        async def one(part: list[str]) -> np.ndarray:
            data = np.array([t.encode("utf-8") for t in part], dtype=np.object_).reshape(-1, 1)
            inp = InferInput(TEXT, list(data.shape), "BYTES")
            inp.set_data_from_numpy(data)
            try:
                res = await self.client.infer(model, [inp], outputs=[InferRequestedOutput(EMBEDDING)],
                                              request_id=request_id, client_timeout=self.timeout_s)
            except InferenceServerException as err:
                raise map_error(err, model) from err
            except grpc.RpcError as err:
                raise map_error(rpc_exception(err), model) from err
            return res.as_numpy(EMBEDDING)

        parts = [texts[i:i + max_batch] for i in range(0, len(texts), max_batch)]
        if len(parts) == 1:
            return await one(parts[0])
        return np.concatenate(await asyncio.gather(*(one(p) for p in parts)))

    async def generate(self, model: str, values: dict[str, Any], request_id: str = "") -> AsyncIterator[Chunk]:
        """Stream a generation's chunks. Leaving the loop early (the client went away, an error)
        cancels the Triton request."""
        inputs = generation_inputs(values)

        async def requests():
            yield {"model_name": model, "inputs": inputs, "request_id": request_id,
                   "outputs": [InferRequestedOutput(n) for n in GEN_OUTPUTS]}

        try:
            call = self.client.stream_infer(requests(), stream_timeout=self.timeout_s)
        except InferenceServerException as err:
            raise map_error(err, model) from err
        finished = False
        try:
            async for result, error in call:
                if error is not None:
                    raise map_error(error, model)
                chunk = parse_chunk(result)
                if chunk.final:
                    finished = True
                    await _drain(call)  # before handing it on: a consumer may never close us
                yield chunk
                if finished:
                    break
        except InferenceServerException as err:
            raise map_error(err, model) from err
        except grpc.RpcError as err:
            raise map_error(rpc_exception(err), model) from err
        finally:
            if not finished:  # the client went away, or an error: Triton sees the cancellation and stops
                call.cancel()
                log.info("generation %s on %s: closed before its end; Triton request cancelled", request_id, model)
        if not finished:
            log.error("generation %s on %s: the stream ended without a final response", request_id, model)
            raise APIError(500, "The server had an error while processing your request.", None, "internal_error")
