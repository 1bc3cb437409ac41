"""A tokenizer's chat template rendered as transformers renders it, prompts to token ids,
and the EOS ids transformers' generate would stop at.

What clients type stays text: a special token's text inside a prompt or a message's content
(``<|im_start|>system``) is tokenized as the plain text pieces it spells, never as the
control token, so a user cannot forge turns; only the template's own markers are special.
Prompts without such text get exactly transformers' ids."""

from __future__ import annotations

import json
import os
import re
import secrets
import weakref
from typing import Any, Mapping, NamedTuple, Sequence

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


class _TypedText(NamedTuple):
    """A tokenizer's view of typed text: a copy that matches no special token, and a pattern
    finding any special token's text."""

    tokenizer: Any
    specials: re.Pattern | None  # None: the tokenizer has no special tokens


_TYPED: "weakref.WeakKeyDictionary[Any, _TypedText]" = weakref.WeakKeyDictionary()


def _typed_text(tokenizer) -> _TypedText:
    """Built once per tokenizer (a copy, so that the shared one's settings never flip)."""
    typed = _TYPED.get(tokenizer)
    if typed is None:
        copy = type(tokenizer).from_str(tokenizer.to_str())
        copy.encode_special_tokens = True
        texts = sorted((t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special),
                       key=len, reverse=True)  # longest first: a token that contains another wins
        specials = re.compile("|".join(map(re.escape, texts))) if texts else None
        typed = _TYPED.setdefault(tokenizer, _TypedText(copy, specials))
    return typed


def _encode_messages(tokenizer, template: ChatTemplate, messages: Sequence[Mapping]) -> list[int]:
    """The rendered conversation's ids, with special-token text typed in a content as text.
    Such text is swapped for a placeholder (a per-call nonce no client can type) before
    rendering, so the template's own markers are the only special tokens it parses; the
    rendered string is then encoded piece by piece, each placeholder as its original text."""
    typed = _typed_text(tokenizer)
    found: list[str] = []
    if typed.specials is not None:
        nonce = f"\x00kiln-{secrets.token_hex(8)}:"

        def hide(match: re.Match) -> str:
            found.append(match.group())
            return f"{nonce}{len(found) - 1}\x00"

        messages = [{**m, "content": typed.specials.sub(hide, str(m["content"]))} for m in messages]
    rendered = template.render(messages)
    if not found:
        return tokenizer.encode(rendered, add_special_tokens=False).ids
    ids: list[int] = []
    for i, piece in enumerate(re.split(re.escape(nonce) + r"(\d+)\x00", rendered)):
        if i % 2:  # a placeholder's index
            ids += typed.tokenizer.encode(found[int(piece)], add_special_tokens=False).ids
        elif piece:
            ids += tokenizer.encode(piece, add_special_tokens=False).ids
    return ids


def encode_prompt(tokenizer, *, prompt: str | None = None, messages: Sequence[Mapping] | None = None,
                  template: ChatTemplate | None = None) -> list[int]:
    """Token ids for a plain prompt (the tokenizer adds its special tokens, as transformers'
    generate pipeline does) or for messages (rendered by the template, which already holds
    every special token, so none are added: apply_chat_template(tokenize=True) does the same).
    Special-token text the client typed stays text (see the module docstring)."""
    if (prompt is None) == (messages is None):
        raise InputError("prompt / messages: send exactly one of them")
    if messages is not None:
        if template is None:
            raise InputError("messages: this model has no chat template; send a plain prompt instead")
        ids = _encode_messages(tokenizer, template, messages)
        field_name = "messages"
    else:
        if not isinstance(prompt, str) or not prompt:
            raise InputError("prompt: empty; send some text (or messages)")
        ids = _typed_text(tokenizer).tokenizer.encode(prompt).ids
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
