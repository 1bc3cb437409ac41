"""The endpoints against a fake Triton: a key's token budget is charged what a generation
really used; every way a request ends leaves the reservation settled (a refusal or a
failure before any output costs nothing, a client that leaves pays); a request that can
never fit a limit is a 400, one that only has to wait a 429; cheap checks come before
tokenization, which runs off the event loop."""

from __future__ import annotations

import asyncio

import pytest

from kiln.gateway.endpoints import INLINE_TOKENIZE_CHARS, generation_estimate
from kiln.gateway.protocol import APIError

KEY = "sk-test-endpoints"
TPM = 120  # the fake repository's context is 128 tokens
WHOLE_BUDGET = 100  # max_tokens of a request that reserves 101 of the 120 tokens: it fits only into a full bucket


@pytest.fixture
def gateway(make_gateway, triton):
    return make_gateway((KEY,), limits={"tpm": TPM}), triton


def complete(client, max_tokens: int, stream: bool = False, **kw):
    body = {"model": "lm", "prompt": "hello", "max_tokens": max_tokens, **kw}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return client.post("/v1/completions", json=body)


def budget_is_whole(client) -> bool:
    """Whether the key's whole token budget is free again (a request reserving nearly all of it is admitted)."""
    r = complete(client, WHOLE_BUDGET)
    assert r.status_code in (200, 429), r.text
    return r.status_code == 200


def test_generation_estimate_is_the_budget_and_a_rough_prompt_count():
    assert generation_estimate(10, 41) == 20
    assert generation_estimate(None, 3) == 256


@pytest.mark.parametrize("stream", [False, True])
def test_a_generation_is_charged_its_real_usage(gateway, stream):
    client, _ = gateway
    for _ in range(3):  # each reserves 101 of 120 tokens, then settles at 5
        r = complete(client, WHOLE_BUDGET, stream)
        assert r.status_code == 200, r.text
    assert '"total_tokens":5' in r.text.replace(" ", "")


def test_a_refusal_before_any_work_costs_no_tokens(gateway):
    client, triton = gateway
    triton.refuse = APIError(429, "Model 'lm' is at capacity (its queue is full); retry shortly.", None,
                             "queue_full", retry_after=1.0)
    r = complete(client, WHOLE_BUDGET)
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full" and r.headers["retry-after"] == "1"
    triton.refuse = None
    assert budget_is_whole(client)


def test_a_bug_before_the_first_token_costs_no_tokens(gateway):
    client, triton = gateway
    triton.refuse = RuntimeError("a bug in the path")  # not an APIError: a generic 500
    assert complete(client, WHOLE_BUDGET).status_code == 500
    triton.refuse = None
    assert budget_is_whole(client)


@pytest.mark.parametrize("stream", [False, True])
def test_a_failure_half_way_keeps_the_reservation(gateway, stream):
    client, triton = gateway
    triton.fail_mid = APIError(503, "The inference server (Triton) is not reachable right now; retry later.", None,
                               "triton_unavailable", retry_after=2.0)
    r = complete(client, WHOLE_BUDGET, stream)
    if stream:  # the stream had begun: the error comes in-band, then the end
        assert r.status_code == 200 and '"code":"triton_unavailable"' in r.text and r.text.endswith("data: [DONE]\n\n")
    else:
        assert r.status_code == 503 and r.headers["retry-after"] == "2"
    assert triton.closed_early == 1
    triton.fail_mid = None
    assert not budget_is_whole(client)


def test_over_the_token_budget_for_good_is_400_naming_the_field(gateway):
    client, _ = gateway
    r = complete(client, TPM)  # 121 tokens: more than the key ever has in a minute
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "max_tokens" and err["code"] == "request_too_large", err
    assert f"{TPM} tokens per minute" in err["message"]


def test_a_request_that_only_has_to_wait_is_429_with_retry_after(gateway):
    client, triton = gateway
    triton.completion_tokens = 200  # it used more than it reserved: the key is in debt
    assert complete(client, 10).status_code == 200
    r = complete(client, 10)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    metrics = client.get("/metrics").text
    assert 'kiln_gateway_rate_limited_total{limit="tokens"} 1.0' in metrics


def test_without_max_tokens_the_default_guess_does_not_make_it_unfittable(make_gateway):
    client = make_gateway((KEY,), limits={"tpm": 50})  # below the 256 tokens guessed when max_tokens is left out
    r = client.post("/v1/chat/completions", json={"model": "lm", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_budget_beyond_the_context_is_400_naming_the_field(make_gateway, field):
    client = make_gateway()
    r = client.post("/v1/chat/completions",
                    json={"model": "lm", "messages": [{"role": "user", "content": "hi"}], field: 128})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == field and err["code"] == "context_length_exceeded", err
    assert complete(client, 127).status_code == 200  # one prompt token and 127 more fit 128


def test_embeddings_over_the_token_budget_for_good_are_400(make_gateway):
    client = make_gateway((KEY,), limits={"tpm": 10})
    r = client.post("/v1/embeddings", json={"model": "emb", "input": "hello " * 20})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "input" and err["code"] == "request_too_large", err
    assert client.post("/v1/embeddings", json={"model": "emb", "input": "hello world"}).status_code == 200


def test_requests_per_minute_are_checked_before_the_body_is_read(make_gateway):
    client = make_gateway((KEY,), limits={"rpm": 1})
    assert client.get("/v1/models").status_code == 200
    r = client.post("/v1/embeddings", content=b"{not json")  # a bad body, but the key has no requests left
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"


class SpyTokenizer:
    """Wraps the gateway's tokenizer: counts calls and notes whether one ran on an event loop."""

    def __init__(self, inner):
        self.inner, self.calls, self.on_loop = inner, 0, []

    def _note(self) -> None:
        self.calls += 1
        try:
            asyncio.get_running_loop()
            self.on_loop.append(True)
        except RuntimeError:
            self.on_loop.append(False)

    def encode(self, text):
        self._note()
        return self.inner.encode(text)

    def encode_batch(self, texts):
        self._note()
        return self.inner.encode_batch(texts)


def test_tokenization_comes_after_the_cheap_checks_and_a_long_batch_off_the_event_loop(make_gateway):
    client = make_gateway((KEY,), limits={"rpm": 3})
    gateway = client.app.state.gateway
    spy = gateway.counters["emb"] = SpyTokenizer(gateway.counters["emb"])
    short = {"model": "emb", "input": ["hello world", "hello"]}
    long = {"model": "emb", "input": ["hello world " * 10] * (INLINE_TOKENIZE_CHARS // 100)}
    assert client.post("/v1/embeddings", json=short, headers={"authorization": "Bearer sk-wrong"}).status_code == 401
    assert client.post("/v1/embeddings", json=short).status_code == 200
    assert client.post("/v1/embeddings", json=long).status_code == 200
    assert client.post("/v1/embeddings", json=long).status_code == 200
    assert client.post("/v1/embeddings", json=short).status_code == 429  # out of requests this minute
    # a sentence is counted in place (a thread hop costs more); a long batch on a worker thread
    assert spy.calls == 3 and spy.on_loop == [True, False, False], (spy.calls, spy.on_loop)


def test_a_rewritten_card_is_read_again_within_a_second_with_the_new_versions_tokenizer(make_repository, monkeypatch):
    """`kiln reload` switches versions and rewrites the card: the gateway follows, no restart."""
    import shutil

    from kiln.gateway import endpoints
    from kiln.gateway.config import GatewayConfig
    from kiln.gateway.limits import RateLimiter
    from kiln_core.card import RepositoryCard

    repo = make_repository("emb", "feature-extraction")
    gw = endpoints.Gateway(GatewayConfig(repositories=[repo]), RateLimiter(), backend=None)
    clock = [1000.0]
    monkeypatch.setattr(endpoints.time, "monotonic", lambda: clock[0])
    gw._cards_checked = clock[0]
    assert gw.model("emb", "embedding", "/v1/embeddings").tokenizer_file == repo / "tok" / "tokenizer.json"
    shutil.copytree(repo / "tok", repo / "tok2")
    card = RepositoryCard.read(repo)
    card.model_copy(update={"tokenizer": "tok2/tokenizer.json", "version": 2}).write(repo)
    clock[0] += 0.5
    assert gw.model("emb", "embedding", "/v1/embeddings").tokenizer_file == repo / "tok" / "tokenizer.json"  # not yet
    clock[0] += 1.0
    assert gw.model("emb", "embedding", "/v1/embeddings").tokenizer_file == repo / "tok2" / "tokenizer.json"
    assert set(gw.counters) == {"emb"}
    RepositoryCard.path(repo).write_text("{half written")  # unreadable: serve as before
    clock[0] += 1.5
    assert gw.model("emb", "embedding", "/v1/embeddings").tokenizer_file == repo / "tok2" / "tokenizer.json"
