"""Layer 1: client wrappers that time each call and fire Locust's `events.request`.

Triton's "queue full" answer is load shedding, not a broken server: it is reported as a
`Rejected` failure so the report can count it apart from other failures. Through the
OpenAI gateway the same answer is a 429 with code "queue_full" (and a per-key limit a 429
with code "rate_limit_exceeded"): both are `Rejected` too.
"""

from __future__ import annotations

import http.client
import json
import time
from typing import Callable

# gRPC must be told about gevent before any channel exists (Locust runs on gevent).
import grpc.experimental.gevent as _grpc_gevent
import numpy as np

_grpc_gevent.init_gevent()

import openai  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402

from kiln_runtime.contract import TEXT, TEXT_INPUT, TEXT_OUTPUT  # noqa: E402


class Rejected(Exception):
    """The server shed the request: a bounded queue was full (or, through the gateway, a
    per-key rate limit refused it)."""


class ClientSaturated(Exception):
    """Open-loop client: too many requests outstanding; the offered rate was not sent."""


# the gateway's error codes (OpenAI envelope) that mean "refused under load", not "broken"
SHED_CODES = ("queue_full", "rate_limit_exceeded")


def classify(err: Exception) -> Exception:
    if isinstance(err, openai.APIError):  # HTTP status errors and errors sent in-band in a stream
        if err.code in SHED_CODES:
            body = err.body if isinstance(err.body, dict) else {}
            status = getattr(err, "status_code", None)
            where = f" (HTTP {status})" if status else ""
            return Rejected(f"{err.code}{where}: {str(body.get('message') or err.message).strip()[:200]}")
        return err
    msg = str(err)
    if "maximum queue size" in msg or "Exceeds maximum queue" in msg:
        return Rejected(msg.strip()[:200])
    return err


def close_once(wrapper) -> None:
    """Close a wrapper's client now, once, and let go of it: a tritonclient gRPC client left to
    ``__del__`` at interpreter exit can hang there (grpc's channel close under gevent), so kiln
    never leaves one to the garbage collector."""
    client = wrapper.__dict__.pop("client", None)
    if client is not None:
        client.close()


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
            inp = grpcclient.InferInput(TEXT, list(data.shape), "BYTES")
            inp.set_data_from_numpy(data)
            return self.client.infer(self.model, [inp], outputs=self._outputs).as_numpy(self.output)

        return self._timed(self.model, call, lambda r: int(r.nbytes))

    def close(self):
        close_once(self)


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
            inp = httpclient.InferInput(TEXT, list(data.shape), "BYTES")
            inp.set_data_from_numpy(data, binary_data=True)
            return self.client.infer(self.model, [inp], outputs=self._outputs).as_numpy(self.output)

        return self._timed(self.model, call, lambda r: int(r.nbytes))

    def close(self):
        close_once(self)


class TritonStreamClient:
    """Triton's `generate_stream` (server-sent events) for decoupled generation models.

    Reports separate entries: "<model> TTFT" (ms to the first chunk), "<model> inter-token"
    (ms between chunks), "<model> tokens/s" (its response_time field carries tokens/s, not
    ms) and "<model>" (the whole stream, response_length = chunks).
    """

    request_type = "stream"

    def __init__(self, fire, url: str, model: str, text_field: str = TEXT_INPUT, output_field: str = TEXT_OUTPUT):
        host, _, port = url.partition(":")
        self._fire, self.host, self.port = fire, host, int(port or 80)
        self.model, self.text_field, self.output_field = model, text_field, output_field

    def _event(self, name: str, value: float, exception: Exception | None = None, length: int = 0):
        self._fire(request_type=self.request_type, name=name, response_time=value, response_length=length,
                   exception=exception, context={})

    def close(self):
        """Nothing stays open between streams (each has its own connection)."""

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


def tokens_per_second(completion_tokens: int, first: float | None, last: float | None) -> float | None:
    """Decode rate of one stream: the tokens after the first one over the time from the
    first content to the last. None when it cannot be measured (under two tokens, or all
    content arrived at once)."""
    if first is None or last is None or completion_tokens < 2 or last <= first:
        return None
    return (completion_tokens - 1) / (last - first)


def gateway_base_url(url: str) -> str:
    """host:port (or a full http(s) URL, with or without /v1) -> the OpenAI base URL."""
    base = url if "://" in url else f"http://{url}"
    base = base.rstrip("/")
    return base if base.endswith("/v1") else f"{base}/v1"


class OpenAIClient(_Timed):
    """The OpenAI-compatible gateway through the official `openai` client (sync httpx
    under gevent's monkey patching, so concurrent users do not block each other).

    Chat streams report what the Triton stream client does: "<model> TTFT" (ms to the
    first content delta), "<model> inter-token" (ms between content deltas), "<model>
    tokens/s" (its response_time field carries tokens/s: completion tokens from the final
    usage chunk, minus one, over the time from the first content to the last) and
    "<model>" (the whole stream; response_length = completion tokens). Embeddings report
    "<model>" (response_length = bytes of float32 vectors received).
    """

    request_type = "openai"

    def __init__(self, fire, url: str, model: str, api_key: str = "none", timeout: float = 120.0, http_client=None):
        super().__init__(fire)
        self.model = model
        # no retries: a refused request is a figure of the run, not something to hide
        self.client = openai.OpenAI(base_url=gateway_base_url(url), api_key=api_key, max_retries=0, timeout=timeout,
                                    http_client=http_client)

    def _event(self, name: str, value: float, exception: Exception | None = None, length: int = 0):
        self._fire(request_type=self.request_type, name=name, response_time=value, response_length=length,
                   exception=exception, context={})

    def chat(self, prompt: str | list[dict], max_tokens: int) -> str:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        start = time.perf_counter()
        first = last = finish = None
        deltas, usage, text, exception = 0, None, [], None
        try:
            stream = self.client.chat.completions.create(
                model=self.model, messages=messages, max_tokens=max_tokens, stream=True,
                stream_options={"include_usage": True})
            with stream:
                for chunk in stream:
                    if chunk.usage is not None:
                        usage = chunk.usage.completion_tokens
                    choice = chunk.choices[0] if chunk.choices else None
                    finish = finish or (choice.finish_reason if choice else None)
                    content = choice.delta.content if choice else None
                    if not content:  # the role chunk, the finish chunk, held-back partial characters
                        continue
                    now = time.perf_counter()
                    if first is None:
                        first = now
                        self._event(f"{self.model} TTFT", (now - start) * 1000)
                    else:
                        self._event(f"{self.model} inter-token", (now - last) * 1000)
                    deltas, last = deltas + 1, now
                    text.append(content)
            if finish is None:  # cut off: an answer without its end is no answer
                raise RuntimeError(f"the stream ended after {deltas} content chunks without a finish_reason")
        except Exception as err:  # reported to Locust, never raised into the user
            exception = classify(err)
        tokens = usage if usage is not None else deltas
        rate = tokens_per_second(tokens, first, last) if exception is None else None
        if rate is not None:
            self._event(f"{self.model} tokens/s", rate)
        self._event(self.model, (time.perf_counter() - start) * 1000, exception, tokens)
        return "".join(text)

    def embed(self, texts: list[str]):
        def call():
            r = self.client.embeddings.create(model=self.model, input=texts)
            if len(r.data) != len(texts):
                raise RuntimeError(f"asked for {len(texts)} embeddings, got {len(r.data)}")
            return r

        return self._timed(self.model, call, lambda r: sum(4 * len(d.embedding) for d in r.data))

    def close(self):
        close_once(self)
