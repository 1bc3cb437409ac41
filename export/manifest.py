"""The export manifest: the contract the repository writer (and a person) reads.

Written as JSON beside the exported graphs. Tensor names, dtypes and shapes are recorded
once here; nothing downstream copies them by hand.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, Field

MANIFEST_NAME = "manifest.json"


class TensorSpec(BaseModel):
    name: str
    dtype: str  # numpy dtype name: int64, float32, ...
    shape: list[int | str]  # symbolic axes by name ("batch", "sequence")


class ParityReport(BaseModel):
    reference: str  # what it was compared with
    inputs: int
    figures: dict[str, float]
    thresholds: dict[str, float]
    passed: bool
    failures: list[str] = Field(default_factory=list)


class Variant(BaseModel):
    precision: str
    file: str  # relative to the manifest's folder
    sha256: str
    bytes: int
    notes: str = ""
    fused_ops: dict[str, int] = Field(default_factory=dict)
    parity: ParityReport | None = None

    @property
    def usable(self) -> bool:
        return self.parity is not None and self.parity.passed


class ExportManifest(BaseModel):
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
