"""Reuse an export that still matches its spec (what `make demo` leaves, `make test` reuses)."""

from __future__ import annotations

from rich.console import Console

from kiln_core.manifest import EXPORT_FORMAT, ExportManifest
from kiln_core.sources import checkpoint_dir
from kiln_core.spec import DeploymentSpec


def stale_reasons(s: DeploymentSpec, manifest) -> list[str]:
    """Why an existing export no longer matches the spec (empty: reusable)."""
    reasons = []
    if manifest.export_format != EXPORT_FORMAT:
        reasons.append(f"export format {manifest.export_format}, this kiln writes {EXPORT_FORMAT}")
    if s.task.value == "text-generation":
        from export.lm_graph import kv_layout

        fields = [("task", s.task.value, manifest.task), ("max_context", s.generation.max_context, manifest.max_length),
                  ("generation.graph", kv_layout(s.generation.graph, manifest.architecture),
                   (manifest.decoder or {}).get("kv_layout", "concat"))]
    else:
        fields = [
            ("task", s.task.value, manifest.task),
            ("max_length", s.max_length, manifest.max_length),
            ("pooling", s.pooling.value, manifest.pooling),
            ("normalize", s.normalize, manifest.normalize),
        ]
    fields += [("opset", s.opset, manifest.opset), ("checkpoint", str(checkpoint_dir(s)), manifest.checkpoint)]
    for field, want, got in fields:
        if want != got:
            reasons.append(f"{field}: spec {want!r}, export {got!r}")
    missing = {p.value for p in s.precisions} - set(manifest.variants)
    if missing:
        reasons.append(f"precisions {sorted(missing)} not built")
    if s.labels is not None and s.labels != manifest.labels:
        reasons.append("labels differ")
    return reasons


def ensure_export(s: DeploymentSpec, out: Console | None = None):
    """The spec's export: reused when it matches the spec and its served variant passed its
    gate (what `make demo` leaves is reused by `make test`); otherwise exported anew."""
    from export.pipeline import run_export

    out = out or Console(stderr=True)
    try:
        manifest = ExportManifest.read(s.export_dir)
        manifest.served_variant(s.serve_precision)
        stale = stale_reasons(s, manifest)
    except (FileNotFoundError, LookupError):
        stale = ["no usable export"]
    if stale:
        out.print(f"[bold cyan]export[/] exporting ({'; '.join(stale)})")
        return run_export(s, out)
    out.print(f"[bold cyan]export[/] reusing {s.export_dir / 'manifest.json'} (matches the spec)")
    return manifest
