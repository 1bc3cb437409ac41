"""API keys: kept as digests only, a keys file that would turn authentication off fails at start,
and only a keys-file entry with `admin: true` is an admin."""

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


def test_only_keys_file_entries_with_admin_true_are_admins(tmp_path):
    f = tmp_path / "keys.yaml"
    f.write_text(f"- {{name: ops, sha256: {digest('sk-ops')}, admin: true}}\n- {{name: app, key: sk-app, admin: false}}\n"
                 "- {name: old, key: sk-old}\n- sk-bare\n")
    store = KeyStore.load(f, ["sk-env"], Limits())
    assert store.check("sk-ops").admin and store.has_admin
    assert not any(store.check(k).admin for k in ("sk-app", "sk-old", "sk-bare", "sk-env"))  # env keys never are
    assert not KeyStore.load(None, ["sk-env"], Limits()).has_admin
    assert not KeyStore.load(None, [], Limits()).check(None).admin  # nor the anonymous principal


@pytest.mark.parametrize("value", ['"yes"', "1", '"true"', "[true]"])
def test_an_admin_flag_that_is_not_a_boolean_fails_naming_its_entry(tmp_path, value):
    f = tmp_path / "keys.yaml"
    f.write_text(f"- {{name: app, key: sk-app}}\n- {{name: ops, key: sk-ops, admin: {value}}}\n")
    with pytest.raises(GatewayError, match=r"entry 1 \('ops'\): admin must be true or false"):
        KeyStore.load(f, [], Limits())
