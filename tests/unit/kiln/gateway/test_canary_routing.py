"""While a repository card names a canary, the gateway sends that share of the model's
requests to the canary model and counts both arms apart; without one, nothing changes."""

from __future__ import annotations

import random

from kiln.canary import CANARY_ARM, STABLE, parse_arms
from kiln_core.card import RepositoryCard


def test_a_canary_gets_its_share_and_both_arms_are_counted(make_gateway, make_repository, triton, tmp_path):
    seen: list[str] = []
    embed = triton.embed

    async def recording(model, texts, max_batch, request_id=""):
        seen.append(model)
        return await embed(model, texts, max_batch, request_id)

    triton.embed = recording
    client = make_gateway()
    repo = tmp_path / "emb"
    card = RepositoryCard.read(repo)
    card.model_copy(update={"canary": {"model": "emb__canary", "version": 2, "share": 0.25}}).write(repo)
    client.app.state.gateway._cards_checked = -1e9  # re-read the card now (a second passes in real time)
    random.seed(1)
    for _ in range(400):
        assert client.post("/v1/embeddings", json={"model": "emb", "input": "hello world"}).status_code == 200
    assert set(seen) == {"emb", "emb__canary"} and 0.18 < seen.count("emb__canary") / 400 < 0.32
    _, arms = parse_arms(client.get("/metrics").text, "emb")
    assert arms[CANARY_ARM].ok == seen.count("emb__canary") and arms[STABLE].ok == seen.count("emb")
    assert arms[CANARY_ARM].p95_s() is not None

    card.write(repo)  # the canary ends: every request to the model itself again, uncounted
    client.app.state.gateway._cards_checked = -1e9
    seen.clear()
    for _ in range(20):
        client.post("/v1/embeddings", json={"model": "emb", "input": "hello"})
    assert set(seen) == {"emb"}
    _, after = parse_arms(client.get("/metrics").text, "emb")
    assert after[STABLE].ok == arms[STABLE].ok
