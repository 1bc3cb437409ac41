"""The request driver (kiln_runtime/generation/driver.py), as the Triton model uses it, with
no server: input tensors in, a fake sender recording what each client would receive.

The engine is the real one over a scripted decoder: whatever the prompt, its greedy
completion spells SCRIPT, so every test knows the text a client should get.
"""

from __future__ import annotations

import json
import re
import threading

import numpy as np
import pytest

from kiln_runtime.contract import (
    GENERATION_INPUTS,
    HEALTH,
    HEALTH_FINISH_REASON,
    MAX_TOKENS,
    MESSAGES,
    PRESENCE_PENALTY,
    RANDOM_SEED,
    STOP_WORDS,
    STREAM,
    TEMPERATURE,
    TEXT_INPUT,
    TOP_K,
    TOP_P,
)
from kiln_runtime.errors import InputError
from kiln_runtime.generation.chat_template import ChatTemplate, encode_prompt
from kiln_runtime.generation.driver import Driver, FaultPlan, request_from_inputs
from kiln_runtime.generation.engine import Engine

PROMPT = "Hello, who are you?"
SCRIPT = " I am fine, thank you today. 我爱北京 🚀 ok"  # CJK and emoji split across tokens
DTYPES = {t.name: t.dtype for t in GENERATION_INPUTS}


def inputs(values: dict):
    """A request's input getter, the tensors as Triton hands them over: the contract's dtypes,
    BYTES as object arrays of bytes, every scalar a one-element array."""
    arrays = {}
    for name, value in values.items():
        items = value if isinstance(value, list) else [value]
        if DTYPES[name] == "bytes":
            arrays[name] = np.array([v.encode() if isinstance(v, str) else v for v in items], dtype=object)
        else:
            arrays[name] = np.array(items, dtype=DTYPES[name])
    return arrays.get


class ScriptedRunner:
    """A one-layer decoder with the exported graph's interface whose next token, at the
    position after the prompt's last, is script[0], then script[1], ... (the same at any
    batch row and padding). Raises while broken."""

    def __init__(self, script: list[int], prompt_len: int, vocab: int):
        self.script = np.asarray(script, dtype=np.int64)
        self.start = prompt_len - 1
        self.vocab = vocab
        self.broken = False

    def __call__(self, feeds):
        if self.broken:
            raise RuntimeError("the decoder broke")
        positions = feeds["position_ids"]
        logits = np.zeros(positions.shape + (self.vocab,), np.float32)
        nxt = self.script[(positions - self.start) % len(self.script)]
        np.put_along_axis(logits, nxt[..., None], 1.0, axis=-1)
        new = np.zeros((positions.shape[0], 1, positions.shape[1], 1), np.float32)
        return {
            "logits": logits,
            "present.0.key": np.concatenate([feeds["past_key_values.0.key"], new], axis=2),
            "present.0.value": np.concatenate([feeds["past_key_values.0.value"], new], axis=2),
        }


class Outbox:
    """A Sender that keeps what the client would receive, in order."""

    def __init__(self):
        self.sent: list[tuple] = []
        self.done = threading.Event()

    def send_text(self, text):
        self.sent.append(("text", text))

    def send_final(self, text, event):
        self.sent.append(("final", text, event.finish_reason, event.prompt_tokens, event.completion_tokens))
        self.done.set()

    def send_cancelled(self):
        self.sent.append(("cancelled",))
        self.done.set()

    def send_error(self, kind, message):
        self.sent.append(("error", kind, message))
        self.done.set()

    @property
    def streamed(self) -> str:
        return "".join(s[1] for s in self.sent if s[0] == "text")


class Log:
    """A Logger that keeps its lines."""

    def __init__(self):
        self.lines: list[tuple[str, str]] = []

    def log_info(self, message):
        self.lines.append(("info", message))

    def log_error(self, message):
        self.lines.append(("error", message))


@pytest.fixture(scope="module")
def template(tiny_llama):
    return ChatTemplate.from_dir(str(tiny_llama))


@pytest.fixture
def served(tokenizer, template):
    """make(max_concurrent, max_queue, faults) -> (driver, runner, log): the real engine over the
    scripted decoder (context 128, EOS off, so a request ends by length or a stop string)."""
    prompt_len = len(tokenizer.encode(PROMPT).ids)
    script = tokenizer.encode(SCRIPT).ids

    def make(max_concurrent=4, max_queue=None, faults=None):
        runner = ScriptedRunner(script, prompt_len, tokenizer.get_vocab_size())
        engine = Engine(runner, 1, 1, 1, [], max_concurrent, 128, tokenizer, max_queue=max_queue)
        log = Log()
        return Driver(engine, tokenizer, template, log, faults=faults), runner, log

    return make


def script_len(tokenizer) -> int:
    return len(tokenizer.encode(SCRIPT).ids)


def never() -> bool:
    return False


def run_until_idle(driver: Driver) -> None:
    while driver.engine.has_work():
        driver.step()


# ----------------------------------------------------------------------------- request parsing
def test_request_from_inputs_reads_every_contract_input(tokenizer, template):
    request = request_from_inputs(
        inputs({TEXT_INPUT: PROMPT, MAX_TOKENS: 5, TEMPERATURE: 0.5, TOP_P: 0.75, TOP_K: 3, RANDOM_SEED: 11,
                PRESENCE_PENALTY: -1.5, STOP_WORDS: ["END", "", "我"], STREAM: True}),
        tokenizer, template,
    )
    assert request.prompt_ids == tokenizer.encode(PROMPT).ids and request.prompt_field == TEXT_INPUT
    p = request.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (5, 0.5, 0.75, 3, 11)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (-1.5, 0.0, 1.0)
    assert p.stop == ["END", "我"] and request.stream is True  # empty stop words are dropped
    plain = request_from_inputs(inputs({TEXT_INPUT: PROMPT}), tokenizer, template)
    assert (plain.params.temperature, plain.params.max_tokens, plain.stream) == (0.0, None, False)  # greedy


def test_request_from_inputs_prefers_messages_and_renders_the_template(tokenizer, template):
    chat = [{"role": "user", "content": "我爱 🚀"}]
    request = request_from_inputs(inputs({MESSAGES: json.dumps(chat), TEXT_INPUT: "ignored"}), tokenizer, template)
    assert request.prompt_ids == encode_prompt(tokenizer, messages=chat, template=template)
    assert request.prompt_field == MESSAGES
    request = request_from_inputs(inputs({MESSAGES: "", TEXT_INPUT: PROMPT}), tokenizer, template)
    assert request.prompt_field == TEXT_INPUT  # empty messages: the prompt is used


@pytest.mark.parametrize(
    "values, message",
    [
        ({}, "send `text_input` (a prompt) or `messages` (JSON list of chat messages)"),
        ({TEXT_INPUT: "  \n"}, "text_input is empty; send a prompt, or chat messages in `messages`"),
        ({TEXT_INPUT: b"ok \xff"}, "text_input is not valid UTF-8 (byte 3); send UTF-8 encoded text"),
        ({MESSAGES: b"\xff[]"}, "messages is not valid UTF-8 (byte 0); send UTF-8 encoded text"),
        ({MESSAGES: "[]"}, "messages: the list is empty; send at least one message"),
        ({TEXT_INPUT: PROMPT, STOP_WORDS: ["ok", b"\xfe"]}, "stop_words is not valid UTF-8 (byte 0)"),
        ({MESSAGES: "[]", STOP_WORDS: [b"\xfe"]}, "messages: the list is empty"),  # the prompt is checked first
    ],
)
def test_request_from_inputs_errors_name_the_input(tokenizer, template, values, message):
    with pytest.raises(InputError, match=re.escape(message)):
        request_from_inputs(inputs(values), tokenizer, template)


def test_messages_need_a_chat_template(tokenizer):
    with pytest.raises(InputError, match="messages: this model has no chat template; send a plain prompt instead"):
        request_from_inputs(inputs({MESSAGES: json.dumps([{"role": "user", "content": "hi"}])}), tokenizer, None)


# ----------------------------------------------------------------------------- the driver
def test_streamed_chunks_arrive_in_order_then_one_final_with_counts(served, tokenizer):
    driver, _, _ = served()
    n = script_len(tokenizer)
    outbox = Outbox()
    driver.start()
    try:
        driver.submit(inputs({TEXT_INPUT: PROMPT, MAX_TOKENS: n, STREAM: True}), outbox, never)
        assert outbox.done.wait(30), "no final response"
    finally:
        driver.stop()
    kinds = [s[0] for s in outbox.sent]
    assert kinds[-1] == "final" and set(kinds[:-1]) == {"text"} and len(kinds) > 2
    assert all(s[1] for s in outbox.sent[:-1])  # no empty chunks are sent
    _, last, reason, prompt_tokens, completion_tokens = outbox.sent[-1]
    assert outbox.streamed + last == SCRIPT
    assert (reason, prompt_tokens, completion_tokens) == ("length", len(tokenizer.encode(PROMPT).ids), n)
    assert driver.num_pending == 0


def _streams(tokenizer, template, streams: int, stream_interval: int) -> tuple[list[Outbox], list[int]]:
    """`streams` streamed requests for the whole SCRIPT at once: their outboxes, and the
    responses sent at each engine step."""
    prompt_len = len(tokenizer.encode(PROMPT).ids)
    runner = ScriptedRunner(tokenizer.encode(SCRIPT).ids, prompt_len, tokenizer.get_vocab_size())
    engine = Engine(runner, 1, 1, 1, [], 4, 128, tokenizer)
    driver = Driver(engine, tokenizer, template, Log(), stream_interval=stream_interval)
    boxes = [Outbox() for _ in range(streams)]
    for box in boxes:
        driver.submit(inputs({TEXT_INPUT: PROMPT, MAX_TOKENS: script_len(tokenizer), STREAM: True}), box, never)
    per_step = []
    while engine.has_work():
        before = sum(len(b.sent) for b in boxes)
        driver.step()
        per_step.append(sum(len(b.sent) for b in boxes) - before)
    return boxes, per_step


@pytest.mark.parametrize("streams, interval", [(2, 2), (4, 2), (4, 3)])
def test_many_streams_get_their_text_every_interval_steps_and_the_first_token_at_once(tokenizer, template,
                                                                                     streams, interval):
    """stream_interval with more than 2 streams: a stream's first text goes out with its first
    token, the rest every `interval` steps, and nothing is lost (text + final == SCRIPT); two
    streams are never held back (as many responses as a stream sent every token)."""
    [alone], _ = _streams(tokenizer, template, 1, 1)
    every_token = sum(s[0] == "text" for s in alone.sent)
    boxes, per_step = _streams(tokenizer, template, streams, interval)
    for box in boxes:
        assert box.sent[-1][0] == "final" and box.streamed + box.sent[-1][1] == SCRIPT
        assert all(s[1] for s in box.sent[:-1])  # no empty chunks
    assert per_step[0] == streams  # every stream's first token at once
    texts = [sum(s[0] == "text" for s in box.sent) for box in boxes]
    if streams <= 2:
        assert texts == [every_token] * streams
    else:
        steps = script_len(tokenizer)  # one token a step: at most one response per `interval` of them
        assert all(t <= 1 + -(-steps // interval) for t in texts) and max(texts) < every_token, (texts, every_token)


def test_non_stream_gets_one_final_with_the_whole_text(served, tokenizer):
    driver, _, _ = served()
    n = script_len(tokenizer)
    whole, cut = Outbox(), Outbox()
    driver.submit(inputs({TEXT_INPUT: PROMPT, MAX_TOKENS: n}), whole, never)
    driver.submit(inputs({TEXT_INPUT: PROMPT, MAX_TOKENS: n, STOP_WORDS: ["today"]}), cut, never)
    run_until_idle(driver)
    prompt_tokens = len(tokenizer.encode(PROMPT).ids)
    assert whole.sent == [("final", SCRIPT, "length", prompt_tokens, n)]
    [(kind, text, reason, _, completion)] = cut.sent
    assert (kind, text, reason) == ("final", SCRIPT[: SCRIPT.index("today")], "stop") and completion < n
    assert driver.num_pending == 0


def test_a_cancelled_request_gets_an_empty_final_and_frees_its_slot(served, tokenizer):
    driver, _, log = served(max_concurrent=1)
    n = script_len(tokenizer)
    gone = threading.Event()
    first, second = Outbox(), Outbox()
    driver.submit(inputs({TEXT_INPUT: PROMPT, MAX_TOKENS: n, STREAM: True}), first, gone.is_set)
    driver.submit(inputs({TEXT_INPUT: PROMPT, MAX_TOKENS: n}), second, never)
    driver.step()
    driver.step()
    assert driver.engine.num_waiting == 1  # the second waits for the only slot
    gone.set()
    driver.step()
    assert first.sent[-1] == ("cancelled",) and {s[0] for s in first.sent[:-1]} <= {"text"}
    assert (driver.engine.num_running, driver.engine.num_waiting) == (1, 0)  # the slot went to the second
    [(level, line)] = log.lines
    assert level == "info" and re.fullmatch(r"kiln generate: request \w+ cancelled by the client; slot freed", line)
    run_until_idle(driver)
    assert second.sent == [("final", SCRIPT, "length", len(tokenizer.encode(PROMPT).ids), n)]
    assert len(first.sent) == 3 and driver.num_pending == 0  # nothing more for the cancelled one


@pytest.mark.parametrize(
    "values, message",
    [
        ({}, "send `text_input` (a prompt) or `messages` (JSON list of chat messages)"),
        ({TEXT_INPUT: PROMPT, TOP_P: 2.0}, "top_p: must be a number in (0, 1] (got 2.0)"),  # checked by the engine
        ({TEXT_INPUT: PROMPT, MAX_TOKENS: 500}, "max_tokens: text_input has 8 tokens, so at most 120 more fit the "
                                                "context of 128 (got 500)"),
    ],
)
def test_bad_input_is_invalid_and_nothing_stays_pending(served, tokenizer, values, message):
    driver, _, _ = served()
    assert len(tokenizer.encode(PROMPT).ids) == 8
    outbox = Outbox()
    driver.submit(inputs(values), outbox, never)
    assert outbox.sent == [("error", "invalid", message)]
    assert driver.num_pending == 0 and not driver.engine.has_work()


def test_a_full_queue_is_unavailable_and_the_queued_requests_still_finish(served, tokenizer):
    driver, _, _ = served(max_concurrent=1, max_queue=1)
    n = script_len(tokenizer)
    queued = [Outbox(), Outbox()]
    for outbox in queued:  # one for the free slot, one for the queue
        driver.submit(inputs({TEXT_INPUT: PROMPT, MAX_TOKENS: n}), outbox, never)
    turned_away = Outbox()
    driver.submit(inputs({TEXT_INPUT: PROMPT}), turned_away, never)
    [(kind, code, message)] = turned_away.sent
    assert (kind, code) == ("error", "unavailable") and message.startswith("Exceeds maximum queue size")
    assert driver.num_pending == 2
    run_until_idle(driver)
    assert [o.sent[0][:3] for o in queued] == [("final", SCRIPT, "length")] * 2


def test_a_failed_decode_call_fails_its_batch_and_serving_goes_on(served, tokenizer):
    driver, runner, log = served()
    n = script_len(tokenizer)
    streaming, collecting = Outbox(), Outbox()
    driver.submit(inputs({TEXT_INPUT: PROMPT, MAX_TOKENS: n, STREAM: True}), streaming, never)
    driver.submit(inputs({TEXT_INPUT: PROMPT, MAX_TOKENS: n}), collecting, never)
    driver.step()
    runner.broken = True
    driver.step()
    assert streaming.sent[-1] == GENERIC and collecting.sent == [GENERIC]  # no internals for the client
    assert failures_logged(log) == ["RuntimeError('the decoder broke')"] * 2
    assert driver.num_pending == 0 and not driver.engine.has_work() and driver.healthy
    runner.broken = False
    after = Outbox()
    driver.submit(inputs({TEXT_INPUT: PROMPT, MAX_TOKENS: n}), after, never)
    run_until_idle(driver)
    assert after.sent == [("final", SCRIPT, "length", len(tokenizer.encode(PROMPT).ids), n)]


# ----------------------------------------------------------------------------- faults
GENERIC = ("error", "internal", "generation failed for this request; see the server log")


def failures_logged(log: Log) -> list[str]:
    """The exceptions of the per-request failures in the log, in order."""
    found = [re.fullmatch(r"kiln generate: request \w+ failed in [\w ]+: (.+)", line) for _, line in log.lines]
    return [m.group(1) for m in found if m]


class PoisonRunner(ScriptedRunner):
    """The scripted decoder, except that a call fed the poison token raises."""

    def __init__(self, inner: ScriptedRunner, poison: int):
        self.__dict__.update(inner.__dict__)
        self.poison = poison

    def __call__(self, feeds):
        if self.poison in feeds["input_ids"]:
            raise RuntimeError("poisoned prompt")
        return super().__call__(feeds)


@pytest.mark.parametrize("prefill_chunk", [None, 4])
def test_a_prompt_whose_prefill_fails_fails_alone(served, tokenizer, template, prefill_chunk):
    driver, runner, log = served()
    bad_prompt = "Zebra quartz!"
    [poison, *_] = set(tokenizer.encode(bad_prompt).ids) - set(tokenizer.encode(PROMPT + SCRIPT).ids)
    driver.engine.runner = PoisonRunner(runner, poison)
    driver.engine.prefill_chunk = prefill_chunk  # 4: every prompt is prefilled in chunks while others decode
    n = script_len(tokenizer)
    first, bad, second = Outbox(), Outbox(), Outbox()
    driver.submit(inputs({TEXT_INPUT: PROMPT, MAX_TOKENS: n, STREAM: True}), first, never)
    driver.step()  # the first decodes from now on
    driver.submit(inputs({TEXT_INPUT: bad_prompt}), bad, never)
    driver.submit(inputs({TEXT_INPUT: PROMPT, MAX_TOKENS: n}), second, never)
    run_until_idle(driver)
    assert bad.sent == [GENERIC]
    assert first.streamed + first.sent[-1][1] == SCRIPT and second.sent[0][:2] == ("final", SCRIPT)
    assert failures_logged(log) == ["RuntimeError('poisoned prompt')"] and driver.healthy


def test_a_row_whose_sampling_fails_fails_alone(served, tokenizer):
    driver, _, log = served()
    n = script_len(tokenizer)
    good, bad = Outbox(), Outbox()
    driver.submit(inputs({TEXT_INPUT: PROMPT, MAX_TOKENS: n}), good, never)
    driver.submit(inputs({TEXT_INPUT: PROMPT, MAX_TOKENS: n, STREAM: True}), bad, never)
    driver.step()
    driver.step()  # both decode in one batch now
    bad_id = list(driver.engine._running)[1]  # admitted in submission order

    class Broken:
        def sample(self, logits):
            raise FloatingPointError("no distribution")

    driver.engine._running[bad_id].sampler = Broken()  # a fake: the real sampler has no known failure
    run_until_idle(driver)
    assert bad.sent[-1] == GENERIC and {s[0] for s in bad.sent[:-1]} == {"text"}
    assert good.sent == [("final", SCRIPT, "length", len(tokenizer.encode(PROMPT).ids), n)]
    assert log.lines == [("error", f"kiln generate: request {bad_id} failed in the engine: "
                                   "FloatingPointError('no distribution')")]


def test_a_failed_send_fails_that_request_only_and_frees_its_slot(served, tokenizer, template):
    _, runner, _ = served()
    log = Log()
    driver = Driver(Engine(runner, 1, 1, 1, [], 1, 128, tokenizer), tokenizer, template, log,
                    faults=FaultPlan(send=2))
    n = script_len(tokenizer)
    streamed, waiting = Outbox(), Outbox()
    driver.submit(inputs({TEXT_INPUT: PROMPT, MAX_TOKENS: n, STREAM: True}), streamed, never)
    driver.submit(inputs({TEXT_INPUT: PROMPT, MAX_TOKENS: n}), waiting, never)  # waits for the only slot
    run_until_idle(driver)
    assert streamed.sent[-1] == GENERIC and len(streamed.sent) == 2  # one chunk, then the second send failed
    assert waiting.sent == [("final", SCRIPT, "length", len(tokenizer.encode(PROMPT).ids), n)]
    assert failures_logged(log) == ["InjectedFault('injected send failure')"]
    assert driver.num_pending == 0 and driver.healthy


def test_a_failing_cancellation_check_fails_that_request_only(served, tokenizer):
    driver, _, log = served()
    n = script_len(tokenizer)
    calls = iter(range(100))

    def flaky() -> bool:
        if next(calls) == 2:
            raise ConnectionError("client state unknown")
        return False

    doomed, fine = Outbox(), Outbox()
    driver.submit(inputs({TEXT_INPUT: PROMPT, MAX_TOKENS: n}), doomed, flaky)
    driver.submit(inputs({TEXT_INPUT: PROMPT, MAX_TOKENS: n}), fine, never)
    run_until_idle(driver)
    assert doomed.sent == [GENERIC] and fine.sent[0][:2] == ("final", SCRIPT)
    assert failures_logged(log) == ["ConnectionError('client state unknown')"]
    assert driver.num_pending == 0 and not driver.engine.has_work()


def test_an_injected_step_failure_fails_the_step_and_serving_goes_on(served, tokenizer):
    driver, runner, log = served(faults=FaultPlan.parse("step:2"))
    n = script_len(tokenizer)
    hit = [Outbox(), Outbox()]
    for outbox in hit:
        driver.submit(inputs({TEXT_INPUT: PROMPT, MAX_TOKENS: n, STREAM: True}), outbox, never)
    driver.step()
    driver.step()
    assert [o.sent[-1] for o in hit] == [GENERIC, GENERIC]
    assert ("error", "kiln generate: engine step failed: InjectedFault('injected engine step failure'); "
                     "2 requests in flight failed") in log.lines
    after = Outbox()
    driver.submit(inputs({TEXT_INPUT: PROMPT, MAX_TOKENS: n}), after, never)
    run_until_idle(driver)
    assert after.sent[0][:2] == ("final", SCRIPT) and driver.healthy


BROKEN = ("error", "unavailable", "the generation engine is broken: 3 engine steps in a row failed, the last with "
                                  "RuntimeError('the decoder broke'); restart the model / server")


def test_failing_steps_in_a_row_break_the_engine_and_new_requests_are_refused_at_once(served, tokenizer):
    driver, runner, _ = served()

    def one_request(broken: bool) -> Outbox:
        runner.broken = broken
        outbox = Outbox()
        driver.submit(inputs({TEXT_INPUT: PROMPT, MAX_TOKENS: 2}), outbox, never)
        run_until_idle(driver)
        return outbox

    assert [one_request(b).sent[-1][0] for b in (True, True, False, True, True)] == ["error", "error", "final",
                                                                                     "error", "error"]
    assert driver.healthy  # a success in between: never three failures in a row
    assert one_request(True).sent == [GENERIC] and not driver.healthy
    runner.broken = False
    refused, probe = Outbox(), Outbox()
    driver.submit(inputs({TEXT_INPUT: PROMPT}), refused, never)
    driver.submit(inputs({HEALTH: True}), probe, never)
    assert refused.sent == [BROKEN] and probe.sent == [BROKEN]  # answered inside submit: nothing waits
    assert driver.num_pending == 0 and not driver.engine.has_work()


def test_a_dead_stepping_thread_fails_its_requests_and_refuses_new_ones_at_once(served):
    driver, runner, log = served(faults=FaultPlan.parse("loop:3"))
    in_flight = Outbox()
    driver.start()
    try:
        driver.submit(inputs({TEXT_INPUT: PROMPT, MAX_TOKENS: 50, STREAM: True}), in_flight, never)
        assert in_flight.done.wait(30), "the request in flight was never answered"
        driver._thread.join(30)
        assert not driver._thread.is_alive()
    finally:
        driver.stop()
    message = ("the generation engine is broken: its stepping thread died (InjectedFault('injected stepping-thread "
               "death')); restart the model / server")
    assert in_flight.sent[-1] == ("error", "unavailable", message) and in_flight.streamed
    assert not driver.healthy and driver.broken_reason in message
    late, probe = Outbox(), Outbox()
    driver.submit(inputs({MESSAGES: json.dumps([{"role": "user", "content": "hi"}])}), late, never)
    driver.submit(inputs({HEALTH: True}), probe, never)
    assert late.sent == probe.sent == [("error", "unavailable", message)]
    assert any("the stepping thread died" in line for _, line in log.lines)


def test_a_health_probe_is_answered_at_once_without_work(served):
    driver, _, _ = served()
    probe = Outbox()
    driver.submit(inputs({HEALTH: True}), probe, never)
    assert probe.sent == [("final", "", HEALTH_FINISH_REASON, 0, 0)]
    assert driver.num_pending == 0 and not driver.engine.has_work()


def test_a_bug_while_submitting_fails_that_request_only(served, tokenizer):
    driver, _, log = served()

    def get(name):
        raise KeyError(name)

    broken, fine = Outbox(), Outbox()
    driver.submit(get, broken, never)
    driver.submit(inputs({TEXT_INPUT: PROMPT, MAX_TOKENS: 3}), fine, never)
    run_until_idle(driver)
    assert broken.sent == [GENERIC] and fine.sent[0][0] == "final"
    assert failures_logged(log) == ["KeyError('health')"] and driver.num_pending == 0


def test_fault_plans_parse_and_bad_ones_name_the_entry():
    assert FaultPlan.parse("step:3, send:2,loop") == FaultPlan(step=3, send=2, loop=1)
    assert FaultPlan.parse(None) is None and FaultPlan.parse("") is None
    for bad in ("step", "step:0", "kill:1", "loop:x", "send:-1"):
        with pytest.raises(ValueError, match=re.escape(f"KILN_FAULT_INJECT: {bad!r} is not one of")):
            FaultPlan.parse(f"loop,{bad}")
