"""The OpenAI API surface: request validation (every bad field names its param), the
conversion to generation inputs, and the response shapes."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from pydantic import ValidationError

from kiln.gateway import protocol
from kiln.gateway.backend import GEN_INPUTS, generation_inputs
from kiln_runtime.contract import GENERATION_INPUTS


def chat(**kw):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}
    return protocol.ChatCompletionRequest.model_validate_json(json.dumps(body))


def error_of(fn) -> protocol.APIError:
    try:
        fn()
    except ValidationError as err:
        return protocol.validation_error(err)
    except protocol.APIError as err:
        return err
    raise AssertionError("no error")


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
    assert protocol.CompletionRequest.model_validate({"model": "m", "prompt": "x"}).triton_inputs()["max_tokens"] == 16


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
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]},
         "messages[0].content[0].type"),
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
    request = protocol.EmbeddingRequest
    assert request.model_validate({"model": "m", "input": "a"}).texts() == ["a"]
    assert request.model_validate({"model": "m", "input": ["a", "b"]}).texts() == ["a", "b"]
    for bad in ([], [1, 2], [[1, 2]], [""], ["ok", "  "], ["x"] * 2049):
        assert error_of(lambda: request.model_validate({"model": "m", "input": bad}).texts()).param == "input"
    assert error_of(lambda: request.model_validate({"model": "m", "input": "a", "encoding_format": "int8"})).status == 400


def test_base64_embedding_is_little_endian_float32():
    v = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    decoded = np.frombuffer(base64.b64decode(protocol.encode_embedding(v, "base64")), dtype="<f4")
    assert decoded.tolist() == [0.5, -1.25, 3.0] and protocol.encode_embedding(v, "float").tolist() == [0.5, -1.25, 3.0]


def test_stream_chunks_carry_usage_field_only_when_asked():
    c = protocol.chat_chunk("id", "m", 1, {"content": "x"})
    assert "usage" not in c and c["object"] == "chat.completion.chunk"
    last = protocol.chat_chunk("id", "m", 1, None, use=protocol.usage(3, 2), with_usage_field=True)
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 5


def raw_chat(fields: str):
    """A chat body with raw JSON ``fields`` spliced in (NaN and Infinity are not JSON, so no json.dumps)."""
    return protocol.ChatCompletionRequest.model_validate_json(
        '{"model": "m", "messages": [{"role": "user", "content": "hi"}], ' + fields + "}")


@pytest.mark.parametrize(
    "fields, param",
    [
        ('"max_tokens": 4294967301', "max_tokens"),  # 2**32 + 5: would wrap to 5 in int32
        ('"max_tokens": 9223372036854775808', "max_tokens"),  # 2**63
        ('"max_tokens": 18446744073709551616', "max_tokens"),  # 2**64
        ('"max_completion_tokens": 2147483648', "max_completion_tokens"),
        ('"top_k": 4294967296', "top_k"),  # 2**32: would wrap to 0 (off)
        ('"seed": 18446744073709551616', "seed"),  # past uint64
        ('"seed": 9223372036854775808', "seed"),  # uint64, but past what the model accepts
        ('"seed": -1', "seed"),
        ('"temperature": NaN', "temperature"),
        ('"top_p": Infinity', "top_p"),
        ('"repetition_penalty": Infinity', "repetition_penalty"),
        ('"repetition_penalty": 1e39', "repetition_penalty"),  # past float32: would arrive as inf
        ('"presence_penalty": -Infinity', "presence_penalty"),
        ('"frequency_penalty": 1e999', "frequency_penalty"),
    ],
)
def test_numbers_beyond_their_tensor_or_the_model_name_their_field(fields, param):
    err = error_of(lambda: raw_chat(fields))
    assert err.status == 400 and err.param == param, (err.param, err.message)


def test_the_largest_accepted_numbers_reach_triton_unchanged():
    """Bounds come from the contract's dtypes: what the protocol admits, the tensor holds exactly."""
    values = chat(max_tokens=2**31 - 1, top_k=2**31 - 1, seed=2**63 - 1, repetition_penalty=3e38).triton_inputs()
    dtypes = {t.name: t.dtype for t in GENERATION_INPUTS}
    for name in ("max_tokens", "top_k", "random_seed", "repetition_penalty"):
        held = np.array([values[name]], dtype=dtypes[name])[0]
        assert np.isfinite(held) and held.item() == pytest.approx(values[name], rel=1e-6), name


@pytest.mark.parametrize("message", [{"role": "user"}, {"role": "user", "content": None},
                                     {"role": "system", "content": None}])
def test_a_message_without_content_names_it(message):
    req = chat(messages=[{"role": "user", "content": "first"}, message])
    err = error_of(req.triton_inputs)
    assert err.status == 400 and err.param == "messages[1].content", err.message
    assert err.message.startswith("messages[1].content")


def test_an_assistant_turn_may_be_empty():
    req = chat(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
                         {"role": "user", "content": "again"}])
    assert json.loads(req.triton_inputs()["messages"])[1] == {"role": "assistant", "content": ""}


def test_union_members_are_left_out_of_the_param():
    err = error_of(lambda: protocol.EmbeddingRequest.model_validate_json('{"model": "m", "input": 5}'))
    assert err.param == "input", err.param
