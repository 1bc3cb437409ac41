"""End to end: the packaged MiniLM, exported, served by the real Triton on free ports,
queried with the real tritonclient over gRPC and HTTP; compared with PyTorch."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from kiln_core.sources import checkpoint_dir
from kiln_testkit import SENTENCES


def _texts(texts, module):
    arr = np.array([t.encode() if isinstance(t, str) else t for t in texts], dtype=object).reshape(-1, 1)
    inp = module.InferInput("text", list(arr.shape), "BYTES")
    inp.set_data_from_numpy(arr)
    return inp


def embed(server, model, texts, proto="grpc"):
    if proto == "grpc":
        client = grpcclient.InferenceServerClient(server.grpc_url)
        return client.infer(model, [_texts(texts, grpcclient)]).as_numpy("embedding")
    client = httpclient.InferenceServerClient(server.http_url)
    return client.infer(model, [_texts(texts, httpclient)]).as_numpy("embedding")


@pytest.fixture(scope="module")
def pytorch_embeddings(minilm_export):
    """sentence-transformers' recipe by hand: HF tokenizer + model, mean pooling, L2 norm."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    spec, _ = minilm_export
    path = checkpoint_dir(spec)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    enc = tok(SENTENCES, padding=True, truncation=True, max_length=spec.max_length, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    e = (h * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(e, dim=-1).numpy()


def test_served_fp32_matches_pytorch(minilm_fp32_server, pytorch_embeddings):
    spec, server = minilm_fp32_server
    got = embed(server, spec.name, SENTENCES)
    cos = (got * pytorch_embeddings).sum(1)
    assert got.shape == (len(SENTENCES), 384)
    assert cos.min() >= 0.9999, cos


def test_served_int8_matches_pytorch(minilm_int8_server, pytorch_embeddings):
    spec, server = minilm_int8_server
    got = embed(server, spec.name, SENTENCES)
    cos = (got * pytorch_embeddings).sum(1)
    assert cos.mean() >= 0.99 and cos.min() >= 0.98, cos
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_http_and_grpc_agree(minilm_int8_server):
    spec, server = minilm_int8_server
    np.testing.assert_allclose(embed(server, spec.name, SENTENCES, "http"), embed(server, spec.name, SENTENCES), atol=1e-6)


def test_concurrent_requests_are_batched_without_changing_results(minilm_fp32_server):
    """Requests of different lengths arrive together; Triton batches them (ragged), the
    encoder pads them into one run; each answer must equal the request sent alone."""
    spec, server = minilm_fp32_server
    alone = [embed(server, spec.name, [t])[0] for t in SENTENCES]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    before = _batch_stats(client, spec.name + "_encoder")
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda t: embed(server, spec.name, [t])[0], SENTENCES * 6))
    after = _batch_stats(client, spec.name + "_encoder")
    for i, got in enumerate(together):
        np.testing.assert_allclose(got, alone[i % len(SENTENCES)], atol=2e-5)
    assert after["executions"] - before["executions"] < after["inferences"] - before["inferences"], (
        "expected the dynamic batcher to merge concurrent requests into fewer executions", before, after)


def _batch_stats(client, model):
    s = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return {"executions": int(s.get("execution_count", 0)), "inferences": int(s.get("inference_count", 0))}


# ----------------------------------------------------------------------------- bad input
def _still_serving(spec, server):
    assert grpcclient.InferenceServerClient(server.grpc_url).is_server_ready()
    assert embed(server, spec.name, ["still here"]).shape == (1, 384)


def test_empty_string_gets_a_defined_answer(minilm_int8_server):
    spec, server = minilm_int8_server
    out = embed(server, spec.name, ["", "non-empty"])
    assert out.shape == (2, 384) and np.all(np.isfinite(out))
    np.testing.assert_allclose(np.linalg.norm(out[0]), 1.0, rtol=1e-5)


def test_huge_text_is_truncated_and_answered(minilm_fp32_server):
    spec, server = minilm_fp32_server
    words = ("lorem ipsum dolor sit amet consectetur " * 600)[:20_000]
    got = embed(server, spec.name, [words])
    assert got.shape == (1, 384) and np.all(np.isfinite(got))
    # the answer is the embedding of the first max_length tokens: appending text changes nothing
    np.testing.assert_allclose(embed(server, spec.name, [words + " tail that is cut off"]), got, atol=1e-5)
    _still_serving(spec, server)


def test_non_utf8_text_is_a_client_error_naming_the_fix(minilm_int8_server):
    spec, server = minilm_int8_server
    client = httpclient.InferenceServerClient(server.http_url)
    with pytest.raises(InferenceServerException) as err:
        client.infer(spec.name, [_texts([b"ok", b"\xff\xfe\xfa broken"], httpclient)])
    assert "UTF-8" in str(err.value) and "text[1]" in str(err.value)
    assert err.value.status() in ("400", 400, "StatusCode.INVALID_ARGUMENT", None) or "400" in str(err.value.status())
    _still_serving(spec, server)


def test_non_string_tensor_is_rejected(minilm_int8_server):
    spec, server = minilm_int8_server
    for module, url in ((grpcclient, server.grpc_url), (httpclient, server.http_url)):
        client = module.InferenceServerClient(url)
        inp = module.InferInput("text", [2, 1], "INT32")
        inp.set_data_from_numpy(np.array([[1], [2]], dtype=np.int32))
        with pytest.raises(InferenceServerException, match="(?i)data.?type|datatype|expected"):
            client.infer(spec.name, [inp])
    _still_serving(spec, server)


def test_missing_and_unknown_inputs_are_rejected(minilm_int8_server):
    spec, server = minilm_int8_server
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException, match="(?i)expected 1 inputs but got 0|missing|text"):
        client.infer(spec.name, [])
    wrong = grpcclient.InferInput("prompt", [1, 1], "BYTES")
    wrong.set_data_from_numpy(np.array([[b"x"]], dtype=object))
    with pytest.raises(InferenceServerException, match="(?i)unexpected inference input 'prompt'|prompt"):
        client.infer(spec.name, [wrong])
    _still_serving(spec, server)


def test_metrics_endpoint_counts_inferences(minilm_int8_server):
    import urllib.request

    spec, server = minilm_int8_server
    embed(server, spec.name, ["count me"])
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    assert f'nv_inference_request_success{{model="{spec.name}"' in text


# ----------------------------------------------------------------------------- batch invariance
@pytest.fixture(scope="module")
def minilm_default_server(minilm_export, tmp_path_factory):
    """The packaged spec as shipped: serve_precision auto, resolved by the export."""
    from kiln_testkit import serve
    from model_repository.writer import write_repository

    spec, manifest = minilm_export
    repo = write_repository(spec, manifest, spec.root / "repo-default")
    # no response cache: the co-batched requests repeat the texts sent alone, which it would answer
    with serve(repo, tmp_path_factory.mktemp("srv-def"), cache_mb=0) as stack:
        yield spec, manifest, stack.triton


def test_the_served_default_gives_each_text_the_same_embedding_alone_or_co_batched(minilm_default_server):
    """Requests that Triton batches together must not change each other's output."""
    spec, manifest, server = minilm_default_server
    served = manifest.served_variant(spec.serve_precision)
    assert served.batch_invariance["invariant"] is True  # what auto requires of its pick
    alone = np.concatenate([embed(server, spec.name, [t]) for t in SENTENCES])
    with ThreadPoolExecutor(8) as pool:  # concurrent single-text requests: the dynamic batcher merges them
        concurrent = np.concatenate(list(pool.map(lambda t: embed(server, spec.name, [t]), SENTENCES)))
    one_request = embed(server, spec.name, SENTENCES)
    assert np.abs(concurrent - alone).max() <= 1e-6
    assert np.abs(one_request - alone).max() <= 1e-6
