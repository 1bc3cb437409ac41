"""export.lm_parity: the maths of the causal-LM gate (perplexity, greedy agreement) and its verdicts."""

import math

import numpy as np
import pytest
import torch

from export import lm_parity
from kiln_core.spec import Precision
from kiln_testkit import tiny_spec


def test_uniform_logits_have_the_vocabulary_as_perplexity():
    logits = np.zeros((12, 50), np.float32)
    assert lm_parity.perplexity(logits, np.arange(12)) == pytest.approx(50.0)


def test_confident_right_predictions_have_perplexity_near_one_and_wrong_ones_high():
    ids = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    right = np.full((8, 10), -20.0, np.float32)
    right[np.arange(7), ids[1:]] = 20.0  # row t predicts ids[t + 1]
    assert lm_parity.perplexity(right, ids) == pytest.approx(1.0, abs=1e-6)
    wrong = np.roll(right, 1, axis=1)
    assert lm_parity.perplexity(wrong, ids) > 1e10


def test_nll_matches_torch_cross_entropy_even_for_large_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 30, size=(20, 300)).astype(np.float32)  # float32 exp would overflow without the shift
    targets = rng.integers(0, 300, size=20)
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(logits).double(), torch.from_numpy(targets), reduction="none")
    np.testing.assert_allclose(lm_parity.token_nll(logits, targets), expected.numpy(), rtol=1e-10)


def test_windowed_perplexity_scores_each_window_without_its_first_token():
    ids = list(range(10))
    assert lm_parity.windows(ids, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert lm_parity.windows(list(range(9)), 4)[-1] == [4, 5, 6, 7]  # a 1-token tail predicts nothing: dropped
    seen = []

    def uniform(window):
        seen.append(window)
        return np.zeros((len(window), 16))

    assert lm_parity.windowed_perplexity(uniform, ids, 4) == pytest.approx(16.0)
    assert seen == lm_parity.windows(ids, 4)
    one = lm_parity.windowed_perplexity(lambda w: np.eye(16)[[(t + 1) % 16 for t in w]] * 50, ids, 100)
    assert one == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(
    "a, b, prefix, agreement",
    [
        ([1, 2, 3, 4], [1, 2, 3, 4], 4, 1.0),
        ([1, 2, 3, 4], [1, 2, 9, 4], 2, 0.5),
        ([5, 6, 2], [5, 6, 7, 8, 9, 10], 2, 2 / 6),  # one stopped at eos (2) where the other went on
        ([5, 6], [5, 6, 7, 8], 2, 0.5),  # stopped early: the missing tokens count as disagreement
        ([], [], 0, 1.0),
    ],
)
def test_common_prefix_and_agreement(a, b, prefix, agreement):
    assert lm_parity.common_prefix(a, b) == prefix
    assert lm_parity.agreement(a, b) == pytest.approx(agreement)


def test_greedy_figures_count_identity_and_earliest_divergence():
    ref = [[1, 2, 3, 4], [1, 2, 3, 4], [7, 8]]
    got = [[1, 2, 3, 4], [1, 9, 9, 9], [7, 8]]
    f = lm_parity.greedy_figures(ref, got)
    assert f == {"greedy_identical": 2.0, "greedy_prompts": 3.0, "greedy_agreement": pytest.approx((1 + 0.25 + 1) / 3),
                 "greedy_first_divergence": 1.0}
    assert lm_parity.greedy_figures(ref, ref)["greedy_first_divergence"] == -1.0


def test_left_pad_counts_positions_from_each_first_real_token():
    feeds = lm_parity.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert feeds["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert feeds["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert feeds["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert all(v.dtype == np.int64 for v in feeds.values())


def test_chat_prompts_are_multilingual_and_cycle_without_repeats():
    eight = lm_parity.chat_prompts(8)
    assert len(eight) == 8 and any(not p.isascii() for p in eight)
    many = lm_parity.chat_prompts(25)
    assert len(set(many)) == 25 and many[:8] == eight
    assert 300 < len(lm_parity.heldout_text().split()) < 700


def _spec(tmp_path, **generation):
    return tiny_spec(tmp_path, tmp_path, task="text-generation", precisions=["fp32", "int8"], generation=generation)


def test_fp32_gate_needs_small_logit_differences_and_every_greedy_generation_identical(tmp_path):
    spec = _spec(tmp_path, parity_prompts=4)
    good = {"prefill_max_abs_diff": 2e-5, "decode_max_abs_diff": 3e-5, "greedy_identical": 4.0, "greedy_prompts": 4.0}
    report = lm_parity.gate_lm(spec, Precision.fp32, good, 4)
    assert report.passed and report.thresholds["greedy_identical"] == 4
    bad = lm_parity.gate_lm(spec, Precision.fp32, {**good, "decode_max_abs_diff": 0.02, "greedy_identical": 3.0}, 4)
    assert not bad.passed
    assert bad.failures == ["decode_max_abs_diff = 0.02, needs <= 0.001 (off by 0.019)",
                            "greedy_identical = 3, needs >= 4 (off by 1)"]


def test_quantized_gate_is_the_perplexity_ratio_and_nan_fails(tmp_path):
    spec = _spec(tmp_path, max_perplexity_ratio=1.05)
    ok = lm_parity.gate_lm(spec, Precision.int8, {"ppl": 10.4, "ppl_fp32": 10.0, "ppl_ratio": 1.04, "greedy_agreement": 0.3}, 8)
    assert ok.passed and ok.thresholds == {"ppl_ratio": 1.05}  # agreement is reported, not gated
    assert not lm_parity.gate_lm(spec, Precision.int4, {"ppl_ratio": 1.2}, 8).passed
    assert lm_parity.gate_lm(spec, Precision.int8, {"ppl_ratio": math.nan}, 8).failures == [
        "ppl_ratio = nan, needs <= 1.05 (not a number)"
    ]


def test_gate_records_which_way_each_threshold_points(tmp_path):
    """The manifest alone tells a reader (and the parity table's caption) that a logits
    difference is a maximum and the greedy count a minimum."""
    spec = _spec(tmp_path, parity_prompts=4)
    figures = {"prefill_max_abs_diff": 2e-5, "decode_max_abs_diff": 3e-5, "greedy_identical": 4.0}
    report = lm_parity.gate_lm(spec, Precision.fp32, figures, 4)
    assert [str(t) for t in report.limits] == [
        "prefill_max_abs_diff <= 0.001", "decode_max_abs_diff <= 0.001", "greedy_identical >= 4"
    ]
    assert not lm_parity.gate_lm(spec, Precision.fp32, {"greedy_identical": 4.0}, 4).passed  # unmeasured: a miss
