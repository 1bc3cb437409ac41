"""API keys: kept as digests only, and a keys file that would turn authentication off fails at start."""

from __future__ import annotations

import pytest

from kiln.gateway.auth import KeyStore, digest
from kiln.gateway.config import GatewayError, Limits


def test_keys_are_hashed_and_checked(tmp_path):
    f = tmp_path / "keys.yaml"
    f.write_text(f"- name: a\n  sha256: {digest('sk-a')}\n  rpm: 5\n- name: b\n  key: sk-b\n- sk-c\n")
    store = KeyStore.load(f, ["sk-env"], Limits(tpm=100))
    assert store.check("sk-a").name == "a" and store.check("sk-a").limits == Limits(rpm=5, tpm=100)
    assert store.check("sk-b").name == "b" and store.check("sk-c") is not None and store.check("sk-env").name == "env-0"
    assert store.check("sk-x") is None and store.check(None) is None and store.check("") is None
    assert all(len(d) == 32 for d, _ in store._entries)  # digests only, never the keys


def test_no_keys_means_open_and_bad_key_files_fail_at_start(tmp_path):
    assert KeyStore.load(None, [], Limits()).check(None).name == "anonymous"
    for text in ("- {name: x}\n", "- {key: a, sha256: b}\n", "- {sha256: nothex}\n", "key: 1\n", "", "keys: []\n"):
        (tmp_path / "k.yaml").write_text(text)
        with pytest.raises(GatewayError):
            KeyStore.load(tmp_path / "k.yaml", [], Limits())


def test_without_keys_every_client_shares_the_anonymous_limits(make_gateway):
    client = make_gateway(limits={"rpm": 2})
    assert client.get("/v1/models").status_code == 200
    assert client.get("/v1/models", headers={"authorization": "Bearer anything"}).status_code == 200
    r = client.get("/v1/models", headers={"authorization": "Bearer something-else"})  # another client, same bucket
    assert r.status_code == 429 and "'anonymous'" in r.json()["error"]["message"] and r.headers["retry-after"]
