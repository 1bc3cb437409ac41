"""`kiln reload --canary` under steady load, with real servers: the tiny encoder served in fp32
behind the gateway (a child process, as `kiln serve` runs it), a re-export in fp16 as the
canary. The gateway sends the canary its share and counts both arms; a canary held to a bar no
version can meet is rolled back (the card, the files and the answers as they were), one held to
the issue's bar is promoted and then serves everything. No request fails either way."""

from __future__ import annotations

import pytest

from kiln.canary import CanaryPlan, gateways_in
from kiln.reload import CanaryRolledBack, TritonAdmin, reload_version
from kiln.stack import GatewayOptions, Stack
from kiln_core.card import RepositoryCard
from kiln_testkit import (
    embedding_load,
    embedding_of,
    gateway_client,
    tiny_spec,
    use_export,
)

PROBE = "the probe sentence"


@pytest.fixture(scope="module")
def live(tiny_bert, tiny_bert_fp16_export, tmp_path_factory):
    from model_repository.writer import write_repository

    work = tmp_path_factory.mktemp("canary")
    spec = tiny_spec(tiny_bert, work, name="live", precisions=["fp32", "fp16"])
    use_export(tiny_bert_fp16_export, spec)  # the session's export (fp32, fp16), reused
    use_export(tiny_bert_fp16_export, spec, version=2)  # what the reload to fp16 reuses (test_reload.py exports)
    repo = write_repository(spec)
    with Stack(repo, work / "srv", gateway=GatewayOptions(keys="")) as stack:
        yield spec, spec.with_precision("fp16"), stack


def test_a_canary_that_misses_its_bar_is_rolled_back_and_the_serving_version_stays(live):
    spec32, spec16, stack = live
    c = gateway_client(stack)
    before, card = embedding_of(c, "live", PROBE), RepositoryCard.read(spec32.repository_dir)
    on_disk = sorted(p.name for p in (spec32.repository_dir / "live_encoder").iterdir())
    impossible = CanaryPlan(0.3, min_requests=40, max_seconds=20, max_p95_ratio=1e-6)
    with embedding_load(stack, "live", PROBE) as load:
        with pytest.raises(CanaryRolledBack) as rolled:
            reload_version(spec16, [TritonAdmin.of(stack.triton)], repo=spec32.repository_dir, canary=impossible,
                           gateways=gateways_in([stack.workdir]))
        after_canary = len(load.probes)
    assert not load.failures, load.failures[:5]
    cmp = rolled.value.comparison
    assert cmp.canary.requests >= 1 and cmp.stable.requests >= 1 and cmp.reasons[0].startswith("p95")
    assert "roll back" in str(rolled.value)
    # the canary answered its share with the fp16 answer; after the roll back only fp32 answers
    assert len(set(load.probes[:after_canary])) == 2
    assert set(load.probes[after_canary:]) <= {before}
    assert RepositoryCard.read(spec32.repository_dir) == card and embedding_of(c, "live", PROBE) == before
    assert sorted(p.name for p in (spec32.repository_dir / "live_encoder").iterdir()) == on_disk
    assert not (spec32.repository_dir / "live__canary").exists()


def test_a_canary_that_meets_its_bar_is_promoted_with_no_failed_request(live):
    spec32, spec16, stack = live
    c = gateway_client(stack)
    before, ids = embedding_of(c, "live", PROBE), [m.id for m in c.models.list().data]
    plan = CanaryPlan(0.3, min_requests=240, max_seconds=30, max_p95_ratio=4.0)
    # (a looser p95 bar than the default 1.2x: fp16 is emulated on a CPU without fp16 arithmetic, the canary has
    # its own, less batched step instances, and the load shares the 2 cores (measured 1.9x here); the
    # rule itself is unit-tested at 1.2x in tests/unit/kiln/test_canary.py. 240 requests, ~4 s: with 60 the
    # window was ~1 s, and the canary's first, cold requests alone made its p95 4.3x once on an EPYC)
    with embedding_load(stack, "live", PROBE) as load:
        result = reload_version(spec16, [TritonAdmin.of(stack.triton)], repo=spec32.repository_dir, canary=plan,
                                gateways=gateways_in([stack.workdir]))
    assert not load.failures, load.failures[:5]
    assert result.to_version == 2 and result.canary is not None and "verdict: promote" in result.canary
    print("\n" + result.canary)
    seen = set(load.probes)
    assert before in seen and len(seen) == 2  # fp32, and fp16 from the canary and after the switch
    assert embedding_of(c, "live", PROBE) != before and [m.id for m in c.models.list().data] == ids
    card = RepositoryCard.read(spec32.repository_dir)
    assert card.version == 2 and card.precision == "fp16" and card.canary is None
    assert not (spec32.repository_dir / "live__canary").exists()
