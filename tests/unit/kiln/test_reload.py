"""kiln.reload's pure parts: which versions stay on disk, what a rollback restores, how the
smoke request is judged, where the running Tritons are found, and what it refuses to reload.
The switch itself runs against a real Triton in tests/e2e/test_reload.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kiln.reload import (
    KEEP_PREVIOUS,
    ReloadError,
    Switch,
    running_tritons,
    served_entry,
    smoke_figures,
    to_keep,
)
from kiln.server import CONNECTION_FILE
from kiln_core.card import RepositoryCard


def card(task="feature-extraction", serving="ensemble", **kw) -> RepositoryCard:
    fields = dict(public_model="enc", task=task, serving=serving, models=["enc_tokenizer", "enc"], runtime="python-ort",
                  precision="fp32", variant_sha256="a" * 64, parity={"passed": True}, max_input_tokens=8,
                  max_batch_size=4, inputs={}, outputs={}, spec={})
    return RepositoryCard(**{**fields, **kw})


def test_the_serving_version_and_the_two_before_it_stay_on_disk():
    previous = [{"version": 4}, {"version": 2}, {"version": 1}]
    assert KEEP_PREVIOUS == 2 and to_keep(5, previous) == {5, 4, 2}
    assert to_keep(1, []) == {1}


def test_a_rollback_restores_what_the_card_said_of_the_earlier_version():
    c = card(version=3, tokenizer="enc_tokenizer/3/tokenizer/tokenizer.json", response_cache_mb=64)
    entry = served_entry(c)
    assert entry["version"] == 3 and entry["tokenizer"].startswith("enc_tokenizer/3/")
    assert entry["variant_sha256"] == "a" * 64 and entry["response_cache_mb"] == 64
    back = card(version=4, precision="fp16").model_copy(update=entry)
    assert back.version == 3 and back.precision == "fp32" and back.tokenizer == c.tokenizer


def test_the_smoke_request_is_judged_on_every_float_output_and_labels_must_be_equal():
    want = {"embedding": np.ones((2, 4), np.float32)}
    assert smoke_figures({"embedding": want["embedding"] + 1e-6}, want)["max_abs_diff"] == pytest.approx(1e-6, abs=1e-7)
    labels = {"label": np.array([b"pos", b"neg"], dtype=object), "scores": np.zeros((2, 2), np.float32)}
    swapped = {"label": np.array([b"neg", b"pos"], dtype=object), "scores": np.zeros((2, 2), np.float32)}
    assert smoke_figures(labels, labels) == {"max_abs_diff": 0.0, "texts": 2.0}
    assert smoke_figures(swapped, labels)["max_abs_diff"] == float("inf")


def test_running_tritons_are_found_with_their_replicas_from_connection_files(tmp_path):
    with pytest.raises(ReloadError, match="no running `kiln serve`"):
        running_tritons([tmp_path / "a", tmp_path / "b"])
    (tmp_path / "b" / "replica-1").mkdir(parents=True)
    (tmp_path / "b" / CONNECTION_FILE).write_text(json.dumps({"grpc": "127.0.0.1:1", "admin_key": "k0"}))
    (tmp_path / "b" / "replica-1" / CONNECTION_FILE).write_text(json.dumps({"grpc": "127.0.0.1:2", "admin_key": "k1"}))
    found = running_tritons([tmp_path / "a", tmp_path / "b"])
    assert [(t.grpc_url, t.admin_key) for t in found] == [("127.0.0.1:1", "k0"), ("127.0.0.1:2", "k1")]
    assert found[0].headers == {"triton-grpc-protocol-kiln-admin": "k0"}


def test_with_every_each_folder_named_must_have_a_triton_and_each_is_switched_once(tmp_path):
    for folder, port in (("a", 1), ("a/replica-1", 2), ("b", 3)):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / CONNECTION_FILE).write_text(json.dumps({"grpc": f"127.0.0.1:{port}", "admin_key": "k"}))
    named = [tmp_path / "a", tmp_path / "a" / "replica-1", tmp_path / "b"]  # what a gateway passes: every backend's
    assert [t.grpc_url for t in running_tritons(named, every=True)] == ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
    assert [t.grpc_url for t in running_tritons(named)] == ["127.0.0.1:1", "127.0.0.1:2"]  # the first folder's
    (tmp_path / "a" / "replica-1" / CONNECTION_FILE).unlink()  # a replica being restarted
    with pytest.raises(ReloadError, match="no Triton runs in .*replica-1"):
        running_tritons(named, every=True)


@pytest.mark.parametrize("task, serving, why", [("text-generation", None, "OneModelSwitch"),
                                                ("feature-extraction", "fused", "OneModelSwitch")])
def test_what_cannot_be_reloaded_yet_is_refused_before_anything_changes(tmp_path, task, serving, why):
    card(task=task, serving=serving).write(tmp_path)
    with pytest.raises(ReloadError, match=why):
        Switch(tmp_path, [])


@pytest.mark.parametrize("verb", ["reload", "rollback"])
def test_the_commands_refuse_clearly_when_no_kiln_serve_runs_for_the_spec(tmp_path, verb):
    from typer.testing import CliRunner

    from kiln.cli import app

    result = CliRunner().invoke(app, [verb, "minilm", "--workdir", str(tmp_path)])
    assert result.exit_code == 1
    assert f"{verb} refused" in result.output and "no running `kiln serve`" in result.output
    assert not (tmp_path / "minilm" / "versions").exists()  # nothing was exported for a reload that cannot run


def test_the_commands_refuse_when_a_server_folder_named_has_no_triton(tmp_path):
    from typer.testing import CliRunner

    from kiln.cli import app

    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / CONNECTION_FILE).write_text(json.dumps({"grpc": "127.0.0.1:1", "admin_key": "k"}))
    result = CliRunner().invoke(app, ["reload", "minilm", "--workdir", str(tmp_path), "--server-dir",
                                      str(tmp_path / "srv"), "--server-dir", str(tmp_path / "gone")])
    assert result.exit_code == 1 and "reload refused" in result.output and "no Triton runs in" in result.output
    assert not (tmp_path / "minilm" / "versions").exists()
