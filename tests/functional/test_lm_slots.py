"""The fused decoder graph (export/lm_graph.py: GroupQueryAttention over a cache written in
place) and the slot engine that drives it (kiln_runtime/generation/slots.py), on the tiny
Llama re-initialised at std 0.3 (its greedy text wanders over the vocabulary, so a cache or
batching bug changes tokens instead of hiding in repeated text): the graph's logits equal
PyTorch's, and the engine gives every request exactly its tokens alone whatever joins, leaves,
is cancelled or is prefilled in chunks beside it."""

from __future__ import annotations

import numpy as np
import pytest

from kiln_runtime.generation.params import SamplingParams
from kiln_runtime.generation.slots import OrtSlotRunner, SlotEngine
from kiln_testkit import CHAT_PROMPTS, staggered

MAX_CONTEXT = 256
LONG = " ".join(CHAT_PROMPTS[i % 8] for i in range(24))  # ~150 tokens of the tiny tokenizer


@pytest.fixture(scope="module")
def gqa(lm, tmp_path_factory):
    """(session, graph) of the tiny Llama as the fused fp32 graph."""
    import onnx
    import onnxruntime as ort

    from export.lm_graph import build_gqa_decoder
    from kiln_runtime.ort import session_options

    model, _ = lm
    graph = build_gqa_decoder(model, MAX_CONTEXT)
    path = tmp_path_factory.mktemp("gqa") / "model.onnx"
    onnx.save(graph.model, path)
    return ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"]), graph


def make(lm, gqa, max_concurrent=8, eos=(), prefill_chunk=None) -> SlotEngine:
    session, graph = gqa
    _, tok = lm
    s = graph.shape
    runner = OrtSlotRunner(session, s.past_names, s.present_names, max_concurrent, s.num_kv_heads, MAX_CONTEXT,
                           s.head_dim)
    return SlotEngine(runner, s.num_layers, s.num_kv_heads, s.head_dim, list(eos), max_concurrent, MAX_CONTEXT, tok,
                      prefill_chunk=prefill_chunk)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0)


def drain(engine, results=None) -> dict:
    results = {} if results is None else results
    while engine.has_work():
        for ev in engine.step():
            results.setdefault(ev.request_id, []).append(ev)
    return results


def tokens(events) -> list[int]:
    return [t for ev in events for t in ev.token_ids]


def reference(model, prompt: list[int], n: int) -> list[int]:
    """PyTorch greedy, the whole sequence recomputed every token (no cache at all)."""
    import torch

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_the_fused_graph_computes_the_models_logits(lm, gqa):
    """Prefill, then decode steps of three rows of different lengths in one call, each in its own
    row of the shared cache: every step's logits equal PyTorch's for that prefix."""
    import torch

    model, tok = lm
    session, graph = gqa
    s = graph.shape
    runner = OrtSlotRunner(session, s.past_names, s.present_names, 3, s.num_kv_heads, MAX_CONTEXT, s.head_dim)
    prompts = [tok.encode(p).ids for p in CHAT_PROMPTS[:3]]
    seqs = [list(p) for p in prompts]
    worst = 0.0
    for row, p in enumerate(prompts):
        logits = runner.run(np.array([p]), np.array([len(p)]), row).copy()
        with torch.no_grad():
            want = model(torch.tensor([p])).logits[0, -1].numpy()
        worst = max(worst, float(np.abs(logits[0, 0] - want).max()))
        seqs[row].append(int(logits[0, 0].argmax()))
    for _ in range(6):
        logits = runner.run(np.array([[q[-1]] for q in seqs]), np.array([len(q) for q in seqs]), 0).copy()
        for row, q in enumerate(seqs):
            with torch.no_grad():
                want = model(torch.tensor([q])).logits[0, -1].numpy()
            worst = max(worst, float(np.abs(logits[row, 0] - want).max()))
            q.append(int(logits[row, 0].argmax()))
    assert worst < 1e-4, worst
    assert all(q[len(p):] == reference(model, p, 7) for p, q in zip(prompts, seqs))


def test_every_request_gets_its_solo_tokens_whatever_joins_and_leaves(lm, gqa):
    """8 requests submitted one per step, leaving at different times (each leave moves the last
    row into the freed one), equal each alone and PyTorch's greedy."""
    model, tok = lm
    prompts = [tok.encode(p).ids for p in CHAT_PROMPTS]
    budgets = [30, 12, 25, 18, 30, 9, 22, 16]
    solo = []
    for p, n in zip(prompts, budgets):
        engine = make(lm, gqa)
        engine.submit("solo", p, greedy(n))
        solo.append(tokens(drain(engine)["solo"]))
    assert all(len(set(s)) > len(s) // 2 for s in solo), solo  # varied text: a mix-up would show
    assert solo[0] == reference(model, prompts[0], budgets[0])

    engine = make(lm, gqa)
    results = staggered(engine, prompts, budgets, greedy)
    for i in range(8):
        assert tokens(results[f"r{i}"]) == solo[i], f"request {i} changed when batched"
        assert results[f"r{i}"][-1].finish_reason == "length"
    counts = engine.profile()["counts"]
    assert counts["compactions"] >= 1 and counts["rebuilds"] == 0  # rows moved, never a padded rebuild


def test_cancel_frees_the_row_and_chunked_prefill_rides_beside_decoding(lm, gqa):
    model, tok = lm
    companion, long_prompt = tok.encode(CHAT_PROMPTS[5]).ids, tok.encode(LONG).ids
    assert len(long_prompt) > 100
    whole = reference(model, long_prompt, 12)
    engine = make(lm, gqa, max_concurrent=3, prefill_chunk=16)
    engine.submit("run", companion, greedy(30))
    engine.submit("gone", tok.encode(CHAT_PROMPTS[1]).ids, greedy(30))
    results = {}
    for ev in engine.step():
        results.setdefault(ev.request_id, []).append(ev)
    engine.submit("long", long_prompt, greedy(12))
    for _ in range(3):  # the long prompt is fed 16 tokens a step while the others decode
        for ev in engine.step():
            results.setdefault(ev.request_id, []).append(ev)
    assert engine.num_prefilling == 1
    assert engine.cancel("gone")  # its row goes to the last slotted sequence: the long prompt's
    drain(engine, results)
    assert results["gone"][-1].finish_reason == "cancelled"
    assert tokens(results["long"]) == whole
    assert tokens(results["run"]) == reference(model, companion, 30)
    assert engine.profile()["counts"]["compactions"] >= 1


def test_the_served_model_picks_the_engine_by_the_manifests_kv_layout(lm, gqa):
    from kiln_runtime.generation.engine import Engine
    from kiln_runtime.generation.slots import engine_for

    session, graph = gqa
    _, tok = lm
    s = graph.shape
    decoder = {"num_layers": s.num_layers, "num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim,
               "eos_token_ids": [2], "max_context": MAX_CONTEXT, "kv_layout": "slots"}
    engine = engine_for(session, decoder, tok, 4, prefill_chunk=16)
    assert isinstance(engine, SlotEngine) and engine.runner.rows == 4 and engine.prefill_chunk == 16
    older = engine_for(session, {k: v for k, v in decoder.items() if k != "kv_layout"}, tok, 4)
    assert type(older) is Engine  # the exported KV-concat graph: the padded-batch engine


def test_prompts_admitted_together_are_prefilled_in_one_call(lm, gqa):
    """Eight prompts of different lengths arriving at once: one prefill call over their rows,
    right-padded, each row's first token from its own last position, and every request's tokens
    as alone."""
    model, tok = lm
    prompts = [tok.encode(p).ids for p in CHAT_PROMPTS]
    engine = make(lm, gqa)
    calls = []
    run = engine.runner.run
    engine.runner.run = lambda ids, lengths, row0: calls.append(ids.shape) or run(ids, lengths, row0)
    for i, p in enumerate(prompts):
        engine.submit(f"r{i}", p, greedy(10))
    results = drain(engine)
    assert calls[0] == (8, max(len(p) for p in prompts))  # one call prefilled all eight
    assert engine.profile()["counts"]["prefill_calls"] == 1
    for i, p in enumerate(prompts):
        assert tokens(results[f"r{i}"]) == reference(model, p, 10), f"request {i}"
