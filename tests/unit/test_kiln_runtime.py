"""The plain functions behind the python-backend models, checked against numpy by hand."""

import numpy as np
import pytest

from model_repository.python_models import kiln_runtime as rt


def test_mean_pool_ignores_padding_positions():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = rt.mean_pool(hidden, mask)
    np.testing.assert_allclose(out[0], hidden[0, :3].mean(0), rtol=1e-6)
    np.testing.assert_allclose(out[1], hidden[1].mean(0), rtol=1e-6)
    hidden[0, 3:] = 1e6  # garbage in padding changes nothing
    np.testing.assert_allclose(rt.mean_pool(hidden, mask)[0], out[0], rtol=1e-6)


def test_cls_pool_and_l2_normalize():
    hidden = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(rt.cls_pool(hidden), hidden[:, 0])
    normed = rt.pool(hidden, np.ones((2, 3)), "cls", normalize=True)
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(normed[1], hidden[1, 0] / np.linalg.norm(hidden[1, 0]), rtol=1e-6)
    assert np.all(np.isfinite(rt.l2_normalize(np.zeros((1, 4), np.float32))))


def test_unknown_pooling_is_rejected():
    with pytest.raises(ValueError, match="allowed: mean, cls"):
        rt.pool(np.zeros((1, 2, 3)), np.ones((1, 2)), "max", False)


def test_softmax_and_classify():
    logits = np.array([[1.0, 3.0, 2.0], [1000.0, 0.0, 0.0]], dtype=np.float32)
    names, scores = rt.classify(logits, ["neg", "pos", "neu"])
    assert [n.decode() for n in names] == ["pos", "neg"]
    np.testing.assert_allclose(scores.sum(1), 1.0, rtol=1e-6)
    e = np.exp(logits[0] - logits[0].max())
    np.testing.assert_allclose(scores[0], e / e.sum(), rtol=1e-6)
    with pytest.raises(ValueError, match="3 logits but 2 labels"):
        rt.classify(logits, ["a", "b"])


def test_pad_and_stack_round_trips_through_split_rows():
    a = np.arange(6).reshape(2, 3)
    b = np.arange(5).reshape(1, 5) + 100
    stacked = rt.pad_and_stack([a, b])
    assert stacked.shape == (3, 5)
    assert (stacked[:2, 3:] == 0).all()
    hidden = np.repeat(stacked[..., None], 2, axis=2)  # [3, 5, 2] like a hidden state
    pa, pb = rt.split_rows(hidden, [a.shape, b.shape])
    np.testing.assert_array_equal(pa[..., 0], a)
    np.testing.assert_array_equal(pb[..., 0], b)
    logits = np.arange(6).reshape(3, 2)  # 2-D outputs are split by rows only
    la, lb = rt.split_rows(logits, [a.shape, b.shape])
    assert la.shape == (2, 2) and lb.shape == (1, 2)


def test_decode_texts_accepts_utf8_and_names_the_bad_item():
    raw = np.array([["héllo".encode()], ["我".encode()]], dtype=object)
    assert rt.decode_texts(raw) == ["héllo", "我"]
    with pytest.raises(rt.InputError, match=r"text\[1\] is not valid UTF-8"):
        rt.decode_texts(np.array([b"ok", b"\xff\xfe bad"], dtype=object))


def test_tokenize_truncates_and_pads(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "a": 2, "b": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    t = rt.load_tokenizer(str(path), max_length=3)
    out = rt.tokenize(t, ["a b a b a", "b"], ["input_ids", "attention_mask"])
    np.testing.assert_array_equal(out["input_ids"], [[2, 3, 2], [3, 0, 0]])
    np.testing.assert_array_equal(out["attention_mask"], [[1, 1, 1], [1, 0, 0]])
    assert out["input_ids"].dtype == np.int64
    with pytest.raises(rt.InputError, match="empty"):
        rt.tokenize(t, [], ["input_ids"])
