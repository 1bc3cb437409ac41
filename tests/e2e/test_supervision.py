"""`kiln serve` survives Triton dying: kill -9 of the real tritonserver, the gateway answers
503 with Retry-After at once while Triton restarts, serves again without a restart of its
own, counts the restart in /metrics, and SIGTERM still ends everything cleanly."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from email.message import Message

import yaml

from kiln.faults import tritonserver_child
from kiln.processes import free_port
from kiln_testkit import KILN


def embed(gateway: str) -> tuple[int, Message, float]:
    """(status, headers, seconds) of one POST /v1/embeddings."""
    req = urllib.request.Request(f"{gateway}/v1/embeddings", json.dumps({"model": "tiny", "input": "hello"}).encode(),
                                 {"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return r.status, r.headers, time.perf_counter() - start
    except urllib.error.HTTPError as err:
        err.read()
        return err.code, err.headers, time.perf_counter() - start


def wait_for(predicate, seconds: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"kiln serve exited with {proc.returncode} while waiting for {what}"
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {seconds:.0f}s")


def gateway_ready(gateway: str) -> bool:
    try:
        return urllib.request.urlopen(f"{gateway}/ready", timeout=2).status == 200
    except OSError:
        return False


def test_kiln_serve_restarts_a_killed_triton_and_the_gateway_fails_fast_meanwhile(tiny_bert, tmp_path):
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(yaml.safe_dump({
        "name": "tiny", "source": {"kind": "folder", "path": str(tiny_bert)}, "max_length": 64,
        "precisions": ["fp32"], "serve_precision": "fp32", "workdir": str(tmp_path / "work"),
    }))
    gw_port = free_port()
    gateway = f"http://127.0.0.1:{gw_port}"
    cmd = [str(KILN), "serve", str(spec_file), "--http-port", str(free_port()), "--grpc-port", str(free_port()),
           "--metrics-port", str(free_port()), "--gateway-port", str(gw_port)]
    env = {k: v for k, v in os.environ.items() if k != "KILN_API_KEYS"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**env, "PYTHONSAFEPATH": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "400"})
    try:
        wait_for(lambda: gateway_ready(gateway), 240, proc, "the gateway's /ready")
        assert embed(gateway)[0] == 200
        first = tritonserver_child(proc.pid)
        assert first is not None

        os.kill(first, signal.SIGKILL)
        killed = time.monotonic()
        refusals, status = [], 0
        while time.monotonic() - killed < 90:  # the backoff second plus Triton's start
            status, headers, seconds = embed(gateway)
            if status == 200:
                break
            assert status == 503 and int(headers.get("Retry-After", 0)) >= 1, (status, dict(headers))
            refusals.append(seconds)
            time.sleep(0.05)
        recovered = time.monotonic() - killed
        assert status == 200, "the gateway did not serve again after Triton's restart"
        assert len(refusals) >= 3
        print(f"\n503 answers while Triton was down: {len(refusals)}, median {statistics.median(refusals) * 1000:.1f} ms, "
              f"max {max(refusals) * 1000:.1f} ms; serving again {recovered:.1f}s after kill -9")
        assert max(refusals) < 1.0
        second = tritonserver_child(proc.pid)
        assert second not in (None, first)
        metrics = urllib.request.urlopen(f"{gateway}/metrics", timeout=5).read().decode()
        assert "kiln_triton_restarts_total 1.0" in metrics

        proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        out, _ = proc.communicate(timeout=45)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert time.monotonic() - stopped < 35  # within the 30 s drain deadline (and Triton's own stop)
    assert "Triton died (killed by SIGKILL" in out and "Triton is back (restart 1)" in out
    assert "gateway and Triton stopped (exit 0)" in out
    assert tritonserver_child(proc.pid) is None
