"""The continuous-batching engine over a decoder whose KV cache never moves: every sequence
owns one row (a slot) of preallocated past/present buffers that the graph writes in place
(``export.lm_graph``: GroupQueryAttention with shared buffers).

    runner.run(input_ids [b, S], lengths [b], row0) -> logits [b, 1, V]

runs rows ``row0 .. row0 + b - 1`` of the cache; ``lengths`` are each row's total length after
this call (its new tokens land at ``length - S .. length - 1``). ``runner.move(src, dst, n)``
copies the first ``n`` positions of one row into another.

The slotted sequences are kept dense in rows ``0 .. n-1`` (a sequence that leaves has its row
taken by the last one: one copy of that sequence's own cache), so the batched decode is one
call over the first n rows with no padding and no rebuild when someone joins: a new sequence
is prefilled straight into row n. Rows still being prefilled in chunks, or prefilled in this
step, ride along in the decode call with a placeholder token written at their next position
(overwritten by their next real token; their logits are not read).

Requests, sampling, stop strings, chunked prefill and the profile are the ``Engine``'s.
"""

from __future__ import annotations

from time import perf_counter as _now
from typing import Protocol

import numpy as np

from kiln_runtime.generation.engine import Engine, Event, _Seq, cache_names


PREFILL_TOKENS = 4096  # padded prompt tokens in one batched prefill call, at most


class SlotRunner(Protocol):
    def run(self, input_ids: np.ndarray, lengths: np.ndarray, row0: int) -> np.ndarray: ...

    def move(self, src: int, dst: int, length: int) -> None: ...


class SlotEngine(Engine):
    """``Engine`` with a slot per sequence (see the module); ``runner`` is a ``SlotRunner``
    whose cache has at least ``max_concurrent`` rows of ``max_context`` positions."""

    def __init__(self, runner: SlotRunner, *args, **kwargs):
        super().__init__(runner, *args, **kwargs)
        self._rows: list[_Seq] = []  # the slotted sequences, in row order (row = index)
        self._slot: dict[str, int] = {}  # request id -> row

    # --- rows
    def _take_row(self, seq: _Seq) -> int:
        row = self._slot.get(seq.rid)
        if row is None:
            row = len(self._rows)
            self._rows.append(seq)
            self._slot[seq.rid] = row
        return row

    def _free_row(self, seq: _Seq) -> None:
        """Give up seq's row: the last row moves into it (its used positions only)."""
        row = self._slot.pop(seq.rid, None)
        if row is None:
            return
        last = len(self._rows) - 1
        if row != last:
            mover = self._rows[last]
            t0 = _now()
            self.runner.move(last, row, mover.length)
            self._prof["kv"] += _now() - t0
            self._prof_n["compactions"] += 1
            self._rows[row] = mover
            self._slot[mover.rid] = row
        self._rows.pop()

    def drop_all(self) -> list[str]:
        ids = super().drop_all()
        self._rows, self._slot = [], {}
        return ids

    # --- the stepping thread (Engine.step calls these)
    def step(self) -> list[Event]:
        events = super().step()
        for e in events:  # finished, cancelled or failed: the row is free for the next one
            if e.finished:
                seq = self._rows[self._slot[e.request_id]] if e.request_id in self._slot else None
                if seq is not None:
                    self._free_row(seq)
        return events

    def _prefill_call(self, seq: _Seq, done: int, n: int) -> tuple[np.ndarray, float]:
        """Prompt tokens done .. done+n-1 straight into seq's row (taken at its first chunk)."""
        row = self._take_row(seq)
        ids = np.asarray([seq.prompt[done : done + n]], dtype=np.int64)
        lengths = np.asarray([done + n], dtype=np.int32)
        t1 = _now()
        logits = self.runner.run(ids, lengths, row)
        return logits[0, -1], _now() - t1

    def _prefill_whole(self, seqs: list[_Seq], events: list[Event]) -> None:
        """Prompts admitted together are prefilled together: one call over their new rows (they
        are the last ones, so contiguous), right-padded to the longest, up to PREFILL_TOKENS
        padded tokens a call. Every weight is read once per call, not once per prompt."""
        i = 0
        while i < len(seqs):
            group = [seqs[i]]
            while (i + len(group) < len(seqs)
                   and (len(group) + 1) * max(s.prompt_len for s in [*group, seqs[i + len(group)]]) <= PREFILL_TOKENS):
                group.append(seqs[i + len(group)])
            i += len(group)
            if len(group) == 1:
                super()._prefill_whole(group, events)
                continue
            try:
                logits, share = self._prefill_group(group)
            except Exception as err:  # the call failed: its prompts fail, the others go on
                self._fail(group, err, events)
                continue
            for b, seq in enumerate(group):  # the call's time is shared out among its prompts
                try:
                    self._prefilled(seq, seq.prompt_len, logits[b, -1], share, _now() - share, events)
                except Exception as err:  # this prompt's sampling failed: it alone ends
                    self._fail([seq], err, events)

    def _prefill_group(self, group: list[_Seq]) -> tuple[np.ndarray, float]:
        """One call over the group's new rows: (logits [b, 1, V], the call's seconds per prompt)."""
        rows = [self._take_row(s) for s in group]
        if rows != list(range(rows[0], rows[0] + len(rows))):
            raise RuntimeError(f"prefill rows {rows} are not contiguous")
        ids = np.zeros((len(group), max(s.prompt_len for s in group)), dtype=np.int64)  # right padding: never attended
        for b, s in enumerate(group):
            ids[b, : s.prompt_len] = s.prompt
        lengths = np.fromiter((s.prompt_len for s in group), dtype=np.int32, count=len(group))
        t1 = _now()
        logits = self.runner.run(ids, lengths, rows[0])
        self._prof_n["prefill_calls"] += 1
        return logits, (_now() - t1) / len(group)

    def _decode_call(self, seqs: list[_Seq]) -> np.ndarray:
        """One call over every slotted row; self._batch becomes the decoding sequences, and the
        logits returned are theirs, in that order."""
        t0 = _now()
        decoding = {id(s) for s in seqs}
        rows = self._rows
        ids = np.fromiter((s.last if id(s) in decoding else 0 for s in rows), dtype=np.int64, count=len(rows))
        # a placeholder row's next position may be the context's last: never past the cache
        lengths = np.fromiter((min(s.length + 1, self.max_context) for s in rows), dtype=np.int32, count=len(rows))
        t1 = _now()
        logits = self.runner.run(ids[:, None], lengths, 0)
        t2 = _now()
        picked = [b for b, s in enumerate(rows) if id(s) in decoding]
        self._batch = [rows[b] for b in picked]
        if len(picked) != len(rows):
            logits = logits[picked]
        prof = self._prof
        prof["kv"] += t1 - t0 + _now() - t2
        prof["run_decode"] += t2 - t1
        self._prof_n["decode_calls"] += 1
        self._prof_n["decode_rows"] += len(rows)
        return logits


class OrtSlotRunner:
    """A ``SlotRunner`` over an onnxruntime session of an ``export.lm_graph`` decoder: the
    cache is ``rows`` x ``max_context`` positions per layer, allocated once, and every call
    binds a contiguous block of its rows as both past and present (IOBinding: the graph
    writes the new positions in place, nothing is copied in or out)."""

    def __init__(self, session, past_names: list[str], present_names: list[str], rows: int, kv_heads: int,
                 max_context: int, head_dim: int, dtype=np.float32):
        self.session, self.past_names, self.present_names = session, past_names, present_names
        self.rows, self.max_context = rows, max_context
        self.cache = {n: np.zeros((rows, kv_heads, max_context, head_dim), dtype) for n in past_names}
        self._bindings: dict[tuple[int, int], tuple[object, np.ndarray]] = {}

    def _binding(self, row0: int, b: int):
        """An IOBinding with rows row0 .. row0+b-1 bound as past and present (made once per block)."""
        if (row0, b) not in self._bindings:
            import onnxruntime as ort

            if row0 < 0 or row0 + b > self.rows:
                raise ValueError(f"rows {row0}..{row0 + b - 1} outside the cache's {self.rows}")
            io = self.session.io_binding()
            for past, present in zip(self.past_names, self.present_names):
                value = ort.OrtValue.ortvalue_from_numpy(self.cache[past][row0 : row0 + b])
                io.bind_ortvalue_input(past, value)
                io.bind_ortvalue_output(present, value)
            logits = np.zeros((b, 1, self.vocab), np.float32)
            io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
            self._bindings[(row0, b)] = io, logits
        return self._bindings[(row0, b)]

    @property
    def vocab(self) -> int:
        return int(next(o for o in self.session.get_outputs() if o.name == "logits").shape[-1])

    def run(self, input_ids: np.ndarray, lengths: np.ndarray, row0: int) -> np.ndarray:
        """The rows' last-position logits [b, 1, V]: a buffer of this runner's, valid until the
        next call for the same block of rows."""
        io, logits = self._binding(row0, len(input_ids))
        io.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        io.bind_cpu_input("seqlens_k", np.asarray(lengths, dtype=np.int32) - 1)
        io.bind_cpu_input("total_sequence_length", np.asarray(int(np.max(lengths)), dtype=np.int32))
        self.session.run_with_iobinding(io)
        return logits

    def move(self, src: int, dst: int, length: int) -> None:
        for a in self.cache.values():
            a[dst, :, :length] = a[src, :, :length]


def engine_for(session, decoder: dict, tokenizer, max_concurrent: int, *, eos_token_ids=None, **kwargs) -> Engine:
    """The engine a served generation model (and every bench, smoke test and reload that must
    answer as it does) runs over ``session``, by the manifest's ``decoder`` section: a
    ``SlotEngine`` over the fused graph (kv_layout "slots"), else the ``Engine`` over the
    exported KV-concat graph. ``kwargs``: the engine's own (default_max_tokens, max_queue,
    prefill_chunk)."""
    from kiln_runtime.ort import session_runner

    layers, kv, hd = int(decoder["num_layers"]), int(decoder["num_kv_heads"]), int(decoder["head_dim"])
    eos = decoder["eos_token_ids"] if eos_token_ids is None else eos_token_ids
    context = int(decoder["max_context"])
    if decoder.get("kv_layout") == "slots":
        runner = OrtSlotRunner(session, *cache_names(layers), max_concurrent, kv, context, hd)
        return SlotEngine(runner, layers, kv, hd, eos, max_concurrent, context, tokenizer, **kwargs)
    return Engine(session_runner(session), layers, kv, hd, eos, max_concurrent, context, tokenizer, **kwargs)
