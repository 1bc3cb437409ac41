"""Triton's side: its errors sorted by who must act, generation inputs that follow the
repository's tensor table, failing fast while Triton is down, and readiness that asks the
generation models themselves. A fake gRPC client stands in for Triton."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from kiln.gateway.backend import (
    GEN_INPUTS,
    TritonBackend,
    generation_inputs,
    health_answer,
    map_error,
    unreachable,
)
from kiln.gateway.protocol import APIError
from kiln_runtime.contract import (
    BROKEN_ENGINE,
    EMBEDDING,
    FINISH_REASON,
    GENERATION_INPUTS,
    HEALTH,
    HEALTH_FINISH_REASON,
    TEXT,
    TEXT_INPUT,
    TEXT_OUTPUT,
)


@pytest.mark.parametrize(
    "msg, status, code, http",
    [
        ("Exceeds maximum queue size: 3 requests already wait; retry later", None, "queue_full", 429),
        ("[request id: r1] max_tokens: prompt has 10 tokens, so at most 5 more fit", None, "invalid_value", 400),
        ("messages: 600 tokens leave no room in the model's context", "StatusCode.INVALID_ARGUMENT", "invalid_value", 400),
        ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Connection refused",
         "StatusCode.UNAVAILABLE", "triton_unavailable", 503),
        ("Request for unknown model: 'm' is not found", "StatusCode.NOT_FOUND", "model_not_ready", 503),
        ("something broke inside", "StatusCode.INTERNAL", "internal_error", 500),
        # the generation model's refusal once its engine is broken (the stream loses the UNAVAILABLE code)
        (f"{BROKEN_ENGINE}: the stepping thread died; restart the model / server", None, "model_unavailable", 503),
    ],
)
def test_triton_errors_are_sorted_by_who_must_act(msg, status, code, http):
    err = map_error(InferenceServerException(msg=msg, status=status), "m")
    assert (err.status, err.code) == (http, code)
    if http == 500:
        assert "broke" not in err.message  # no internals in the answer
    if http in (429, 503):
        assert err.retry_after


def test_triton_field_names_become_openai_names():
    err = map_error(InferenceServerException(msg="text_input: empty; send at least one token"), "m")
    assert err.param == "prompt" and "prompt" in err.message


def test_generation_inputs_follow_the_repository_table():
    assert {t.name for t in GENERATION_INPUTS} == set(GEN_INPUTS)
    with pytest.raises(KeyError):
        generation_inputs({"not_an_input": 1})


# --- Triton up or down: fail fast while it is down, serve again once a probe gets an answer

DOWN = InferenceServerException(msg="failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
                                    "Connection refused", status="StatusCode.UNAVAILABLE")


class FakeResult:
    def __init__(self, **tensors):
        self.tensors = {k: np.array([v], dtype=object if isinstance(v, bytes) else None) for k, v in tensors.items()}

    def as_numpy(self, name):
        return self.tensors.get(name)


class FakeStream:
    """A ModelStreamInfer call: its responses, then the end of the stream."""

    def __init__(self, responses):
        self.responses, self.cancelled = list(responses), False

    async def __anext__(self):
        if not self.responses:
            raise StopAsyncIteration
        return self.responses.pop(0)

    def __aiter__(self):
        return self

    def cancel(self):
        self.cancelled = True


class FakeClient:
    """Triton's gRPC client: `infer_errors` raised by the next infer calls, `ready_answers` by
    the next is_server_ready calls (an exception is raised), `streams` one per stream_infer."""

    def __init__(self, infer_errors=(), ready_answers=(), streams=(), health_input=True, name="triton"):
        self.infer_errors, self.ready_answers, self.streams = list(infer_errors), list(ready_answers), list(streams)
        self.health_input, self.name = health_input, name
        self.infers = 0

    async def get_server_metadata(self, **kw):
        return SimpleNamespace(name=self.name)

    async def infer(self, model, inputs, **kw):
        self.infers += 1
        if self.infer_errors:
            raise self.infer_errors.pop(0)
        return FakeResult(**{EMBEDDING: np.ones(4, np.float32)})

    async def is_server_ready(self, **kw):
        answer = self.ready_answers.pop(0) if self.ready_answers else True
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def is_model_ready(self, model, **kw):
        return True

    async def get_model_metadata(self, model, **kw):
        names = [TEXT] + ([HEALTH] if model.startswith("chat") and self.health_input else [])
        return SimpleNamespace(inputs=[SimpleNamespace(name=n) for n in names])

    def stream_infer(self, requests, **kw):
        return self.streams.pop(0)

    async def close(self):
        pass


def backend_with(client: FakeClient, expected_id: str | None = None) -> TritonBackend:
    backend = TritonBackend("127.0.0.1:1", probe_interval_s=0, expected_id=expected_id)
    backend._client = client
    return backend


def test_while_triton_is_down_requests_are_refused_without_a_call_and_served_once_it_is_back():
    async def scenario():
        client = FakeClient(infer_errors=[DOWN], ready_answers=[DOWN, False, True])
        backend = backend_with(client)
        with pytest.raises(APIError) as first:
            await backend.embed("emb", ["hello"], 8)
        assert (first.value.status, first.value.code) == (503, "triton_unavailable") and not backend.up
        with pytest.raises(APIError) as fast:  # refused at once: Triton is not even asked
            await backend.embed("emb", ["hello"], 8)
        gen = backend.generate("chat", {TEXT_INPUT: "hi"})
        with pytest.raises(APIError) as fast_gen:
            await gen.__anext__()
        assert client.infers == 1
        for err in (fast.value, fast_gen.value):
            assert (err.status, err.code) == (503, "triton_unavailable") and err.retry_after
        await backend._probe  # the probe asks until Triton answers ready (down, not ready, ready)
        assert backend.up and client.ready_answers == []
        vectors = await backend.embed("emb", ["hello"], 8)
        assert vectors.shape == (1, 4) and client.infers == 2
        await backend.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("err, down", [
    (DOWN, True),
    (InferenceServerException(msg="Socket closed", status="StatusCode.UNAVAILABLE"), True),
    (InferenceServerException(msg="Request for unknown model: 'm' is not found", status="StatusCode.UNAVAILABLE"), False),
    (InferenceServerException(msg="UNAVAILABLE: the engine is broken"), False),  # a model's own error, in-band
    (InferenceServerException(msg="Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED"), False),
])
def test_only_an_unreachable_triton_marks_it_down(err, down):
    assert unreachable(err) is down


def test_a_model_error_leaves_triton_up():
    async def scenario():
        backend = backend_with(FakeClient(infer_errors=[InferenceServerException(msg="something broke inside",
                                                                                 status="StatusCode.INTERNAL")]))
        with pytest.raises(APIError) as err:
            await backend.embed("emb", ["hello"], 8)
        assert err.value.status == 500 and backend.up
        assert (await backend.embed("emb", ["hello"], 8)).shape == (1, 4)

    asyncio.run(scenario())


HEALTHY = (FakeResult(**{FINISH_REASON: HEALTH_FINISH_REASON.encode()}), None)
BROKEN = (None, InferenceServerException(msg="the generation engine is broken; the model refuses requests"))


@pytest.mark.parametrize("answer, healthy", [
    (HEALTHY, True),
    (BROKEN, False),
    ((FakeResult(**{FINISH_REASON: b"stop", TEXT_OUTPUT: b"hi"}), None), False),  # generated instead of answering
])
def test_health_answers(answer, healthy):
    assert health_answer(*answer) is healthy


def test_readiness_asks_each_generation_model_itself():
    async def scenario():
        good, broken = FakeStream([HEALTHY]), FakeStream([BROKEN])
        backend = backend_with(FakeClient(streams=[good, broken]))
        server, states = await backend.ready(["emb", "chat-a", "chat-b"])
        assert server and states == {"emb": True, "chat-a": True, "chat-b": False}
        assert not good.cancelled and good.responses == []  # the healthy stream ended on its own
        assert broken.cancelled
        silent = backend_with(FakeClient(streams=[FakeStream([])]))  # the stream ends without an answer
        assert (await silent.ready(["chat-a"]))[1] == {"chat-a": False}
        older = backend_with(FakeClient(health_input=False))  # a repository without the HEALTH input
        assert (await older.ready(["chat-a"]))[1] == {"chat-a": True}

    asyncio.run(scenario())


def test_readiness_that_finds_triton_again_ends_the_outage():
    async def scenario():
        backend = backend_with(FakeClient(infer_errors=[DOWN]))
        with pytest.raises(APIError):
            await backend.embed("emb", ["hello"], 8)
        backend._probe.cancel()
        assert not backend.up
        assert (await backend.ready(["emb"]))[0] is True and backend.up

    asyncio.run(scenario())


def test_a_stranger_on_tritons_address_is_never_ready():
    """A ready server that is not the Triton the gateway was given (an orphan of an earlier run
    on the same port) leaves /ready false, and an outage does not end through it."""
    async def scenario():
        stranger = backend_with(FakeClient(name="kiln-orphan"), expected_id="kiln-ours")
        assert (await stranger.ready(["emb"]))[0] is False
        ours = backend_with(FakeClient(name="kiln-ours"), expected_id="kiln-ours")
        assert (await ours.ready(["emb"]))[0] is True
        client = FakeClient(infer_errors=[DOWN], name="kiln-orphan")
        down = backend_with(client, expected_id="kiln-ours")
        with pytest.raises(APIError):
            await down.embed("emb", ["hello"], 8)
        await asyncio.sleep(0.05)  # the probe finds a ready server, but not ours: still down
        assert not down.up
        client.name = "kiln-ours"
        await asyncio.wait_for(down._probe, 5)
        assert down.up
        await down.close()

    asyncio.run(scenario())
