"""KServe manifests for one spec: a custom ``ServingRuntime`` on kiln's Triton image, an
``InferenceService`` serving the same repository through it, and the gateway tier in front.

Why a custom runtime: KServe's stock ``kserve-tritonserver`` image lacks what kiln's python
models import (tokenizers, jinja2, onnxruntime); ``triton/Dockerfile`` adds exactly those.
The InferenceService runs in KServe's raw (plain Deployment) mode with the ``external``
autoscaler class, so the same queue-time HorizontalPodAutoscaler and Prometheus adapter rule
as the k8s target scale it, instead of KServe's CPU-based default. In raw mode KServe names
the predictor's Deployment and Service ``<name>-predictor`` and exposes the runtime's first
port on 80 and every further port on its own number, which is where the gateway's gRPC goes.

KServe's resources are typed here (only the fields kiln sets; everything inside a pod is a
``kubernetes.client`` model) and validated against KServe's own CRD schemas (schemas/).
"""

from __future__ import annotations

from typing import Literal

from kubernetes import client
from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from kiln.deploy.k8s import (
    MODELS_DIR,
    DeployOptions,
    Names,
    disruption_budget,
    gateway_objects,
    labels,
    queue_time_autoscaler,
    scrape_annotations,
    selector,
    shm_volume,
    to_dict,
    triton_container,
)
from kiln_core.spec import DeploymentSpec, Ports

KSERVE_PORTS = Ports(http=8080, grpc=9000, metrics=8002)  # KServe's conventions for Triton (its stock runtime)
STORAGE_MOUNT = "/mnt/models"  # where KServe's storage initializer puts storageUri's files
MODEL_FORMAT, MODEL_FORMAT_VERSION = "triton", "2"
CONTAINER = "kserve-container"  # the name KServe requires for a runtime's serving container
ANNOTATIONS = {
    # Standard in KServe >= 0.15, which still reads the older name; older releases know only it
    "serving.kserve.io/deploymentMode": "RawDeployment",
    # KServe makes no autoscaler: the queue-time HPA below owns the predictor's replica count
    "serving.kserve.io/autoscalerClass": "external",
}


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True,
                              arbitrary_types_allowed=True)


def _plain(obj):
    """Our models -> dicts under their camelCase names; kubernetes.client models are left for
    ``to_dict`` (which serializes them and checks nothing was lost)."""
    if isinstance(obj, _Model):
        fields = type(obj).model_fields
        return {fields[n].alias or n: _plain(v) for n in fields if (v := getattr(obj, n)) is not None}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


class ModelFormat(_Model):
    name: str
    version: str | None = None
    auto_select: bool | None = None


class ServingRuntimeSpec(_Model):
    annotations: dict[str, str] | None = None
    supported_model_formats: list[ModelFormat]
    protocol_versions: list[str]
    multi_model: bool = False
    containers: list[client.V1Container]
    volumes: list[client.V1Volume] | None = None


class _Resource(_Model):
    """A custom resource: its metadata, and the manifest written for it."""

    metadata: client.V1ObjectMeta

    def manifest(self) -> dict:
        """apiVersion and kind first, as every manifest is written."""
        body = to_dict(_plain(self))
        head = ("apiVersion", "kind")
        return {k: body[k] for k in head} | {k: v for k, v in body.items() if k not in head}


class ServingRuntime(_Resource):
    api_version: Literal["serving.kserve.io/v1alpha1"] = "serving.kserve.io/v1alpha1"
    kind: Literal["ServingRuntime"] = "ServingRuntime"
    spec: ServingRuntimeSpec


class ModelSpec(_Model):
    model_format: ModelFormat
    runtime: str
    protocol_version: str | None = None
    storage_uri: str | None = None


class PredictorSpec(_Model):
    min_replicas: int
    max_replicas: int
    labels: dict[str, str] | None = None  # on the predictor's pods
    annotations: dict[str, str] | None = None
    model: ModelSpec


class InferenceServiceSpec(_Model):
    predictor: PredictorSpec


class InferenceService(_Resource):
    api_version: Literal["serving.kserve.io/v1beta1"] = "serving.kserve.io/v1beta1"
    kind: Literal["InferenceService"] = "InferenceService"
    spec: InferenceServiceSpec


def serving_runtime(spec: DeploymentSpec, opts: DeployOptions) -> ServingRuntime:
    """kiln's Triton as a KServe runtime: the repository baked into the image (/models) or, with
    a model store, where KServe's storage initializer puts it."""
    names = Names.of(spec)
    repository = STORAGE_MOUNT if opts.model_store else MODELS_DIR
    container = triton_container(spec, opts, names, name=CONTAINER, repository=repository, ports=KSERVE_PORTS)
    return ServingRuntime(
        metadata=client.V1ObjectMeta(name=names.triton, labels=labels(names, "triton")),
        spec=ServingRuntimeSpec(
            annotations={"prometheus.kserve.io/port": str(KSERVE_PORTS.metrics), "prometheus.kserve.io/path": "/metrics"},
            supported_model_formats=[ModelFormat(name=MODEL_FORMAT, version=MODEL_FORMAT_VERSION, auto_select=False)],
            protocol_versions=["v2", "grpc-v2"],
            containers=[container],
            volumes=[shm_volume()],
        ),
    )


def inference_service(spec: DeploymentSpec, opts: DeployOptions) -> InferenceService:
    names = Names.of(spec)
    return InferenceService(
        metadata=client.V1ObjectMeta(name=names.base, labels=labels(names, "triton"), annotations=ANNOTATIONS),
        spec=InferenceServiceSpec(predictor=PredictorSpec(
            min_replicas=1, max_replicas=opts.max_triton_replicas,
            # our labels and scrape annotations on the predictor's pods: the same Prometheus job,
            # budget and dashboard as the k8s target find them
            labels=labels(names, "triton"), annotations=scrape_annotations(KSERVE_PORTS.metrics),
            model=ModelSpec(model_format=ModelFormat(name=MODEL_FORMAT, version=MODEL_FORMAT_VERSION),
                            runtime=names.triton, protocol_version="grpc-v2", storage_uri=opts.model_store),
        )),
    )


def predictor(names: Names) -> str:
    """The Deployment and Service KServe's raw mode creates for the predictor."""
    return f"{names.base}-predictor"


def build_kserve(spec: DeploymentSpec, opts: DeployOptions) -> list:
    """Every object of the kserve target, in apply order: runtime before the service that names it."""
    names = Names.of(spec)
    return [
        serving_runtime(spec, opts), inference_service(spec, opts),
        queue_time_autoscaler(predictor(names), names, predictor(names), opts),
        disruption_budget(predictor(names), names, "triton", selector(names, "triton")),
        *gateway_objects(spec, opts, triton_grpc=f"{predictor(names)}:{KSERVE_PORTS.grpc}"),
    ]

