"""kiln.deploy for KServe: the ServingRuntime and InferenceService of both packaged specs pass
KServe's own CRD schemas (vendored), a broken field fails naming it, and the runtime, the
service, the autoscaler and the gateway point at each other. Nothing is exported."""

from __future__ import annotations

import json

import pytest

from kiln.deploy import writer
from kiln.deploy.k8s import DeployOptions
from kiln.deploy.kserve import KSERVE_PORTS, STORAGE_MOUNT
from kiln.deploy.validate import CRD_SCHEMAS, SCHEMAS, ManifestError, validate
from kiln_core.spec import load_spec

SPECS = ["minilm", "smollm2"]
STORE = "s3://models/kiln/minilm"


def docs(name="minilm", opts=DeployOptions()):
    return writer.manifests(load_spec(name), "kserve", opts)


def one(documents, kind):
    (doc,) = [d for d in documents if d["kind"] == kind]
    return doc


def runtime_container(documents):
    (c,) = one(documents, "ServingRuntime")["spec"]["containers"]
    return c


@pytest.mark.parametrize("store", [None, STORE], ids=["baked", "model-store"])
@pytest.mark.parametrize("name", SPECS)
def test_every_manifest_of_both_packaged_specs_passes_its_schema(name, store):
    documents = docs(name, DeployOptions(model_store=store))
    for doc in documents:
        validate(doc)
    assert {"ServingRuntime", "InferenceService", "HorizontalPodAutoscaler", "Deployment"} <= {d["kind"] for d in documents}


def test_an_unknown_field_in_the_inference_service_fails_naming_it():
    doc = one(docs(), "InferenceService")
    doc["spec"]["predictor"]["model"]["storageURI"] = STORE  # the field is storageUri
    with pytest.raises(ManifestError, match=r"InferenceService kiln-minilm: spec\.predictor\.model: .*'storageURI' was unexpected"):
        validate(doc)


def test_a_wrong_type_in_the_runtime_fails_naming_the_field():
    doc = one(docs(), "ServingRuntime")
    doc["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(ManifestError, match=r"spec\.containers\.0\.ports\.0\.containerPort: 'http' is not of type 'integer'"):
        validate(doc)


def test_the_service_uses_the_custom_runtime_on_kilns_triton_image():
    documents = docs()
    runtime, isvc = one(documents, "ServingRuntime"), one(documents, "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"] in [{k: v for k, v in f.items() if k != "autoSelect"}
                                    for f in runtime["spec"]["supportedModelFormats"]]
    c = runtime_container(documents)
    assert c["name"] == "kserve-container"
    assert c["image"] == "kiln-triton-minilm:latest"  # the repository baked in, as for the k8s target
    assert "--model-repository=/models" in c["args"] and "storageUri" not in model


def test_with_a_model_store_kserve_fetches_the_repository_where_triton_reads_it():
    documents = docs(opts=DeployOptions(model_store=STORE))
    assert one(documents, "InferenceService")["spec"]["predictor"]["model"]["storageUri"] == STORE
    assert f"--model-repository={STORAGE_MOUNT}" in runtime_container(documents)["args"]


def test_probes_point_at_tritons_health_routes_on_the_runtime_http_port():
    c = runtime_container(docs())
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": KSERVE_PORTS.http}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": KSERVE_PORTS.http}
    assert f"--http-port={KSERVE_PORTS.http}" in c["args"]


def test_the_gateway_reaches_the_predictors_grpc_port_and_the_autoscaler_scales_the_predictor():
    """KServe's raw mode exposes the first container port on 80 and the others on their own numbers."""
    documents = docs()
    isvc = one(documents, "InferenceService")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "external"
    ports = runtime_container(documents)["ports"]
    (grpc_index,) = [i for i, p in enumerate(ports) if "grpc" in p["name"]]
    assert grpc_index > 0
    (gateway,) = [d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-gateway")]
    args = gateway["spec"]["template"]["spec"]["containers"][0]["args"]
    predictor = f"{isvc['metadata']['name']}-predictor"
    assert args[args.index("--triton") + 1] == f"{predictor}:{ports[grpc_index]['containerPort']}"
    hpa = one(documents, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == predictor


def _descriptions(schema) -> list[str]:
    if isinstance(schema, list):
        return [d for s in schema for d in _descriptions(s)]
    if not isinstance(schema, dict):
        return []
    own = [schema["description"]] if isinstance(schema.get("description"), str) else []
    return own + [d for v in schema.values() for d in _descriptions(v)]


def test_the_vendored_schemas_are_small_and_say_where_they_came_from():
    files = [SCHEMAS / f for f in CRD_SCHEMAS.values()]
    assert sum(f.stat().st_size for f in files) < 1 << 20
    for f in files:
        schema = json.loads(f.read_text())
        assert not _descriptions(schema)  # pruned (a property may still be named "description")
        assert schema["properties"]["spec"]["type"] == "object"
    readme = (SCHEMAS / "README.txt").read_text()
    assert "kserve/kserve" in readme and all(f.name in readme for f in files)
