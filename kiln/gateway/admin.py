"""The admin routes: a new version of a served encoder (`kiln reload`) or back to the one
before (`kiln rollback`), started through the gateway and followed as a job.

    POST /v1/admin/models/{model}/reload     optional JSON body: spec fields to change -> 202, the job
    POST /v1/admin/models/{model}/rollback   no body                                   -> 202, the job
    GET  /v1/admin/jobs                      the jobs, newest first
    GET  /v1/admin/jobs/{id}                 one job: status, exit code, times, the end of its log

A reload is minutes of export and gating, so the route answers 202 at once and runs the CLI
as a child process (``jobs.py``) with the spec the repository card records, the overrides laid
over it, and ``--server-dir`` for each Triton the gateway fronts. Checks, in the order a client
must fix things and before anything starts: a valid key (401), an admin key (403: a keys-file
entry with ``admin: true``; keys from the environment never are, and a gateway without keys
has no admin), the gateway knows its Tritons' server folders (501), the model (404), what
`kiln reload` can do and a valid spec (400), no job running for the model (409). Admin
requests are not charged to the key's rate limits.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import anyio
import orjson
import yaml
from starlette.requests import Request
from starlette.responses import Response

from kiln.gateway.auth import Principal
from kiln.gateway.config import ServedModel
from kiln.gateway.endpoints import Gateway
from kiln.gateway.http import FastJSON
from kiln.gateway.jobs import JobBusy, JobRunner
from kiln.gateway.protocol import APIError, bad_request
from kiln.reload import reload_refusal
from kiln_core.card import CardError, RepositoryCard
from kiln_core.spec import DeploymentSpec, SpecError, parse_spec

log = logging.getLogger("kiln.gateway")

FIXED = {
    "name": "a reload keeps the model's name (its id in /v1/models); to serve another name, start `kiln serve` "
            "with that spec",
    "task": "a reload keeps the model's task (its tensors and its API route); serve another task with `kiln serve`",
    "workdir": "a reload writes the next version beside the served repository, which stays where it is",
    "serving": "a reload keeps the models the repository has (ensemble or fused); serve the other layout with "
               "`kiln serve`",
}
WHOLE = ("source",)  # replaced, not merged: another kind of source has other fields


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The card's spec with ``overrides`` laid over it: mappings merged key by key (so
    ``{"batching": {"max_queue_delay_us": 500}}`` changes one field), ``source`` replaced whole."""

    def merge(a: dict, b: dict) -> dict:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    return {**merge(base, {k: v for k, v in overrides.items() if k not in WHOLE}),
            **{k: v for k, v in overrides.items() if k in WHOLE}}


def spec_for_reload(card: RepositoryCard, repository: Path, overrides: dict[str, Any]) -> DeploymentSpec:
    """The spec `kiln reload` gets for this served repository: the card's, with ``overrides``,
    its workdir the one the repository lives in (after a reload the card names the staged
    export's), or a 400 saying what to change."""
    name = card.public_model
    why = reload_refusal(card.task, card.serving)
    if why is not None:
        raise APIError(400, f"The model {name!r} cannot be reloaded: {why}.", None, "model_not_reloadable")
    for field, reason in FIXED.items():
        if field in overrides:
            raise bad_request(f"{field}: cannot be changed by a reload: {reason}.", field)
    repo = Path(repository).resolve()
    data = {**merge_overrides(card.spec, overrides), "workdir": str(repo.parent.parent)}
    try:
        spec = parse_spec(data, origin=f"model {name!r}'s spec with these overrides")
    except SpecError as err:
        raise bad_request(str(err), None, "invalid_spec") from None
    if spec.repository_dir.resolve() != repo:
        raise APIError(400, f"The model {name!r} is served from {repo.name}/, not where its spec writes its "
                            f"repository ({spec.name}/model_repository/ under a workdir), so `kiln reload` cannot "
                            "find it; reload it with `kiln reload` and its own spec.", None, "model_not_reloadable")
    why = reload_refusal(spec.task.value, spec.serving)
    if why is not None:
        raise bad_request(f"These overrides ask for what a reload cannot do: {why}.", "serving", "model_not_reloadable")
    return spec


class Admin:
    """The admin endpoints, beside the model API's (``endpoints.Gateway``: keys, models, metrics)."""

    def __init__(self, gateway: Gateway, runner: JobRunner | None = None):
        self.gateway = gateway
        config = gateway.config
        folder = config.admin_jobs_dir
        self.runner = runner or (JobRunner(folder, drop_env=(config.keys_env,)) if folder is not None else None)

    # --- checks
    def authorize(self, request: Request) -> Principal:
        who = self.gateway.principal(request)  # 401 for a missing or wrong key
        if who.admin:
            return who
        if not self.gateway.keys.enabled:
            msg = ("Admin routes need an API key with `admin: true` in the gateway's keys file; this gateway runs "
                   "without keys, so nobody may use them. Start it with --keys-file naming an admin key, or run "
                   "`kiln reload` on the server.")
        else:
            msg = (f"The key {who.name!r} may not use admin routes; use a key whose entry in the keys file has "
                   "`admin: true` (keys from the environment never do).")
        raise APIError(403, msg, None, "admin_key_required")

    def jobs(self) -> JobRunner:
        if self.runner is None:
            raise APIError(501, "This gateway does not know the server folders of its Tritons (`server_dirs`), so it "
                                "cannot run `kiln reload`: `kiln serve` sets them; for `kiln gateway`, name them in "
                                "its --config file.", None, "admin_unavailable")
        return self.runner

    def served(self, name: str) -> ServedModel:
        self.gateway.watch_cards()
        m = self.gateway.models.get(name)
        if m is None:
            known = ", ".join(sorted(self.gateway.models)) or "none"
            raise APIError(404, f"The model {name!r} does not exist. Models served here: {known}.", None,
                           "model_not_found")
        return m

    async def overrides(self, request: Request) -> dict[str, Any]:
        raw = await self.gateway.raw_body(request)
        if not raw.strip():
            return {}
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as err:
            raise bad_request(f"We could not parse the JSON body of your request ({err}); send a JSON object of the "
                              "spec fields to change.", None, "invalid_json") from None
        if not isinstance(data, dict):
            raise bad_request('The request body must be a JSON object of the spec fields to change, e.g. '
                              '{"serve_precision": "fp16"}.', None, "invalid_json")
        return data

    @staticmethod
    def card(m: ServedModel) -> RepositoryCard:
        try:
            return RepositoryCard.read(m.repository)
        except CardError:  # being rewritten by a switch this very moment
            raise APIError(503, f"The repository card of {m.name!r} cannot be read just now; retry shortly.", None,
                           "card_unavailable", retry_after=1.0) from None

    # --- endpoints
    async def reload(self, request: Request) -> Response:
        return await self._counted(request, "reload")

    async def rollback(self, request: Request) -> Response:
        return await self._counted(request, "rollback")

    async def _counted(self, request: Request, action: str) -> Response:
        counter = self.gateway.metrics.admin_actions
        try:
            response = await self._start(request, action)
        except APIError as err:
            outcome = "forbidden" if err.status in (401, 403) else "conflict" if err.status == 409 else "refused"
            counter.labels(action, outcome).inc()
            raise
        counter.labels(action, "started").inc()
        return response

    async def _start(self, request: Request, action: str) -> Response:
        who = self.authorize(request)
        runner = self.jobs()
        m = self.served(request.path_params["model"])
        overrides = await self.overrides(request)
        card = self.card(m)
        if action == "rollback" and overrides:
            raise bad_request("A rollback takes no overrides: it returns to the version served before the last "
                              "reload. Send no body (or {}).", None)
        spec = spec_for_reload(card, m.repository, overrides)
        if action == "rollback" and not card.previous:
            raise APIError(409, f"The model {m.name!r} has no earlier version on disk to roll back to.", None,
                           "no_previous_version")
        args = [a for d in self.gateway.config.server_dirs for a in ("--server-dir", str(Path(d).resolve()))]
        spec_yaml = yaml.safe_dump(json.loads(spec.model_dump_json()), sort_keys=False)
        start = functools.partial(runner.start, m.name, action, spec_yaml, args, who.name, overrides)
        try:
            job = await anyio.to_thread.run_sync(start)  # a lock across processes, files, a fork: off the loop
        except JobBusy as err:
            raise APIError(409, f"A {err.job.action} of {m.name!r} is running (job {err.job.id}); wait until it ends: "
                                f"GET /v1/admin/jobs/{err.job.id}.", None, "job_running") from None
        log.info("admin: %s of %s started as %s by key %r (overrides %s)", action, m.name, job.id, who.name,
                 overrides or "none")
        return FastJSON(job.body(), status_code=202, headers={"location": f"/v1/admin/jobs/{job.id}"})

    async def job(self, request: Request) -> Response:
        self.authorize(request)
        runner = self.jobs()
        job_id = request.path_params["id"]
        job = await anyio.to_thread.run_sync(runner.get, job_id)
        if job is None:
            raise APIError(404, f"There is no admin job {job_id!r}; GET /v1/admin/jobs lists them.", None,
                           "job_not_found")
        return FastJSON(job.body())

    async def list_jobs(self, request: Request) -> Response:
        self.authorize(request)
        jobs = await anyio.to_thread.run_sync(self.jobs().jobs)
        return FastJSON({"object": "list", "data": [j.body(with_log=False) for j in jobs]})
