"""The gateway's pure parts: protocol validation and conversion, keys, rate limits, the
sorting of Triton errors, and the models read from kiln repositories."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from pydantic import ValidationError
from tritonclient.utils import InferenceServerException

from kiln.gateway import protocol as P
from kiln.gateway.auth import (
    KeyStore,
    Limits,
    Principal,
    RateLimited,
    RateLimiter,
    digest,
)
from kiln.gateway.backend import GEN_INPUTS, generation_inputs, map_error
from kiln.gateway.config import GatewayError, read_models
from kiln_core.card import RepositoryCard, TensorCard
from kiln_runtime.contract import GENERATION_INPUTS


def chat(**kw):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}
    return P.ChatCompletionRequest.model_validate_json(json.dumps(body))


def error_of(fn) -> P.APIError:
    try:
        fn()
    except ValidationError as err:
        return P.validation_error(err)
    except P.APIError as err:
        return err
    raise AssertionError("no error")


# ----------------------------------------------------------------------------- protocol
def test_chat_request_converts_to_generation_inputs():
    req = chat(max_completion_tokens=7, temperature=0.5, top_p=0.9, seed=3, stop="END", stream=True,
               presence_penalty=0.5, frequency_penalty=-0.5,
               messages=[{"role": "developer", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    v = req.triton_inputs()
    assert json.loads(v["messages"]) == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    assert v["max_tokens"] == 7 and v["random_seed"] == 3 and v["stop_words"] == ["END"] and v["stream"] is True
    assert v["presence_penalty"] == 0.5 and v["frequency_penalty"] == -0.5
    assert set(v) <= set(GEN_INPUTS)  # only tensors the generation model declares
    assert len(generation_inputs(v)) == len(v)


def test_openai_defaults_apply():
    v = chat().triton_inputs()
    assert v["temperature"] == 1.0 and v["top_p"] == 1.0 and "max_tokens" not in v and "random_seed" not in v
    assert P.CompletionRequest.model_validate({"model": "m", "prompt": "x"}).triton_inputs()["max_tokens"] == 16


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"n": 2}, "n"),
        ({"temperature": "0.5"}, "temperature"),  # wrong type is not coerced
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"presence_penalty": -2.1}, "presence_penalty"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logprobs": True}, "logprobs"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ({"mystery": 1}, "mystery"),
        ({"stream": "yes"}, "stream"),
    ],
)
def test_bad_chat_fields_name_their_param(kw, param):
    err = error_of(lambda: chat(**kw))
    assert err.status == 400 and err.param == param, (err.param, err.message)
    assert err.body()["error"]["type"] == "invalid_request_error"


def test_conflicting_token_budgets_and_missing_user_message():
    assert error_of(lambda: chat(max_tokens=5, max_completion_tokens=6).triton_inputs()).param == "max_completion_tokens"
    only_system = chat(messages=[{"role": "system", "content": "x"}])
    assert error_of(only_system.triton_inputs).param == "messages"


def test_embedding_inputs():
    E = P.EmbeddingRequest
    assert E.model_validate({"model": "m", "input": "a"}).texts() == ["a"]
    assert E.model_validate({"model": "m", "input": ["a", "b"]}).texts() == ["a", "b"]
    for bad in ([], [1, 2], [[1, 2]], [""], ["ok", "  "], ["x"] * 2049):
        assert error_of(lambda: E.model_validate({"model": "m", "input": bad}).texts()).param == "input"
    assert error_of(lambda: E.model_validate({"model": "m", "input": "a", "encoding_format": "int8"})).status == 400


def test_base64_embedding_is_little_endian_float32():
    v = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    decoded = np.frombuffer(base64.b64decode(P.encode_embedding(v, "base64")), dtype="<f4")
    assert decoded.tolist() == [0.5, -1.25, 3.0] and P.encode_embedding(v, "float").tolist() == [0.5, -1.25, 3.0]


def test_stream_chunks_carry_usage_field_only_when_asked():
    c = P.chat_chunk("id", "m", 1, {"content": "x"})
    assert "usage" not in c and c["object"] == "chat.completion.chunk"
    last = P.chat_chunk("id", "m", 1, None, use=P.usage(3, 2), with_usage_field=True)
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 5


# ----------------------------------------------------------------------------- keys and limits
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


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_requests_per_minute_bucket_refills():
    clock = Clock()
    rl, who = RateLimiter(clock), Principal("k", Limits(rpm=2))
    rl.admit(who)
    rl.admit(who)
    with pytest.raises(RateLimited) as err:
        rl.admit(who)
    assert 29 < err.value.retry_after <= 30  # one request refills every 30 s
    clock.t += 30
    rl.admit(who)


def test_tokens_per_minute_reserve_and_settle():
    clock = Clock()
    rl, who = RateLimiter(clock), Principal("k", Limits(tpm=600))
    rl.admit(who, 500)
    rl.settle(who, 500, 100)  # used less than reserved: refunded
    rl.admit(who, 450)
    rl.settle(who, 450, 900)  # used more: debt
    with pytest.raises(RateLimited) as err:
        rl.admit(who, 10)
    assert err.value.retry_after > 10
    clock.t += 60
    rl.admit(who, 10)
    with pytest.raises(RateLimited, match="Request too large"):
        rl.admit(who, 601)


def test_limits_are_per_key():
    rl = RateLimiter(Clock())
    a, b = Principal("a", Limits(rpm=1)), Principal("b", Limits(rpm=1))
    rl.admit(a)
    rl.admit(b)
    with pytest.raises(RateLimited):
        rl.admit(a)


# ----------------------------------------------------------------------------- Triton errors
@pytest.mark.parametrize(
    "msg, status, code, http",
    [
        ("Exceeds maximum queue size: 3 requests already wait; retry later", None, "queue_full", 429),
        ("[request id: r1] max_tokens: prompt has 10 tokens, so at most 5 more fit", None, "invalid_value", 400),
        ("messages: 600 tokens leave no room in the model's context", "StatusCode.INVALID_ARGUMENT", "invalid_value", 400),
        ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Connection refused",
         "StatusCode.UNAVAILABLE", "triton_unavailable", 503),
        ("Request for unknown model: 'm' is not found", "StatusCode.NOT_FOUND", "model_not_ready", 503),
        ("something broke inside", "StatusCode.INTERNAL", "internal_error", 500),
    ],
)
def test_triton_errors_are_sorted_by_who_must_act(msg, status, code, http):
    err = map_error(InferenceServerException(msg=msg, status=status), "m")
    assert (err.status, err.code) == (http, code)
    if http == 500:
        assert "broke" not in err.message  # no internals in the answer
    if http in (429, 503):
        assert err.retry_after


def test_triton_field_names_become_openai_names():
    err = map_error(InferenceServerException(msg="text_input: empty; send at least one token"), "m")
    assert err.param == "prompt" and "prompt" in err.message


def test_generation_inputs_follow_the_repository_table():
    assert {t.name for t in GENERATION_INPUTS} == set(GEN_INPUTS)
    with pytest.raises(KeyError):
        generation_inputs({"not_an_input": 1})


# ----------------------------------------------------------------------------- repositories
def _repo(tmp, name, task, **spec):
    repo = tmp / name
    repo.mkdir()
    generation = task == "text-generation"
    card = RepositoryCard(
        public_model=name, task=task, models=[name], runtime="python-ort", precision="fp32", variant_sha256="0" * 64,
        parity={}, max_input_tokens=128 if generation else 32, max_batch_size=4,
        inputs={}, outputs={} if generation else {"embedding": TensorCard(dtype="TYPE_FP32", dims=[8])}, spec=spec,
        tokenizer=None if generation else "tok/tokenizer.json",
    )
    if not generation:
        (repo / "tok").mkdir()
        (repo / "tok" / "tokenizer.json").write_text("{}")
    card.write(repo)
    return repo


def test_models_come_from_kiln_json(tmp_path):
    models = read_models([_repo(tmp_path, "emb", "feature-extraction"), _repo(tmp_path, "lm", "text-generation")])
    assert models["emb"].kind == "embedding" and models["emb"].max_input_tokens == 32 and models["emb"].dim == 8
    assert models["lm"].kind == "chat" and models["lm"].max_input_tokens == 128 and models["lm"].tokenizer_file is None
    with pytest.raises(GatewayError, match="not a kiln model repository"):
        read_models([tmp_path / "missing"])


class _BrokenBackend:
    """Triton that fails in a way nobody planned for (a bug in the path)."""

    async def embed(self, *a, **kw):
        raise RuntimeError("secret internal detail: /opt/model.onnx")

    async def close(self):
        pass


def test_a_bug_is_a_generic_500_logged_with_the_request_id(tmp_path, caplog):
    from starlette.testclient import TestClient

    from kiln.gateway.app import build_app
    from kiln.gateway.config import GatewayConfig

    repo = _repo(tmp_path, "emb", "feature-extraction")
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]")).save(str(repo / "tok" / "tokenizer.json"))
    app = build_app(GatewayConfig(repositories=[repo], keys_env="KILN_TEST_NO_KEYS"), backend=_BrokenBackend())
    with TestClient(app) as c, caplog.at_level("ERROR", logger="kiln.gateway"):
        r = c.post("/v1/embeddings", json={"model": "emb", "input": "hello"}, headers={"x-request-id": "bug-1"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "bug-1"
    err = r.json()["error"]
    assert err["type"] == "server_error" and "bug-1" in err["message"] and "secret" not in r.text
    assert any("bug-1" in rec.getMessage() and rec.exc_info for rec in caplog.records)
