"""Helpers the tests share (pytest puts tests/support on sys.path; the repo root never is):
tiny random checkpoints, tiny specs, the packaged exports in build/, a started stack."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from kiln.tiny_models import build_tiny_bert, build_tiny_llama  # noqa: F401  (the tests import them from here)

REPO = Path(__file__).resolve().parents[2]
KILN = Path(sys.executable).parent / "kiln"

# sentences the MiniLM serving tests send (several scripts, an emoji, one long)
SENTENCES = [
    "A man is playing a guitar.",
    "The new movie is awesome.",
    "我爱北京天安门。",
    "Emoji work too 🚀🔥",
    "How do I reset my password?",
    "The weather is lovely today and we are going for a long walk along the river.",
    "Paris is the capital of France.",
    "Stocks fell sharply after the announcement.",
]


def tiny_spec(checkpoint: Path, workdir: Path, **kw):
    from kiln_core.spec import parse_spec

    data = {
        "name": kw.pop("name", "tiny"),
        "source": {"kind": "folder", "path": str(checkpoint)},
        "max_length": 64,
        "precisions": ["fp32", "fp16"],
        "serve_precision": "fp32",
        "workdir": str(workdir),
        "batching": {"max_batch_size": 16, "preferred_batch_sizes": [4, 8], "max_queue_delay_us": 1000},
    }
    data.update(kw)
    return parse_spec(data)


def use_export(export_dir: Path, spec, version: int | None = None) -> Path:
    """A copy of an export where `spec` exports (or, with ``version``, where `kiln reload` exports
    that version of it), reused there as long as it matches the spec (export.reuse)."""
    import shutil

    dest = spec.export_dir if version is None else spec.root / "versions" / str(version) / spec.name / "export"
    shutil.copytree(export_dir, dest)
    return dest


def packaged_export(name: str):
    """A packaged spec's export in the repository's build/ folder, where `make demo` leaves it:
    reused when it matches the spec (the same rule as `kiln demo`), exported there otherwise,
    so CI exports each packaged model once. (spec, manifest)."""
    from rich.console import Console

    from export.reuse import ensure_export
    from kiln_core.spec import load_spec

    workdir = os.path.relpath(REPO / "build")  # as the Makefile names it: the same checkpoint path
    spec = load_spec(name, workdir=workdir)
    return spec, ensure_export(spec, Console(stderr=True))


def serve(repositories, workdir: Path, gateway=None, cache_mb: float | None = None):
    """A started kiln.stack.Stack: Triton on free ports serving `repositories` (one path or
    several), and the gateway in front when `gateway` (GatewayOptions) is given. A fixture
    uses it as `with serve(...) as stack:`, which stops everything on the way out.
    ``cache_mb=0``: no response cache (tests of the model's own batching repeat their texts)."""
    from kiln.stack import Stack

    return Stack(repositories, workdir, gateway=gateway, cache_mb=cache_mb).start()


def export_and_serve(spec, workdir: Path):
    """The whole path for a fixture: export, write the spec's repository, start Triton (a
    started Stack)."""
    from export.pipeline import run_export
    from model_repository.writer import write_repository

    run_export(spec)
    return serve(write_repository(spec), workdir)


def post(server, model, payload, stream=False):
    url = f"http://{server.http_url}/v2/models/{model}/{'generate_stream' if stream else 'generate'}"
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            body = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read().decode() or "{}")
    if not stream:
        return status, json.loads(body)
    events = [json.loads(l[5:]) for l in body.splitlines() if l.startswith("data:")]
    return status, events


# chat prompts for the tiny Llama: with its byte-level tokenizer, CJK and emoji split across tokens
CHAT_PROMPTS = [
    "The capital of France is", "Hello, how are you today?", "我爱北京天安门。", "Emoji: 🚀🔥🎉",
    "Triton serves models with dynamic batching. One two three four five six.", "a", "Bonjour, comment ça va ?",
    "One two",
]


class TorchRunner:
    """runner(feeds) -> outputs with the ONNX graph's names and shapes, over a HF causal LM."""

    def __init__(self, model):
        self.model = model
        self.layers = model.config.num_hidden_layers

    def __call__(self, feeds):
        import torch
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if feeds["past_key_values.0.key"].shape[2]:
            for i in range(self.layers):
                cache.update(torch.from_numpy(feeds[f"past_key_values.{i}.key"]),
                             torch.from_numpy(feeds[f"past_key_values.{i}.value"]), i)
        with torch.no_grad():
            out = self.model(
                input_ids=torch.from_numpy(feeds["input_ids"]),
                attention_mask=torch.from_numpy(feeds["attention_mask"]),
                position_ids=torch.from_numpy(feeds["position_ids"]),
                past_key_values=cache, use_cache=True,
            )
        res = {"logits": out.logits.numpy()}
        for i, layer in enumerate(out.past_key_values.layers):
            res[f"present.{i}.key"] = layer.keys.numpy()
            res[f"present.{i}.value"] = layer.values.numpy()
        return res


def make_engine(lm, eos=None, max_concurrent=8, max_context=256, runner=None, max_queue=None):
    model, tok = lm
    cfg = model.config
    from kiln_runtime.generation.engine import Engine

    return Engine(
        runner or TorchRunner(model), cfg.num_hidden_layers, cfg.num_key_value_heads,
        cfg.hidden_size // cfg.num_attention_heads, [cfg.eos_token_id] if eos is None else eos,
        max_concurrent, max_context, tok, max_queue=max_queue,
    )


def status_with_key(gateway_url: str, key: str) -> int:
    """Status of GET /v1/models with ``key`` (a new connection each call: with several gateway
    workers on one port, the kernel hands each connection to one of them)."""
    req = urllib.request.Request(gateway_url + "/v1/models", headers={"authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def answered_by(gateway_url: str) -> tuple[str, float, float]:
    """(pid, 200s, 429s on /v1/models) as counted by whichever gateway process answers this scrape."""
    text = urllib.request.urlopen(gateway_url + "/metrics", timeout=10).read().decode()
    pid, counts = "", {"200": 0.0, "429": 0.0}
    for line in text.splitlines():
        if line.startswith("kiln_gateway_process_info{"):
            pid = line.split('pid="', 1)[1].split('"', 1)[0]
        if line.startswith('kiln_gateway_requests_total{route="/v1/models"'):
            status = line.split('status="', 1)[1].split('"', 1)[0]
            counts[status] = float(line.rsplit(" ", 1)[1])
    return pid, counts["200"], counts["429"]


def per_process(gateway_url: str, processes: int, scrapes: int = 100) -> dict[str, tuple[float, float]]:
    """pid -> (200s, 429s) on /v1/models of each gateway process on the port, scraped until all
    ``processes`` answered (or ``scrapes`` ran out)."""
    seen: dict[str, tuple[float, float]] = {}
    for _ in range(scrapes):
        pid, ok, refused = answered_by(gateway_url)
        seen[pid] = (ok, refused)
        if len(seen) == processes:
            break
    return seen


class BackgroundLoad:
    """``clients`` threads calling ``send(client, k, i)`` in a loop (k: the thread, i: its
    request) and one calling ``probe(client)``, each with its own ``make_client()``, from the
    block's start (after ``warmup_s``) to its end (``settle_s`` later): every failure kept as
    repr, the requests answered counted, every probe answer kept in order."""

    def __init__(self, make_client, send, probe, clients: int = 4, warmup_s: float = 1.0, settle_s: float = 1.5):
        import threading

        self.make_client, self.send, self.probe = make_client, send, probe
        self.clients, self.warmup_s, self.settle_s = clients, warmup_s, settle_s
        self.stop, self.failures, self.answered, self.probes = threading.Event(), [], [0], []

    def __enter__(self) -> "BackgroundLoad":
        import threading
        import time

        def worker(k: int) -> None:
            c, i = self.make_client(), 0
            while not self.stop.is_set():
                try:
                    self.send(c, k, i)
                    self.answered[0] += 1
                except Exception as err:
                    self.failures.append(repr(err))
                i += 1

        def prober() -> None:
            c = self.make_client()
            while not self.stop.is_set():
                try:
                    self.probes.append(self.probe(c))
                except Exception as err:
                    self.failures.append(repr(err))

        self.threads = [threading.Thread(target=worker, args=(k,)) for k in range(self.clients)]
        self.threads.append(threading.Thread(target=prober))
        for t in self.threads:
            t.start()
        time.sleep(self.warmup_s)
        return self

    def __exit__(self, *exc) -> None:
        import time

        time.sleep(self.settle_s)  # a gateway re-reads a rewritten card within a second: answers after a switch too
        self.stop.set()
        for t in self.threads:
            t.join()


def transitions(answers: list) -> list:
    """The distinct answers in the order they appeared (a return to an earlier one included)."""
    out: list = []
    for a in answers:
        if not out or a != out[-1]:
            out.append(a)
    return out


def gateway_client(stack, timeout: float = 60):
    """The official OpenAI client on a stack's gateway, no retries (a failure is a failure)."""
    import openai

    return openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key="none", max_retries=0, timeout=timeout)


def embedding_of(c, model: str, text: str) -> bytes:
    """One text's embedding through the gateway, as float32 bytes (compared bit for bit)."""
    import numpy as np

    return np.array(c.embeddings.create(model=model, input=text).data[0].embedding, dtype=np.float32).tobytes()


def embedding_load(stack, model: str, probe_text: str, clients: int = 4) -> BackgroundLoad:
    """`clients` clients sending new texts to `model` through the gateway, and one the probe text."""
    return BackgroundLoad(lambda: gateway_client(stack),
                          lambda c, k, i: c.embeddings.create(model=model, input=f"client {k} text {i}"),
                          lambda c: embedding_of(c, model, probe_text), clients=clients)


class Ran:
    """What ``run_to_exit`` saw: exit code, the whole output (stdout and stderr together, as
    a person reads it), and how long the process lived after printing ``mark``."""

    def __init__(self, returncode: int, output: str, exit_after_mark_s: float | None):
        self.returncode, self.stderr, self.exit_after_mark_s = returncode, output, exit_after_mark_s


EXIT_GRACE_S = 10.0  # a command that has printed its result ends within this, by itself


def run_to_exit(cmd: list[str], env: dict, mark: str, timeout: float = 300.0, grace_s: float = EXIT_GRACE_S) -> Ran:
    """Run ``cmd`` and time its exit after it prints ``mark`` (e.g. the load test's verdict line).
    A process still running ``grace_s`` after the mark is a hang at exit: it is killed and the
    test fails saying so, instead of waiting out ``timeout``."""
    import subprocess
    import threading
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    seen: list[float] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if mark in line and not seen:
                seen.append(time.monotonic())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        now = time.monotonic()
        if seen and now - seen[0] > grace_s:
            proc.kill()
            proc.wait()
            reader.join(5)
            raise AssertionError(f"{' '.join(cmd[:2])} printed {mark!r} and had not exited {grace_s:.0f}s later "
                                 f"(a hang at exit); its output ends:\n{''.join(lines)[-2000:]}")
        if now > deadline:
            proc.kill()
            proc.wait()
            reader.join(5)
            raise AssertionError(f"{' '.join(cmd[:2])} ran past {timeout:.0f}s; its output ends:\n{''.join(lines)[-2000:]}")
        time.sleep(0.05)
    ended = time.monotonic()
    reader.join(5)
    return Ran(proc.returncode, "".join(lines), ended - seen[0] if seen else None)


def staggered(engine, prompts, budgets, params) -> dict:
    """Submit ``r0``, ``r1``, ... one per engine step (each joins a running batch), then step
    until idle: {request_id: [events]}. ``params(max_tokens)`` makes each request's params."""
    results: dict = {}
    for i, (p, n) in enumerate(zip(prompts, budgets)):
        engine.submit(f"r{i}", p, params(n))
        for ev in engine.step():
            results.setdefault(ev.request_id, []).append(ev)
    while engine.has_work():
        for ev in engine.step():
            results.setdefault(ev.request_id, []).append(ev)
    return results
