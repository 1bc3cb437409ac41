"""Chat templates and prompt encoding (kiln_runtime/generation/chat_template.py): rendered
and tokenized exactly as transformers' apply_chat_template does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln_runtime.errors import InputError
from kiln_runtime.generation.chat_template import (
    ChatTemplate,
    encode_prompt,
    read_eos_token_ids,
)


def test_encode_prompt_rejects_empty_and_templateless(tokenizer):
    with pytest.raises(InputError, match="prompt: empty"):
        encode_prompt(tokenizer, prompt="")
    with pytest.raises(InputError, match="exactly one"):
        encode_prompt(tokenizer)
    with pytest.raises(InputError, match="messages: this model has no chat template"):
        encode_prompt(tokenizer, messages=[{"role": "user", "content": "hi"}])
    assert encode_prompt(tokenizer, prompt="Hello") == tokenizer.encode("Hello").ids


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "我爱北京 🚀"},
     {"role": "assistant", "content": "  ok\n"}, {"role": "user", "content": "{{ not jinja }} <b>&</b>"}],
]


# shapes seen on the Hub: raise_exception, loop controls, namespace, tojson, strip, bos_token
STRICT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(sys='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.sys = m['content'] %}{% continue %}{% endif %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == (1 if ns.sys else 0)) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}\n"
    "    {% if m['role'] == 'user' %}[INST] {{ ns.sys ~ ' ' if ns.sys }}{{ m['content'] | trim }} [/INST]"
    "{% else %}{{ m['content'] | tojson }}{{ eos_token }}{% endif %}\n"
    "{% endfor %}"
)


def _tokenizer_with_template(src: Path, template: str, dst: Path) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    tok.chat_template = template
    tok.save_pretrained(dst)
    return dst


@pytest.mark.parametrize("which", ["chatml", "strict"])
def test_chat_template_renders_like_transformers(tiny_llama, tmp_path, which):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    folder = tiny_llama if which == "chatml" else _tokenizer_with_template(tiny_llama, STRICT_TEMPLATE, tmp_path)
    hf = AutoTokenizer.from_pretrained(folder)
    ours = ChatTemplate.from_dir(str(folder))
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for conv in CONVERSATIONS:
        expected = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert ours.render(conv) == expected
        ids = hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert encode_prompt(tok, messages=conv, template=ours) == list(ids)


def test_chat_template_exception_is_the_clients_error(tiny_llama, tmp_path):
    import jinja2
    from transformers import AutoTokenizer

    folder = _tokenizer_with_template(tiny_llama, STRICT_TEMPLATE, tmp_path)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        AutoTokenizer.from_pretrained(folder).apply_chat_template(bad, tokenize=False)
    with pytest.raises(InputError, match="messages: the model's chat template rejects them: Conversation roles must alternate"):
        ChatTemplate.from_dir(str(folder)).render(bad)


def test_chat_template_from_older_layouts(tmp_path):
    """Template inside tokenizer_config.json (a string, or a named list), special tokens
    only in special_tokens_map.json; no template at all gives None."""
    tpl = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}{% endfor %}"
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": {"content": "<s>"}}))
    for stored in (tpl, [{"name": "tool_use", "template": "x"}, {"name": "default", "template": tpl}]):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": stored, "eos_token": "</s>"}))
        ours = ChatTemplate.from_dir(str(tmp_path))
        assert ours.render([{"role": "user", "content": "hi"}]) == "<s>user:hi"
        assert ours.special_tokens == {"bos_token": "<s>", "eos_token": "</s>"}
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert ChatTemplate.from_dir(str(tmp_path)) is None


@pytest.fixture(scope="module")
def smollm2_tokenizer_dir(tmp_path_factory):
    """The packaged SmolLM2's tokenizer and chat template, read from its GGUF file (seconds:
    no weights are dequantized) and saved as transformers saves them."""
    import warnings

    from transformers import AutoTokenizer

    from kiln_core.sources import gguf_file
    from kiln_core.spec import load_spec

    path = gguf_file(load_spec("smollm2"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    tok.save_pretrained(out)
    return out


def test_chat_template_smollm2_like_transformers(smollm2_tokenizer_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    SMOLLM2 = smollm2_tokenizer_dir
    hf = AutoTokenizer.from_pretrained(SMOLLM2)
    ours = ChatTemplate.from_dir(str(SMOLLM2))
    tok = Tokenizer.from_file(str(SMOLLM2 / "tokenizer.json"))
    for conv in CONVERSATIONS:
        assert ours.render(conv) == hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        ids = hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert encode_prompt(tok, messages=conv, template=ours) == list(ids)
    assert hf.eos_token_id in read_eos_token_ids(str(SMOLLM2), tok)
