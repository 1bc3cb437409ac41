"""End to end: `serving: fused` (one python model: tokenizer + ONNX Runtime + pooling) on the
real Triton, against the ensemble repository of the same variant, over gRPC and HTTP.

One server holds four repositories of the packaged MiniLM export: fused int8 under the
packaged name (what a user gets), fused fp32, and the ensemble of each variant.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from kiln_testkit import SENTENCES as MINILM_SENTENCES
from kiln_testkit import export_and_serve, serve, tiny_spec

# the ensemble tests' sentences, with an empty string in place of one of them
SENTENCES = [*MINILM_SENTENCES[:6], "", MINILM_SENTENCES[7]]
VARIANTS = ("fp32", "int8")


def _texts(texts, module):
    arr = np.array([t.encode() if isinstance(t, str) else t for t in texts], dtype=object).reshape(-1, 1)
    inp = module.InferInput("text", list(arr.shape), "BYTES")
    inp.set_data_from_numpy(arr)
    return inp


def infer(server, model, texts, proto="grpc", outputs=("embedding",)):
    module, url = (grpcclient, server.grpc_url) if proto == "grpc" else (httpclient, server.http_url)
    result = module.InferenceServerClient(url).infer(model, [_texts(texts, module)])
    got = [result.as_numpy(o) for o in outputs]
    return got[0] if len(got) == 1 else got


@pytest.fixture(scope="module")
def served(minilm_export, tmp_path_factory):
    """(server, {variant: (fused name, ensemble name)}, {name: repository}); always stopped.
    Every repository and renamed spec lives in a temporary folder (build/ is shared)."""
    from model_repository.writer import write_repository

    spec, manifest = minilm_export
    tmp = tmp_path_factory.mktemp("fused-repos")
    repos, names = {}, {}
    for variant in VARIANTS:
        fused_name = spec.name if variant == "int8" else f"{spec.name}-{variant}"
        ens_name = f"{spec.name}-ensemble-{variant}"
        for name, serving in ((fused_name, "fused"), (ens_name, "ensemble")):
            # one public name per form and variant, all over the same export: one server holds them all
            s = spec.with_precision(variant).model_copy(update={"name": name, "serving": serving, "workdir": tmp})
            s.root.mkdir(parents=True)
            s.export_dir.symlink_to(spec.export_dir.resolve(), target_is_directory=True)
            repos[name] = write_repository(s, manifest, tmp / f"repo-{name}")
        names[variant] = (fused_name, ens_name)
    # the batching test repeats its texts to watch the models' own runs: no response cache
    with serve(list(repos.values()), tmp_path_factory.mktemp("srv-fused"), cache_mb=0) as stack:
        yield stack.triton, names, repos


# ----------------------------------------------------------------------------- same answers
@pytest.mark.parametrize("proto", ["grpc", "http"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_gives_the_ensembles_embeddings(served, variant, proto):
    server, names, _ = served
    fused, ensemble = names[variant]
    got, want = infer(server, fused, SENTENCES, proto), infer(server, ensemble, SENTENCES, proto)
    assert got.shape == (len(SENTENCES), 384) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-6
    for text in SENTENCES[:3] + SENTENCES[-2:]:  # single sentences, the empty string among them
        one = infer(server, fused, [text], proto)
        assert one.shape == (1, 384)
        assert np.abs(one - infer(server, ensemble, [text], proto)).max() <= 1e-6
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_fused_is_one_python_model_under_the_public_name(served, minilm_export):
    from kiln.gateway.config import read_models
    from kiln_core.card import RepositoryCard

    server, names, repos = served
    spec, _ = minilm_export
    client = grpcclient.InferenceServerClient(server.grpc_url)
    cfg = client.get_model_config(spec.name, as_json=True)["config"]
    assert cfg["backend"] == "python" and [i["name"] for i in cfg["input"]] == ["text"]
    ens = client.get_model_config(names["int8"][1], as_json=True)["config"]
    assert cfg["input"] == ens["input"] and cfg["output"] == ens["output"]  # same tensors, dtypes, dims
    served_models = {m["name"] for m in client.get_model_repository_index(headers=server.admin_headers("grpc"),
                                                                           as_json=True)["models"]}
    assert f"{spec.name}_encoder" not in served_models and f"{names['int8'][1]}_encoder" in served_models
    repo = repos[spec.name]
    card = RepositoryCard.read(repo)
    assert card.models == [spec.name] and card.serving == "fused"
    assert read_models([repo])[spec.name].tokenizer_file.is_file()  # the gateway finds its tokenizer


def test_concurrent_ragged_requests_share_runs_without_changing_answers(served):
    server, names, _ = served
    fused = names["fp32"][0]
    alone = [infer(server, fused, [t])[0] for t in SENTENCES]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    before = _stats(client, fused)
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda t: infer(server, fused, [t])[0], SENTENCES * 6))
    after = _stats(client, fused)
    for i, got in enumerate(together):
        np.testing.assert_allclose(got, alone[i % len(SENTENCES)], atol=2e-5)
    assert after["executions"] - before["executions"] < after["inferences"] - before["inferences"], (before, after)


def _stats(client, model):
    s = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return {"executions": int(s.get("execution_count", 0)), "inferences": int(s.get("inference_count", 0))}


def test_huge_text_is_truncated_like_the_ensemble(served):
    server, names, _ = served
    fused, ensemble = names["int8"]
    words = ("lorem ipsum dolor sit amet consectetur " * 600)[:20_000]
    got = infer(server, fused, [words])
    assert np.abs(got - infer(server, ensemble, [words])).max() <= 1e-6
    assert np.abs(got - infer(server, fused, [words + " tail that is cut off"])).max() <= 1e-6


# ----------------------------------------------------------------------------- bad input
def _still_serving(server, model):
    assert grpcclient.InferenceServerClient(server.grpc_url).is_server_ready()
    assert infer(server, model, ["still here"]).shape == (1, 384)


def test_non_utf8_is_invalid_arg_over_grpc_and_400_over_http(served):
    server, names, _ = served
    fused, ensemble = names["int8"]
    bad = [b"ok", b"\xff\xfe\xfa broken"]
    with pytest.raises(InferenceServerException) as g:
        grpcclient.InferenceServerClient(server.grpc_url).infer(fused, [_texts(bad, grpcclient)])
    assert g.value.status() == "StatusCode.INVALID_ARGUMENT" and "text[1] is not valid UTF-8" in g.value.message()
    with pytest.raises(InferenceServerException) as h:
        httpclient.InferenceServerClient(server.http_url).infer(fused, [_texts(bad, httpclient)])
    assert str(h.value.status()) == "400" and "text[1] is not valid UTF-8" in h.value.message()
    with pytest.raises(InferenceServerException) as e:  # the ensemble's answer, for comparison
        grpcclient.InferenceServerClient(server.grpc_url).infer(ensemble, [_texts(bad, grpcclient)])
    assert e.value.status() == g.value.status()
    _still_serving(server, fused)


def test_a_bad_request_batched_with_good_ones_fails_alone(served):
    server, names, _ = served
    fused = names["fp32"][0]
    want = infer(server, fused, ["good one"])

    def call(i):
        try:
            return infer(server, fused, [b"\xc3(" if i % 4 == 0 else "good one"])
        except InferenceServerException as err:
            return err

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, range(48)))
    for i, r in enumerate(results):
        if i % 4 == 0:
            assert isinstance(r, InferenceServerException) and r.status() == "StatusCode.INVALID_ARGUMENT"
        else:
            np.testing.assert_allclose(r, want, atol=2e-5)
    _still_serving(server, fused)


def test_missing_unknown_and_non_string_inputs_are_rejected(served):
    server, names, _ = served
    fused = names["int8"][0]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException, match="(?i)expected 1 inputs but got 0|missing|text") as err:
        client.infer(fused, [])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    wrong = grpcclient.InferInput("prompt", [1, 1], "BYTES")
    wrong.set_data_from_numpy(np.array([[b"x"]], dtype=object))
    with pytest.raises(InferenceServerException, match="(?i)unexpected inference input 'prompt'|prompt"):
        client.infer(fused, [wrong])
    for module, url in ((grpcclient, server.grpc_url), (httpclient, server.http_url)):
        inp = module.InferInput("text", [2, 1], "INT32")
        inp.set_data_from_numpy(np.array([[1], [2]], dtype=np.int32))
        with pytest.raises(InferenceServerException, match="(?i)data.?type|datatype|expected"):
            module.InferenceServerClient(url).infer(fused, [inp])
    _still_serving(server, fused)


# ----------------------------------------------------------------------------- classifier
@pytest.fixture(scope="module")
def fused_classifier(tiny_classifier, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cls-fused")
    spec = tiny_spec(tiny_classifier, workdir, name="tiny-cls", task="text-classification", serving="fused")
    with export_and_serve(spec, workdir / "srv") as stack:
        yield spec, stack.triton


def test_fused_classifier_answers_label_and_scores_like_pytorch(fused_classifier, tiny_classifier):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    spec, server = fused_classifier
    texts = ["hello world", "the man is playing a guitar on the street", "我爱北京"]
    tok = AutoTokenizer.from_pretrained(tiny_classifier)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    with torch.no_grad():
        probs = model(**tok(texts, padding=True, truncation=True, max_length=spec.max_length, return_tensors="pt")).logits.softmax(-1).numpy()
    want_labels = [model.config.id2label[i] for i in probs.argmax(1)]
    for proto in ("grpc", "http"):
        labels, scores = infer(server, spec.name, texts, proto, outputs=("label", "scores"))
        assert labels.shape == (3, 1) and scores.shape == (3, 3) and scores.dtype == np.float32
        assert [x.decode() for x in labels[:, 0]] == want_labels
        np.testing.assert_allclose(scores, probs, atol=1e-4)
        one_label, one_scores = infer(server, spec.name, texts[1:2], proto, outputs=("label", "scores"))
        assert one_label[0, 0].decode() == want_labels[1]
        np.testing.assert_allclose(one_scores[0], probs[1], atol=1e-4)
    with pytest.raises(InferenceServerException) as err:
        httpclient.InferenceServerClient(server.http_url).infer(spec.name, [_texts([b"\xff"], httpclient)])
    assert str(err.value.status()) == "400"
    labels, _ = infer(server, spec.name, ["still here"], outputs=("label", "scores"))
    assert labels.shape == (1, 1)


def test_tritons_admin_apis_need_the_admin_key_and_inference_does_not(served, minilm_export):
    """kiln's Triton 2.51 restricts repository control, logging, trace and shared memory to the
    kiln-admin header (HTTP and gRPC): a client without it cannot load, unload or list models."""
    server, names, _ = served
    spec, _ = minilm_export
    clients = {"grpc": grpcclient.InferenceServerClient(server.grpc_url),
               "http": httpclient.InferenceServerClient(server.http_url)}
    for protocol, client in clients.items():
        with pytest.raises(InferenceServerException, match="(?i)restricted|kiln-admin"):
            client.get_model_repository_index()
        with pytest.raises(InferenceServerException, match="(?i)restricted|kiln-admin"):
            client.unload_model(spec.name)
        with pytest.raises(InferenceServerException, match="(?i)restricted|kiln-admin"):
            client.get_log_settings()
        assert client.get_model_repository_index(headers=server.admin_headers(protocol))
        assert client.is_model_ready(spec.name)  # still served: the unload was refused
    one = infer(server, spec.name, ["open to every client"], "grpc")  # inference needs no key
    assert one.shape == (1, 384)
