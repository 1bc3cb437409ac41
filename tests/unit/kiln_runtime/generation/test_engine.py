"""The continuous-batching engine (kiln_runtime/generation/engine.py) over a real model.

The decoder is the tiny Llama driven through the exported graph's interface (explicit KV
cache in, presents out) by a torch wrapper, so the engine sees exactly what ONNX Runtime
would hand it. The `lm` fixture re-initialises the checkpoint's architecture with weights at
std 0.3: its greedy text wanders over the whole vocabulary (byte pieces of CJK and emoji
included), so a batching or cache bug changes tokens instead of hiding in repeated text.
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest

from kiln_runtime.errors import InputError
from kiln_runtime.generation.engine import PROFILE_PHASES, Engine, QueueFull
from kiln_runtime.generation.params import SamplingParams
from kiln_testkit import CHAT_PROMPTS, make_engine, staggered


def drain(engine, results=None):
    """Step until idle; {request_id: [events]}."""
    results = {} if results is None else results
    while engine.has_work():
        for ev in engine.step():
            results.setdefault(ev.request_id, []).append(ev)
    return results


def tokens(events):
    return [t for ev in events for t in ev.token_ids]


def text(events):
    return "".join(ev.text for ev in events)


def greedy(max_tokens, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


def alone(lm, prompt_ids, params, **kw):
    engine = make_engine(lm, **kw)
    engine.submit("solo", prompt_ids, params)
    return drain(engine)["solo"]


# ----------------------------------------------------------------------------- stops, length, EOS
def test_stop_string_is_cut_and_finishes_with_stop(lm):
    _, tok = lm
    prompt = tok.encode(CHAT_PROMPTS[0]).ids
    free = alone(lm, prompt, greedy(30), eos=[])
    full = text(free)
    stop = next(full[i : i + 3] for i in range(4, len(full) - 3) if full[i : i + 3].isascii() and full[i : i + 3].isalpha())
    cut = full.index(stop)
    events = alone(lm, prompt, greedy(30, stop=["@@never@@", stop]), eos=[])
    assert text(events) == full[:cut]
    assert stop not in "".join(ev.text for ev in events)
    assert (events[-1].finished, events[-1].finish_reason) == (True, "stop")
    # it ends at the token that completed the stop string
    ids = tokens(free)
    n = next(n for n in range(1, 31) if stop in tok.decode(ids[:n]))
    assert events[-1].completion_tokens == n == len(tokens(events))


def test_max_tokens_finishes_with_length(lm):
    _, tok = lm
    events = alone(lm, tok.encode(CHAT_PROMPTS[1]).ids, greedy(7), eos=[])
    assert len(events) == 7 and [ev.finished for ev in events] == [False] * 6 + [True]
    assert events[-1].finish_reason == "length"
    assert events[-1].completion_tokens == 7 == len(tokens(events))
    assert events[-1].prompt_tokens == len(tok.encode(CHAT_PROMPTS[1]).ids)


def test_eos_finishes_with_stop_and_adds_no_text(lm):
    _, tok = lm
    prompt = tok.encode(CHAT_PROMPTS[2]).ids
    free = tokens(alone(lm, prompt, greedy(12), eos=[]))
    k = next(i for i in range(3, 12) if free[i] not in free[:i])  # a token first seen at position k
    events = alone(lm, prompt, greedy(12), eos=[free[k]])
    assert tokens(events) == free[: k + 1]
    assert (events[-1].finish_reason, events[-1].completion_tokens) == ("stop", k + 1)
    assert text(events) == tok.decode(free[:k])


def test_context_limit_caps_the_completion(lm):
    _, tok = lm
    prompt = tok.encode(CHAT_PROMPTS[4]).ids
    engine = make_engine(lm, eos=[], max_context=len(prompt) + 5)
    with pytest.raises(InputError, match=f"max_tokens: prompt has {len(prompt)} tokens, so at most 5 more"):
        engine.submit("r", prompt, greedy(6))
    engine.submit("r", prompt, SamplingParams(temperature=0))  # default max_tokens: what fits
    events = drain(engine)["r"]
    assert (events[-1].finish_reason, events[-1].completion_tokens) == ("length", 5)


# ----------------------------------------------------------------------------- sampling in the batch
def test_engine_frequency_penalty_matches_a_plain_loop(lm):
    """Through the engine (prefill, then batched decode) the penalty counts what this request
    generated, as a full-recompute loop applying the OpenAI formula does."""
    import torch

    model, tok = lm
    prompt = tok.encode(CHAT_PROMPTS[0]).ids
    freq, pres = 1.5, 0.5
    ids, counts = list(prompt), {}
    for _ in range(20):
        with torch.no_grad():
            x = model(torch.tensor([ids])).logits[0, -1].numpy().copy()
        for t, c in counts.items():
            x[t] -= np.float32(freq) * np.float32(c) + np.float32(pres)
        nxt = int(np.argmax(x))
        counts[nxt] = counts.get(nxt, 0) + 1
        ids.append(nxt)
    expected = ids[len(prompt):]
    free = tokens(alone(lm, prompt, greedy(20), eos=[]))
    assert expected != free  # the penalty mattered
    engine = make_engine(lm, eos=[])
    engine.submit("pen", prompt, greedy(20, frequency_penalty=freq, presence_penalty=pres))
    engine.submit("other", tok.encode(CHAT_PROMPTS[1]).ids, greedy(20))  # shares the decode steps, not the counts
    results = drain(engine)
    assert tokens(results["pen"]) == expected
    assert tokens(results["other"]) == tokens(alone(lm, tok.encode(CHAT_PROMPTS[1]).ids, greedy(20), eos=[]))
    assert tokens(alone(lm, prompt, greedy(20, presence_penalty=0.0, frequency_penalty=0.0), eos=[])) == free


def test_seeded_sampling_reproduces_and_seeds_differ(lm):
    _, tok = lm
    prompt = tok.encode(CHAT_PROMPTS[3]).ids

    def sample(seed, **kw):
        return tokens(alone(lm, prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=seed, **kw), eos=[]))

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    assert sample(7, top_k=5) != first  # the settings matter, not just the seed
    # a seeded request draws the same tokens while others share its batch
    engine = make_engine(lm, eos=[])
    engine.submit("seeded", prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=7))
    for i, p in enumerate(CHAT_PROMPTS[:4]):
        engine.submit(f"other{i}", tok.encode(p).ids, SamplingParams(max_tokens=20, temperature=1.0))
    assert tokens(drain(engine)["seeded"]) == first


# ----------------------------------------------------------------------------- engine
def _reference_greedy(model, prompt, n, eos):
    """Full recompute every token, no cache: argmax of the last position."""
    import torch

    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        if nxt in eos:
            break
    return ids[len(prompt):]


def test_engine_greedy_equals_plain_loop_and_hf_generate(lm):
    import torch

    model, tok = lm
    eos = model.config.eos_token_id
    for p in CHAT_PROMPTS[:4]:
        prompt = tok.encode(p).ids
        events = alone(lm, prompt, greedy(24))
        got = tokens(events)
        assert len(set(got)) > 8  # the text wanders: a bug in the cache could not hide
        assert got == _reference_greedy(model, prompt, 24, {eos})
        with torch.no_grad():
            hf = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, eos_token_id=eos,
                                pad_token_id=model.config.pad_token_id)
        assert got == hf[0, len(prompt):].tolist()
        # a character cut off by max_tokens is dropped rather than sent as U+FFFD
        assert text(events) == tok.decode([t for t in got if t != eos], skip_special_tokens=True).rstrip("\ufffd")
        with torch.no_grad():  # repetition penalty: same rule as transformers
            hf = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, eos_token_id=eos,
                                pad_token_id=model.config.pad_token_id, repetition_penalty=1.3)
        assert tokens(alone(lm, prompt, greedy(24, repetition_penalty=1.3))) == hf[0, len(prompt):].tolist()


def test_greedy_output_does_not_depend_on_batching(lm):
    """8 requests of different lengths, submitted one per step and leaving at different
    times (joins and leaves rebuild the padded batch), give each exactly its solo tokens."""
    _, tok = lm
    prompts = [tok.encode(p).ids for p in CHAT_PROMPTS]
    assert len({len(p) for p in prompts}) >= 6
    budgets = [30, 12, 25, 18, 30, 9, 22, 16]
    solo = [tokens(alone(lm, p, greedy(n), eos=[])) for p, n in zip(prompts, budgets)]
    assert all(len(set(s)) > len(s) // 2 for s in solo), solo  # varied text: a mix-up would show

    engine = make_engine(lm, eos=[])
    widths = []
    real = engine.runner
    engine.runner = lambda feeds: widths.append(feeds["input_ids"].shape) or real(feeds)
    results = staggered(engine, prompts, budgets, greedy)
    for i in range(8):
        assert tokens(results[f"r{i}"]) == solo[i], f"request {i} changed when batched"
        assert results[f"r{i}"][-1].finish_reason == "length"
    assert max(b for b, s in widths if s == 1) == 8  # all eight shared decode steps
    assert max(s for b, s in widths if b == 1) == max(len(p) for p in prompts)  # prefill: one request each


def test_a_new_request_joins_while_others_run(lm):
    _, tok = lm
    a, b = tok.encode(CHAT_PROMPTS[0]).ids, tok.encode(CHAT_PROMPTS[2]).ids
    engine = make_engine(lm, eos=[])
    engine.submit("a", a, greedy(12))
    results = {}
    for _ in range(4):
        for ev in engine.step():
            results.setdefault(ev.request_id, []).append(ev)
    engine.submit("b", b, greedy(6))
    step = engine.step()
    assert {ev.request_id: ev.completion_tokens for ev in step} == {"a": 5, "b": 1}  # b did not wait for a
    for ev in step:
        results.setdefault(ev.request_id, []).append(ev)
    drain(engine, results)
    assert tokens(results["a"]) == tokens(alone(lm, a, greedy(12), eos=[]))
    assert tokens(results["b"]) == tokens(alone(lm, b, greedy(6), eos=[]))
    assert results["b"][-1].finished and results["a"][-1].completion_tokens == 12


def test_cancel_frees_the_slot_at_the_next_step(lm):
    _, tok = lm
    engine = make_engine(lm, eos=[], max_concurrent=2)
    for rid in "abc":
        engine.submit(rid, tok.encode(CHAT_PROMPTS[0]).ids, greedy(20))
    first = engine.step()
    assert sorted(ev.request_id for ev in first) == ["a", "b"] and engine.num_waiting == 1
    engine.step()
    assert engine.cancel("a") and not engine.cancel("nobody")
    step = {ev.request_id: ev for ev in engine.step()}
    assert (step["a"].finished, step["a"].finish_reason, step["a"].completion_tokens) == (True, "cancelled", 2)
    assert step["c"].completion_tokens == 1  # admitted into a's slot in the same step
    assert step["b"].completion_tokens == 3 and engine.num_running == 2
    # a waiting request can be cancelled too; a cancelled id can be used again
    engine.submit("d", tok.encode(CHAT_PROMPTS[1]).ids, greedy(5))
    engine.cancel("d")
    step = {ev.request_id: ev for ev in engine.step()}
    assert (step["d"].finish_reason, step["d"].completion_tokens) == ("cancelled", 0)
    engine.submit("a", tok.encode(CHAT_PROMPTS[1]).ids, greedy(3))
    results = drain(engine)
    assert results["a"][-1].finish_reason == "length" and not engine.has_work()


def test_submit_rejects_duplicates_and_bad_params(lm):
    _, tok = lm
    engine = make_engine(lm)
    engine.submit("x", tok.encode("a").ids, greedy(3))
    with pytest.raises(ValueError, match="already active"):
        engine.submit("x", tok.encode("a").ids, greedy(3))
    with pytest.raises(InputError, match="top_p"):
        engine.submit("y", tok.encode("a").ids, SamplingParams(top_p=2))
    with pytest.raises(InputError, match="prompt: empty"):
        engine.submit("z", [], greedy(3))
    assert engine.num_waiting == 1


def test_queue_bound_rejects_at_once_and_frees_up(lm):
    """max_queue counts requests waiting beyond the free slots: with one slot and a queue of
    two, three submits fit before any step (one takes the slot at the next step), a fourth is
    rejected with Triton's queue-full phrase, and a drained engine takes new work again."""
    _, tok = lm
    prompt = tok.encode(CHAT_PROMPTS[0]).ids
    engine = make_engine(lm, eos=[], max_concurrent=1, max_queue=2)
    for rid in "abc":
        engine.submit(rid, prompt, greedy(3))
    with pytest.raises(QueueFull) as err:
        engine.submit("d", prompt, greedy(3))
    assert str(err.value).startswith("Exceeds maximum queue size")
    assert engine.num_waiting == 3
    with pytest.raises(InputError, match="top_p"):  # a bad request hears about its field, not the queue
        engine.submit("e", prompt, SamplingParams(top_p=2))
    engine.step()  # a holds the slot, b and c wait: still full
    assert (engine.num_running, engine.num_waiting) == (1, 2)
    with pytest.raises(QueueFull):
        engine.submit("d", prompt, greedy(3))
    results = drain(engine)
    assert sorted(results) == ["a", "b", "c"] and all(r[-1].finish_reason == "length" for r in results.values())
    engine.submit("d", prompt, greedy(3))  # the rejected id was never taken
    assert drain(engine)["d"][-1].completion_tokens == 3
    with pytest.raises(ValueError, match="max_queue"):
        make_engine(lm, max_queue=0)


def test_driver_thread_streams_events(lm):
    """The way the Triton model drives it: one thread steps, request threads submit and
    cancel, events go back to each request's sender."""
    _, tok = lm
    engine = make_engine(lm, eos=[])
    outbox: dict[str, queue.Queue] = {}
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            if not engine.wait_for_work(timeout=0.05):
                continue
            for ev in engine.step():
                outbox[ev.request_id].put(ev)

    driver = threading.Thread(target=loop, daemon=True)
    driver.start()
    try:
        for i, p in enumerate(CHAT_PROMPTS[:3]):
            outbox[f"r{i}"] = queue.Queue()
            engine.submit(f"r{i}", tok.encode(p).ids, greedy(10))
        streams = {}
        for rid, q in outbox.items():
            evs = [q.get(timeout=30)]
            while not evs[-1].finished:
                evs.append(q.get(timeout=30))
            streams[rid] = evs
    finally:
        stop.set()
        driver.join(5)
    for i, p in enumerate(CHAT_PROMPTS[:3]):
        assert tokens(streams[f"r{i}"]) == tokens(alone(lm, tok.encode(p).ids, greedy(10), eos=[]))


def test_eight_streams_share_every_decode_call(lm):
    """Batching, counted instead of timed: eight streams get eight times the tokens of one
    from the same number of decode calls, each call carrying all eight rows."""
    _, tok = lm
    seen = {}
    for n in (1, 8):
        engine = make_engine(lm, eos=[])
        log = engine.runner = CallLog(engine.runner)
        for i in range(n):
            engine.submit(f"r{i}", tok.encode(CHAT_PROMPTS[i]).ids, greedy(16))
        results = drain(engine)
        decode_rows = [b for b, s, past in log.calls if s == 1 and past]
        seen[n] = (sum(len(tokens(r)) for r in results.values()), decode_rows)
    (one, one_rows), (eight, eight_rows) = seen[1], seen[8]
    assert (one, eight) == (16, 8 * 16)
    assert len(eight_rows) == len(one_rows) == 15  # the first token comes from the prefill
    assert set(one_rows) == {1} and set(eight_rows) == {8}


# ----------------------------------------------------------------------------- chunked prefill, profile
LONG = " ".join(CHAT_PROMPTS[i % 8] for i in range(24))  # ~150 tokens of the tiny tokenizer


class CallLog:
    """Wraps a runner: the (batch, new tokens, past) shape of every call, per step."""

    def __init__(self, runner):
        self.runner, self.calls = runner, []

    def __call__(self, feeds):
        b, s = feeds["input_ids"].shape
        self.calls.append((b, s, feeds["past_key_values.0.key"].shape[2]))
        return self.runner(feeds)


def test_chunked_prefill_equals_unchunked(lm):
    """Greedy tokens do not depend on the chunk size; while another stream decodes, a prompt is
    fed one chunk per step on top of its own growing cache (position_ids and attention_mask
    continue where the last chunk ended). With nobody decoding it is prefilled in one call."""
    model, tok = lm
    companion = tok.encode(CHAT_PROMPTS[5]).ids
    prompts = [tok.encode(LONG).ids, tok.encode(CHAT_PROMPTS[4]).ids]
    assert len(prompts[0]) > 100
    for prompt in prompts:
        whole = tokens(alone(lm, prompt, greedy(16), eos=[]))
        assert whole == _reference_greedy(model, prompt, 16, set())
        for chunk in (1, 7, 32, len(prompt) - 1, len(prompt)):
            n_chunks = -(-len(prompt) // chunk)
            engine = make_engine(lm, eos=[])
            engine.prefill_chunk = chunk
            engine.submit("run", companion, greedy(n_chunks + 4))
            results = {"run": engine.step()}
            log = engine.runner = CallLog(engine.runner)
            engine.submit("r", prompt, greedy(16))
            drain(engine, results)
            assert tokens(results["r"]) == whole, f"prompt of {len(prompt)} tokens, chunk {chunk}"
            assert tokens(results["run"]) == tokens(alone(lm, companion, greedy(n_chunks + 4), eos=[]))
            # each step: the chunk, then the decode call of "run"
            expected = [(1, min(chunk, len(prompt) - i), i) for i in range(0, len(prompt), chunk)]
            assert log.calls[0 : 2 * n_chunks : 2] == expected  # (rows, chunk, cache so far)
            assert all(c == (1, 1, len(companion) + k) for k, c in enumerate(log.calls[1 : 2 * n_chunks : 2]))
        engine = make_engine(lm, eos=[])
        engine.prefill_chunk = 7
        log = engine.runner = CallLog(engine.runner)
        engine.submit("solo", prompt, greedy(16))
        assert tokens(drain(engine)["solo"]) == whole and log.calls[0] == (1, len(prompt), 0)  # nobody to stall
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(lambda f: f, 1, 1, 1, [], 1, 8, tok, prefill_chunk=0)


def test_long_prompt_joins_without_stalling_running_streams(lm):
    """While a long prompt is prefilled in chunks, the running stream gets a token every step;
    a short prompt arriving meanwhile is prefilled whole in its admission step (it does not
    wait behind the long one); a cancel mid-prefill frees the slot. Everyone's tokens are
    their solo tokens."""
    _, tok = lm
    run_ids, long_ids, short_ids = tok.encode(CHAT_PROMPTS[0]).ids, tok.encode(LONG).ids, tok.encode(CHAT_PROMPTS[1]).ids
    chunk = 16
    chunks = -(-len(long_ids) // chunk)
    engine = make_engine(lm, eos=[], max_concurrent=3)
    engine.prefill_chunk = chunk
    log = engine.runner = CallLog(engine.runner)
    results = {}

    def step():
        before = len(log.calls)
        evs = engine.step()
        for ev in evs:
            results.setdefault(ev.request_id, []).append(ev)
        return {ev.request_id: ev.completion_tokens for ev in evs}, log.calls[before:]

    engine.submit("run", run_ids, greedy(40))
    step()
    step()
    engine.submit("long", long_ids, greedy(8))
    got, calls = step()
    assert got == {"run": 3} and engine.num_prefilling == 1
    assert calls == [(1, chunk, 0), (1, 1, len(run_ids) + 1)]  # one chunk, then the decode call
    got, _ = step()
    engine.submit("short", short_ids, greedy(6))
    got, calls = step()
    assert got == {"run": 5, "short": 1}  # the short prompt went ahead, whole
    assert calls[0] == (1, len(short_ids), 0) and calls[1] == (1, chunk, 2 * chunk)
    for j in range(4, chunks):  # chunk j of the long prompt runs in step 2 + j
        got, calls = step()
        assert got["run"] == 2 + j and "long" not in got
        assert sum(1 for b, s, p in calls if s > 1) == 1  # never more than one chunk a step
    got, _ = step()
    assert got["long"] == 1 and got["run"] == 2 + chunks and engine.num_prefilling == 0
    drain(engine, results)
    for rid, ids, n in (("run", run_ids, 40), ("long", long_ids, 8), ("short", short_ids, 6)):
        assert tokens(results[rid]) == tokens(alone(lm, ids, greedy(n), eos=[])), rid

    # a prefilling prompt holds its slot; cancelled mid-prefill, the slot goes to the next
    engine = make_engine(lm, eos=[], max_concurrent=2)
    engine.prefill_chunk = chunk
    engine.submit("run", run_ids, greedy(10))
    engine.step()
    engine.submit("long", long_ids, greedy(4))
    engine.submit("next", short_ids, greedy(3))
    assert [ev.request_id for ev in engine.step()] == ["run"]
    assert (engine.num_prefilling, engine.num_waiting) == (1, 1)
    engine.step()
    engine.cancel("long")
    evs = {ev.request_id: ev for ev in engine.step()}
    assert (evs["long"].finish_reason, evs["long"].completion_tokens) == ("cancelled", 0)
    assert evs["next"].completion_tokens == 1 and engine.num_prefilling == 0
    results = drain(engine)
    assert tokens([evs["next"]] + results["next"]) == tokens(alone(lm, short_ids, greedy(3), eos=[]))
    assert results["run"][-1].completion_tokens == 10 and not engine.has_work()


def test_leaves_compact_the_batch_and_trim_common_padding(lm):
    """Leaves move rows instead of rebuilding the batch; when the longest member left and the
    rest would carry mostly padding, the batch is rebuilt narrower. Tokens stay solo tokens."""
    _, tok = lm
    long_ids = tok.encode(LONG).ids
    shorts = [tok.encode(p).ids for p in CHAT_PROMPTS[:4]]
    engine = make_engine(lm, eos=[])
    log = engine.runner = CallLog(engine.runner)
    engine.submit("long", long_ids, greedy(3))
    budgets = [12, 5, 9, 12]
    for i, (p, n) in enumerate(zip(shorts, budgets)):
        engine.submit(f"s{i}", p, greedy(n))
    results = drain(engine)
    for i, (p, n) in enumerate(zip(shorts, budgets)):
        assert tokens(results[f"s{i}"]) == tokens(alone(lm, p, greedy(n), eos=[]))
    assert tokens(results["long"]) == tokens(alone(lm, long_ids, greedy(3), eos=[]))
    counts = engine.profile()["counts"]
    assert counts["rebuilds"] == 2  # the first batch, then the trim once "long" left
    assert counts["compactions"] >= 1  # s1 and s2 left without a rebuild
    decode = [(b, p) for b, s, p in log.calls if s == 1 and p]
    assert max(p for b, p in decode if b == 4) < len(long_ids)  # the trimmed batch is narrower


def test_common_padding_never_widens_the_batch_past_the_context(lm):
    """After a leave the batch may keep some common left padding; it is trimmed before the
    batch would grow wider than max_context (the graph's contract)."""
    _, tok = lm
    ids = tok.encode(LONG).ids
    long_ids, short_ids = ids[:40], ids[40:70]
    engine = make_engine(lm, eos=[], max_context=48)
    log = engine.runner = CallLog(engine.runner)
    engine.submit("long", long_ids, greedy(2))
    engine.submit("short", short_ids, greedy(18))
    results = drain(engine)
    assert tokens(results["short"]) == tokens(alone(lm, short_ids, greedy(18), eos=[], max_context=48))
    assert tokens(results["long"]) == tokens(alone(lm, long_ids, greedy(2), eos=[], max_context=48))
    counts = engine.profile()["counts"]
    assert (counts["compactions"], counts["rebuilds"]) == (1, 2)  # "long" left by compaction; then the trim
    assert max(p + s for b, s, p in log.calls) <= 48


def test_profile_splits_the_step_time(lm):
    _, tok = lm
    engine = make_engine(lm, eos=[])
    real = engine.runner

    def slow(feeds):  # known runner time: 4 ms a decode call, 6 ms a prefill call
        time.sleep(0.004 if feeds["input_ids"].shape[1] == 1 and feeds["past_key_values.0.key"].shape[2] else 0.006)
        return real(feeds)

    engine.runner = slow
    prof = engine.profile()
    assert prof["steps"] == 0 and set(prof["phases_ms"]) == set(PROFILE_PHASES)
    prompts = [tok.encode(p).ids for p in CHAT_PROMPTS[:3]]
    for i, p in enumerate(prompts):
        engine.submit(f"r{i}", p, greedy(10, stop=["@@"]))
    wall, n = 0.0, 0
    while engine.has_work():
        t0 = time.perf_counter()
        n += len(engine.step())
        wall += time.perf_counter() - t0
    prof = engine.profile()
    c = prof["counts"]
    assert prof["steps"] == 10 and c["tokens"] == n == 30
    assert (c["prefill_calls"], c["prefill_tokens"]) == (3, sum(map(len, prompts)))
    assert (c["decode_calls"], c["decode_rows"]) == (9, 27)
    assert set(prof["phases_s"]) == set(PROFILE_PHASES)
    assert abs(sum(prof["phases_s"].values()) - prof["step_s"]) < 1e-9
    assert prof["step_s"] <= wall and prof["step_s"] > 0.95 * wall  # step() itself, nothing else
    assert prof["phases_s"]["run_decode"] >= 9 * 0.004 and prof["phases_s"]["run_prefill"] >= 3 * 0.006
    measured = sum(v for k, v in prof["phases_s"].items() if k != "other")
    assert prof["phases_s"]["other"] < 0.25 * measured  # the named phases hold the time
    assert all(prof["phases_s"][k] > 0 for k in ("kv", "sample", "detok"))
    assert abs(sum(prof["phases_pct"].values()) - 100) < 1e-6
    assert abs(prof["step_ms"] - 1000 * prof["step_s"] / 10) < 1e-9 and prof["step_max_ms"] >= prof["step_ms"]
    engine.reset_profile()
    prof = engine.profile()
    assert prof["steps"] == 0 and prof["step_s"] == 0 and not any(prof["counts"].values())
