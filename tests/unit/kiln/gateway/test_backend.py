"""Triton's side: its errors sorted by who must act, and generation inputs that follow the
repository's tensor table."""

from __future__ import annotations

import pytest
from tritonclient.utils import InferenceServerException

from kiln.gateway.backend import GEN_INPUTS, generation_inputs, map_error
from kiln_runtime.contract import GENERATION_INPUTS


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
