"""The continuous-batching engine: requests join and leave a batched decode every step.

The decoder is any callable ``runner(feeds) -> outputs`` with the exported graph's
interface (an ONNX Runtime session through ``kiln_runtime.ort.session_runner`` in
production, a torch model in the tests):

    inputs   input_ids [B,S] int64, attention_mask [B,P+S] int64 (0 = left padding),
             position_ids [B,S] int64, past_key_values.{i}.key/.value [B,kv_heads,P,head_dim]
    outputs  logits [B,S,V], present.{i}.key/.value [B,kv_heads,P+S,head_dim]

The request driver steps one ``Engine`` from a single thread (``step`` in a loop) while
request threads call ``submit`` / ``cancel``; both are safe to call from any thread.

A failure that belongs to one request (its prefill, its sampling or detokenizing) ends that
request only, with an event carrying the error; a failed batched decode call ends the
requests in that call; the engine goes on serving the others and new ones either way.
"""

from __future__ import annotations

import numbers
import threading
from collections import deque
from dataclasses import dataclass, field
from time import perf_counter as _now
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from kiln_runtime.generation.detokenize import IncrementalDetokenizer, StopMatcher
from kiln_runtime.generation.params import SamplingParams
from kiln_runtime.generation.sampling import Sampler


@dataclass
class Event:
    """What one request got from one engine step. A request gets one event per step that gave
    it a token (text may be ""; none while a long prompt is still being prefilled in chunks);
    the last one has finished=True."""

    request_id: str
    text: str
    finished: bool
    finish_reason: str | None  # None until the last event, then one of contract.FINISH_REASONS
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)  # tokens generated in this step
    # set (finished, no finish_reason) when the engine failed this request: the exception,
    # for the server log (the client hears a generic message)
    error: str | None = None


def cache_names(num_layers: int) -> tuple[list[str], list[str]]:
    """The graphs' past and present tensor names, layer by layer, key then value."""
    kinds = ("key", "value")
    return ([f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in kinds],
            [f"present.{i}.{kv}" for i in range(num_layers) for kv in kinds])


class QueueFull(Exception):
    """More requests wait than the engine's max_queue allows: the server is busy, not the
    request wrong. The message starts with Triton's own phrase for a full queue."""


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
        self.past_names, self.present_names = cache_names(num_layers)
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
        whole = [seq for seq in admitted if chunk is None or seq.prompt_len <= chunk]
        self._prefilling.extend(seq for seq in admitted if seq not in whole)
        self._prefill_whole(whole, events)
        if self._prefilling:  # one chunk per step (or the rest), first come first served
            seq = self._prefilling[0]
            try:
                done = self._prefill(seq, chunk or self.max_context, events)
            except Exception as err:
                self._fail([seq], err, events)
                done = True
            if done:
                self._prefilling.popleft()
        if decoding:
            try:
                logits = self._decode_call(decoding)
            except Exception as err:  # the batched call failed: its rows fail, the batch is rebuilt next time
                self._batch, self._batch_past, self._batch_mask = [], [], None
                self._fail(decoding, err, events)
            else:
                self._decode_rows(logits, events)
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

    def _prefill_whole(self, seqs: list[_Seq], events: list[Event]) -> None:
        """Prefill each of seqs whole (admitted this step, no chunking needed); a prompt that
        fails ends its request only."""
        for seq in seqs:
            try:
                self._prefill(seq, seq.prompt_len, events)
            except Exception as err:  # this prompt's failure: the others go on
                self._fail([seq], err, events)

    def _prefill(self, seq: _Seq, n: int, events: list[Event]) -> bool:
        """Run the next n prompt tokens of seq (all that are left, at most); at the end of the
        prompt, sample its first token. True when its prompt is done."""
        t0 = _now()
        done = seq.length
        n = min(n, seq.prompt_len - done)
        logits, run_s = self._prefill_call(seq, done, n)
        self._prof_n["prefill_calls"] += 1
        return self._prefilled(seq, done + n, logits, run_s, t0, events)

    def _prefilled(self, seq: _Seq, length: int, logits: np.ndarray, run_s: float, t0: float,
                   events: list[Event]) -> bool:
        """Account a prefill call's part for seq (its cache now holds ``length`` tokens); at the
        end of its prompt, sample its first token from ``logits``. True when its prompt is done."""
        prof, counts = self._prof, self._prof_n
        counts["prefill_tokens"] += length - seq.length
        seq.length = length
        prof["run_prefill"] += run_s
        if seq.length < seq.prompt_len:
            prof["kv"] += _now() - t0 - run_s
            return False
        seq.prompt = None  # only the cache needs it from now on
        t3 = _now()
        token = seq.sampler.sample(logits)
        t4 = _now()
        ended = self._advance(seq, token, events)
        prof["kv"] += t3 - t0 - run_s
        prof["sample"] += t4 - t3
        prof["detok"] += _now() - t4
        if ended:
            seq.kv = None
        else:
            self._running[seq.rid] = seq
            self._regroup = True
        return True

    def _prefill_call(self, seq: _Seq, done: int, n: int) -> tuple[np.ndarray, float]:
        """Run prompt tokens done .. done+n-1 of seq on its own cache (kept in seq.kv): the last
        position's logits and the seconds the runner took."""
        feeds = dict(zip(self.past_names, self._empty_past if seq.kv is None else seq.kv))
        feeds["input_ids"] = np.asarray([seq.prompt[done : done + n]], dtype=np.int64)
        feeds["attention_mask"] = np.ones((1, done + n), dtype=np.int64)
        feeds["position_ids"] = np.arange(done, done + n, dtype=np.int64)[None]
        t1 = _now()
        out = self.runner(feeds)
        t2 = _now()
        seq.kv = [out[name] for name in self.present_names]
        return out["logits"][0, -1], t2 - t1

    def _fail(self, seqs: list[_Seq], err: Exception, events: list[Event]) -> None:
        """End requests the engine could not serve: each gets a last event with the error."""
        for seq in seqs:
            seq.kv = None
            if self._running.pop(seq.rid, None) is not None:
                self._regroup = True
            events.append(Event(seq.rid, "", True, None, seq.prompt_len, seq.completion, error=repr(err)))

    def _decode_call(self, seqs: list[_Seq]) -> np.ndarray:
        """The batched decode call for seqs (those decoding this step): the logits, in the
        batch's row order (self._batch)."""
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
        return logits

    def _decode_rows(self, logits: np.ndarray, events: list[Event]) -> None:
        """Each row's next token from the decode call's logits; a row that fails ends its
        request only."""
        prof = self._prof
        sampling = detok = 0.0
        for b, seq in enumerate(self._batch):
            seq.length += 1
            t = _now()
            try:
                token = seq.sampler.sample(logits[b, -1])
                u = _now()
                ended = self._advance(seq, token, events)
            except Exception as err:
                self._fail([seq], err, events)  # its row is dropped by the next call
                continue
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
