"""Kiln model repositories as the gateway reads them (just a repository card and an
encoder's tokenizer, no exported model), a fake Triton behind the gateway, and the app
assembled in front of it."""

from __future__ import annotations

import asyncio
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient
from tokenizers import Tokenizer, models, pre_tokenizers

from kiln.gateway.app import build_app
from kiln.gateway.backend import Chunk, generation_inputs
from kiln.gateway.config import GatewayConfig
from kiln.gateway.protocol import APIError
from kiln_core.card import RepositoryCard, TensorCard
from kiln_runtime.contract import GENERATION_INPUTS

KEYS_VARIABLE = "KILN_TEST_GATEWAY_KEYS"


@pytest.fixture
def make_repository(tmp_path: Path) -> Callable[[str, str], Path]:
    """``make_repository(name, task)``: a repository serving ``name``; encoders get a word-level
    tokenizer that knows "hello" and "world" (one token per word, at most 32 per input)."""

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
            tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
            tok.pre_tokenizer = pre_tokenizers.Whitespace()  # one token per word
            tok.save(str(repo / "tok" / "tokenizer.json"))
        card.write(repo)
        return repo

    return make


class FakeTriton:
    """Triton as the gateway's backend: generates "hi" + " there" (3 prompt tokens, 2
    completion tokens) and embeds zeros. Each way a request can go wrong is a switch, and it
    counts the generations that were closed before their end (what cancels a Triton request).
    Like the real tensors, it refuses a number its tensor would not hold exactly."""

    def __init__(self):
        self.refuse: APIError | None = None  # raised before the first chunk (a full queue, Triton down)
        self.fail_mid: APIError | None = None  # raised after the first chunk (Triton died mid-generation)
        self.hang_before_first = False
        self.hang_after_first = False
        self.completion_tokens = 2
        self.waiting = 0  # generations / embeddings now hanging
        self.closed_early = 0
        self.received: list[dict] = []

    async def _hang(self) -> None:
        self.waiting += 1
        try:
            await asyncio.Event().wait()
        finally:
            self.waiting -= 1

    async def generate(self, model, values, request_id=""):
        self.received.append(values)
        held_exactly(values)
        if self.refuse is not None:
            raise self.refuse
        finished = False
        try:
            if self.hang_before_first:
                await self._hang()
            yield Chunk("hi")
            if self.fail_mid is not None:
                raise self.fail_mid
            if self.hang_after_first:
                await self._hang()
            finished = True
            yield Chunk(" there", "stop", prompt_tokens=3, completion_tokens=self.completion_tokens)
        finally:
            if not finished:
                self.closed_early += 1

    async def embed(self, model, texts, max_batch, request_id=""):
        if self.refuse is not None:
            raise self.refuse
        try:
            if self.hang_before_first:
                await self._hang()
        finally:
            self.closed_early += self.hang_before_first
        return np.zeros((len(texts), 8), dtype=np.float32)

    async def ready(self, models):
        return True, {m: True for m in models}

    async def close(self):
        pass


def held_exactly(values: dict) -> None:
    """What a Triton tensor would receive: a number its dtype cannot hold is a bug upstream (500)."""
    generation_inputs(values)  # every name is a declared input
    dtypes = {t.name: t.dtype for t in GENERATION_INPUTS}
    for name, value in values.items():
        if dtypes[name] in ("int32", "uint64", "float32"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                held = np.array([value]).astype(dtypes[name])[0].item()
            if held != value and not (isinstance(value, float) and abs(held - value) <= 1e-6 * abs(value)):
                raise RuntimeError(f"{name}={value!r} would reach Triton as {held!r}")


@pytest.fixture
def triton() -> FakeTriton:
    return FakeTriton()


@pytest.fixture
def make_gateway(make_repository, triton, monkeypatch):
    """``make_gateway(keys=..., **config)``: a TestClient on the app with repositories "lm"
    (generation, context 128) and "emb" (embeddings), in front of the fake Triton; with
    ``keys`` the client sends the first one."""
    repos = [make_repository("lm", "text-generation"), make_repository("emb", "feature-extraction")]
    clients = []

    def make(keys: tuple[str, ...] = (), **config) -> TestClient:
        monkeypatch.setenv(KEYS_VARIABLE, ",".join(keys))
        app = build_app(GatewayConfig(repositories=repos, keys_env=KEYS_VARIABLE, **config), backend=triton)
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        if keys:
            client.headers["authorization"] = f"Bearer {keys[0]}"
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


# argv: -c RELEASE CODE <action> <spec.yaml> <args...>: prints what it got, waits for RELEASE, exits CODE
FAKE_KILN = """
import pathlib, sys, time
release, code = pathlib.Path(sys.argv[1]), int(sys.argv[2])
print("fake kiln", *sys.argv[3:], flush=True)
print("spec:", " | ".join(pathlib.Path(sys.argv[4]).read_text().splitlines()), flush=True)
deadline = time.monotonic() + 60
while not release.exists() and time.monotonic() < deadline:
    time.sleep(0.02)
print("fake kiln exits", code, flush=True)
sys.exit(code)
"""


@pytest.fixture
def fake_kiln() -> Callable[..., list[str]]:
    """``fake_kiln(release, code=0)``: a command admin jobs run instead of `kiln` (the action and
    its arguments appended): it prints them and its spec file, waits until ``release`` exists
    (60 s at most), then exits ``code``."""

    def command(release: Path, code: int = 0) -> list[str]:
        return [sys.executable, "-c", FAKE_KILN, str(release), str(code)]

    return command
