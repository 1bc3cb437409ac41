"""The OpenAI-compatible HTTP gateway in front of Triton (FastAPI on uvicorn).

    POST /v1/chat/completions   chat, streamed (SSE) or not       -> the generation model
    POST /v1/completions        a prompt string                   -> the generation model
    POST /v1/embeddings         a string or a list of them        -> the encoder ensemble
    GET  /v1/models             the public models of the repositories
    GET  /health                the gateway process is up
    GET  /ready                 Triton is ready and every model is loaded (else 503)
    GET  /metrics               Prometheus
    POST /v1/admin/models/{model}/reload | rollback   admin keys: a new version, or the one before (202, a job)
    GET  /v1/admin/jobs[/{id}]  those jobs (``admin.py``)

Every answer carries ``x-request-id`` (the client's, when it sent a sane one); errors use
OpenAI's envelope. Without keys the gateway listens on loopback only (unless
``allow_unauthenticated``), and every client shares the anonymous principal's limits. This module only wires the parts: the HTTP edges (``http.py``), the
endpoints' logic (``endpoints.py``), the API surface (``protocol.py``), keys
(``auth.py``), rate limits (``limits.py``) and Triton (``backend.py``).
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.responses import Response

from kiln.gateway import protocol
from kiln.gateway.admin import Admin
from kiln.gateway.backend import TritonBackend
from kiln.gateway.config import GatewayConfig
from kiln.gateway.endpoints import Gateway
from kiln.gateway.http import (
    ADMIN_ROUTES,
    Edge,
    FastJSON,
    guarded,
    http_exception_response,
)
from kiln.gateway.limits_redis import limiter_from_url
from kiln.gateway.pool import BackendPool
from kiln.gateway.runner import STARTED_MARK

log = logging.getLogger("kiln.gateway")


def request_schema(model) -> dict:
    """OpenAPI for a route whose body the endpoint reads itself (to sort its errors)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def build_app(config: GatewayConfig, backend: TritonBackend | None = None) -> FastAPI:
    """Reads repositories, tokenizers and keys now, so a bad config (or no keys on a public
    address) fails at start-up."""
    pool = None
    if backend is None:  # one Triton, or several replicas: the pool routes and fails over between them
        urls = [config.triton_grpc, *config.triton_replicas]
        ids = config.triton_ids or [None] * len(urls)
        pool = BackendPool([TritonBackend(url, config.request_timeout_s, expected_id=server_id)
                            for url, server_id in zip(urls, ids, strict=True)])
    gateway = Gateway(config, limiter_from_url(config.redis_url, fail_open=not config.limits_fail_closed),
                      backend or pool)
    if pool is not None:
        pool.register_metrics(gateway.metrics.registry)  # per backend: up, circuit, outstanding, outcomes
    admin = Admin(gateway)

    @asynccontextmanager
    async def lifespan(app):
        print(f"{STARTED_MARK} pid {os.getpid()}", file=sys.stderr, flush=True)  # for GatewayGroup, any log level
        if not gateway.keys.enabled:
            log.warning("no API keys configured: the gateway on %s accepts every request, all sharing one "
                        "anonymous limit (set %s or --keys-file)", config.host, config.keys_env)
        if gateway.keys.has_admin and admin.runner is None:
            log.warning("admin keys are configured but the gateway knows no server folder of its Tritons: the admin "
                        "routes answer 501 (set server_dirs)")
        yield
        await gateway.backend.close()
        close = getattr(gateway.limiter, "close", None)
        if close is not None:
            close()

    app = FastAPI(title="kiln gateway", version="1", summary="OpenAI-compatible API in front of Triton",
                  lifespan=lifespan)
    app.state.gateway, app.state.admin = gateway, admin

    app.add_api_route("/v1/chat/completions", guarded(gateway.chat), methods=["POST"],
                      openapi_extra=request_schema(protocol.ChatCompletionRequest))
    app.add_api_route("/v1/completions", guarded(gateway.completions), methods=["POST"],
                      openapi_extra=request_schema(protocol.CompletionRequest))
    app.add_api_route("/v1/embeddings", guarded(gateway.embeddings), methods=["POST"],
                      openapi_extra=request_schema(protocol.EmbeddingRequest))
    app.add_api_route("/v1/models", guarded(gateway.list_models), methods=["GET"])
    app.add_api_route("/ready", guarded(gateway.ready), methods=["GET"])
    overrides = {"requestBody": {"required": False, "content": {"application/json": {"schema": {
        "type": "object", "description": "deployment-spec fields to change, e.g. {\"serve_precision\": \"fp16\"}"}}}}}
    reload_path, rollback_path, jobs_path, job_path = ADMIN_ROUTES
    app.add_api_route(reload_path, guarded(admin.reload), methods=["POST"], status_code=202, openapi_extra=overrides)
    app.add_api_route(rollback_path, guarded(admin.rollback), methods=["POST"], status_code=202)
    app.add_api_route(jobs_path, guarded(admin.list_jobs), methods=["GET"])
    app.add_api_route(job_path, guarded(admin.job), methods=["GET"])

    @app.get("/health")
    async def health() -> Response:
        return FastJSON({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        await gateway.refresh_cache_counts()
        return Response(gateway.metrics.render(), media_type=gateway.metrics.content_type)

    app.add_exception_handler(HTTPException, http_exception_response)
    app.add_middleware(Edge, metrics=gateway.metrics, max_body=config.max_body_bytes,
                       max_in_flight=config.max_in_flight, refusal=gateway.early_refusal)
    return app
