"""Sampling (kiln_runtime/generation/sampling.py): the distribution transformers would draw
from, and OpenAI's presence / frequency penalties."""

from __future__ import annotations

import numpy as np
import pytest

from kiln_runtime.generation.params import SamplingParams
from kiln_runtime.generation.sampling import Sampler


def _hf_distribution(logits, context, temperature, top_k, top_p, penalty):
    import torch
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    ids = torch.tensor([context])
    x = torch.from_numpy(logits.copy())[None]
    x = RepetitionPenaltyLogitsProcessor(penalty)(ids, x)
    x = TemperatureLogitsWarper(temperature)(ids, x)
    if top_k:
        x = TopKLogitsWarper(top_k)(ids, x)
    if top_p < 1:
        x = TopPLogitsWarper(top_p)(ids, x)
    return x.double().softmax(-1)[0].numpy()


@pytest.mark.parametrize(
    "vocab, scale, temperature, top_k, top_p, penalty",
    [
        (50, 2.0, 1.0, 0, 1.0, 1.0), (50, 2.0, 0.7, 10, 1.0, 1.3), (50, 2.0, 1.3, 0, 0.8, 1.0),
        (50, 2.0, 0.9, 20, 0.5, 1.2), (1000, 8.0, 1.0, 0, 0.9, 1.0),  # nucleus inside the first 256
        (1000, 0.1, 1.0, 0, 0.95, 1.5),  # flat: the nucleus needs the whole vocabulary
    ],
)
def test_sampler_distribution_matches_transformers(vocab, scale, temperature, top_k, top_p, penalty):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=vocab) * scale).astype(np.float32)
    context = [int(t) for t in rng.integers(0, vocab, 12)]
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    ids, probs = Sampler(params, context).distribution(logits)
    ours = np.zeros(vocab)
    ours[ids] = probs
    np.testing.assert_allclose(ours, _hf_distribution(logits, context, temperature, top_k, top_p, penalty), atol=1e-6)


def test_sampler_draws_follow_the_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    sampler = Sampler(SamplingParams(seed=1))
    counts = np.bincount([sampler.sample(logits) for _ in range(20000)], minlength=4) / 20000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.015)


def test_greedy_ties_take_the_lowest_id_and_penalty_applies():
    logits = np.array([0.0, 3.0, 1.0, 3.0, -2.0], np.float32)
    assert Sampler(SamplingParams(temperature=0)).sample(logits) == 1
    s = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), context_ids=[1, 4])
    np.testing.assert_array_equal(s.adjusted_logits(logits), [0.0, 1.5, 1.0, 3.0, -4.0])  # / 2, or * 2 below 0
    assert s.sample(logits) == 3
    assert s.sample(logits) == 1  # 3 is seen now: 1.5 and 1.5 tie, the lower id wins


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    """OpenAI / vLLM: logits[t] -= frequency * count[t] + presence * (count[t] > 0), count over
    this request's output; the prompt is never penalised."""
    logits = np.array([0.0, 5.0, 4.0, 1.0], np.float32)

    def picks(n, context=(), **kw):
        s = Sampler(SamplingParams(temperature=0, **kw), context_ids=context)
        return [s.sample(logits) for _ in range(n)]

    assert picks(3) == [1, 1, 1]
    assert picks(3, frequency_penalty=0.6) == [1, 1, 2]  # 5 - 2 * 0.6 = 3.8 < 4: the runner-up wins
    assert picks(3, presence_penalty=1.5) == [1, 2, 1]  # 5 - 1.5 = 3.5 once 1 is out, however often
    assert picks(3, [1, 1, 1, 2], frequency_penalty=0.6) == [1, 1, 2]  # the prompt's 1s cost nothing
    assert picks(2, [1], presence_penalty=1.5) == [1, 2]
    # after the repetition penalty (prompt + output), before temperature
    s = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
                   context_ids=[2])
    for t in (1, 1, 3):
        s.observe(t)
    x = np.array([0.0, 3.0, 1.0, -2.0, 0.5], np.float32)
    np.testing.assert_array_equal(s.adjusted_logits(x), [0.0, 0.5, 0.5, -4.75, 0.5])  # 3/2 - (2*.25 + .5), -2*2 - .75
    np.testing.assert_array_equal(x, [0.0, 3.0, 1.0, -2.0, 0.5])  # the caller's logits are untouched
    # sampling draws from the penalised logits too
    s = Sampler(SamplingParams(temperature=0.5, frequency_penalty=-1.0))  # negative: more repetition
    s.observe(3)
    ids, probs = s.distribution(logits)
    expected = np.exp((logits - [0, 0, 0, -1]) / 0.5)
    np.testing.assert_allclose(probs, expected / expected.sum(), rtol=1e-6)


def test_zero_presence_and_frequency_penalties_change_nothing():
    rng = np.random.default_rng(3)
    steps = (rng.normal(size=(20, 50)) * 2).astype(np.float32)
    for kw in ({"temperature": 0}, {"temperature": 0, "repetition_penalty": 1.3}, {"temperature": 0.8, "seed": 5, "top_p": 0.9}):
        plain = Sampler(SamplingParams(**kw), context_ids=[1, 2, 3])
        zero = Sampler(SamplingParams(**kw, presence_penalty=0.0, frequency_penalty=0.0), context_ids=[1, 2, 3])
        assert [plain.sample(x) for x in steps] == [zero.sample(x) for x in steps]
        assert not zero._counts  # no bookkeeping
    s = Sampler(SamplingParams(temperature=0, presence_penalty=0.0, frequency_penalty=0.0))
    x = steps[0]
    assert s.adjusted_logits(x) is x  # no copy
