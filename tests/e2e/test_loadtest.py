"""loadtest/: headless Locust runs against the real Triton, gated on SLOs, as
`kiln loadtest` runs them (a subprocess: Locust monkey-patches with gevent)."""

import json
import os
import subprocess
import textwrap

import numpy as np
import tritonclient.grpc as grpcclient
import yaml

from kiln.processes import free_port
from kiln_testkit import KILN, run_to_exit, serve
from model_repository.writer import write_repository


def loadtest(tmp_path, url, loadtest_cfg: dict, *args, workdir=None):
    slo = tmp_path / "slo.yaml"
    slo.write_text(yaml.safe_dump({"loadtest": loadtest_cfg}))
    out = tmp_path / "report"
    cmd = [str(KILN), "loadtest", "minilm", "--url", url, "--slo", str(slo), "--out-dir", str(out), *args]
    if workdir:
        cmd += ["--workdir", str(workdir)]
    # every run also checks that the command ends by itself once it has printed its verdict
    r = run_to_exit(cmd, {**os.environ, "PYTHONSAFEPATH": "1", "COLUMNS": "160"}, mark="verdict:")
    assert r.exit_after_mark_s is not None, f"no verdict printed:\n{r.stderr[-2000:]}"
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
    return r, summary, out


def test_ci_gate_run_against_the_packaged_default(minilm_int8_server, tmp_path):
    """The bounded run `make test` includes: 20 s of load, the packaged spec's targets for a
    2-core CPU machine (with headroom). A missed target fails this test and so CI."""
    spec, server = minilm_int8_server
    r, summary, out = loadtest(tmp_path, server.grpc_url, {"shape": {"kind": "users", "users": 4, "run_time_s": 20}},
                               workdir=spec.workdir)
    print(r.stderr[-2500:])
    assert r.returncode == 0, r.stderr[-3000:]
    assert summary["verdict"] == "PASS" and summary["measured"]["requests"] > 50
    assert {"locust_stats.csv", "locust_failures.csv", "locust_report.html", "summary.json"} <= {p.name for p in out.iterdir()}
    assert "p95 latency" in r.stderr and "verdict: PASS" in r.stderr


def test_unreachable_target_fails(tmp_path):
    r, summary, _ = loadtest(tmp_path, f"127.0.0.1:{free_port()}", {"shape": {"run_time_s": 3, "users": 2}})
    assert r.returncode == 1
    assert summary["verdict"] == "FAIL" and summary["measured"]["failures"] == summary["measured"]["requests"] > 0
    assert "FAIL error ratio" in r.stderr and "FAIL throughput" in r.stderr


def test_impossible_latency_ceiling_fails_naming_the_target(minilm_int8_server, tmp_path):
    spec, server = minilm_int8_server
    cfg = {"targets": {"p50_ms": 0.01, "p95_ms": None, "p99_ms": None, "min_qps": 1}, "shape": {"run_time_s": 4, "users": 2}}
    r, summary, _ = loadtest(tmp_path, server.grpc_url, cfg, workdir=spec.workdir)
    assert r.returncode == 1
    failed = [c["name"] for c in summary["checks"] if not c["passed"]]
    assert failed == ["p50 latency"], summary["checks"]
    assert "ms over" in r.stderr


def test_http_protocol_and_open_loop_rate(minilm_int8_server, tmp_path):
    spec, server = minilm_int8_server
    cfg = {"shape": {"kind": "rate", "protocol": "http", "rate": 10, "run_time_s": 5}, "targets": {"min_qps": 5}}
    r, summary, _ = loadtest(tmp_path, server.http_url, cfg, workdir=spec.workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    m = summary["measured"]
    assert 8 <= m["offered_rps"] <= 12, m  # open loop: the client sent on schedule
    assert m["failures"] == 0


def test_capacity_search_reports_highest_sustained_rate(minilm_int8_server, tmp_path):
    spec, server = minilm_int8_server
    cfg = {"shape": {"kind": "capacity", "start_rate": 5, "step_factor": 2, "step_time_s": 3, "max_steps": 3},
           "targets": {"p95_ms": 1000, "min_qps": 1}}
    r, summary, _ = loadtest(tmp_path, server.grpc_url, cfg, workdir=spec.workdir)
    assert summary["steps"] and summary["steps"][0]["offered_rps"] == 5
    sustained = [s["offered_rps"] for s in summary["steps"] if s["sustained"]]
    assert summary["capacity_qps"] == (max(sustained) if sustained else None)
    assert "capacity:" in r.stderr


def test_overload_is_shed_by_the_bounded_queue_and_server_recovers(minilm_export, tmp_path):
    """Far above capacity the bounded queues reject (counted apart from other failures)
    instead of letting latency grow; afterwards the server answers normally."""
    spec, manifest = minilm_export
    tight = spec.model_copy(update={"batching": spec.batching.model_copy(update={"max_queue_size": 2})})
    repo = write_repository(tight, manifest, tmp_path / "repo")
    with serve(repo, tmp_path / "srv") as stack:
        server = stack.triton
        cfg = {"shape": {"kind": "rate", "rate": 400, "run_time_s": 4, "max_in_flight": 512}}
        r, summary, _ = loadtest(tmp_path, server.grpc_url, cfg, workdir=spec.workdir)
        m = summary["measured"]
        print(json.dumps({k: m[k] for k in ("requests", "failures", "rejections", "qps", "p95_ms")}))
        assert m["rejections"] > 0, m
        assert m["other_failures"] == 0, m["errors"]
        assert m["requests"] - m["failures"] > 0
        assert "rejected" in r.stderr
        client = grpcclient.InferenceServerClient(server.grpc_url)
        inp = grpcclient.InferInput("text", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[b"after the storm"]], dtype=object))
        assert client.infer(spec.name, [inp]).as_numpy("embedding").shape == (1, 384)


ECHO_MODEL = textwrap.dedent('''
    import numpy as np
    import time
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            for request in requests:
                sender = request.get_response_sender()
                text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0].decode()
                n = int(pb_utils.get_input_tensor_by_name(request, "max_tokens").as_numpy().reshape(-1)[0])
                for word in text.split()[:n]:
                    time.sleep(0.005)
                    sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("text_output", np.array([word.encode()], dtype=object))]))
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return None
''')

ECHO_CONFIG = '''
name: "echo_stream"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "text_input" data_type: TYPE_STRING dims: [1] },
        { name: "max_tokens" data_type: TYPE_INT32 dims: [1] } ]
output [ { name: "text_output" data_type: TYPE_STRING dims: [1] } ]
'''


def test_streaming_user_reports_ttft_inter_token_and_tokens_per_second(tmp_path):
    """The streaming user against a decoupled model in the real Triton (a word-echo model
    built here; the chat model plugs into the same user)."""
    repo = tmp_path / "stream_repo"
    (repo / "echo_stream" / "1").mkdir(parents=True)
    (repo / "echo_stream" / "1" / "model.py").write_text(ECHO_MODEL)
    (repo / "echo_stream" / "config.pbtxt").write_text(ECHO_CONFIG)
    (repo / "kiln.json").write_text("{}")
    with serve(repo, tmp_path / "srv") as stack:
        server = stack.triton
        slo = tmp_path / "slo.yaml"
        slo.write_text(yaml.safe_dump({"loadtest": {"shape": {"protocol": "stream", "users": 2, "run_time_s": 4},
                                                     "targets": {"min_qps": 0.5}}}))
        spec_file = tmp_path / "echo.yaml"
        spec_file.write_text(yaml.safe_dump({"name": "echo_stream", "source": {"kind": "folder", "path": str(tmp_path)}}))
        out = tmp_path / "report"
        r = subprocess.run([str(KILN), "loadtest", str(spec_file), "--url", server.http_url, "--slo", str(slo),
                            "--out-dir", str(out)], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    entries = {e["name"]: e for e in json.loads((out / "summary.json").read_text())["entries"]}
    assert {"echo_stream", "echo_stream TTFT", "echo_stream inter-token", "echo_stream tokens/s"} <= set(entries)
    assert entries["echo_stream inter-token"]["requests"] > entries["echo_stream"]["requests"] > 0
    assert entries["echo_stream"]["failures"] == 0
