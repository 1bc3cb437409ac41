"""The OpenAI-compatible gateway end to end: the official `openai` client against the real
gateway (a child process) in front of the real Triton serving the packaged MiniLM
(embeddings) and a tiny random Llama (chat), all on free ports."""

from __future__ import annotations

import base64
import http.client
import json
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient

from kiln_testkit import tiny_spec

KEY, LIMITED_KEY, TPM_KEY = "sk-test-main", "sk-test-two-per-minute", "sk-test-small-tpm"


@pytest.fixture(scope="module")
def stack(minilm_export, tiny_llama, tmp_path_factory):
    """Triton with both repositories, and the gateway with three keys in front."""
    from kiln.gateway.auth import digest
    from kiln.gateway.config import GatewayConfig
    from kiln.stack import GatewayOptions
    from kiln_testkit import serve
    from model_repository.writer import write_repository

    work = tmp_path_factory.mktemp("gateway")
    minilm, manifest = minilm_export
    emb_repo = write_repository(minilm, manifest, minilm.root / "repo-gateway")
    chat = tiny_spec(tiny_llama, work, name="tinychat", task="text-generation", precisions=["fp32"],
                     serve_precision="fp32", max_length=512,
                     generation={"max_context": 512, "default_max_tokens": 16, "max_concurrent": 2, "max_queue": 1,
                                 "parity_prompts": 2, "parity_new_tokens": 8, "parity_decode_steps": 4})
    from export.pipeline import run_export

    run_export(chat)
    chat_repo = write_repository(chat)
    keys = work / "keys.yaml"
    keys.write_text(
        f"- name: main\n  sha256: {digest(KEY)}\n"  # stored hashed
        f"- name: limited\n  key: {LIMITED_KEY}\n  rpm: 2\n"
        f"- name: small\n  key: {TPM_KEY}\n  tpm: 40\n"
    )
    gateway = GatewayOptions(GatewayConfig(port=0, keys_file=keys, max_body_bytes=64 * 1024), keys="",
                             log_file=work / "gateway.log")
    with serve([emb_repo, chat_repo], work / "triton", gateway) as stack:
        yield {"gw": stack.gateway, "server": stack.triton, "minilm": minilm, "chat": chat}


def client(stack, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack["gw"].url + "/v1", api_key=key, max_retries=0, timeout=120)


def raw(stack, method, path, body=None, headers=None):
    """(status, headers, parsed body) over a plain HTTP connection."""
    url = stack["gw"].url.removeprefix("http://")
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body, h)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = data.decode(errors="replace")
    return r.status, {k.lower(): v for k, v in r.getheaders()}, parsed


# ----------------------------------------------------------------------------- happy paths
def test_models_lists_both(stack):
    ids = {m.id: m for m in client(stack).models.list()}
    assert set(ids) == {"minilm", "tinychat"}


def test_embeddings_match_triton_and_both_encodings(stack):
    texts = ["A man is playing a guitar.", "我喜欢弹吉他。", "Share prices dropped 🚀"]
    c = client(stack)
    got = c.embeddings.create(model="minilm", input=texts)  # the client asks for base64 and decodes
    floats = c.embeddings.create(model="minilm", input=texts, encoding_format="float")
    a = np.array([d.embedding for d in got.data], dtype=np.float32)
    b = np.array([d.embedding for d in floats.data], dtype=np.float32)

    direct = grpcclient.InferenceServerClient(stack["server"].grpc_url)
    arr = np.array([t.encode() for t in texts], dtype=object).reshape(-1, 1)
    inp = grpcclient.InferInput("text", [len(texts), 1], "BYTES")
    inp.set_data_from_numpy(arr)
    want = direct.infer("minilm", [inp]).as_numpy("embedding")
    assert a.shape == want.shape == (3, 384)
    np.testing.assert_allclose(a, want, atol=1e-6)
    np.testing.assert_allclose(b, want, atol=1e-6)
    assert got.usage.prompt_tokens == got.usage.total_tokens > len(texts)
    # a single string is one input; the base64 form is float32 little-endian. (Compared with
    # Triton on the same single input: int8 activation scales are per batch, so a text's
    # int8 embedding alone differs slightly from the same text inside a batch.)
    status, _, body = raw(stack, "POST", "/v1/embeddings",
                          json.dumps({"model": "minilm", "input": texts[0], "encoding_format": "base64"}))
    one = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    inp.set_shape([1, 1])
    inp.set_data_from_numpy(arr[:1])
    assert status == 200 and np.allclose(one, direct.infer("minilm", [inp]).as_numpy("embedding")[0], atol=1e-6)


def test_more_inputs_than_the_batch_size_are_split_and_kept_in_order(stack):
    texts = [f"sentence number {i}" for i in range(150)]  # minilm batches at most 64
    got = client(stack).embeddings.create(model="minilm", input=texts, encoding_format="float")
    assert [d.index for d in got.data] == list(range(150))
    single = client(stack).embeddings.create(model="minilm", input=texts[137], encoding_format="float")
    # same text alone: int8 scales are per batch, so equal to the int8 gate's tolerance, not bitwise
    assert float(np.dot(got.data[137].embedding, single.data[0].embedding)) > 0.99


def test_chat_streamed_equals_not_streamed_with_usage(stack):
    c = client(stack)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Bonjour 🚀 我爱北京"}]
    once = c.chat.completions.create(model="tinychat", messages=msgs, max_tokens=12, temperature=0)
    assert once.object == "chat.completion" and once.choices[0].message.role == "assistant"
    assert once.choices[0].finish_reason in ("stop", "length")
    assert once.usage.completion_tokens <= 12 and once.usage.prompt_tokens > 0
    assert once.usage.total_tokens == once.usage.prompt_tokens + once.usage.completion_tokens

    chunks = list(c.chat.completions.create(model="tinychat", messages=msgs, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == once.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [once.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == once.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])
    assert len({ch.id for ch in chunks}) == 1


def test_sampling_fields_are_honoured(stack):
    c = client(stack)
    kw = dict(model="tinychat", messages=[{"role": "user", "content": "One two three"}], max_completion_tokens=10)
    seeded = [c.chat.completions.create(**kw, temperature=1.0, top_p=0.9, seed=7).choices[0].message.content
              for _ in range(2)]
    assert seeded[0] == seeded[1]  # a seed reproduces
    greedy = c.chat.completions.create(**kw, temperature=0).choices[0].message.content
    penalised = c.chat.completions.create(**kw, temperature=0, frequency_penalty=2.0, presence_penalty=2.0)
    words = greedy.split()
    assert words.count(max(words, key=words.count)) >= 3, greedy  # something to penalise
    assert penalised.choices[0].message.content != greedy  # penalties reach the sampler


def test_completions_with_stop(stack):
    c = client(stack)
    out = c.completions.create(model="tinychat", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert out.object == "text_completion" and out.usage.completion_tokens <= 8
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tinychat", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True) if ch.choices)
    assert streamed == out.choices[0].text


# ----------------------------------------------------------------------------- errors
def test_missing_and_wrong_keys_are_401(stack):
    with pytest.raises(openai.AuthenticationError) as err:
        client(stack, key="sk-wrong").models.list()
    assert err.value.body["code"] == "invalid_api_key"
    status, headers, body = raw(stack, "GET", "/v1/models", headers={"Authorization": ""})
    assert status == 401 and "didn't provide" in body["error"]["message"] and "x-request-id" in headers


@pytest.mark.parametrize(
    "path, payload, param",
    [
        ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, "model"),
        ("/v1/chat/completions", {"model": "tinychat", "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
        ("/v1/chat/completions", {"model": "tinychat", "messages": [{"role": "user", "content": "hi"}],
                                  "temperature": "hot"}, "temperature"),
        ("/v1/chat/completions", {"model": "tinychat", "messages": [{"role": "user", "content": "hi"}],
                                  "presence_penalty": 3}, "presence_penalty"),
        ("/v1/chat/completions", {"model": "tinychat", "messages": [{"role": "user", "content": "hi"}],
                                  "tools": [{"type": "function"}]}, "tools"),
        ("/v1/chat/completions", {"model": "tinychat", "messages": []}, "messages"),
        ("/v1/chat/completions", {"model": "tinychat", "messages": [{"role": "user", "content": "word " * 700}]},
         "messages"),
        ("/v1/chat/completions", {"model": "tinychat", "messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 5000}, "max_tokens"),
        ("/v1/chat/completions", {"model": "minilm", "messages": [{"role": "user", "content": "hi"}]}, "model"),
        ("/v1/completions", {"model": "tinychat", "prompt": "hi", "echo": True}, "echo"),
        ("/v1/embeddings", {"model": "minilm", "input": "word " * 400}, "input"),
        ("/v1/embeddings", {"model": "minilm", "input": []}, "input"),
        ("/v1/embeddings", {"model": "minilm", "input": "hi", "encoding_format": "int8"}, "encoding_format"),
        ("/v1/embeddings", {"model": "minilm", "input": "hi", "bogus": 1}, "bogus"),
    ],
)
def test_bad_requests_are_400_naming_the_field(stack, path, payload, param):
    status, headers, body = raw(stack, "POST", path, json.dumps(payload))
    assert status == 400, body
    err = body["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert err["message"] and "Traceback" not in err["message"]
    assert headers["x-request-id"]


def test_openai_client_sees_bad_request(stack):
    with pytest.raises(openai.BadRequestError) as err:
        client(stack).chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert "nope" in err.value.body["message"]


def test_rate_limit_is_429_with_retry_after(stack):
    c = client(stack, LIMITED_KEY)
    c.models.list()
    c.models.list()
    with pytest.raises(openai.RateLimitError) as err:
        c.models.list()
    assert err.value.body["code"] == "rate_limit_exceeded"
    assert int(err.value.response.headers["retry-after"]) >= 1
    assert client(stack).models.list()  # other keys are not affected


def test_a_request_larger_than_the_token_limit_is_400_and_a_spent_budget_429(stack):
    """400 for what can never fit (clients retry a 429 forever); 429 once the minute's budget is spent."""
    c = client(stack, TPM_KEY)
    with pytest.raises(openai.BadRequestError) as err:
        c.embeddings.create(model="minilm", input=["word " * 60])  # ~62 tokens > 40 per minute
    body = err.value.body
    assert body["code"] == "request_too_large" and body["param"] == "input" and "tokens per minute" in body["message"]
    c.embeddings.create(model="minilm", input=["word " * 25])  # ~27 tokens: fits
    with pytest.raises(openai.RateLimitError) as err:
        c.embeddings.create(model="minilm", input=["word " * 25])  # 27 more do not, this minute
    assert "tokens per minute" in err.value.body["message"]


def test_a_full_generation_model_is_refused_at_once_and_the_rest_are_answered(stack):
    """tinychat runs 2 sequences with 1 waiting: a burst of 12 long generations, released at
    once, overflows it (each runs ~480 steps, so none is done before the burst is in). The
    gateway holds the same 3 places and refuses the rest itself (503 overloaded), so Triton
    never has to (its own queue-full refusal, a 429, stays the fallback)."""
    import threading

    c = client(stack)
    burst = 12
    start = threading.Barrier(burst)

    def one(i):
        start.wait()
        try:
            c.completions.create(model="tinychat", prompt=f"One two {i}", max_tokens=480, temperature=0)
            return 200, None
        except openai.RateLimitError as err:
            return 429, err
        except openai.APIStatusError as err:
            return err.status_code, err

    with ThreadPoolExecutor(burst) as pool:
        results = list(pool.map(one, range(burst)))
    codes = [s for s, _ in results]
    assert set(codes) <= {200, 429, 503}, codes
    assert codes.count(200) >= 2 and codes.count(200) + codes.count(429) + codes.count(503) == burst, codes
    refused = [e for s, e in results if s in (429, 503)]
    assert len(refused) >= burst - 3, codes  # at most running + waiting were admitted
    assert all(e.body["code"] in ("overloaded", "queue_full") and e.response.headers["retry-after"]
               and e.response.headers["retry-after-ms"] for e in refused)
    _, _, metrics = raw(stack, "GET", "/metrics")
    assert re.search(r'kiln_gateway_shed_total\{model="tinychat"\} [1-9]', metrics)


def test_disconnect_mid_stream_cancels_the_triton_request(stack):
    url = stack["gw"].url.removeprefix("http://")
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"model": "tinychat", "prompt": "One two three", "max_tokens": 480, "temperature": 0,
                       "stream": True})
    conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    seen = 0
    while seen < 3:
        if r.readline().startswith(b"data:"):
            seen += 1
    conn.sock.close()  # the client goes away mid-generation
    conn.close()
    log_file = stack["server"].log_file
    deadline, log = time.time() + 30, ""
    while time.time() < deadline and "cancelled by the client" not in log:
        time.sleep(0.2)
        log = log_file.read_text(errors="replace")
    assert "cancelled by the client" in log, "Triton kept generating for a client that left"
    _, _, metrics = raw(stack, "GET", "/metrics")
    assert re.search(r'kiln_gateway_cancelled_generations_total\{model="tinychat"\} [1-9]', metrics)
    assert client(stack).completions.create(model="tinychat", prompt="still here", max_tokens=2).choices


def _fuzz_bodies() -> list[bytes]:
    rnd = random.Random(5)
    good = json.dumps({"model": "minilm", "input": "hello"}).encode()
    bodies = [b"", b" ", b"null", b"0", b"\"text\"", b"[]", b"{", b"}", b"{'model': 'minilm'}", b"\xff\xfe\x00",
              b"{\"model\": \"minilm\", \"input\": NaN}", b"{\"model\": \"minilm\", \"input\": \"\\ud800\"}",
              b"[" * 5000 + b"]" * 5000, b"{\"model\": [], \"input\": {}}", b"{\"model\": \"minilm\", \"input\": 1e999}",
              b"{\"model\": \"minilm\", \"input\": [[1, 2], \"x\"]}", b"{\"model\": \"minilm\"" + b", \"a\": 1" * 2000 + b"}",
              "{\"model\": \"minilm\", \"input\": \"caf\u00e9\"".encode("latin-1")]
    for _ in range(30):  # truncations and byte flips of a valid body
        cut = good[: rnd.randrange(1, len(good))]
        flipped = bytearray(good)
        flipped[rnd.randrange(len(good))] = rnd.randrange(256)
        bodies += [cut, bytes(flipped)]
    bodies += [bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 200))) for _ in range(20)]
    return bodies


def test_malformed_bodies_are_4xx_and_the_server_stays_healthy(stack):
    for path in ("/v1/embeddings", "/v1/chat/completions", "/v1/completions"):
        for body in _fuzz_bodies():
            status, headers, parsed = raw(stack, "POST", path, body)
            valid_flip = status == 200 and path == "/v1/embeddings"  # a flip inside the text can leave it valid
            assert 400 <= status < 500 or valid_flip, (path, body[:80], status, parsed)
            if status >= 400:
                assert set(parsed["error"]) == {"message", "type", "param", "code"}
    assert raw(stack, "GET", "/health")[0] == 200
    assert client(stack).embeddings.create(model="minilm", input="still alive").data


def test_oversized_body_is_413(stack):
    status, _, body = raw(stack, "POST", "/v1/embeddings", json.dumps({"model": "minilm", "input": "x" * 100_000}))
    assert status == 413 and "bytes" in body["error"]["message"]


def test_request_id_is_echoed_and_metrics_count_routes(stack):
    status, headers, _ = raw(stack, "GET", "/v1/models", headers={"X-Request-Id": "trace-42"})
    assert status == 200 and headers["x-request-id"] == "trace-42"
    _, _, text = raw(stack, "GET", "/metrics")
    assert re.search(r'kiln_gateway_requests_total\{route="/v1/embeddings",status="200"\} [1-9]', text)
    assert re.search(r'kiln_gateway_requests_total\{route="/v1/chat/completions",status="400"\} [1-9]', text)
    assert re.search(r'kiln_gateway_time_to_first_token_seconds_count\{model="tinychat"\} [1-9]', text)
    assert re.search(r'kiln_gateway_tokens_total\{direction="completion",model="tinychat"\} [1-9]', text)


def test_triton_down_is_503_and_health_stays_live(stack, tmp_path):
    """A second gateway whose Triton is not there: ready and inference answer 503."""
    from kiln.gateway.config import GatewayConfig
    from kiln.gateway.runner import GatewayProcess
    from kiln.processes import free_port

    cfg = GatewayConfig(port=free_port(), triton_grpc=f"127.0.0.1:{free_port()}",
                        repositories=stack["gw"].config.repositories)
    with GatewayProcess(cfg, log_file=tmp_path / "gw.log", env={cfg.keys_env: ""}) as gw:
        assert gw.get("/health")[0] == 200
        status, body = gw.get("/ready")
        assert status == 503 and body["triton"] is False
        c = openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0, timeout=30)
        with pytest.raises(openai.APIStatusError) as err:
            c.embeddings.create(model="minilm", input="hello")
        assert err.value.status_code == 503 and err.value.response.headers.get("retry-after")
        with pytest.raises(openai.APIStatusError) as err:
            c.chat.completions.create(model="tinychat", messages=[{"role": "user", "content": "hi"}])
        assert err.value.status_code == 503
