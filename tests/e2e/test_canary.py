"""`kiln reload --canary` under steady load, with real servers: the tiny encoder served in fp32
behind the gateway (a child process, as `kiln serve` runs it), a re-export in fp16 as the
canary. The gateway sends the canary its share and counts both arms; a canary held to a bar no
version can meet is rolled back (the card, the files and the answers as they were), one held to
the issue's bar is promoted and then serves everything. No request fails either way."""

from __future__ import annotations

import threading
import time

import numpy as np
import openai
import pytest

from kiln.canary import CanaryPlan, gateways_in
from kiln.reload import CanaryRolledBack, TritonAdmin, reload_version
from kiln.stack import GatewayOptions, Stack
from kiln_core.card import RepositoryCard
from kiln_testkit import tiny_spec, use_export

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


def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key="none", max_retries=0, timeout=60)


def probe(c) -> bytes:
    return np.array(c.embeddings.create(model="live", input=PROBE).data[0].embedding, dtype=np.float32).tobytes()


class Load:
    """4 clients sending new texts, and one the probe, until stopped."""

    def __init__(self, stack):
        self.stack, self.stop, self.failures, self.answered, self.probes = stack, threading.Event(), [], [0], []

    def __enter__(self) -> "Load":
        def worker(k: int) -> None:
            c, i = client(self.stack), 0
            while not self.stop.is_set():
                try:
                    c.embeddings.create(model="live", input=f"client {k} text {i}")
                    self.answered[0] += 1
                except Exception as err:
                    self.failures.append(repr(err))
                i += 1

        def prober() -> None:
            c = client(self.stack)
            while not self.stop.is_set():
                try:
                    self.probes.append(probe(c))
                except Exception as err:
                    self.failures.append(repr(err))

        self.threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)] + [threading.Thread(target=prober)]
        for t in self.threads:
            t.start()
        time.sleep(1.0)
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(1.5)
        self.stop.set()
        for t in self.threads:
            t.join()


def test_a_canary_that_misses_its_bar_is_rolled_back_and_the_serving_version_stays(live):
    spec32, spec16, stack = live
    c = client(stack)
    before, card = probe(c), RepositoryCard.read(spec32.repository_dir)
    on_disk = sorted(p.name for p in (spec32.repository_dir / "live_encoder").iterdir())
    impossible = CanaryPlan(0.3, min_requests=40, max_seconds=20, max_p95_ratio=1e-6)
    with Load(stack) as load:
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
    assert RepositoryCard.read(spec32.repository_dir) == card and probe(c) == before
    assert sorted(p.name for p in (spec32.repository_dir / "live_encoder").iterdir()) == on_disk
    assert not (spec32.repository_dir / "live__canary").exists()


def test_a_canary_that_meets_its_bar_is_promoted_with_no_failed_request(live):
    spec32, spec16, stack = live
    c = client(stack)
    before, ids = probe(c), [m.id for m in c.models.list().data]
    plan = CanaryPlan(0.3, min_requests=60, max_seconds=30, max_p95_ratio=4.0)
    # (a looser p95 bar than the default 1.2x: fp16 is emulated on a CPU without fp16 arithmetic, the canary has
    # its own, less batched step instances, and the load shares the 2 cores (measured 1.9x here); the
    # rule itself is unit-tested at 1.2x in tests/unit/kiln/test_canary.py)
    with Load(stack) as load:
        result = reload_version(spec16, [TritonAdmin.of(stack.triton)], repo=spec32.repository_dir, canary=plan,
                                gateways=gateways_in([stack.workdir]))
    assert not load.failures, load.failures[:5]
    assert result.to_version == 2 and result.canary is not None and "verdict: promote" in result.canary
    print("\n" + result.canary)
    seen = set(load.probes)
    assert before in seen and len(seen) == 2  # fp32, and fp16 from the canary and after the switch
    assert probe(c) != before and [m.id for m in c.models.list().data] == ids
    card = RepositoryCard.read(spec32.repository_dir)
    assert card.version == 2 and card.precision == "fp16" and card.canary is None
    assert not (spec32.repository_dir / "live__canary").exists()
