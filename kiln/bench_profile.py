"""Where a decode step's time goes in the generation engine, in this process (no Triton).

``profile_decode`` runs the served engine code (kiln_runtime/generation/engine.py)
over ONNX Runtime on the served variant, with the served session settings, for N concurrent
greedy chat streams, and returns the engine's per-step split (runner, KV handling, sampling,
detokenizing, bookkeeping) in ms and % of the step. Triton's share (IPC between the server and
the python backend stub, response sending) cannot be seen from here: ``served_overhead`` turns
a served per-stream rate into "served step time minus in-process step time".

``join_stall`` measures what chunked prefill is for: while one stream decodes, a long prompt
joins; it returns the running stream's inter-token gaps with and without chunking.

    python -m kiln.bench_profile smollm2 [--streams 1 8] [--new-tokens 128] [--precision int8] [--join]
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from kiln_core.spec import DeploymentSpec

PHASE_LABELS = {  # what each of the engine's PROFILE_PHASES covers
    "run_decode": "ORT run: decode",
    "run_prefill": "ORT run: prefill",
    "kv": "KV: feeds/batch/mask",
    "sample": "sampling",
    "detok": "detok + stops + event",
    "other": "bookkeeping",
}


# ----------------------------------------------------------------------------- building the engine
def served_session(spec: DeploymentSpec, manifest):
    """(ONNX Runtime session, variant) as the generation model opens it: the served variant,
    CPU provider, intra_op_threads from the spec, warnings off (kiln_runtime.ort, as served)."""
    from kiln_runtime.ort import open_session

    variant = manifest.usable_variant(manifest.served_precision(spec.serve_precision))
    return open_session(str(spec.export_dir / variant.file), spec.instances.intra_op_threads or 0), variant


def make_engine(spec: DeploymentSpec, manifest, session, *, max_concurrent: int, prefill_chunk: int | None = None,
                ignore_eos: bool = True, engine_cls=None):
    """(engine, tokenizer, chat template) over a session. ignore_eos: every stream runs to its
    max_tokens (steady batches to time); engine_cls: another Engine with the same constructor
    (an older copy, to compare)."""
    from tokenizers import Tokenizer

    from kiln_runtime.generation.chat_template import ChatTemplate
    from kiln_runtime.generation.slots import engine_for
    from kiln_runtime.ort import session_runner

    d = manifest.decoder
    tok_dir = spec.export_dir / manifest.tokenizer_dir
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    template = ChatTemplate.from_dir(str(tok_dir))
    kw = {"prefill_chunk": prefill_chunk} if prefill_chunk is not None else {}
    eos = [] if ignore_eos else d["eos_token_ids"]
    if engine_cls is None:  # the engine the served model runs for this graph
        engine = engine_for(session, d, tok, max_concurrent, eos_token_ids=eos, **kw)
    else:
        engine = engine_cls(session_runner(session), d["num_layers"], d["num_kv_heads"], d["head_dim"], eos,
                            max_concurrent, d["max_context"], tok, **kw)
    return engine, tok, template


def chat_prompts(tok, template, n: int) -> list[list[int]]:
    from kiln.bench_lm import PROMPTS
    from kiln_runtime.generation.chat_template import encode_prompt

    return [encode_prompt(tok, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], template=template)
            for i in range(n)]


def timed_decode(engine, prompts: Sequence[Sequence[int]], new_tokens: int | Sequence[int]) -> dict:
    """Submit every prompt (greedy; new_tokens: one budget for all, or one each), step once
    (their prefills), then reset the profile and step until all are done: decode-only figures,
    the join of the batch (and any leaves) included."""
    from kiln_runtime.generation.params import SamplingParams

    budgets = [new_tokens] * len(prompts) if isinstance(new_tokens, int) else list(new_tokens)
    for i, (p, n) in enumerate(zip(prompts, budgets, strict=True)):
        engine.submit(f"s{i}", list(p), SamplingParams(max_tokens=n, temperature=0.0))
    t0 = time.perf_counter()
    engine.step()
    prefill_ms = (time.perf_counter() - t0) * 1000
    profiled = hasattr(engine, "profile")  # an older engine (compared with engine_cls) has none
    if profiled:
        engine.reset_profile()
    steps, tokens = [], 0
    while engine.has_work():
        t = time.perf_counter()
        tokens += len(engine.step())
        steps.append((time.perf_counter() - t) * 1000)
    wall = sum(steps) / 1000
    return {"prefill_ms": prefill_ms, "step_times_ms": steps, "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "profile": engine.profile() if profiled else None}


# ----------------------------------------------------------------------------- the profile
def profile_decode(spec: DeploymentSpec, manifest, streams: int, new_tokens: int = 128, *, session=None,
                   prefill_chunk: int | None = None) -> dict:
    """Profile `streams` concurrent greedy chat streams decoding new_tokens each (EOS ignored,
    so the batch stays full) in this process.

    Returns: variant, file, threads, streams, new_tokens, prompt_tokens, prefill_ms (the step
    that prefilled them all), steps, step_ms (mean decode step), step_p50_ms, step_p90_ms,
    tokens_per_s (all streams), per_stream_tokens_per_s, phases_ms / phases_pct (per step, for
    each of the engine's PROFILE_PHASES), counts, profile (Engine.profile() as it was)."""
    if session is None:
        session, variant = served_session(spec, manifest)
    else:
        variant = manifest.usable_variant(manifest.served_precision(spec.serve_precision))
    engine, tok, template = make_engine(spec, manifest, session, max_concurrent=streams, prefill_chunk=prefill_chunk)
    prompts = chat_prompts(tok, template, streams)
    timed_decode(engine, prompts[:1], 4)  # warm-up: ORT's first runs allocate
    run = timed_decode(engine, prompts, new_tokens)
    return summarize(run, variant=variant.precision, file=variant.file, threads=spec.instances.intra_op_threads,
                     streams=streams, new_tokens=new_tokens, prompt_tokens=[len(p) for p in prompts])


def summarize(run: dict, **about) -> dict:
    """profile_decode's result from a timed_decode run (`about`: variant, file, threads,
    streams, new_tokens, prompt_tokens)."""
    prof, steps = run["profile"], run["step_times_ms"]
    return {
        **about,
        "prefill_ms": run["prefill_ms"],
        "steps": prof["steps"],
        "step_ms": prof["step_ms"],
        "step_p50_ms": float(np.percentile(steps, 50)),
        "step_p90_ms": float(np.percentile(steps, 90)),
        "tokens_per_s": run["tokens_per_s"],
        "per_stream_tokens_per_s": 1000.0 / prof["step_ms"],
        "phases_ms": prof["phases_ms"],
        "phases_pct": prof["phases_pct"],
        "counts": prof["counts"],
        "profile": prof,
    }


def served_overhead(result: dict, served_per_stream_tokens_per_s: float) -> dict:
    """What serving adds per decode step, from a served run's per-stream decode rate at the
    same number of streams (e.g. bench_lm's per_stream_tokens_per_s): served_step_ms,
    inprocess_step_ms, overhead_ms (the difference: Triton IPC, response sending, the
    backend's loop) and overhead_pct (of the served step)."""
    served = 1000.0 / served_per_stream_tokens_per_s
    diff = served - result["step_ms"]
    return {"streams": result["streams"], "served_step_ms": served, "inprocess_step_ms": result["step_ms"],
            "overhead_ms": diff, "overhead_pct": 100.0 * diff / served}


def profile_table(results: Sequence[dict], title: str | None = None) -> Table:
    """One column pair (ms/step, %) per result, one row per phase."""
    from kiln_runtime.generation.engine import PROFILE_PHASES

    first = results[0]
    t = Table(title=title or f"decode step split, in-process engine, {first['variant']} ({first['threads']} threads)")
    t.add_column("phase")
    for r in results:
        t.add_column(f"{r['streams']} stream{'s' if r['streams'] > 1 else ''} ms/step", justify="right")
        t.add_column("%", justify="right")
    for phase in PROFILE_PHASES:
        t.add_row(PHASE_LABELS[phase], *[x for r in results for x in
                                         (f"{r['phases_ms'][phase]:.2f}", f"{r['phases_pct'][phase]:.1f}")])
    t.add_row("[bold]step (mean)[/]", *[x for r in results for x in (f"{r['step_ms']:.2f}", "100.0")])
    t.add_row("step p50 / p90", *[x for r in results for x in (f"{r['step_p50_ms']:.1f} / {r['step_p90_ms']:.1f}", "")])
    t.add_row("tokens/s (all streams)", *[x for r in results for x in (f"{r['tokens_per_s']:.1f}", "")])
    t.add_row("rebuilds / compactions", *[x for r in results for x in
                                          (f"{r['counts']['rebuilds']} / {r['counts']['compactions']}", "")])
    return t


# ----------------------------------------------------------------------------- a long prompt joins
def long_prompt(tok, n_tokens: int) -> list[int]:
    """n_tokens of ordinary English (the bench prompts, repeated) as token ids."""
    from kiln.bench_lm import PROMPTS

    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += tok.encode(" ".join(PROMPTS) + "\n").ids
    return ids[:n_tokens]


def join_stall(spec: DeploymentSpec, manifest, prefill_chunk: int | None, *, prompt_tokens: int = 1000,
               new_tokens: int = 200, join_after: int = 16, long_new_tokens: int = 8, session=None) -> dict:
    """One stream decodes new_tokens (greedy); after its join_after-th token a prompt of
    prompt_tokens joins (max_tokens long_new_tokens). Returns the running stream's
    inter-token gaps: before (undisturbed, before the join), median / p99 / max over the whole
    stream, the same over the window from the join to the long prompt's first token, the long
    prompt's time to first token, and the prefill calls it took."""
    from kiln_runtime.generation.params import SamplingParams

    if session is None:
        session, _ = served_session(spec, manifest)
    engine, tok, template = make_engine(spec, manifest, session, max_concurrent=2, prefill_chunk=prefill_chunk)
    run = chat_prompts(tok, template, 1)[0]
    timed_decode(engine, [run], 4)  # warm-up
    engine.submit("run", run, SamplingParams(max_tokens=new_tokens, temperature=0.0))
    stamps: list[float] = []  # when each of the running stream's tokens came out
    joined = first_long = None  # stamps indices: the join, the long prompt's first token
    join_time = 0.0  # when the long prompt was submitted
    while engine.has_work():
        events = engine.step()
        now = time.perf_counter()
        ids = {ev.request_id for ev in events}
        if "run" in ids:
            stamps.append(now)
        if "long" in ids and first_long is None:
            first_long = len(stamps) - 1
            long_ttft = now - join_time
        if joined is None and len(stamps) == join_after:
            engine.reset_profile()
            engine.submit("long", long_prompt(tok, prompt_tokens), SamplingParams(max_tokens=long_new_tokens, temperature=0.0))
            joined, join_time = len(stamps) - 1, now
    if first_long is None or first_long <= joined:
        raise RuntimeError("the running stream ended before the long prompt's first token: raise new_tokens")
    prefill_calls = engine.profile()["counts"]["prefill_calls"]
    gaps = np.diff(stamps) * 1000
    before = gaps[:joined]
    during = gaps[joined:first_long]

    def stats(x):
        return {"median_ms": float(np.median(x)), "p99_ms": float(np.percentile(x, 99)), "max_ms": float(np.max(x))}

    return {"prefill_chunk": prefill_chunk, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "undisturbed_median_ms": float(np.median(before)), "all": stats(gaps), "join_window": stats(during),
            "window_gaps": len(during), "long_ttft_ms": long_ttft * 1000, "prefill_calls": prefill_calls}


def join_table(rows: Sequence[dict]) -> Table:
    t = Table(title=f"running stream's inter-token gaps while a {rows[0]['prompt_tokens']}-token prompt joins")
    for c in ("prefill_chunk", "undisturbed p50", "p50", "p99", "max", "window p50", "window p99", "window max",
              "p99 / undisturbed", "long prompt TTFT", "prefill calls"):
        t.add_column(c, justify="right")
    for r in rows:
        a, w, u = r["all"], r["join_window"], r["undisturbed_median_ms"]
        t.add_row(str(r["prefill_chunk"] or "off"), f"{u:.0f}", f"{a['median_ms']:.0f}", f"{a['p99_ms']:.0f}",
                  f"{a['max_ms']:.0f}", f"{w['median_ms']:.0f}", f"{w['p99_ms']:.0f}", f"{w['max_ms']:.0f}",
                  f"{max(a['p99_ms'], w['max_ms']) / u:.1f}x", f"{r['long_ttft_ms']:.0f}", str(r["prefill_calls"]))
    return t


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    from kiln_core.manifest import ExportManifest
    from kiln_core.spec import load_spec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--join", action="store_true", help="also time a 1,000-token prompt joining a running stream")
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 16, 32, 64], help="0: no chunking")
    ap.add_argument("--precision", help="another variant than the served one (e.g. int8)")
    args = ap.parse_args(argv)
    console = Console()
    spec = load_spec(args.spec)
    manifest = ExportManifest.read(spec.export_dir)
    spec = spec.with_precision(args.precision or manifest.served_precision(spec.serve_precision))
    session, _ = served_session(spec, manifest)
    results = [profile_decode(spec, manifest, n, args.new_tokens, session=session) for n in args.streams]
    console.print(profile_table(results))
    if args.join:
        console.print(join_table([join_stall(spec, manifest, c or None, session=session) for c in args.chunks]))


if __name__ == "__main__":
    main()
