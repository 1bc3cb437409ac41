"""kiln.stack.Stack with fake Triton and gateway classes: what starts in which order, and that
whatever started is stopped however the stack ends. No server runs here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.canary import GATEWAY_FILE
from kiln.gateway.config import GatewayConfig, GatewayError
from kiln.gateway.runner import GatewayProcess
from kiln.processes import PortBusy, PortHolder
from kiln.server import ServerError
from kiln.stack import GatewayOptions, Stack, _make_gateway
from kiln_core.spec import Ports

BUSY = 8001  # the port a stranger holds in these tests


class FakeProcess:
    def __init__(self):
        self.returncode = None

    def poll(self):
        return self.returncode


class FakeTriton:
    """Records its calls in `log`; `fail_start` makes start raise as a Triton that does not load."""

    def __init__(self, log: list, fail_start: bool = False):
        self.log, self.fail_start = log, fail_start

    def __call__(self, repositories, ports: Ports, workdir: Path) -> "FakeTriton":
        """One server (a replica each call), recording into the same log."""
        made = FakeTriton(self.log, self.fail_start)
        made.repositories, made.ports, made.workdir, made.process = repositories, ports, workdir, None
        made.server_id = f"kiln-fake-{ports.grpc}"
        return made

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    def check_ports(self) -> None:
        if self.ports.grpc == BUSY:
            raise PortBusy("Triton gRPC", "127.0.0.1", BUSY, PortHolder(4242, "tritonserver (an orphan)"))

    def start(self, timeout: float) -> None:
        self.log.append(("triton start", self.ports))
        if self.fail_start:
            raise ServerError("tritonserver exited with code 1")
        self.process = FakeProcess()

    def ready(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def stop(self) -> int | None:
        self.log.append(("triton stop", self.ports))
        if self.process is not None and self.process.returncode is None:
            self.process.returncode = 0
        return self.process.returncode if self.process else None


class FakeGateway:
    def __init__(self, log: list, options: GatewayOptions, config: GatewayConfig, workdir: Path,
                 fail: str | None = None):
        self.log, self.options, self.config, self.workdir, self.fail = log, options, config, workdir, fail
        self.up = False

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def check_port(self) -> None:
        if self.config.port == BUSY:
            raise PortBusy("gateway", "127.0.0.1", BUSY, None)

    def start(self) -> None:
        self.log.append("gateway start")
        if self.fail == "start":
            raise RuntimeError("the gateway exited with code 2")
        self.up = True

    def wait_ready(self) -> dict:
        self.log.append("gateway ready")
        if self.fail == "ready":
            raise RuntimeError("the gateway's /ready did not turn 200")
        return {}

    def running(self) -> bool:
        return self.up

    def get(self, path: str) -> tuple[int, dict]:
        return (200 if self.up else 0), {}

    def stop(self) -> None:
        self.log.append("gateway stop")
        self.up = False


def stack(tmp_path, log, gateway: GatewayOptions | None = None, fail_triton=False, fail_gateway=None, **kw) -> Stack:
    return Stack([tmp_path / "repo"], tmp_path / "srv", gateway=gateway, triton_class=FakeTriton(log, fail_triton),
                 gateway_class=lambda o, c, w: FakeGateway(log, o, c, w, fail_gateway), **kw)


def names(log) -> list[str]:
    return [e if isinstance(e, str) else e[0] for e in log]


def test_triton_starts_before_the_gateway_and_stops_after_it(tmp_path):
    log = []
    with stack(tmp_path, log, GatewayOptions()) as s:
        assert s.ready() and s.alive()
        assert s.gateway_url == s.gateway.url
        # where `kiln reload --canary` finds the gateway while it runs
        assert json.loads((s.workdir / GATEWAY_FILE).read_text()) == {"url": s.gateway.url, "workers": 1}
    assert names(log) == ["triton start", "gateway start", "gateway ready", "gateway stop", "triton stop"]
    assert not s.started and not (s.workdir / GATEWAY_FILE).exists()


def test_the_gateway_is_pointed_at_the_stacks_triton_on_a_free_port(tmp_path):
    log = []
    s = stack(tmp_path, log, GatewayOptions(GatewayConfig(port=0, max_body_bytes=4096)))
    cfg = s.gateway.config
    assert cfg.triton_grpc == s.triton.grpc_url and cfg.repositories == [tmp_path / "repo"]
    assert cfg.triton_ids == [s.triton.server_id]  # the gateway's /ready believes only this server
    assert cfg.port > 0 and cfg.max_body_bytes == 4096
    assert len({cfg.port, s.triton.ports.http, s.triton.ports.grpc, s.triton.ports.metrics}) == 4
    fixed = stack(tmp_path, log, GatewayOptions(GatewayConfig(port=9123)), ports=Ports(http=1, grpc=2, metrics=3))
    assert fixed.gateway.config.port == 9123 and fixed.triton.ports == Ports(http=1, grpc=2, metrics=3)
    assert log == []  # nothing starts before start()


def test_triton_failing_to_start_is_raised_and_the_gateway_never_starts(tmp_path):
    log = []
    with pytest.raises(ServerError, match="exited with code 1"):
        stack(tmp_path, log, GatewayOptions(), fail_triton=True).start()
    assert "gateway start" not in names(log) and names(log)[-1] == "triton stop"


@pytest.mark.parametrize("busy", ["triton", "gateway"])
def test_a_port_held_by_another_process_refuses_before_anything_starts(tmp_path, busy):
    """Nothing of the stack starts beside a stranger on one of its ports (an orphaned Triton
    would otherwise answer its readiness): the refusal names the port and the holder."""
    log = []
    ports = Ports(http=18000, grpc=BUSY if busy == "triton" else 18001, metrics=18002)
    gateway = GatewayOptions(GatewayConfig(port=BUSY if busy == "gateway" else 0))
    with pytest.raises(PortBusy, match=f"port {BUSY} on 127.0.0.1 is in use") as err:
        stack(tmp_path, log, gateway, ports=ports).start()
    assert log == [] or names(log) == ["gateway stop", "triton stop"]
    assert "triton start" not in names(log) and "gateway start" not in names(log)
    if busy == "triton":
        assert "pid 4242 (tritonserver (an orphan))" in str(err.value)


@pytest.mark.parametrize("fail", ["start", "ready"])
def test_a_gateway_that_fails_to_come_up_takes_triton_down(tmp_path, fail):
    log = []
    with pytest.raises(RuntimeError, match="gateway"):
        with stack(tmp_path, log, GatewayOptions(), fail_gateway=fail):
            pytest.fail("the with-block must not run")
    assert names(log)[-2:] == ["gateway stop", "triton stop"]


def test_ctrl_c_inside_the_stack_stops_everything(tmp_path):
    log = []
    with pytest.raises(KeyboardInterrupt):
        with stack(tmp_path, log, GatewayOptions()):
            raise KeyboardInterrupt
    assert names(log)[-2:] == ["gateway stop", "triton stop"]


def test_restart_keeps_the_ports_and_the_gateway(tmp_path):
    log = []
    with stack(tmp_path, log, GatewayOptions()) as s:
        gateway, ports = s.gateway, s.triton.ports
        del log[:]
        s.restart_triton()
        assert s.gateway is gateway and gateway.running() and s.ready()
    assert log[:4] == [("triton stop", ports), ("triton start", ports), "gateway ready", "gateway stop"]


def test_a_gateway_started_later_is_stopped_with_the_stack(tmp_path):
    log = []
    with stack(tmp_path, log) as s:
        assert s.gateway is None and s.gateway_url is None and s.ready()
        gw = s.start_gateway(GatewayOptions())
        assert s.gateway is gw and gw.config.triton_grpc == s.triton.grpc_url
        with pytest.raises(RuntimeError, match="already has a gateway"):
            s.start_gateway(GatewayOptions())
    assert names(log) == ["triton start", "gateway start", "gateway ready", "gateway stop", "triton stop"]


def test_triton_dying_on_its_own_shows_in_alive(tmp_path):
    with stack(tmp_path, []) as s:
        s.triton.process.returncode = 6
        assert not s.alive() and not s.ready()
        assert s.stop() == 6


def test_a_child_gateway_gets_exactly_the_keys_it_is_given(tmp_path):
    cfg = GatewayConfig(port=9999)
    gw = _make_gateway(GatewayOptions(keys="sk-one"), cfg, tmp_path)
    assert isinstance(gw, GatewayProcess)
    assert gw.env == {cfg.keys_env: "sk-one"} and gw.log_file == tmp_path / "gateway.log"
    inherit = _make_gateway(GatewayOptions(log_file=tmp_path / "gw.log"), cfg, tmp_path)
    assert inherit.env == {} and inherit.log_file == tmp_path / "gw.log"


def test_in_process_options_refuse_what_only_a_child_process_takes(tmp_path):
    with pytest.raises(ValueError, match="child process"):
        GatewayOptions(in_process=True, keys="")


def test_an_in_process_gateway_with_a_bad_repository_fails_before_triton_starts(tmp_path):
    log = []
    with pytest.raises(GatewayError):
        Stack([tmp_path / "not-a-repository"], tmp_path / "srv", gateway=GatewayOptions(in_process=True),
              triton_class=FakeTriton(log))
    assert log == []


def test_several_gateway_workers_are_child_processes_on_one_shared_port(tmp_path):
    from kiln.gateway.runner import GatewayGroup

    cfg = GatewayConfig(port=9999, redis_url="redis://127.0.0.1:1/0")
    group = _make_gateway(GatewayOptions(keys="sk-one", workers=3), cfg, tmp_path)
    assert isinstance(group, GatewayGroup) and len(group.workers) == 3
    assert all(w.config.reuse_port and w.config.port == 9999 and w.env == {cfg.keys_env: "sk-one"}
               for w in group.workers)
    assert len({w.log_file for w in group.workers}) == 3
    with pytest.raises(ValueError, match="child processes"):
        GatewayOptions(in_process=True, workers=2)


def test_replicas_each_get_their_own_ports_and_folder_and_the_gateway_all_of_them(tmp_path):
    log = []
    s = stack(tmp_path, log, GatewayOptions(GatewayConfig(port=0)), replicas=3)
    assert len(s.backends) == 3 and len({b.workdir for b in s.backends}) == 3
    assert len({b.ports.grpc for b in s.backends}) == 3
    cfg = s.gateway.config
    assert cfg.triton_grpc == s.backends[0].grpc_url and cfg.triton_replicas == [b.grpc_url for b in s.backends[1:]]
    # the admin routes' `kiln reload --server-dir`s: every Triton's folder, where its connection file is
    assert cfg.server_dirs == [b.workdir for b in s.backends] and cfg.admin_jobs_dir == tmp_path / "srv" / "admin-jobs"
