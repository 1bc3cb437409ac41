"""kiln.bench_cache on made-up outcomes: the stream of texts with its share of repeats, the
rows, the ratio and what the table says. No server runs here."""

from __future__ import annotations

import itertools

import pytest
from rich.console import Console

from kiln.bench_cache import (
    OFF,
    ON,
    cache_row,
    cache_table,
    repeating_texts,
    with_ratio,
)
from kiln.faults import Outcome


def test_the_text_stream_repeats_earlier_texts_at_the_asked_share_and_is_the_same_for_a_seed():
    texts = list(itertools.islice(repeating_texts(["a b", "c d"], 0.3, seed=1, tag="r0-"), 5000))
    assert texts == list(itertools.islice(repeating_texts(["a b", "c d"], 0.3, seed=1, tag="r0-"), 5000))
    seen, repeats = set(), 0
    for t in texts:
        repeats += t in seen
        seen.add(t)
    assert 0.27 < repeats / len(texts) < 0.33
    assert texts[0] == "a b (r0-0)" and all(t.endswith(")") for t in texts)
    other_run = set(itertools.islice(repeating_texts(["a b", "c d"], 0.3, seed=1, tag="r1-"), 100))
    assert not other_run & seen  # another run's new texts are new to the cache too
    assert len(set(itertools.islice(repeating_texts(["x"], 0.0, seed=0), 50))) == 50
    with pytest.raises(ValueError):
        next(repeating_texts(["x"], 1.0, seed=0))


def answers(n: int, seconds: float) -> list[Outcome]:
    return [Outcome(200, seconds, True, i * seconds) for i in range(n)]


def test_rows_carry_throughput_latency_hit_counts_and_the_ratio_to_no_cache():
    on = cache_row(ON, 1, [answers(40, 0.05)], 2.0, counts=(12, 28))
    off = cache_row(OFF, 1, [answers(20, 0.1)], 2.0)
    rows = with_ratio([on, off])
    assert rows[0].per_s == pytest.approx(20.0) and rows[1].per_s == pytest.approx(10.0)
    assert rows[0].x_off == pytest.approx(2.0) and rows[1].x_off == pytest.approx(1.0)
    assert rows[0].hits == 12 and rows[1].hits is None
    console = Console(record=True, width=250)
    console.print(cache_table("response cache: tiny", rows, 0.3))
    text = console.export_text()
    assert "30% of the requests repeat" in text and "2.00x" in text and "30%" in text  # hit rate 12 / 40
    with pytest.raises(ValueError):
        cache_row(ON, 1, [], 2.0)
