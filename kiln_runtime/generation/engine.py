"""Text generation for the causal-LM python-backend model: validation, chat template,
sampling, incremental detokenization, stop handling and a continuous-batching engine.

Copied verbatim next to the generated ``model.py`` (with ``kiln_runtime.py``), so it imports
only numpy, ``tokenizers`` and jinja2: never kiln, torch or transformers. The decoder is any
callable ``runner(feeds) -> outputs`` with the exported graph's interface (an ONNX Runtime
session in production, a torch model in the tests):

    inputs   input_ids [B,S] int64, attention_mask [B,P+S] int64 (0 = left padding),
             position_ids [B,S] int64, past_key_values.{i}.key/.value [B,kv_heads,P,head_dim]
    outputs  logits [B,S,V], present.{i}.key/.value [B,kv_heads,P+S,head_dim]

The Triton model drives one ``Engine`` from a single thread (``step`` in a loop) while
request threads call ``submit`` / ``cancel``; both are safe to call from any thread.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import threading
from collections import deque
from dataclasses import dataclass, field, replace
from time import perf_counter as _now
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from kiln_runtime.errors import InputError

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256  # each stop string is matched against held-back text every token
ROLES = ("system", "user", "assistant")
FINISH_REASONS = ("stop", "length", "cancelled")


# ----------------------------------------------------------------------------- request checks
def _integer(value, name: str, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name}: must be {allowed} (got {value!r})")
    return int(value)


def _number(value, name: str, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name}: must be {allowed} (got {value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{name}: must be {allowed} (got {value})")
    return value


@dataclass
class SamplingParams:
    """One request's generation settings (OpenAI names and defaults; max_tokens None: the
    server's default, cut to what fits the context)."""

    max_tokens: int | None = None
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    seed: int | None = None  # None: a fresh random seed
    repetition_penalty: float = 1.0  # 1: off
    presence_penalty: float = 0.0  # 0: off; subtracted once from every token already generated
    frequency_penalty: float = 0.0  # 0: off; subtracted per time a token was already generated
    stop: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: Mapping) -> "SamplingParams":
        """Build from a request's parameters object; unknown keys are the client's error."""
        if not isinstance(data, Mapping):
            raise InputError(f"parameters: must be an object (got {type(data).__name__})")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"parameters: unknown {', '.join(map(repr, unknown))} (allowed: {', '.join(sorted(known))})")
        kw = {k: v for k, v in data.items() if v is not None}
        if isinstance(kw.get("stop"), str):
            kw["stop"] = [kw["stop"]]
        return cls(**kw)

    def validate(
        self, prompt_tokens: int, max_context: int, default_max_tokens: int = 256, prompt_field: str = "prompt"
    ) -> "SamplingParams":
        """Check every field against the prompt's length; return a copy with max_tokens filled
        in and the numbers normalised to plain int / float."""
        if prompt_tokens < 1:
            raise InputError(f"{prompt_field}: empty; send at least one token of text")
        if prompt_tokens >= max_context:
            raise InputError(
                f"{prompt_field}: {prompt_tokens} tokens leave no room in the model's context of {max_context} "
                f"tokens (prompt + completion); shorten the {prompt_field}"
            )
        room = max_context - prompt_tokens
        if self.max_tokens is None:
            max_tokens = min(default_max_tokens, room)
        else:
            max_tokens = _integer(self.max_tokens, "max_tokens", "an integer >= 1")
            if max_tokens < 1:
                raise InputError(f"max_tokens: must be an integer >= 1 (got {max_tokens})")
            if max_tokens > room:
                raise InputError(
                    f"max_tokens: {prompt_field} has {prompt_tokens} tokens, so at most {room} more fit the "
                    f"context of {max_context} (got {max_tokens})"
                )
        temperature = _number(self.temperature, "temperature", "a finite number >= 0 (0 = greedy)")
        if temperature < 0:
            raise InputError(f"temperature: must be a finite number >= 0 (0 = greedy) (got {temperature})")
        top_p = _number(self.top_p, "top_p", "a number in (0, 1]")
        if not 0 < top_p <= 1:
            raise InputError(f"top_p: must be a number in (0, 1] (got {top_p})")
        top_k = _integer(self.top_k, "top_k", "an integer >= 0 (0 = off)")
        if top_k < 0:
            raise InputError(f"top_k: must be an integer >= 0 (0 = off) (got {top_k})")
        seed = None
        if self.seed is not None:
            seed = _integer(self.seed, "seed", "an integer in [0, 2**63)")
            if not 0 <= seed < 2**63:
                raise InputError(f"seed: must be an integer in [0, 2**63) (got {seed})")
        penalty = _number(self.repetition_penalty, "repetition_penalty", "a finite number > 0 (1 = off)")
        if penalty <= 0:
            raise InputError(f"repetition_penalty: must be a finite number > 0 (1 = off) (got {penalty})")
        presence = _number(self.presence_penalty, "presence_penalty", "a finite number in [-2, 2] (0 = off)")
        if not -2 <= presence <= 2:
            raise InputError(f"presence_penalty: must be a finite number in [-2, 2] (0 = off) (got {presence})")
        frequency = _number(self.frequency_penalty, "frequency_penalty", "a finite number in [-2, 2] (0 = off)")
        if not -2 <= frequency <= 2:
            raise InputError(f"frequency_penalty: must be a finite number in [-2, 2] (0 = off) (got {frequency})")
        stop = self.stop
        if isinstance(stop, str) or not isinstance(stop, (list, tuple)):
            raise InputError(f"stop: must be a list of strings (got {type(stop).__name__})")
        if len(stop) > MAX_STOP_STRINGS:
            raise InputError(f"stop: at most {MAX_STOP_STRINGS} strings (got {len(stop)})")
        for i, s in enumerate(stop):
            if not isinstance(s, str) or not s:
                raise InputError(f"stop[{i}]: must be a non-empty string (got {s!r})")
            if len(s) > MAX_STOP_CHARS:
                raise InputError(f"stop[{i}]: at most {MAX_STOP_CHARS} characters (got {len(s)})")
        return replace(
            self, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
            repetition_penalty=penalty, presence_penalty=presence, frequency_penalty=frequency, stop=list(stop),
        )


def parse_messages(raw: str | bytes) -> list[dict]:
    """A chat request's JSON -> [{"role", "content"}, ...] (roles: system, user, assistant)."""
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"messages: not valid UTF-8 (byte {err.start}); send UTF-8 encoded JSON") from None
    try:
        data = json.loads(raw)
    except (TypeError, ValueError) as err:
        raise InputError(
            f'messages: not valid JSON ({err}); send a list like [{{"role": "user", "content": "Hi"}}]'
        ) from None
    if not isinstance(data, list):
        raise InputError(f"messages: must be a JSON list of {{role, content}} objects (got {type(data).__name__})")
    if not data:
        raise InputError("messages: the list is empty; send at least one message")
    out = []
    for i, m in enumerate(data):
        if not isinstance(m, dict):
            raise InputError(f"messages[{i}]: must be an object with role and content (got {type(m).__name__})")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InputError(f"messages[{i}].role: {role!r} is not allowed (allowed: {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise InputError(f"messages[{i}].content: must be a string (got {type(content).__name__})")
        out.append({"role": role, "content": content})
    return out


# ----------------------------------------------------------------------------- chat template
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


# ----------------------------------------------------------------------------- sampling
class Sampler:
    """Picks one request's next tokens: repetition penalty (transformers' semantics, over
    prompt + output), then presence / frequency penalties (OpenAI's and vLLM's, over the
    output only), then temperature, top-k, top-p; temperature 0 is argmax (ties: lowest id,
    as torch.argmax). Its numpy Generator is seeded per request, so a seed reproduces."""

    NUCLEUS_POOL = 256  # top-p looks at this many best tokens first, the whole vocabulary if they fall short

    def __init__(self, params: SamplingParams, context_ids: Iterable[int] = ()):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self._penalize = params.repetition_penalty != 1.0
        self._seen_list = list(dict.fromkeys(int(t) for t in context_ids)) if self._penalize else []
        self._seen_set = set(self._seen_list)
        self._seen_arr: np.ndarray | None = None
        # generated tokens only (the prompt is the client's text, not the model's repetition)
        self._count = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        self._counts: dict[int, int] = {}
        self._count_arrs: tuple[np.ndarray, np.ndarray] | None = None  # (ids, amount to subtract)

    def observe(self, token: int) -> None:
        """Remember a generated token for the penalties."""
        if self._penalize and token not in self._seen_set:
            self._seen_set.add(token)
            self._seen_list.append(token)
            self._seen_arr = None
        if self._count:
            self._counts[token] = self._counts.get(token, 0) + 1
            self._count_arrs = None

    def adjusted_logits(self, logits: np.ndarray) -> np.ndarray:
        """Logits after the repetition, then the presence / frequency penalties (a copy when
        any applies)."""
        out = logits
        if self._penalize and self._seen_list:
            if self._seen_arr is None:
                self._seen_arr = np.asarray(self._seen_list, dtype=np.int64)
            out = np.array(logits, dtype=np.float32, copy=True)
            p = np.float32(self.params.repetition_penalty)
            sel = out[self._seen_arr]
            out[self._seen_arr] = np.where(sel < 0, sel * p, sel / p)
        if self._counts:
            if self._count_arrs is None:
                n = len(self._counts)
                ids = np.fromiter(self._counts.keys(), dtype=np.int64, count=n)
                counts = np.fromiter(self._counts.values(), dtype=np.float32, count=n)
                # every id here was generated at least once, so the presence term always applies
                amount = np.float32(self.params.frequency_penalty) * counts + np.float32(self.params.presence_penalty)
                self._count_arrs = ids, amount
            if out is logits:
                out = np.array(logits, dtype=np.float32, copy=True)
            ids, amount = self._count_arrs
            out[ids] -= amount
        return out

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, probabilities) that sampling draws from; greedy gives one token at 1."""
        x = self.adjusted_logits(logits)
        if self.params.temperature == 0:
            return np.array([int(np.argmax(x))]), np.ones(1)
        x = x.astype(np.float64) / self.params.temperature
        vocab = x.shape[-1]
        top_k, top_p = self.params.top_k, self.params.top_p
        if 0 < top_k < vocab:
            kth = np.partition(x, vocab - top_k)[vocab - top_k]
            ids = np.flatnonzero(x >= kth)  # ties with the k-th are kept, as transformers does
        else:
            ids = None
        cand = x if ids is None else x[ids]
        probs = np.exp(cand - cand.max())
        probs /= probs.sum()
        if top_p < 1.0:
            # keep the best tokens while the mass of those before them is < top_p
            # (transformers: drop ascending-cumulative mass <= 1 - top_p, keep at least one)
            order = None
            n = probs.shape[0]
            if n > self.NUCLEUS_POOL:
                pool = np.argpartition(-probs, self.NUCLEUS_POOL - 1)[: self.NUCLEUS_POOL]
                if probs[pool].sum() >= top_p:  # the nucleus lies inside the pool
                    order = pool[np.argsort(-probs[pool], kind="stable")]
            if order is None:
                order = np.argsort(-probs, kind="stable")
            sorted_p = probs[order]
            before = np.cumsum(sorted_p) - sorted_p
            keep = max(1, int(np.count_nonzero(before < top_p)))
            order = order[:keep]
            probs = sorted_p[:keep] / sorted_p[:keep].sum()
            ids = order if ids is None else ids[order]
        elif ids is None:
            ids = np.arange(vocab)
        return ids, probs

    def sample(self, logits: np.ndarray) -> int:
        """Next token for logits [V]; it is remembered for the penalties."""
        if self.params.temperature == 0:
            token = int(np.argmax(self.adjusted_logits(logits)))
        else:
            ids, probs = self.distribution(logits)
            cdf = np.cumsum(probs)
            i = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
            token = int(ids[min(i, len(ids) - 1)])
        self.observe(token)
        return token


# ----------------------------------------------------------------------------- text out
class IncrementalDetokenizer:
    """Turns token ids into text as they come, emitting only complete text: a character split
    across byte-level tokens is held back while the decoded tail ends with U+FFFD. Decoding
    works on a short window (the text since the last emission plus the tokens before it), so
    tokenizers that drop a leading space (sentencepiece's Metaspace) stay right, and each push
    costs the same however long the output is. With no context ids, the emitted chunks join to
    tokenizer.decode(all pushed ids, skip_special_tokens=True)."""

    def __init__(self, tokenizer, context_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids = [int(t) for t in context_ids]
        self._prefix = 0  # window start: where the text was last complete, one emission back
        self._read = len(self._ids)  # end of the already-emitted text
        self._prefix_text = self._decode(self._ids)

    def _decode(self, ids) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def push(self, token: int) -> str:
        self._ids.append(int(token))
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return ""
        new = text[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        return new

    def flush(self) -> str:
        """Whatever complete text is still held back. A character whose bytes were cut off
        (generation ended mid-character, e.g. at max_tokens) is dropped, never sent broken."""
        text = self._decode(self._ids[self._prefix :])
        new = text[len(self._prefix_text) :].rstrip("\ufffd")
        self._prefix = self._read = len(self._ids)
        self._prefix_text = ""
        return new


class StopMatcher:
    """Cuts the output at the first stop string (which is not emitted). Text that could be
    the start of a stop string is held back until the next chunk settles it."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.hit = False

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            self.hit = True
            return buf[: min(hits)], True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:n]):
                    hold = n
                    break
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


# ----------------------------------------------------------------------------- engine
@dataclass
class Event:
    """What one request got from one engine step. A request gets one event per step that gave
    it a token (text may be ""; none while a long prompt is still being prefilled in chunks);
    the last one has finished=True."""

    request_id: str
    text: str
    finished: bool
    finish_reason: str | None  # None | "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)  # tokens generated in this step


class QueueFull(Exception):
    """More requests wait than the engine's max_queue allows: the server is busy, not the
    request wrong. The message starts with Triton's own phrase for a full queue."""


def session_runner(session) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """The engine's runner over an ONNX Runtime InferenceSession: every output by name, as
    ``session.run`` returns them (fresh arrays over ORT's own buffers: nothing is copied)."""
    names = [o.name for o in session.get_outputs()]
    run = session.run

    def runner(feeds):
        return dict(zip(names, run(names, feeds)))

    return runner


DEFAULT_PREFILL_CHUNK = 16  # prompt tokens per step while others decode (the served default; see Engine)

# where a step's time goes (Engine.profile); "other" is the rest of step(): locks,
# cancellation, admission, event lists
PROFILE_PHASES = ("run_prefill", "run_decode", "kv", "sample", "detok", "other")
_PROFILE_COUNTS = ("steps", "tokens", "prefill_calls", "prefill_tokens", "decode_calls", "decode_rows", "rebuilds",
                   "compactions")


class _Seq:
    __slots__ = ("rid", "prompt", "prompt_len", "params", "sampler", "detok", "stopper", "kv", "length", "last",
                 "completion", "limit")

    def __init__(self, rid, prompt_ids, params, tokenizer, max_context):
        self.rid = rid
        self.prompt = prompt_ids  # until prefilled
        self.prompt_len = len(prompt_ids)
        self.params = params
        self.sampler = Sampler(params, prompt_ids)
        # a few prompt tokens give the detokenizer the context a leading space depends on
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids[-6:])
        self.stopper = StopMatcher(params.stop)
        # own cache while prefilling and after prefill, until it joins the batch
        self.kv: list[np.ndarray] | None = None
        self.length = 0  # tokens in the KV cache
        self.last = -1  # token to feed next
        self.completion = 0
        self.limit = min(params.max_tokens, max_context - self.prompt_len)


class Engine:
    """Continuous batching over a decoder with an explicit KV cache.

    Each ``step``: cancelled requests leave; waiting requests are admitted (FIFO, up to
    max_concurrent) and prefilled, each producing its first token; then every sequence that
    already had a token decodes one more in a single batched call. Sequences of different
    lengths share that call through left padding (attention_mask 0, per-row position_ids).
    While the batch keeps its members the presents feed the next step as they are; a join
    rebuilds the padded batch from each sequence's exact cache, a leave moves the last rows
    into the freed ones (rebuilding only when that would leave much common padding).

    ``prefill_chunk`` (None: off) bounds the stall a long prompt puts on running streams:
    while others decode, a prompt longer than that many tokens is prefilled over several
    steps, one chunk of it per step next to the decode call (its partial cache carried
    between chunks), so every running stream still gets a token each step. Shorter prompts
    are prefilled whole in the step that admits them, without waiting behind a long one.
    With nobody decoding, a prompt (or what is left of one) is prefilled in one call.

    ``profile()`` reports where step time went since ``reset_profile()`` (always on: a few
    perf_counter calls per step and per token).
    """

    def __init__(
        self,
        runner: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]],
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        eos_token_ids: Iterable[int],
        max_concurrent: int,
        max_context: int,
        tokenizer,
        *,
        default_max_tokens: int = 256,
        kv_dtype=np.float32,
        max_queue: int | None = None,
        prefill_chunk: int | None = None,
    ):
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1 (got {max_concurrent})")
        if max_queue is not None and max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 or None (got {max_queue})")
        integral = isinstance(prefill_chunk, numbers.Integral) and not isinstance(prefill_chunk, bool)
        if prefill_chunk is not None and not (integral and prefill_chunk >= 1):
            raise ValueError(f"prefill_chunk must be an integer >= 1 or None (got {prefill_chunk!r})")
        self.runner = runner
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue  # None: unbounded
        self.max_context = max_context
        self.tokenizer = tokenizer
        self.default_max_tokens = default_max_tokens
        self.kv_dtype = np.dtype(kv_dtype)
        self.prefill_chunk = None if prefill_chunk is None else int(prefill_chunk)
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
        self._empty_past = [np.zeros((1, num_kv_heads, 0, head_dim), self.kv_dtype)] * len(self.past_names)

        self._cond = threading.Condition()
        self._waiting: deque[_Seq] = deque()
        self._cancel: set[str] = set()
        self._known: set[str] = set()  # every id submitted and not yet finished
        # slots held (running, prefilling or admitted this step), as of the last admission
        # or finish; _running and _prefilling themselves change outside the lock
        self._busy = 0
        # touched only by the stepping thread
        self._running: dict[str, _Seq] = {}
        self._prefilling: deque[_Seq] = deque()  # long prompts part-way through a chunked prefill
        self._batch: list[_Seq] = []  # members of the last decode call, in row order
        self._batch_past: list[np.ndarray] = []
        self._batch_mask: np.ndarray | None = None
        self._regroup = False  # someone joined or left _running since the batch was arranged
        self.reset_profile()

    # --- called from request threads
    def submit(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
               prompt_field: str = "prompt") -> None:
        """Queue a request (validated here: InputError names the field). It is admitted at the
        next step that has a free slot. QueueFull when max_queue requests already wait beyond
        the free slots (those waiting for a free slot are about to be admitted, so a burst on
        an idle engine is not turned away before the next step takes it in)."""
        params = params.validate(len(prompt_ids), self.max_context, self.default_max_tokens, prompt_field)
        seq = _Seq(request_id, [int(t) for t in prompt_ids], params, self.tokenizer, self.max_context)
        with self._cond:
            if request_id in self._known:
                raise ValueError(f"request id {request_id!r} is already active")
            waiting = len(self._waiting)
            if self.max_queue is not None and waiting >= self.max_queue + max(0, self.max_concurrent - self._busy):
                raise QueueFull(
                    f"Exceeds maximum queue size: {waiting} requests already wait for one of {self.max_concurrent} "
                    f"slots (queue limit {self.max_queue}); retry later"
                )
            self._known.add(request_id)
            self._waiting.append(seq)
            self._cond.notify_all()

    def cancel(self, request_id: str) -> bool:
        """Stop a request; its last event (finish_reason "cancelled") comes from the next step,
        which also gives its slot to a waiting request. False if the id is not active."""
        with self._cond:
            if request_id not in self._known:
                return False
            self._cancel.add(request_id)
            self._cond.notify_all()
            return True

    def has_work(self) -> bool:
        with self._cond:
            return bool(self._waiting or self._running or self._prefilling or self._cancel)

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Block until there is something to step (for the driver thread); False on timeout."""
        with self._cond:
            return bool(self._cond.wait_for(
                lambda: self._waiting or self._running or self._prefilling or self._cancel, timeout))

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_prefilling(self) -> int:
        """Long prompts part-way through a chunked prefill (they hold a slot)."""
        return len(self._prefilling)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def drop_all(self) -> list[str]:
        """Forget every request (after step() raised): the ids still owed an answer."""
        with self._cond:
            ids = sorted(self._known)
            self._waiting.clear()
            self._cancel.clear()
            self._known.clear()
            self._running.clear()
            self._prefilling.clear()
            self._regroup = True
            self._busy = 0
            self._batch, self._batch_past, self._batch_mask = [], [], None
            return ids

    # --- profile
    def reset_profile(self) -> None:
        """Start the profile afresh (from the stepping thread, or while it is idle)."""
        self._prof = dict.fromkeys(PROFILE_PHASES[:-1], 0.0)
        self._prof_n = dict.fromkeys(_PROFILE_COUNTS, 0)
        self._prof_step = 0.0
        self._prof_step_max = 0.0

    def profile(self) -> dict:
        """Where the steps since reset_profile() spent their time:

        steps, step_s (time inside step()), step_ms / step_max_ms (mean and longest step),
        phases_s (totals), phases_ms (means per step), phases_pct (shares of step_s) for each
        of PROFILE_PHASES, and counts (tokens, prefill_calls, prefill_tokens, decode_calls,
        decode_rows, rebuilds, compactions). run_prefill / run_decode: the runner itself;
        kv: feeds, presents, the padded batch (rebuild, compaction, mask); sample: the
        samplers; detok: detokenizing, stop strings, the event; other: the rest of step()."""
        steps, total = self._prof_n["steps"], self._prof_step
        phases = dict(self._prof)
        phases["other"] = max(0.0, total - sum(phases.values()))
        per = 1000.0 / steps if steps else 0.0
        return {
            "steps": steps,
            "step_s": total,
            "step_ms": total * per,
            "step_max_ms": self._prof_step_max * 1000.0,
            "phases_s": phases,
            "phases_ms": {k: v * per for k, v in phases.items()},
            "phases_pct": {k: (100.0 * v / total if total else 0.0) for k, v in phases.items()},
            "counts": {k: v for k, v in self._prof_n.items() if k != "steps"},
        }

    # --- the stepping thread
    def step(self) -> list[Event]:
        start = _now()
        events: list[Event] = []
        with self._cond:
            for rid in self._cancel:
                seq = self._running.pop(rid, None)
                if seq is not None:
                    self._regroup = True
                else:
                    seq = _take(self._prefilling, rid) or _take(self._waiting, rid)
                if seq is not None:
                    seq.kv = None
                    self._known.discard(rid)
                    events.append(Event(rid, "", True, "cancelled", seq.prompt_len, seq.completion))
            self._cancel.clear()
            decoding = list(self._running.values())
            admitted = []
            while self._waiting and len(self._running) + len(self._prefilling) + len(admitted) < self.max_concurrent:
                admitted.append(self._waiting.popleft())
            self._busy = len(self._running) + len(self._prefilling) + len(admitted)
        # chunks only while others decode: with nobody to stall they would only add calls
        chunk = self.prefill_chunk if decoding else None
        for seq in admitted:
            if chunk is None or seq.prompt_len <= chunk:
                self._prefill(seq, seq.prompt_len, events)
            else:
                self._prefilling.append(seq)
        if self._prefilling:  # one chunk per step (or the rest), first come first served
            if self._prefill(self._prefilling[0], chunk or self.max_context, events):
                self._prefilling.popleft()
        if decoding:
            self._decode(decoding, events)
        elif self._batch:  # nobody left decoding: let go of the last batch's caches
            self._batch, self._batch_past, self._batch_mask = [], [], None
        if any(e.finished for e in events):
            with self._cond:
                for e in events:
                    if e.finished:
                        self._known.discard(e.request_id)
                self._busy = len(self._running) + len(self._prefilling)
        took = _now() - start
        self._prof_step += took
        if took > self._prof_step_max:
            self._prof_step_max = took
        self._prof_n["steps"] += 1
        return events

    def _prefill(self, seq: _Seq, n: int, events: list[Event]) -> bool:
        """Run the next n prompt tokens of seq (all that are left, at most); at the end of the
        prompt, sample its first token. True when its prompt is done."""
        t0 = _now()
        done = seq.length
        n = min(n, seq.prompt_len - done)
        feeds = dict(zip(self.past_names, self._empty_past if seq.kv is None else seq.kv))
        feeds["input_ids"] = np.asarray([seq.prompt[done : done + n]], dtype=np.int64)
        feeds["attention_mask"] = np.ones((1, done + n), dtype=np.int64)
        feeds["position_ids"] = np.arange(done, done + n, dtype=np.int64)[None]
        t1 = _now()
        out = self.runner(feeds)
        t2 = _now()
        seq.kv = [out[name] for name in self.present_names]
        seq.length = done + n
        prof, counts = self._prof, self._prof_n
        prof["run_prefill"] += t2 - t1
        counts["prefill_calls"] += 1
        counts["prefill_tokens"] += n
        if seq.length < seq.prompt_len:
            prof["kv"] += t1 - t0 + _now() - t2
            return False
        seq.prompt = None  # only the cache needs it from now on
        t3 = _now()
        token = seq.sampler.sample(out["logits"][0, -1])
        t4 = _now()
        ended = self._advance(seq, token, events)
        prof["kv"] += t1 - t0 + t3 - t2
        prof["sample"] += t4 - t3
        prof["detok"] += _now() - t4
        if ended:
            seq.kv = None
        else:
            self._running[seq.rid] = seq
            self._regroup = True
        return True

    def _decode(self, seqs: list[_Seq], events: list[Event]) -> None:
        t0 = _now()
        self._arrange(seqs)
        seqs = self._batch  # row order
        rows = len(seqs)
        feeds = dict(zip(self.past_names, self._batch_past))
        feeds["input_ids"] = np.fromiter((s.last for s in seqs), dtype=np.int64, count=rows)[:, None]
        feeds["attention_mask"] = self._batch_mask
        feeds["position_ids"] = np.fromiter((s.length for s in seqs), dtype=np.int64, count=rows)[:, None]
        t1 = _now()
        out = self.runner(feeds)
        t2 = _now()
        self._batch_past = [out[name] for name in self.present_names]
        self._batch_mask = np.concatenate([self._batch_mask, np.ones((rows, 1), np.int64)], axis=1)
        logits = out["logits"]
        t3 = _now()
        prof = self._prof
        prof["kv"] += t1 - t0 + t3 - t2
        prof["run_decode"] += t2 - t1
        self._prof_n["decode_calls"] += 1
        self._prof_n["decode_rows"] += rows
        sampling = detok = 0.0
        for b, seq in enumerate(seqs):
            seq.length += 1
            t = _now()
            token = seq.sampler.sample(logits[b, -1])
            u = _now()
            ended = self._advance(seq, token, events)
            sampling += u - t
            detok += _now() - u
            if ended:
                del self._running[seq.rid]  # the next call drops its row
                self._regroup = True
        prof["sample"] += sampling
        prof["detok"] += detok

    def _arrange(self, seqs: list[_Seq]) -> None:
        """Make the batch hold exactly seqs (those decoding this step, any row order): as it is
        when nobody joined or left; leaves only: compact; a join: rebuild. Either way, never
        wider than the context."""
        batch = self._batch
        width = self._batch_past[0].shape[2] if self._batch_past else 0
        regroup, trim = self._regroup, width + 1 > self.max_context  # only common padding gets it there
        # _running holds seqs and those whose prefill ended this step: they join next step
        self._regroup = len(self._running) != len(seqs)
        if not (regroup or trim) or (not trim and len(seqs) == len(batch) and all(s in batch for s in seqs)):
            return
        if trim or not all(s in batch for s in seqs):
            self._rebuild([s for s in batch if s in seqs] + [s for s in seqs if s not in batch])
            return
        longest = max(s.length for s in seqs)
        if 4 * (width - longest) > width or not all(a.flags.writeable for a in self._batch_past):
            self._rebuild([s for s in batch if s in seqs])  # would keep mostly padding: trim it
        else:
            self._compact(seqs)

    def _compact(self, seqs: list[_Seq]) -> None:
        """Drop the rows of those who left: the last rows move into the freed ones (a copy of
        those rows only), then every array is cut to the first len(seqs) rows (a view; the
        batch axis is outermost, so the view stays contiguous)."""
        keep = len(seqs)
        rows = list(self._batch)
        holes = [b for b in range(keep) if rows[b] not in seqs]
        movers = [b for b in range(keep, len(rows)) if rows[b] in seqs]
        arrays = self._batch_past + [self._batch_mask]
        for h, m in zip(holes, movers):
            for a in arrays:
                a[h] = a[m]
            rows[h] = rows[m]
        self._batch_past = [a[:keep] for a in self._batch_past]
        self._batch_mask = self._batch_mask[:keep]
        self._batch = rows[:keep]
        self._prof_n["compactions"] += 1

    def _rebuild(self, seqs: list[_Seq]) -> None:
        """Left-pad every member's exact cache to the longest; members of the previous batch
        have theirs cut out of its arrays (views, the padding stripped)."""
        width = self._batch_past[0].shape[2] if self._batch_past else 0
        old_rows = {id(s): b for b, s in enumerate(self._batch)}
        caches = []
        for s in seqs:
            b = old_rows.get(id(s))
            if b is not None:
                caches.append([a[b : b + 1, :, width - s.length :] for a in self._batch_past])
            else:
                caches.append(s.kv)
                s.kv = None
        longest = max(s.length for s in seqs)
        if len(seqs) == 1:
            past = [np.ascontiguousarray(a) for a in caches[0]]
        else:
            past = []
            for j in range(2 * self.num_layers):
                buf = np.zeros((len(seqs), self.num_kv_heads, longest, self.head_dim), self.kv_dtype)
                for b, s in enumerate(seqs):
                    buf[b, :, longest - s.length :] = caches[b][j][0]
                past.append(buf)
        mask = np.zeros((len(seqs), longest + 1), np.int64)
        for b, s in enumerate(seqs):
            mask[b, longest - s.length :] = 1
        self._batch_past, self._batch_mask = past, mask
        self._batch = list(seqs)
        self._prof_n["rebuilds"] += 1

    def _advance(self, seq: _Seq, token: int, events: list[Event]) -> bool:
        """Account one new token: text, stop checks, the event. True when the request ended."""
        seq.last = token
        seq.completion += 1
        text, reason = "", None
        if token in self.eos_token_ids:
            reason = "stop"
        else:
            text, hit = seq.stopper.push(seq.detok.push(token))
            if hit:
                reason = "stop"  # the stop string and whatever followed it are dropped
            elif seq.completion >= seq.limit:
                reason = "length"
        if reason is not None and not seq.stopper.hit:
            # ended by EOS or length: release held-back text (a stop string may still complete in it)
            rest, _ = seq.stopper.push(seq.detok.flush())
            text += rest + seq.stopper.flush()
            if seq.stopper.hit:
                reason = "stop"
        events.append(Event(seq.rid, text, reason is not None, reason, seq.prompt_len, seq.completion, [token]))
        self._prof_n["tokens"] += 1
        return reason is not None


def _take(queue: deque, rid: str) -> _Seq | None:
    """Remove and return the sequence with this id from a queue (None: not there)."""
    for s in queue:
        if s.rid == rid:
            queue.remove(s)
            return s
    return None
