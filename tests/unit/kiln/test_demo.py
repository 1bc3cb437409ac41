"""kiln.demo's pieces a person reads, without a server: the curl lines and the similarity table."""

import shlex

import numpy as np
from rich.console import Console

from kiln.demo import _curl, _show, similarity_table


def test_the_shown_curl_line_keeps_the_key_out_and_runs_as_pasted():
    cmd = _curl("http://127.0.0.1:9000", "/v1/embeddings", {"model": "minilm", "input": ["我喜欢弹吉他。"]})
    shown = _show(cmd)
    assert '"Authorization: Bearer $KILN_API_KEY"' in shown  # the shell expands it, the screen never shows a key
    assert "我喜欢弹吉他。" in shown  # not \\u-escaped
    assert shlex.split(shown.replace("$KILN_API_KEY", "sk-x")) == [c.replace("$KILN_API_KEY", "sk-x") for c in cmd]
    assert "-N" in _curl("http://h:1", "/v1/chat/completions", {}, stream=True)


def test_similarity_table_names_each_sentence_and_shows_two_decimals():
    sim = np.array([[1.0, 0.8, 0.1], [0.8, 1.0, 0.2], [0.1, 0.2, 1.0]])
    console = Console(width=120, record=True, color_system=None)
    console.print(similarity_table(["a guitar", "a guitar on stage", "stocks fell"], sim))
    text = console.export_text()
    assert "cosine similarity (served embeddings)" in text
    assert "[1] a guitar on stage" in text and "[2]" in text
    assert "0.80" in text and "0.10" in text and "1.00" in text
