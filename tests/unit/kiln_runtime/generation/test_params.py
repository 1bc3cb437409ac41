"""Request checks (kiln_runtime/generation/params.py): a bad sampling parameter or chat
message is the client's error, and the message names the field to fix."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kiln_runtime.errors import InputError
from kiln_runtime.generation.params import SamplingParams, parse_messages


@pytest.mark.parametrize(
    "kw, prompt_tokens, message",
    [
        ({"max_tokens": 0}, 10, "max_tokens: must be an integer >= 1"),
        ({"max_tokens": True}, 10, "max_tokens: must be an integer"),
        ({"max_tokens": 2.5}, 10, "max_tokens: must be an integer"),
        ({"max_tokens": 100}, 60, "max_tokens: prompt has 60 tokens, so at most 68 more fit the context of 128"),
        ({}, 128, "prompt: 128 tokens leave no room in the model's context of 128"),
        ({}, 300, "prompt: 300 tokens"),
        ({}, 0, "prompt: empty"),
        ({"temperature": float("nan")}, 10, "temperature: must be a finite number >= 0"),
        ({"temperature": -0.5}, 10, "temperature: must be a finite number >= 0"),
        ({"temperature": "hot"}, 10, "temperature: must be"),
        ({"top_p": 0.0}, 10, r"top_p: must be a number in \(0, 1\]"),
        ({"top_p": 1.5}, 10, r"top_p: must be a number in \(0, 1\]"),
        ({"top_k": -1}, 10, "top_k: must be an integer >= 0"),
        ({"top_k": 2.5}, 10, "top_k: must be an integer >= 0"),
        ({"repetition_penalty": 0}, 10, "repetition_penalty: must be a finite number > 0"),
        ({"repetition_penalty": float("inf")}, 10, "repetition_penalty: must be a finite number > 0"),
        ({"presence_penalty": 2.5}, 10, r"presence_penalty: must be a finite number in \[-2, 2\]"),
        ({"presence_penalty": -3}, 10, r"presence_penalty: must be a finite number in \[-2, 2\]"),
        ({"presence_penalty": "x"}, 10, r"presence_penalty: must be a finite number in \[-2, 2\]"),
        ({"presence_penalty": float("nan")}, 10, r"presence_penalty: must be a finite number in \[-2, 2\]"),
        ({"frequency_penalty": 2.5}, 10, r"frequency_penalty: must be a finite number in \[-2, 2\]"),
        ({"frequency_penalty": -3}, 10, r"frequency_penalty: must be a finite number in \[-2, 2\]"),
        ({"frequency_penalty": "x"}, 10, r"frequency_penalty: must be a finite number in \[-2, 2\]"),
        ({"frequency_penalty": float("nan")}, 10, r"frequency_penalty: must be a finite number in \[-2, 2\]"),
        ({"seed": -1}, 10, "seed: must be an integer in"),
        ({"stop": [""]}, 10, r"stop\[0\]: must be a non-empty string"),
        ({"stop": ["a", 3]}, 10, r"stop\[1\]: must be a non-empty string"),
        ({"stop": ["a"] * 5}, 10, "stop: at most 4 strings"),
        ({"stop": "END"}, 10, "stop: must be a list of strings"),
        ({"stop": ["x" * 257]}, 10, r"stop\[0\]: at most 256 characters"),
    ],
)
def test_sampling_params_errors_name_their_field(kw, prompt_tokens, message):
    with pytest.raises(InputError, match=message):
        SamplingParams(**kw).validate(prompt_tokens, 128)


def test_sampling_params_defaults_fit_the_context():
    p = SamplingParams().validate(100, 128, default_max_tokens=256)
    assert p.max_tokens == 28  # the default is cut to what fits
    assert SamplingParams().validate(10, 128, default_max_tokens=16).max_tokens == 16
    p = SamplingParams(max_tokens=np.int64(5), temperature=np.float32(0.5), stop=("a",)).validate(10, 128)
    assert (type(p.max_tokens), type(p.temperature), p.stop) == (int, float, ["a"])
    p = SamplingParams(presence_penalty=np.float32(-2), frequency_penalty=2).validate(10, 128)  # the bounds are in
    assert (p.presence_penalty, p.frequency_penalty) == (-2.0, 2.0)
    assert (type(p.presence_penalty), type(p.frequency_penalty)) == (float, float)
    with pytest.raises(InputError, match="messages: 130 tokens"):
        SamplingParams().validate(130, 128, prompt_field="messages")


def test_sampling_params_from_dict():
    p = SamplingParams.from_dict({"max_tokens": 8, "temperature": 0, "stop": "END", "seed": None,
                                     "frequency_penalty": 0.5, "presence_penalty": None})
    assert (p.max_tokens, p.temperature, p.stop, p.seed) == (8, 0, ["END"], None)
    assert (p.frequency_penalty, p.presence_penalty) == (0.5, 0.0)
    with pytest.raises(InputError, match="parameters: unknown 'logit_bias', 'n'"):
        SamplingParams.from_dict({"n": 2, "logit_bias": {}})


@pytest.mark.parametrize(
    "raw, message",
    [
        ("not json", "messages: not valid JSON"),
        ('{"role": "user"}', "messages: must be a JSON list"),
        ("[]", "messages: the list is empty"),
        ('["hi"]', r"messages\[0\]: must be an object"),
        ('[{"role": "tool", "content": "x"}]', r"messages\[0\].role: 'tool' is not allowed \(allowed: system, user, assistant\)"),
        ('[{"role": "user", "content": "a"}, {"content": "b"}]', r"messages\[1\].role: None is not allowed"),
        ('[{"role": "user", "content": ["x"]}]', r"messages\[0\].content: must be a string"),
        (b"\xff[]", "messages: not valid UTF-8"),
    ],
)
def test_parse_messages_rejects(raw, message):
    with pytest.raises(InputError, match=message):
        parse_messages(raw)


def test_parse_messages_keeps_role_and_content():
    raw = json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "我爱 🚀", "name": "x"}])
    assert parse_messages(raw.encode()) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "我爱 🚀"},
    ]
