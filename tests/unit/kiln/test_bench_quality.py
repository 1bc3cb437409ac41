"""kiln/bench_quality.py: how greedy answers are compared with the fp32 graph's (no server)."""

from export.lm_parity import quality_prompts
from kiln.bench_quality import NEW_TOKENS, SHORT, agreement


def test_the_committed_conversations_are_32_mixed_ones():
    convs = quality_prompts()
    assert len(convs) == 32
    assert all(c and c[-1]["role"] == "user" and c[-1]["content"] for c in convs)
    assert sum(len(c) > 1 for c in convs) >= 4  # multi-turn and system-prompted ones too
    assert any(m["role"] == "assistant" for c in convs for m in c)


def test_agreement_counts_identity_over_32_and_64_tokens_and_the_matching_prefix():
    ref = [list(range(NEW_TOKENS)), list(range(NEW_TOKENS)), [1, 2, 3, 4]]
    got = [list(range(NEW_TOKENS)),                           # identical
           list(range(SHORT)) + [-1] * (NEW_TOKENS - SHORT),  # the first 32 only
           [1, 2, 9, 9]]                                      # diverges at the third token
    a = agreement("served", ref, got)
    assert (a.prompts, a.identical_short, a.identical_all) == (3, 2, 1)
    assert abs(a.mean_prefix - (1 + SHORT / NEW_TOKENS + 2 / 4) / 3) < 1e-9
    longer = agreement("served", [[5, 6]], [[5, 6, 7]])  # past the reference's end is not agreement
    assert longer.identical_all == 0 and longer.mean_prefix == 1.0
