"""The admin routes against a fake Triton and a fake `kiln` child: who may use them (401, 403,
never anonymously), what is refused before anything starts (404, 400, 409, 501), and a
reload's job from 202 to its outcome, with the spec and server folders the child got."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from starlette.testclient import TestClient
from tokenizers import Tokenizer, models, pre_tokenizers

from kiln.gateway.admin import merge_overrides
from kiln.gateway.app import build_app
from kiln.gateway.auth import digest
from kiln.gateway.config import GatewayConfig
from kiln.gateway.jobs import SPEC_FILE
from kiln.reload import reload_refusal
from kiln_core.card import RepositoryCard, TensorCard

ADMIN, USER, ENV = "sk-admin-test", "sk-user-test", "sk-env-test"
KEYS_VARIABLE = "KILN_TEST_ADMIN_KEYS"


def served_repository(workdir: Path, name: str, task: str = "feature-extraction", serving: str | None = "ensemble",
                      previous: list | None = None) -> Path:
    """A repository where `kiln repo` writes it (<workdir>/<name>/model_repository); its card's
    spec names the staged export's workdir, as a card does after a reload."""
    repo = workdir / name / "model_repository"
    (repo / "tok").mkdir(parents=True)
    generation = task == "text-generation"
    spec = {"name": name, "source": {"kind": "folder", "path": "/checkpoints/tiny"}, "task": task,
            "precisions": ["fp32", "fp16"], "serve_precision": "fp32", "max_length": 32,
            "workdir": str(workdir / name / "versions" / "2")}
    if not generation:
        spec["serving"] = serving
        tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.save(str(repo / "tok" / "tokenizer.json"))
    RepositoryCard(public_model=name, task=task, serving=None if generation else serving, models=[name],
                   runtime="python-ort", precision="fp32", variant_sha256="0" * 64, parity={},
                   max_input_tokens=32, max_batch_size=4, inputs={},
                   outputs={} if generation else {"embedding": TensorCard(dtype="TYPE_FP32", dims=[8])},
                   spec=spec, tokenizer=None if generation else "tok/tokenizer.json",
                   previous=previous or []).write(repo)
    return repo


@pytest.fixture
def admin_gateway(tmp_path, triton, monkeypatch, fake_kiln):
    """``make(keys_file=True, env_keys=ENV, server_dirs=..., code=0)``: a TestClient on repositories "enc"
    (an ensemble encoder with an earlier version), "fused" and "lm", whose admin jobs run the
    fake kiln (it waits for ``release``, then exits ``code``). Returns (client, release file)."""
    work = tmp_path / "build"
    repos = [served_repository(work, "enc", previous=[{"version": 1}]), served_repository(work, "fused", serving="fused"),
             served_repository(work, "lm", task="text-generation", serving=None)]
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"- {{name: ops, sha256: {digest(ADMIN)}, admin: true}}\n- {{name: app, key: {USER}}}\n")
    release = tmp_path / "release"
    clients = []

    def make(keys_file: bool = True, env_keys: str = ENV, server_dirs: list[Path] | None = None,
             code: int = 0) -> TestClient:
        monkeypatch.setenv(KEYS_VARIABLE, env_keys)
        dirs = [tmp_path / "srv", tmp_path / "srv" / "replica-1"] if server_dirs is None else server_dirs
        app = build_app(GatewayConfig(repositories=repos, keys_env=KEYS_VARIABLE, server_dirs=dirs,
                                      keys_file=keys if keys_file else None), backend=triton)
        if app.state.admin.runner is not None:
            app.state.admin.runner.program = fake_kiln(release, code)
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client

    yield make, release
    release.touch()  # let any job still waiting end
    for c in clients:
        c.__exit__(None, None, None)


def as_key(key: str | None) -> dict:
    return {"authorization": f"Bearer {key}"} if key else {}


def until_done(client: TestClient, job_id: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/admin/jobs/{job_id}", headers=as_key(ADMIN)).json()
        if job["status"] != "running":
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still running after {timeout:.0f}s")


def error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_admin_routes_need_a_valid_key_then_an_admin_one(admin_gateway):
    make, release = admin_gateway
    c = make()
    for path, method in (("/v1/admin/models/enc/reload", "post"), ("/v1/admin/models/enc/rollback", "post"),
                         ("/v1/admin/jobs", "get"), ("/v1/admin/jobs/job_" + "0" * 20, "get")):
        assert error(getattr(c, method)(path), 401)["code"] == "invalid_api_key"
        assert error(getattr(c, method)(path, headers=as_key("sk-wrong")), 401)["code"] == "invalid_api_key"
        for key, name in ((USER, "app"), (ENV, "env-0")):  # a keys-file entry without admin, and an env key
            err = error(getattr(c, method)(path, headers=as_key(key)), 403)
            assert err["type"] == "permission_error" and err["code"] == "admin_key_required"
            assert f"{name!r} may not use admin routes" in err["message"] and "`admin: true`" in err["message"]
    assert c.get("/v1/admin/jobs", headers=as_key(ADMIN)).json() == {"object": "list", "data": []}
    assert c.get("/v1/models", headers=as_key(ADMIN)).status_code == 200  # an admin key is an API key too


def test_without_keys_nobody_may_use_the_admin_routes(admin_gateway):
    make, _ = admin_gateway
    c = make(keys_file=False, env_keys="")  # anonymous: every request is allowed to the models
    assert c.get("/v1/models").status_code == 200
    err = error(c.post("/v1/admin/models/enc/reload"), 403)
    assert "runs without keys" in err["message"] and "--keys-file" in err["message"]


def test_unknown_models_and_jobs_are_404(admin_gateway):
    make, _ = admin_gateway
    c = make()
    err = error(c.post("/v1/admin/models/nope/reload", headers=as_key(ADMIN)), 404)
    assert err["code"] == "model_not_found" and "enc" in err["message"]
    for job in ("job_" + "0" * 20, "nonsense", "..keys.yaml"):
        assert error(c.get(f"/v1/admin/jobs/{job}", headers=as_key(ADMIN)), 404)["code"] == "job_not_found"
    assert error(c.get("/v1/admin/jobs/..%2F..%2Fkeys.yaml", headers=as_key(ADMIN)), 404)  # no such route


@pytest.mark.parametrize("body, param, says", [
    ({"serve_precision": "int8"}, None, "serve_precision 'int8' is not among precisions"),
    ({"serve_precision": "fp64"}, None, "serve_precision"),
    ({"batching": {"max_batch_size": 0}}, None, "batching.max_batch_size"),
    ({"no_such_field": 1}, None, "no_such_field"),
    ({"source": {"kind": "package"}}, None, "source.package.package"),  # replaced whole: no stale folder path
    ({"name": "other"}, "name", "keeps the model's name"),
    ({"workdir": "/tmp"}, "workdir", "cannot be changed"),
    ({"serving": "fused"}, "serving", "keeps the models the repository has"),
    ({"task": "text-classification"}, "task", "keeps the model's task"),
])
def test_overrides_that_do_not_make_a_valid_spec_are_400_before_anything_starts(admin_gateway, tmp_path, body, param,
                                                                                 says):
    make, _ = admin_gateway
    c = make()
    err = error(c.post("/v1/admin/models/enc/reload", json=body, headers=as_key(ADMIN)), 400)
    assert says in err["message"] and err["param"] == param, err
    assert c.get("/v1/admin/jobs", headers=as_key(ADMIN)).json()["data"] == []


@pytest.mark.parametrize("raw, says", [(b"{not json", "could not parse"), (b"[1, 2]", "JSON object"),
                                       (b'"fp16"', "JSON object")])
def test_a_body_that_is_not_a_json_object_is_400(admin_gateway, raw, says):
    make, _ = admin_gateway
    err = error(make().post("/v1/admin/models/enc/reload", content=raw, headers=as_key(ADMIN)), 400)
    assert says in err["message"] and err["code"] == "invalid_json"


def test_the_route_refuses_what_kiln_reload_refuses_in_its_words_and_nothing_else(admin_gateway):
    """What kiln.reload cannot do is a 400 before anything starts (in its words); what it can do
    (ensemble and fused encoders, generation models) is started."""
    make, release = admin_gateway
    release.touch()
    c = make()
    assert reload_refusal("feature-extraction", "fused") is None and reload_refusal("text-generation", None) is None
    assert "serves ensemble and fused encoders" in reload_refusal("feature-extraction", "other")  # not vacuous
    for model, task, serving in (("fused", "feature-extraction", "fused"), ("lm", "text-generation", None),
                                 ("enc", "feature-extraction", "ensemble")):
        why = reload_refusal(task, serving)
        r = c.post(f"/v1/admin/models/{model}/reload", headers=as_key(ADMIN))
        if why is None:
            assert r.status_code == 202, r.text
            assert until_done(c, r.json()["id"])["status"] == "succeeded"
        else:
            for answer in (r, c.post(f"/v1/admin/models/{model}/rollback", headers=as_key(ADMIN))):
                err = error(answer, 400)
                assert err["code"] == "model_not_reloadable" and why in err["message"], (model, err)


def test_a_gateway_that_knows_no_server_folder_answers_501(admin_gateway):
    make, _ = admin_gateway
    c = make(server_dirs=[])
    assert error(c.post("/v1/admin/models/enc/reload", headers=as_key(ADMIN)), 501)["code"] == "admin_unavailable"
    assert error(c.get("/v1/admin/jobs", headers=as_key(ADMIN)), 501)["code"] == "admin_unavailable"
    assert error(c.post("/v1/admin/models/enc/reload", headers=as_key(USER)), 403)  # who first


def test_a_rollback_takes_no_overrides_and_needs_an_earlier_version(admin_gateway, tmp_path):
    make, _ = admin_gateway
    c = make()
    assert "takes no overrides" in error(c.post("/v1/admin/models/enc/rollback", json={"serve_precision": "fp16"},
                                                headers=as_key(ADMIN)), 400)["message"]
    card_path = tmp_path / "build" / "enc" / "model_repository"
    RepositoryCard.read(card_path).model_copy(update={"previous": []}).write(card_path)
    err = error(c.post("/v1/admin/models/enc/rollback", headers=as_key(ADMIN)), 409)
    assert err["code"] == "no_previous_version"


def test_a_reload_is_a_job_running_the_cli_with_the_cards_spec_and_every_server_folder(admin_gateway, tmp_path):
    make, release = admin_gateway
    c = make()
    r = c.post("/v1/admin/models/enc/reload", json={"serve_precision": "fp16"}, headers=as_key(ADMIN))
    assert r.status_code == 202, r.text
    job = r.json()
    assert {k: job[k] for k in ("object", "model", "action", "status", "requested_by", "exit_code", "finished_at")} \
        == {"object": "admin.job", "model": "enc", "action": "reload", "status": "running", "requested_by": "ops",
            "exit_code": None, "finished_at": None}
    assert job["overrides"] == {"serve_precision": "fp16"} and r.headers["location"] == f"/v1/admin/jobs/{job['id']}"
    # one job per model at a time, whichever action; another model is not held up by it
    for action in ("reload", "rollback"):
        err = error(c.post(f"/v1/admin/models/enc/{action}", headers=as_key(ADMIN)), 409)
        assert err["code"] == "job_running" and job["id"] in err["message"]
    assert c.get(f"/v1/admin/jobs/{job['id']}", headers=as_key(ADMIN)).json()["status"] == "running"
    release.touch()
    done = until_done(c, job["id"])
    assert done["status"] == "succeeded" and done["exit_code"] == 0 and done["finished_at"] >= done["started_at"]
    srv = (tmp_path / "srv").resolve()
    assert any(line.startswith("fake kiln reload ") and line.endswith(
        f"{SPEC_FILE} --server-dir {srv} --server-dir {srv / 'replica-1'}") for line in done["log"]), done["log"]
    spec = yaml.safe_load((tmp_path / "srv" / "admin-jobs" / job["id"] / SPEC_FILE).read_text())
    # the card's spec with the override, its workdir the served repository's (not the staged export's)
    assert spec["serve_precision"] == "fp16" and spec["name"] == "enc" and spec["max_length"] == 32
    assert Path(spec["workdir"]) == (tmp_path / "build").resolve()
    listed = c.get("/v1/admin/jobs", headers=as_key(ADMIN)).json()["data"]
    assert [(j["id"], j["status"]) for j in listed] == [(job["id"], "succeeded")] and "log" not in listed[0]
    back = c.post("/v1/admin/models/enc/rollback", headers=as_key(ADMIN))  # free again once it ended
    assert back.status_code == 202 and back.json()["action"] == "rollback"
    assert until_done(c, back.json()["id"])["status"] == "succeeded"

    metrics = c.get("/metrics").text
    assert 'kiln_gateway_admin_actions_total{action="reload",outcome="started"} 1.0' in metrics
    assert 'kiln_gateway_admin_actions_total{action="reload",outcome="conflict"} 1.0' in metrics
    assert 'kiln_gateway_admin_actions_total{action="rollback",outcome="started"} 1.0' in metrics
    assert 'kiln_gateway_requests_total{route="/v1/admin/jobs/{id}",status="200"}' in metrics
    assert 'kiln_gateway_requests_total{route="/v1/admin/models/{model}/reload",status="202"} 1.0' in metrics


def test_a_failed_reload_is_a_failed_job_with_the_childs_exit_code_and_last_lines(admin_gateway):
    make, release = admin_gateway
    release.touch()
    c = make(code=1)
    job = c.post("/v1/admin/models/enc/reload", headers=as_key(ADMIN)).json()
    done = until_done(c, job["id"])
    assert done["status"] == "failed" and done["exit_code"] == 1 and done["log"][-1] == "fake kiln exits 1"
    assert job["overrides"] == {}


def test_overrides_merge_mappings_field_by_field_and_replace_the_source_whole():
    base = {"source": {"kind": "folder", "path": "/a"}, "batching": {"max_batch_size": 8, "max_queue_delay_us": 1},
            "name": "x"}
    got = merge_overrides(base, {"batching": {"max_queue_delay_us": 500}, "source": {"kind": "package", "package": "p"}})
    assert got == {"source": {"kind": "package", "package": "p"}, "name": "x",
                   "batching": {"max_batch_size": 8, "max_queue_delay_us": 500}}
    assert base["batching"]["max_queue_delay_us"] == 1  # the card's own spec is left as it was
