"""The gateway's admin route with real servers, as `kiln serve` runs them: the tiny encoder served
in fp32 behind a gateway with a keys file. A key without `admin: true` is refused (403); an
admin key's POST .../reload {"serve_precision": "fp16"} answers 202 at once, its job runs
`kiln reload` to success, after which the served answer is the fp16 one and /v1/models keeps
its ids; POST .../rollback brings the fp32 answer back bit for bit."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np
import openai
import pytest

from kiln.gateway.auth import digest
from kiln.gateway.config import GatewayConfig
from kiln.stack import GatewayOptions, Stack
from kiln_core.card import RepositoryCard
from kiln_testkit import tiny_spec, use_export

ADMIN, USER = "sk-kiln-e2e-admin", "sk-kiln-e2e-user"
PROBE = "the probe sentence"
JOB_TIMEOUT_S = 180.0  # a reload of the tiny encoder took ~40 s on 2 shared cores


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: dict


@dataclass
class Admin:
    """Plain HTTP to the gateway's admin routes, with the admin key unless told another."""

    url: str

    def call(self, method: str, path: str, body: dict | None = None, key: str = ADMIN) -> Answer:
        req = urllib.request.Request(self.url + path, method=method, headers={"authorization": f"Bearer {key}"},
                                     data=None if body is None else json.dumps(body).encode())
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return Answer(r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read()))
        except urllib.error.HTTPError as err:
            return Answer(err.code, {k.lower(): v for k, v in err.headers.items()}, json.loads(err.read()))

    def post(self, path: str, body: dict | None = None, key: str = ADMIN) -> Answer:
        return self.call("POST", path, body, key)

    def get(self, path: str) -> Answer:
        return self.call("GET", path)


@pytest.fixture(scope="module")
def live(tiny_bert, tiny_bert_fp16_export, tmp_path_factory):
    """(spec, stack, admin client): the fp32 version served, the gateway a child process
    with an admin key and an ordinary one."""
    from model_repository.writer import write_repository

    work = tmp_path_factory.mktemp("admin")
    spec = tiny_spec(tiny_bert, work, name="adm", precisions=["fp32", "fp16"])
    use_export(tiny_bert_fp16_export, spec)  # the session's export (fp32, fp16), reused
    use_export(tiny_bert_fp16_export, spec, version=2)  # what the reload to fp16 reuses (test_reload.py exports)
    repo = write_repository(spec)
    keys = work / "keys.yaml"
    keys.write_text(f"- {{name: ops, sha256: {digest(ADMIN)}, admin: true}}\n- {{name: app, sha256: {digest(USER)}}}\n")
    options = GatewayOptions(GatewayConfig(port=0, keys_file=keys), keys="")
    with Stack(repo, work / "srv", gateway=options) as stack:
        yield spec, stack, Admin(stack.gateway_url)


def probe(c: openai.OpenAI) -> bytes:
    return np.array(c.embeddings.create(model="adm", input=PROBE).data[0].embedding, dtype=np.float32).tobytes()


def finished(http: Admin, answer: Answer) -> dict:
    """The job a 202 started, polled until it ends (JOB_TIMEOUT_S at most)."""
    assert answer.status == 202, answer.body
    job = answer.body
    assert job["status"] == "running" and answer.headers["location"] == f"/v1/admin/jobs/{job['id']}"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while job["status"] == "running":
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job['id']} ({job['action']}) still running after {JOB_TIMEOUT_S:.0f}s; its "
                                 "log ends:\n" + "\n".join(job["log"]))
        time.sleep(1.0)
        r = http.get(answer.headers["location"])
        assert r.status == 200, r.body
        job = r.body
    assert job["status"] == "succeeded" and job["exit_code"] == 0, \
        f"job {job['id']} {job['status']} (exit {job['exit_code']}); its log ends:\n" + "\n".join(job["log"])
    return job


def test_an_admin_key_reloads_to_fp16_through_the_gateway_and_rolls_back(live):
    spec, stack, http = live
    c = openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key=USER, max_retries=0, timeout=60)
    ids = [m.id for m in c.models.list().data]
    before = probe(c)

    refused = http.post("/v1/admin/models/adm/reload", {"serve_precision": "fp16"}, key=USER)
    assert refused.status == 403 and "`admin: true`" in refused.body["error"]["message"]
    assert http.get("/v1/admin/jobs").body["data"] == []  # nothing was started

    started = time.monotonic()
    job = finished(http, http.post("/v1/admin/models/adm/reload", {"serve_precision": "fp16"}))
    seconds = time.monotonic() - started
    after = probe(c)
    assert after != before  # the fp16 version answers now
    np.testing.assert_allclose(np.frombuffer(after, np.float32), np.frombuffer(before, np.float32), atol=1e-2)
    card = RepositoryCard.read(spec.repository_dir)
    assert card.version == 2 and card.precision == "fp16" and card.previous[0]["version"] == 1
    assert [m.id for m in c.models.list().data] == ids
    assert any("version 1 -> 2 (fp16)" in line for line in job["log"]), job["log"]

    back = finished(http, http.post("/v1/admin/models/adm/rollback"))
    assert probe(c) == before and RepositoryCard.read(spec.repository_dir).precision == "fp32"
    listed = http.get("/v1/admin/jobs").body["data"]
    assert [(j["id"], j["action"], j["status"]) for j in listed] == [(back["id"], "rollback", "succeeded"),
                                                                      (job["id"], "reload", "succeeded")]
    print(f"\nadmin reload fp32 -> fp16: {seconds:.1f}s from POST to its job's end")
