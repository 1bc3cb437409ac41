"""Text in: Triton BYTES -> str, the served tokenizer, batch padding and splitting."""

from __future__ import annotations

import json
from typing import Iterable, Sequence

import numpy as np

from kiln_runtime.contract import TEXT, TOKENIZER_FIELDS
from kiln_runtime.errors import InputError


# ----------------------------------------------------------------------------- text in
def decode_texts(raw: np.ndarray, field: str = TEXT) -> list[str]:
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
