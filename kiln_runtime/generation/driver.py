"""The request driver the Triton generation model hands its requests to, free of pb_utils.

The model adapts pb_utils to three small things: a function that gives a request's input
tensors by name (numpy arrays), a Sender per request, and a Logger (pb_utils.Logger fits
as it is). The driver owns the rest of a request's life: parsing and submitting it, the
pending map, the thread that steps the engine, streaming or collecting each request's
text, cancellation, and the answer when something fails. (TensorRT-LLM's ``lib/decode.py``
keeps its decoder apart from the Triton glue the same way.)

Failures never leave a client waiting:
- one request's (its prefill, sampling or detokenizing in the engine, a send to it, its
  cancellation check): that request ends with an internal error ("generation failed for
  this request; see the server log"), logged with its id and the exception; the others go on.
- a batched decode call, or a whole engine step: the requests in it fail the same way and
  the engine serves new ones.
- the engine itself: ``max_step_failures`` failing steps in a row (a step that raised, or
  whose every request failed), or the stepping thread dying. The driver is then *broken*
  (``healthy`` False, ``broken_reason`` says why): the requests in flight and every new one
  are answered at once as unavailable ("the generation engine is broken: ...; restart the
  model / server"). Triton 2.51's python backend cannot mark a loaded model not ready, so
  this answer, and the health probe, are how readiness tells the truth.

Health probe: a request whose ``contract.HEALTH`` input is true does no work; it gets one
final response with no text, finish_reason ``contract.HEALTH_FINISH_REASON`` and zero
token counts while the driver is healthy, else the unavailable error above. Its other
inputs are not read.

Fault injection (the fault suite): ``FaultPlan.parse(os.environ.get(FAULT_ENV))``, e.g.
``KILN_FAULT_INJECT=step:3,send:2`` or ``loop``; unset, nothing is wrapped.
"""

from __future__ import annotations

import itertools
import threading
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, NamedTuple, Protocol

import numpy as np

from kiln_runtime.contract import (
    BROKEN_ENGINE,
    HEALTH,
    HEALTH_FINISH_REASON,
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
INTERNAL_ERROR_MESSAGE = "generation failed for this request; see the server log"
MAX_STEP_FAILURES = 3  # failing engine steps in a row that mean the engine itself is broken
FAULT_ENV = "KILN_FAULT_INJECT"

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


COALESCE_ABOVE = 2  # streams in one step above which stream_interval applies (fewer: every token at once)


@dataclass
class _Pending:
    sender: Sender
    stream: bool
    cancelled: Callable[[], bool]
    chunks: list[str] = field(default_factory=list)  # a non-streamed request's text so far; streamed: held back
    held_steps: int = 0  # streamed: steps whose text is held back, not sent yet
    sent: bool = False  # streamed: its first text went out


class InjectedFault(RuntimeError):
    """A failure KILN_FAULT_INJECT asked for."""


@dataclass(frozen=True)
class FaultPlan:
    """Which call fails, counted from 1 across the model's life (0: none): the nth engine
    step raises; the nth response send (text, final or cancelled; error answers are never
    failed, so the client hears what happened) raises; the stepping thread dies at its nth
    step ("loop" alone: the first), outside every per-step guard."""

    step: int = 0
    send: int = 0
    loop: int = 0

    @classmethod
    def parse(cls, spec: str | None) -> "FaultPlan | None":
        """"step:3,send:2,loop" -> a plan; None or "" -> None. ValueError names a bad entry."""
        if not spec:
            return None
        counts: dict[str, int] = {}
        for entry in spec.split(","):
            name, colon, number = entry.strip().partition(":")
            counted = number.isdecimal() and int(number) >= 1
            if name not in cls.__dataclass_fields__ or not (counted or (name == "loop" and not colon)):
                raise ValueError(
                    f"{FAULT_ENV}: {entry!r} is not one of step:N, send:N, loop[:N] (N >= 1), comma separated"
                )
            counts[name] = int(number) if counted else 1
        return cls(**counts)


def _broken_message(reason: str) -> str:
    return f"{BROKEN_ENGINE}: {reason}; restart the model / server"


def _nth_call(n: int) -> Callable[[], bool]:
    """True on the nth call only (thread-safe: itertools.count is atomic under the GIL)."""
    calls = itertools.count(1)
    return lambda: next(calls) == n


class _FaultySender:
    """A Sender whose nth response send (shared count) raises InjectedFault."""

    def __init__(self, sender: Sender, due: Callable[[], bool]):
        self.sender = sender
        self.due = due

    def _check(self) -> None:
        if self.due():
            raise InjectedFault("injected send failure")

    def send_text(self, text: str) -> None:
        self._check()
        self.sender.send_text(text)

    def send_final(self, text: str, event: Event) -> None:
        self._check()
        self.sender.send_final(text, event)

    def send_cancelled(self) -> None:
        self._check()
        self.sender.send_cancelled()

    def send_error(self, kind: ErrorKind, message: str) -> None:
        self.sender.send_error(kind, message)


class Driver:
    """Runs one engine for the Triton model: request threads call ``submit``; one thread of
    its own (``start`` / ``stop``) steps the engine and answers each request through its
    Sender. Streamed requests get each non-empty chunk, then a final response with the
    finish reason and token counts; the others get one final response with all the text.
    Failures: see the module docstring."""

    def __init__(self, engine: Engine, tokenizer, template: ChatTemplate | None, logger: Logger, *,
                 faults: FaultPlan | None = None, max_step_failures: int = MAX_STEP_FAILURES,
                 stream_interval: int = 1, coalesce_above: int = COALESCE_ABOVE):
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1 (got {stream_interval})")
        self.stream_interval, self.coalesce_above = stream_interval, coalesce_above
        self._interval = 1  # this step's: stream_interval when more than coalesce_above streams got text
        self.engine = engine
        self.tokenizer = tokenizer
        self.template = template
        self.logger = logger
        self.max_step_failures = max_step_failures
        self._pending: dict[str, _Pending] = {}  # request id -> who to answer
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._running = False
        self._thread: threading.Thread | None = None
        self._broken: str | None = None  # why the engine cannot serve; None: healthy
        self._failed_steps = 0  # failing steps in a row
        self._engine_step = engine.step
        self._send_fault: Callable[[], bool] | None = None
        self._loop_fault: Callable[[], bool] | None = None
        if faults is not None:
            logger.log_info(f"kiln generate: fault injection on: {faults}")
            if faults.step:
                self._engine_step = _failing_step(engine.step, _nth_call(faults.step))
            if faults.send:
                self._send_fault = _nth_call(faults.send)
            if faults.loop:
                self._loop_fault = _nth_call(faults.loop)

    @property
    def num_pending(self) -> int:
        """Requests submitted and not yet answered in full."""
        with self._lock:
            return len(self._pending)

    @property
    def broken_reason(self) -> str | None:
        """Why the engine cannot serve (None: it can)."""
        if self._broken is not None:
            return self._broken
        thread = self._thread
        if self._running and thread is not None and not thread.is_alive():
            return "its stepping thread has stopped"
        return None

    @property
    def healthy(self) -> bool:
        return self.broken_reason is None

    # ------------------------------------------------------------------ requests in
    def submit(self, get: Inputs, sender: Sender, cancelled: Callable[[], bool]) -> None:
        """Check a request and queue it (thread-safe; never raises). A bad one is answered at
        once as invalid, one the full queue turns away, or any while broken, as unavailable;
        a health probe is answered at once. cancelled: whether its client has gone (asked
        before every step)."""
        if self._send_fault is not None:
            sender = _FaultySender(sender, self._send_fault)
        rid = uuid.uuid4().hex
        try:
            self._submit(rid, get, sender, cancelled)
        except Exception as err:  # a bug: this request only
            with self._lock:
                self._pending.pop(rid, None)
            self.engine.cancel(rid)  # in case it was queued
            self._fail_request(rid, sender, "submit", err)

    def _submit(self, rid: str, get: Inputs, sender: Sender, cancelled: Callable[[], bool]) -> None:
        if bool(_first(get, HEALTH, False)):
            reason = self.broken_reason
            if reason is not None:
                sender.send_error("unavailable", _broken_message(reason))
            else:
                sender.send_final("", Event(rid, "", True, HEALTH_FINISH_REASON, 0, 0))
            return
        try:
            request = request_from_inputs(get, self.tokenizer, self.template)
        except InputError as err:
            sender.send_error("invalid", str(err))
            return
        with self._lock:  # pending before submitted: the loop may answer it at once
            reason = self.broken_reason
            if reason is None:
                self._pending[rid] = _Pending(sender, request.stream, cancelled)
        if reason is not None:
            sender.send_error("unavailable", _broken_message(reason))
            return
        try:
            self.engine.submit(rid, request.prompt_ids, request.params, prompt_field=request.prompt_field)
        except (InputError, QueueFull) as err:
            with self._lock:
                owed = self._pending.pop(rid, None) is not None  # else the driver broke and answered it
            if owed:  # a full queue: busy, not wrong; answered so that clients retry
                sender.send_error("invalid" if isinstance(err, InputError) else "unavailable", str(err))
            return
        with self._wake:
            self._wake.notify()

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
        """Step while there is work; whatever escapes the per-step guards breaks the driver
        (so that nothing waits on a thread that is gone)."""
        try:
            while self._wait_for_work():
                if self._loop_fault is not None and self._loop_fault():
                    raise InjectedFault("injected stepping-thread death")
                self.step()
        except BaseException as err:  # the thread ends here, so nothing is re-raised
            self.logger.log_error(f"kiln generate: the stepping thread died:\n{traceback.format_exc()}")
            self._break(f"its stepping thread died ({err!r})")

    def _wait_for_work(self) -> bool:
        """Block until the engine has something to step; False once stopped or broken."""
        with self._wake:
            while self._running and self._broken is None and not self.engine.has_work():
                self._wake.wait(timeout=1.0)
            return self._running and self._broken is None

    def step(self) -> None:
        """One engine step (only the loop thread steps; submit may run meanwhile): cancel what
        clients cancelled, step, answer every request the step touched."""
        with self._lock:
            watched = list(self._pending.items())
        for rid, pending in watched:
            try:
                gone = pending.cancelled()
            except Exception as err:
                self._drop(rid, pending, "its cancellation check", err)
                continue
            if gone and self.engine.cancel(rid):
                self.logger.log_info(f"kiln generate: request {rid} cancelled by the client; slot freed")
        try:
            events = self._engine_step()
        except Exception as err:  # the engine's state is unknown: fail what is in flight, keep serving
            dropped = self.engine.drop_all()
            self.logger.log_error(f"kiln generate: engine step failed: {err!r}; "
                                  f"{len(dropped)} requests in flight failed")
            with self._lock:
                failed = [(rid, self._pending.pop(rid)) for rid in dropped if rid in self._pending]
            for rid, pending in failed:
                self._fail_request(rid, pending.sender, None, None)
            self._count_step(ok=False, why=repr(err))
            return
        self._answer(events)
        errors = [ev.error for ev in events if ev.error is not None]
        if errors and len(errors) == len(events):
            self._count_step(ok=False, why=errors[-1])
        elif any(ev.finish_reason != "cancelled" for ev in events):
            self._count_step(ok=True)

    def _count_step(self, ok: bool, why: str = "") -> None:
        """Failing steps in a row: max_step_failures of them mean the engine is broken."""
        self._failed_steps = 0 if ok else self._failed_steps + 1
        if self._failed_steps >= self.max_step_failures:
            self._break(f"{self._failed_steps} engine steps in a row failed, the last with {why}")

    def _answer(self, events: list[Event]) -> None:
        with self._lock:
            touched = [(ev, self._pending.pop(ev.request_id) if ev.finished else self._pending[ev.request_id])
                       for ev in events if ev.request_id in self._pending]
        # with many streams each step, their texts go out every stream_interval steps (each
        # response costs the python backend, Triton and the gateway the same whatever its length)
        self._interval = self.stream_interval if len(touched) > self.coalesce_above else 1
        for ev, pending in touched:
            if ev.error is not None:
                self.logger.log_error(f"kiln generate: request {ev.request_id} failed in the engine: {ev.error}")
                self._fail_request(ev.request_id, pending.sender, None, None)
                continue
            try:
                self._deliver(ev, pending)
            except Exception as err:
                self._drop(ev.request_id, pending, "a send", err)

    def _deliver(self, ev: Event, pending: _Pending) -> None:
        if not ev.finished:
            if not pending.stream:
                pending.chunks.append(ev.text)
                return
            pending.chunks.append(ev.text)
            pending.held_steps += 1
            # the first text at once (time to first token); then every _interval steps
            if pending.sent and pending.held_steps < self._interval:
                return
            text = "".join(pending.chunks)
            if text:
                pending.chunks.clear()
                pending.held_steps = 0
                pending.sent = True
                pending.sender.send_text(text)
        elif ev.finish_reason == "cancelled":
            pending.sender.send_cancelled()
        else:  # streamed: what was held back goes with the final response
            pending.sender.send_final("".join(pending.chunks) + ev.text, ev)

    def _drop(self, rid: str, pending: _Pending, where: str, err: Exception) -> None:
        """Fail one request the driver could not serve (the engine lets go of it too)."""
        with self._lock:
            self._pending.pop(rid, None)
        self.engine.cancel(rid)  # its "cancelled" event finds nobody pending: nothing more is sent
        self._fail_request(rid, pending.sender, where, err)

    def _fail_request(self, rid: str, sender: Sender, where: str | None, err: Exception | None) -> None:
        """Log (where / err: what failed, unless logged already) and answer one failed request."""
        if err is not None:
            self.logger.log_error(f"kiln generate: request {rid} failed in {where}: {err!r}")
        try:
            sender.send_error("internal", INTERNAL_ERROR_MESSAGE)
        except Exception as send_err:
            self.logger.log_error(f"kiln generate: request {rid}: its error could not be sent: {send_err!r}")

    def _break(self, reason: str) -> None:
        """The engine cannot serve: answer every request in flight, and every new one, at once."""
        with self._wake:
            if self._broken is not None:
                return
            self._broken = reason
            owed = list(self._pending.items())
            self._pending.clear()
            self._wake.notify_all()
        self.logger.log_error(f"kiln generate: {_broken_message(reason)} ({len(owed)} requests in flight failed)")
        message = _broken_message(reason)
        for rid, pending in owed:
            try:
                pending.sender.send_error("unavailable", message)
            except Exception as err:
                self.logger.log_error(f"kiln generate: request {rid}: its error could not be sent: {err!r}")
        try:
            self.engine.drop_all()
        except Exception as err:
            self.logger.log_error(f"kiln generate: could not clear the broken engine: {err!r}")


def _failing_step(step: Callable[[], list[Event]], due: Callable[[], bool]) -> Callable[[], list[Event]]:
    """engine.step, except that the call `due` picks raises InjectedFault."""

    def faulty() -> list[Event]:
        if due():
            raise InjectedFault("injected engine step failure")
        return step()

    return faulty
