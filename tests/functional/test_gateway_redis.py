"""Two gateway processes, one limit: `kiln gateway --redis URL` keeps the per-key buckets in a
real redis-server, so a key's requests per minute hold across both processes; with Redis
gone, a gateway that fails open keeps serving (and /ready says the limits are degraded)
while one that fails closed refuses with 503, and both enforce again once Redis is back.
No Triton is needed: GET /v1/models is counted against the key's requests per minute."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from kiln.gateway.config import GatewayConfig, Limits
from kiln.gateway.runner import GatewayProcess
from kiln.redis_server import RedisServer
from kiln.processes import free_port
from kiln_core.card import RepositoryCard
from kiln_testkit import per_process, status_with_key

KEY = "sk-shared-limit"
RPM = 6


def models(gateway: GatewayProcess) -> tuple[int, dict]:
    req = urllib.request.Request(gateway.url + "/v1/models", headers={"authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def chat_repository(folder):
    """A repository as the gateway reads it: just the card of a chat model."""
    folder.mkdir(parents=True)
    RepositoryCard(public_model="lm", task="text-generation", models=["lm"], runtime="python-ort", precision="fp32",
                   variant_sha256="0" * 64, parity={}, max_input_tokens=128, max_batch_size=4, inputs={}, outputs={},
                   spec={}).write(folder)
    return folder


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Redis and two gateways on it: "open" fails open, "closed" fails closed."""
    tmp = tmp_path_factory.mktemp("redis-gateways")
    repo = chat_repository(tmp / "repo")
    with RedisServer(workdir=tmp / "redis") as redis:
        gateways = {}
        try:
            for name, closed in (("open", False), ("closed", True)):
                config = GatewayConfig(port=free_port(), repositories=[repo], limits=Limits(rpm=RPM),
                                       triton_grpc=f"127.0.0.1:{free_port()}", redis_url=redis.url,
                                       limits_fail_closed=closed)
                gateways[name] = GatewayProcess(config, tmp / f"gateway-{name}.log",
                                                env={"KILN_API_KEYS": KEY}).start()
            yield redis, gateways
        finally:
            for g in gateways.values():
                g.stop(timeout=10)


def test_a_keys_limit_holds_across_two_gateway_processes(shared):
    redis, gateways = shared
    statuses = [models(gateways["open" if i % 2 else "closed"])[0] for i in range(2 * RPM)]
    assert statuses.count(200) == RPM and statuses.count(429) == RPM, statuses
    assert statuses[:RPM] == [200] * RPM  # the first six in order, whichever process answered them


def test_without_redis_one_fails_open_one_fails_closed_and_both_recover(shared):
    redis, gateways = shared
    redis.kill()
    try:
        served = [models(gateways["open"])[0] for _ in range(2 * RPM)]
        assert served == [200] * (2 * RPM)  # no limits, but served
        status, body = models(gateways["closed"])
        assert status == 503 and body["error"]["code"] == "limits_unavailable", body
        assert gateways["open"].get("/ready")[1]["limits"] == "degraded"
        assert gateways["closed"].get("/ready")[1]["limits"] == "down"
    finally:
        redis.restart()  # comes back empty: fresh buckets
    # (a gateway retries Redis at most once a second after a failure)
    for name in ("open", "closed"):
        assert wait_for(lambda: gateways[name].get("/ready")[1].get("limits") == "ok"), name
    assert models(gateways["closed"])[0] == 200
    statuses = [models(gateways["open"])[0] for _ in range(2 * RPM)]
    assert statuses.count(429) >= RPM, statuses  # enforced again


def wait_for(predicate, seconds: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_gateway_workers_share_one_port_and_one_limit(shared, tmp_path):
    """`kiln serve --gateway-workers 2`: two processes on one port (SO_REUSEPORT), limits in
    Redis: the key's rpm holds across them and both answered some of its requests."""
    from kiln.gateway.runner import GatewayGroup

    redis, _ = shared
    redis.restart()  # empty buckets (keys from KILN_API_KEYS share their principal's name with the tests above)
    config = GatewayConfig(port=free_port(), repositories=[chat_repository(tmp_path / "repo")], limits=Limits(rpm=RPM),
                           triton_grpc=f"127.0.0.1:{free_port()}", redis_url=redis.url)
    key = "sk-workers"
    with GatewayGroup.of(config, 2, tmp_path, {"KILN_API_KEYS": key}).start() as group:
        assert len({w.process.pid for w in group.workers}) == 2 and group.running()
        statuses = [status_with_key(group.url, key) for _ in range(3 * RPM)]  # a new connection each
        assert statuses.count(200) == RPM and statuses.count(429) == 2 * RPM, statuses
        seen = per_process(group.url, 2)  # each worker counts what it answered
        assert len(seen) == 2 and all(ok + r > 0 for ok, r in seen.values()), seen  # both answered some
        assert sum(ok for ok, _ in seen.values()) == RPM and sum(r for _, r in seen.values()) == 2 * RPM, seen
    assert not any(w.running() for w in group.workers)

