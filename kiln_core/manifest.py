"""The export manifest: the contract the repository writer (and a person) reads.

Written as JSON beside the exported graphs. Tensor names, dtypes and shapes are recorded
once here; nothing downstream copies them by hand.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, Field

from kiln_core.judge import Direction, Threshold, judge

MANIFEST_NAME = "manifest.json"
# bumped when a variant's format changes, so an older export is rebuilt rather than reused
# (2: U8U8 int8, portability + batch-invariance checks, speed for serve_precision auto, grid-aware int4;
#  3: each gate threshold's direction stored beside it)
EXPORT_FORMAT = 3


class TensorSpec(BaseModel):
    name: str
    dtype: str  # numpy dtype name: int64, float32, ...
    shape: list[int | str]  # symbolic axes by name ("batch", "sequence")


class ParityReport(BaseModel):
    """A variant's gate: its figures, the thresholds they were held to (each with its
    direction, so a reader needs no list of which limits are maximums) and the verdict."""

    reference: str  # what it was compared with
    inputs: int
    figures: dict[str, float]
    thresholds: dict[str, float]
    # each threshold's direction; absent in reports written before directions were recorded
    directions: dict[str, Direction] = Field(default_factory=dict)
    passed: bool
    failures: list[str] = Field(default_factory=list)

    @classmethod
    def judged(cls, reference: str, inputs: int, figures: dict[str, float], thresholds: list[Threshold],
               failures: Sequence[str] = ()) -> "ParityReport":
        """``figures`` held to ``thresholds`` by the one judge; ``failures``: misses found
        some other way, listed after the thresholds'."""
        report = cls(reference=reference, inputs=inputs, figures={}, thresholds={}, passed=True)
        report.hold(figures, thresholds)
        report.failures += failures
        report.passed = not report.failures
        return report

    def hold(self, figures: dict[str, float], thresholds: list[Threshold], why: str = "") -> None:
        """Add ``figures`` and ``thresholds`` to this report and fail it on each threshold
        they miss (``why``: what to do about it, appended to each miss's message)."""
        self.figures.update(figures)
        for t in thresholds:
            self.thresholds[t.name] = t.limit
            self.directions[t.name] = t.direction
        missed = judge(self.figures, thresholds).failures
        self.failures += [f"{m}: {why}" if why else m for m in missed]
        self.passed = self.passed and not missed

    @property
    def limits(self) -> list[Threshold]:
        """The thresholds with their directions, as the gate stated them."""
        return [Threshold(name, limit, self.directions[name]) for name, limit in self.thresholds.items()]


class Selection(BaseModel):
    """What ``serve_precision: auto`` picked at export, and why (also shown in the repository card)."""

    precision: str  # the variant served
    metric: str  # e.g. "one-stream decode tokens/s"
    values: dict[str, float]  # every eligible variant's measured metric (median of repeats)
    eligible: list[str]  # passed the parity gate and the batch-invariance check
    excluded: dict[str, str] = Field(default_factory=dict)  # variant -> why it could not be picked
    machine: dict = Field(default_factory=dict)  # CPU model and flags the pick was measured on

    @property
    def runners_up(self) -> list[str]:
        return sorted((p for p in self.values if p != self.precision), key=lambda p: -self.values[p])

    def reason(self) -> str:
        ups = ", ".join(f"{p} {self.values[p]:.1f}" for p in self.runners_up) or "none"
        out = f"{self.precision}: fastest by {self.metric} ({self.values[self.precision]:.1f}; runners-up: {ups})"
        if self.excluded:
            out += "; not eligible: " + "; ".join(f"{p} ({why})" for p, why in self.excluded.items())
        return out


class Variant(BaseModel):
    precision: str
    file: str  # relative to the manifest's folder
    sha256: str
    bytes: int
    notes: str = ""
    fused_ops: dict[str, int] = Field(default_factory=dict)
    parity: ParityReport | None = None
    # batch invariance: the same input alone and co-batched gives identical outputs
    # (greedy tokens equal; embeddings max |diff| <= 1e-6); None: not checked
    batch_invariance: dict[str, float | bool | str] | None = None
    # measured speed at export on this machine (metric name -> value), for serve_precision: auto
    speed: dict[str, float] = Field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return self.parity is not None and self.parity.passed


class ExportManifest(BaseModel):
    export_format: int = 1  # absent in exports older than the field
    name: str
    task: str
    architecture: str
    checkpoint: str
    tokenizer_dir: str  # relative
    max_length: int
    hidden_size: int
    pooling: str
    normalize: bool
    labels: list[str] | None = None
    opset: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    variants: dict[str, Variant] = Field(default_factory=dict)
    # causal LMs only: num_layers, num_kv_heads, head_dim, vocab_size, eos_token_ids,
    # bos_token_id, max_context, has_chat_template (what the generation engine needs)
    decoder: dict | None = None
    selection: Selection | None = None  # serve_precision: auto, as decided at export
    tools: dict[str, str] = Field(default_factory=dict)
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def write(self, folder: Path) -> Path:
        path = folder / MANIFEST_NAME
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, folder: Path) -> "ExportManifest":
        path = folder / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `kiln export` first")
        return cls.model_validate_json(path.read_text())

    def served_precision(self, serve_precision) -> str:
        """The precision a spec's ``serve_precision`` means for this export ("auto": the recorded pick)."""
        value = getattr(serve_precision, "value", serve_precision)
        if value != "auto":
            return value
        if self.selection is None:
            raise LookupError("serve_precision is auto but this export recorded no pick: re-run `kiln export`")
        return self.selection.precision

    def served_variant(self, serve_precision) -> Variant:
        """The variant to serve for a spec's ``serve_precision``; refuses one that failed its gate."""
        return self.usable_variant(self.served_precision(serve_precision))

    def usable_variant(self, precision: str) -> Variant:
        v = self.variants.get(precision)
        if v is None:
            raise LookupError(f"no {precision} variant in the manifest (built: {sorted(self.variants)})")
        if not v.usable:
            raise LookupError(f"the {precision} variant failed its parity gate; it must not be served")
        return v


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tool_versions(*names: str) -> dict[str, str]:
    out = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
