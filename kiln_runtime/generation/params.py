"""A generation request's checks: its sampling parameters and its chat messages.

Every error is an InputError that names the field to fix (the gateway and the Triton model
answer it as the client's fault, and clients match on the field name).
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Mapping

from kiln_runtime.errors import InputError

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256  # each stop string is matched against held-back text every token
ROLES = ("system", "user", "assistant")


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
