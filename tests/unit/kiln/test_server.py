"""kiln.server pieces that need no running server."""

from kiln.server import error_lines, free_ports, prepare_backends, server_env


def test_error_lines_keep_load_failures_and_drop_cpu_noise():
    log = "\n".join([
        'I1121 10:00:00 server.cc:1] "Started"',
        'W1121 10:00:00 metrics.cc:1] "Failed to initialize NVML"',
        'E1121 10:00:01 model_lifecycle.cc:1] "failed to load \'enc_encoder\' version 1: Internal: onnxruntime error"',
        "| enc_encoder | 1 | UNAVAILABLE: Internal: Load model failed |",
    ])
    lines = error_lines(log)
    assert any("failed to load 'enc_encoder'" in l for l in lines)
    assert any("UNAVAILABLE" in l for l in lines)
    assert not any("NVML" in l for l in lines)


def test_backend_dir_has_the_stub_for_this_python(tmp_path):
    import sys

    dest = prepare_backends(tmp_path / "backends")
    names = {p.name for p in (dest / "python").iterdir()}
    assert {"libtriton_python.so", "triton_python_backend_utils.py", "triton_python_backend_stub"} <= names, names
    assert sys.version_info[:2] == (3, 11)


def test_env_gives_the_stub_this_environment_and_safe_path():
    import sys
    from pathlib import Path

    env = server_env()
    first = Path(env["PATH"].split(":")[0])
    assert (first / "python3").exists() and first == Path(sys.prefix) / "bin"
    assert "nvidia_pytriton.libs" in env["LD_LIBRARY_PATH"]
    assert env["PYTHONSAFEPATH"] == "1"


def test_free_ports_are_distinct():
    p = free_ports()
    assert len({p.http, p.grpc, p.metrics}) == 3


class _Exited:
    def __init__(self, returncode):
        self.returncode, self.pid = returncode, 0

    def poll(self):
        return self.returncode


def test_a_dead_tritons_report_names_the_signal_and_its_last_errors(tmp_path):
    from kiln.server import TritonServer

    server = TritonServer(tmp_path / "repo", workdir=tmp_path)
    server.log_file.write_text('I1121 server.cc:1] "Started"\nE1121 python_be.cc:1] "Stub process is unhealthy"\n')
    server.process = _Exited(-9)
    report = server.exit_report()
    assert report.startswith("killed by SIGKILL") and "Stub process is unhealthy" in report and "Started" not in report
    server.process = _Exited(1)
    server.log_file.write_text("")
    assert server.exit_report().startswith("exit code 1") and "no error lines" in server.exit_report()


def test_error_lines_skip_what_every_cpu_only_start_says():
    log = "\n".join([
        'E1201 server.cc:241] "CudaDriverHelper has not been initialized."',
        'W1201 pinned_memory_manager.cc:170] "failed to allocate pinned system memory: no pinned memory pool"',
        'E1201 python_be.cc:1] "Stub process \'tiny_tokenizer_0_0\' is not healthy."',
    ])
    assert error_lines(log) == ['E1201 python_be.cc:1] "Stub process \'tiny_tokenizer_0_0\' is not healthy."']


def test_tritons_response_cache_is_sized_by_the_largest_card_unless_told(tmp_path):
    from kiln.server import TritonServer
    from kiln_core.card import RepositoryCard

    repos = []
    for name, mb in (("a", 16), ("b", 64), ("lm", 0)):
        repo = tmp_path / name
        repo.mkdir()
        RepositoryCard(public_model=name, task="feature-extraction", models=[name], runtime="python-ort",
                       precision="fp32", variant_sha256="0" * 64, parity={}, max_input_tokens=8, max_batch_size=4,
                       inputs={}, outputs={}, spec={}, response_cache_mb=mb).write(repo)
        repos.append(repo)
    cache = [a for a in TritonServer(repos, workdir=tmp_path).command() if a.startswith("--cache-config")]
    assert cache == [f"--cache-config=local,size={64 << 20}"]
    assert [a for a in TritonServer(repos, workdir=tmp_path, cache_mb=0.5).command()
            if a.startswith("--cache-config")] == [f"--cache-config=local,size={1 << 19}"]
    assert not any(a.startswith("--cache-config") for a in TritonServer(repos, workdir=tmp_path, cache_mb=0).command())
    assert not any(a.startswith("--cache-config") for a in TritonServer(repos[2:], workdir=tmp_path).command())


def test_stale_shared_memory_regions_are_removed_and_mapped_ones_kept(tmp_path):
    """What a killed Triton leaves in /dev/shm (regions nobody maps any more) goes at the next
    start; a region a running process still maps stays."""
    import mmap

    from kiln.server import SHM_PREFIX, remove_stale_shm_regions

    stale, live, other = (tmp_path / f"{SHM_PREFIX}-dead", tmp_path / f"{SHM_PREFIX}-live",
                          tmp_path / "someone-elses-region")
    for p in (stale, live, other):
        p.write_bytes(b"\0" * 4096)
    with open(live, "r+b") as f, mmap.mmap(f.fileno(), 4096):
        removed = remove_stale_shm_regions(tmp_path)
    assert removed == [stale]
    assert live.exists() and other.exists() and not stale.exists()


def test_readiness_is_believed_only_from_this_triton(tmp_path):
    """A server on Triton's HTTP port that answers ready but gives another name (an orphaned
    Triton of an earlier run) is not this Triton being ready."""
    import json
    import subprocess
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from kiln.server import TritonServer
    from kiln_core.spec import Ports

    name = {"value": "kiln-orphan"}

    class Stranger(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"name": name["value"], "version": "2.51.0"}).encode() if self.path == "/v2" else b""
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Stranger)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    server = TritonServer(tmp_path, Ports(http=httpd.server_address[1], grpc=1, metrics=2), workdir=tmp_path)
    server.process = subprocess.Popen(["sleep", "30"])  # our Triton "runs", but is not the one answering
    try:
        assert server.answering_id() == "kiln-orphan" and not server.ready()
        name["value"] = server.server_id
        assert server.ready()
        server.process.kill()
        server.process.wait()
        assert not server.ready()  # a dead Triton is never ready, whoever answers on its port
    finally:
        httpd.shutdown()
        if server.process.poll() is None:
            server.process.kill()
