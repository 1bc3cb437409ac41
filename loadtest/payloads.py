"""Request payloads: realistic texts with a length mix, shipped in loadtest/data/."""

from __future__ import annotations

import random
from pathlib import Path

DEFAULT = Path(__file__).parent / "data" / "sentences.txt"


def load_texts(path: Path = DEFAULT) -> list[str]:
    texts = [l.strip() for l in path.read_text(encoding="utf-8").splitlines() if l.strip() and not l.startswith("#")]
    if not texts:
        raise ValueError(f"{path}: no payload texts")
    return texts


class Payloads:
    def __init__(self, texts: list[str] | None = None, seed: int = 0):
        self.texts = texts or load_texts()
        self.rng = random.Random(seed)

    def sample(self, k: int) -> list[str]:
        return [self.rng.choice(self.texts) for _ in range(k)]
