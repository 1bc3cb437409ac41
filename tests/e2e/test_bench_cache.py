"""`kiln bench --cache` on the tiny BERT, with real servers: two Tritons (response cache on and
off) behind their gateways, the same texts with 30% repeats through each. A short window: the
figures are checked for being there, and the cache for having answered the repeats, never
against a wall-clock bar."""

from __future__ import annotations

import json
import math

from rich.console import Console

from kiln.bench_cache import OFF, ON, run_cache_bench
from kiln_testkit import tiny_spec


def test_cache_bench_compares_both_paths_on_the_same_texts_and_the_cache_answers_repeats(tiny_bert, tmp_path):
    from export.pipeline import run_export

    spec = tiny_spec(tiny_bert, tmp_path, name="tiny-bench-cache", precisions=["fp32"])
    run_export(spec)
    console = Console(record=True, width=200)
    result = run_cache_bench(spec, console, repeat_ratio=0.3, clients=4, seconds=1.5, runs=2)
    rows = {r.path: r for r in result.rows}
    assert sorted(rows) == sorted([ON, OFF])
    for r in rows.values():
        assert r.requests > 0 and r.errors == 0 and math.isfinite(r.per_s) and r.per_s > 0, r
    on = rows[ON]
    assert on.hits > 0 and on.misses > 0 and rows[OFF].hits is None
    # a repeat of a text still in flight is a miss, so the hits are at most the repeats' share
    assert on.hits / (on.hits + on.misses) < 0.5
    assert rows[OFF].x_off == 1.0 and math.isfinite(on.x_off)
    assert "response cache: tiny-bench-cache" in console.export_text()
    doc = json.loads(result.path.read_text())
    assert result.path.name == "bench-cache.json" and doc["settings"]["repeat_ratio"] == 0.3
    assert [r["path"] for r in doc["rows"]] == [ON, OFF] and doc["machine"]["flags_line"]
