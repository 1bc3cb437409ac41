"""The gateway's one typed config, and the models it serves, read from kiln repositories.

Which models exist, their task and limits come from each repository's ``kiln.json``
(written by ``kiln repo``, read through ``kiln_core.card.RepositoryCard``); nothing about them is typed in twice. Keys come from a file
(YAML: a list of {name, key | sha256, rpm, tpm, admin}) and/or an environment variable
(comma-separated keys, never admin); only their SHA-256 digests are kept in memory.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kiln_core.card import CardError, RepositoryCard

KEYS_ENV = "KILN_API_KEYS"


class GatewayError(ValueError):
    """A config or repository the gateway cannot start with (found at start-up)."""


class Limits(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    rpm: int | None = Field(None, ge=1, description="requests per minute per key (None: unlimited)")
    tpm: int | None = Field(None, ge=1, description="tokens (prompt + completion) per minute per key")


class GatewayConfig(BaseModel):
    """Everything a gateway process needs (``kiln gateway --config-json`` carries it whole)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(9000, ge=0, le=65535)
    triton_grpc: str = Field("127.0.0.1:8001", description="host:port of Triton's gRPC endpoint")
    triton_replicas: list[str] = Field(default_factory=list, description="more Tritons (host:port, gRPC) serving "
                                                                         "the same repositories: requests go to the "
                                                                         "least busy, and fail over between them")
    triton_ids: list[str] = Field(default_factory=list, description="the server id each Triton (triton_grpc, then "
                                  "the replicas) reports as its name, `GET /v2`: /ready believes only a server "
                                  "that says it, never another process on its port; none: any Triton")
    repositories: list[Path] = Field(default_factory=list, description="kiln model repositories Triton serves")
    keys_file: Path | None = None
    keys_env: str = KEYS_ENV
    limits: Limits = Limits()  # default per-key limits (a key's own entry overrides; keyless: the shared one)
    allow_unauthenticated: bool = Field(False, description="serve without keys on a non-loopback host (anyone "
                                                           "who reaches the port may use the models)")
    redis_url: str | None = Field(None, description="redis://host:port/db holding the per-key limits, shared by every "
                                                    "gateway process that names it; none: limits in this process")
    limits_fail_closed: bool = Field(False, description="Redis unreachable: refuse requests with 503 (default: serve "
                                                        "them without limits, /ready says limits are degraded)")
    reuse_port: bool = Field(False, description="bind with SO_REUSEPORT, so several gateway processes share the "
                                                "port (the kernel spreads connections over them)")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies get 413")
    max_in_flight: int = Field(256, ge=1, description="API requests answered at once by this process; more get "
                                                      "503 with Retry-After at once")
    embeddings_queue_s: float = Field(0.5, gt=0, description="an embeddings request expected to wait longer than "
                                                             "this behind those in flight (their number over the "
                                                             "rate Triton answers them) gets 503 with Retry-After "
                                                             "at once")
    embeddings_deadline_s: float = Field(30.0, gt=0, description="an embeddings request past it: 504, cancelled")
    generation_deadline_s: float = Field(600.0, gt=0, description="a generation past it: 504, cancelled in Triton")
    request_timeout_s: float = Field(600.0, gt=0)
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM / stop: seconds in-flight requests may finish "
                                                           "(new ones get 503 shutting_down) before the process exits")
    server_dirs: list[Path] = Field(default_factory=list, description="the server folders of the `kiln serve` "
                                    "Tritons behind this gateway (each holds triton.json, its address and admin key): "
                                    "what the admin routes pass to `kiln reload --server-dir`; none: no admin routes")
    jobs_dir: Path | None = Field(None, description="where admin jobs (reload / rollback) keep their spec, log and "
                                                    "outcome, shared by every gateway process that names it "
                                                    "(default: admin-jobs/ in the first server folder)")
    log_level: str = "info"

    @model_validator(mode="after")
    def _one_id_per_triton(self) -> "GatewayConfig":
        if self.triton_ids and len(self.triton_ids) != 1 + len(self.triton_replicas):
            raise ValueError(f"triton_ids names {len(self.triton_ids)} servers for {1 + len(self.triton_replicas)} "
                             "Tritons (triton_grpc and the replicas)")
        return self

    @property
    def admin_jobs_dir(self) -> Path | None:
        """The jobs folder the admin routes use; None when no server folder is known."""
        if self.jobs_dir is not None:
            return self.jobs_dir
        return self.server_dirs[0] / "admin-jobs" if self.server_dirs else None


def is_loopback(host: str) -> bool:
    """Only this machine can reach ``host`` (a name other than localhost may resolve anywhere)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServedModel:
    """A public model as the gateway offers it."""

    name: str
    task: str  # feature-extraction | text-classification | text-generation
    created: int
    max_input_tokens: int  # encoders: max_length; generators: the context (prompt + completion)
    tokenizer_file: Path | None  # encoders: counted and length-checked here before Triton
    max_batch_size: int
    repository: Path
    dim: int | None = None  # embedding size (encoders)
    engine_slots: int | None = None  # generators: sequences running + waiting in the model (more: refused)
    response_cache: bool = False  # Triton answers identical requests from its response cache
    canary_model: str | None = None  # `kiln reload --canary`: the Triton model a share of requests goes to
    canary_share: float = 0.0

    @property
    def kind(self) -> str:
        return "chat" if self.task == "text-generation" else "embedding" if self.task == "feature-extraction" else "classify"


def read_models(repositories: list[Path]) -> dict[str, ServedModel]:
    models: dict[str, ServedModel] = {}
    for repo in repositories:
        try:
            card = RepositoryCard.read(repo)
        except CardError as err:
            raise GatewayError(str(err)) from None
        name = card.public_model
        if name in models:
            raise GatewayError(f"model {name!r} appears in two repositories: {models[name].repository} and {repo}")
        models[name] = ServedModel(
            name=name,
            task=card.task,
            created=int(RepositoryCard.path(repo).stat().st_mtime),
            max_input_tokens=card.max_input_tokens,
            tokenizer_file=None if card.generation else card.tokenizer_path(repo),
            max_batch_size=card.max_batch_size,
            repository=Path(repo),
            dim=card.embedding_dim,
            engine_slots=engine_slots(card.spec),
            response_cache=card.response_cache_mb > 0,
            canary_model=(card.canary or {}).get("model"),
            canary_share=float((card.canary or {}).get("share", 0.0)),
        )
        if models[name].tokenizer_file is not None and not models[name].tokenizer_file.is_file():
            raise GatewayError(f"{repo}: tokenizer {card.tokenizer} is missing; rewrite the repository with `kiln repo`")
    return models


def engine_slots(spec: dict) -> int | None:
    """A generation model's max_concurrent + max_queue, from the spec its card records."""
    gen = spec.get("generation") or {}
    if "max_concurrent" not in gen or "max_queue" not in gen:
        return None
    return int(gen["max_concurrent"]) + int(gen["max_queue"])


def load_config(path: Path | None = None, **overrides) -> GatewayConfig:
    import yaml

    data = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        data = data.get("gateway", data)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return GatewayConfig.model_validate(data)


def environ_keys(config: GatewayConfig) -> list[str]:
    raw = os.environ.get(config.keys_env, "")
    return [k.strip() for k in raw.split(",") if k.strip()]
