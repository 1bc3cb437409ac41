"""Offline validation of every manifest, by the owners' schemas, before a file is written.

Kubernetes kinds: the Kubernetes OpenAPI schemas that ``kubernetes-validate`` ships, in their
strict form (an unknown field is an error, as with ``kubectl apply --validate=strict``), for
the oldest and the newest Kubernetes release kiln claims. KServe's ``InferenceService`` and
``ServingRuntime``: the CRD schemas vendored from KServe in ``schemas/`` (README.txt there),
checked with ``jsonschema``. A CRD schema leaves objects open (the API server prunes unknown
fields silently), so the loader closes every object that lists its properties, unless it is
marked ``x-kubernetes-preserve-unknown-fields``: a misspelt field fails here instead of
vanishing on the cluster.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import jsonschema
import kubernetes_validate

SCHEMAS = Path(__file__).parent / "schemas"
# the oldest Kubernetes minor kiln's manifests are checked against, and the newest the pinned
# kubernetes-validate knows (autoscaling/v2 and policy/v1 exist in both)
KUBERNETES_VERSIONS = ("1.30", "1.37")
CRD_SCHEMAS = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice-v1beta1.json",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "servingruntime-v1alpha1.json",
}


class ManifestError(ValueError):
    """A manifest its schema refuses; the message names the object, the field and why."""


def _where(doc: dict) -> str:
    return f"{doc.get('kind', '?')} {(doc.get('metadata') or {}).get('name', '?')}"


def _path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def _closed(schema):
    """A copy of a CRD schema where objects with listed properties refuse unknown ones."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=None)
def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    schema = _closed(json.loads((SCHEMAS / CRD_SCHEMAS[(api_version, kind)]).read_text()))
    return jsonschema.Draft202012Validator(schema)


def validate(doc: dict, versions: tuple[str, ...] = KUBERNETES_VERSIONS) -> None:
    """Raise :class:`ManifestError` unless ``doc`` is valid for its kind."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRD_SCHEMAS:
        error = jsonschema.exceptions.best_match(crd_validator(*key).iter_errors(doc))
        if error is not None:
            raise ManifestError(f"{_where(doc)}: {_path(error)}: {error.message} (KServe CRD schema)")
        return
    if key[0] and key[0].startswith("serving.kserve.io/"):
        raise ManifestError(f"{_where(doc)}: no vendored KServe schema for {key[0]} {key[1]} (kiln/deploy/schemas)")
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            raise ManifestError(f"{_where(doc)}: {_path(err)}: {err.message} (Kubernetes {version} schema)") from None
        except kubernetes_validate.SchemaNotFoundError:
            raise ManifestError(f"{_where(doc)}: Kubernetes {version} has no {key[0]} {key[1]}") from None


def validate_all(docs: list[dict]) -> None:
    for doc in docs:
        validate(doc)
