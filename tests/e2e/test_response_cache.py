"""Triton's response cache in front of an encoder (on by default for a batch-invariant variant):
an identical request is answered from the cache with the very bytes the model gave, a new text
misses, the gateway's /metrics shows Triton's hit and miss counts (and Triton exports the cache
series the deploy dashboard reads), and a cache too small for everything keeps to its size (the
oldest answers are evicted and computed again)."""

from __future__ import annotations

import urllib.request

import numpy as np
import openai
import pytest

from kiln.bench_cache import cache_counts
from kiln.deploy.observability import dashboard_metric_names, grafana_dashboard
from kiln.stack import GatewayOptions, Stack
from kiln_core.card import RepositoryCard
from kiln_testkit import tiny_spec


def triton_samples(stack: Stack) -> list[str]:
    text = urllib.request.urlopen(stack.triton.metrics_url, timeout=10).read().decode()
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def triton_metric(stack: Stack, name: str) -> float:
    return sum(float(l.rsplit(" ", 1)[1]) for l in triton_samples(stack) if l.startswith(name + "{") or
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
        assert cache_counts(plain.gateway_url, "cached") == (0, 0)  # no cache: nothing is counted
    with Stack(repo, tmp_path / "cache", gateway=GatewayOptions(keys="")) as stack:
        assert "--cache-config=local,size=8388608" in stack.triton.command()  # sized by the card
        c = openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key="none", max_retries=0)
        first = embed(c, "hello world")
        assert cache_counts(stack.gateway_url, "cached") == (0, 1)
        again = [embed(c, "hello world") for _ in range(3)]
        assert cache_counts(stack.gateway_url, "cached") == (3, 1)
        assert all(a.tobytes() == first.tobytes() == uncached[0].tobytes() for a in again)  # bit for bit
        pair = embed(c, ["a man", "a guitar"])  # a new request: a miss, then a hit
        assert np.array_equal(embed(c, ["a man", "a guitar"]), pair) and pair.tobytes() == uncached[1].tobytes()
        assert cache_counts(stack.gateway_url, "cached") == (4, 2)
        embed(c, ["a guitar", "a man"])  # the same texts in another order are another request
        assert cache_counts(stack.gateway_url, "cached") == (4, 3)
        assert triton_metric(stack, "nv_cache_num_hits_per_model") == 4.0  # Triton's own count agrees
        # the deploy dashboard's cache panels read series this Triton exports (with samples for the model)
        wanted = {n for n in dashboard_metric_names(grafana_dashboard(spec)) if n.startswith("nv_cache_")}
        sampled = {l.split("{")[0] for l in triton_samples(stack) if 'model="cached"' in l}
        assert wanted and sorted(wanted - sampled) == [], sorted(n for n in sampled if n.startswith("nv_cache_"))


def test_a_small_cache_keeps_to_its_size_evicting_the_oldest_answers(repository, tmp_path):
    """A 4 KiB cache holds a few dozen of these 32-float answers at most: after 200 distinct
    texts the first ones were evicted (computed again: misses), the latest still hit."""
    _, repo = repository
    with Stack(repo, tmp_path / "small", gateway=GatewayOptions(keys=""), cache_mb=4 / 1024) as stack:
        c = openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key="none", max_retries=0)
        texts = [f"text number {i}" for i in range(200)]
        for t in texts:
            embed(c, t)
        assert cache_counts(stack.gateway_url, "cached") == (0, 200)
        embed(c, texts[-1])
        assert cache_counts(stack.gateway_url, "cached") == (1, 200)  # the newest is still there
        embed(c, texts[0])
        assert cache_counts(stack.gateway_url, "cached") == (1, 201)  # the oldest was evicted to keep the size
        util = triton_metric(stack, "nv_cache_util")
        assert 0.0 <= util <= 1.0, util
