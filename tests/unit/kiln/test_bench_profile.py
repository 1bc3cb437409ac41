"""kiln/bench_profile.py over the tiny engine (no server): decode-only figures, the table,
and the served-minus-in-process step time."""

from __future__ import annotations

import pytest

from kiln_testkit import CHAT_PROMPTS, make_engine


def test_bench_profile_reads_the_engine_profile(lm):
    """kiln/bench_profile.py's in-process half over the tiny engine: decode-only figures, the
    table, and the served-minus-in-process step time a caller reports."""
    from rich.console import Console

    from kiln import bench_profile as bp

    _, tok = lm
    engine = make_engine(lm, eos=[])
    prompts = [tok.encode(p).ids for p in CHAT_PROMPTS[:3]]
    run = bp.timed_decode(engine, prompts, 12)
    assert run["tokens"] == 3 * 11 and len(run["step_times_ms"]) == 11  # the prefill step is not in it
    result = bp.summarize(run, variant="fp32", file="x.onnx", threads=1, streams=3, new_tokens=12, prompt_tokens=[])
    assert result["counts"]["decode_rows"] == 33 and result["counts"]["prefill_calls"] == 0
    assert result["step_ms"] == pytest.approx(sum(result["phases_ms"].values()))
    assert result["per_stream_tokens_per_s"] == pytest.approx(1000 / result["step_ms"])
    console = Console(width=150, record=True)
    console.print(bp.profile_table([result]))
    shown = console.export_text()
    assert all(label in shown for label in bp.PHASE_LABELS.values()) and "3 streams ms/step" in shown
    gap = bp.served_overhead(result, served_per_stream_tokens_per_s=500 / result["step_ms"])  # served at half the rate
    assert gap["overhead_ms"] == pytest.approx(result["step_ms"]) and gap["overhead_pct"] == pytest.approx(50)
