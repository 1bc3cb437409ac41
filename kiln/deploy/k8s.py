"""Plain Kubernetes manifests for one spec: Triton, the OpenAI gateway, Redis, and what keeps
them up (probes, requests, PodDisruptionBudgets, a HorizontalPodAutoscaler on queue time).

Every object is a ``kubernetes.client`` model, so a misspelt field fails where it is built;
:func:`to_dict` turns one into the camelCase dict ``kubectl`` reads. The pieces are small
functions because the KServe target (``kserve.py``) reuses the gateway, Redis, the budgets,
the autoscaler and Triton's own command line.

Where the repository comes from (``DeployOptions``): by default it is baked into an image
built from ``triton/Dockerfile`` (the writer leaves a two-line Dockerfile for it), so a pod
needs nothing but its image; with ``model_store`` (``s3://...``) an init container copies it
from object storage into the pod instead, onto the plain ``triton/Dockerfile`` image.
The gateway reads only the repository card and the tokenizer, never the weights: its init
container copies the repository without them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from kubernetes import client

from kiln.gateway.config import GatewayConfig
from kiln.gateway.runner import DRAIN_S
from kiln_core.spec import DeploymentSpec, Ports, Task

# Triton's routes and the container's admin-API restriction (the same as triton/Dockerfile's CMD,
# which these manifests replace with an explicit command line; a unit test compares the two)
TRITON_READY, TRITON_LIVE = "/v2/health/ready", "/v2/health/live"
TRITON_RESTRICTED = "shared-memory,logging,trace,model-repository"
ADMIN_HEADER, ADMIN_ENV, ADMIN_SECRET_KEY = "kiln-admin", "KILN_ADMIN_KEY", "admin-key"
MODELS_DIR = "/models"  # where the repository lives in Triton's pod (triton/Dockerfile's --model-repository)
# the gateway's routes (kiln/gateway/app.py) and its default port
GATEWAY_LIVE, GATEWAY_READY, METRICS_PATH = "/health", "/ready", "/metrics"
GATEWAY_PORT = GatewayConfig.model_fields["port"].default
GATEWAY_REPOSITORY = "/repository"
KEYS_DIR, KEYS_SECRET_KEY = "/etc/kiln/keys", "keys.yaml"
REDIS_PORT = 6379
# what the gateway's copy of the repository leaves out: it reads kiln.json and the tokenizer only
WEIGHTS = ("*.onnx", "*.onnx.data", "*.plan")
HTTP, GRPC, METRICS = "http", "grpc", "metrics"  # container port names (the Prometheus job keys on "metrics")
# where Prometheus finds the pods (prometheus.yml keeps pods carrying these)
PART_OF = "kiln"
# the per-pod metric the autoscaler reads: average queue time per request (us), which the
# Prometheus adapter's rule computes from Triton's counters (observability.adapter_values)
QUEUE_TIME_METRIC = "avg_time_queue_us"


class DeployError(ValueError):
    """Options the manifests cannot be built from (a user's input: exit 2)."""


@dataclass(frozen=True)
class DeployOptions:
    replicas: int = 2  # gateway replicas (they share rate limits through Redis)
    image: str | None = None  # Triton image; None: kiln-triton-<name>:latest (baked) or kiln-triton:25.07 (model_store)
    gateway_image: str = "kiln-gateway:latest"  # any image with kiln installed (`pip install .`)
    model_store: str | None = None  # s3://bucket/prefix of the repository: fetched by an init container
    max_triton_replicas: int = 4
    queue_target_ms: float = 50.0  # the autoscaler adds Triton pods above this average queue time per request
    redis_image: str = "redis:7.4-alpine"
    storage_image: str = "amazon/aws-cli:2.17.0"  # the init container that copies from object storage
    triton_base_image: str = "kiln-triton:25.07"  # built from triton/Dockerfile (TRITON_TAG 25.07-py3)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise DeployError(f"replicas {self.replicas}: the gateway needs at least 1")
        if self.max_triton_replicas < 1:
            raise DeployError(f"max Triton replicas {self.max_triton_replicas}: at least 1")
        if not self.queue_target_ms > 0:
            raise DeployError(f"queue target {self.queue_target_ms} ms: must be > 0")
        if self.model_store is not None and not re.match(r"^s3://[^/]+", self.model_store):
            raise DeployError(f"model store {self.model_store!r}: give an s3://bucket/prefix URI "
                              "(any S3-compatible store; set AWS_ENDPOINT_URL in the storage Secret)")

    def triton_image(self, spec: DeploymentSpec) -> str:
        if self.image:
            return self.image
        return self.triton_base_image if self.model_store else f"kiln-triton-{spec.name}:latest"


@dataclass(frozen=True)
class Names:
    """Object names of one deployment, all derived from the spec's name."""

    base: str

    @classmethod
    def of(cls, spec: DeploymentSpec) -> "Names":
        # DNS-1035 labels: a spec name may hold '_' and '.'; room is left for the longest suffix
        return cls(("kiln-" + re.sub(r"[^a-z0-9-]", "-", spec.name))[:40].rstrip("-"))

    @property
    def triton(self) -> str:
        return f"{self.base}-triton"

    @property
    def gateway(self) -> str:
        return f"{self.base}-gateway"

    @property
    def redis(self) -> str:
        return f"{self.base}-redis"

    @property
    def keys_secret(self) -> str:
        return f"{self.base}-gateway-keys"

    @property
    def admin_secret(self) -> str:
        return f"{self.base}-triton-admin"

    @property
    def storage_secret(self) -> str:
        return f"{self.base}-storage"


def labels(names: Names, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "kiln", "app.kubernetes.io/instance": names.base,
            "app.kubernetes.io/component": component, "app.kubernetes.io/part-of": PART_OF}


def selector(names: Names, component: str) -> dict[str, str]:
    return {k: v for k, v in labels(names, component).items() if k.endswith(("/instance", "/component"))}


def triton_ports(spec: DeploymentSpec) -> Ports:
    """The spec's ports; 0 ("any free port", for a local run) becomes Triton's default."""
    default = Ports()
    return Ports(http=spec.ports.http or default.http, grpc=spec.ports.grpc or default.grpc,
                 metrics=spec.ports.metrics or default.metrics)


@lru_cache(maxsize=1)
def _api() -> client.ApiClient:
    return client.ApiClient()


def to_dict(obj: Any) -> dict:
    """A ``kubernetes.client`` model (or a dict / list holding some) as kubectl's camelCase dict,
    Nones dropped. Raises when the client's serializer lost a field that was set (it does for a
    probe's ``exec`` in kubernetes-client 37): a silently missing probe is worse than no manifest."""
    out = _api().sanitize_for_serialization(obj)
    lost = _lost_fields(obj, out, type(obj).__name__)
    if lost:
        raise RuntimeError(f"the kubernetes client dropped fields while serializing: {', '.join(lost)}")
    return out


def _lost_fields(obj: Any, out: Any, where: str) -> list[str]:
    if isinstance(obj, (list, tuple)):
        return [x for i, (o, d) in enumerate(zip(obj, out)) for x in _lost_fields(o, d, f"{where}[{i}]")]
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in _lost_fields(v, out.get(k), f"{where}.{k}")]
    fields = getattr(type(obj), "model_fields", None)
    if fields is None:
        return []
    lost = []
    for name in obj.model_fields_set:
        value = getattr(obj, name)
        if value is None:
            continue
        keys = [k for k in (fields[name].alias, getattr(obj, "attribute_map", {}).get(name), name) if k]
        key = next((k for k in keys if k in out), None)
        if key is None:
            lost.append(f"{where}.{name}")
        else:
            lost += _lost_fields(value, out[key], f"{where}.{key}")
    return lost


# ----------------------------------------------------------------------------- Triton
def triton_args(repository: str, ports: Ports, cache_mb: int = 0) -> list[str]:
    """tritonserver's command line: the admin APIs answer only requests carrying the
    ``kiln-admin`` header key, read from the pod's environment (Kubernetes expands ``$(VAR)``);
    with `cache_mb`, Triton's local response cache of that size (each model's config says
    whether it uses it, as `kiln serve` runs it)."""
    restricted = f"{TRITON_RESTRICTED}:{ADMIN_HEADER}=$({ADMIN_ENV})"
    return [f"--model-repository={repository}", f"--http-port={ports.http}", f"--grpc-port={ports.grpc}",
            f"--metrics-port={ports.metrics}", f"--http-restricted-api={restricted}",
            f"--grpc-restricted-protocol={restricted}",
            *([f"--cache-config=local,size={cache_mb * 2**20}"] if cache_mb > 0 else [])]


def cache_mb(spec: DeploymentSpec) -> int:
    """The response cache a pod's Triton gets: the spec's size for an encoder with the cache on
    (only a batch-invariant variant's config turns it on), none for generation (never cached)."""
    return spec.response_cache.size_mb if spec.task is not Task.text_generation and spec.response_cache.enabled else 0


def triton_resources(spec: DeploymentSpec) -> client.V1ResourceRequirements:
    """A starting point from the spec (one core per encoder ONNX Runtime thread; a causal LM's
    KV caches need more memory); measure under load and adjust."""
    threads = spec.instances.encoder * max(1, spec.instances.intra_op_threads)
    memory = "4Gi" if spec.task is Task.text_generation else "2Gi"
    limit_memory = "8Gi" if spec.task is Task.text_generation else "4Gi"
    limits = {"memory": limit_memory}
    if spec.instances.kind == "gpu":
        limits["nvidia.com/gpu"] = "1"
    return client.V1ResourceRequirements(requests={"cpu": str(max(1, threads)), "memory": memory}, limits=limits)


def http_probe(path: str, port: int | str, period: int = 10, failures: int = 3) -> client.V1Probe:
    return client.V1Probe(http_get=client.V1HTTPGetAction(path=path, port=port), period_seconds=period,
                          timeout_seconds=3, failure_threshold=failures)


def admin_key_env(names: Names) -> client.V1EnvVar:
    return client.V1EnvVar(name=ADMIN_ENV, value_from=client.V1EnvVarSource(
        secret_key_ref=client.V1SecretKeySelector(name=names.admin_secret, key=ADMIN_SECRET_KEY)))


SHM = "dshm"  # the python backend exchanges tensors through /dev/shm; a pod's default is 64 MiB


def shm_volume() -> client.V1Volume:
    return client.V1Volume(name=SHM, empty_dir=client.V1EmptyDirVolumeSource(medium="Memory", size_limit="1Gi"))


def triton_container(spec: DeploymentSpec, opts: DeployOptions, names: Names, name: str = "triton",
                     repository: str = MODELS_DIR, ports: Ports | None = None,
                     mounts: list[client.V1VolumeMount] | None = None) -> client.V1Container:
    ports = ports or triton_ports(spec)
    return client.V1Container(
        name=name,
        image=opts.triton_image(spec),
        command=["tritonserver"],
        args=triton_args(repository, ports, cache_mb(spec)),
        ports=[client.V1ContainerPort(name=HTTP, container_port=ports.http),
               client.V1ContainerPort(name=GRPC, container_port=ports.grpc),
               client.V1ContainerPort(name=METRICS, container_port=ports.metrics)],
        env=[admin_key_env(names)],
        resources=triton_resources(spec),
        # loading models (a causal LM's ONNX graph) can take minutes: liveness waits for the startup probe
        startup_probe=http_probe(TRITON_READY, ports.http, period=10, failures=60),
        readiness_probe=http_probe(TRITON_READY, ports.http, period=5),
        liveness_probe=http_probe(TRITON_LIVE, ports.http, period=10),
        volume_mounts=[client.V1VolumeMount(name=SHM, mount_path="/dev/shm"), *(mounts or [])],
        security_context=client.V1SecurityContext(allow_privilege_escalation=False),
    )


def fetch_container(opts: DeployOptions, names: Names, dest: str, volume: str,
                    exclude: tuple[str, ...] = ()) -> client.V1Container:
    """Init container: the repository from object storage into ``dest`` (credentials, if any,
    from the storage Secret: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL ...)."""
    excludes = [arg for pattern in exclude for arg in ("--exclude", pattern)]
    return client.V1Container(
        name="fetch-repository",
        image=opts.storage_image,
        command=["aws", "s3", "sync", "--only-show-errors", opts.model_store, dest, *excludes],
        env_from=[client.V1EnvFromSource(secret_ref=client.V1SecretEnvSource(name=names.storage_secret, optional=True))],
        volume_mounts=[client.V1VolumeMount(name=volume, mount_path=dest)],
        resources=client.V1ResourceRequirements(requests={"cpu": "100m", "memory": "256Mi"}),
    )


def scrape_annotations(port: int) -> dict[str, str]:
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": METRICS_PATH}


def triton_deployment(spec: DeploymentSpec, opts: DeployOptions) -> client.V1Deployment:
    names = Names.of(spec)
    ports = triton_ports(spec)
    volumes, mounts, init = [shm_volume()], [], None
    if opts.model_store:
        volumes.append(client.V1Volume(name="models", empty_dir=client.V1EmptyDirVolumeSource()))
        mounts.append(client.V1VolumeMount(name="models", mount_path=MODELS_DIR, read_only=True))
        init = [fetch_container(opts, names, MODELS_DIR, "models")]
    return client.V1Deployment(
        api_version="apps/v1", kind="Deployment",
        metadata=client.V1ObjectMeta(name=names.triton, labels=labels(names, "triton")),
        spec=client.V1DeploymentSpec(
            replicas=1,  # the autoscaler owns the count from here
            selector=client.V1LabelSelector(match_labels=selector(names, "triton")),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels(names, "triton"), annotations=scrape_annotations(ports.metrics)),
                spec=client.V1PodSpec(
                    init_containers=init,
                    containers=[triton_container(spec, opts, names, mounts=mounts)],
                    volumes=volumes,
                    termination_grace_period_seconds=60,
                ),
            ),
        ),
    )


def service(name: str, names: Names, component: str, ports: list[tuple[str, int]]) -> client.V1Service:
    return client.V1Service(
        api_version="v1", kind="Service",
        metadata=client.V1ObjectMeta(name=name, labels=labels(names, component)),
        spec=client.V1ServiceSpec(
            type="ClusterIP", selector=selector(names, component),
            ports=[client.V1ServicePort(name=port_name, port=port, target_port=port_name,
                                        app_protocol="kubernetes.io/h2c" if port_name == GRPC else None)
                   for port_name, port in ports],
        ),
    )


def triton_service(spec: DeploymentSpec) -> client.V1Service:
    ports = triton_ports(spec)
    return service(Names.of(spec).triton, Names.of(spec), "triton",
                   [(HTTP, ports.http), (GRPC, ports.grpc), (METRICS, ports.metrics)])


# ----------------------------------------------------------------------------- gateway and Redis
def redis_url(names: Names) -> str:
    return f"redis://{names.redis}:{REDIS_PORT}/0"


def gateway_args(names: Names, triton_grpc: str) -> list[str]:
    """`kiln gateway`'s command line (kiln/cli.py): keys from the Secret's file, limits shared in Redis."""
    return ["gateway", "--repository", GATEWAY_REPOSITORY, "--triton", triton_grpc, "--host", "0.0.0.0",
            "--port", str(GATEWAY_PORT), "--keys-file", f"{KEYS_DIR}/{KEYS_SECRET_KEY}", "--redis", redis_url(names)]


def _copy_without_weights(image: str) -> client.V1Container:
    """Init container: the baked repository (the Triton image's /models) minus the weights."""
    excludes = " ".join(f"--exclude='{p}'" for p in WEIGHTS)
    return client.V1Container(
        name="copy-repository", image=image, command=["sh", "-c"],
        args=[f"tar -C {MODELS_DIR} {excludes} -cf - . | tar -C {GATEWAY_REPOSITORY} -xf -"],
        volume_mounts=[client.V1VolumeMount(name="repository", mount_path=GATEWAY_REPOSITORY)],
        resources=client.V1ResourceRequirements(requests={"cpu": "100m", "memory": "128Mi"}),
    )


def gateway_deployment(spec: DeploymentSpec, opts: DeployOptions, triton_grpc: str | None = None) -> client.V1Deployment:
    """``triton_grpc``: host:port of Triton's gRPC (default: this target's Triton Service)."""
    names = Names.of(spec)
    triton_grpc = triton_grpc or f"{names.triton}:{triton_ports(spec).grpc}"
    init = (fetch_container(opts, names, GATEWAY_REPOSITORY, "repository", exclude=WEIGHTS) if opts.model_store
            else _copy_without_weights(opts.triton_image(spec)))
    container = client.V1Container(
        name="gateway",
        image=opts.gateway_image,
        command=["kiln"],
        args=gateway_args(names, triton_grpc),
        ports=[client.V1ContainerPort(name=HTTP, container_port=GATEWAY_PORT)],
        resources=client.V1ResourceRequirements(requests={"cpu": "500m", "memory": "512Mi"},
                                                limits={"memory": "1Gi"}),
        readiness_probe=http_probe(GATEWAY_READY, HTTP, period=5),
        liveness_probe=http_probe(GATEWAY_LIVE, HTTP, period=10),
        volume_mounts=[client.V1VolumeMount(name="repository", mount_path=GATEWAY_REPOSITORY, read_only=True),
                       client.V1VolumeMount(name="keys", mount_path=KEYS_DIR, read_only=True)],
        security_context=client.V1SecurityContext(allow_privilege_escalation=False),
    )
    return client.V1Deployment(
        api_version="apps/v1", kind="Deployment",
        metadata=client.V1ObjectMeta(name=names.gateway, labels=labels(names, "gateway")),
        spec=client.V1DeploymentSpec(
            replicas=opts.replicas,
            selector=client.V1LabelSelector(match_labels=selector(names, "gateway")),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels(names, "gateway"), annotations=scrape_annotations(GATEWAY_PORT)),
                spec=client.V1PodSpec(
                    init_containers=[init],
                    containers=[container],
                    volumes=[
                        client.V1Volume(name="repository", empty_dir=client.V1EmptyDirVolumeSource()),
                        # not optional: a gateway without its keys must not start (it would be open)
                        client.V1Volume(name="keys", secret=client.V1SecretVolumeSource(
                            secret_name=names.keys_secret, optional=False,
                            items=[client.V1KeyToPath(key=KEYS_SECRET_KEY, path=KEYS_SECRET_KEY)])),
                    ],
                    # SIGTERM drains: in-flight requests get DRAIN_S to finish
                    termination_grace_period_seconds=int(DRAIN_S) + 10,
                ),
            ),
        ),
    )


def gateway_service(spec: DeploymentSpec) -> client.V1Service:
    names = Names.of(spec)
    return service(names.gateway, names, "gateway", [(HTTP, GATEWAY_PORT)])


def redis_deployment(spec: DeploymentSpec, opts: DeployOptions) -> client.V1Deployment:
    """The gateways' shared rate-limit buckets: state that may be lost (limits restart full), so
    no persistence and one replica."""
    names = Names.of(spec)
    container = client.V1Container(
        name="redis", image=opts.redis_image,
        args=["--save", "", "--appendonly", "no"],
        ports=[client.V1ContainerPort(name="redis", container_port=REDIS_PORT)],
        resources=client.V1ResourceRequirements(requests={"cpu": "100m", "memory": "128Mi"}, limits={"memory": "256Mi"}),
        # TCP, not an exec of redis-cli: kubernetes-client 37 serializes a probe's `exec` to nothing
        readiness_probe=client.V1Probe(tcp_socket=client.V1TCPSocketAction(port="redis"), period_seconds=5),
        liveness_probe=client.V1Probe(tcp_socket=client.V1TCPSocketAction(port="redis"), period_seconds=10),
        security_context=client.V1SecurityContext(allow_privilege_escalation=False),
    )
    return client.V1Deployment(
        api_version="apps/v1", kind="Deployment",
        metadata=client.V1ObjectMeta(name=names.redis, labels=labels(names, "redis")),
        spec=client.V1DeploymentSpec(
            replicas=1,
            selector=client.V1LabelSelector(match_labels=selector(names, "redis")),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels(names, "redis")),
                spec=client.V1PodSpec(containers=[container]),
            ),
        ),
    )


def redis_service(spec: DeploymentSpec) -> client.V1Service:
    names = Names.of(spec)
    return service(names.redis, names, "redis", [("redis", REDIS_PORT)])


# ----------------------------------------------------------------------------- staying up
def disruption_budget(name: str, names: Names, component: str, match: dict[str, str]) -> client.V1PodDisruptionBudget:
    """At most one pod of the component evicted at a time (a node drain keeps the rest serving)."""
    return client.V1PodDisruptionBudget(
        api_version="policy/v1", kind="PodDisruptionBudget",
        metadata=client.V1ObjectMeta(name=name, labels=labels(names, component)),
        spec=client.V1PodDisruptionBudgetSpec(max_unavailable=1, selector=client.V1LabelSelector(match_labels=match)),
    )


def queue_time_autoscaler(name: str, names: Names, deployment: str, opts: DeployOptions) -> client.V2HorizontalPodAutoscaler:
    """NVIDIA's Helm-chart pattern: scale Triton on the average queue time per request, a
    per-pod metric the Prometheus adapter computes from Triton's counters (observability.py)."""
    return client.V2HorizontalPodAutoscaler(
        api_version="autoscaling/v2", kind="HorizontalPodAutoscaler",
        metadata=client.V1ObjectMeta(name=name, labels=labels(names, "triton")),
        spec=client.V2HorizontalPodAutoscalerSpec(
            scale_target_ref=client.V2CrossVersionObjectReference(api_version="apps/v1", kind="Deployment", name=deployment),
            min_replicas=1, max_replicas=opts.max_triton_replicas,
            metrics=[client.V2MetricSpec(type="Pods", pods=client.V2PodsMetricSource(
                metric=client.V2MetricIdentifier(name=QUEUE_TIME_METRIC),
                # the metric is in microseconds
                target=client.V2MetricTarget(type="AverageValue", average_value=str(round(opts.queue_target_ms * 1000)))))],
            # a new Triton pod takes a while to load its models: scale up at once, down slowly
            behavior=client.V2HorizontalPodAutoscalerBehavior(
                scale_down=client.V2HPAScalingRules(stabilization_window_seconds=300)),
        ),
    )


def gateway_objects(spec: DeploymentSpec, opts: DeployOptions, triton_grpc: str | None = None) -> list:
    """The gateway tier both targets share: Redis, the gateways, their budget."""
    names = Names.of(spec)
    return [redis_deployment(spec, opts), redis_service(spec),
            gateway_deployment(spec, opts, triton_grpc), gateway_service(spec),
            disruption_budget(names.gateway, names, "gateway", selector(names, "gateway"))]


def build_k8s(spec: DeploymentSpec, opts: DeployOptions) -> list:
    """Every object of the k8s target, in the order ``kubectl apply`` should create them."""
    names = Names.of(spec)
    return [
        triton_deployment(spec, opts), triton_service(spec),
        disruption_budget(names.triton, names, "triton", selector(names, "triton")),
        queue_time_autoscaler(names.triton, names, names.triton, opts),
        *gateway_objects(spec, opts),
    ]
