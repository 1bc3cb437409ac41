"""Hostile bodies against the whole app (a fake Triton behind it that, like the real
tensors, refuses any number it would not hold exactly): wrong types, huge integers, NaN
and infinities, deep nesting, non-UTF-8 bytes, lone surrogates, huge strings, special
tokens. Every answer is a 4xx in OpenAI's error envelope: none is a 5xx, none a 200."""

from __future__ import annotations

import json

import pytest

from kiln.faults import (  # the same bodies `kiln faults` sends a real server
    SPECIAL,
    hostile_bodies,
)

KEY = "sk-test-fuzz"
MAX_BODY = 16 * 1024  # hostile_bodies' default limit: its huge bodies are built just over it


@pytest.fixture
def client(make_gateway):
    return make_gateway((KEY,), max_body_bytes=MAX_BODY)


def test_every_hostile_body_is_a_4xx_in_the_openai_envelope(client):
    bodies = hostile_bodies()
    assert len(bodies) >= 300
    wrong = []
    for route, body in bodies:
        r = client.post(route, content=body, headers={"content-type": "application/json"})
        try:
            envelope = set(r.json()["error"]) == {"message", "type", "param", "code"}
        except (ValueError, KeyError, TypeError):
            envelope = False
        if not (400 <= r.status_code < 500 and envelope):
            wrong.append((route, body[:120], r.status_code, r.text[:200]))
    assert not wrong, f"{len(wrong)} of {len(bodies)} answered wrongly, e.g. {wrong[:5]}"
    assert client.post("/v1/embeddings", json={"model": "emb", "input": "hello"}).status_code == 200


def test_without_a_key_every_route_is_401_before_anything_else(client):
    for route, body in hostile_bodies()[::25]:
        r = client.post(route, content=body, headers={"authorization": ""})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (route, body[:80])


def test_typed_special_tokens_reach_the_model_as_message_text(client, triton):
    """The gateway sends content as JSON text, never as a prompt it assembled: the chat
    template and the tokenizer in the model decide what a token is."""
    r = client.post("/v1/chat/completions", json={"model": "lm", "messages": [{"role": "user", "content": SPECIAL}]})
    assert r.status_code == 200, r.text
    assert json.loads(triton.received[-1]["messages"]) == [{"role": "user", "content": SPECIAL}]
