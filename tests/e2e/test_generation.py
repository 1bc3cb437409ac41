"""Causal LM served by the real Triton: generate / generate_stream over HTTP, gRPC
streaming, continuous batching, cancellation, penalties, bad input. The tiny Llama of the
testkit (trained on a few sentences, so its greedy text varies and comparisons between
two paths compare something)."""

import json
import queue
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from kiln_testkit import export_and_serve, post, tiny_spec


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny_llama / "tokenizer.json"))


def distinct_tokens(tok, text: str) -> int:
    return len(set(tok.encode(text).ids))


@pytest.fixture(scope="module")
def tiny_chat(tiny_llama, tmp_path_factory):
    work = tmp_path_factory.mktemp("tinychat")
    spec = tiny_spec(tiny_llama, work, name="tinychat", task="text-generation", precisions=["fp32"],
                     serve_precision="fp32", max_length=512,
                     generation={"max_context": 512, "default_max_tokens": 32, "max_concurrent": 4,
                                 "parity_prompts": 2, "parity_new_tokens": 8, "parity_decode_steps": 4})
    with export_and_serve(spec, work / "srv") as stack:
        yield spec, stack.triton


def test_generate_answers_once_with_finish_reason_and_counts(tiny_chat):
    spec, server = tiny_chat
    status, out = post(server, spec.name, {"text_input": "Hello, how are you", "max_tokens": 12})
    assert status == 200, out
    assert isinstance(out["text_output"], str)
    assert out["finish_reason"] in ("stop", "length")
    assert out["prompt_tokens"] > 0 and 0 < out["completion_tokens"] <= 12
    if out["finish_reason"] == "length":
        assert out["completion_tokens"] == 12


def test_stream_equals_non_stream_for_greedy(tiny_chat, tok):
    spec, server = tiny_chat
    payload = {"messages": json.dumps([{"role": "user", "content": "Bonjour 🚀 我爱北京"}]), "max_tokens": 24}
    _, once = post(server, spec.name, payload)
    assert distinct_tokens(tok, once["text_output"]) >= 6, once  # not one token repeated
    status, events = post(server, spec.name, {**payload, "stream": True}, stream=True)
    assert status == 200 and len(events) > 1
    assert "".join(e.get("text_output", "") for e in events) == once["text_output"]
    assert events[-1]["finish_reason"] == once["finish_reason"]
    assert all("\ufffd" not in e.get("text_output", "") for e in events)


def test_batching_does_not_change_greedy_results(tiny_chat, tok):
    spec, server = tiny_chat
    prompts = [f"One two three {'four ' * i}" for i in range(8)]
    alone = [post(server, spec.name, {"text_input": p, "max_tokens": 16})[1]["text_output"] for p in prompts]
    assert all(distinct_tokens(tok, t) >= 4 for t in alone) and len(set(alone)) >= 3, alone
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: post(server, spec.name, {"text_input": p, "max_tokens": 16})[1]["text_output"], prompts))
    assert together == alone


def _penalised_reference(tiny_llama, prompt, n, frequency, presence):
    """Greedy by full recomputation in PyTorch, the OpenAI penalties applied by hand:
    logits[t] -= frequency * count[t] + presence * (count[t] > 0), over generated tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids, counts = list(prompt), {}
    for _ in range(n):
        with torch.no_grad():
            x = model(torch.tensor([ids])).logits[0, -1].numpy().copy()
        for t, c in counts.items():
            x[t] -= np.float32(frequency) * np.float32(c) + np.float32(presence)
        nxt = int(np.argmax(x))
        counts[nxt] = counts.get(nxt, 0) + 1
        ids.append(nxt)
        if nxt == model.config.eos_token_id:
            break
    return ids[len(prompt):]


def test_penalties_change_greedy_text_as_the_openai_formula_says(tiny_chat, tiny_llama, tok):
    spec, server = tiny_chat
    prompt = "One two"
    _, plain = post(server, spec.name, {"text_input": prompt, "max_tokens": 24})
    _, penalised = post(server, spec.name, {"text_input": prompt, "max_tokens": 24, "frequency_penalty": 1.5,
                                            "presence_penalty": 0.5})
    plain_ids = tok.encode(plain["text_output"]).ids
    assert len(set(plain_ids)) < len(plain_ids), plain  # greedy repeats itself here: something to penalise
    assert penalised["text_output"] != plain["text_output"]
    prompt_ids = tok.encode(prompt).ids
    assert penalised["prompt_tokens"] == len(prompt_ids)
    # the served text is the PyTorch greedy loop with OpenAI's formula applied by hand (whether a
    # given token then repeats less depends on the trained weights, which differ between CPUs)
    expected = _penalised_reference(tiny_llama, prompt_ids, 24, 1.5, 0.5)
    assert penalised["text_output"] == tok.decode(expected).rstrip("\ufffd")
    assert _penalised_reference(tiny_llama, prompt_ids, 24, 0.0, 0.0) != expected  # the penalties changed it


def _grpc_inputs(prompt, max_tokens, stream=True):
    def t(name, arr, dtype):
        i = grpcclient.InferInput(name, list(arr.shape), dtype)
        i.set_data_from_numpy(arr)
        return i

    return [
        t("text_input", np.array([prompt.encode()], dtype=object), "BYTES"),
        t("max_tokens", np.array([max_tokens], dtype=np.int32), "INT32"),
        t("stream", np.array([stream]), "BOOL"),
    ]


def test_grpc_streaming_and_cancellation_frees_the_slot(tiny_chat):
    spec, server = tiny_chat
    got = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    # long enough that the cancel always lands mid-generation, even on a loaded machine
    client.async_stream_infer(spec.name, _grpc_inputs("One two three", 480))
    chunks = [got.get(timeout=60) for _ in range(3)]
    assert all(err is None for _, err in chunks)
    assert all(r.as_numpy("text_output") is not None for r, _ in chunks)
    client.stop_stream(cancel_requests=True)  # the client goes away mid-generation
    deadline = time.time() + 30
    log = ""
    while time.time() < deadline and "cancelled" not in log:
        time.sleep(0.2)
        log = server.log_file.read_text(errors="replace")
    assert "cancelled" in log, "the server did not stop generating for a cancelled request"
    status, out = post(server, spec.name, {"text_input": "still serving", "max_tokens": 4})
    assert status == 200 and out["completion_tokens"] <= 4


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"messages": "[]"}, "messages"),
        ({"messages": json.dumps([{"role": "wizard", "content": "hi"}])}, "wizard"),
        ({"messages": "{not json"}, "messages"),
        ({"text_input": ""}, "text_input"),
        ({"text_input": "word " * 800}, "context"),
        ({"text_input": "hi", "max_tokens": 10_000}, "max_tokens"),
        ({"text_input": "hi", "temperature": -1.0}, "temperature"),
        ({"text_input": "hi", "temperature": float("nan")}, "temperature"),
        ({"text_input": "hi", "top_p": 0.0}, "top_p"),
        ({}, "text_input"),
    ],
)
def test_bad_input_is_a_clear_4xx_and_serving_continues(tiny_chat, payload, field):
    spec, server = tiny_chat
    body = json.dumps(payload, allow_nan=True)
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/{spec.name}/generate", body.encode(),
                                 {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert 400 <= err.value.code < 500
    assert field in err.value.read().decode()
    assert post(server, spec.name, {"text_input": "ok", "max_tokens": 2})[0] == 200


def test_invalid_utf8_prompt_is_rejected(tiny_chat):
    spec, server = tiny_chat
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inputs = _grpc_inputs("x", 4, stream=False)
    inputs[0].set_data_from_numpy(np.array([b"\xff\xfe broken"], dtype=object))
    got = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    client.async_stream_infer(spec.name, inputs)
    _, error = got.get(timeout=60)
    client.stop_stream()
    assert error is not None and "UTF-8" in str(error)
    assert post(server, spec.name, {"text_input": "ok", "max_tokens": 2})[0] == 200
