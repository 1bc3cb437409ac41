"""kiln_core.manifest: a parity report keeps each threshold's direction through the JSON."""

from kiln_core.judge import Direction, at_least, at_most
from kiln_core.manifest import ParityReport


def test_a_report_judges_its_figures_and_reads_back_with_the_directions():
    report = ParityReport.judged("PyTorch", 32, {"min_cosine": 0.999, "max_abs_diff": 0.5},
                                 [at_least("min_cosine", 0.99), at_most("max_abs_diff", 1e-3)])
    assert not report.passed and report.failures == ["max_abs_diff = 0.5, needs <= 0.001 (off by 0.499)"]
    back = ParityReport.model_validate_json(report.model_dump_json())
    assert back == report
    assert [str(t) for t in back.limits] == ["min_cosine >= 0.99", "max_abs_diff <= 0.001"]


def test_a_later_check_adds_its_threshold_and_fails_the_report_with_its_advice():
    report = ParityReport.judged("PyTorch", 32, {"min_cosine": 1.0}, [at_least("min_cosine", 0.99)])
    report.hold({"saturating_int8_matmuls": 2.0}, [at_most("saturating_int8_matmuls", 0)], why="use uint8 weights")
    assert not report.passed
    assert report.failures == ["saturating_int8_matmuls = 2, needs <= 0 (off by 2): use uint8 weights"]
    assert report.directions == {"min_cosine": Direction.at_least, "saturating_int8_matmuls": Direction.at_most}


def test_a_report_written_before_directions_were_recorded_still_reads():
    old = '{"reference": "x", "inputs": 8, "figures": {"ppl_ratio": 1.0}, "thresholds": {"ppl_ratio": 1.1}, "passed": true}'
    report = ParityReport.model_validate_json(old)
    assert report.passed and report.thresholds == {"ppl_ratio": 1.1} and report.directions == {}
