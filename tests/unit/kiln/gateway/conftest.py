"""Kiln model repositories as the gateway reads them: just a repository card (and an
encoder's tokenizer), no exported model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models

from kiln_core.card import RepositoryCard, TensorCard


@pytest.fixture
def make_repository(tmp_path: Path) -> Callable[[str, str], Path]:
    """``make_repository(name, task)``: a repository serving ``name``; encoders get a word-level
    tokenizer that knows "hello" and "world"."""

    def make(name: str, task: str) -> Path:
        repo = tmp_path / name
        repo.mkdir()
        generation = task == "text-generation"
        card = RepositoryCard(
            public_model=name, task=task, models=[name], runtime="python-ort", precision="fp32",
            variant_sha256="0" * 64, parity={}, max_input_tokens=128 if generation else 32, max_batch_size=4,
            inputs={}, outputs={} if generation else {"embedding": TensorCard(dtype="TYPE_FP32", dims=[8])}, spec={},
            tokenizer=None if generation else "tok/tokenizer.json",
        )
        if not generation:
            (repo / "tok").mkdir()
            vocab = {"[UNK]": 0, "hello": 1, "world": 2}
            Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")).save(str(repo / "tok" / "tokenizer.json"))
        card.write(repo)
        return repo

    return make
