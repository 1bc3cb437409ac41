"""Plain functions the python-backend models call: tokenize, pad, pool, normalise, classify,
and the fused encoder (all three in one model: ``serving: fused``).

This file is copied verbatim next to each generated ``model.py``, so it imports nothing
from kiln: only numpy (and ``tokenizers`` / ``onnxruntime`` where a function needs them).
Every function here is unit-tested without a server; the ``model.py`` files stay thin glue.
"""

from __future__ import annotations

import json
from typing import Callable, Iterable, Sequence

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
    names = list(input_names)
    check_tokenizer_inputs(names)
    # the _fast variant skips character offsets, which nothing here reads (same ids and masks)
    encs = getattr(tok, "encode_batch_fast", tok.encode_batch)(list(texts))
    fields = {"input_ids": lambda e: e.ids, "attention_mask": lambda e: e.attention_mask, "token_type_ids": lambda e: e.type_ids}
    return {name: np.asarray([fields[name](e) for e in encs], dtype=np.int64) for name in names}


TOKENIZER_FIELDS = ("input_ids", "attention_mask", "token_type_ids")


def check_tokenizer_inputs(input_names: Iterable[str]) -> None:
    """Fail at start-up when the graph wants an input the tokenizer cannot produce."""
    bad = [n for n in input_names if n not in TOKENIZER_FIELDS]
    if bad:
        raise ValueError(f"encoder inputs {bad} cannot be produced by the tokenizer (it gives {list(TOKENIZER_FIELDS)})")


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


# ----------------------------------------------------------------------------- ONNX Runtime
def session_options(intra_op_threads: int = 0, allow_spinning: bool = True):
    """ONNX Runtime options for a CPU encoder serving small batches.

    Sequential execution: an encoder is one chain of layers, and ORT_PARALLEL only adds
    inter-op scheduling (MiniLM int8, one sentence, 2 threads: ~2.3x slower). intra_op_threads
    0: ONNX Runtime decides. allow_spinning: pool threads busy-wait for work (the spec's
    instances field); on a 2-core machine shared with Triton and clients, off was faster for
    single sentences and 8 concurrent clients alike.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if intra_op_threads:
        so.intra_op_num_threads = intra_op_threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    return so


def open_session(path: str, intra_op_threads: int = 0, allow_spinning: bool = True, gpu_device: int | None = None):
    import onnxruntime as ort

    providers: list = ["CPUExecutionProvider"]
    if gpu_device is not None:
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": gpu_device}))
    return ort.InferenceSession(path, session_options(intra_op_threads, allow_spinning), providers=providers)


# ----------------------------------------------------------------------------- fused encoder
Head = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]


def embedding_head(pooling: str, normalize: bool) -> Head:
    """hidden [b, s, h] + mask [b, s] -> {"embedding": [b, h]} (what the postprocess model answers)."""
    if pooling not in ("mean", "cls"):
        raise ValueError(f"unknown pooling {pooling!r} (allowed: mean, cls)")
    return lambda hidden, mask: {"embedding": pool(hidden, mask, pooling, normalize)}


def classification_head(labels: Sequence[str]) -> Head:
    """logits [b, n] -> {"label": [b, 1] bytes, "scores": [b, n] softmax}."""
    labels = list(labels)

    def head(logits: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        names, scores = classify(logits, labels)
        return {"label": names.reshape(-1, 1), "scores": scores}

    return head


def make_head(task: str, pooling: str | None = None, normalize: bool = False, labels: Sequence[str] | None = None) -> Head:
    if task == "text-classification":
        if not labels:
            raise ValueError("text-classification needs labels")
        return classification_head(labels)
    return embedding_head(pooling or "mean", normalize)


def head_outputs(task: str) -> tuple[str, ...]:
    """Output tensor names a head answers, in the order the configs declare them."""
    return ("label", "scores") if task == "text-classification" else ("embedding",)


class FusedEncoder:
    """Tokenize -> ONNX Runtime -> pool | classify for the requests of one Triton batch.

    Every request's texts are tokenized in one batch encode, padded to the longest text
    of the whole batch, run in ONE session call, and the head's rows are cut back per
    request. A request with bad input (non-UTF-8, no text) gets its own InputError; the
    others in the batch are answered. ``session`` is anything with ONNX Runtime's
    ``run(output_names, feeds)``.
    """

    def __init__(self, tok, session, input_names: Sequence[str], hidden_output: str, head: Head, field: str = "text"):
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
