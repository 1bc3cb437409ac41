"""`kiln repo`: spec + export manifest -> a Triton model repository.

serving: ensemble (encoders' default)
    <repo>/<name>/               ensemble: the public model (text -> embedding | label, scores)
    <repo>/<name>_tokenizer/     python backend, Hugging Face `tokenizers`
    <repo>/<name>_encoder/       python-ort (ONNX Runtime in a python model) | onnxruntime_onnx | tensorrt_plan
    <repo>/<name>_postprocess/   python backend, pooling / softmax
serving: fused (python-ort only)
    <repo>/<name>/               one python model: tokenizer + ONNX Runtime + pooling / softmax,
                                 same public tensors as the ensemble
    <repo>/kiln.json             what was written, from which variant (sha256), by which spec

The repository is self-contained (each python model carries its own copy of the
kiln_runtime package), so the same folder loads in the pip-installed Triton and in
NVIDIA's container.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import kiln_runtime
from kiln_core.card import RepositoryCard, TensorCard
from kiln_core.manifest import ExportManifest
from kiln_core.spec import DeploymentSpec, Runtime, Task
from kiln_runtime.contract import TOKENIZER_DIR
from model_repository import configs

RUNTIME_PACKAGE = Path(kiln_runtime.__file__).parent
ENGINE_FILES = {"tensorrt_plan": "model.plan", "onnxruntime_onnx": "model.onnx"}


def _python_source(name: str) -> str:
    return (Path(__file__).parent / "python_models" / name).read_text()


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # same disk: no copy of a large graph
    except OSError:
        shutil.copy2(src, dst)


def _write_model(repo: Path, cfg, model_py: str | None = None, version: int = 1, config: bool = True) -> Path:
    """The model's folder: its config (unless ``config`` is False: a version added beside a
    serving one, whose config changes only when Triton is asked to load it) and ``<version>/``."""
    folder = repo / cfg.name
    (folder / str(version)).mkdir(parents=True, exist_ok=True)
    if config:
        write_config(repo, cfg)
    if model_py:
        (folder / str(version) / "model.py").write_text(_python_source(model_py))
        shutil.copytree(RUNTIME_PACKAGE, folder / str(version) / "kiln_runtime",
                        ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def write_config(repo: Path, cfg) -> Path:
    path = repo / cfg.name / "config.pbtxt"
    path.write_text(configs.to_pbtxt(cfg))
    return path


def read_config(repo: Path, name: str):
    return configs.parse_pbtxt((repo / name / "config.pbtxt").read_text())


def _selection_card(manifest: ExportManifest) -> dict | None:
    """serve_precision: auto: the pick, its metric, the runners-up and why (None: a fixed precision)."""
    sel = manifest.selection
    if sel is None:
        return None
    return {**sel.model_dump(), "runners_up": sel.runners_up, "reason": sel.reason()}


def _tensors(values) -> dict[str, TensorCard]:
    return {t.name: TensorCard(dtype=configs.mc.DataType.Name(t.data_type), dims=list(t.dims)) for t in values}


def response_cache_mb(spec: DeploymentSpec, variant) -> int:
    """The response cache's size for this repository's public model, 0 where it must stay off:
    generation, a spec that turned it off, or a variant not shown batch-invariant."""
    if spec.task is Task.text_generation or not spec.response_cache.enabled:
        return 0
    return spec.response_cache.size_mb if (variant.batch_invariance or {}).get("invariant") is True else 0


def _card(spec: DeploymentSpec, manifest: ExportManifest, precision: str, variant, public, models: list[str],
          tokenizer: str | None, max_input_tokens: int, version: int = 1) -> RepositoryCard:
    return RepositoryCard(
        version=version,
        public_model=public.name,
        task=manifest.task,
        serving=None if spec.task is Task.text_generation else spec.serving,
        models=models,
        tokenizer=tokenizer,
        runtime=spec.runtime.value,
        precision=precision,
        selection=_selection_card(manifest),
        variant_sha256=variant.sha256,
        parity=variant.parity.model_dump(),
        batch_invariance=variant.batch_invariance,
        response_cache_mb=response_cache_mb(spec, variant),
        max_input_tokens=max_input_tokens,
        max_batch_size=spec.batching.max_batch_size,
        inputs=_tensors(public.input),
        outputs=_tensors(public.output),
        spec=json.loads(spec.model_dump_json()),
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json")


class EncoderVersion:
    """One version of an encoder repository: its models' configs (every step pinned to this
    version, each model loading only it) and how to write its files."""

    def __init__(self, spec: DeploymentSpec, manifest: ExportManifest, version: int = 1):
        self.spec, self.manifest, self.version = spec, manifest, version
        self.names = names = configs.Names(spec.name)
        self.precision = manifest.served_precision(spec.serve_precision)  # "auto": what the export picked
        self.variant = manifest.usable_variant(self.precision)  # refuses a variant that failed its gate
        self.model_file = ENGINE_FILES["tensorrt_plan" if spec.runtime is Runtime.tensorrt_plan else "onnxruntime_onnx"]
        # configs first: a spec they cannot serve (fused on a container runtime) fails before anything else
        if spec.serving == "fused":
            self.public = configs.fused_config(spec, manifest, names, self.model_file)  # python-ort only
            self.members = [self.public]
        else:
            tok = configs.tokenizer_config(spec, manifest, names)
            enc = configs.encoder_config(spec, manifest, names, self.model_file)
            post = configs.postprocess_config(spec, manifest, names)
            self.public = configs.ensemble_config(spec, names, [tok, enc, post])
            configs.validate_ensemble(self.public, {m.name: m for m in (tok, enc, post)})
            configs.pin_steps(self.public, version)
            self.members = [tok, enc, post, self.public]
        for cfg in self.members:
            configs.pin_versions(cfg, [version])
        # identical requests answered from Triton's cache: the public model (the ensemble caches
        # the whole text -> answer path, so a hit skips tokenizer, encoder and postprocess)
        self.public.response_cache.enable = response_cache_mb(spec, self.variant) > 0

    @property
    def steps(self) -> list:
        """The models under the public one (none when fused)."""
        return [m for m in self.members if m is not self.public]

    def source(self) -> Path:
        if self.spec.runtime is Runtime.tensorrt_plan:
            engine = self.spec.export_dir / f"model.{self.precision}.plan"
            if not engine.is_file():
                raise FileNotFoundError(
                    f"{engine} not found: TensorRT engines are built on a GPU machine with `kiln engines` "
                    "(TensorRT cannot be installed on CPU-only machines)"
                )
            return engine
        return self.spec.export_dir / self.variant.file

    def write_files(self, repo: Path, configs_too: bool = True, copy: bool = False, name: str | None = None) -> Path:
        """Every model's ``<version>/`` (and, with ``configs_too``, its config); returns the
        folder holding the tokenizer files. ``copy``: the graph copied, not hard-linked (a
        version added to a live repository must not share an inode with an export that a
        later re-export may overwrite). ``name`` (fused only): another model folder for the
        same files, its config the public one renamed, no response cache (a smoke candidate)."""
        v, place = self.version, (shutil.copy2 if copy else _place)
        source = self.source()
        if name is not None and self.spec.serving != "fused":
            raise ValueError("write_files(name=...) is for a fused encoder (one model)")
        if self.spec.serving == "fused":
            cfg = self.public
            if name is not None:
                cfg = _copy_config(self.public)
                cfg.name, cfg.response_cache.enable = name, False
            # one folder: config, model.py + kiln_runtime.py, the tokenizer files and the graph
            tok_dir = _write_model(repo, cfg, "encoder_fused.py", v, configs_too)
            place(source, tok_dir / str(v) / self.model_file)
        else:
            tok, enc, post, public = self.members
            tok_dir = _write_model(repo, tok, "tokenizer.py", v, configs_too)
            enc_dir = _write_model(repo, enc, "encoder_ort.py" if self.spec.runtime is Runtime.python_ort else None, v,
                                   configs_too)
            place(source, enc_dir / str(v) / self.model_file)
            _write_model(repo, post, "postprocess.py", v, configs_too)
            _write_model(repo, public, None, v, configs_too)
        shutil.copytree(self.spec.export_dir / self.manifest.tokenizer_dir, tok_dir / str(v) / TOKENIZER_DIR)
        return tok_dir

    def card(self, repo: Path, tok_dir: Path) -> RepositoryCard:
        # the gateway counts tokens with the served tokenizer (usage, limits, too-long 400s)
        tokenizer = str((tok_dir / str(self.version) / configs.TOKENIZER_FILE).relative_to(repo))
        return _card(self.spec, self.manifest, self.precision, self.variant, self.public,
                     [m.name for m in self.members], tokenizer, self.spec.max_length, self.version)


def write_repository(spec: DeploymentSpec, manifest: ExportManifest | None = None, out: Path | None = None) -> Path:
    manifest = manifest or ExportManifest.read(spec.export_dir)
    repo = out or spec.repository_dir
    if spec.task is Task.text_generation:
        return _write_generation_repository(spec, manifest, repo)
    version = EncoderVersion(spec, manifest)
    version.source()  # a missing engine fails before the old repository is removed
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    tok_dir = version.write_files(repo)
    version.card(repo, tok_dir).write(repo)
    return repo


class GenerationVersion:
    """One version of a generation repository: the decoupled model's config (loading only this
    version) and its ``<version>/`` folder: graph, tokenizer files with the chat template,
    model.py and the kiln_runtime package (self-contained)."""

    def __init__(self, spec: DeploymentSpec, manifest: ExportManifest, version: int = 1):
        if not manifest.decoder:
            raise ValueError("the manifest has no decoder section: re-export with a text-generation spec")
        self.spec, self.manifest, self.version = spec, manifest, version
        self.precision = manifest.served_precision(spec.serve_precision)
        self.variant = manifest.usable_variant(self.precision)  # refuses a variant that failed its gate
        self.model_file = "model.onnx"
        self.public = configs.pin_versions(configs.generation_config(spec, manifest, self.model_file), [version])

    def source(self) -> Path:
        return self.spec.export_dir / self.variant.file

    def write_files(self, repo: Path, configs_too: bool = True, copy: bool = False, name: str | None = None) -> Path:
        """``<name>/<version>/`` (and, with ``configs_too``, the config); returns the model folder.
        ``copy``: the graph copied, not hard-linked (see EncoderVersion.write_files). ``name``:
        another model folder for the same files (the smoke test's candidate)."""
        cfg = self.public
        if name is not None:
            cfg = configs.pin_versions(_copy_config(self.public), [self.version])
            cfg.name = name
        folder = _write_model(repo, cfg, "generate.py", self.version, configs_too)
        here = folder / str(self.version)
        (shutil.copy2 if copy else _place)(self.source(), here / self.model_file)
        data = self.spec.export_dir / (self.variant.file + ".data")
        if data.exists():  # external weights beside a > 2 GB graph
            _place(data, here / data.name)
        tok_src = self.spec.export_dir / self.manifest.tokenizer_dir
        (here / TOKENIZER_DIR).mkdir(exist_ok=True)
        for file in TOKENIZER_FILES:
            if (tok_src / file).is_file():
                shutil.copy2(tok_src / file, here / TOKENIZER_DIR / file)
        return folder

    def card(self, repo: Path | None = None, folder: Path | None = None) -> RepositoryCard:
        """The repository card (``repo`` and ``folder``: as EncoderVersion.card takes them; a
        generation card names no tokenizer file)."""
        return _card(self.spec, self.manifest, self.precision, self.variant, self.public, [self.spec.name], None,
                     self.spec.generation.max_context, self.version)


def _copy_config(cfg):
    out = type(cfg)()
    out.CopyFrom(cfg)
    return out


def _write_generation_repository(spec: DeploymentSpec, manifest: ExportManifest, repo: Path) -> Path:
    """<repo>/<name>/: the decoupled generation model (public), version 1 (see GenerationVersion)."""
    version = GenerationVersion(spec, manifest)
    if repo.exists():
        shutil.rmtree(repo)
    version.write_files(repo)
    version.card().write(repo)
    return repo
