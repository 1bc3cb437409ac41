"""The gateway's edges under load and faults, against a fake Triton: requests beyond the
in-flight cap are turned away at once with 503 and Retry-After; a route's deadline ends a
request with 504 and cancels its Triton request; a client that leaves before the first
token cancels it too (and still pays its reservation)."""

from __future__ import annotations

import asyncio
import json

import orjson
import pytest

from kiln.gateway.app import build_app
from kiln.gateway.config import GatewayConfig

KEY = "sk-test-http"
CHAT = {"model": "lm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}


async def asgi(app, method: str, path: str, body: dict | None = None, leave_when=None) -> tuple[int, dict, bytes]:
    """One request straight through the ASGI app (TestClient cannot leave early).
    ``leave_when``: a condition after which the client disconnects; until then, and without
    it, it stays connected until its answer is complete."""
    raw = json.dumps(body).encode() if body is not None else b""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
                         (b"authorization", f"Bearer {KEY}".encode())],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 9000)}
    sent_body, answered = False, asyncio.Event()
    status, headers, parts = 0, {}, []

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": raw, "more_body": False}
        while not answered.is_set() and not (leave_when is not None and leave_when()):
            await asyncio.sleep(0.001)
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status, headers = message["status"], {k.decode(): v.decode() for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                answered.set()

    await app(scope, receive, send)
    return status, headers, b"".join(parts)


def app_for(make_repository, triton, monkeypatch, _reuse: bool = False, **config):
    """The app on repositories "lm" and "emb" (``_reuse``: the ones an earlier call made)."""
    monkeypatch.setenv("KILN_TEST_HTTP_KEYS", KEY)
    repos = [make_repository("lm", "text-generation"), make_repository("emb", "feature-extraction")] if not _reuse \
        else app_for.repos
    app_for.repos = repos
    return build_app(GatewayConfig(repositories=repos, keys_env="KILN_TEST_HTTP_KEYS", **config), backend=triton)


def test_over_the_in_flight_cap_is_503_with_retry_after_and_health_stays_up(make_repository, triton, monkeypatch):
    app = app_for(make_repository, triton, monkeypatch, max_in_flight=2)
    triton.hang_before_first = True

    async def scenario():
        release = asyncio.Event()
        held = [asyncio.ensure_future(asgi(app, "POST", "/v1/chat/completions", CHAT, leave_when=release.is_set))
                for _ in range(2)]
        while triton.waiting < 2:
            await asyncio.sleep(0.001)
        refused = await asgi(app, "POST", "/v1/embeddings", {"model": "emb", "input": "hello"})
        health = await asgi(app, "GET", "/health")
        release.set()  # the two held clients leave
        await asyncio.gather(*held)
        triton.hang_before_first = False
        after = await asgi(app, "POST", "/v1/embeddings", {"model": "emb", "input": "hello"})
        return refused, health, after

    (status, headers, body), health, after = asyncio.run(scenario())
    err = orjson.loads(body)["error"]
    assert status == 503 and headers["retry-after"] == "1" and err["code"] == "overloaded", body
    assert set(err) == {"message", "type", "param", "code"} and "2 requests" in err["message"]
    assert health[0] == 200
    assert after[0] == 200  # the two that left gave their places back
    assert triton.closed_early == 2  # and their Triton requests were cancelled


def test_an_encoder_past_its_queue_budget_sheds_before_the_body_is_read(make_repository, triton, monkeypatch):
    app = app_for(make_repository, triton, monkeypatch, embeddings_queue_s=0.5)
    gateway = app.state.gateway
    triton.hang_before_first = True
    floor = gateway.admission.limit("emb")  # nothing answered yet: the floor

    async def scenario():
        release = asyncio.Event()
        held = [asyncio.ensure_future(asgi(app, "POST", "/v1/embeddings", {"model": "emb", "input": "hello"},
                                           leave_when=release.is_set)) for _ in range(floor)]
        while triton.waiting < floor:
            await asyncio.sleep(0.001)
        refused = await asgi(app, "POST", "/v1/embeddings", {"model": "emb", "input": "hello"})
        chat = gateway.early_refusal("/v1/chat/completions")  # the generation model's own queue decides
        release.set()
        await asyncio.gather(*held)
        triton.hang_before_first = False
        after = await asgi(app, "POST", "/v1/embeddings", {"model": "emb", "input": "hello"})
        return refused, chat, after

    triton_hangs = triton.hang_before_first
    (status, headers, body), chat, after = asyncio.run(scenario())
    err = orjson.loads(body)["error"]
    assert triton_hangs and status == 503 and err["code"] == "overloaded", body
    assert chat is None
    assert "'emb'" in err["message"] and f"{floor} requests in flight" in err["message"]
    assert headers["retry-after"] == "1" and 1 <= int(headers["retry-after-ms"]) <= 5000  # OpenAI's client reads it
    assert b"kiln_gateway_shed_total{model=\"emb\"} 1.0" in gateway.metrics.render()
    assert after[0] == 200 and gateway.admission.in_flight("emb") == 0  # every place given back


def test_a_generation_model_full_of_work_is_refused_by_the_gateway_before_triton(make_repository, triton,
                                                                               monkeypatch):
    from kiln_core.card import RepositoryCard

    app = app_for(make_repository, triton, monkeypatch)
    lm = app.state.gateway.models["lm"].repository
    card = RepositoryCard.read(lm)
    card.model_copy(update={"spec": {"generation": {"max_concurrent": 1, "max_queue": 1}}}).write(lm)
    app = app_for(make_repository, triton, monkeypatch, _reuse=True)
    gateway = app.state.gateway
    triton.hang_before_first = True

    async def scenario():
        release = asyncio.Event()
        held = [asyncio.ensure_future(asgi(app, "POST", "/v1/chat/completions", CHAT, leave_when=release.is_set))
                for _ in range(2)]  # running + waiting: the model is full
        while triton.waiting < 2:
            await asyncio.sleep(0.001)
        sent = len(triton.received)
        refused = await asgi(app, "POST", "/v1/completions", {"model": "lm", "prompt": "hi", "max_tokens": 2})
        reached = len(triton.received) - sent
        release.set()
        await asyncio.gather(*held)
        triton.hang_before_first = False
        after = await asgi(app, "POST", "/v1/chat/completions", CHAT)
        return refused, reached, after

    (status, headers, body), reached, after = asyncio.run(scenario())
    err = orjson.loads(body)["error"]
    assert status == 503 and err["code"] == "overloaded" and "retry-after-ms" in headers, body
    assert reached == 0  # Triton never saw it
    assert after[0] == 200 and gateway.admission.in_flight("lm") == 0


@pytest.mark.parametrize("stream", [False, True])
def test_leaving_before_the_first_token_cancels_the_triton_request(make_repository, triton, monkeypatch, stream):
    app = app_for(make_repository, triton, monkeypatch, limits={"tpm": 120}, generation_deadline_s=30)
    triton.hang_before_first = True
    status, _, _ = asyncio.run(asgi(app, "POST", "/v1/chat/completions", CHAT | {"stream": stream},
                                    leave_when=lambda: triton.waiting > 0))
    assert status != 504  # it ended because the client left, not by the deadline
    assert triton.closed_early == 1 and triton.waiting == 0
    metrics = asyncio.run(asgi(app, "GET", "/metrics"))[2].decode()
    assert 'kiln_gateway_cancelled_generations_total{model="lm"} 1.0' in metrics
    triton.hang_before_first = False  # the client that left paid its 101 tokens: a second such request waits
    status, _, _ = asyncio.run(asgi(app, "POST", "/v1/chat/completions", CHAT))
    assert status == 429


@pytest.mark.parametrize("route, body, where", [
    ("/v1/chat/completions", CHAT, "before"),
    ("/v1/chat/completions", CHAT, "after"),
    ("/v1/embeddings", {"model": "emb", "input": "hello"}, "before"),
])
def test_past_its_deadline_a_request_is_504_and_cancelled(make_gateway, triton, route, body, where):
    client = make_gateway((KEY,), generation_deadline_s=0.2, embeddings_deadline_s=0.2)
    setattr(triton, f"hang_{where}_first", True)
    r = client.post(route, json=body)
    err = r.json()["error"]
    assert r.status_code == 504 and err["code"] == "deadline_exceeded" and "0.2 s" in err["message"], r.text
    assert triton.closed_early == 1 and triton.waiting == 0


def test_a_stream_past_its_deadline_ends_with_the_error_in_band(make_gateway, triton):
    client = make_gateway((KEY,), generation_deadline_s=0.2)
    triton.hang_after_first = True
    r = client.post("/v1/chat/completions", json=CHAT | {"stream": True})
    events = [line.removeprefix("data: ") for line in r.text.split("\n\n") if line]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "deadline_exceeded"
    assert json.loads(events[1])["choices"][0]["delta"] == {"content": "hi"}  # what came before the deadline
    assert triton.closed_early == 1 and triton.waiting == 0


def test_leaving_mid_stream_cancels_the_triton_request_and_pays(make_repository, triton, monkeypatch):
    app = app_for(make_repository, triton, monkeypatch, limits={"tpm": 120})
    triton.hang_after_first = True
    status, _, body = asyncio.run(asgi(app, "POST", "/v1/chat/completions", CHAT | {"stream": True},
                                       leave_when=lambda: triton.waiting > 0))
    assert status == 200 and b'"content":"hi"' in body and b"[DONE]" not in body
    assert triton.closed_early == 1 and triton.waiting == 0
    metrics = asyncio.run(asgi(app, "GET", "/metrics"))[2].decode()
    assert 'kiln_gateway_cancelled_generations_total{model="lm"} 1.0' in metrics
    triton.hang_after_first = False
    assert asyncio.run(asgi(app, "POST", "/v1/chat/completions", CHAT))[0] == 429  # its 101 tokens stay charged
