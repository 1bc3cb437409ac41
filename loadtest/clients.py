"""Layer 1: client wrappers that time each call and fire Locust's `events.request`.

Triton's "queue full" answer is load shedding, not a broken server: it is reported as a
`Rejected` failure so the report can count it apart from other failures.
"""

from __future__ import annotations

import http.client
import json
import time
from typing import Callable

import numpy as np

# gRPC must be told about gevent before any channel exists (Locust runs on gevent).
import grpc.experimental.gevent as _grpc_gevent

_grpc_gevent.init_gevent()

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402


class Rejected(Exception):
    """Triton shed the request: its bounded queue was full."""


class ClientSaturated(Exception):
    """Open-loop client: too many requests outstanding; the offered rate was not sent."""


def classify(err: Exception) -> Exception:
    msg = str(err)
    if "maximum queue size" in msg or "Exceeds maximum queue" in msg:
        return Rejected(msg.strip()[:200])
    return err


class _Timed:
    request_type = "triton"

    def __init__(self, fire: Callable[..., None]):
        self._fire = fire

    def _timed(self, name: str, call: Callable[[], object], length: Callable[[object], int]):
        start = time.perf_counter()
        exception, result, size = None, None, 0
        try:
            result = call()
            size = length(result)
        except Exception as err:  # reported to Locust, never raised into the user
            exception = classify(err)
        self._fire(
            request_type=self.request_type,
            name=name,
            response_time=(time.perf_counter() - start) * 1000,
            response_length=size,
            exception=exception,
            context={},
        )
        return result


def _text_array(texts: list[str]) -> np.ndarray:
    return np.array([t.encode("utf-8") for t in texts], dtype=object).reshape(-1, 1)


class TritonGrpcClient(_Timed):
    request_type = "grpc"

    def __init__(self, fire, url: str, model: str, output: str):
        super().__init__(fire)
        self.client = grpcclient.InferenceServerClient(url)
        self.model, self.output = model, output
        self._outputs = [grpcclient.InferRequestedOutput(output)]

    def infer_texts(self, texts: list[str]):
        def call():
            data = _text_array(texts)
            inp = grpcclient.InferInput("text", list(data.shape), "BYTES")
            inp.set_data_from_numpy(data)
            return self.client.infer(self.model, [inp], outputs=self._outputs).as_numpy(self.output)

        return self._timed(self.model, call, lambda r: int(r.nbytes))

    def close(self):
        self.client.close()


class TritonHttpClient(_Timed):
    request_type = "http"

    def __init__(self, fire, url: str, model: str, output: str, concurrency: int = 1):
        super().__init__(fire)
        self.client = httpclient.InferenceServerClient(url, concurrency=concurrency, network_timeout=120.0)
        self.model, self.output = model, output
        self._outputs = [httpclient.InferRequestedOutput(output, binary_data=True)]

    def infer_texts(self, texts: list[str]):
        def call():
            data = _text_array(texts)
            inp = httpclient.InferInput("text", list(data.shape), "BYTES")
            inp.set_data_from_numpy(data, binary_data=True)
            return self.client.infer(self.model, [inp], outputs=self._outputs).as_numpy(self.output)

        return self._timed(self.model, call, lambda r: int(r.nbytes))

    def close(self):
        self.client.close()


class TritonStreamClient:
    """Triton's `generate_stream` (server-sent events) for decoupled generation models.

    Reports separate entries: "<model> TTFT" (ms to the first chunk), "<model> inter-token"
    (ms between chunks), "<model> tokens/s" (its response_time field carries tokens/s, not
    ms) and "<model>" (the whole stream, response_length = chunks).
    """

    request_type = "stream"

    def __init__(self, fire, url: str, model: str, text_field: str = "text_input", output_field: str = "text_output"):
        host, _, port = url.partition(":")
        self._fire, self.host, self.port = fire, host, int(port or 80)
        self.model, self.text_field, self.output_field = model, text_field, output_field

    def _event(self, name: str, value: float, exception: Exception | None = None, length: int = 0):
        self._fire(request_type=self.request_type, name=name, response_time=value, response_length=length,
                   exception=exception, context={})

    def generate(self, prompt: str, **parameters) -> str:
        body = json.dumps({self.text_field: prompt, **parameters}).encode()
        start = time.perf_counter()
        chunks, first, last, text, exception = 0, start, start, [], None
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            conn.request("POST", f"/v2/models/{self.model}/generate_stream", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300].decode(errors='replace')}")
            for raw in resp:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    raise classify(RuntimeError(event["error"]))
                now = time.perf_counter()
                if chunks == 0:
                    first = now
                    self._event(f"{self.model} TTFT", (now - start) * 1000)
                else:
                    self._event(f"{self.model} inter-token", (now - last) * 1000)
                chunks, last = chunks + 1, now
                text.append(str(event.get(self.output_field, "")))
        except Exception as err:
            exception = err
        finally:
            conn.close()
        total = time.perf_counter() - start
        if exception is None and chunks > 1:
            self._event(f"{self.model} tokens/s", (chunks - 1) / max(last - first, 1e-9))
        self._event(self.model, total * 1000, exception, chunks)
        return "".join(text)
