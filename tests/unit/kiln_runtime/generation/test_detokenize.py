"""Text out (kiln_runtime/generation/detokenize.py): never a broken character, and stop
strings cut before they are sent."""

from __future__ import annotations

from kiln_runtime.generation.detokenize import IncrementalDetokenizer, StopMatcher
from kiln_testkit import CHAT_PROMPTS

# mixed scripts: with the tiny byte-level tokenizer, CJK and emoji split across tokens
TEXTS = CHAT_PROMPTS + ["北京🎉 ok 안녕하세요 👩‍👩‍👧 ça"]


def test_detokenizer_never_splits_a_character(tokenizer):
    held_back = 0
    for s in TEXTS:
        ids = tokenizer.encode(s).ids
        detok = IncrementalDetokenizer(tokenizer)
        chunks = [detok.push(t) for t in ids] + [detok.flush()]
        assert not any("\ufffd" in c for c in chunks), (s, chunks)
        assert "".join(chunks) == tokenizer.decode(ids, skip_special_tokens=True) == s
        held_back += chunks.count("")
    assert held_back >= 5  # characters really were split across tokens


def test_detokenizer_drops_a_character_cut_off_at_the_end(tokenizer):
    ids = tokenizer.encode("我").ids
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.push(ids[0]) == ""  # the first bytes of 我 alone
    assert tokenizer.decode(ids[:1]) == "\ufffd"
    assert detok.flush() == ""  # generation ended mid-character: never sent broken


def test_detokenizer_skips_special_tokens_and_keeps_prompt_context(tokenizer):
    im_end = tokenizer.token_to_id("<|im_end|>")
    ids = tokenizer.encode("Hello, how are you").ids
    detok = IncrementalDetokenizer(tokenizer, context_ids=ids[:3])
    out = "".join(detok.push(t) for t in ids[3:] + [im_end] + tokenizer.encode(" today").ids) + detok.flush()
    assert out == tokenizer.decode(ids[3:]) + " today"


def test_stop_matcher_holds_back_a_possible_start():
    m = StopMatcher(["END", "\n\n"])
    assert m.push("abcE") == ("abc", False)
    assert m.push("N") == ("", False)
    assert m.push("Dxyz") == ("", True)
    m = StopMatcher(["END"])
    assert m.push("abE") == ("ab", False)
    assert m.push("x") == ("Ex", False)
    assert m.push("EN") == ("", False)
    assert m.flush() == "EN"
    m = StopMatcher(["b\n", "ab"])
    assert m.push("xab\n") == ("x", True)  # the earliest stop wins
