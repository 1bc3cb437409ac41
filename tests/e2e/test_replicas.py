"""Two Tritons behind one gateway (`Stack(replicas=2)`, what `kiln serve --replicas 2` runs):
requests spread over both; kill -9 of one under steady embeddings and chat load loses no
embedding (idempotent: they fail over, even those in flight on the dead one), every chat
stream ends whole or with an error event (none hangs), the gateway stays ready while one is
left, and the dead one rejoins once it is back."""

from __future__ import annotations

import os
import signal
import threading
import time

import openai
import pytest

from kiln.faults import CHAT_MODEL
from kiln.gateway.runner import http_get
from kiln.stack import GatewayOptions, Stack


def backend_requests(stack: Stack) -> dict[str, float]:
    """Requests answered per backend (the pool's counter on the gateway's /metrics, outcome ok)."""
    import urllib.request

    with urllib.request.urlopen(stack.gateway_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("kiln_gateway_backend_requests_total{") and 'outcome="ok"' in line:
            backend = line.split('backend="', 1)[1].split('"', 1)[0]
            out[backend] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.fixture(scope="module")
def replicated(tiny_bert, tiny_llama, tmp_path_factory):
    """Both tiny models (the fault suite's specs) on two Tritons, one gateway child process in front."""
    from rich.console import Console

    from kiln.faults import export_specs, write_specs
    from kiln_core.spec import load_spec
    from model_repository.writer import write_repository

    specs = write_specs(tiny_bert, tiny_llama, tmp_path_factory.mktemp("replica-specs"))
    export_specs(specs, Console(stderr=True))
    loaded = [load_spec(str(p)) for p in specs]
    repos = [write_repository(s) for s in loaded]
    with Stack(repos, tmp_path_factory.mktemp("srv-replicas"), gateway=GatewayOptions(keys=""), replicas=2) as stack:
        yield loaded[0], stack


def test_requests_spread_over_both_replicas(replicated):
    spec, stack = replicated
    client = openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key="none", max_retries=0)
    for i in range(40):
        assert len(client.embeddings.create(model=spec.name, input=f"hello {i}").data) == 1
    per = backend_requests(stack)
    urls = [b.grpc_url for b in stack.backends]
    assert sorted(per) == sorted(urls) and all(per[u] >= 10 for u in urls), per


def test_killing_one_replica_under_load_loses_no_embedding_and_it_rejoins(replicated):
    spec, stack = replicated
    dead = stack.backends[1]
    stop, failures, answered = threading.Event(), [], [0]
    streams: list[str] = []  # how each chat stream ended: "whole" or "error event"; a hang fails below

    def worker(k: int) -> None:
        client = openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key="none", max_retries=0, timeout=60)
        i = 0
        while not stop.is_set():
            try:
                r = client.embeddings.create(model=spec.name, input=f"worker {k} text {i}")
                assert len(r.data) == 1
                answered[0] += 1
            except Exception as err:  # every failure is the test's business
                failures.append(repr(err))
            i += 1

    def chatter() -> None:
        """Long streams, some on the replica that dies: each ends whole or with an error event."""
        client = openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key="none", max_retries=0, timeout=60)
        while not stop.is_set():
            finished = False
            try:
                for chunk in client.chat.completions.create(
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
    client = openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key="none", max_retries=0)
    before = backend_requests(stack).get(dead.grpc_url, 0.0)
    deadline = time.monotonic() + 60
    while backend_requests(stack).get(dead.grpc_url, 0.0) <= before and time.monotonic() < deadline:
        client.embeddings.create(model=spec.name, input="are you back")
    assert backend_requests(stack).get(dead.grpc_url, 0.0) > before  # it rejoined
