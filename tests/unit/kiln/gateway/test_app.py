"""The assembled app: a bug anywhere behind a route is a generic 500, logged with the request id."""

from __future__ import annotations

from starlette.testclient import TestClient

from kiln.gateway.app import build_app
from kiln.gateway.config import GatewayConfig


class _BrokenBackend:
    """Triton that fails in a way nobody planned for (a bug in the path)."""

    async def embed(self, *a, **kw):
        raise RuntimeError("secret internal detail: /opt/model.onnx")

    async def close(self):
        pass


def test_a_bug_is_a_generic_500_logged_with_the_request_id(make_repository, caplog):
    repo = make_repository("emb", "feature-extraction")
    app = build_app(GatewayConfig(repositories=[repo], keys_env="KILN_TEST_NO_KEYS"), backend=_BrokenBackend())
    with TestClient(app) as c, caplog.at_level("ERROR", logger="kiln.gateway"):
        r = c.post("/v1/embeddings", json={"model": "emb", "input": "hello"}, headers={"x-request-id": "bug-1"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "bug-1"
    err = r.json()["error"]
    assert err["type"] == "server_error" and "bug-1" in err["message"] and "secret" not in r.text
    assert any("bug-1" in rec.getMessage() and rec.exc_info for rec in caplog.records)
