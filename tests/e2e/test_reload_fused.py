"""`kiln reload` of a fused encoder (`serving: fused`: one python model) under load: version 2
(fp16) is smoke-tested as `<name>__candidate` on its own files, then the model is loaded with
version 2 only. No request fails, the probe's answer switches once and never back, the rollback
returns the fp32 answer bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.reload import TritonAdmin, reload_version, rollback_version
from kiln.stack import GatewayOptions, Stack
from kiln_core.card import RepositoryCard
from kiln_testkit import (
    embedding_load,
    embedding_of,
    gateway_client,
    tiny_spec,
    transitions,
    use_export,
)

PROBE = "the probe sentence"


@pytest.fixture(scope="module")
def live(tiny_bert, tiny_bert_fp16_export, tmp_path_factory):
    from model_repository.writer import write_repository

    work = tmp_path_factory.mktemp("reload-fused")
    spec = tiny_spec(tiny_bert, work, name="fusedlive", precisions=["fp32", "fp16"], serving="fused")
    use_export(tiny_bert_fp16_export, spec)  # the session's export (fp32, fp16), reused
    use_export(tiny_bert_fp16_export, spec, version=2)  # what the reload to fp16 reuses (test_reload.py exports)
    with Stack(write_repository(spec), work / "srv", gateway=GatewayOptions(keys="")) as stack:
        yield spec, spec.with_precision("fp16"), stack


def probe(c) -> bytes:
    return embedding_of(c, "fusedlive", PROBE)


def under_load(stack, work):
    """Run work() while 3 clients send new texts and one the probe: (its result, failures, probes)."""
    with embedding_load(stack, "fusedlive", PROBE, clients=3) as load:
        result = work()
    return result, load.failures, load.probes


def test_a_fused_encoder_reloads_and_rolls_back_under_load(live):
    spec32, spec16, stack = live
    c = gateway_client(stack)
    before = probe(c)
    admins = [TritonAdmin.of(stack.triton)]
    result, failures, probes = under_load(stack, lambda: reload_version(spec16, admins, repo=spec32.repository_dir))
    assert not failures, failures[:5]
    assert result.to_version == 2 and result.precision == "fp16" and result.smoke["max_abs_diff"] <= 1e-4
    seen = transitions(probes)
    assert seen[0] == before and len(seen) == 2, len(seen)  # one switch, never back
    card = RepositoryCard.read(spec32.repository_dir)
    assert card.version == 2 and card.serving == "fused" and card.previous[0]["version"] == 1
    assert not (spec32.repository_dir / "fusedlive__candidate").exists()
    after = probe(c)
    np.testing.assert_allclose(np.frombuffer(after, np.float32), np.frombuffer(before, np.float32), atol=1e-2)

    back, failures, probes = under_load(stack, lambda: rollback_version(spec32.repository_dir, admins))
    assert not failures, failures[:5]
    assert back.to_version == 1 and transitions(probes) == [after, before] and probe(c) == before
