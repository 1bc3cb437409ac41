"""`serve_precision: auto`: which variant to serve, decided on the machine that builds.

A variant is eligible when it passed its parity gate and the batch-invariance check (the
same input alone and co-batched gives identical outputs: greedy tokens equal for causal
LMs, max |diff| <= 1e-6 for encoder outputs). Among the eligible, the fastest by one named
metric wins: one-stream decode tokens/s for causal LMs, batch-8 sentences/s for encoders
(in-process ONNX Runtime with the spec's threads, median of repeats). The pick, the metric,
the runners-up and why others were excluded are recorded in the manifest (``selection``).

Also: which failures stop the pipeline. Only the served variant's (``--strict``: any).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import numpy as np

from kiln_core.machine import machine_info
from kiln_core.manifest import ExportManifest, Selection
from kiln_core.spec import AUTO, DeploymentSpec, Task

LM_METRIC = "one-stream decode tokens/s"
ENCODER_METRIC = "batch-8 sentences/s"
INVARIANCE_MAX_ABS = 1e-6  # encoders: alone vs co-batched
REPEATS = 3


def metric_for(spec: DeploymentSpec) -> str:
    return LM_METRIC if spec.task is Task.text_generation else ENCODER_METRIC


# --- the pick ---------------------------------------------------------------------------


def select(spec: DeploymentSpec, manifest: ExportManifest) -> Selection | None:
    """The auto pick from the figures already recorded on each variant (None: nothing eligible)."""
    metric = metric_for(spec)
    values, excluded = _eligibility(manifest, metric)
    if not values:
        return None
    best = max(values, key=lambda p: values[p])
    return Selection(precision=best, metric=metric, values=values, eligible=list(values), excluded=excluded,
                     machine=machine_info())


def _eligibility(manifest: ExportManifest, metric: str) -> tuple[dict[str, float], dict[str, str]]:
    """(eligible variant -> its measured metric, excluded variant -> why)."""
    excluded, values = {}, {}
    for name, v in manifest.variants.items():
        if not v.usable:
            excluded[name] = "failed its parity gate"
        elif v.batch_invariance is None:
            excluded[name] = "batch invariance not checked"
        elif not v.batch_invariance.get("invariant"):
            excluded[name] = f"not batch-invariant ({v.batch_invariance.get('detail', '')})".replace(" ()", "")
        elif metric not in v.speed:
            excluded[name] = f"{metric} not measured"
        else:
            values[name] = v.speed[metric]
    return values, excluded


def gate_failures(spec: DeploymentSpec, manifest: ExportManifest, strict: bool = False) -> list[str]:
    """The misses that must stop the pipeline: the served variant's (for auto: there must be a
    pick); with ``strict``, every variant's. Others are reported in the table and manifest only."""
    failed = {k: v for k, v in manifest.variants.items() if not v.usable}
    if strict:
        return [f"{k} ({'; '.join(v.parity.failures)})" for k, v in failed.items()]
    if spec.serve_precision == AUTO:
        if manifest.selection is None:
            why = "; ".join(f"{k}: {r}" for k, r in _eligibility(manifest, metric_for(spec))[1].items())
            return [f"serve_precision auto: no variant passed its gate and the batch-invariance check ({why})"]
        return []
    served = spec.serve_precision.value
    v = manifest.variants.get(served)
    if v is None:
        return [f"{served} (not built)"]
    return [] if v.usable else [f"{served}, the served variant ({'; '.join(v.parity.failures)})"]


def median_rate(run_once: Callable[[], float], repeats: int = REPEATS) -> float:
    """Median of ``repeats`` rates (each call returns units/s)."""
    return float(statistics.median(run_once() for _ in range(repeats)))


# --- encoders ---------------------------------------------------------------------------


def encoder_invariance(run: Callable[[dict], np.ndarray], encode: Callable[[list[str]], dict],
                       texts: Sequence[str], post: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> dict:
    """Each text alone vs all of them in one padded batch (what Triton's dynamic batcher does
    with concurrent requests). ``post(output, attention_mask)`` pools / normalizes."""
    together_feeds = encode(list(texts))
    together = post(run(together_feeds), together_feeds["attention_mask"])
    worst = 0.0
    for i, t in enumerate(texts):
        feeds = encode([t])
        alone = post(run(feeds), feeds["attention_mask"])[0]
        worst = max(worst, float(np.abs(alone - together[i]).max()))
    ok = worst <= INVARIANCE_MAX_ABS
    return {"invariant": ok, "max_abs_diff": worst, "texts": float(len(texts)),
            "detail": "" if ok else f"max |diff| {worst:.2e} alone vs co-batched > {INVARIANCE_MAX_ABS:g}"}


def encoder_speed(run: Callable[[dict], np.ndarray], feeds: dict, repeats: int = REPEATS, calls: int = 10) -> float:
    """Sentences/s for one batch (median of repeats of ``calls`` runs each), after a warm-up."""
    run(feeds)
    n = int(feeds["input_ids"].shape[0])

    def once() -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            run(feeds)
        return n * calls / (time.perf_counter() - t0)

    return median_rate(once, repeats)


# --- causal LMs -------------------------------------------------------------------------


def lm_invariance(lm, prompts: list[list[int]], steps: int, pad_id: int) -> dict:
    """Greedy tokens of each prompt decoded alone vs as one row of a left-padded batch of all
    of them (prefill and decode batched, as continuous batching co-schedules requests)."""
    from export.lm_parity import batched_greedy

    together = batched_greedy(lm, prompts, steps, pad_id)
    alone = [batched_greedy(lm, [p], steps, pad_id)[0] for p in prompts]
    same = [a == b for a, b in zip(alone, together)]
    ok = all(same)
    return {"invariant": ok, "prompts": float(len(prompts)), "identical": float(sum(same)), "steps": float(steps),
            "detail": "" if ok else f"{len(same) - sum(same)}/{len(same)} prompts' greedy tokens change when co-batched"}


def lm_speed(lm, prompt: list[int], steps: int = 64, repeats: int = REPEATS) -> float:
    """One-stream decode tokens/s (prefill excluded), median of repeats, after a warm-up."""
    from export.lm_parity import timed_decode

    timed_decode(lm, prompt, 4)
    return median_rate(lambda: timed_decode(lm, prompt, steps), repeats)


def record(manifest: ExportManifest, name: str, invariance: dict, speed: dict[str, float]) -> None:
    v = manifest.variants[name]
    v.batch_invariance = invariance
    v.speed = speed


def selection_lines(manifest: ExportManifest) -> list[str]:
    """What a person reads after the parity table."""
    sel = manifest.selection
    if sel is None:
        return []
    return [f"serve_precision auto -> {sel.reason()}", f"  measured on {machine_line(sel.machine)}"]


def invariance_cell(v) -> str:
    """A parity table's batch-invariance column for one variant."""
    if v.batch_invariance is None:
        return "-"
    return "yes" if v.batch_invariance.get("invariant") else "[yellow]no[/]"


def machine_line(m: dict) -> str:
    return f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, flags {' '.join(m.get('flags', [])) or '-'}"

