"""loadtest.clients' OpenAI parts without a server: the decode-rate figure, the sorting of
the `openai` library's exceptions (load shed vs broken), and the events the client fires
for a chat stream and an embeddings call answered by a mock transport.

Only loadtest.clients and loadtest.gate are imported here: importing Locust (users,
runner) would monkey-patch this test process with gevent.
"""

from __future__ import annotations

import json

import httpx2
import openai
import pytest

from loadtest import gate
from loadtest.clients import (
    OpenAIClient,
    Rejected,
    classify,
    gateway_base_url,
    tokens_per_second,
)

URL = "http://gw.test/v1/chat/completions"


def status_error(status: int, code: str | None, message: str = "nope") -> openai.APIStatusError:
    """Built the way the library builds it: from an httpx response and the envelope's `error`."""
    body = {"error": {"message": message, "type": "rate_limit_error", "param": None, "code": code}}
    response = httpx2.Response(status, json=body, request=httpx2.Request("POST", URL))
    return openai.OpenAI(api_key="x", base_url="http://gw.test/v1")._make_status_error(
        f"Error code: {status} - {body}", body=body, response=response)


# ----------------------------------------------------------------------------- pure figures
def test_tokens_per_second_counts_tokens_after_the_first_over_first_to_last():
    assert tokens_per_second(11, first=1.0, last=1.5) == pytest.approx(20.0)


@pytest.mark.parametrize("tokens, first, last", [(1, 1.0, 2.0), (0, None, None), (5, 1.0, 1.0), (5, None, 2.0)])
def test_tokens_per_second_is_none_when_nothing_can_be_measured(tokens, first, last):
    assert tokens_per_second(tokens, first, last) is None


@pytest.mark.parametrize("url", ["127.0.0.1:9000", "http://127.0.0.1:9000", "http://127.0.0.1:9000/", "http://127.0.0.1:9000/v1"])
def test_gateway_url_forms_give_one_base_url(url):
    assert gateway_base_url(url) == "http://127.0.0.1:9000/v1"


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("code", ["queue_full", "rate_limit_exceeded"])
def test_gateway_429s_for_load_are_rejections(code):
    err = status_error(429, code, "Model 'm' is at capacity (its queue is full); retry shortly.")
    assert isinstance(err, openai.RateLimitError) and err.code == code
    got = classify(err)
    assert isinstance(got, Rejected)
    assert str(got).startswith(f"{code} (HTTP 429): Model 'm' is at capacity")
    assert gate.count_rejections({f"m: {got!r}": 3}) == 3  # the report counts it apart


def test_other_openai_errors_stay_what_they_are():
    quota = status_error(429, "insufficient_quota")
    bad = status_error(400, "context_length_exceeded")
    down = status_error(503, "triton_unavailable")
    conn = openai.APIConnectionError(request=httpx2.Request("POST", URL))
    for err in (quota, bad, down, conn):
        assert classify(err) is err
    assert isinstance(bad, openai.BadRequestError) and isinstance(down, openai.InternalServerError)
    assert gate.count_rejections({f"m: {bad!r}": 1, f"m: {conn!r}": 1}) == 0


def test_queue_full_sent_in_band_mid_stream_is_a_rejection():
    err = openai.APIError("at capacity", httpx2.Request("POST", URL), body={"message": "at capacity", "code": "queue_full"})
    assert isinstance(classify(err), Rejected) and "HTTP" not in str(classify(err))


def test_triton_queue_full_is_still_a_rejection():
    assert isinstance(classify(RuntimeError("Exceeds maximum queue size")), Rejected)


# ----------------------------------------------------------------------------- the client against a mock gateway
def sse(*events) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


def chunk(delta: dict | None, reason: str | None = None, usage: dict | None = None) -> dict:
    return {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": reason}],
            "usage": usage}


USAGE = {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}


def client_answering(handler) -> tuple[OpenAIClient, list[dict], list[dict]]:
    events, bodies = [], []

    def record(request: httpx2.Request) -> httpx2.Response:
        assert request.headers["authorization"] == "Bearer k"
        bodies.append(json.loads(request.content))
        return handler(request)

    http = httpx2.Client(transport=httpx2.MockTransport(record))
    return OpenAIClient(lambda **kw: events.append(kw), "gw.test", "m", api_key="k", http_client=http), events, bodies


def stream_of(*events):
    return lambda request: httpx2.Response(200, content=sse(*events), headers={"content-type": "text/event-stream"})


def test_chat_stream_fires_ttft_inter_token_rate_and_the_whole_request():
    client, events, bodies = client_answering(stream_of(
        chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), chunk({"content": ""}),
        chunk({"content": "lo"}), chunk({"content": "!"}), chunk({}, "stop"), chunk(None, usage=USAGE), b"[DONE]"))
    assert client.chat("Say hello", max_tokens=8) == "Hello!"
    assert bodies[0]["stream"] is True and bodies[0]["stream_options"] == {"include_usage": True}
    assert bodies[0]["max_tokens"] == 8 and bodies[0]["messages"] == [{"role": "user", "content": "Say hello"}]
    names = [e["name"] for e in events]
    # the role chunk and an empty delta are no tokens: TTFT is the first content
    assert names == ["m TTFT", "m inter-token", "m inter-token", "m tokens/s", "m"]
    assert all(e["request_type"] == "openai" and e["exception"] is None for e in events)
    assert events[-1]["response_length"] == 5  # completion tokens from the usage chunk, not content chunks
    assert events[-1]["response_time"] >= events[0]["response_time"] > 0


def test_chat_without_usage_counts_content_chunks():
    client, events, _ = client_answering(stream_of(chunk({"content": "a"}), chunk({"content": "b"}), chunk({}, "length"), b"[DONE]"))
    client.chat([{"role": "user", "content": "x"}], max_tokens=2)
    assert events[-1]["name"] == "m" and events[-1]["response_length"] == 2


def test_chat_stream_cut_off_before_its_end_is_a_failure():
    client, events, _ = client_answering(stream_of(chunk({"content": "a"}), chunk({"content": "b"})))
    client.chat("x", max_tokens=4)
    assert [e["name"] for e in events] == ["m TTFT", "m inter-token", "m"]
    assert "without a finish_reason" in str(events[-1]["exception"])


def test_chat_refused_with_queue_full_is_one_rejected_request_without_stream_figures():
    body = {"error": {"message": "Model 'm' is at capacity (its queue is full); retry shortly.", "type": "rate_limit_error",
                      "param": None, "code": "queue_full"}}
    client, events, _ = client_answering(lambda request: httpx2.Response(429, json=body))
    assert client.chat("x", max_tokens=4) == ""
    assert [e["name"] for e in events] == ["m"]
    assert isinstance(events[0]["exception"], Rejected) and events[0]["response_length"] == 0


def test_chat_error_in_band_after_the_first_token_fails_the_request():
    err = {"error": {"message": "The server had an error while processing your request.", "type": "server_error",
                     "param": None, "code": "internal_error"}}
    client, events, _ = client_answering(stream_of(chunk({"content": "a"}), chunk({"content": "b"}), err, b"[DONE]"))
    client.chat("x", max_tokens=4)
    assert [e["name"] for e in events] == ["m TTFT", "m inter-token", "m"]  # no decode rate for a broken stream
    assert isinstance(events[-1]["exception"], openai.APIError) and events[-1]["exception"].code == "internal_error"


def test_bad_request_is_a_failure_not_a_rejection():
    body = {"error": {"message": "messages: 600 tokens leave no room", "type": "invalid_request_error",
                      "param": "messages", "code": "context_length_exceeded"}}
    client, events, _ = client_answering(lambda request: httpx2.Response(400, json=body))
    client.chat("x", max_tokens=4)
    assert isinstance(events[-1]["exception"], openai.BadRequestError)


def embeddings(n: int, dim: int = 3) -> dict:
    return {"object": "list", "model": "m", "usage": {"prompt_tokens": 4, "total_tokens": 4},
            "data": [{"object": "embedding", "index": i, "embedding": [0.5] * dim} for i in range(n)]}


def test_embed_fires_one_request_sized_in_float32_bytes():
    client, events, bodies = client_answering(lambda request: httpx2.Response(200, json=embeddings(2)))
    assert len(client.embed(["a", "b"]).data) == 2
    assert bodies[0]["input"] == ["a", "b"] and bodies[0]["model"] == "m"
    assert [(e["name"], e["request_type"], e["response_length"], e["exception"]) for e in events] == [("m", "openai", 24, None)]


def test_embed_with_a_missing_vector_is_a_failure():
    client, events, _ = client_answering(lambda request: httpx2.Response(200, json=embeddings(1)))
    client.embed(["a", "b"])
    assert "asked for 2 embeddings, got 1" in str(events[0]["exception"])
