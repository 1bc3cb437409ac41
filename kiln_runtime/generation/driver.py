"""The request driver the Triton generation model hands its requests to, free of pb_utils.

The model adapts pb_utils to three small things: a function that gives a request's input
tensors by name (numpy arrays), a Sender per request, and a Logger (pb_utils.Logger fits
as it is). The driver owns the rest of a request's life: parsing and submitting it, the
pending map, the thread that steps the engine, streaming or collecting each request's
text, cancellation, and the answer when a step fails. (TensorRT-LLM's ``lib/decode.py``
keeps its decoder apart from the Triton glue the same way.)
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, NamedTuple, Protocol

import numpy as np

from kiln_runtime.contract import (
    MESSAGES,
    SAMPLING_FIELDS,
    STOP_WORDS,
    STREAM,
    TEXT_INPUT,
)
from kiln_runtime.errors import InputError
from kiln_runtime.generation.chat_template import ChatTemplate, encode_prompt
from kiln_runtime.generation.engine import Engine, Event, QueueFull
from kiln_runtime.generation.params import SamplingParams, parse_messages

# who must act on a failed request: the client (invalid), nobody but time (unavailable: the
# queue is full, retry), the operator (internal: a bug, logged; the client hears no details)
ErrorKind = Literal["invalid", "unavailable", "internal"]
INTERNAL_ERROR_MESSAGE = "generation failed; see the server log"

# a request's input tensor by name (None: not sent)
Inputs = Callable[[str], np.ndarray | None]


class Sender(Protocol):
    """Where one request's responses go (the Triton model wraps its response sender)."""

    def send_text(self, text: str) -> None:
        """A streamed chunk of text; more responses follow."""

    def send_final(self, text: str, event: Event) -> None:
        """The last response: its text (all of it when not streaming), with the finish reason
        and token counts of the request's last event."""

    def send_cancelled(self) -> None:
        """End a request its client cancelled, with no response."""

    def send_error(self, kind: ErrorKind, message: str) -> None:
        """End the request with an error, its last response."""


class Logger(Protocol):
    """The server log."""

    def log_info(self, message: str) -> None: ...

    def log_error(self, message: str) -> None: ...


class GenerateRequest(NamedTuple):
    """A generate request's inputs, checked: what Engine.submit takes, and how to answer."""

    prompt_ids: list[int]
    prompt_field: str  # the input the prompt came from, named in errors about its length
    params: SamplingParams
    stream: bool


def _first(get: Inputs, name: str, default: Any = None) -> Any:
    """A scalar input: the tensor's first element (default when it is absent or empty)."""
    array = get(name)
    if array is None:
        return default
    flat = array.reshape(-1)
    if flat.size == 0:
        return default
    return flat[0]


def _text(value: Any, field_name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{field_name} is not valid UTF-8 (byte {err.start}); send UTF-8 encoded text") from None
    return str(value)


def _prompt_ids(get: Inputs, tokenizer, template: ChatTemplate | None) -> tuple[list[int], str]:
    messages = _first(get, MESSAGES)
    text = _first(get, TEXT_INPUT)
    if messages is not None and len(messages):
        chat = parse_messages(_text(messages, MESSAGES))
        return encode_prompt(tokenizer, messages=chat, template=template), MESSAGES
    if text is not None:
        prompt = _text(text, TEXT_INPUT)
        if not prompt.strip():
            raise InputError(f"{TEXT_INPUT} is empty; send a prompt, or chat messages in `{MESSAGES}`")
        return encode_prompt(tokenizer, prompt=prompt), TEXT_INPUT
    raise InputError(f"send `{TEXT_INPUT}` (a prompt) or `{MESSAGES}` (JSON list of chat messages)")


def _sampling_params(get: Inputs) -> SamplingParams:
    """Raw scalars go to the validator as they are: it names the field of a bad value."""
    stop = get(STOP_WORDS)
    stops = [_text(s, STOP_WORDS) for s in stop.reshape(-1)] if stop is not None else []
    given = {key: _first(get, name) for name, key in SAMPLING_FIELDS.items() if name != STOP_WORDS}
    given = {k: v for k, v in given.items() if v is not None}
    given.setdefault("temperature", 0.0)  # Triton generate clients expect greedy unless asked
    return SamplingParams(**given, stop=[s for s in stops if s])


def request_from_inputs(get: Inputs, tokenizer, template: ChatTemplate | None) -> GenerateRequest:
    """A generate request's input tensors (the contract's names) -> what the engine takes.
    InputError names the input to fix; the prompt is checked before the sampling inputs."""
    ids, prompt_field = _prompt_ids(get, tokenizer, template)
    params = _sampling_params(get)
    return GenerateRequest(ids, prompt_field, params, bool(_first(get, STREAM, False)))


@dataclass
class _Pending:
    sender: Sender
    stream: bool
    cancelled: Callable[[], bool]
    chunks: list[str] = field(default_factory=list)  # a non-streamed request's text so far


class Driver:
    """Runs one engine for the Triton model: request threads call ``submit``; one thread of
    its own (``start`` / ``stop``) steps the engine and answers each request through its
    Sender. Streamed requests get each non-empty chunk, then a final response with the
    finish reason and token counts; the others get one final response with all the text."""

    def __init__(self, engine: Engine, tokenizer, template: ChatTemplate | None, logger: Logger):
        self.engine = engine
        self.tokenizer = tokenizer
        self.template = template
        self.logger = logger
        self._pending: dict[str, _Pending] = {}  # request id -> who to answer
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._running = False
        self._thread: threading.Thread | None = None

    @property
    def num_pending(self) -> int:
        """Requests submitted and not yet answered in full."""
        with self._lock:
            return len(self._pending)

    # ------------------------------------------------------------------ requests in
    def submit(self, get: Inputs, sender: Sender, cancelled: Callable[[], bool]) -> None:
        """Check a request and queue it (thread-safe). A bad one is answered at once as
        invalid, one the full queue turns away as unavailable. cancelled: whether its client
        has gone (asked before every step)."""
        try:
            request = request_from_inputs(get, self.tokenizer, self.template)
            rid = uuid.uuid4().hex
            with self._lock:  # pending before submitted: the loop may answer it at once
                self._pending[rid] = _Pending(sender, request.stream, cancelled)
            try:
                self.engine.submit(rid, request.prompt_ids, request.params, prompt_field=request.prompt_field)
            except (InputError, QueueFull):
                with self._lock:
                    self._pending.pop(rid, None)
                raise
            with self._wake:
                self._wake.notify()
        except InputError as err:
            sender.send_error("invalid", str(err))
        except QueueFull as err:  # busy, not wrong: answered so that clients retry
            sender.send_error("unavailable", str(err))

    # ------------------------------------------------------------------ the engine loop
    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="kiln-generate", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._running = False
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def _loop(self) -> None:
        while self._wait_for_work():
            self.step()

    def _wait_for_work(self) -> bool:
        """Block until the engine has something to step; False once stopped."""
        with self._wake:
            while self._running and not self.engine.has_work():
                self._wake.wait(timeout=1.0)
            return self._running

    def step(self) -> None:
        """One engine step (only the loop thread steps; submit may run meanwhile): cancel what
        clients cancelled, step, answer every request the step touched."""
        with self._lock:
            watched = list(self._pending.items())
        for rid, pending in watched:
            if pending.cancelled() and self.engine.cancel(rid):
                self.logger.log_info(f"kiln generate: request {rid} cancelled by the client; slot freed")
        try:
            events = self.engine.step()
        except Exception as err:  # a bug: fail the requests in flight, keep serving
            self.logger.log_error(f"kiln generate: engine step failed: {err!r}")
            dropped = self.engine.drop_all()
            with self._lock:
                failed = [self._pending.pop(rid) for rid in dropped if rid in self._pending]
            for pending in failed:
                pending.sender.send_error("internal", INTERNAL_ERROR_MESSAGE)
            return
        self._answer(events)

    def _answer(self, events: list[Event]) -> None:
        with self._lock:
            done = [(ev, self._pending.pop(ev.request_id)) for ev in events
                    if ev.finished and ev.request_id in self._pending]
            live = [(ev, self._pending[ev.request_id]) for ev in events
                    if not ev.finished and ev.request_id in self._pending]
        for ev, pending in live:
            if not pending.stream:
                pending.chunks.append(ev.text)
            elif ev.text:
                pending.sender.send_text(ev.text)
        for ev, pending in done:
            if ev.finish_reason == "cancelled":
                pending.sender.send_cancelled()
            elif pending.stream:
                pending.sender.send_final(ev.text, ev)
            else:
                pending.sender.send_final("".join(pending.chunks) + ev.text, ev)
