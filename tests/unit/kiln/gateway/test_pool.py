"""Several Tritons behind the gateway: requests go to the least busy backend, survive a
replica that dies (embeddings always, generations until their first chunk), a backend that
keeps failing is taken out and probed before it rejoins, and a pool of one is its backend.
Fake backends stand in for Triton; a fake clock drives the cool-downs."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from kiln.gateway.backend import Chunk, triton_unavailable
from kiln.gateway.pool import BackendPool, Circuit
from kiln.gateway.protocol import APIError


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeBackend:
    """A Triton as the pool sees it. Its embeddings are filled with its ``index`` (so a test
    sees who answered); ``hold`` keeps requests in flight until it is set; ``refuse`` is raised
    before any answer, ``fail_mid`` after the first chunk of a generation."""

    def __init__(self, index: int):
        self.index, self.url = index, f"triton-{index}:8001"
        self.up = True
        self.refuse: APIError | None = None
        self.fail_mid: APIError | None = None
        self.hold: asyncio.Event | None = None
        self.ready_answer = True
        self.calls = self.ready_calls = self.in_flight = self.closed_early = 0
        self.closed = False

    async def _start(self) -> None:
        self.calls += 1
        self.in_flight += 1
        try:
            if self.hold is not None:
                await self.hold.wait()
        finally:
            self.in_flight -= 1
        if self.refuse is not None:
            raise self.refuse

    async def embed(self, model, texts, max_batch, request_id=""):
        await self._start()
        return np.full((len(texts), 2), self.index, dtype=np.float32)

    async def generate(self, model, values, request_id=""):
        await self._start()
        finished = False
        try:
            yield Chunk(f"from {self.index}")
            if self.fail_mid is not None:
                raise self.fail_mid
            finished = True
            yield Chunk(" done", "stop", prompt_tokens=1, completion_tokens=2)
        finally:
            self.closed_early += not finished

    async def ready(self, models):
        self.ready_calls += 1
        return self.ready_answer, {m: self.ready_answer for m in models}

    async def health(self, model):
        return self.ready_answer

    async def close(self):
        self.closed = True

    def die(self) -> None:
        """Triton goes away: what TritonBackend does when a call finds it unreachable."""
        self.up = False
        self.refuse = triton_unavailable()
        if self.hold is not None:
            self.hold.set()


def fakes(n: int) -> list[FakeBackend]:
    return [FakeBackend(i) for i in range(n)]


async def until(condition) -> None:
    """Let the event loop run until ``condition()`` holds (a bounded number of turns, no clock)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


async def settled(coroutine):
    """The result of ``coroutine`` once it is done; a request that hangs fails the test instead."""
    task = asyncio.create_task(coroutine)
    try:
        await until(task.done)
    finally:
        task.cancel()
    return task.result()


async def chat(pool: BackendPool) -> list[str]:
    return [c.text async for c in pool.generate("lm", {}, "r1")]


def answered_by(vectors: np.ndarray) -> int:
    return int(vectors[0, 0])


# ----------------------------------------------------------------------------- routing
def test_concurrent_requests_spread_evenly_over_the_backends():
    async def scenario():
        backends = fakes(3)
        gate = asyncio.Event()
        for b in backends:
            b.hold = gate
        pool = BackendPool(backends)
        tasks = [asyncio.create_task(pool.embed("emb", ["hello"], 4)) for _ in range(9)]
        await until(lambda: sum(b.in_flight for b in backends) == 9)
        assert [b.in_flight for b in backends] == [3, 3, 3]
        assert [s["outstanding"] for s in pool.stats()] == [3, 3, 3]
        gate.set()
        await asyncio.gather(*tasks)
        assert [s["outstanding"] for s in pool.stats()] == [0, 0, 0]

    asyncio.run(scenario())


def test_a_busy_backend_gets_no_new_requests_while_another_is_free():
    async def scenario():
        slow, fast = fakes(2)
        slow.hold = asyncio.Event()
        pool = BackendPool([slow, fast])
        stuck = asyncio.create_task(pool.embed("emb", ["hello"], 4))  # the first pick: a tie, so the first backend
        await until(lambda: slow.in_flight == 1)
        answers = [answered_by(await settled(pool.embed("emb", ["hello"], 4))) for _ in range(10)]
        assert answers == [1] * 10  # round robin alone would have sent half to the busy one
        slow.hold.set()
        assert answered_by(await stuck) == 0

    asyncio.run(scenario())


# ----------------------------------------------------------------------------- failover
def test_a_replica_killed_under_load_loses_no_embedding():
    async def scenario():
        dying, healthy = fakes(2)
        dying.hold, healthy.hold = asyncio.Event(), asyncio.Event()
        pool = BackendPool([dying, healthy])
        tasks = [asyncio.create_task(pool.embed("emb", ["hello"], 4)) for _ in range(200)]
        await until(lambda: dying.in_flight + healthy.in_flight == 200)
        on_dying = dying.in_flight
        assert on_dying == 100  # half were in flight on the replica when it died
        dying.die()
        healthy.hold.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert [r for r in results if isinstance(r, BaseException)] == []
        assert all(answered_by(r) == 1 for r in results)
        assert healthy.calls == 200  # each request in flight on the dead one was sent again
        after = [answered_by(await pool.embed("emb", ["hello"], 4)) for _ in range(200)]
        assert after == [1] * 200 and dying.calls == on_dying  # the dead one is not asked again
        assert pool.stats()[0]["failures"] == on_dying

    asyncio.run(scenario())


def test_a_backend_that_answers_unavailable_without_going_down_costs_no_request():
    async def scenario():
        broken, healthy = fakes(2)
        broken.refuse = triton_unavailable()
        pool = BackendPool([broken, healthy], clock=Clock())
        answers = [answered_by(await pool.embed("emb", ["hello"], 4)) for _ in range(200)]
        assert answers == [1] * 200
        assert broken.calls == 3  # three failures in a row, then its circuit opened

    asyncio.run(scenario())


def test_any_server_error_from_a_backend_that_went_down_during_the_call_is_retried():
    class DiesWithAnError(FakeBackend):
        async def embed(self, model, texts, max_batch, request_id=""):
            self.calls += 1
            self.up = False  # the call found Triton gone, but the error it saw reads as something else
            raise APIError(500, "The server had an error while processing your request.", None, "internal_error")

    async def scenario():
        dying, healthy = DiesWithAnError(0), FakeBackend(1)
        pool = BackendPool([dying, healthy])
        assert answered_by(await pool.embed("emb", ["hello"], 4)) == 1 and dying.calls == 1
        assert pool.stats()[0]["failures"] == 1

    asyncio.run(scenario())


def test_chat_fails_over_before_its_first_chunk():
    async def scenario():
        dead, healthy = fakes(2)
        dead.refuse = triton_unavailable()
        pool = BackendPool([dead, healthy])
        assert await chat(pool) == ["from 1", " done"]
        assert (dead.calls, healthy.calls) == (1, 1)

    asyncio.run(scenario())


def test_chat_cut_after_its_first_chunk_ends_with_the_error_and_is_not_sent_again():
    async def scenario():
        dying, other = fakes(2)
        cut = triton_unavailable()
        dying.fail_mid = cut
        pool = BackendPool([dying, other])  # a fresh pool's first pick is the first backend
        stream = pool.generate("lm", {}, "r1")
        assert (await anext(stream)).text == "from 0"
        with pytest.raises(APIError) as err:
            await anext(stream)
        assert err.value is cut  # the endpoint turns it into an in-band error event
        assert other.calls == 0  # the client already holds part of an answer: no second one is started
        assert [s["outstanding"] for s in pool.stats()] == [0, 0]

    asyncio.run(scenario())


def test_a_client_that_leaves_mid_stream_closes_the_backend_stream():
    async def scenario():
        backend, other = fakes(2)
        pool = BackendPool([backend, other])
        stream = pool.generate("lm", {}, "r1")
        await anext(stream)
        await stream.aclose()
        assert backend.closed_early == 1  # what cancels the Triton request
        assert pool.stats()[0]["outstanding"] == 0 and pool.stats()[0]["outcomes"]["cancelled"] == 1
        assert pool.stats()[0]["circuit"] == "closed" and other.calls == 0

    asyncio.run(scenario())


def test_a_stream_closed_after_its_final_chunk_counts_as_served():
    async def scenario():
        clock = Clock()
        backend, other = fakes(2)
        pool = BackendPool([backend, other], clock=clock)
        backend.refuse = triton_unavailable()
        for _ in range(2):  # two failures in a row, one short of opening its circuit
            await pool.embed("emb", ["hello"], 4)
            await pool.embed("emb", ["hello"], 4)  # (every other request is a tie that starts at the other)
        backend.refuse = None
        stream = pool.generate("lm", {}, "r1")
        while not (await anext(stream)).final:  # as the endpoint reads it: up to the final chunk, then close
            pass
        await stream.aclose()
        assert pool.stats()[0]["outcomes"]["ok"] == 1 and pool.stats()[0]["outcomes"]["cancelled"] == 0
        backend.refuse = triton_unavailable()
        await pool.embed("emb", ["hello"], 4)  # the served stream ended the run of failures
        assert pool.stats()[0]["circuit"] == "closed"

    asyncio.run(scenario())


@pytest.mark.parametrize("error", [
    APIError(400, "prompt: empty", "prompt", "invalid_value"),
    APIError(429, "queue full", None, "queue_full", retry_after=1.0),
    APIError(503, "Model 'm' cannot generate right now; retry later.", None, "model_unavailable", retry_after=5.0),
    APIError(500, "The server had an error while processing your request.", None, "internal_error"),
], ids=lambda e: e.code)
def test_client_and_model_errors_are_answered_as_they_are_and_never_retried(error):
    async def scenario():
        first, second = fakes(2)
        pool = BackendPool([first, second])
        for _ in range(5):  # each a fresh tie, so round robin sends every other one to the first backend
            first.refuse = error
            second.refuse = error
            with pytest.raises(APIError) as embed_err:
                await pool.embed("emb", ["hello"], 4)
            assert embed_err.value is error
            stream = pool.generate("lm", {}, "r1")
            with pytest.raises(APIError) as chat_err:
                await anext(stream)
            assert chat_err.value is error
        assert first.calls + second.calls == 10  # one backend per request
        assert {s["circuit"] for s in pool.stats()} == {"closed"}  # the same everywhere: no backend is to blame

    asyncio.run(scenario())


def test_all_backends_down_answers_503_at_once():
    async def scenario():
        backends = fakes(3)
        for b in backends:
            b.up = False
        pool = BackendPool(backends)
        with pytest.raises(APIError) as err:
            await pool.embed("emb", ["hello"], 4)
        assert (err.value.status, err.value.code) == (503, "triton_unavailable") and err.value.retry_after
        with pytest.raises(APIError) as gen_err:
            await anext(pool.generate("lm", {}, "r1"))
        assert gen_err.value.code == "triton_unavailable"
        assert sum(b.calls for b in backends) == 0 and not pool.up

    asyncio.run(scenario())


def test_when_every_backend_fails_the_client_hears_triton_unavailable_after_one_try_each():
    async def scenario():
        backends = fakes(3)
        for b in backends:
            b.refuse = triton_unavailable()
        pool = BackendPool(backends)
        with pytest.raises(APIError) as err:
            await pool.embed("emb", ["hello"], 4)
        assert err.value.code == "triton_unavailable"
        assert [b.calls for b in backends] == [1, 1, 1]

    asyncio.run(scenario())


# ----------------------------------------------------------------------------- circuit breaker
def test_a_failing_backend_is_taken_out_for_its_cool_down_then_a_probe_decides():
    async def scenario():
        clock = Clock()
        flaky, healthy = fakes(2)
        flaky.refuse = triton_unavailable()
        pool = BackendPool([flaky, healthy], failure_threshold=3, cooldown_s=5.0, clock=clock)
        for _ in range(20):
            await pool.embed("emb", ["hello"], 4)
        assert flaky.calls == 3 and pool.stats()[0]["circuit"] == "open"

        clock.now += 4.9  # still cooling down: not asked, not even probed
        await pool.embed("emb", ["hello"], 4)
        await pool.wait_probes()
        assert (flaky.calls, flaky.ready_calls) == (3, 0)

        clock.now += 0.1  # over: the next request starts a probe (and goes elsewhere meanwhile)
        flaky.ready_answer = False
        assert answered_by(await pool.embed("emb", ["hello"], 4)) == 1
        await pool.wait_probes()
        assert flaky.ready_calls == 1 and pool.stats()[0]["circuit"] == "open"  # failed: 10 s more

        clock.now += 9.9
        await pool.embed("emb", ["hello"], 4)
        await pool.wait_probes()
        assert flaky.ready_calls == 1

        clock.now += 0.1
        flaky.ready_answer, flaky.refuse = True, None  # Triton is back
        await pool.embed("emb", ["hello"], 4)
        await pool.wait_probes()
        assert flaky.ready_calls == 2 and pool.stats()[0]["circuit"] == "closed"
        answers = {answered_by(await pool.embed("emb", ["hello"], 4)) for _ in range(4)}
        assert answers == {0, 1} and flaky.calls > 3  # it takes requests again

    asyncio.run(scenario())


def test_the_cool_down_doubles_on_each_failed_probe_up_to_its_cap_and_resets_once_closed():
    clock = Clock()
    circuit = Circuit(threshold=3, cooldown_s=5.0, max_cooldown_s=30.0, clock=clock)
    circuit.failed(), circuit.failed(), circuit.succeeded()  # a success in between: not in a row
    assert not circuit.failed() and circuit.closed
    circuit.failed()
    assert circuit.failed() and not circuit.closed
    cooldowns = []
    for _ in range(5):
        assert not circuit.due()
        clock.now = circuit.reopen_at
        assert circuit.due()
        cooldowns.append(circuit.cooldown_s)
        circuit.start_probe()
        circuit.probed(False)
    assert cooldowns == [5.0, 10.0, 20.0, 30.0, 30.0]
    clock.now = circuit.reopen_at
    circuit.start_probe()
    circuit.probed(True)
    assert circuit.closed and circuit.cooldown_s == 5.0 and circuit.streak == 0


def test_a_backend_that_marked_itself_down_rejoins_once_it_is_up_again():
    async def scenario():
        restarting, healthy = fakes(2)
        restarting.up = False
        pool = BackendPool([restarting, healthy])
        assert {answered_by(await pool.embed("emb", ["hello"], 4)) for _ in range(6)} == {1}
        restarting.up = True  # its own probe found Triton again
        assert {answered_by(await pool.embed("emb", ["hello"], 4)) for _ in range(6)} == {0, 1}

    asyncio.run(scenario())


def test_a_probe_whose_caller_left_is_made_again():
    class SlowToAnswer(FakeBackend):
        async def ready(self, models):
            self.ready_calls += 1
            if self.hold is not None:
                await self.hold.wait()
            return self.ready_answer, {m: self.ready_answer for m in models}

    async def scenario():
        clock = Clock()
        flaky, healthy = SlowToAnswer(0), FakeBackend(1)
        flaky.refuse = triton_unavailable()
        pool = BackendPool([flaky, healthy], clock=clock)
        for _ in range(6):
            await pool.embed("emb", ["hello"], 4)
        clock.now += 5.0
        flaky.hold, flaky.refuse = asyncio.Event(), None
        asking = asyncio.create_task(pool.ready(["emb"]))  # a /ready whose client disconnects mid-probe
        await until(lambda: flaky.ready_calls == 1)
        asking.cancel()
        await until(asking.done)
        assert pool.stats()[0]["circuit"] == "open"  # not stuck half-way: still due
        flaky.hold = None
        await pool.embed("emb", ["hello"], 4)
        await pool.wait_probes()
        assert flaky.ready_calls == 2 and pool.stats()[0]["circuit"] == "closed"

    asyncio.run(scenario())


# ----------------------------------------------------------------------------- readiness
def test_ready_while_one_backend_is_ready():
    async def scenario():
        down, ready = fakes(2)
        down.ready_answer = False
        pool = BackendPool([down, ready])
        assert await pool.ready(["emb", "lm"]) == (True, {"emb": True, "lm": True})
        ready.ready_answer = False
        assert await pool.ready(["emb", "lm"]) == (False, {"emb": False, "lm": False})

    asyncio.run(scenario())


def test_a_model_is_ready_when_some_live_backend_has_it():
    class Partial(FakeBackend):
        async def ready(self, models):
            self.ready_calls += 1
            return True, {m: m == "emb" for m in models}

    async def scenario():
        pool = BackendPool([Partial(0), FakeBackend(1)])
        assert await pool.ready(["emb", "lm"]) == (True, {"emb": True, "lm": True})
        only_partial = BackendPool([Partial(0), FakeBackend(1)])
        only_partial.members[1].backend.ready_answer = False  # its server is not ready: its models do not count
        assert await only_partial.ready(["emb", "lm"]) == (True, {"emb": True, "lm": False})

    asyncio.run(scenario())


def test_ready_does_not_ask_a_backend_in_its_cool_down_and_probes_one_past_it():
    async def scenario():
        clock = Clock()
        flaky, healthy = fakes(2)
        flaky.refuse = triton_unavailable()
        pool = BackendPool([flaky, healthy], clock=clock)
        for _ in range(6):  # ties alternate: three of them start at the flaky one
            await pool.embed("emb", ["hello"], 4)
        assert pool.stats()[0]["circuit"] == "open"
        assert await pool.ready(["emb"]) == (True, {"emb": True}) and flaky.ready_calls == 0
        clock.now += 5.0
        flaky.refuse = None
        assert (await pool.ready(["emb"]))[0] and flaky.ready_calls == 1
        assert pool.stats()[0]["circuit"] == "closed"

    asyncio.run(scenario())


# ----------------------------------------------------------------------------- a pool of one
def test_a_pool_of_one_is_its_backend():
    async def scenario():
        (backend,) = fakes(1)
        pool = BackendPool([backend], clock=Clock())
        assert answered_by(await pool.embed("emb", ["hello"], 4)) == 0
        assert await chat(pool) == ["from 0", " done"]
        for error in (triton_unavailable(), APIError(400, "bad", "input", "invalid_value")):
            backend.refuse = error
            for _ in range(5):  # no circuit: every request reaches it, which answers for itself
                with pytest.raises(APIError) as err:
                    await pool.embed("emb", ["hello"], 4)
                assert err.value is error
                with pytest.raises(APIError) as gen_err:
                    await anext(pool.generate("lm", {}, "r1"))
                assert gen_err.value is error
        assert backend.calls == 22
        backend.refuse, backend.up = None, False  # a down backend refuses on its own; the pool still asks it
        assert answered_by(await pool.embed("emb", ["hello"], 4)) == 0 and not pool.up
        backend.ready_answer = False
        assert await pool.ready(["emb"]) == (False, {"emb": False})
        await pool.close()
        assert backend.closed

    asyncio.run(scenario())


# ----------------------------------------------------------------------------- /metrics
def test_metrics_show_each_backend():
    async def scenario():
        good, dead = fakes(2)
        dead.refuse = triton_unavailable()
        pool = BackendPool([good, dead], clock=Clock())
        registry = CollectorRegistry()
        pool.register_metrics(registry)
        for _ in range(6):
            await pool.embed("emb", ["hello"], 4)
        dead.up = False
        return generate_latest(registry).decode()

    text = asyncio.run(scenario())
    assert 'kiln_gateway_backend_requests_total{backend="triton-0:8001",outcome="ok"} 6.0' in text
    assert 'kiln_gateway_backend_requests_total{backend="triton-1:8001",outcome="failed"} 3.0' in text
    assert 'kiln_gateway_backend_up{backend="triton-1:8001"} 0.0' in text
    assert 'kiln_gateway_backend_up{backend="triton-0:8001"} 1.0' in text
    assert 'kiln_gateway_backend_circuit_open{backend="triton-1:8001"} 1.0' in text
    assert 'kiln_gateway_backend_outstanding{backend="triton-0:8001"} 0.0' in text


class CachedBackend:
    """A backend that reports its Triton's response-cache counts (None: its Triton is away)."""

    def __init__(self, url: str, counts):
        self.url, self.up, self.counts = url, True, counts

    async def cache_counts(self, model: str):
        return self.counts


def test_response_cache_counts_add_up_over_the_tritons_that_answer_and_reach_metrics():
    from kiln.gateway.metrics import Metrics

    pool = BackendPool([CachedBackend("a", (3, 5)), CachedBackend("b", (1, 2)), CachedBackend("c", None)])
    assert asyncio.run(pool.cache_counts("emb")) == (4, 7)  # each Triton has its own cache
    assert asyncio.run(BackendPool([CachedBackend("c", None)]).cache_counts("emb")) is None
    metrics = Metrics()
    metrics.cache.set("emb", 4, 7)
    text = metrics.render().decode()
    assert 'kiln_gateway_response_cache_hits_total{model="emb"} 4.0' in text
    assert 'kiln_gateway_response_cache_misses_total{model="emb"} 7.0' in text
