"""The assembled app: a bug anywhere behind a route is a generic 500, logged with the
request id; without keys it refuses to start on an address others can reach."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from kiln.gateway.app import build_app
from kiln.gateway.config import GatewayConfig, GatewayError


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


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "gateway.example"])
def test_without_keys_a_public_address_needs_allow_unauthenticated(make_repository, host):
    repo = make_repository("emb", "feature-extraction")
    with pytest.raises(GatewayError, match="--allow-unauthenticated"):
        build_app(GatewayConfig(host=host, repositories=[repo], keys_env="KILN_TEST_NO_KEYS"))
    build_app(GatewayConfig(host=host, repositories=[repo], keys_env="KILN_TEST_NO_KEYS", allow_unauthenticated=True))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_without_keys_loopback_serves(make_repository, host):
    build_app(GatewayConfig(host=host, repositories=[make_repository("emb", "feature-extraction")],
                            keys_env="KILN_TEST_NO_KEYS"))


def test_with_keys_a_public_address_serves(make_repository, monkeypatch):
    monkeypatch.setenv("KILN_TEST_APP_KEYS", "sk-a")
    build_app(GatewayConfig(host="0.0.0.0", repositories=[make_repository("emb", "feature-extraction")],
                            keys_env="KILN_TEST_APP_KEYS"))
