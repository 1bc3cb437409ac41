"""`kiln bench` for causal LMs: HF transformers `generate` (PyTorch eager) vs the
in-process ONNX Runtime engine vs the served model (Triton generate_stream), in one run.

Reported per path: time to first token, decode tokens/s for one stream, and aggregate
tokens/s at 1, 4 and 8 concurrent streams (served). Targets (reported, never asserted):
one served stream >= 3x transformers `generate`; 8 streams aggregate >= 3x one stream.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kiln.spec import DeploymentSpec

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works, step by step, for a curious child.",
    "Describe a walk through a busy market in the morning, with sounds and smells.",
    "List ten tips for learning a new language and explain each one.",
    "Write a letter to a friend describing your last holiday by the sea.",
    "Explain the water cycle in detail.",
    "Tell me about the history of bicycles.",
    "Describe how to bake bread at home, from flour to loaf.",
]


@dataclass
class LMRow:
    path: str
    streams: int
    ttft_ms: float | None  # median time to first token
    tokens_per_s: float  # aggregate decode+prefill tokens/s over all streams
    per_stream_tokens_per_s: float | None  # median decode tokens/s of one stream
    tokens: int


def _hf_path(spec: DeploymentSpec, checkpoint: Path, new_tokens: int, console: Console) -> LMRow:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ttfts, rates, total_tokens, total_time = [], [], 0, 0.0
    for prompt in PROMPTS[:2]:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            t0 = time.perf_counter()
            model.generate(**ids, max_new_tokens=1, do_sample=False)
            ttfts.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False)
            dt = time.perf_counter() - t0
        n = out.shape[1] - ids["input_ids"].shape[1]
        total_tokens, total_time = total_tokens + n, total_time + dt
        rates.append((n - 1) / max(dt - ttfts[-1] / 1000, 1e-9))
        console.print(f"[bold cyan]bench[/] transformers generate: {n} tokens in {dt:.2f}s")
    return LMRow("transformers generate (PyTorch eager fp32)", 1, statistics.median(ttfts), total_tokens / total_time,
                 statistics.median(rates), total_tokens)


def _engine_path(spec: DeploymentSpec, manifest, new_tokens: int, console: Console) -> LMRow:
    """The generation engine in this process over ONNX Runtime: the served code minus Triton."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from model_repository.python_models.kiln_generate import ChatTemplate, Engine, SamplingParams, encode_prompt

    d = manifest.decoder
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if spec.instances.intra_op_threads:
        so.intra_op_num_threads = spec.instances.intra_op_threads
    variant = manifest.usable_variant(spec.serve_precision.value)
    sess = ort.InferenceSession(str(spec.export_dir / variant.file), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    tok_dir = spec.export_dir / manifest.tokenizer_dir
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    template = ChatTemplate.from_dir(str(tok_dir))
    engine = Engine(lambda f: dict(zip(names, sess.run(names, f))), d["num_layers"], d["num_kv_heads"], d["head_dim"],
                    d["eos_token_ids"], 1, d["max_context"], tok)
    ttfts, rates, total_tokens, total_time = [], [], 0, 0.0
    for i, prompt in enumerate(PROMPTS[:2]):
        ids = encode_prompt(tok, messages=[{"role": "user", "content": prompt}], template=template)
        engine.submit(str(i), ids, SamplingParams(max_tokens=new_tokens, temperature=0.0))
        t0, first, n = time.perf_counter(), None, 0
        while engine.has_work():
            for ev in engine.step():
                if first is None:
                    first = time.perf_counter()
                n = ev.completion_tokens
        dt = time.perf_counter() - t0
        ttfts.append((first - t0) * 1000)
        rates.append((n - 1) / max(time.perf_counter() - first, 1e-9))
        total_tokens, total_time = total_tokens + n, total_time + dt
        console.print(f"[bold cyan]bench[/] in-process engine: {n} tokens in {dt:.2f}s")
    return LMRow(f"ONNX Runtime {spec.serve_precision.value} engine (in-process)", 1, statistics.median(ttfts),
                 total_tokens / total_time, statistics.median(rates), total_tokens)


def _stream(url: str, model: str, prompt: str, new_tokens: int) -> tuple[float, float, int, float]:
    """(ttft s, decode tokens/s, completion tokens, total s) for one generate_stream call."""
    body = json.dumps({"messages": json.dumps([{"role": "user", "content": prompt}]), "max_tokens": new_tokens,
                       "stream": True}).encode()
    req = urllib.request.Request(f"http://{url}/v2/models/{model}/generate_stream", body, {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first, tokens = None, 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            ev = json.loads(line[5:])
            if first is None:
                first = time.perf_counter()
            tokens = int(ev.get("completion_tokens", tokens) or tokens)
    end = time.perf_counter()
    first = first or end
    return first - t0, (tokens - 1) / max(end - first, 1e-9), tokens, end - t0


def _served_path(spec: DeploymentSpec, url: str, streams: int, new_tokens: int, console: Console) -> LMRow:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(streams)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda p: _stream(url, spec.name, p, new_tokens), prompts))
    wall = time.perf_counter() - t0
    tokens = sum(r[2] for r in results)
    console.print(f"[bold cyan]bench[/] served, {streams} stream(s): {tokens} tokens in {wall:.2f}s")
    return LMRow(f"Triton generate_stream ({spec.serve_precision.value})", streams,
                 statistics.median(r[0] * 1000 for r in results), tokens / wall,
                 statistics.median(r[1] for r in results), tokens)


def targets(rows: list[LMRow]) -> dict[str, dict]:
    hf = next((r for r in rows if r.path.startswith("transformers")), None)
    one = next((r for r in rows if r.path.startswith("Triton") and r.streams == 1), None)
    eight = next((r for r in rows if r.path.startswith("Triton") and r.streams == 8), None)
    out = {}
    if hf and one:
        v = one.per_stream_tokens_per_s / hf.per_stream_tokens_per_s
        out["one stream >= 3x transformers generate"] = {"value": v, "threshold": 3.0, "passed": v >= 3.0}
    if one and eight:
        v = eight.tokens_per_s / one.tokens_per_s
        out["8 streams aggregate >= 3x one stream"] = {"value": v, "threshold": 3.0, "passed": v >= 3.0}
    return out


def run_lm_bench(spec: DeploymentSpec, console: Console | None = None, new_tokens: int = 128) -> tuple[list[LMRow], dict]:
    from export.manifest import ExportManifest
    from kiln.server import TritonServer, free_ports
    from model_repository.writer import write_repository

    console = console or Console()
    manifest = ExportManifest.read(spec.export_dir)
    spec = spec.with_precision(manifest.served_precision(spec.serve_precision))
    rows = [_hf_path(spec, Path(manifest.checkpoint), new_tokens, console),
            _engine_path(spec, manifest, new_tokens, console)]
    write_repository(spec, manifest)
    with TritonServer(spec.repository_dir, free_ports(), workdir=spec.server_dir) as server:
        _stream(server.http_url, spec.name, "Hi", 4)  # warm-up
        for n in (1, 4, 8):
            rows.append(_served_path(spec, server.http_url, n, new_tokens, console))
        from kiln.bench_gateway import run_gateway_bench

        gateway = run_gateway_bench(server, server.repositories, spec.name, console, "generation", PROMPTS,
                                    spec.root / "bench-gateway.log", rounds=100)
    verdicts = targets(rows)
    console.print(lm_table(spec, rows))
    for name, t in verdicts.items():
        console.print(f"  target: {name}: {t['value']:.2f}x {'[green]PASS[/]' if t['passed'] else '[red]MISS[/]'}")
    (spec.root / "bench.json").write_text(json.dumps(
        {"rows": [asdict(r) for r in rows], "targets": verdicts, "new_tokens": new_tokens, "cores": os.cpu_count(),
         "gateway": gateway}, indent=2) + "\n")
    return rows, verdicts


def lm_table(spec: DeploymentSpec, rows: list[LMRow]) -> Table:
    hf = rows[0].per_stream_tokens_per_s
    t = Table(title=f"kiln bench: {spec.name} (greedy, chat prompts, {os.cpu_count()} CPU cores)")
    for col in ("path", "streams", "TTFT p50 ms", "tokens/s (all streams)", "tokens/s per stream", "x transformers (per stream)"):
        t.add_column(col, justify="left" if col == "path" else "right")
    for r in rows:
        t.add_row(r.path, str(r.streams), f"{r.ttft_ms:.0f}" if r.ttft_ms is not None else "-", f"{r.tokens_per_s:.1f}",
                  f"{r.per_stream_tokens_per_s:.1f}" if r.per_stream_tokens_per_s else "-",
                  f"{r.per_stream_tokens_per_s / hf:.2f}" if r.per_stream_tokens_per_s and hf else "-")
    return t
