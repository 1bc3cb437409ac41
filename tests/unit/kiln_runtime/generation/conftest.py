"""The tiny Llama's tokenizer (byte-level BPE, ChatML template), for the generation tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    """tokenizers.Tokenizer of the tiny Llama: CJK and emoji split across its tokens."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny_llama / "tokenizer.json"))
