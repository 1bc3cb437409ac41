"""`kiln export` for text-generation: checkpoint -> KV-cache ONNX -> gated variants -> manifest.

The causal-LM twin of :func:`export.pipeline.run_export` (which dispatches here): fp32 is
gated against PyTorch (logits, greedy identity), each quantized variant against fp32
(perplexity ratio; greedy agreement reported); an int8 graph whose kernels would saturate on
some CPUs fails too (export/portability.py). Each passing variant is then checked for batch
invariance and timed (one-stream decode tokens/s) for ``serve_precision: auto``
(export/selection.py). A miss leaves ``parity.passed = false`` in the manifest; only the
served variant's miss (``strict``: any) raises :class:`export.parity.ParityError`, after every
variant was measured.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from export import lm_export, lm_graph, lm_parity, selection
from export.parity import add_portability, gates_caption, raise_gate_failures
from kiln_core.manifest import (
    EXPORT_FORMAT,
    ExportManifest,
    Variant,
    sha256,
    tool_versions,
)
from kiln_core.spec import AUTO, DeploymentSpec, Precision

FILES = {Precision.fp32: "model.fp32.onnx", Precision.int8: "model.int8.onnx", Precision.int4: "model.int4.onnx"}


def run_lm_export(spec: DeploymentSpec, console: Console | None = None, fail_on_gate: bool = True,
                  strict: bool = False) -> ExportManifest:
    console = console or Console(stderr=True)
    out = spec.export_dir
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def step(msg: str):
        console.print(f"[bold cyan]export[/] {msg} [dim]({time.perf_counter() - t0:.0f}s)[/]")

    unsupported = [p.value for p in spec.precisions if p not in FILES]
    if unsupported:
        raise ValueError(f"precisions {unsupported}: text-generation exports {[p.value for p in FILES]}")

    step(f"loading the causal LM from {spec.source.kind} source")
    model, tokenizer, ckpt = lm_export.load_causal_lm(spec)
    shape = lm_export.DecoderShape.of(model.config)
    architecture = (model.config.architectures or [type(model).__name__])[0]
    tok_dir = out / "tokenizer"
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    tokenizer.save_pretrained(tok_dir)
    if not (tok_dir / "tokenizer.json").is_file():
        raise RuntimeError(f"{ckpt}: no fast tokenizer (tokenizer.json) could be produced")

    fp32 = out / FILES[Precision.fp32]
    decoder = lm_export.decoder_info(model, tokenizer, spec.generation.max_context)
    fused = fused_graph(spec, model)
    if fused:
        step(f"building {architecture} ({shape.num_layers} layers) as the fused graph: GroupQueryAttention, "
             f"a KV cache of {spec.generation.max_context} positions per sequence written in place")
        lm_graph.save(lm_graph.build_gqa_decoder(model, spec.generation.max_context), fp32)
        inputs, outputs = lm_graph.io_specs(shape, spec.generation.max_context)
        decoder["kv_layout"] = lm_graph.KV_LAYOUT
    else:
        step(f"exporting {architecture} ({shape.num_layers} layers) with a KV cache to ONNX (opset {spec.opset}, "
             "dynamo exporter)")
        lm_export.export_lm(model, fp32, spec.opset)
        inputs, outputs = lm_export.io_specs(shape)

    step("computing PyTorch references (padded prefill, decode steps, perplexity)")
    ref = lm_parity.build_reference(spec, model, tokenizer, decoder["eos_token_ids"], progress=step)
    n = len(ref.prompts)

    manifest = ExportManifest(
        export_format=EXPORT_FORMAT,
        name=spec.name,
        task=spec.task.value,
        architecture=architecture,
        checkpoint=str(ckpt),
        tokenizer_dir="tokenizer",
        max_length=spec.generation.max_context,
        hidden_size=int(model.config.hidden_size),
        pooling="none",
        normalize=False,
        opset=spec.opset,
        inputs=inputs,
        outputs=outputs,
        decoder=decoder,
        tools=tool_versions("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tokenizers", "gguf"),
    )
    del model  # the references hold what the gates need

    fp32_generated: list[list[int]] = []
    fp32_ppl = float("nan")
    for precision in [p for p in FILES if p in spec.precisions]:
        path = out / FILES[precision]
        if precision is Precision.fp32:
            notes = (FUSED_NOTES if fused else
                     "dynamo export, onnxscript-optimized; KV cache as explicit inputs/outputs")
            step(f"parity gate for fp32 vs PyTorch: logits, {n} greedy generations, perplexity")
            figures, fp32_generated, fp32_ppl = lm_parity.fp32_figures(ref, lm_parity.open_lm(path, shape, decoder))
        else:
            step(f"building {precision.value} variant")
            if precision is Precision.int8:
                notes = lm_export.quantize_int8(fp32, path)
            else:  # the fused graph has no padding for the softmax rewrite to guard against
                notes = lm_export.quantize_int4(fp32, path, pad_invariant=not fused)
            step(f"parity gate for {precision.value} vs fp32: perplexity, {n} greedy generations")
            figures = lm_parity.quantized_figures(ref, fp32_generated, fp32_ppl,
                                                  lm_parity.open_lm(path, shape, decoder))
        report = lm_parity.gate_lm(spec, precision, figures, n)
        if precision is not Precision.fp32:
            add_portability(report, path)
        manifest.variants[precision.value] = Variant(
            precision=precision.value,
            file=path.name,
            sha256=sha256(path),
            bytes=_bytes(path),
            notes=notes,
            parity=report,
        )
        if report.passed:
            step(f"{precision.value}: batch invariance ({min(4, n)} prompts alone vs co-batched) and {selection.LM_METRIC}")
            lm = lm_parity.open_lm(path, shape, decoder, threads=spec.instances.intra_op_threads)
            selection.record(manifest, precision.value, selection.lm_invariance(lm, ref.prompts[:4], 24, 0),
                             {selection.LM_METRIC: selection.lm_speed(lm, ref.prompts[0])})
        manifest.write(out)
        if precision is Precision.fp32 and not manifest.variants["fp32"].parity.passed:
            break  # every other variant derives from fp32 and is judged against it
    if spec.serve_precision == AUTO:
        manifest.selection = selection.select(spec, manifest)
        manifest.write(out)
    console.print(lm_parity_table(manifest))
    for line in selection.selection_lines(manifest):
        console.print(line)
    step(f"done -> {out / 'manifest.json'}")
    if fail_on_gate:
        raise_gate_failures(spec, manifest, strict)
    return manifest


FUSED_NOTES = ("fused graph (export/lm_graph.py): GroupQueryAttention with rotary inside, KV cache rows written in "
               "place through IOBinding, SkipSimplifiedLayerNormalization, last-position logits")


def fused_graph(spec: DeploymentSpec, model) -> bool:
    """Whether this export builds the fused graph (spec.generation.graph; "auto": where covered)."""
    choice = spec.generation.graph
    why = lm_graph.supported(model)
    if choice == "fused" and why:
        raise ValueError(f"generation.graph: fused: {why}")
    return choice == "fused" or (choice == "auto" and why is None)


def _bytes(path: Path) -> int:
    data = path.parent / (path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def lm_parity_table(manifest: ExportManifest) -> Table:
    """fp32 rows compare with PyTorch (ppl x: fp32 ppl / PyTorch ppl); quantized rows with fp32."""
    table = Table(title=f"parity: {manifest.name} (fp32 vs PyTorch, quantized vs fp32)", caption=gates_caption(manifest))
    for col in ("variant", "prefill Δ", "decode Δ", "greedy =", "agree", "diverge@", "ppl", "ppl ×", "MB",
                "batch-inv.", "tok/s", "verdict"):
        table.add_column(col, justify="left" if col in ("variant", "verdict") else "right")
    for name, v in manifest.variants.items():
        f = v.parity.figures
        table.add_row(
            name,
            f"{f['prefill_max_abs_diff']:.1e}" if "prefill_max_abs_diff" in f else "-",
            f"{f['decode_max_abs_diff']:.1e}" if "decode_max_abs_diff" in f else "-",
            f"{f['greedy_identical']:.0f}/{f['greedy_prompts']:.0f}",
            f"{f['greedy_agreement']:.3f}",
            "-" if f["greedy_first_divergence"] < 0 else f"{f['greedy_first_divergence']:.0f}",
            f"{f['ppl']:.3f}",
            f"{f.get('ppl_ratio', f.get('ppl_ratio_vs_torch', float('nan'))):.4f}",
            f"{v.bytes / 1e6:.1f}",
            selection.invariance_cell(v),
            f"{v.speed[selection.LM_METRIC]:.1f}" if selection.LM_METRIC in v.speed else "-",
            "[green]PASS[/]" if v.parity.passed else "[red]FAIL[/]: " + "; ".join(v.parity.failures),
        )
    return table
