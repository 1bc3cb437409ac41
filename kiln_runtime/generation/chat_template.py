"""A tokenizer's chat template rendered as transformers renders it, prompts to token ids,
and the EOS ids transformers' generate would stop at."""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

from kiln_runtime.errors import InputError


class _TemplateRaised(Exception):
    """raise_exception() inside a chat template: the conversation broke the model's rules."""


class ChatTemplate:
    """A tokenizer's jinja chat template, rendered as transformers' apply_chat_template does
    (sandboxed, trim_blocks / lstrip_blocks, raise_exception, tojson without HTML escaping,
    the named special tokens as variables)."""

    SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

    def __init__(self, template: str, special_tokens: Mapping[str, str] | None = None):
        from datetime import datetime

        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class _Generation(jinja2.ext.Extension):
            # {% generation %}...{% endgeneration %} marks assistant text for training masks;
            # rendering only needs its body
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

            def _render(self, caller):
                return caller()

        def raise_exception(message):
            raise _TemplateRaised(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source = template
        self.template = env.from_string(template)
        self.special_tokens = {k: str(v) for k, v in (special_tokens or {}).items() if v is not None}

    @classmethod
    def from_dir(cls, folder: str) -> "ChatTemplate | None":
        """The template saved with a tokenizer (chat_template.jinja, else tokenizer_config.json's
        chat_template, the "default" one of a list); None when the model has none."""
        cfg = {}
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
        template = None
        jinja_path = os.path.join(folder, "chat_template.jinja")
        if os.path.exists(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        else:
            template = cfg.get("chat_template")
            if isinstance(template, list):
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default")
        if not template:
            return None
        tokens = {}
        map_path = os.path.join(folder, "special_tokens_map.json")  # older checkpoints keep them here
        if os.path.exists(map_path):
            with open(map_path, encoding="utf-8") as f:
                sources = [json.load(f), cfg]
        else:
            sources = [cfg]
        for source in sources:
            for name in cls.SPECIAL_TOKENS:
                value = source.get(name)
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str):
                    tokens[name] = value
        return cls(template, tokens)

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = True) -> str:
        chat = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
        try:
            return self.template.render(
                messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except _TemplateRaised as err:
            raise InputError(f"messages: the model's chat template rejects them: {err}") from None


def encode_prompt(tokenizer, *, prompt: str | None = None, messages: Sequence[Mapping] | None = None,
                  template: ChatTemplate | None = None) -> list[int]:
    """Token ids for a plain prompt (the tokenizer adds its special tokens, as transformers'
    generate pipeline does) or for messages (rendered by the template, which already holds
    every special token, so none are added: apply_chat_template(tokenize=True) does the same)."""
    if (prompt is None) == (messages is None):
        raise InputError("prompt / messages: send exactly one of them")
    if messages is not None:
        if template is None:
            raise InputError("messages: this model has no chat template; send a plain prompt instead")
        ids = tokenizer.encode(template.render(messages), add_special_tokens=False).ids
        field_name = "messages"
    else:
        if not isinstance(prompt, str) or not prompt:
            raise InputError("prompt: empty; send some text (or messages)")
        ids = tokenizer.encode(prompt).ids
        field_name = "prompt"
    if not ids:
        raise InputError(f"{field_name}: encodes to no tokens; send some text")
    return list(ids)


def read_eos_token_ids(folder: str, tokenizer=None) -> list[int]:
    """EOS ids as transformers' generate uses them: generation_config.json, else config.json,
    plus the tokenizer's eos_token (chat models often end turns with it)."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                value = json.load(f).get("eos_token_id")
            if value is not None:
                ids = [value] if isinstance(value, int) else list(value)
                break
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    if tokenizer is not None and os.path.exists(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            token = json.load(f).get("eos_token")
        if isinstance(token, dict):
            token = token.get("content")
        tid = tokenizer.token_to_id(token) if isinstance(token, str) else None
        if tid is not None and tid not in ids:
            ids.append(tid)
    return ids
