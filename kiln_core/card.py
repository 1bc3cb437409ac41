"""The repository card, ``kiln.json``: what a generated model repository serves.

Written by model_repository/writer.py, read by the gateway, the server launcher and the
CLI, all through this one class: its fields are the contract, nothing reads the file
with string keys. ``inputs`` / ``outputs`` give each public tensor's Triton dtype and
dims (batch axis excluded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from kiln_runtime.contract import EMBEDDING


class CardError(ValueError):
    """A folder that is not a kiln model repository, or a card this code cannot read."""


class TensorCard(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    dtype: str  # Triton's name: TYPE_STRING, TYPE_FP32, ...
    dims: list[int]  # without the batch axis; -1: any length


class RepositoryCard(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    FILE: ClassVar[str] = "kiln.json"

    public_model: str
    version: int = 1  # the model version Triton serves (`kiln reload` adds the next; the models pin it)
    previous: list[dict[str, Any]] = []  # earlier versions still on disk, newest first: {version, precision, variant_sha256}
    task: str  # feature-extraction | text-classification | text-generation
    serving: str | None = None  # encoders: ensemble | fused; generation: None (one decoupled model)
    models: list[str]  # every model folder in the repository
    tokenizer: str | None = None  # encoders: the served tokenizer.json, relative to the repository
    runtime: str
    precision: str  # the variant served
    selection: dict[str, Any] | None = None  # serve_precision auto: pick, metric, runners-up, reason
    variant_sha256: str
    parity: dict[str, Any]  # the served variant's gate figures
    batch_invariance: dict[str, Any] | None = None
    response_cache_mb: int = 0  # Triton's response cache for the public model: its size (0: off)
    # `kiln reload --canary`: while set, gateways send `share` of the public model's requests to
    # `model` (version `version`'s steps, not yet switched to) and count both arms apart
    canary: dict[str, Any] | None = None  # {model, version, share}
    max_input_tokens: int  # encoders: max_length; generation: the context (prompt + completion)
    max_batch_size: int
    inputs: dict[str, TensorCard]
    outputs: dict[str, TensorCard]
    spec: dict[str, Any]  # the deployment spec that wrote it, as JSON

    @property
    def generation(self) -> bool:
        return self.task == "text-generation"

    @property
    def embedding_dim(self) -> int | None:
        out = self.outputs.get(EMBEDDING)
        return out.dims[-1] if out is not None and out.dims else None

    def tokenizer_path(self, repo: Path) -> Path | None:
        return Path(repo) / self.tokenizer if self.tokenizer else None

    def write(self, repo: Path) -> Path:
        path = Path(repo) / self.FILE
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def path(cls, repo: Path) -> Path:
        return Path(repo) / cls.FILE

    @classmethod
    def exists(cls, repo: Path) -> bool:
        return cls.path(repo).is_file()

    @classmethod
    def read(cls, repo: Path) -> "RepositoryCard":
        path = cls.path(repo)
        if not path.is_file():
            raise CardError(f"{repo} is not a kiln model repository (no {cls.FILE}): run `kiln repo` first")
        try:
            return cls.model_validate_json(path.read_text())
        except ValueError as err:
            raise CardError(f"{path} cannot be read by this kiln ({err.__class__.__name__}): rewrite it with `kiln repo`") from None
