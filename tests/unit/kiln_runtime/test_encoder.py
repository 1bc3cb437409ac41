"""kiln_runtime's encoder path (text, ort, encoder): the plain functions behind the python-backend
models, checked against numpy by hand."""

import numpy as np
import pytest

from kiln_runtime.contract import head_outputs
from kiln_runtime.encoder import (
    FusedEncoder,
    classify,
    cls_pool,
    embedding_head,
    l2_normalize,
    make_head,
    mean_pool,
    pool,
)
from kiln_runtime.errors import InputError
from kiln_runtime.ort import open_session, session_options
from kiln_runtime.text import (
    decode_texts,
    load_tokenizer,
    pad_and_stack,
    split_rows,
    tokenize,
)


def test_mean_pool_ignores_padding_positions():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = mean_pool(hidden, mask)
    np.testing.assert_allclose(out[0], hidden[0, :3].mean(0), rtol=1e-6)
    np.testing.assert_allclose(out[1], hidden[1].mean(0), rtol=1e-6)
    hidden[0, 3:] = 1e6  # garbage in padding changes nothing
    np.testing.assert_allclose(mean_pool(hidden, mask)[0], out[0], rtol=1e-6)


def test_cls_pool_and_l2_normalize():
    hidden = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(cls_pool(hidden), hidden[:, 0])
    normed = pool(hidden, np.ones((2, 3)), "cls", normalize=True)
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(normed[1], hidden[1, 0] / np.linalg.norm(hidden[1, 0]), rtol=1e-6)
    assert np.all(np.isfinite(l2_normalize(np.zeros((1, 4), np.float32))))


def test_unknown_pooling_is_rejected():
    with pytest.raises(ValueError, match="allowed: mean, cls"):
        pool(np.zeros((1, 2, 3)), np.ones((1, 2)), "max", False)


def test_softmax_and_classify():
    logits = np.array([[1.0, 3.0, 2.0], [1000.0, 0.0, 0.0]], dtype=np.float32)
    names, scores = classify(logits, ["neg", "pos", "neu"])
    assert [n.decode() for n in names] == ["pos", "neg"]
    np.testing.assert_allclose(scores.sum(1), 1.0, rtol=1e-6)
    e = np.exp(logits[0] - logits[0].max())
    np.testing.assert_allclose(scores[0], e / e.sum(), rtol=1e-6)
    with pytest.raises(ValueError, match="3 logits but 2 labels"):
        classify(logits, ["a", "b"])


def test_pad_and_stack_round_trips_through_split_rows():
    a = np.arange(6).reshape(2, 3)
    b = np.arange(5).reshape(1, 5) + 100
    stacked = pad_and_stack([a, b])
    assert stacked.shape == (3, 5)
    assert (stacked[:2, 3:] == 0).all()
    hidden = np.repeat(stacked[..., None], 2, axis=2)  # [3, 5, 2] like a hidden state
    pa, pb = split_rows(hidden, [a.shape, b.shape])
    np.testing.assert_array_equal(pa[..., 0], a)
    np.testing.assert_array_equal(pb[..., 0], b)
    logits = np.arange(6).reshape(3, 2)  # 2-D outputs are split by rows only
    la, lb = split_rows(logits, [a.shape, b.shape])
    assert la.shape == (2, 2) and lb.shape == (1, 2)


def test_decode_texts_accepts_utf8_and_names_the_bad_item():
    raw = np.array([["héllo".encode()], ["我".encode()]], dtype=object)
    assert decode_texts(raw) == ["héllo", "我"]
    with pytest.raises(InputError, match=r"text\[1\] is not valid UTF-8"):
        decode_texts(np.array([b"ok", b"\xff\xfe bad"], dtype=object))


def test_tokenize_truncates_and_pads(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "a": 2, "b": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    t = load_tokenizer(str(path), max_length=3)
    out = tokenize(t, ["a b a b a", "b"], ["input_ids", "attention_mask"])
    np.testing.assert_array_equal(out["input_ids"], [[2, 3, 2], [3, 0, 0]])
    np.testing.assert_array_equal(out["attention_mask"], [[1, 1, 1], [1, 0, 0]])
    assert out["input_ids"].dtype == np.int64
    with pytest.raises(InputError, match="empty"):
        tokenize(t, [], ["input_ids"])


# ----------------------------------------------------------------------------- fused encoder
def _word_tokenizer(tmp_path, max_length=8):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "a": 2, "b": 3, "c": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return load_tokenizer(str(path), max_length=max_length)


class _Session:
    """ONNX Runtime's run(): hidden[b, s, h] = a per-token embedding, zeroed at padding."""

    def __init__(self, hidden=3):
        self.table = np.arange(5 * hidden, dtype=np.float32).reshape(5, hidden) + 1
        self.calls = []

    def run(self, outputs, feeds):
        self.calls.append((outputs, {k: v.copy() for k, v in feeds.items()}))
        return [self.table[feeds["input_ids"]]]


def _texts(*texts):
    return np.array([t if isinstance(t, bytes) else t.encode() for t in texts], dtype=object).reshape(-1, 1)


def test_fused_encoder_runs_ragged_requests_in_one_call_and_cuts_them_back(tmp_path):
    tok, session = _word_tokenizer(tmp_path), _Session()
    enc = FusedEncoder(tok, session, ["input_ids", "attention_mask"], "last_hidden_state", embedding_head("mean", True))
    requests = [_texts("a"), _texts("a b c a b", "c"), _texts("b b")]
    together = enc(requests)
    assert len(session.calls) == 1  # one ONNX Runtime run for the whole Triton batch
    outputs, feeds = session.calls[0]
    assert outputs == ["last_hidden_state"] and feeds["input_ids"].shape == (4, 5)  # padded to the longest text
    assert [r["embedding"].shape for r in together] == [(1, 3), (2, 3), (1, 3)]
    for request, got in zip(requests, together):
        alone = enc([request])[0]["embedding"]
        np.testing.assert_allclose(got["embedding"], alone, rtol=1e-6)  # batching changes no answer
    expected = l2_normalize(session.table[[2, 3, 4, 2, 3]].mean(0, keepdims=True))
    np.testing.assert_allclose(together[1]["embedding"][:1], expected, rtol=1e-6)


def test_fused_encoder_answers_bad_requests_alone(tmp_path):
    session = _Session()
    enc = FusedEncoder(_word_tokenizer(tmp_path), session, ["input_ids", "attention_mask"], "h", embedding_head("cls", False))
    out = enc([_texts("a", b"\xff bad"), None, np.zeros((0, 1), dtype=object), _texts("b c")])
    assert isinstance(out[0], InputError) and "text[1] is not valid UTF-8" in str(out[0])
    assert isinstance(out[1], InputError) and "missing" in str(out[1])
    assert isinstance(out[2], InputError) and "empty" in str(out[2])
    np.testing.assert_array_equal(out[3]["embedding"], session.table[[3]])  # cls: the first token
    assert len(session.calls) == 1 and session.calls[0][1]["input_ids"].shape == (1, 2)  # bad ones never reach ORT
    assert all(isinstance(r, InputError) for r in enc([_texts(b"\xc3")]))
    assert len(session.calls) == 1  # nothing valid: no run at all


def test_fused_encoder_feeds_only_graph_inputs_but_pools_with_the_mask(tmp_path):
    session = _Session()
    enc = FusedEncoder(_word_tokenizer(tmp_path), session, ["input_ids"], "h", embedding_head("mean", False))
    (got,) = enc([_texts("a", "a b c")])
    assert set(session.calls[0][1]) == {"input_ids"}
    np.testing.assert_allclose(got["embedding"][0], session.table[2], rtol=1e-6)  # padding ([PAD]) not averaged in
    with pytest.raises(ValueError, match="cannot be produced by the tokenizer"):
        FusedEncoder(_word_tokenizer(tmp_path), session, ["input_ids", "pixel_values"], "h", embedding_head("mean", False))


def test_classification_head_answers_label_column_and_scores(tmp_path):
    class Logits(_Session):
        def run(self, outputs, feeds):
            return [np.stack([feeds["input_ids"][:, 0] == k for k in (2, 3, 4)], axis=1).astype(np.float32) * 5]

    head = make_head("text-classification", labels=["neg", "neu", "pos"])
    enc = FusedEncoder(_word_tokenizer(tmp_path), Logits(), ["input_ids"], "logits", head)
    r1, r2 = enc([_texts("c a", "b"), _texts("a")])
    assert r1["label"].shape == (2, 1) and [x.decode() for x in r1["label"][:, 0]] == ["pos", "neu"]
    assert r2["label"][0, 0] == b"neg" and r1["scores"].shape == (2, 3)
    np.testing.assert_allclose(r1["scores"].sum(1), 1.0, rtol=1e-6)
    assert head_outputs("text-classification") == ("label", "scores") and head_outputs("feature-extraction") == ("embedding",)
    with pytest.raises(ValueError, match="needs labels"):
        make_head("text-classification")
    with pytest.raises(ValueError, match="allowed: mean, cls"):
        make_head("feature-extraction", pooling="max")


def test_session_options_follow_the_spec_fields():
    import onnxruntime as ort

    so = session_options(intra_op_threads=2, allow_spinning=False)
    assert so.intra_op_num_threads == 2 and so.inter_op_num_threads == 1
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options(allow_spinning=True).get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert session_options().intra_op_num_threads == 0  # 0: ONNX Runtime decides


def test_fused_encoder_over_a_real_onnx_runtime_session(tmp_path):
    """The same path model.py takes: open_session on a graph file, then FusedEncoder."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = np.arange(15, dtype=np.float32).reshape(5, 3) + 1
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "input_ids"], ["last_hidden_state"])],
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", 3])],
        [numpy_helper.from_array(table, "emb")],
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)
    session = open_session(str(path), intra_op_threads=1, allow_spinning=False)
    enc = FusedEncoder(_word_tokenizer(tmp_path), session, ["input_ids"], "last_hidden_state", embedding_head("mean", True))
    a, b = enc([_texts("a b"), _texts("c", "a a a")])
    np.testing.assert_allclose(a["embedding"][0], l2_normalize(table[[2, 3]].mean(0, keepdims=True))[0], rtol=1e-6)
    np.testing.assert_allclose(b["embedding"][1], l2_normalize(table[[2]])[0], rtol=1e-6)


def test_tokenize_rejects_inputs_the_tokenizer_cannot_produce(tmp_path):
    with pytest.raises(ValueError, match=r"\['position_ids'\] cannot be produced"):
        tokenize(_word_tokenizer(tmp_path), ["a"], ["input_ids", "position_ids"])
