#!/usr/bin/env bash
# Build kiln's Triton image and serve a generated model repository with it, on GPU.
#
#   triton/run-container.sh build/minilm/model_repository [extra tritonserver args...]
#
# Environment (all optional):
#   KILN_TRITON_IMAGE   image tag to build and run       (default kiln-tritonserver:<TRITON_TAG>)
#   TRITON_TAG          base nvcr.io tritonserver tag     (default: the Dockerfile's, 25.07-py3)
#   ORT_VERSION         onnxruntime-gpu for python-ort    (default: the Dockerfile's, 1.22.0)
#   HTTP_PORT GRPC_PORT METRICS_PORT   host ports         (default 8000 8001 8002)
#   KILN_BIND_ADDRESS   host address the ports bind to    (default 127.0.0.1: Triton has no
#                       authentication; 0.0.0.0 publishes it to the network)
#   KILN_ADMIN_KEY      value of the kiln-admin header that Triton's restricted APIs
#                       (shared memory, logging, trace, model repository) require
#                       (default: a random key nobody knows, so they stay closed)
#   GPUS                docker --gpus value               (default all)
#   SHM_SIZE            shared memory for the python backend (default 1g)
#   KILN_SKIP_BUILD=1   run the image as it is, do not (re)build it
#   KILN_DRY_RUN=1      print the docker commands instead of running them
set -euo pipefail

usage() {
    cat >&2 <<USAGE
usage: $(basename "$0") MODEL_REPOSITORY [tritonserver args...]

Serves MODEL_REPOSITORY (a folder written by \`kiln repo\`) in NVIDIA's Triton
container on GPU: mounted read-only at /models, HTTP/gRPC/metrics on
\${HTTP_PORT:-8000}/\${GRPC_PORT:-8001}/\${METRICS_PORT:-8002} of
\${KILN_BIND_ADDRESS:-127.0.0.1}; shared memory, logging, trace and repository
control need the header kiln-admin: \$KILN_ADMIN_KEY.
USAGE
}

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    usage
    [[ $# -lt 1 ]] && exit 2
    exit 0
fi

if [[ ! -d "$1" ]]; then
    echo "error: $1 is not a directory (expected a model repository written by \`kiln repo\`)" >&2
    exit 2
fi
REPO="$(cd "$1" && pwd)"
shift
if [[ ! -f "$REPO/kiln.json" ]]; then
    echo "error: $REPO has no kiln.json: write it with \`kiln repo\` first" >&2
    exit 2
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
IMAGE="${KILN_TRITON_IMAGE:-kiln-tritonserver:${TRITON_TAG:-25.07-py3}}"
BIND="${KILN_BIND_ADDRESS:-127.0.0.1}"
ADMIN_KEY="${KILN_ADMIN_KEY:-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')}"
RESTRICTED="shared-memory,logging,trace,model-repository"
if [[ ! "$ADMIN_KEY" =~ ^[A-Za-z0-9_-]{16,}$ ]]; then
    echo "error: KILN_ADMIN_KEY must be at least 16 letters, digits, '-' or '_'" >&2
    exit 2
fi
HTTP_PORT="${HTTP_PORT:-8000}"
GRPC_PORT="${GRPC_PORT:-8001}"
METRICS_PORT="${METRICS_PORT:-8002}"
GPUS="${GPUS:-all}"
SHM_SIZE="${SHM_SIZE:-1g}"

run() {
    if [[ "${KILN_DRY_RUN:-0}" == "1" ]]; then
        printf '%q ' "$@"
        printf '\n'
    else
        "$@"
    fi
}

if [[ "${KILN_SKIP_BUILD:-0}" != "1" ]]; then
    build_args=()
    if [[ -n "${TRITON_TAG:-}" ]]; then
        build_args+=(--build-arg "TRITON_TAG=${TRITON_TAG}")
    fi
    if [[ -n "${ORT_VERSION:-}" ]]; then
        build_args+=(--build-arg "ORT_VERSION=${ORT_VERSION}")
    fi
    run docker build "${build_args[@]+"${build_args[@]}"}" -t "$IMAGE" "$HERE"
fi

run docker run --rm \
    --gpus "$GPUS" \
    --shm-size "$SHM_SIZE" \
    -p "${BIND}:${HTTP_PORT}:8000" \
    -p "${BIND}:${GRPC_PORT}:8001" \
    -p "${BIND}:${METRICS_PORT}:8002" \
    -v "${REPO}:/models:ro" \
    "$IMAGE" \
    tritonserver \
    --model-repository=/models \
    --http-port=8000 \
    --grpc-port=8001 \
    --metrics-port=8002 \
    "--http-restricted-api=${RESTRICTED}:kiln-admin=${ADMIN_KEY}" \
    "--grpc-restricted-protocol=${RESTRICTED}:kiln-admin=${ADMIN_KEY}" \
    "$@"
