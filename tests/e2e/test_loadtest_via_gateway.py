"""`kiln loadtest --protocol openai`: Locust through the OpenAI gateway, which the command
starts in front of Triton, gated on the spec's SLOs. Run as a subprocess, as users run it
(Locust monkey-patches with gevent)."""

import json
import os
import socket

import yaml

from kiln.processes import free_port
from kiln_testkit import KILN, run_to_exit

# generous for a loaded 2-core machine: these runs check the path and the figures, not speed
TARGETS = {"p50_ms": 3000, "p95_ms": 6000, "p99_ms": None, "min_qps": 1, "max_error_ratio": 0.0}


def loadtest(tmp_path, spec: str, shape: dict, *args, env=None):
    slo = tmp_path / "slo.yaml"
    slo.write_text(yaml.safe_dump({"loadtest": {"targets": TARGETS, "shape": shape}}))
    out = tmp_path / "report"
    r = run_to_exit([str(KILN), "loadtest", spec, "--protocol", "openai", "--slo", str(slo), "--out-dir", str(out), *args],
                    {**os.environ, "PYTHONSAFEPATH": "1", "COLUMNS": "160", **(env or {})}, mark="verdict:", timeout=240)
    print(r.stderr[-3000:])
    assert r.exit_after_mark_s is not None, "no verdict printed"  # and it ended by itself after printing it
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
    return r, summary, out


def listening(url: str) -> bool:
    host, _, port = url.rpartition(":")
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) == 0


def test_chat_streams_through_the_gateway_report_ttft_inter_token_and_tokens_per_second(tiny_llama, tmp_path):
    spec = {
        "name": "tinychat", "source": {"kind": "folder", "path": str(tiny_llama)}, "task": "text-generation",
        "precisions": ["fp32"], "serve_precision": "fp32", "workdir": str(tmp_path / "work"),
        # the shipped payload's longest sentence is ~650 tokens for this 400-token byte-level vocabulary
        "generation": {"max_context": 1024, "max_concurrent": 4, "parity_prompts": 2, "parity_new_tokens": 8,
                       "parity_decode_steps": 4},
    }
    spec_file = tmp_path / "tinychat.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    r, summary, out = loadtest(tmp_path, str(spec_file), {"kind": "users", "users": 2, "run_time_s": 8, "max_tokens": 16})
    assert r.returncode == 0, r.stderr[-3000:]
    m = summary["measured"]
    assert summary["verdict"] == "PASS" and m["failures"] == 0 and m["requests"] > 5, m
    entries = {e["name"]: e for e in summary["entries"]}
    assert {"tinychat", "tinychat TTFT", "tinychat inter-token", "tinychat tokens/s"} <= set(entries)
    assert all(e["type"] == "openai" and e["failures"] == 0 for e in entries.values())
    # requests are whole streams; the latency targets were judged on the first token
    assert entries["tinychat"]["requests"] == m["requests"]
    assert entries["tinychat inter-token"]["requests"] > entries["tinychat"]["requests"]
    assert m["latency_of"] == "TTFT" and m["p50_ms"] <= entries["tinychat"]["median"]
    assert [c["name"] for c in summary["checks"]][:2] == ["p50 TTFT", "p95 TTFT"]
    st = m["stream"]
    assert st["tokens_per_s_p50"] > 0 and st["output_tokens_per_s"] > 0 and st["inter_token_p95_ms"] is not None
    for row in ("TTFT ms", "inter-token ms", "tokens/s per stream", "whole stream ms"):
        assert row in r.stderr
    # the command started the gateway (keyless: no key given) and stopped it afterwards
    assert "no API keys configured" in (out / "gateway.log").read_text()
    assert not listening(summary["endpoint"]["url"])


def test_embeddings_through_the_gateway_with_a_key(minilm_export, tmp_path):
    spec, _ = minilm_export
    r, summary, out = loadtest(tmp_path, "minilm", {"kind": "users", "users": 4, "run_time_s": 8, "texts_per_request": 2},
                               "--workdir", str(spec.workdir), env={"KILN_API_KEY": "sk-loadtest-e2e"})
    assert r.returncode == 0, r.stderr[-3000:]
    m = summary["measured"]
    assert summary["verdict"] == "PASS" and m["failures"] == 0 and m["requests"] > 10, m
    assert m["latency_of"] == "latency" and m["stream"] is None
    assert [e["name"] for e in summary["entries"]] == ["minilm"]
    assert summary["entries"][0]["type"] == "openai"
    # the gateway started here accepted exactly the key the users sent
    assert "no API keys configured" not in (out / "gateway.log").read_text()
    assert "sk-loadtest-e2e" not in json.dumps(summary)
    assert not listening(summary["endpoint"]["url"])


def test_unreachable_gateway_fails_the_gate(tmp_path):
    r, summary, _ = loadtest(tmp_path, "minilm", {"users": 2, "run_time_s": 3}, "--url", f"127.0.0.1:{free_port()}")
    assert r.returncode == 1
    m = summary["measured"]
    assert summary["verdict"] == "FAIL" and m["failures"] == m["requests"] > 0 and m["rejections"] == 0
    assert any("APIConnectionError" in k for k in m["errors"]), m["errors"]
