"""The parity gate: an exported graph must reproduce PyTorch, or nothing downstream uses it.

Inputs (>= spec.parity.min_inputs texts) always include a batch of one, a heavily padded
batch (one maximum-length text among very short ones), the maximum length itself, and
non-ASCII text (Chinese, Arabic, emoji). Each variant gets figures and a verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from export.portability import integer_matmuls, portability_problems
from export.selection import gate_failures
from kiln_core.judge import at_least, at_most
from kiln_core.manifest import ParityReport
from kiln_core.spec import DeploymentSpec, Precision, Task
from kiln_runtime.encoder import pool
from kiln_runtime.ort import open_session


class ParityError(RuntimeError):
    """A variant missed its gate; the message carries the table of figures."""


@dataclass
class ParityBatch:
    feeds: dict[str, np.ndarray]  # int64 [b, s]
    reference: np.ndarray  # PyTorch fp32 output for these feeds


def parity_texts(max_length: int, minimum: int) -> list[str]:
    lines = resources.files("export").joinpath("data/parity.txt").read_text(encoding="utf-8").splitlines()
    texts = [l for l in lines if l.strip() and not l.startswith("#")]
    long_text = " ".join(texts) * (1 + max_length // 64)  # well past max_length tokens: truncated
    texts = [texts[0], long_text] + texts[1:]
    while len(texts) < minimum:
        texts.append(texts[len(texts) % 8 + 2] + f" (variant {len(texts)})")
    return texts


def parity_batches(spec: DeploymentSpec, loaded, texts: list[str] | None = None) -> list[ParityBatch]:
    texts = texts or parity_texts(spec.max_length, spec.parity.min_inputs)
    # batch of one; heavy padding (a max-length text among short ones); the rest in 8s
    groups = [texts[:1], [texts[1]] + [t for t in texts[2:] if len(t) < 40][:5]]
    used = {0, 1} | {texts.index(t) for t in groups[1][1:]}
    rest = [t for i, t in enumerate(texts) if i not in used]
    groups += [rest[i : i + 8] for i in range(0, len(rest), 8)]
    out = []
    for group in groups:
        enc = loaded.tokenizer(group, padding=True, truncation=True, max_length=spec.max_length, return_tensors="pt")
        feeds = {n: enc[n] for n in loaded.input_names}
        with torch.no_grad():
            ref = getattr(loaded.model(**feeds), loaded.output_name).float().numpy()
        out.append(ParityBatch({k: v.numpy().astype(np.int64) for k, v in feeds.items()}, ref))
    longest = max(b.feeds["input_ids"].shape[1] for b in out)
    if longest != spec.max_length:
        raise AssertionError(f"parity inputs reach {longest} tokens, not max_length {spec.max_length}")
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def compare(spec: DeploymentSpec, batches: list[ParityBatch], run) -> dict[str, float]:
    """Figures for one runnable graph: `run(feeds) -> output array`."""
    cos, max_abs, agree, n = [], 0.0, 0, 0
    for b in batches:
        got = np.asarray(run(b.feeds), dtype=np.float32)
        mask = b.feeds["attention_mask"]
        if spec.task is Task.text_classification:
            cos.append(_cosine(got, b.reference))
            max_abs = max(max_abs, float(np.abs(got - b.reference).max()))
            agree += int((got.argmax(-1) == b.reference.argmax(-1)).sum())
        else:
            cos.append(_cosine(pool(got, mask, spec.pooling.value, False), pool(b.reference, mask, spec.pooling.value, False)))
            diff = np.abs(got - b.reference) * mask[..., None]
            max_abs = max(max_abs, float(diff.max()))
        n += got.shape[0]
    c = np.concatenate(cos)
    figures = {"min_cosine": float(c.min()), "mean_cosine": float(c.mean()), "max_abs_diff": max_abs}
    if spec.task is Task.text_classification:
        figures["label_agreement"] = agree / n
    return figures


def gate(spec: DeploymentSpec, precision: Precision, figures: dict[str, float], inputs: int) -> ParityReport:
    p = spec.parity
    if precision is Precision.fp32:
        thresholds = [at_least("min_cosine", p.fp32_min_cosine), at_most("max_abs_diff", p.fp32_max_abs)]
    elif precision is Precision.fp16:
        thresholds = [at_least("min_cosine", p.fp16_min_cosine)]
    else:
        thresholds = [at_least("mean_cosine", p.int8_mean_cosine), at_least("min_cosine", p.int8_min_cosine)]
    too_few = [f"only {inputs} inputs, needs >= {p.min_inputs}"] if inputs < p.min_inputs else []
    return ParityReport.judged("PyTorch fp32 (transformers, eager attention)", inputs, figures, thresholds, too_few)


def gates_caption(manifest) -> str:
    """The thresholds each variant was held to, for a parity table's caption."""
    parts = [f"{name}: " + ", ".join(str(t) for t in v.parity.limits) for name, v in manifest.variants.items()]
    return "gates: " + " | ".join(parts)


def raise_gate_failures(spec: DeploymentSpec, manifest, strict: bool = False) -> None:
    """Stop the pipeline when the served variant missed its gate (``strict``: any variant),
    after the manifest recorded why. Other misses stay in the table and manifest: the
    repository writer refuses those variants."""
    failed = gate_failures(spec, manifest, strict)
    if failed:
        raise ParityError("parity gate failed for " + ", ".join(failed))


def add_portability(report: ParityReport, path: Path) -> ParityReport:
    """Fail a quantized variant whose integer kernels would saturate on some x86 CPUs (the
    verdict comes from the weights, so it is the same on every machine that checks it)."""
    saturating = at_most("saturating_int8_matmuls", 0)
    count = float(sum(m.saturates for m in integer_matmuls(path)))
    report.hold({saturating.name: count}, [saturating], why="; ".join(portability_problems(path)))
    return report


def ort_runner(path: Path, threads: int = 0):
    """A graph as ``run(feeds) -> first output`` on the CPU, with the served models' session options."""
    session = open_session(str(path), intra_op_threads=threads)
    return lambda feeds: session.run(None, feeds)[0]
