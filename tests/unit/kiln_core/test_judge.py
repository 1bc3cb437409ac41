"""kiln_core.judge: one verdict for every gate, whichever way its thresholds point."""

import math

import pytest

from kiln_core.judge import Direction, Threshold, at_least, at_most, judge


def test_a_minimum_passes_at_or_above_its_limit_and_fails_below():
    cosine = at_least("min_cosine", 0.99)
    assert judge({"min_cosine": 0.99}, [cosine]).passed
    assert judge({"min_cosine": 0.995}, [cosine]).passed
    assert judge({"min_cosine": 0.9}, [cosine]).failures == ["min_cosine = 0.9, needs >= 0.99 (off by 0.09)"]


def test_a_maximum_passes_at_or_below_its_limit_and_fails_above():
    diff = at_most("max_abs_diff", 1e-3)
    assert judge({"max_abs_diff": 1e-3}, [diff]).passed
    assert judge({"max_abs_diff": 0.0}, [diff]).passed
    assert judge({"max_abs_diff": 0.02}, [diff]).failures == ["max_abs_diff = 0.02, needs <= 0.001 (off by 0.019)"]


@pytest.mark.parametrize("threshold", [at_least("min_cosine", 0.99), at_most("ppl_ratio", 1.1)], ids=str)
def test_nan_fails_either_direction(threshold):
    verdict = judge({threshold.name: math.nan}, [threshold])
    assert not verdict.passed
    assert verdict.failures == [f"{threshold.name} = nan, needs {threshold.direction.symbol} {threshold.limit:g} (not a number)"]


def test_a_figure_never_measured_fails():
    verdict = judge({"min_cosine": 1.0}, [at_least("min_cosine", 0.99), at_most("max_abs_diff", 1e-3)])
    assert verdict.failures == ["max_abs_diff missing, needs <= 0.001"]


def test_every_miss_is_reported_in_the_thresholds_order_and_extra_figures_are_ignored():
    figures = {"mean_cosine": 0.5, "min_cosine": 0.4, "label_agreement": 0.1}
    verdict = judge(figures, [at_least("mean_cosine", 0.99), at_least("min_cosine", 0.98)])
    assert [f.split(" ")[0] for f in verdict.failures] == ["mean_cosine", "min_cosine"]
    assert judge(figures, []).passed


def test_a_threshold_prints_the_way_it_points():
    assert str(at_least("min_cosine", 0.99999)) == "min_cosine >= 0.99999"
    assert str(at_most("saturating_int8_matmuls", 0)) == "saturating_int8_matmuls <= 0"
    assert at_most("ppl_ratio", 1.1) == Threshold("ppl_ratio", 1.1, Direction.at_most)
