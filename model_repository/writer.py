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


def _write_model(repo: Path, cfg, model_py: str | None = None) -> Path:
    folder = repo / cfg.name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(configs.to_pbtxt(cfg))
    if model_py:
        (folder / "1" / "model.py").write_text(_python_source(model_py))
        shutil.copytree(RUNTIME_PACKAGE, folder / "1" / "kiln_runtime", ignore=shutil.ignore_patterns("__pycache__"))
    return folder


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
          tokenizer: str | None, max_input_tokens: int) -> RepositoryCard:
    return RepositoryCard(
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


def write_repository(spec: DeploymentSpec, manifest: ExportManifest | None = None, out: Path | None = None) -> Path:
    manifest = manifest or ExportManifest.read(spec.export_dir)
    repo = out or spec.repository_dir
    if spec.task is Task.text_generation:
        return _write_generation_repository(spec, manifest, repo)
    names = configs.Names(spec.name)

    precision = manifest.served_precision(spec.serve_precision)  # "auto": what the export picked
    variant = manifest.usable_variant(precision)  # refuses a variant that failed its gate
    model_file = ENGINE_FILES["tensorrt_plan" if spec.runtime is Runtime.tensorrt_plan else "onnxruntime_onnx"]
    # configs first: a spec they cannot serve (fused on a container runtime) fails before anything else
    if spec.serving == "fused":
        public = configs.fused_config(spec, manifest, names, model_file)  # python-ort only
        members = [public]
    else:
        tok = configs.tokenizer_config(spec, manifest, names)
        enc = configs.encoder_config(spec, manifest, names, model_file)
        post = configs.postprocess_config(spec, manifest, names)
        public = configs.ensemble_config(spec, names, [tok, enc, post])
        configs.validate_ensemble(public, {m.name: m for m in (tok, enc, post)})
        members = [tok, enc, post, public]
    # identical requests answered from Triton's cache: the public model (the ensemble caches
    # the whole text -> answer path, so a hit skips tokenizer, encoder and postprocess)
    public.response_cache.enable = response_cache_mb(spec, variant) > 0

    if spec.runtime is Runtime.tensorrt_plan:
        engine = spec.export_dir / f"model.{precision}.plan"
        if not engine.is_file():
            raise FileNotFoundError(
                f"{engine} not found: TensorRT engines are built on a GPU machine with `kiln engines` "
                "(TensorRT cannot be installed on CPU-only machines)"
            )
        source = engine
    else:
        source = spec.export_dir / variant.file

    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    # tok_dir: the model folder that carries the tokenizer files (the gateway reads them too)
    if spec.serving == "fused":
        # one folder: config, model.py + kiln_runtime.py, the tokenizer files and the graph
        tok_dir = _write_model(repo, public, "encoder_fused.py")
        _place(source, tok_dir / "1" / model_file)
    else:
        tok_dir = _write_model(repo, tok, "tokenizer.py")
        enc_dir = _write_model(repo, enc, "encoder_ort.py" if spec.runtime is Runtime.python_ort else None)
        _place(source, enc_dir / "1" / model_file)
        _write_model(repo, post, "postprocess.py")
        _write_model(repo, public)
    shutil.copytree(spec.export_dir / manifest.tokenizer_dir, tok_dir / "1" / TOKENIZER_DIR)

    # the gateway counts tokens with the served tokenizer (usage, limits, too-long 400s)
    tokenizer = str((tok_dir / "1" / configs.TOKENIZER_FILE).relative_to(repo))
    _card(spec, manifest, precision, variant, public, [m.name for m in members], tokenizer, spec.max_length).write(repo)
    return repo


def _write_generation_repository(spec: DeploymentSpec, manifest: ExportManifest, repo: Path) -> Path:
    """<repo>/<name>/: the decoupled generation model (public), self-contained: graph,
    tokenizer files with the chat template, model.py and the kiln_runtime package."""
    precision = manifest.served_precision(spec.serve_precision)
    variant = manifest.usable_variant(precision)
    if not manifest.decoder:
        raise ValueError("the manifest has no decoder section: re-export with a text-generation spec")
    cfg = configs.generation_config(spec, manifest, "model.onnx")
    if repo.exists():
        shutil.rmtree(repo)
    folder = _write_model(repo, cfg, "generate.py")
    _place(spec.export_dir / variant.file, folder / "1" / "model.onnx")
    data = spec.export_dir / (variant.file + ".data")
    if data.exists():  # external weights beside a > 2 GB graph
        _place(data, folder / "1" / data.name)
    tok_src = spec.export_dir / manifest.tokenizer_dir
    (folder / "1" / TOKENIZER_DIR).mkdir()
    for name in TOKENIZER_FILES:
        if (tok_src / name).is_file():
            shutil.copy2(tok_src / name, folder / "1" / TOKENIZER_DIR / name)
    _card(spec, manifest, precision, variant, cfg, [spec.name], None, spec.generation.max_context).write(repo)
    return repo
