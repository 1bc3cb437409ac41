"""The models the gateway serves come from each repository's kiln.json."""

from __future__ import annotations

import pytest

from kiln.gateway.config import GatewayError, read_models


def test_models_come_from_kiln_json(tmp_path, make_repository):
    models = read_models([make_repository("emb", "feature-extraction"), make_repository("lm", "text-generation")])
    assert models["emb"].kind == "embedding" and models["emb"].max_input_tokens == 32 and models["emb"].dim == 8
    assert models["lm"].kind == "chat" and models["lm"].max_input_tokens == 128 and models["lm"].tokenizer_file is None
    with pytest.raises(GatewayError, match="not a kiln model repository"):
        read_models([tmp_path / "missing"])


def test_a_generation_models_engine_slots_come_from_its_spec(make_repository):
    from kiln_core.card import RepositoryCard

    repo = make_repository("lm", "text-generation")
    card = RepositoryCard.read(repo)
    assert read_models([repo])["lm"].engine_slots is None  # an older card: no cap from the gateway
    card.model_copy(update={"spec": {"generation": {"max_concurrent": 4, "max_queue": 8}}}).write(repo)
    assert read_models([repo])["lm"].engine_slots == 12
