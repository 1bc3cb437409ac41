"""Shared fixtures: tiny random checkpoints, the packaged MiniLM export, servers; and the
tier markers. The helpers behind them are in tests/support/kiln_testkit.py.

The repo root must never be on sys.path (triton/ would shadow the `triton` package that
torch imports): pytest runs in importlib mode, adds only tests/support, and the Makefile
sets PYTHONSAFEPATH=1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
assert not any(Path(p or ".").resolve() == Path(__file__).resolve().parents[1] for p in sys.path), (
    "the repo root is on sys.path: run tests with the pytest executable and PYTHONSAFEPATH=1 (make test)"
)

from kiln_testkit import build_tiny_bert, build_tiny_llama, packaged_export, serve  # noqa: E402

TIERS = ("unit", "functional", "e2e", "gpu")


def pytest_collection_modifyitems(config, items):
    """Each test carries its tier's marker (its folder under tests/): `pytest -m unit`."""
    for item in items:
        parts = Path(str(item.fspath)).relative_to(Path(__file__).parent).parts
        if parts and parts[0] in TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("ckpt") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_bert_fp16_export(tiny_bert, tmp_path_factory) -> Path:
    """The tiny BERT exported once in fp32 and fp16 (gated): the export folder. The reload,
    canary and admin tests copy it where their spec (any name, ensemble or fused) exports, so
    it is reused there instead of exported again (`kiln_testkit.use_export`)."""
    from export.pipeline import run_export
    from kiln_testkit import tiny_spec

    spec = tiny_spec(tiny_bert, tmp_path_factory.mktemp("tiny-bert-export"), name="shared", precisions=["fp32", "fp16"])
    run_export(spec)
    return spec.export_dir


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("ckpt") / "tiny-cls", classifier=True)


@pytest.fixture(scope="session")
def minilm_export():
    """The packaged MiniLM (fp32, int8, fp16; serve_precision auto): (spec, manifest)."""
    return packaged_export("minilm")


@pytest.fixture(scope="session")
def minilm_int8_server(minilm_export, tmp_path_factory):
    from model_repository.writer import write_repository

    spec, manifest = minilm_export
    spec = spec.with_precision("int8")
    repo = write_repository(spec, manifest, spec.root / "repo-int8")
    with serve(repo, tmp_path_factory.mktemp("srv-int8")) as stack:
        yield spec, stack.triton


@pytest.fixture(scope="session")
def minilm_fp32_server(minilm_export, tmp_path_factory):
    from model_repository.writer import write_repository

    spec, manifest = minilm_export
    fp32 = spec.model_copy(update={"serve_precision": spec.precisions[0]})
    repo = write_repository(fp32, manifest, spec.root / "repo-fp32")
    # its tests watch the model's own batching with repeated texts: no response cache
    with serve(repo, tmp_path_factory.mktemp("srv-fp32"), cache_mb=0) as stack:
        yield fp32, stack.triton


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("ckpt") / "tiny-llama")


@pytest.fixture(scope="module")
def lm(tiny_llama):
    """(model, tokenizers.Tokenizer): the tiny Llama's architecture, weights drawn at std 0.3."""
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_pretrained(tiny_llama)
    cfg.initializer_range = 0.3
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    # a model this small runs fastest on one thread, and on a busy 2-core machine two
    # spinning OpenMP threads slow every call down some twentyfold
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield model, Tokenizer.from_file(str(tiny_llama / "tokenizer.json"))
    torch.set_num_threads(threads)
