"""`kiln reload` under steady load, with real servers: the tiny encoder served in fp32 (Triton
and the gateway, as `kiln serve` runs them) is reloaded to a re-export in fp16. No request
fails; a probe text's answer switches from the fp32 answer to the fp16 one at one moment and
never back; /v1/models keeps its ids; `kiln rollback` returns to fp32 the same way. A new
version whose graph was corrupted after its gate, or whose tokenizer cannot load, is refused
and the serving version keeps answering, bit for bit."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from kiln.reload import ReloadError, TritonAdmin, reload_version, rollback_version
from kiln.stack import GatewayOptions, Stack
from kiln_core.card import RepositoryCard
from kiln_testkit import (
    BackgroundLoad,
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
    """(fp32 spec, fp16 spec, stack): the fp32 version served with the gateway in front."""
    from model_repository.writer import write_repository

    work = tmp_path_factory.mktemp("reload")
    spec = tiny_spec(tiny_bert, work, name="live", precisions=["fp32", "fp16"])
    use_export(tiny_bert_fp16_export, spec)  # the session's export (fp32, fp16), reused
    repo = write_repository(spec)
    with Stack(repo, work / "srv", gateway=GatewayOptions(keys="")) as stack:
        yield spec, spec.with_precision("fp16"), stack


def client(stack):
    return gateway_client(stack)


def probe(c) -> bytes:
    return embedding_of(c, "live", PROBE)


def Load(stack) -> BackgroundLoad:
    """4 clients sending new texts, and one the probe."""
    return embedding_load(stack, "live", PROBE)


def test_reload_to_fp16_under_load_drops_nothing_and_switches_once_then_rolls_back(live):
    spec32, spec16, stack = live
    c = client(stack)
    ids = [m.id for m in c.models.list().data]
    before = probe(c)
    admins = [TritonAdmin.of(stack.triton)]
    with Load(stack) as load:
        result = reload_version(spec16, admins, repo=spec32.repository_dir)
    assert not load.failures, load.failures[:5]
    assert result.from_version == 1 and result.to_version == 2 and result.precision == "fp16"
    assert result.smoke["max_abs_diff"] <= 1e-4
    seen = transitions(load.probes)
    assert seen[0] == before and len(seen) == 2 and seen[1] != before, len(seen)  # one switch, never back
    after = probe(c)
    assert after == seen[1]
    np.testing.assert_allclose(np.frombuffer(after, np.float32), np.frombuffer(before, np.float32), atol=1e-2)
    assert [m.id for m in c.models.list().data] == ids
    card = RepositoryCard.read(spec32.repository_dir)
    assert card.version == 2 and card.precision == "fp16" and card.previous[0]["version"] == 1
    print(f"\nreload: {load.answered[0]} answered during it, 0 failed, {len(load.probes)} probes")

    with Load(stack) as load:
        back = rollback_version(spec32.repository_dir, admins)
    assert not load.failures, load.failures[:5]
    assert back.to_version == 1 and transitions(load.probes) == [after, before]
    assert RepositoryCard.read(spec32.repository_dir).precision == "fp32" and probe(c) == before


@pytest.mark.parametrize("damage", ["graph", "tokenizer"])
def test_a_damaged_new_version_is_refused_and_the_serving_one_keeps_answering(live, damage):
    spec32, spec16, stack = live
    c = client(stack)
    card = RepositoryCard.read(spec32.repository_dir)
    before = probe(c)
    next_version = max(int(p.name) for p in (spec32.repository_dir / "live").iterdir() if p.name.isdigit()) + 1
    staged = spec16.model_copy(update={"workdir": spec32.root / "versions" / str(next_version)})
    # the next version's export exists already (reload reuses it) and is damaged after its gate
    from export.reuse import ensure_export

    manifest = ensure_export(staged)
    if damage == "graph":
        path = staged.export_dir / manifest.variants["fp16"].file
        data = bytearray(path.read_bytes())
        data[len(data) // 2: len(data) // 2 + 64] = b"\0" * 64
        path.write_bytes(bytes(data))
    else:
        (staged.export_dir / manifest.tokenizer_dir / "tokenizer.json").write_text("{not json")
    on_disk = sorted(p.name for p in (spec32.repository_dir / "live_encoder").iterdir())
    with Load(stack) as load:
        with pytest.raises(ReloadError) as refused:
            reload_version(spec16, [TritonAdmin.of(stack.triton)], repo=spec32.repository_dir)
    assert not load.failures, load.failures[:5]
    assert set(load.probes) == {before}  # the serving version answered throughout
    assert ("sha256" in str(refused.value)) if damage == "graph" else ("did not load" in str(refused.value))
    assert RepositoryCard.read(spec32.repository_dir) == card and probe(c) == before
    assert sorted(p.name for p in (spec32.repository_dir / "live_encoder").iterdir()) == on_disk  # nothing left behind
    shutil.rmtree(staged.root.parent)  # the damaged export: the next case exports its own
