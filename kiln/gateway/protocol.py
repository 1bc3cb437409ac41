"""The OpenAI API surface the gateway speaks: request and response models, in the order
OpenAI's API reference documents them, and each request's conversion to Triton inputs.

Every field OpenAI defines is either honoured or answered with a 400 that says what is
supported: nothing is silently ignored. Unknown fields are a 400 too, as OpenAI does
("Unrecognized request argument"). Extras beyond OpenAI (vLLM's names) are marked.
Numbers are checked here against what their Triton tensor can hold (an int32 would wrap
2**32 + 5 to 5) and what the model accepts; NaN and infinities are refused.
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kiln_runtime import contract

MAX_STOP = 4  # OpenAI allows up to 4 stop sequences
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on inputs per embeddings request
SEED_LIMIT = 2**63  # the generation model takes seeds in [0, 2**63) (kiln_runtime.generation.params)


def tensor_max(name: str) -> int | float:
    """The largest value a generation input's tensor holds: a larger one would wrap or overflow."""
    dtype = next(t.dtype for t in contract.GENERATION_INPUTS if t.name == name)
    if np.issubdtype(dtype, np.integer):
        return int(np.iinfo(dtype).max)
    return float(np.finfo(dtype).max)


MAX_TOKENS_LIMIT = tensor_max(contract.MAX_TOKENS)


class APIError(Exception):
    """An answer in OpenAI's error envelope. ``status`` picks the HTTP code; 5xx carry no
    internals (the cause is logged with the request id)."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error",
             503: "service_unavailable", 500: "server_error", 501: "server_error", 504: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


def _refuse(message: str, allowed=(None, False, 0, "", [], {})):
    """A validator for a field this server cannot honour: any value but ``allowed`` is a 400
    (OpenAI defines it, so it is never silently ignored)."""

    def check(cls, v):
        if v not in allowed:
            raise ValueError(message)
        return v

    return classmethod(check)


class _Request(BaseModel):
    # OpenAI rejects unknown arguments; so do we (a typo must not silently change nothing)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


_UNION_TAG = re.compile(r"^(str|int|float|bool)$|\[")  # pydantic names the member of a union it tried


def _fields(loc: tuple) -> tuple:
    return tuple(p for p in loc if isinstance(p, int) or not _UNION_TAG.search(p))


def field_path(loc: tuple) -> str:
    """pydantic's location as a client reads it: ``messages[0].content`` (union members left out)."""
    out = ""
    for part in _fields(loc):
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else part
    return out


def validation_error(err: ValidationError) -> APIError:
    """The first field's error as OpenAI's 400: param is the field's path. Of the tries of a
    union (a string, or a list of parts) the one that got deepest says what is wrong."""
    errors = err.errors()
    first = _fields(errors[0]["loc"])
    e = max((x for x in errors if _fields(x["loc"])[:len(first)] == first), key=lambda x: len(_fields(x["loc"])))
    loc = field_path(e["loc"])
    if e["type"] == "extra_forbidden":  # the unknown name itself, whatever it looks like
        loc = ".".join(filter(None, (field_path(e["loc"][:-1]), str(e["loc"][-1]))))
        return APIError(400, f"Unrecognized request argument supplied: {loc}", loc, "unknown_parameter")
    if e["type"] == "missing":
        return APIError(400, f"Missing required parameter: '{loc}'.", loc, "missing_required_parameter")
    msg = e["msg"].removeprefix("Value error, ")
    got = e.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {json.dumps(got)[:80]})"
    return APIError(400, f"{loc}: {msg}{shown}", loc or None, "invalid_value")


# ----------------------------------------------------------------------------- chat
class ContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """Fields chat and text completions share."""

    model: str
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    n: int = 1
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=min(SEED_LIMIT - 1, tensor_max(contract.RANDOM_SEED)))
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None
    # extras (vLLM's names), not in OpenAI's API
    top_k: int = Field(0, ge=0, le=tensor_max(contract.TOP_K))
    repetition_penalty: float = Field(1.0, gt=0.0, le=tensor_max(contract.REPETITION_PENALTY))

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported (one choice per request); send several requests for more")
        return v

    _no_bias = field_validator("logit_bias")(_refuse("logit_bias is not supported by this server; leave it out"))
    _no_logprobs = field_validator("logprobs")(
        _refuse("logprobs are not supported by this server; leave it out or send false"))

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences (got {len(stops)})")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    def stops(self) -> list[str]:
        return list(self.stop or [])

    def budget_field(self) -> str:
        """The field a client set its completion budget with (named in errors about it)."""
        return "max_tokens"

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling_inputs(self, max_tokens: int | None) -> dict[str, Any]:
        """Triton generation inputs (TensorRT-LLM tensor names) for the sampling fields."""
        out: dict[str, Any] = {
            contract.TEMPERATURE: self.temperature, contract.TOP_P: self.top_p, contract.TOP_K: self.top_k,
            contract.REPETITION_PENALTY: self.repetition_penalty, contract.PRESENCE_PENALTY: self.presence_penalty,
            contract.FREQUENCY_PENALTY: self.frequency_penalty, contract.STREAM: self.stream,
            contract.STOP_WORDS: self.stops(),
        }
        if max_tokens is not None:
            out[contract.MAX_TOKENS] = max_tokens
        if self.seed is not None:
            out[contract.RANDOM_SEED] = self.seed
        return out


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    top_logprobs: int | None = None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v):
        if v and v.get("type") != "text":
            raise ValueError("only response_format {\"type\": \"text\"} is supported (no JSON mode / schemas)")
        return v

    _no_tools = field_validator("tools")(
        _refuse("tools / function calling are not supported by this server; leave it out"))
    _no_top_logprobs = field_validator("top_logprobs")(
        _refuse("top_logprobs is not supported by this server; leave it out"))

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, v):
        if v not in (None, "none"):
            raise ValueError("tool_choice is not supported (no tools); leave it out")
        return v

    def budget_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def completion_budget(self) -> int | None:
        if self.max_completion_tokens is not None and self.max_tokens is not None \
                and self.max_completion_tokens != self.max_tokens:
            raise bad_request("max_tokens and max_completion_tokens differ; send one of them", "max_completion_tokens")
        return self.max_completion_tokens or self.max_tokens

    def chat_messages(self) -> list[dict[str, str]]:
        """Messages as the chat template takes them (developer is the newer name of system)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def triton_inputs(self) -> dict[str, Any]:
        for i, m in enumerate(self.messages):
            if m.content is None and m.role != "assistant":  # only an assistant turn may be empty (OpenAI's rule)
                raise bad_request(f"messages[{i}].content: a {m.role} message needs content (a string or text "
                                  "parts)", f"messages[{i}].content", "missing_required_parameter")
        if not any(m.role == "user" for m in self.messages):
            raise bad_request("messages: include at least one message with role 'user'", "messages")
        return {contract.MESSAGES: json.dumps(self.chat_messages(), ensure_ascii=False),
                **self.sampling_inputs(self.completion_budget())}


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("send one prompt string per request (got a list of %d)" % len(v))
            v = v[0]
        if not v.strip():
            raise ValueError("prompt is empty; send some text")
        return v

    _no_echo = field_validator("echo")(_refuse("echo is not supported by this server; leave it out"))
    _no_suffix = field_validator("suffix")(_refuse("suffix (insertion) is not supported by this server; leave it out"))

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v):
        if v not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return v

    def triton_inputs(self) -> dict[str, Any]:
        # OpenAI's legacy default for completions is 16 tokens
        return {contract.TEXT_INPUT: self.prompt, **self.sampling_inputs(self.max_tokens or 16)}


# ----------------------------------------------------------------------------- embeddings
class EmbeddingRequest(_Request):
    input: str | list[str] | list[int] | list[list[int]]
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    user: str | None = None

    def texts(self) -> list[str]:
        if isinstance(self.input, str):
            texts = [self.input]
        else:
            texts = list(self.input)
        if not texts:
            raise bad_request("input: send a string or a non-empty list of strings", "input")
        if any(not isinstance(t, str) for t in texts):
            raise bad_request("input: token-id inputs are not supported; send text (a string or a list of strings)",
                              "input")
        if len(texts) > MAX_EMBEDDING_INPUTS:
            raise bad_request(f"input: at most {MAX_EMBEDDING_INPUTS} inputs per request (got {len(texts)})", "input")
        for i, t in enumerate(texts):
            if not t.strip():
                raise bad_request(f"input[{i}]: empty string; every input must contain text", "input")
        return texts


def encode_embedding(vector: np.ndarray, fmt: str) -> np.ndarray | str:
    """OpenAI's two encodings: a JSON list of floats (the float32 array itself; the app's
    JSON encoder writes it as a list), or base64 of little-endian float32."""
    v = np.asarray(vector, dtype="<f4")
    if fmt == "base64":
        return base64.b64encode(v.tobytes()).decode("ascii")
    return v


# ----------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int | None = None) -> dict:
    if completion_tokens is None:
        return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(raw: str | None) -> str | None:
    """The model's finish reasons are OpenAI's already ("stop", "length")."""
    return raw or None


def chat_completion(rid: str, model: str, created: int, text: str, reason: str | None, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": reason}],
            "usage": use, "system_fingerprint": None}


def chat_chunk(rid: str, model: str, created: int, delta: dict | None, reason: str | None = None,
               use: dict | None = None, with_usage_field: bool = False) -> dict:
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
           "system_fingerprint": None,
           "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
    if with_usage_field:
        out["usage"] = use
    return out


def text_completion(rid: str, model: str, created: int, text: str, reason: str | None, use: dict | None,
                    chunk: bool = False, with_usage_field: bool = False) -> dict:
    out = {"id": rid, "object": "text_completion", "created": created, "model": model, "system_fingerprint": None,
           "choices": [] if text is None else [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}
    if not chunk or with_usage_field:
        out["usage"] = use
    return out


def embeddings_response(model: str, vectors: np.ndarray, fmt: str, prompt_tokens: int) -> dict:
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode_embedding(v, fmt)}
                     for i, v in enumerate(vectors)],
            "usage": usage(prompt_tokens)}


def model_card(name: str, created: int, owned_by: str = "kiln", **extra) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": owned_by, **extra}


def now() -> int:
    return int(time.time())
