"""`kiln bench` for causal LMs: kiln against what a user would run instead, in one run.

Rows (greedy, the chat prompts below, `new_tokens` new tokens, every row the median of
`runs` runs):

- in-process: transformers `generate` (PyTorch eager fp32) and kiln's generation engine over
  ONNX Runtime (the served code minus Triton), one stream
- served, through one load generator (kiln/loadgen.py: streamed OpenAI chat completions):
  the kiln gateway in front of Triton, and llama.cpp on the same GGUF file at 1 and 8 streams:
  its own `llama-server --parallel 8` when $KILN_LLAMA_SERVER names the binary
  (../shared/tools/build_llama_server.sh builds one), else llama-cpp-python's server (one
  sequence at a time; optional, skipped with the reason when `llama_cpp` does not import)
- extra: Triton's own generate_stream (HTTP SSE, no gateway), one stream

Runs are interleaved (run 1 of every server, then run 2, ...), so drift on a shared
machine hits every server alike. Targets are printed PASS/MISS with the ratios of this
run and written to bench.json; they are never asserted.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table

from kiln.bench import Target, print_targets
from kiln.loadgen import (
    NOISY_SPREAD,
    ChatRun,
    StreamTiming,
    chat_wave,
    median_of,
    spread,
    summarize_chat,
)
from kiln_core.spec import DeploymentSpec

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
STREAMS = (1, 8)
RUNS = 3
HF, ENGINE, GATEWAY, TRITON, LLAMA = "transformers", "engine", "gateway", "triton", "llama.cpp"
# targets (reported, never asserted)
MIN_DECODE_X_LLAMA = 1.0  # one stream, decode tokens/s, kiln gateway / llama.cpp server
MAX_TTFT_MS = 100.0  # one stream, ~40-token chat prompt, kiln gateway
MIN_AGGREGATE_X_LLAMA = 2.0  # 8 streams, aggregate tokens/s, kiln gateway / llama.cpp server
MIN_X_TRANSFORMERS = 3.0  # one stream decode, kiln gateway / transformers generate
MIN_SCALING = 3.0  # kiln gateway, 8 streams aggregate / 1 stream aggregate
MAX_JOIN_P99_X = 3.0  # a 1,000-token prompt joining: running stream inter-token p99 / its undisturbed median


@dataclass(frozen=True)
class LMRow:
    path: str
    kind: str  # transformers | engine | gateway | triton | llama.cpp
    streams: int
    runs: int
    ttft_ms: float | None  # median time to first token (median over runs of each run's median)
    tokens_per_s: float  # aggregate: completion tokens of all streams / wall time (prefill included)
    per_stream_tokens_per_s: float | None  # decode tokens/s of one stream, after its first token
    tokens: int  # completion tokens timed, all runs
    gap_p50_ms: float | None = None  # gaps between streamed chunks
    gap_p95_ms: float | None = None
    note: str = ""
    tokens_per_s_runs: tuple[float, ...] = ()  # each run's aggregate tokens/s


def lm_row(path: str, kind: str, runs: Sequence[ChatRun], note: str = "") -> LMRow:
    """A row from several runs of one path: each figure is the median over the runs."""
    m = median_of(runs)
    return LMRow(path, kind, m.streams, len(runs), m.ttft_p50_ms, m.tokens_per_s, m.decode_tokens_per_s, m.tokens,
                 m.gap_p50_ms, m.gap_p95_ms, note, tuple(r.tokens_per_s for r in runs))


def _find(rows: Sequence[LMRow], kind: str, streams: int) -> LMRow | None:
    return next((r for r in rows if r.kind == kind and r.streams == streams), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def lm_targets(rows: Sequence[LMRow], many: int = 8) -> dict[str, Target]:
    """Targets on the kiln gateway's rows against llama.cpp's server and transformers (N/A where
    a row is missing)."""
    one, eight = _find(rows, GATEWAY, 1), _find(rows, GATEWAY, many)
    llama1, llama8, hf = _find(rows, LLAMA, 1), _find(rows, LLAMA, many), _find(rows, HF, 1)
    get = lambda r, f: getattr(r, f) if r else None  # noqa: E731
    return {
        "decode_vs_llama_cpp": Target(
            f"one stream decode tokens/s >= {MIN_DECODE_X_LLAMA:g}x llama.cpp's server",
            _ratio(get(one, "per_stream_tokens_per_s"), get(llama1, "per_stream_tokens_per_s")), MIN_DECODE_X_LLAMA),
        "ttft": Target(f"one stream TTFT p50 <= {MAX_TTFT_MS:g} ms (chat prompt ~40 tokens)",
                       get(one, "ttft_ms"), MAX_TTFT_MS, at_most=True, unit="ms"),
        "aggregate_vs_llama_cpp": Target(
            f"{many} streams aggregate tokens/s >= {MIN_AGGREGATE_X_LLAMA:g}x llama.cpp's server at {many} streams",
            _ratio(get(eight, "tokens_per_s"), get(llama8, "tokens_per_s")), MIN_AGGREGATE_X_LLAMA),
        "decode_vs_transformers": Target(
            f"one stream decode tokens/s >= {MIN_X_TRANSFORMERS:g}x transformers generate",
            _ratio(get(one, "per_stream_tokens_per_s"), get(hf, "per_stream_tokens_per_s")), MIN_X_TRANSFORMERS),
        "scaling": Target(f"{many} streams aggregate >= {MIN_SCALING:g}x one stream",
                          _ratio(get(eight, "tokens_per_s"), get(one, "tokens_per_s")), MIN_SCALING),
    }


# ----------------------------------------------------------------------------- in-process paths
def _hf_runs(checkpoint: Path, new_tokens: int, runs: int, console: Console) -> list[ChatRun]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out_runs = []
    for r in range(runs):
        prompt = PROMPTS[r % len(PROMPTS)]
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            t0 = time.perf_counter()
            model.generate(**ids, max_new_tokens=1, do_sample=False)
            ttft = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False)
            dt = time.perf_counter() - t0
        n = int(out.shape[1] - ids["input_ids"].shape[1])
        out_runs.append(ChatRun(1, ttft * 1e3, (n - 1) / max(dt - ttft, 1e-9), n / dt, None, None, n, dt))
        console.print(f"[bold cyan]bench[/] transformers generate, run {r + 1}: {n} tokens in {dt:.2f}s")
    return out_runs


def _engine_runs(spec: DeploymentSpec, manifest, new_tokens: int, runs: int, console: Console) -> list[ChatRun]:
    """The generation engine in this process over ONNX Runtime: the served code minus Triton."""
    from kiln.bench_profile import make_engine, served_session
    from kiln_runtime.generation.chat_template import encode_prompt
    from kiln_runtime.generation.params import SamplingParams

    engine, tok, template = make_engine(spec, manifest, served_session(spec, manifest)[0], max_concurrent=1,
                                        ignore_eos=False)
    out_runs = []
    for r in range(runs + 1):  # the first run warms ONNX Runtime up and is not kept
        ids = encode_prompt(tok, messages=[{"role": "user", "content": PROMPTS[r % len(PROMPTS)]}], template=template)
        engine.submit(str(r), ids, SamplingParams(max_tokens=new_tokens if r else 4, temperature=0.0))
        t0, stamps, n = time.perf_counter(), [], 0
        while engine.has_work():
            for ev in engine.step():
                stamps.append(time.perf_counter())
                n = ev.completion_tokens
        end = time.perf_counter()
        if r:
            out_runs.append(summarize_chat([StreamTiming(t0, tuple(stamps), end, n)], end - t0))
            console.print(f"[bold cyan]bench[/] in-process engine, run {r}: {n} tokens in {end - t0:.2f}s")
    return out_runs


# ----------------------------------------------------------------------------- Triton direct
def _triton_stream(url: str, model: str, prompt: str, new_tokens: int) -> StreamTiming:
    """One Triton generate_stream call (HTTP SSE, no gateway), timed per event."""
    from kiln_runtime.contract import TEXT_OUTPUT

    body = json.dumps({"messages": json.dumps([{"role": "user", "content": prompt}]), "max_tokens": new_tokens,
                       "temperature": 0.0, "stream": True}).encode()
    req = urllib.request.Request(f"http://{url}/v2/models/{model}/generate_stream", body,
                                 {"Content-Type": "application/json"})
    t0, stamps, tokens = time.perf_counter(), [], 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            ev = json.loads(line[5:])
            if ev.get(TEXT_OUTPUT):
                stamps.append(time.perf_counter())
            tokens = int(ev.get("completion_tokens", tokens) or tokens)
    return StreamTiming(t0, tuple(stamps), time.perf_counter(), tokens)


def _triton_wave(url: str, model: str, prompts: Sequence[str], new_tokens: int) -> ChatRun:
    t0 = time.perf_counter()
    timing = _triton_stream(url, model, prompts[0], new_tokens)
    return summarize_chat([timing], time.perf_counter() - t0)


# ----------------------------------------------------------------------------- the bench
def _prompts(streams: int, run: int) -> list[str]:
    """The prompts of one wave; each run starts at another prompt (the same for every server)."""
    return [PROMPTS[(run + i) % len(PROMPTS)] for i in range(streams)]


def run_lm_bench(spec: DeploymentSpec, console: Console | None = None, new_tokens: int = 128, runs: int = RUNS,
                 streams: Sequence[int] = STREAMS, llama: bool = True) -> tuple[list[LMRow], dict[str, Target]]:
    from contextlib import ExitStack

    from kiln.baselines import llamacpp_server as llamacpp
    from kiln.bench_gateway import gateway_options, run_gateway_bench
    from kiln.processes import free_port
    from kiln.stack import Stack
    from kiln_core.machine import flags_line, machine_info
    from kiln_core.manifest import ExportManifest
    from kiln_core.sources import gguf_file
    from model_repository.writer import write_repository

    console = console or Console()
    manifest = ExportManifest.read(spec.export_dir)
    spec = spec.with_precision(manifest.served_precision(spec.serve_precision))
    serve = spec.serve_precision.value
    threads = spec.instances.intra_op_threads or os.cpu_count() or 1
    t_start, load_before = time.perf_counter(), os.getloadavg()[0]

    def step(msg: str) -> None:
        console.print(f"[bold cyan]bench[/] {msg}")

    rows = [lm_row("transformers generate (PyTorch eager fp32)", HF, _hf_runs(Path(manifest.checkpoint), new_tokens, runs, console)),
            lm_row(f"ONNX Runtime {serve} engine (in-process)", ENGINE, _engine_runs(spec, manifest, new_tokens, runs, console))]

    binary = llamacpp.llama_server_binary()  # $KILN_LLAMA_SERVER: llama.cpp's own server, else llama-cpp-python's
    llama_reason = (None if binary else llamacpp.unavailable()) if llama else "skipped (llama=False)"

    # the "as right" half: the fp32 graph's greedy answers to the 32 conversations, in process
    from export.lm_parity import quality_prompts
    from kiln import bench_quality as bq

    conversations = quality_prompts()
    reference = None
    if "fp32" in manifest.variants and manifest.variants["fp32"].usable:
        step(f"quality: the fp32 graph's greedy answers to {len(conversations)} conversations ({bq.NEW_TOKENS} tokens)")
        reference = bq.reference_answers(spec, manifest, conversations)
    answers: dict[str, list[str]] = {}
    gguf = None
    if llama_reason is None:
        try:
            gguf = gguf_file(spec)
        except Exception as err:  # a folder checkpoint has no GGUF to give llama.cpp
            llama_reason = f"no GGUF file for this spec ({err})"
    if llama_reason:
        console.print(f"  [yellow]llama.cpp rows skipped[/]: {llama_reason}")

    write_repository(spec, manifest)
    gateway_result = None
    # name -> (base url, model name, extra request fields): every server gets the same waves
    servers: dict[str, tuple[str, str, dict | None]] = {}
    with ExitStack() as cleanup:
        step("starting Triton and the gateway" + ("" if llama_reason else " and llama.cpp's server"))
        stack = cleanup.enter_context(Stack(spec.repository_dir, spec.server_dir,
                                            gateway=gateway_options(spec.root / "bench-gateway.log")))
        server = stack.triton
        servers[GATEWAY] = (stack.gateway_url, spec.name, None)
        if gguf is not None:
            try:
                if binary is not None:  # llama.cpp's own server, parallel slots
                    proc = cleanup.enter_context(llamacpp.llama_server_process(
                        binary, gguf, free_port(), threads, max(streams), spec.root / "bench-llama-server.log"))
                else:
                    proc = cleanup.enter_context(llamacpp.llama_process(gguf, free_port(), threads,
                                                                        spec.root / "bench-llama-cpp.log"))
                servers[LLAMA] = (proc.url, gguf.stem, llamacpp.GREEDY_EXTRA)
            except RuntimeError as err:  # reported, and the rest of the bench still runs
                llama_reason, gguf = f"its server did not start: {err}", None
                console.print(f"  [yellow]llama.cpp rows skipped[/]: {llama_reason}")
        for name, (url, model, extra) in servers.items():  # warm-up
            chat_wave(url, model, PROMPTS[:1], 4, extra)
        _triton_stream(server.http_url, spec.name, "Hi", 4)

        waves: dict[tuple[str, int], list[ChatRun]] = {}
        for n in streams:
            for r in range(runs):
                for name, (url, model, extra) in servers.items():
                    run = chat_wave(url, model, _prompts(n, r), new_tokens, extra)
                    waves.setdefault((name, n), []).append(run)
                    step(f"{name}, {n} stream(s), run {r + 1}: {run.tokens} tokens in {run.wall_s:.2f}s")
                if n == 1:
                    waves.setdefault((TRITON, 1), []).append(_triton_wave(server.http_url, spec.name, _prompts(1, r), new_tokens))
        gateway_result = run_gateway_bench(stack, spec.name, console, "generation", PROMPTS, rounds=100)
        if reference is not None:
            for name, (url, model, extra) in servers.items():
                step(f"quality: {name}'s greedy answers, one request at a time")
                answers[name] = bq.served_answers(url, model, conversations, extra)

    if gguf is None:
        llama_note = ""
    elif binary is not None:
        llama_note = f"{binary.name} ({binary}), {gguf.name}, {threads} threads, --parallel {max(streams)}"
    else:
        llama_note = f"llama-cpp-python {llamacpp.version()}, {gguf.name}, {threads} threads; {llamacpp.SERIALIZES}"
    for n in streams:
        rows.append(lm_row(f"kiln gateway -> Triton ({serve}), OpenAI SSE", GATEWAY, waves[(GATEWAY, n)]))
        if (LLAMA, n) in waves:
            quant = gguf.name.split('.', 1)[-1].removesuffix('.gguf')
            rows.append(lm_row(f"llama.cpp llama-server --parallel {max(streams)} ({quant})" if binary else
                               f"llama.cpp server (llama-cpp-python, {quant})", LLAMA, waves[(LLAMA, n)], llama_note))
    rows.append(lm_row(f"Triton generate_stream ({serve}), direct HTTP SSE", TRITON, waves[(TRITON, 1)]))

    # ---- decode profile (kiln/bench_profile.py): every server is stopped by now; the split of an
    #      in-process decode step at 1 and 8 streams, what serving adds per step, and the running
    #      stream's gaps while a 1,000-token prompt joins (chunked prefill)
    from kiln.bench_profile import (
        join_stall,
        join_table,
        profile_decode,
        profile_table,
        served_overhead,
    )

    console.print("[bold cyan]bench[/] decode-step profile, in-process engine (1 and 8 streams), and a long prompt joining")
    steps = [profile_decode(spec, manifest, streams=n, new_tokens=64) for n in (1, max(streams))]
    for r in steps:
        served = _find(rows, GATEWAY, r["streams"])
        if served and served.per_stream_tokens_per_s:
            r["served"] = served_overhead(r, served.per_stream_tokens_per_s)
    join = join_stall(spec, manifest, spec.generation.prefill_chunk or None)
    profile = {"steps": [{k: v for k, v in r.items() if k != "raw"} for r in steps], "join": join}

    verdicts = lm_targets(rows, many=max(streams))
    quality: list = []
    if reference is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(spec.export_dir / manifest.tokenizer_dir / "tokenizer.json"))
        ref_ids = bq.token_ids(tok, reference)
        labels = {GATEWAY: f"kiln gateway -> Triton ({serve})", LLAMA: f"llama.cpp ({gguf.name if gguf else ''})"}
        quality = [bq.agreement(labels[name], ref_ids, bq.token_ids(tok, texts)) for name, texts in answers.items()]
        by = {name: q for name, q in zip(answers, quality)}
        if GATEWAY in by and LLAMA in by:
            verdicts["agreement_vs_llama_cpp"] = Target(
                "served greedy agreement with fp32 (mean matching prefix) >= llama.cpp's on the same prompts",
                _ratio(by[GATEWAY].mean_prefix, by[LLAMA].mean_prefix), 1.0)
    verdicts["join_p99"] = Target(
        f"while a {join['prompt_tokens']}-token prompt joins, the running stream's inter-token p99 <= "
        f"{MAX_JOIN_P99_X:g}x its undisturbed median (prefill_chunk {join['prefill_chunk']})",
        join["all"]["p99_ms"] / join["undisturbed_median_ms"], MAX_JOIN_P99_X, at_most=True)
    console.print(lm_table(spec, rows, new_tokens))
    if llama_reason:
        console.print(f"  note: llama.cpp not measured: {llama_reason}")
    else:
        serializes = llamacpp.PARALLEL_NOTE if binary else llamacpp.SERIALIZES
        console.print(f"  note: llama.cpp's server: {serializes}; it also reuses the previous prompt's "
                      "matching KV prefix, kiln does not")
    if load_before > 0.5 * (os.cpu_count() or 1):
        console.print(f"  [yellow]note[/]: the machine was busy before the bench began (1-minute load {load_before:.1f} "
                      f"on {os.cpu_count()} cores): figures are noisy, ratios less so")
    noisy = [f"{r.path} x{spread(r.tokens_per_s_runs):.1f}" for r in rows
             if (spread(r.tokens_per_s_runs) or 1.0) > NOISY_SPREAD]
    if noisy:
        console.print(f"  [yellow]note[/]: runs disagree (max/min tokens/s > {NOISY_SPREAD:g}): " + "; ".join(noisy))
    console.print(profile_table(steps))
    for r in steps:
        if "served" in r:
            o = r["served"]
            console.print(f"  served step at {r['streams']} stream(s): {o['served_step_ms']:.1f} ms vs in-process "
                          f"{o['inprocess_step_ms']:.1f} ms: Triton + gateway add {o['overhead_ms']:.1f} ms "
                          f"({o['overhead_pct']:.0f}%)")
    console.print(join_table([join]))
    if quality:
        console.print(bq.quality_table(quality, f"served variant {serve}: ppl x"
                                                f"{manifest.variants[serve].parity.figures.get('ppl_ratio', 1.0):.4f} of "
                                                "fp32 at export; every answer re-encoded with the model's tokenizer"))
    print_targets(console, verdicts)
    out = spec.root / "bench.json"
    out.write_text(json.dumps(
        {"name": spec.name, "serve_precision": serve, "rows": [asdict(r) for r in rows],
         "targets": {k: t.as_dict() for k, t in verdicts.items()},
         "settings": {"new_tokens": new_tokens, "runs": runs, "streams": list(streams), "prompts": len(PROMPTS),
                      "threads": threads},
         "machine": {**machine_info(), "flags_line": flags_line(),
                     "load_1min": {"before": load_before, "after": os.getloadavg()[0]}},
         "llama_cpp": {"measured": not llama_reason, "reason": llama_reason, "note": llama_note},
         "gateway": gateway_result, "decode_profile": profile,
         "quality": [q.as_dict() for q in quality]}, indent=2) + "\n")
    step(f"done in {time.perf_counter() - t_start:.0f}s -> {out}")
    return rows, verdicts


def lm_table(spec: DeploymentSpec, rows: Sequence[LMRow], new_tokens: int = 128) -> Table:
    from kiln_core.machine import flags_line

    t = Table(title=f"kiln bench: {spec.name} (greedy, chat prompts, {new_tokens} new tokens, {os.cpu_count()} CPU cores)",
              caption=f"{flags_line()}\nmedian of {rows[0].runs if rows else 0} runs per row; x llama.cpp: decode "
                      "tokens/s per stream at 1 stream, all-stream tokens/s at more")
    for col in ("path", "streams", "TTFT p50 ms", "decode tok/s per stream", "tok/s all streams",
                "gap p50 / p95 ms", "x llama.cpp"):
        t.add_column(col, justify="left" if col == "path" else "right")

    def f(x: float | None, d: int = 1) -> str:
        return "-" if x is None else f"{x:.{d}f}"

    for r in rows:
        ref = _find(rows, LLAMA, r.streams)
        x = None
        if ref is not None and r.kind != LLAMA:
            x = (_ratio(r.per_stream_tokens_per_s, ref.per_stream_tokens_per_s) if r.streams == 1
                 else _ratio(r.tokens_per_s, ref.tokens_per_s))
        gaps = "-" if r.gap_p50_ms is None else f"{r.gap_p50_ms:.1f} / {r.gap_p95_ms:.1f}"
        t.add_row(r.path, str(r.streams), f(r.ttft_ms, 0), f(r.per_stream_tokens_per_s), f(r.tokens_per_s), gaps,
                  f(x, 2) if x is not None else "")
    return t
