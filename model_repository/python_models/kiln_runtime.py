"""Plain functions the python-backend models call: tokenize, pad, pool, normalise, classify.

This file is copied verbatim next to each generated ``model.py``, so it imports nothing
from kiln: only numpy (and ``tokenizers`` / ``onnxruntime`` where a function needs them).
Every function here is unit-tested without a server; the ``model.py`` files stay thin glue.
"""

from __future__ import annotations

import json
from typing import Iterable, Sequence

import numpy as np


class InputError(ValueError):
    """A client's bad input: answered as INVALID_ARG with this message."""


# ----------------------------------------------------------------------------- text in
def decode_texts(raw: np.ndarray, field: str = "text") -> list[str]:
    """Triton BYTES tensor (any shape) -> list of str; non-UTF-8 is the client's error."""
    out = []
    for i, item in enumerate(np.asarray(raw, dtype=object).reshape(-1)):
        if isinstance(item, str):
            out.append(item)
            continue
        try:
            out.append(bytes(item).decode("utf-8"))
        except UnicodeDecodeError as err:
            raise InputError(
                f"{field}[{i}] is not valid UTF-8 (byte {err.start}: {bytes(item)[err.start:err.start + 1]!r}); "
                "send UTF-8 encoded text"
            ) from None
    return out


def load_tokenizer(path: str, max_length: int):
    """A `tokenizers.Tokenizer` that truncates to max_length and pads to the batch's longest."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    tok.enable_truncation(max_length=max_length)
    pad_id, pad_token = _pad_token(tok, path)
    tok.enable_padding(pad_id=pad_id, pad_token=pad_token)
    return tok


def _pad_token(tok, path: str) -> tuple[int, str]:
    cfg_path = path.rsplit("/", 1)[0] + "/tokenizer_config.json"
    token = None
    try:
        with open(cfg_path) as f:
            token = json.load(f).get("pad_token")
        if isinstance(token, dict):
            token = token.get("content")
    except (OSError, ValueError):
        pass
    for cand in (token, "[PAD]", "<pad>"):
        if cand is not None and tok.token_to_id(cand) is not None:
            return tok.token_to_id(cand), cand
    return 0, tok.id_to_token(0) or "[PAD]"


def tokenize(tok, texts: Sequence[str], input_names: Iterable[str]) -> dict[str, np.ndarray]:
    """Batch-encode texts into the int64 tensors the encoder's ONNX graph takes."""
    if len(texts) == 0:
        raise InputError("text: the batch is empty; send at least one string")
    encs = tok.encode_batch(list(texts))
    fields = {
        "input_ids": [e.ids for e in encs],
        "attention_mask": [e.attention_mask for e in encs],
        "token_type_ids": [e.type_ids for e in encs],
    }
    out = {}
    for name in input_names:
        if name not in fields:
            raise ValueError(f"encoder input {name!r} cannot be produced by the tokenizer")
        out[name] = np.asarray(fields[name], dtype=np.int64)
    return out


# ----------------------------------------------------------------------------- batching
def pad_and_stack(arrays: Sequence[np.ndarray], pad_value=0) -> np.ndarray:
    """Stack [b_i, s_i] arrays into one [sum b_i, max s_i] array, right-padded."""
    width = max(a.shape[1] for a in arrays)
    rows = sum(a.shape[0] for a in arrays)
    out = np.full((rows, width) + arrays[0].shape[2:], pad_value, dtype=arrays[0].dtype)
    r = 0
    for a in arrays:
        out[r : r + a.shape[0], : a.shape[1]] = a
        r += a.shape[0]
    return out


def split_rows(batch: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Undo pad_and_stack: cut each request's rows and its own sequence length back out."""
    out, r = [], 0
    for shape in shapes:
        rows = shape[0]
        piece = batch[r : r + rows]
        if len(shape) > 1 and batch.ndim > 2:
            piece = piece[:, : shape[1]]
        out.append(np.ascontiguousarray(piece))
        r += rows
    return out


# ----------------------------------------------------------------------------- pooling
def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over non-padding positions; hidden [b, s, h], mask [b, s] -> [b, h] (float32)."""
    m = mask[..., None].astype(np.float32)
    summed = (hidden.astype(np.float32) * m).sum(axis=1)
    counts = np.clip(m.sum(axis=1), 1e-9, None)
    return (summed / counts).astype(np.float32)


def cls_pool(hidden: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    return np.ascontiguousarray(hidden[:, 0].astype(np.float32))


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, eps)).astype(np.float32)


def pool(hidden: np.ndarray, mask: np.ndarray, method: str, normalize: bool) -> np.ndarray:
    if method == "mean":
        out = mean_pool(hidden, mask)
    elif method == "cls":
        out = cls_pool(hidden, mask)
    else:
        raise ValueError(f"unknown pooling {method!r} (allowed: mean, cls)")
    return l2_normalize(out) if normalize else out


# ----------------------------------------------------------------------------- classification
def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def classify(logits: np.ndarray, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """logits [b, n] -> (labels [b] as bytes objects, scores [b, n] softmax)."""
    if logits.shape[-1] != len(labels):
        raise ValueError(f"{logits.shape[-1]} logits but {len(labels)} labels")
    scores = softmax(logits)
    names = np.array([labels[i].encode() for i in scores.argmax(axis=-1)], dtype=object)
    return names, scores
