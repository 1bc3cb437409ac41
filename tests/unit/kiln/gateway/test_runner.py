"""Stopping the gateway drains it: new requests get 503 with Retry-After while those in
flight finish, and uvicorn exits once nothing is in flight (or at the deadline)."""

from __future__ import annotations

import asyncio
import json
import signal

import uvicorn

from kiln.gateway.runner import DrainGate, DrainingServer


class SlowApp:
    """An ASGI app whose /slow requests wait for `release`; everything else answers at once."""

    def __init__(self):
        self.release = asyncio.Event()

    async def __call__(self, scope, receive, send):
        if scope["path"] == "/slow":
            await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})


async def call(gate: DrainGate, path: str) -> tuple[int, dict, bytes]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await gate({"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""}, receive, send)
    start = sent[0]
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, b"".join(
        m.get("body", b"") for m in sent[1:])


def test_a_drain_refuses_new_requests_and_waits_for_those_in_flight():
    async def scenario():
        app = SlowApp()
        gate = DrainGate(app)
        slow = asyncio.ensure_future(call(gate, "/slow"))
        await asyncio.sleep(0)
        assert gate.in_flight == 1 and not gate.drained()
        gate.begin(30)
        status, headers, body = await call(gate, "/v1/embeddings")
        assert status == 503 and int(headers["retry-after"]) >= 1
        assert json.loads(body)["error"]["code"] == "shutting_down"
        assert (await call(gate, "/health"))[0] == 200  # liveness still answers during the drain
        assert not gate.drained()  # the slow request is still running
        app.release.set()
        assert await slow == (200, {}, b"done")
        assert gate.in_flight == 0 and gate.drained()

    asyncio.run(scenario())


def test_the_deadline_ends_a_drain_that_requests_in_flight_would_hold_up():
    async def scenario():
        gate = DrainGate(SlowApp())
        slow = asyncio.ensure_future(call(gate, "/slow"))
        await asyncio.sleep(0)
        gate.begin(0)
        assert gate.in_flight == 1 and gate.drained()
        slow.cancel()

    asyncio.run(scenario())


def test_the_first_signal_drains_and_a_second_stops_at_once():
    gate = DrainGate(SlowApp())
    server = DrainingServer(uvicorn.Config(gate), gate, drain_s=30)
    server.handle_exit(signal.SIGTERM, None)
    assert gate.draining and not server.should_exit
    assert asyncio.run(server.on_tick(1)) is True  # nothing in flight: uvicorn may exit now
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit


def test_the_drain_deadline_is_the_gateways_setting_whichever_way_it_runs(make_repository):
    """`kiln gateway --drain-timeout` / `kiln serve --drain-timeout` set it in the config, so a
    gateway child process (one worker of several) drains as long as one in this process."""
    from kiln.gateway.config import GatewayConfig
    from kiln.gateway.runner import GatewayProcess, uvicorn_server

    config = GatewayConfig(port=0, repositories=[make_repository("chat", "text-generation")], drain_timeout_s=3)
    assert uvicorn_server(config).drain_s == 3
    child = GatewayProcess(config, log_file=make_repository("x", "text-generation") / "gateway.log")
    assert GatewayConfig.model_validate_json(child.command()[-1]).drain_timeout_s == 3
