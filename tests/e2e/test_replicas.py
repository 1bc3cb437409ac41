"""Scale-out on one machine, what `kiln serve --replicas 2 --gateway-workers 2 --redis` runs:
two Tritons, two gateway processes on one port (SO_REUSEPORT) and a real redis-server holding
the per-key limits. A key's requests per minute hold across both gateway processes; requests
spread over both Tritons; kill -9 of one Triton under steady embeddings and chat load loses no
embedding (idempotent: they fail over, even those in flight on the dead one), every chat stream
ends whole or with an error event (none hangs), the gateway stays ready while one is left, and
the dead one rejoins once it is back."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request

import openai
import pytest
import yaml

from kiln.faults import CHAT_MODEL
from kiln.gateway.config import GatewayConfig
from kiln.gateway.runner import http_get
from kiln.redis_server import RedisServer
from kiln.stack import GatewayOptions, Stack
from kiln_testkit import per_process, status_with_key

LOAD_KEY, LIMITED_KEY, LIMITED_RPM = "sk-replicas-load", "sk-replicas-limited", 6


def triton_successes(backend) -> float:
    """Inferences this Triton answered, per its own /metrics (every model; 0 after a restart)."""
    with urllib.request.urlopen(backend.metrics_url, timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("nv_inference_request_success{"))


@pytest.fixture(scope="module")
def replicated(tiny_bert, tiny_llama, tmp_path_factory):
    """Both tiny models (the fault suite's specs) on two Tritons; two gateway worker processes
    in front, their limits in one redis-server; a keys file with an unlimited key for the load
    and one limited to LIMITED_RPM requests a minute."""
    from rich.console import Console

    from kiln.faults import export_specs, write_specs
    from kiln_core.spec import load_spec
    from model_repository.writer import write_repository

    specs = write_specs(tiny_bert, tiny_llama, tmp_path_factory.mktemp("replica-specs"))
    export_specs(specs, Console(stderr=True))
    loaded = [load_spec(str(p)) for p in specs]
    repos = [write_repository(s) for s in loaded]
    work = tmp_path_factory.mktemp("srv-replicas")
    keys = work / "keys.yaml"
    keys.write_text(yaml.safe_dump([{"name": "load", "key": LOAD_KEY},
                                    {"name": "limited", "key": LIMITED_KEY, "rpm": LIMITED_RPM}]))
    with RedisServer(workdir=work / "redis") as redis:
        gateway = GatewayOptions(GatewayConfig(port=0, keys_file=keys, redis_url=redis.url), keys="", workers=2)
        with Stack(repos, work, gateway=gateway, replicas=2) as stack:
            yield loaded[0], stack


def client(stack: Stack, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key=LOAD_KEY, max_retries=0, **kw)


def test_a_keys_limit_holds_across_both_gateway_processes(replicated):
    _, stack = replicated
    assert len(stack.gateway.workers) == 2 and stack.gateway.running()
    statuses = [status_with_key(stack.gateway_url, LIMITED_KEY) for _ in range(3 * LIMITED_RPM)]  # new connections
    assert statuses.count(200) == LIMITED_RPM and statuses.count(429) == 2 * LIMITED_RPM, statuses
    seen = per_process(stack.gateway_url, 2)  # each scrape lands on either worker
    assert len(seen) == 2, seen
    # both processes answered some of the key's requests, and together exactly its limit
    assert all(ok + refused > 0 for ok, refused in seen.values()), seen
    assert sum(ok for ok, _ in seen.values()) == LIMITED_RPM, seen


def test_requests_spread_over_both_replicas(replicated):
    spec, stack = replicated
    before = [triton_successes(b) for b in stack.backends]
    c = client(stack)
    for i in range(40):
        assert len(c.embeddings.create(model=spec.name, input=f"hello {i}").data) == 1
    gained = [triton_successes(b) - x for b, x in zip(stack.backends, before)]
    assert all(g >= 10 for g in gained), gained


def test_killing_one_replica_under_load_loses_no_embedding_and_it_rejoins(replicated):
    spec, stack = replicated
    dead = stack.backends[1]
    stop, failures, answered = threading.Event(), [], [0]
    streams: list[str] = []  # how each chat stream ended: "whole" or "error event"; a hang fails below

    def worker(k: int) -> None:
        c = client(stack, timeout=60)
        i = 0
        while not stop.is_set():
            try:
                r = c.embeddings.create(model=spec.name, input=f"worker {k} text {i}")
                assert len(r.data) == 1
                answered[0] += 1
            except Exception as err:  # every failure is the test's business
                failures.append(repr(err))
            i += 1

    def chatter() -> None:
        """Long streams, some on the replica that dies: each ends whole or with an error event."""
        c = client(stack, timeout=60)
        while not stop.is_set():
            finished = False
            try:
                for chunk in c.chat.completions.create(
                        model=CHAT_MODEL, messages=[{"role": "user", "content": "count"}], max_tokens=300,
                        temperature=0, stream=True):
                    finished = finished or bool(chunk.choices and chunk.choices[0].finish_reason)
                streams.append("whole" if finished else "cut without an error")
            except openai.APIStatusError as err:  # refused before its first token (the pool retried first)
                streams.append(f"refused {err.status_code}")
            except openai.APIConnectionError as err:
                streams.append(f"connection: {err!r}")  # includes a timeout: a hang
            except openai.APIError:
                streams.append("error event")  # cut mid-way: told so in the stream

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    threads += [threading.Thread(target=chatter) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(2.0)
        os.kill(dead.process.pid, signal.SIGKILL)
        before = answered[0]
        time.sleep(3.0)
        during = answered[0] - before
        status, body = http_get(stack.gateway_url + "/ready")
    finally:
        stop.set()
        for t in threads:
            t.join()
    from collections import Counter

    print(f"\nreplica killed: {answered[0]} embeddings answered, 0 failed; chat streams {dict(Counter(streams))}")
    assert not failures, failures[:5]
    assert during > 0  # the other replica kept answering
    assert status == 200 and body["triton"] is True, body  # one replica is enough to be ready
    assert streams and set(streams) <= {"whole", "error event"}, streams
    assert "whole" in streams

    dead.stop()  # reap it (what the supervisor does before it starts it again)
    dead.start(180)
    c = client(stack)
    deadline = time.monotonic() + 60
    while triton_successes(dead) == 0 and time.monotonic() < deadline:  # a restarted Triton counts from 0
        c.embeddings.create(model=spec.name, input="are you back")
    assert triton_successes(dead) > 0  # it rejoined: both gateway processes route to it again
