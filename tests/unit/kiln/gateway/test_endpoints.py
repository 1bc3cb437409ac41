"""The endpoints against a fake Triton: a key's token budget is charged what a generation
really used, a refusal before any work costs nothing, and an over-budget key gets 429
with Retry-After."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from kiln.gateway.app import build_app
from kiln.gateway.backend import Chunk
from kiln.gateway.config import GatewayConfig, Limits
from kiln.gateway.endpoints import generation_estimate
from kiln.gateway.protocol import APIError

KEY = "sk-test-endpoints"
KEYS_VARIABLE = "KILN_TEST_ENDPOINT_KEYS"
TPM = 300


class FakeTriton:
    """Generates "hi there" with 3 prompt and 2 completion tokens, or refuses like a full queue."""

    def __init__(self):
        self.queue_full = False

    async def generate(self, model, values, request_id=""):
        if self.queue_full:
            raise APIError(429, f"Model {model!r} is at capacity (its queue is full); retry shortly.", None,
                           "queue_full", retry_after=1.0)
        yield Chunk("hi")
        yield Chunk(" there", "stop", prompt_tokens=3, completion_tokens=2)

    async def close(self):
        pass


@pytest.fixture
def gateway(make_repository, monkeypatch):
    monkeypatch.setenv(KEYS_VARIABLE, KEY)
    triton = FakeTriton()
    config = GatewayConfig(repositories=[make_repository("lm", "text-generation")], keys_env=KEYS_VARIABLE,
                           limits=Limits(tpm=TPM))
    with TestClient(build_app(config, backend=triton)) as client:
        client.headers["authorization"] = f"Bearer {KEY}"
        yield client, triton


def complete(client, max_tokens: int, stream: bool = False):
    body = {"model": "lm", "prompt": "hello", "max_tokens": max_tokens}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return client.post("/v1/completions", json=body)


def test_generation_estimate_is_the_budget_and_a_rough_prompt_count():
    assert generation_estimate(10, 41) == 20
    assert generation_estimate(None, 3) == 256


@pytest.mark.parametrize("stream", [False, True])
def test_a_generation_is_charged_its_real_usage(gateway, stream):
    client, _ = gateway
    for _ in range(3):  # each reserves 251 of 300 tokens, then settles at 5
        r = complete(client, 250, stream)
        assert r.status_code == 200, r.text
    assert '"total_tokens":5' in r.text.replace(" ", "")


def test_a_refusal_before_any_work_costs_no_tokens(gateway):
    client, triton = gateway
    triton.queue_full = True
    r = complete(client, 250)
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full" and r.headers["retry-after"] == "1"
    triton.queue_full = False
    assert complete(client, 250).status_code == 200


def test_over_the_token_budget_is_429_with_retry_after(gateway):
    client, _ = gateway
    r = complete(client, TPM)
    assert r.status_code == 429 and r.headers["retry-after"] == "60"
    assert r.json()["error"]["message"].startswith(f"Request too large: it needs about {TPM + 1} tokens")
    metrics = client.get("/metrics").text
    assert 'kiln_gateway_rate_limited_total{limit="tokens"} 1.0' in metrics
