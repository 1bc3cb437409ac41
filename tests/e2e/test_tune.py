"""`kiln tune` as a user runs it (a subprocess: Locust runs on gevent), on the tiny encoder with a
short budget: each candidate on a real Triton with the SLO file's capacity search. The spec it
writes passes `kiln loadtest` on its own; an SLO nothing can meet exits 1 with the table and
writes no spec."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

from kiln_testkit import KILN, tiny_spec

SHAPE = {"kind": "users", "protocol": "grpc", "users": 2, "run_time_s": 5,
         "start_rate": 15, "step_factor": 2, "step_time_s": 2, "max_steps": 3}


@pytest.fixture(scope="module")
def spec_file(tiny_bert, tmp_path_factory):
    """The tiny encoder's spec as a user's YAML file, exported once for both tests."""
    from export.pipeline import run_export

    work = tmp_path_factory.mktemp("tune")
    spec = tiny_spec(tiny_bert, work, name="tuned", precisions=["fp32"],
                     batching={"max_batch_size": 16, "preferred_batch_sizes": [4, 8], "max_queue_delay_us": 1000},
                     instances={"intra_op_threads": 1})
    run_export(spec)
    path = work / "tuned.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    return spec, path


def kiln(*args, timeout=600):
    r = subprocess.run([str(KILN), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONSAFEPATH": "1"})
    print(r.stderr[-4000:])
    return r


def slo_file(tmp_path, targets: dict):
    path = tmp_path / "slo.yaml"
    path.write_text(yaml.safe_dump({"loadtest": {"targets": targets, "shape": SHAPE}}))
    return path


def test_tune_writes_the_best_candidate_as_a_spec_that_passes_its_load_test(spec_file, tmp_path):
    spec, path = spec_file
    slo = slo_file(tmp_path, {"p50_ms": 250, "p95_ms": 500, "p99_ms": None, "min_qps": 5, "max_error_ratio": 0.01})
    out = tmp_path / "best.yaml"
    r = kiln("tune", path, "--slo", slo, "--budget", 45, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    folder = spec.root / "tune"
    record = json.loads((folder / "tune.json").read_text())
    ran = [c for c in record["candidates"] if c["run"] is not None]
    assert len(ran) >= 2 and ran[0]["name"] == "spec as given"  # the spec itself, then changes of it
    winner = next(c for c in record["candidates"] if c["name"] == record["best"])
    assert winner["meets"] and winner["run"]["verdict"] == "PASS"
    assert winner["run"]["measured"]["qps"] == max(c["run"]["measured"]["qps"] for c in ran if c["meets"])
    assert "kiln tune" in r.stderr and f"best of {len(ran)} candidates" in r.stderr and "cores" in r.stderr
    assert (folder / "tune.png").read_bytes()[:4] == b"\x89PNG" and "data:image/png" in (folder / "tune.html").read_text()

    tuned = yaml.safe_load(out.read_text())
    for section, values in winner["overrides"].items():  # the winner's settings, the rest as the file had them
        assert {k: tuned[section][k] for k in values} == values
    assert tuned["source"] == yaml.safe_load(path.read_text())["source"]
    assert tuned["loadtest"]["targets"]["p95_ms"] == 500  # the SLO goes with it
    check = kiln("loadtest", out, "--out-dir", tmp_path / "check")
    assert check.returncode == 0, check.stderr[-3000:]
    assert "verdict: PASS" in check.stderr


def test_an_slo_nothing_meets_exits_1_with_the_table_and_writes_no_spec(spec_file, tmp_path):
    spec, path = spec_file
    slo = slo_file(tmp_path, {"p50_ms": 0.01, "p95_ms": 0.02, "p99_ms": None, "min_qps": 1})
    out = tmp_path / "never.yaml"
    r = kiln("tune", path, "--slo", slo, "--budget", 5, "--out", out)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "no candidate met the SLO" in r.stderr and "misses" in r.stderr and "not run (budget)" in r.stderr
    assert not out.exists()
    record = json.loads((spec.root / "tune" / "tune.json").read_text())
    assert record["best"] is None and record["candidates"][0]["run"]["verdict"] == "FAIL"


def test_a_bad_slo_file_is_a_usage_error(spec_file, tmp_path):
    _, path = spec_file
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"loadtest": {"targets": {"p95_ms": -1}}}))
    r = kiln("tune", path, "--slo", bad, timeout=120)
    assert r.returncode == 2 and "loadtest.targets.p95_ms" in r.stderr
