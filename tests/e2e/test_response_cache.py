"""Triton's response cache in front of an encoder (on by default for a batch-invariant variant):
an identical request is answered from the cache with the very bytes the model gave, a new text
misses, the gateway's /metrics shows Triton's hit and miss counts, and a cache too small for
everything keeps to its size (the oldest answers are evicted and computed again)."""

from __future__ import annotations

import urllib.request

import numpy as np
import openai
import pytest

from kiln.stack import GatewayOptions, Stack
from kiln_core.card import RepositoryCard
from kiln_testkit import tiny_spec


def counts(stack: Stack, model: str) -> tuple[float, float]:
    """(hits, misses) of the response cache for `model`, as the gateway's /metrics reports them."""
    text = urllib.request.urlopen(stack.gateway_url + "/metrics", timeout=10).read().decode()
    got = {"hits": 0.0, "misses": 0.0}
    for line in text.splitlines():
        for kind in got:
            if line.startswith(f'kiln_gateway_response_cache_{kind}_total{{model="{model}"}}'):
                got[kind] = float(line.rsplit(" ", 1)[1])
    return got["hits"], got["misses"]


def triton_metric(stack: Stack, name: str) -> float:
    text = urllib.request.urlopen(stack.triton.metrics_url, timeout=10).read().decode()
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name + "{") or
               l.startswith(name + " "))


@pytest.fixture(scope="module")
def repository(tiny_bert, tmp_path_factory):
    from export.pipeline import run_export
    from model_repository.writer import write_repository

    spec = tiny_spec(tiny_bert, tmp_path_factory.mktemp("cache"), name="cached", precisions=["fp32"],
                     response_cache={"size_mb": 8})
    run_export(spec)
    return spec, write_repository(spec)


def embed(client: openai.OpenAI, text: str | list[str]) -> np.ndarray:
    r = client.embeddings.create(model="cached", input=text, encoding_format="float")
    return np.array([d.embedding for d in r.data], dtype=np.float32)


def test_identical_requests_hit_with_the_models_own_answer_and_a_new_text_misses(repository, tmp_path):
    spec, repo = repository
    card = RepositoryCard.read(repo)
    assert card.batch_invariance["invariant"] is True and card.response_cache_mb == 8
    # the same repository without a cache: the model's own answers
    with Stack(repo, tmp_path / "nocache", gateway=GatewayOptions(keys=""), cache_mb=0) as plain:
        c = openai.OpenAI(base_url=plain.gateway_url + "/v1", api_key="none", max_retries=0)
        uncached = [embed(c, t) for t in ("hello world", ["a man", "a guitar"])]
        assert counts(plain, "cached") == (0.0, 0.0)  # no cache: nothing is counted
    with Stack(repo, tmp_path / "cache", gateway=GatewayOptions(keys="")) as stack:
        assert "--cache-config=local,size=8388608" in stack.triton.command()  # sized by the card
        c = openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key="none", max_retries=0)
        first = embed(c, "hello world")
        assert counts(stack, "cached") == (0.0, 1.0)
        again = [embed(c, "hello world") for _ in range(3)]
        assert counts(stack, "cached") == (3.0, 1.0)
        assert all(a.tobytes() == first.tobytes() == uncached[0].tobytes() for a in again)  # bit for bit
        pair = embed(c, ["a man", "a guitar"])  # a new request: a miss, then a hit
        assert np.array_equal(embed(c, ["a man", "a guitar"]), pair) and pair.tobytes() == uncached[1].tobytes()
        assert counts(stack, "cached") == (4.0, 2.0)
        embed(c, ["a guitar", "a man"])  # the same texts in another order are another request
        assert counts(stack, "cached") == (4.0, 3.0)
        assert triton_metric(stack, "nv_cache_num_hits_per_model") == 4.0  # Triton's own count agrees


def test_a_small_cache_keeps_to_its_size_evicting_the_oldest_answers(repository, tmp_path):
    """A 4 KiB cache holds a few dozen of these 32-float answers at most: after 200 distinct
    texts the first ones were evicted (computed again: misses), the latest still hit."""
    _, repo = repository
    with Stack(repo, tmp_path / "small", gateway=GatewayOptions(keys=""), cache_mb=4 / 1024) as stack:
        c = openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key="none", max_retries=0)
        texts = [f"text number {i}" for i in range(200)]
        for t in texts:
            embed(c, t)
        assert counts(stack, "cached") == (0.0, 200.0)
        embed(c, texts[-1])
        assert counts(stack, "cached") == (1.0, 200.0)  # the newest is still there
        embed(c, texts[0])
        assert counts(stack, "cached") == (1.0, 201.0)  # the oldest was evicted to keep the size
        util = triton_metric(stack, "nv_cache_util")
        assert 0.0 <= util <= 1.0, util
