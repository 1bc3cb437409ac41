"""`kiln reload SPEC` and `kiln rollback SPEC`: a new version of an encoder into the live
repository while Triton serves, with no request dropped.

Versions are pinned (model_repository.writer): every model of an encoder repository loads
only the versions its ``version_policy`` names, and the ensemble's steps name their version.
A reload of version n to n+1:

1. exports the spec anew (under ``<root>/versions/<n+1>/``) and gates it: a variant that
   fails its gate never reaches the repository;
2. writes ``<step>/<n+1>/`` beside ``<step>/<n>/`` (graph copied, tokenizer, model.py) and asks
   Triton to load both versions of each step (version n keeps serving);
3. loads a candidate ensemble (``<name>__candidate``, pinned to n+1, no response cache) and
   sends it a smoke request: the gate's calibration texts, whose answers must equal what the
   same code computes in process on the gated graph;
4. only then switches: a new ensemble version n+1 pinned to the new steps (Triton loads it
   and drops version n; requests in flight finish on the old steps), rewrites the card (the
   gateway re-reads it within a second), and unloads the old steps' version n.

A failure before the switch (export, gate, load, smoke) unloads what was added, removes its
files and leaves version n serving; the command exits 1 saying why. Version n stays on disk
for ``kiln rollback``, which switches back the same way (its files were gated when they were
served); the two versions before the serving one are kept, older ones removed.

Triton is reached through the connection file ``kiln serve`` writes in its server folder (its
gRPC address and the admin key that repository control needs). The gateway's admin route
(``kiln.gateway.admin``) runs this same command as a child process.

A generation model (one decoupled python model) moves the same way with no ensemble in
front (``GenerationSwitch``): version n+1 is written beside n, smoke-tested as
``<name>__candidate`` on the same files (greedy answers equal to the same engine run in process
on the gated graph), then the model is loaded with version n+1 only: Triton answers with n
until n+1 is ready and ends n's streams in flight before unloading it. Not yet: ``serving:
fused`` and canary mode (README "Open work").
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from kiln.canary import cosine_gate
from kiln.server import ADMIN_HEADER, CONNECTION_FILE, GRPC_HEADER_PREFIX
from kiln_core.card import RepositoryCard
from kiln_core.manifest import ExportManifest, sha256
from kiln_core.spec import DeploymentSpec
from kiln_runtime.contract import (
    MAX_TOKENS,
    TEMPERATURE,
    TEXT,
    TEXT_INPUT,
    TEXT_OUTPUT,
    TOKENIZER_DIR,
    head_outputs,
)
from model_repository import configs
from model_repository.writer import EncoderVersion, read_config, write_config

CANDIDATE = "__candidate"  # suffix of the ensemble that carries the smoke request to a new version
SMOKE_TEXTS = 8
SMOKE_MAX_ABS = 1e-4  # served vs in process, same graph and code: only batching may differ (invariant variants)
KEEP_PREVIOUS = 2  # versions kept on disk below the serving one
LOAD_TIMEOUT_S = 300.0


class ReloadError(RuntimeError):
    pass


class CanaryRolledBack(ReloadError):
    """The canary did worse than the serving version: rolled back (the comparison says why)."""

    def __init__(self, comparison):
        super().__init__("the canary was rolled back; version before it keeps serving\n" + comparison.table())
        self.comparison = comparison


@dataclass(frozen=True)
class TritonAdmin:
    """Repository control of a running Triton: its gRPC address and admin key."""

    grpc_url: str
    admin_key: str
    http_url: str = ""  # host:port of its HTTP endpoint (a generation model's smoke request)

    @classmethod
    def of(cls, server) -> "TritonAdmin":
        return cls(server.grpc_url, server.admin_key, server.http_url)

    @classmethod
    def from_file(cls, path: Path) -> "TritonAdmin":
        data = json.loads(Path(path).read_text())
        return cls(data["grpc"], data["admin_key"], data.get("http", ""))

    @property
    def headers(self) -> dict[str, str]:
        return {GRPC_HEADER_PREFIX + ADMIN_HEADER: self.admin_key}

    def client(self):
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(self.grpc_url)

    def load(self, model: str) -> None:
        with self.client() as c:  # closed here, never left to __del__ at exit
            c.load_model(model, headers=self.headers, client_timeout=LOAD_TIMEOUT_S)

    def unload(self, model: str) -> None:
        with self.client() as c:
            c.unload_model(model, headers=self.headers, client_timeout=LOAD_TIMEOUT_S)

    def infer(self, model: str, texts: list[str], outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        import tritonclient.grpc as grpcclient

        data = np.array([t.encode("utf-8") for t in texts], dtype=np.object_).reshape(-1, 1)
        inp = grpcclient.InferInput(TEXT, list(data.shape), "BYTES")
        inp.set_data_from_numpy(data)
        with self.client() as c:
            res = c.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput(o) for o in outputs], client_timeout=60)
        return {o: res.as_numpy(o) for o in outputs}

    def generate(self, model: str, prompt: str, max_tokens: int) -> dict:
        """One greedy generation, whole (Triton's HTTP generate endpoint)."""
        import urllib.request

        body = json.dumps({TEXT_INPUT: prompt, MAX_TOKENS: max_tokens, TEMPERATURE: 0}).encode()
        req = urllib.request.Request(f"http://{self.http_url}/v2/models/{model}/generate", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read().decode())


@dataclass(frozen=True)
class ReloadResult:
    model: str
    from_version: int
    to_version: int
    precision: str
    smoke: dict[str, float]
    seconds: float
    canary: str | None = None  # --canary: the comparison that promoted it, as printed

    @property
    def smoke_summary(self) -> str:
        """What the smoke request showed, in words ("": none was sent, a rollback)."""
        if "max_abs_diff" in self.smoke:
            return f"smoke max |diff| {self.smoke['max_abs_diff']:.2g}"
        if "identical" in self.smoke:
            return f"smoke {int(self.smoke['identical'])}/{int(self.smoke['prompts'])} greedy answers identical"
        return ""


def _tritons_in(folder: Path) -> list[TritonAdmin]:
    """The Triton `kiln serve` runs in this folder and its replicas' (under replica-N/)."""
    paths = [Path(folder) / CONNECTION_FILE, *sorted(Path(folder).glob(f"replica-*/{CONNECTION_FILE}"))]
    return [TritonAdmin.from_file(p) for p in paths if p.is_file()]


def running_tritons(server_dirs: list[Path], every: bool = False) -> list[TritonAdmin]:
    """Every Triton `kiln serve` runs for these folders, from their connection files: those of
    the first folder where one runs (its replicas' included), or with ``every`` those of each
    folder (each must have one: a switch must reach every replica), each Triton once.
    ReloadError when none runs."""
    if every:
        found: dict[str, TritonAdmin] = {}
        for folder in server_dirs:
            here = _tritons_in(folder)
            if not here:
                raise ReloadError(f"no Triton runs in {folder} (no {Path(folder) / CONNECTION_FILE}): every server "
                                  "folder named must have its `kiln serve` running (a replica being restarted: retry)")
            found.update({t.grpc_url: t for t in here if t.grpc_url not in found})
        return list(found.values())
    for folder in server_dirs:
        found_here = _tritons_in(folder)
        if found_here:
            return found_here
    raise ReloadError("no running `kiln serve` found (no " + " or ".join(str(Path(f) / CONNECTION_FILE)
                                                              for f in server_dirs) + "): start it first")


# ----------------------------------------------------------------------------- pure parts
def on_disk_versions(repo: Path, card: RepositoryCard) -> list[int]:
    """Version folders of the repository's public model, ascending."""
    folder = repo / card.public_model
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def served_entry(card: RepositoryCard) -> dict:
    """What the card says of its serving version, kept when another one takes over (a rollback
    restores it as it was)."""
    return {k: getattr(card, k) for k in ("version", "precision", "variant_sha256", "parity", "batch_invariance",
                                         "selection", "tokenizer", "response_cache_mb", "spec")}


def to_keep(serving: int, previous: list[dict]) -> set[int]:
    return {serving, *(int(p["version"]) for p in previous[:KEEP_PREVIOUS])}


def smoke_figures(served: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> dict[str, float]:
    """Max |diff| over the float outputs (label strings must be equal)."""
    worst = 0.0
    for name, want in expected.items():
        got = served[name]
        if want.dtype.kind in "fc":
            worst = max(worst, float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()))
        elif not np.array_equal(got.astype(str), want.astype(str)):
            worst = float("inf")
    return {"max_abs_diff": worst, "texts": float(len(next(iter(expected.values()))))}


def in_process(spec: DeploymentSpec, manifest: ExportManifest, precision: str) -> Callable[[list[str]], dict]:
    """What the served model must answer, computed here on the gated graph by the code the
    served python models run (kiln_runtime.FusedEncoder: same tokenizer, session and head)."""
    from kiln_runtime.encoder import FusedEncoder, make_head
    from kiln_runtime.ort import open_session
    from kiln_runtime.text import load_tokenizer

    cfg = configs.fused_config(spec.model_copy(update={"serving": "fused"}), manifest, configs.Names(spec.name),
                               "model.onnx")
    p = {k: v.string_value for k, v in cfg.parameters.items()}
    tokenizer = spec.export_dir / manifest.tokenizer_dir / Path(p["tokenizer_file"]).relative_to(TOKENIZER_DIR)
    encoder = FusedEncoder(
        load_tokenizer(str(tokenizer), int(p["max_length"])),
        open_session(str(spec.export_dir / manifest.usable_variant(precision).file), int(p["intra_op_threads"])),
        input_names=p["input_names"].split(","), hidden_output=p["hidden_output"],
        head=make_head(p["task"], p.get("pooling"), p.get("normalize") == "1",
                       p["labels"].split("\n") if "labels" in p else None))

    def run(texts: list[str]) -> dict[str, np.ndarray]:
        (out,) = encoder([np.array([t.encode("utf-8") for t in texts], dtype=np.object_).reshape(-1, 1)])
        return out

    return run


def smoke_candidate(admins: list[TritonAdmin], repo: Path, name: str, version: int, task: str,
                    expected: Callable[[list[str]], dict], texts: list[str]) -> dict[str, float]:
    """Load the candidate model `name` (already written in `repo`) on every Triton, check each
    one's answers to `texts` against `expected`'s, then unload and remove it whatever happened;
    ReloadError past SMOKE_MAX_ABS. The worst replica's figures."""
    want = expected(texts)
    figures: dict[str, float] = {}
    try:
        for admin in admins:
            admin.load(name)
        for admin in admins:  # each replica answers, and must answer right
            got = smoke_figures(admin.infer(name, texts, head_outputs(task)), want)
            if not figures or got["max_abs_diff"] > figures["max_abs_diff"]:
                figures = got
    finally:
        try:
            for admin in admins:
                admin.unload(name)
        finally:
            shutil.rmtree(repo / name, ignore_errors=True)
    if not figures["max_abs_diff"] <= SMOKE_MAX_ABS:
        raise ReloadError(f"version {version}'s smoke request does not match its gated graph: max |diff| "
                          f"{figures['max_abs_diff']:.3g} > {SMOKE_MAX_ABS:g} over {len(texts)} texts")
    return figures


def reload_refusal(task: str, serving: str | None) -> str | None:
    """Why a repository of this task and serving cannot be reloaded yet (None: it can); the
    gateway's admin route says the same before it starts anything."""
    if task == "text-generation":
        return None  # one decoupled model: GenerationSwitch
    if serving not in ("ensemble", "fused"):
        return f"kiln reload serves ensemble and fused encoders (this repository is {serving!r})"
    return None


def _check_reloadable(card: RepositoryCard) -> None:
    why = reload_refusal(card.task, card.serving)
    if why is not None:
        raise ReloadError(why)


# ----------------------------------------------------------------------------- the switch
class Switch:
    """Moves a live encoder repository from its serving version to another on disk."""

    def __init__(self, repo: Path, admins: list[TritonAdmin]):
        self.repo, self.admins = repo, list(admins)
        self.card = RepositoryCard.read(repo)
        _check_reloadable(self.card)
        if self.card.generation or self.card.serving != "ensemble":
            raise ReloadError("a generation model or a fused encoder is one model, switched by OneModelSwitch")
        self.public = self.card.public_model
        self.steps = [m for m in self.card.models if m != self.public]

    def add_steps(self, old: int, new: int) -> None:
        """Both versions of every step loaded (the serving one keeps answering)."""
        for step in self.steps:
            write_config(self.repo, configs.pin_versions(read_config(self.repo, step), [old, new]))
            self._load(step)

    def drop_steps(self, keep: int) -> None:
        for step in self.steps:
            write_config(self.repo, configs.pin_versions(read_config(self.repo, step), [keep]))
            self._load(step)  # Triton unloads the other version once its requests are done

    def _load(self, model: str) -> None:
        for admin in self.admins:  # every replica serves the same repository
            admin.load(model)

    def pinned_ensemble(self, suffix: str, new: int) -> str:
        """``<public><suffix>``: a copy of the public ensemble pinned to the steps' version `new`,
        no response cache, written (not loaded); its name."""
        cfg = configs.pin_versions(configs.pin_steps(read_config(self.repo, self.public), new), [1])
        cfg.name = self.public + suffix
        cfg.response_cache.enable = False
        (self.repo / cfg.name / "1").mkdir(parents=True, exist_ok=True)
        write_config(self.repo, cfg)
        return cfg.name

    def smoke(self, new: int, expected: Callable[[list[str]], dict], texts: list[str]) -> dict[str, float]:
        """A candidate ensemble pinned to `new` answers `texts` as `expected` does, or ReloadError."""
        name = self.pinned_ensemble(CANDIDATE, new)
        return smoke_candidate(self.admins, self.repo, name, new, self.card.task, expected, texts)

    def canary(self, new: int, plan, gateways: list[tuple[str, int]], gate: float, say: Callable[[str], None]):
        """`plan.share` of the gateways' traffic to an ensemble pinned to `new` until the plan's
        window ends; the card names it meanwhile. Returns the kiln.canary.Comparison; the canary
        is unloaded (after the gateways stopped sending to it) whatever happens."""
        from kiln.canary import (
            CANARY,
            CANARY_ARM,
            SETTLE_S,
            STABLE,
            Arm,
            agreement,
            judge,
            scrape,
            watch,
        )

        name = self.pinned_ensemble(CANARY, new)
        card = RepositoryCard.read(self.repo)
        try:
            self._load(name)
            texts, outputs = _smoke_texts(), head_outputs(self.card.task)
            serving, trial = (self.admins[0].infer(m, texts, outputs) for m in (self.public, name))
            first = next(o for o in outputs if serving[o].dtype.kind == "f")
            cos = agreement(serving[first], trial[first])
            card.model_copy(update={"canary": {"model": name, "version": new, "share": plan.share}}).write(self.repo)
            say(f"canary: {plan.share:.0%} of {self.public}'s requests through {len(gateways)} gateway(s) go to version "
                f"{new} until it has answered {plan.min_requests} or {plan.max_seconds:g} s have passed")

            def read() -> dict:
                total = {STABLE: Arm(), CANARY_ARM: Arm()}
                for url, workers in gateways:
                    got = scrape(url, workers, self.public)
                    total = {k: total[k].plus(got[k]) for k in total}
                return total

            stable, trial_arm, seconds = watch(read, plan, say=say)
            return judge(stable, trial_arm, cos, gate, seconds, plan)
        finally:
            try:
                card.model_copy(update={"canary": None}).write(self.repo)
                time.sleep(SETTLE_S)  # gateways re-read the card, requests in flight on the canary end
                for admin in self.admins:
                    admin.unload(name)
            finally:
                shutil.rmtree(self.repo / name, ignore_errors=True)

    def switch(self, new: int, ensemble=None) -> None:
        """The public model's version `new`, pinned to the steps' `new`: Triton loads it, then
        drops the serving version (its requests in flight finish). ``ensemble``: the new
        version's own config (default: the serving one's)."""
        ensemble = configs.pin_versions(configs.pin_steps(ensemble or read_config(self.repo, self.public), new), [new])
        (self.repo / self.public / str(new)).mkdir(exist_ok=True)
        write_config(self.repo, ensemble)
        self._load(self.public)

    def prune(self, keep: set[int]) -> None:
        for model in self.card.models:
            for p in (self.repo / model).iterdir():
                if p.is_dir() and p.name.isdigit() and int(p.name) not in keep:
                    shutil.rmtree(p)


def next_version(spec: DeploymentSpec, repo: Path, card: RepositoryCard, make, say: Callable[[str], None]):
    """(n+1, the spec staged under versions/<n+1>/, its manifest, ``make(staged, manifest, n+1)``):
    the spec exported and gated as the next version of the repository; ReloadError when it
    was not (the gate, a bad checkpoint, a variant that must not be served)."""
    from export.reuse import ensure_export

    new = max(on_disk_versions(repo, card)) + 1
    staged = spec.model_copy(update={"workdir": spec.root / "versions" / str(new)})
    say(f"version {new} of {card.public_model}: exporting and gating into {staged.root}")
    try:
        manifest = ensure_export(staged)
        return new, staged, manifest, make(staged, manifest, new)
    except Exception as err:
        raise ReloadError(f"version {new} was not exported: {err}") from err


def reload_version(spec: DeploymentSpec, admins: list[TritonAdmin], repo: Path | None = None,
                   say: Callable[[str], None] = lambda msg: None, canary=None,
                   gateways: list[tuple[str, int]] = ()) -> ReloadResult:
    """Export and gate `spec` as the next version of its live repository, smoke-test it
    beside the serving one, switch, and unload the old one (see the module's docstring).
    ``canary`` (a kiln.canary.CanaryPlan): between the smoke request and the switch, that
    share of the traffic through ``gateways`` ((url, workers) each) goes to the new version,
    which is promoted or rolled back (CanaryRolledBack) by how it compares (kiln/canary.py)."""

    t0 = time.perf_counter()
    repo = Path(repo or spec.repository_dir)
    if RepositoryCard.read(repo).generation:
        if canary is not None:
            raise ReloadError("--canary serves encoders so far: a generation model is switched at once after its "
                              "smoke request (README \"Open work\")")
        return reload_one_model(spec, admins, repo, say)
    if RepositoryCard.read(repo).serving == "fused":
        if canary is not None:
            raise ReloadError("--canary serves ensemble encoders so far (a fused encoder is switched at once after "
                              "its smoke request; README \"Open work\")")
        return reload_one_model(spec, admins, repo, say)
    if canary is not None and not gateways:
        raise ReloadError("--canary needs the gateway `kiln serve` runs in front of Triton (its traffic is split and "
                          "counted there; no gateway.json in the server folder): serve with the gateway")
    sw = Switch(repo, admins)
    old = sw.card.version
    new, staged, manifest, version = next_version(spec, repo, sw.card, EncoderVersion, say)
    # the steps' configs are shared by both versions loaded side by side: they must not change;
    # the public ensemble is replaced whole at the switch (its cache setting may change), its tensors may not
    changed = [m.name for m in version.steps if not configs.same_but_versions(m, read_config(repo, m.name))]
    serving = read_config(repo, sw.public)
    if (list(version.public.input), list(version.public.output)) != (list(serving.input), list(serving.output)):
        changed.append(sw.public)
    if changed:
        raise ReloadError(f"the new version changes the config of {changed} (batching, tensors, instances): a reload "
                          "swaps weights and tokenizer only; restart `kiln serve` with the new spec for the rest")
    say(f"writing version {new} beside version {old} and loading both")
    tok_dir = version.write_files(repo, configs_too=False, copy=True)
    try:
        graph = repo / version.names.encoder / str(new) / version.model_file
        if graph.is_file() and version.source() == staged.export_dir / version.variant.file \
                and sha256(graph) != version.variant.sha256:
            raise ReloadError(f"{graph} is not the graph that passed the gate (sha256 differs from the manifest's)")
        sw.add_steps(old, new)
        say("smoke request through a candidate ensemble pinned to the new version")
        smoke = sw.smoke(new, in_process(staged, manifest, version.precision),
                         _smoke_texts())
        compared = None
        if canary is not None:
            compared = sw.canary(new, canary, gateways, cosine_gate(staged, version.precision), say)
            say(compared.table())
            if not compared.promoted:
                raise CanaryRolledBack(compared)
    except Exception as err:
        say(f"version {new} refused ({err}); version {old} keeps serving")
        _undo(sw, old, new)
        raise err if isinstance(err, ReloadError) else ReloadError(f"version {new} did not load: {err}") from err
    say(f"smoke request matches (max |diff| {smoke['max_abs_diff']:.2g}); switching {sw.public} to version {new}")
    sw.switch(new, version.public)
    previous = [served_entry(sw.card), *sw.card.previous]
    version.card(repo, tok_dir).model_copy(update={"previous": previous[:KEEP_PREVIOUS]}).write(repo)
    sw.drop_steps(new)
    sw.prune(to_keep(new, previous))
    return ReloadResult(sw.public, old, new, version.precision, smoke, time.perf_counter() - t0,
                        compared.table() if compared is not None else None)


def rollback_version(repo: Path, admins: list[TritonAdmin], say: Callable[[str], None] = lambda msg: None) -> ReloadResult:
    """Back to the newest earlier version still on disk (gated when it was served), the same way."""
    t0 = time.perf_counter()
    if RepositoryCard.read(repo).generation or RepositoryCard.read(repo).serving == "fused":
        return rollback_one_model(repo, admins, say)
    sw = Switch(repo, admins)
    back, old, target = _rollback_target(sw.card, say)
    try:
        sw.add_steps(old, target)
    except Exception as err:
        _undo(sw, old, target, remove=False)
        raise ReloadError(f"version {target} did not load: {err}") from err
    ensemble = read_config(repo, sw.public)
    ensemble.response_cache.enable = bool(back.get("response_cache_mb"))  # as that version was served
    sw.switch(target, ensemble)
    card = sw.card
    previous = [served_entry(card), *card.previous[1:]]
    card.model_copy(update={**back, "previous": previous[:KEEP_PREVIOUS]}).write(repo)
    sw.drop_steps(target)
    return ReloadResult(sw.public, old, target, back["precision"], {}, time.perf_counter() - t0)


def _undo(sw: Switch, old: int, new: int, remove: bool = True) -> None:
    """Back to serving `old` only; `new`'s files removed (``remove``)."""
    try:
        sw.drop_steps(old)
    finally:
        if remove:
            for model in sw.card.models:
                shutil.rmtree(sw.repo / model / str(new), ignore_errors=True)


def _smoke_texts() -> list[str]:
    from export.variants import calibration_texts

    return list(calibration_texts())[:SMOKE_TEXTS]


# ----------------------------------------------------------------------------- generation models
SMOKE_PROMPTS = 3
SMOKE_TOKENS = 8


def lm_in_process(spec: DeploymentSpec, manifest: ExportManifest, precision: str) -> Callable[[str, int], str]:
    """What the served generation model must answer to a greedy request, computed here on the
    gated graph by the engine the served model runs (kiln_runtime.generation: same tokenizer,
    session, prompt encoding and detokenizer), one sequence at a time as the smoke request is."""
    from tokenizers import Tokenizer

    from kiln_runtime.contract import TOKENIZER_FILE
    from kiln_runtime.generation.chat_template import encode_prompt
    from kiln_runtime.generation.params import SamplingParams
    from kiln_runtime.generation.slots import engine_for
    from kiln_runtime.ort import open_session

    d = manifest.decoder
    tokenizer = Tokenizer.from_file(str(spec.export_dir / manifest.tokenizer_dir / Path(TOKENIZER_FILE).name))
    session = open_session(str(spec.export_dir / manifest.usable_variant(precision).file), spec.instances.intra_op_threads)
    engine = engine_for(session, d, tokenizer, 1)

    def run(prompt: str, max_tokens: int) -> str:
        rid = f"smoke-{time.monotonic_ns()}"
        engine.submit(rid, encode_prompt(tokenizer, prompt=prompt), SamplingParams(max_tokens=max_tokens, temperature=0))
        text = ""
        while True:
            for ev in engine.step():
                if ev.request_id == rid:
                    text += ev.text
                    if ev.finished:
                        if ev.error:
                            raise ReloadError(f"the gated graph failed in process: {ev.error}")
                        return text

    return run


class OneModelSwitch:
    """Moves a live repository of one model (a generation model, a fused encoder) between
    versions on disk: the switch is loading the model with only the new version (Triton
    answers with the old one until the new one is ready, and unloads the old one once its
    requests in flight have ended)."""

    def __init__(self, repo: Path, admins: list[TritonAdmin]):
        self.repo, self.admins = Path(repo), list(admins)
        self.card = RepositoryCard.read(repo)
        self.public = self.card.public_model

    def switch(self, new: int) -> None:
        write_config(self.repo, configs.pin_versions(read_config(self.repo, self.public), [new]))
        for admin in self.admins:
            admin.load(self.public)

    def prune(self, keep: set[int]) -> None:
        for p in (self.repo / self.public).iterdir():
            if p.is_dir() and p.name.isdigit() and int(p.name) not in keep:
                shutil.rmtree(p)

    def smoke_encoder(self, version, expected: Callable[[list[str]], dict], texts: list[str]) -> dict[str, float]:
        """A fused encoder's new version, as ``<name>__candidate`` on the same files, answers
        `texts` as `expected` does, or ReloadError."""
        name = self.public + CANDIDATE
        version.write_files(self.repo, name=name)
        return smoke_candidate(self.admins, self.repo, name, version.version, self.card.task, expected, texts)


class GenerationSwitch(OneModelSwitch):
    """Moves a live generation repository (one decoupled model) between versions on disk.
    Triton answers a request that names no version with the newest loaded one, so the new
    version is smoke-tested under another name first (``<name>__candidate``, the same files),
    and the switch is loading the model with only the new version: Triton loads it while the
    old one answers, then unloads the old one once its streams in flight have ended."""

    def smoke(self, version, expected: Callable[[str, int], str], prompts: list[str]) -> dict[str, float]:
        """The candidate answers every prompt, greedy, with the in-process text, or ReloadError."""
        name = self.public + CANDIDATE
        version.write_files(self.repo, name=name)
        figures = {"prompts": float(len(prompts)), "identical": 0.0}
        try:
            for admin in self.admins:
                admin.load(name)
            want = [expected(p, SMOKE_TOKENS) for p in prompts]
            for admin in self.admins:  # each replica answers, and must answer right
                for prompt, text in zip(prompts, want):
                    got = admin.generate(name, prompt, SMOKE_TOKENS)[TEXT_OUTPUT]
                    if got != text:
                        raise ReloadError(f"version {version.version}'s smoke request does not match its gated graph: "
                                          f"{prompt!r} -> {got!r} served, {text!r} in process (greedy, "
                                          f"{SMOKE_TOKENS} tokens)")
            figures["identical"] = float(len(prompts))
        finally:
            try:
                for admin in self.admins:
                    admin.unload(name)
            finally:
                shutil.rmtree(self.repo / name, ignore_errors=True)
        return figures


def reload_one_model(spec: DeploymentSpec, admins: list[TritonAdmin], repo: Path,
                     say: Callable[[str], None] = lambda msg: None) -> ReloadResult:
    """`reload_version` for a repository of one model (a generation model, a fused encoder):
    export and gate version n+1, write it beside n, smoke-test it as ``<name>__candidate`` on
    its files (generation: greedy prompts against the engine in process; fused: texts against
    `in_process`), then load the model with n+1 only (OneModelSwitch)."""
    from export.lm_parity import chat_prompts
    from model_repository.writer import GenerationVersion

    t0 = time.perf_counter()
    generation = RepositoryCard.read(repo).generation
    sw = GenerationSwitch(repo, admins) if generation else OneModelSwitch(repo, admins)
    old = sw.card.version
    new, staged, manifest, version = next_version(spec, repo, sw.card, GenerationVersion if generation else EncoderVersion,
                                                  say)
    if not _same_but_cache(version.public, read_config(repo, sw.public)):
        raise ReloadError(f"the new version changes {sw.public}'s config (batching, concurrency, context, tensors, "
                          "instances, threads): a reload swaps weights and tokenizer only; restart `kiln serve` with "
                          "the new spec for the rest")
    say(f"writing version {new} beside version {old}")
    folder = version.write_files(repo, configs_too=False, copy=True)
    try:
        graph = repo / sw.public / str(new) / version.model_file
        if sha256(graph) != version.variant.sha256:
            raise ReloadError(f"{graph} is not the graph that passed the gate (sha256 differs from the manifest's)")
        say(f"smoke request through {sw.public}{CANDIDATE} (version {new}'s files)")
        if generation:
            smoke = sw.smoke(version, lm_in_process(staged, manifest, version.precision), chat_prompts(SMOKE_PROMPTS))
        else:
            smoke = sw.smoke_encoder(version, in_process(staged, manifest, version.precision), _smoke_texts())
    except Exception as err:
        say(f"version {new} refused ({err}); version {old} keeps serving")
        shutil.rmtree(repo / sw.public / str(new), ignore_errors=True)
        raise err if isinstance(err, ReloadError) else ReloadError(f"version {new} did not load: {err}") from err
    result = ReloadResult(sw.public, old, new, version.precision, smoke, 0.0)
    say(f"{result.smoke_summary}; switching {sw.public} to version {new} (requests on version {old} finish there)")
    write_config(repo, configs.pin_versions(version.public, [new]))  # its own cache setting (the variant's invariance)
    for admin in sw.admins:
        admin.load(sw.public)
    previous = [served_entry(sw.card), *sw.card.previous]
    version.card(repo, folder).model_copy(update={"previous": previous[:KEEP_PREVIOUS]}).write(repo)
    sw.prune(to_keep(new, previous))
    return replace(result, seconds=time.perf_counter() - t0)


def _same_but_cache(a, b) -> bool:
    """Two configs that differ at most in their versions and whether the response cache is on."""
    x, y = type(a)(), type(b)()
    x.CopyFrom(a)
    y.CopyFrom(b)
    x.response_cache.enable = y.response_cache.enable = False
    return configs.same_but_versions(x, y)


def _rollback_target(card: RepositoryCard, say: Callable[[str], None]) -> tuple[dict, int, int]:
    """(the card's entry of the version to go back to, the serving version, that version)."""
    if not card.previous:
        raise ReloadError(f"{card.public_model} has no earlier version on disk to roll back to")
    back = card.previous[0]
    say(f"rolling {card.public_model} back from version {card.version} to version {int(back['version'])}")
    return back, card.version, int(back["version"])


def rollback_one_model(repo: Path, admins: list[TritonAdmin],
                       say: Callable[[str], None] = lambda msg: None) -> ReloadResult:
    """Back to the newest earlier version on disk of a generation model or a fused encoder."""
    t0 = time.perf_counter()
    sw = OneModelSwitch(repo, admins)
    back, old, target = _rollback_target(sw.card, say)
    try:
        cfg = configs.pin_versions(read_config(repo, sw.public), [target])
        if sw.card.serving == "fused":
            cfg.response_cache.enable = bool(back.get("response_cache_mb"))  # as that version was served
        write_config(repo, cfg)
        for admin in sw.admins:
            admin.load(sw.public)
    except Exception as err:
        sw.switch(old)
        raise ReloadError(f"version {target} did not load: {err}") from err
    previous = [served_entry(sw.card), *sw.card.previous[1:]]
    sw.card.model_copy(update={**back, "previous": previous[:KEEP_PREVIOUS]}).write(repo)
    return ReloadResult(sw.public, old, target, back["precision"], {}, time.perf_counter() - t0)
