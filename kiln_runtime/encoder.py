"""Encoder serving: pool, normalise, classify, and the fused encoder (tokenizer + ONNX
Runtime + head in one model: ``serving: fused``). Unit-tested without a server; the
``model.py`` files stay thin glue.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from kiln_runtime.contract import EMBEDDING, LABEL, SCORES, TEXT
from kiln_runtime.errors import InputError
from kiln_runtime.text import check_tokenizer_inputs, decode_texts, tokenize


# ----------------------------------------------------------------------------- pooling
def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over non-padding positions; hidden [b, s, h], mask [b, s] -> [b, h] (float32)."""
    m = mask[..., None].astype(np.float32)
    summed = (hidden.astype(np.float32, copy=False) * m).sum(axis=1)
    counts = np.clip(m.sum(axis=1), 1e-9, None)
    return (summed / counts).astype(np.float32)


def cls_pool(hidden: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    return np.ascontiguousarray(hidden[:, 0], dtype=np.float32)


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


# ----------------------------------------------------------------------------- fused encoder
Head = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]


def embedding_head(pooling: str, normalize: bool) -> Head:
    """hidden [b, s, h] + mask [b, s] -> {"embedding": [b, h]} (what the postprocess model answers)."""
    if pooling not in ("mean", "cls"):
        raise ValueError(f"unknown pooling {pooling!r} (allowed: mean, cls)")
    return lambda hidden, mask: {EMBEDDING: pool(hidden, mask, pooling, normalize)}


def classification_head(labels: Sequence[str]) -> Head:
    """logits [b, n] -> {"label": [b, 1] bytes, "scores": [b, n] softmax}."""
    labels = list(labels)

    def head(logits: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        names, scores = classify(logits, labels)
        return {LABEL: names.reshape(-1, 1), SCORES: scores}

    return head


def make_head(task: str, pooling: str | None = None, normalize: bool = False, labels: Sequence[str] | None = None) -> Head:
    if task == "text-classification":
        if not labels:
            raise ValueError("text-classification needs labels")
        return classification_head(labels)
    return embedding_head(pooling or "mean", normalize)


class FusedEncoder:
    """Tokenize -> ONNX Runtime -> pool | classify for the requests of one Triton batch.

    Every request's texts are tokenized in one batch encode, padded to the longest text
    of the whole batch, run in ONE session call, and the head's rows are cut back per
    request. A request with bad input (non-UTF-8, no text) gets its own InputError; the
    others in the batch are answered. ``session`` is anything with ONNX Runtime's
    ``run(output_names, feeds)``.
    """

    def __init__(self, tok, session, input_names: Sequence[str], hidden_output: str, head: Head, field: str = TEXT):
        check_tokenizer_inputs(input_names)
        self.tok, self.session, self.head, self.field = tok, session, head, field
        self.input_names = list(input_names)
        self.hidden_output = hidden_output
        # pooling needs the mask even if the graph does not take it
        self._tokenized = self.input_names + ([] if "attention_mask" in self.input_names else ["attention_mask"])

    def __call__(self, raws: Sequence[np.ndarray | None]) -> list[dict[str, np.ndarray] | InputError]:
        results: list = [None] * len(raws)
        texts: list[str] = []
        spans: list[tuple[int, int, int]] = []  # (request, first row, end row)
        for i, raw in enumerate(raws):
            try:
                if raw is None:
                    raise InputError(f"input {self.field!r} is missing")
                got = decode_texts(raw, self.field)
                if not got:
                    raise InputError(f"{self.field}: the batch is empty; send at least one string")
            except InputError as err:
                results[i] = err
                continue
            spans.append((i, len(texts), len(texts) + len(got)))
            texts.extend(got)
        if not texts:
            return results
        tokens = tokenize(self.tok, texts, self._tokenized)
        (hidden,) = self.session.run([self.hidden_output], {n: tokens[n] for n in self.input_names})
        out = self.head(hidden, tokens["attention_mask"])
        for i, start, end in spans:
            results[i] = out if len(spans) == 1 else {k: v[start:end] for k, v in out.items()}
        return results
