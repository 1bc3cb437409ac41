"""`kiln export`: checkpoint -> fp32 ONNX -> gated variants -> manifest.

Every variant is gated against PyTorch; a miss leaves ``parity.passed = false`` in the
manifest (so the repository writer refuses it) and raises :class:`ParityError` with the
table of figures, after the remaining variants were measured too.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from export import selection, variants
from export.lm_pipeline import run_lm_export
from export.onnx_export import export_onnx, io_specs, load_encoder
from export.parity import (
    add_portability,
    compare,
    gate,
    gates_caption,
    ort_runner,
    parity_batches,
    raise_gate_failures,
)
from kiln_core.manifest import (
    EXPORT_FORMAT,
    ExportManifest,
    Variant,
    sha256,
    tool_versions,
)
from kiln_core.sources import checkpoint_dir
from kiln_core.spec import AUTO, DeploymentSpec, Precision, Runtime, Task
from kiln_runtime.encoder import pool

FILES = {Precision.fp32: "model.fp32.onnx", Precision.int8: "model.int8.onnx", Precision.fp16: "model.fp16.onnx"}


def run_export(spec: DeploymentSpec, console: Console | None = None, fail_on_gate: bool = True,
               strict: bool = False) -> ExportManifest:
    """``fail_on_gate``: raise ParityError when the served variant missed its gate (``strict``:
    any variant); other misses are recorded and reported, and never served."""
    if spec.task is Task.text_generation:
        return run_lm_export(spec, console, fail_on_gate, strict)
    console = console or Console(stderr=True)
    out = spec.export_dir
    out.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint_dir(spec)

    def step(msg: str):
        console.print(f"[bold cyan]export[/] {msg}")

    t0 = time.perf_counter()
    step(f"loading {ckpt}")
    loaded = load_encoder(spec, ckpt)
    tok_dir = out / "tokenizer"
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    loaded.tokenizer.save_pretrained(tok_dir)
    if not (tok_dir / "tokenizer.json").is_file():
        raise RuntimeError(f"{ckpt}: no fast tokenizer (tokenizer.json) could be produced")

    raw = out / "model.raw.onnx"
    step(f"exporting {loaded.architecture} to ONNX (opset {spec.opset}, dynamo exporter)")
    export_onnx(loaded, raw, spec.opset)
    inputs, outputs = io_specs(loaded)

    step("computing PyTorch reference outputs for the parity inputs")
    batches = parity_batches(spec, loaded)
    n_inputs = sum(b.reference.shape[0] for b in batches)

    manifest = ExportManifest(
        export_format=EXPORT_FORMAT,
        name=spec.name,
        task=spec.task.value,
        architecture=loaded.architecture,
        checkpoint=str(ckpt),
        tokenizer_dir="tokenizer",
        max_length=spec.max_length,
        hidden_size=loaded.hidden_size,
        pooling=spec.pooling.value,
        normalize=spec.normalize,
        labels=loaded.labels,
        opset=spec.opset,
        inputs=inputs,
        outputs=outputs,
        tools=tool_versions("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tokenizers"),
    )

    fp32 = out / FILES[Precision.fp32]

    def measure(precision: Precision, path: Path):
        step(f"parity gate for {precision.value} on {n_inputs} inputs")
        return gate(spec, precision, compare(spec, batches, ort_runner(path)), n_inputs)

    order = [p for p in (Precision.fp32, Precision.int8, Precision.fp16) if p in spec.precisions]
    for precision in order:
        path = out / FILES[precision]
        step(f"building {precision.value} variant")
        fused: dict[str, int] = {}
        if precision is Precision.fp32:
            fused = variants.optimize_fp32(raw, path, loaded.config.model_type)
            notes = "onnxruntime.transformers fusions: " + (", ".join(f"{k} x{v}" for k, v in fused.items()) or "none matched")
            report = measure(precision, path)
        elif precision is Precision.int8:
            notes, report = _build_int8(spec, loaded, fp32, path, lambda p: measure(Precision.int8, p), step)
            if spec.runtime is not Runtime.tensorrt_plan:  # CPU kernels: must not depend on the instruction set
                add_portability(report, path)
        else:
            notes = variants.convert_fp16(fp32, path)
            report = measure(precision, path)
        manifest.variants[precision.value] = Variant(
            precision=precision.value,
            file=path.name,
            sha256=sha256(path),
            bytes=path.stat().st_size,
            notes=notes,
            fused_ops=fused,
            parity=report,
        )
        if report.passed and precision is not Precision.fp16:  # fp16 is a GPU variant: not timed on CPU
            step(f"{precision.value}: batch invariance (alone vs co-batched) and {selection.ENCODER_METRIC}")
            _invariance_and_speed(spec, loaded, manifest, precision.value, path)
        manifest.write(out)
        if precision is Precision.fp32 and not report.passed:
            break  # every other variant derives from fp32: nothing to build on
    raw.unlink(missing_ok=True)
    if spec.serve_precision == AUTO:
        manifest.selection = selection.select(spec, manifest)
    manifest.write(out)
    console.print(parity_table(manifest))
    for line in selection.selection_lines(manifest):
        console.print(line)
    step(f"done in {time.perf_counter() - t0:.1f}s -> {out / 'manifest.json'}")
    if fail_on_gate:
        raise_gate_failures(spec, manifest, strict)
    return manifest


def _invariance_and_speed(spec: DeploymentSpec, loaded, manifest: ExportManifest, name: str, path: Path) -> None:
    """What ``serve_precision: auto`` needs of a passing variant, measured on this machine."""
    from export.variants import calibration_texts

    run = ort_runner(path, spec.instances.intra_op_threads)

    def encode(texts: list[str]) -> dict:
        enc = loaded.tokenizer(texts, padding=True, truncation=True, max_length=spec.max_length, return_tensors="np")
        return {n: enc[n].astype(np.int64) for n in loaded.input_names}

    def post(out: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if spec.task is Task.text_classification:
            return out
        return pool(out, mask, spec.pooling.value, spec.normalize)

    texts = calibration_texts()
    mixed = [texts[0], texts[1][:12], texts[2] * 3, "ok", texts[3], texts[4][:30], texts[5], texts[6] * 2]
    selection.record(manifest, name, selection.encoder_invariance(run, encode, mixed, post),
                     {selection.ENCODER_METRIC: selection.encoder_speed(run, encode(texts[:8]))})


def _build_int8(spec: DeploymentSpec, loaded, fp32: Path, path: Path, measure, step, max_fallback: int = 2):
    """int8 with accuracy-aware fallback, as Model Navigator / Neural Compressor do it.

    FFN down-projections stay fp32; if the gate still fails, keep the one whole layer in
    fp32 whose exclusion helps most, and repeat (at most `max_fallback` layers).
    """
    cfg = loaded.config
    down, layers = variants.int8_node_groups(fp32, cfg.hidden_size, getattr(cfg, "intermediate_size", -1), cfg.num_hidden_layers)

    def build(keep: list[str]) -> str:
        if spec.int8_mode == "static":
            return variants.quantize_int8_static(fp32, path, loaded.tokenizer, loaded.input_names, spec.max_length,
                                                 keep, for_tensorrt=spec.runtime is Runtime.tensorrt_plan)
        return variants.quantize_int8_dynamic(fp32, path, keep)

    keep, kept_layers = list(down), []
    notes = build(keep)
    report = measure(path)
    while not report.passed and len(kept_layers) < max_fallback and len(kept_layers) < len(layers):
        step(f"int8 missed its gate ({'; '.join(report.failures)}); searching for a layer to keep in fp32")
        trials = []
        for i, group in enumerate(layers):
            if i in kept_layers:
                continue
            build(keep + group)
            trials.append((measure(path).figures["min_cosine"], i))
        _, best = max(trials)
        kept_layers.append(best)
        keep += layers[best]
        notes = build(keep)
        report = measure(path)
    if kept_layers:
        notes += f" (accuracy-aware fallback kept layers {sorted(kept_layers)} in fp32)"
    return notes, report


def parity_table(manifest: ExportManifest) -> Table:
    table = Table(title=f"parity vs PyTorch fp32: {manifest.name}", caption=gates_caption(manifest))
    for col in ("variant", "inputs", "min cos", "mean cos", "max|diff|", "MB", "batch-inv.", "sent/s b8", "verdict"):
        table.add_column(col, justify="left" if col in ("variant", "verdict") else "right")
    for name, v in manifest.variants.items():
        r, f = v.parity, v.parity.figures
        table.add_row(
            name,
            str(r.inputs),
            f"{f['min_cosine']:.6f}",
            f"{f['mean_cosine']:.6f}",
            f"{f['max_abs_diff']:.1e}",
            f"{v.bytes / 1e6:.1f}",
            selection.invariance_cell(v),
            f"{v.speed[selection.ENCODER_METRIC]:.0f}" if selection.ENCODER_METRIC in v.speed else "-",
            "[green]PASS[/]" if r.passed else "[red]FAIL[/]: " + "; ".join(r.failures),
        )
    return table
