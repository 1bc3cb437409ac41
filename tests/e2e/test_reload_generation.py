"""`kiln reload` of a generation model under steady streaming load, with real servers: the tiny
Llama served in fp32 (Triton and the gateway, as `kiln serve` runs them) is reloaded to its int8
variant (its export reused). No stream fails or is cut short (those on version 1 finish there), version 2 answers
after the switch and version 1 is unloaded, /v1/models keeps its ids; `kiln rollback` returns to
fp32 the same way. A new version whose graph was damaged after its gate is refused and the
serving one keeps answering."""

from __future__ import annotations

import json
import shutil
import urllib.request

import openai
import pytest

from kiln.reload import ReloadError, TritonAdmin, reload_version, rollback_version
from kiln.stack import GatewayOptions, Stack
from kiln_core.card import RepositoryCard
from kiln_testkit import BackgroundLoad, tiny_spec, transitions

PROBE = "The capital of France is"


@pytest.fixture(scope="module")
def live(tiny_llama, tmp_path_factory):
    """(fp32 spec, int8 spec, stack): the fp32 version served with the gateway in front."""
    from export.pipeline import run_export
    from model_repository.writer import write_repository

    work = tmp_path_factory.mktemp("reload-lm")
    spec = tiny_spec(tiny_llama, work, name="livechat", task="text-generation", precisions=["fp32", "int8"],
                     serve_precision="fp32", max_length=512,
                     generation={"max_context": 512, "default_max_tokens": 16, "max_concurrent": 4,
                                 "parity_prompts": 2, "parity_new_tokens": 8, "parity_decode_steps": 4})
    run_export(spec)
    repo = write_repository(spec)
    with Stack(repo, work / "srv", gateway=GatewayOptions(keys="")) as stack:
        yield spec, spec.with_precision("int8"), stack


def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key="none", max_retries=0, timeout=120)


def probe(c: openai.OpenAI) -> str:
    r = c.completions.create(model="livechat", prompt=PROBE, max_tokens=8, temperature=0)
    return r.choices[0].text


def version_counts(stack) -> dict[str, int]:
    """Triton's successful inferences of the model, by version loaded now."""
    url = f"http://{stack.triton.http_url}/v2/models/livechat/stats"
    stats = json.loads(urllib.request.urlopen(url, timeout=10).read())["model_stats"]
    return {s["version"]: s["inference_stats"]["success"]["count"] for s in stats}


def stream_chat(c: openai.OpenAI, k: int, i: int) -> None:
    reason = None
    for chunk in c.chat.completions.create(model="livechat", max_tokens=16, stream=True,
                                           messages=[{"role": "user", "content": f"client {k} question {i}"}]):
        if chunk.choices and chunk.choices[0].finish_reason:
            reason = chunk.choices[0].finish_reason
    if reason is None:
        raise RuntimeError(f"stream {k}/{i} ended without a finish reason (cut short)")


def Streams(stack) -> BackgroundLoad:
    """3 clients streaming chat answers (one cut short is a failure), and one the greedy probe."""
    return BackgroundLoad(lambda: client(stack), stream_chat, probe, clients=3)


def test_reload_to_int8_under_streams_drops_nothing_then_rolls_back(live):
    spec32, spec8, stack = live
    c = client(stack)
    ids = [m.id for m in c.models.list().data]
    before = probe(c)
    admins = [TritonAdmin.of(stack.triton)]
    # version 2's export is the fixture's (it built int8 too), copied where reload exports it, so it
    # is reused and the load runs over the switch alone (tests/e2e/test_reload.py covers the export)
    shutil.copytree(spec32.export_dir, spec32.root / "versions" / "2" / spec32.name / "export")
    with Streams(stack) as load:
        result = reload_version(spec8, admins, repo=spec32.repository_dir)
        served_before_end = load.answered[0]
    assert not load.failures, load.failures[:5]
    assert result.from_version == 1 and result.to_version == 2 and result.precision == "int8"
    assert result.smoke["identical"] == result.smoke["prompts"] == 3
    assert served_before_end > 0 and load.probes
    seen = transitions(load.probes)
    assert seen[0] == before and len(seen) <= 2, seen  # at most one switch (int8 may answer the same), never back
    counts = version_counts(stack)
    assert set(counts) == {"2"} and counts["2"] > 0, counts  # version 1 unloaded, version 2 answered
    assert [m.id for m in c.models.list().data] == ids
    card = RepositoryCard.read(spec32.repository_dir)
    assert card.version == 2 and card.precision == "int8" and card.previous[0]["version"] == 1
    assert not (spec32.repository_dir / "livechat__candidate").exists()
    print(f"\nreload: {load.answered[0]} whole streams during it, 0 failed, {len(load.probes)} probes, "
          f"{result.seconds:.1f}s")

    with Streams(stack) as load:
        back = rollback_version(spec32.repository_dir, admins)
    assert not load.failures, load.failures[:5]
    assert back.to_version == 1 and set(version_counts(stack)) == {"1"}
    assert RepositoryCard.read(spec32.repository_dir).precision == "fp32" and probe(c) == before


def test_a_damaged_new_version_is_refused_and_the_serving_one_keeps_streaming(live):
    spec32, spec8, stack = live
    from export.reuse import ensure_export

    c = client(stack)
    card = RepositoryCard.read(spec32.repository_dir)
    before = probe(c)
    folder = spec32.repository_dir / "livechat"
    next_version = max(int(p.name) for p in folder.iterdir() if p.name.isdigit()) + 1
    staged = spec8.model_copy(update={"workdir": spec32.root / "versions" / str(next_version)})
    shutil.copytree(spec32.export_dir, staged.export_dir)  # the same export (gated), which reload reuses ...
    manifest = ensure_export(staged)
    assert manifest.variants["int8"].parity.passed  # ... damaged after its gate
    path = staged.export_dir / manifest.variants["int8"].file
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\0" * 64
    path.write_bytes(bytes(data))
    on_disk = sorted(p.name for p in folder.iterdir())
    with Streams(stack) as load:
        with pytest.raises(ReloadError, match="sha256"):
            reload_version(spec8, [TritonAdmin.of(stack.triton)], repo=spec32.repository_dir)
    assert not load.failures, load.failures[:5]
    assert set(load.probes) == {before}
    assert RepositoryCard.read(spec32.repository_dir) == card and probe(c) == before
    assert sorted(p.name for p in folder.iterdir()) == on_disk  # nothing left behind
    shutil.rmtree(staged.root.parent)
