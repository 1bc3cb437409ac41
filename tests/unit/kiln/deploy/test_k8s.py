"""kiln.deploy for plain Kubernetes: the manifests of both packaged specs pass the strict
Kubernetes schemas, a broken one fails naming the field, and the objects are wired to each
other (probes to the real routes and ports, the gateway to Triton, Redis and its key Secret,
the autoscaler to the adapter's metric). Only specs are loaded: nothing is exported."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import yaml
from typer.testing import CliRunner

from kiln.deploy import writer
from kiln.deploy.k8s import (
    GATEWAY_LIVE,
    GATEWAY_PORT,
    GATEWAY_READY,
    TRITON_LIVE,
    TRITON_READY,
    DeployError,
    DeployOptions,
    Names,
    to_dict,
)
from kiln.deploy.observability import adapter_values
from kiln.deploy.validate import ManifestError, validate
from kiln.gateway.config import GatewayConfig
from kiln_core.spec import load_spec, parse_spec
from kiln_testkit import REPO

SPECS = ["minilm", "smollm2"]
OPTIONS = {"baked": DeployOptions(), "model-store": DeployOptions(model_store="s3://models/kiln")}


def docs(name="minilm", opts=OPTIONS["baked"]):
    return writer.manifests(load_spec(name), "k8s", opts)


def one(documents, kind, name):
    (doc,) = [d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def container(deployment, name):
    (c,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def port_number(c, port):
    """A probe's port: a number, or the name of one of the container's ports."""
    return port if isinstance(port, int) else {p["name"]: p["containerPort"] for p in c["ports"]}[port]


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("name", SPECS)
def test_every_manifest_of_both_packaged_specs_passes_the_strict_kubernetes_schemas(name, opts):
    documents = docs(name, opts)
    for doc in documents:
        validate(doc)
    kinds = sorted(d["kind"] for d in documents)
    assert kinds == sorted(["Deployment"] * 3 + ["Service"] * 3 + ["PodDisruptionBudget"] * 2
                           + ["HorizontalPodAutoscaler"])


def test_a_wrong_type_fails_validation_naming_the_field():
    doc = one(docs(), "Deployment", "kiln-minilm-gateway")
    doc["spec"]["replicas"] = "two"
    with pytest.raises(ManifestError, match=r"Deployment kiln-minilm-gateway: spec\.replicas: 'two' is not of type"):
        validate(doc)


def test_an_unknown_container_field_fails_validation_naming_it():
    doc = one(docs(), "Deployment", "kiln-minilm-triton")
    container(doc, "triton")["imagePullPolicyy"] = "Always"
    with pytest.raises(ManifestError, match=r"spec\.template\.spec\.containers\.0: .*'imagePullPolicyy' was unexpected"):
        validate(doc)


def test_the_autoscaler_scales_triton_on_the_metric_the_adapter_rule_defines():
    documents = docs()
    hpa = one(documents, "HorizontalPodAutoscaler", "kiln-minilm-triton")
    (rule,) = adapter_values()["rules"]["custom"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert rule["seriesQuery"].startswith("nv_inference_queue_duration_us{")
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "50000"}  # 50 ms, in us
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "kiln-minilm-triton")
    one(documents, "Deployment", target["name"])  # it scales an object that is there


def test_probes_point_at_the_health_routes_on_the_serving_ports():
    spec = load_spec("minilm")
    documents = docs()
    triton = container(one(documents, "Deployment", "kiln-minilm-triton"), "triton")
    http = spec.ports.http
    for probe, route in (("readinessProbe", TRITON_READY), ("livenessProbe", TRITON_LIVE), ("startupProbe", TRITON_READY)):
        assert triton[probe]["httpGet"]["path"] == route
        assert port_number(triton, triton[probe]["httpGet"]["port"]) == http
    assert (TRITON_READY, TRITON_LIVE) == ("/v2/health/ready", "/v2/health/live")
    assert f"--http-port={http}" in triton["args"]
    gateway = container(one(documents, "Deployment", "kiln-minilm-gateway"), "gateway")
    assert gateway["readinessProbe"]["httpGet"]["path"] == GATEWAY_READY == "/ready"
    assert gateway["livenessProbe"]["httpGet"]["path"] == GATEWAY_LIVE == "/health"
    for probe in ("readinessProbe", "livenessProbe"):
        assert port_number(gateway, gateway[probe]["httpGet"]["port"]) == GATEWAY_PORT == GatewayConfig().port
    args = gateway["args"]
    assert args[args.index("--port") + 1] == str(GATEWAY_PORT)


def test_the_gateway_reads_its_keys_from_the_secret_and_starts_without_none():
    deployment = one(docs(), "Deployment", "kiln-minilm-gateway")
    pod = deployment["spec"]["template"]["spec"]
    gateway = container(deployment, "gateway")
    keys_file = gateway["args"][gateway["args"].index("--keys-file") + 1]
    (mount,) = [m for m in gateway["volumeMounts"] if keys_file.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == Names.of(load_spec("minilm")).keys_secret == "kiln-minilm-gateway-keys"
    assert volume["secret"]["optional"] is False  # no Secret: the pod waits instead of serving open
    (item,) = volume["secret"]["items"]
    assert keys_file == f"{mount['mountPath']}/{item['path']}"
    assert deployment["spec"]["replicas"] == 2


def test_the_gateway_reaches_triton_and_redis_through_their_services():
    documents = docs()
    args = container(one(documents, "Deployment", "kiln-minilm-gateway"), "gateway")["args"]
    host, port = args[args.index("--triton") + 1].split(":")
    triton_ports = {p["name"]: p["port"] for p in one(documents, "Service", host)["spec"]["ports"]}
    assert int(port) == triton_ports["grpc"] == load_spec("minilm").ports.grpc
    redis = re.fullmatch(r"redis://([a-z0-9-]+):(\d+)/0", args[args.index("--redis") + 1])
    assert int(redis[2]) in [p["port"] for p in one(documents, "Service", redis[1])["spec"]["ports"]]
    assert args[:1] == ["gateway"] and container(one(documents, "Deployment", "kiln-minilm-gateway"), "gateway")["command"] == ["kiln"]


def test_triton_keeps_the_container_images_admin_api_restriction():
    """The manifests replace triton/Dockerfile's CMD: the restricted APIs must stay the same."""
    cmd = next(line for line in (REPO / "triton" / "Dockerfile").read_text().splitlines() if line.startswith("CMD"))
    shell = re.sub(r"\$\{KILN_ADMIN_KEY[^}]*\}", "KEY", json.loads(cmd[3:])[2])
    wanted = {a for a in shlex.split(shell) if "restricted" in a}
    assert len(wanted) == 2
    args = container(one(docs(), "Deployment", "kiln-minilm-triton"), "triton")["args"]
    assert {a.replace("$(KILN_ADMIN_KEY)", "KEY") for a in args if "restricted" in a} == wanted


def test_with_a_model_store_an_init_container_fetches_the_repository_where_triton_reads_it():
    documents = docs(opts=OPTIONS["model-store"])
    pod = one(documents, "Deployment", "kiln-minilm-triton")["spec"]["template"]["spec"]
    (fetch,) = pod["initContainers"]
    assert "s3://models/kiln" in fetch["command"]
    repository = next(a.split("=", 1)[1] for a in pod["containers"][0]["args"] if a.startswith("--model-repository="))
    fetched_into = {m["mountPath"]: m["name"] for m in fetch["volumeMounts"]}
    assert {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}[repository] == fetched_into[repository]
    assert pod["containers"][0]["image"] == "kiln-triton:25.07"  # the plain triton/Dockerfile image
    gateway_init = one(documents, "Deployment", "kiln-minilm-gateway")["spec"]["template"]["spec"]["initContainers"][0]
    assert "*.onnx" in gateway_init["command"]  # the gateway never downloads the weights


def test_a_spec_name_with_dots_and_underscores_gives_valid_object_names(tmp_path):
    spec = parse_spec({"name": "my_model.v2", "source": {"kind": "folder", "path": str(tmp_path)}})
    for doc in writer.manifests(spec, "k8s", DeployOptions()):
        validate(doc)
        assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", doc["metadata"]["name"]), doc["metadata"]["name"]


def test_bad_options_are_refused_before_anything_is_built():
    with pytest.raises(DeployError, match="replicas 0"):
        DeployOptions(replicas=0)
    with pytest.raises(DeployError, match="s3://"):
        DeployOptions(model_store="/local/path")


def test_a_field_the_kubernetes_client_loses_while_serializing_is_an_error_not_a_missing_probe():
    from kubernetes import client

    probe = client.V1Probe(_exec=client.V1ExecAction(command=["redis-cli", "ping"]))
    with pytest.raises(RuntimeError, match="dropped fields.*V1Probe"):
        to_dict(probe)


def test_the_writer_validates_first_and_replaces_its_old_files(tmp_path, monkeypatch):
    spec = load_spec("minilm")
    stale = tmp_path / "k8s" / "99-deployment-gone.yaml"
    stale.parent.mkdir(parents=True)
    stale.write_text("kind: Deployment\n")
    files = writer.write_deploy(spec, "k8s", DeployOptions(), tmp_path)
    assert not stale.exists()
    written = [yaml.safe_load(p.read_text()) for p in files if p.parent.name == "k8s"]
    assert written == docs()
    for name in ("prometheus.yml", "prometheus-adapter-values.yaml", "grafana-dashboard.json", "Dockerfile"):
        assert tmp_path / name in files
    broken = docs()
    broken[0]["spec"]["replicas"] = "two"
    monkeypatch.setattr(writer, "manifests", lambda *a: broken)
    before = {p: p.read_text() for p in files}
    with pytest.raises(ManifestError, match="spec.replicas"):
        writer.write_deploy(spec, "k8s", DeployOptions(), tmp_path)
    assert {p: p.read_text() for p in files} == before


def test_kiln_deploy_writes_and_reports_the_files(tmp_path):
    """The README's command: `kiln deploy minilm --target k8s`."""
    from kiln.cli import app

    result = CliRunner().invoke(app, ["deploy", "minilm", "--target", "k8s", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "validated offline" in result.output
    assert len(list((tmp_path / "k8s").glob("*.yaml"))) == len(docs())
    bad = CliRunner().invoke(app, ["deploy", "minilm", "--target", "helm", "--out", str(tmp_path)])
    assert bad.exit_code == 2


def test_an_encoders_triton_gets_the_response_cache_the_spec_sizes_and_a_chat_models_none():
    """As `kiln serve` runs it: the models' configs say whether they use the cache, the server
    must have one for them to use (the dashboard's cache panels read what it counts)."""
    args = container(one(docs(), "Deployment", "kiln-minilm-triton"), "triton")["args"]
    assert f"--cache-config=local,size={load_spec('minilm').response_cache.size_mb * 2**20}" in args
    chat = container(one(docs("smollm2"), "Deployment", "kiln-smollm2-triton"), "triton")["args"]
    assert not any(a.startswith("--cache-config") for a in chat)
