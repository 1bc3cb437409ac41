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
