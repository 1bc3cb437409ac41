"""The causal-LM parity gate: the KV-cache graph must reproduce PyTorch, step by step.

fp32, against the PyTorch model (transformers, eager attention):
- logits max |diff| on a left-padded batch of chat-templated prompts (prefill), then over
  ``parity_decode_steps`` decode steps that feed PyTorch's argmax token to both and carry
  the KV cache through the graph's presents; both <= ``max_logits_abs_diff``;
- greedy decoding of ``parity_new_tokens`` tokens identical to ``model.generate(do_sample=False)``
  for all ``parity_prompts`` chat prompts (export/data/chat_prompts.txt, English and not),
  with the same stopping rule (an end-of-sequence id ends a sequence, and is kept);
- perplexity on export/data/heldout.txt, reported beside PyTorch's.

Quantized variants, against the fp32 graph: perplexity <= ``max_perplexity_ratio`` x fp32's
(gated) and greedy agreement (reported: 8- and 4-bit weights are expected to change text).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from export.lm_export import DecoderShape
from kiln_core.judge import at_least, at_most
from kiln_core.manifest import ParityReport
from kiln_core.spec import DeploymentSpec, Precision
from kiln_runtime.ort import open_session

# --- data ------------------------------------------------------------------------------


def _lines(name: str) -> list[str]:
    text = resources.files("export").joinpath(f"data/{name}").read_text(encoding="utf-8")
    return [l for l in text.splitlines() if l.strip() and not l.startswith("#")]


def chat_prompts(n: int) -> list[str]:
    """``n`` user messages from export/data/chat_prompts.txt (cycled, numbered, past its end)."""
    lines = _lines("chat_prompts.txt")
    return [lines[i % len(lines)] + ("" if i < len(lines) else f" ({i // len(lines) + 1})") for i in range(n)]


def quality_prompts() -> list[list[dict]]:
    """The 32 conversations of export/data/quality_prompts.txt (facts, arithmetic, short
    instructions, multi-turn), each as chat messages."""
    import json

    return [json.loads(l) if l.startswith("[") else [{"role": "user", "content": l}]
            for l in _lines("quality_prompts.txt")]


def heldout_text() -> str:
    return "\n\n".join(_lines("heldout.txt"))


def encode_chat(tokenizer, message: str) -> list[int]:
    """A user message as the model sees it: chat template with the assistant prompt opened."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(message)["input_ids"]


def left_pad(seqs: list[list[int]], pad_id: int) -> dict[str, np.ndarray]:
    """Graph feeds for a prefill of several prompts: left padding, positions counted from each first real token."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for row, s in enumerate(seqs):
        ids[row, width - len(s) :] = s
        mask[row, width - len(s) :] = 1
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}


# --- maths -----------------------------------------------------------------------------


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target under its row of logits ([n, vocab], [n]), in float64."""
    x = np.asarray(logits, dtype=np.float64)
    top = x.max(axis=-1, keepdims=True)
    logz = top[:, 0] + np.log(np.exp(x - top).sum(axis=-1))
    return logz - x[np.arange(len(targets)), targets]


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """exp(mean NLL) of ids[1:] given the logits a causal LM produced for ids ([n, vocab], [n])."""
    return float(np.exp(token_nll(logits[:-1], np.asarray(ids)[1:]).mean()))


def windows(ids: list[int], size: int) -> list[list[int]]:
    """Consecutive non-overlapping windows of at most ``size`` tokens (each scored on its own)."""
    return [ids[i : i + size] for i in range(0, len(ids), size) if len(ids[i : i + size]) >= 2]


def windowed_perplexity(logits_of, ids: list[int], size: int) -> float:
    """Perplexity over windows; ``logits_of(window) -> [len, vocab]``. Each window's first token is not scored."""
    total, count = 0.0, 0
    for w in windows(ids, size):
        nll = token_nll(logits_of(w)[:-1], np.asarray(w[1:]))
        total, count = total + float(nll.sum()), count + len(nll)
    return float(np.exp(total / count))


def common_prefix(a: list[int], b: list[int]) -> int:
    """Tokens two generations share before they first differ (a length difference is a divergence)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def agreement(a: list[int], b: list[int]) -> float:
    """Fraction of the longer generation that is identical before the first divergence (1.0: identical)."""
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else common_prefix(a, b) / longest


# --- running the two sides -------------------------------------------------------------


class OrtLM:
    """The KV-cache graph in ONNX Runtime, with the loop the gate needs (greedy, scoring)."""

    def __init__(self, path: Path, shape: DecoderShape, threads: int = 0):
        self.session = open_session(str(path), intra_op_threads=threads)
        self.shape = shape

    def empty_past(self, batch: int) -> list[np.ndarray]:
        s = self.shape
        return [np.zeros((batch, s.num_kv_heads, 0, s.head_dim), np.float32) for _ in s.past_names]

    def step(self, feeds: dict[str, np.ndarray], past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        out = self.session.run(None, {**feeds, **dict(zip(self.shape.past_names, past))})
        return out[0], out[1:]

    def logits(self, ids: list[int]) -> np.ndarray:
        """One prefill of one sequence: [len, vocab]."""
        feeds = left_pad([ids], 0)
        return self.step(feeds, self.empty_past(1))[0][0]

    def greedy(self, prompt: list[int], max_new: int, eos_ids: list[int]) -> list[int]:
        feeds, past, new = left_pad([prompt], 0), self.empty_past(1), []
        while len(new) < max_new:
            logits, past = self.step(feeds, past)
            token = int(logits[0, -1].argmax())
            new.append(token)
            if token in eos_ids:
                break
            n = feeds["attention_mask"].shape[1]
            feeds = {
                "input_ids": np.array([[token]], np.int64),
                "attention_mask": np.ones((1, n + 1), np.int64),
                "position_ids": np.array([[n]], np.int64),
            }
        return new


class FusedLM:
    """The fused graph (export/lm_graph.py) in ONNX Runtime, with the loops the gate needs, each
    over the served slot layout: a sequence in its own row of the cache, no padding anywhere."""

    def __init__(self, path: Path, shape: DecoderShape, max_context: int, threads: int = 0, rows: int = 8):
        from kiln_runtime.generation.slots import OrtSlotRunner

        self.session = open_session(str(path), intra_op_threads=threads)
        self.shape, self.max_context = shape, max_context
        self.runner = OrtSlotRunner(self.session, shape.past_names, shape.present_names, rows, shape.num_kv_heads,
                                    max_context, shape.head_dim)

    def run(self, ids: list[list[int]], lengths: list[int], row0: int = 0) -> np.ndarray:
        """The rows' last-position logits [b, vocab] (a copy)."""
        return self.runner.run(np.asarray(ids, np.int64), np.asarray(lengths), row0)[:, 0].copy()

    def logits(self, ids: list[int]) -> np.ndarray:
        """Every position's logits [len, vocab] of one sequence: one token per call (the graph
        computes the last position only)."""
        return np.stack([self.run([[t]], [i + 1])[0] for i, t in enumerate(ids)])

    def greedy(self, prompt: list[int], max_new: int, eos_ids: list[int]) -> list[int]:
        new = [int(self.run([prompt], [len(prompt)])[0].argmax())]
        while len(new) < max_new and new[-1] not in eos_ids:
            new.append(int(self.run([[new[-1]]], [len(prompt) + len(new)])[0].argmax()))
        return new

    def batched_greedy(self, prompts: list[list[int]], steps: int) -> list[list[int]]:
        """Each prompt prefilled into its own row, then ``steps`` greedy tokens for all of them
        in one call per step (rows of different lengths, as the slot engine runs them)."""
        out = [[int(self.run([p], [len(p)], row)[0].argmax())] for row, p in enumerate(prompts)]
        for k in range(1, steps):
            logits = self.run([[o[-1]] for o in out], [len(p) + k for p in prompts])
            for row, o in enumerate(out):
                o.append(int(logits[row].argmax()))
        return out

    def timed_decode(self, prompt: list[int], steps: int) -> float:
        import time

        token = int(self.run([prompt], [len(prompt)])[0].argmax())
        t0 = time.perf_counter()
        for i in range(steps):
            token = int(self.runner.run(np.array([[token]], np.int64), np.array([len(prompt) + i + 1]), 0)[0, 0].argmax())
        return steps / (time.perf_counter() - t0)

    def logits_figures(self, ref: "LMReference") -> dict[str, float]:
        """The reference's padded prefill and decode steps, each row alone in its own row of the
        cache: max |diff| of the last position's logits after the prefill, and of each decode step."""
        mask = ref.batch["attention_mask"].astype(bool)
        prompts = [ids[m].tolist() for ids, m in zip(ref.batch["input_ids"], mask)]
        prefill = max(float(np.abs(self.run([p], [len(p)], row)[0] - ref.prefill_logits[row, -1]).max())
                      for row, p in enumerate(prompts))
        decode = 0.0
        for k, (tokens, expected) in enumerate(zip(ref.decode_tokens, ref.decode_logits), 1):
            logits = self.run(tokens.tolist(), [len(p) + k for p in prompts])
            decode = max(decode, float(np.abs(logits - expected).max()))
        return {"prefill_max_abs_diff": prefill, "decode_max_abs_diff": decode}


def open_lm(path: Path, shape: DecoderShape, decoder: dict, threads: int = 0):
    """The gate's LM over a variant's graph, by the manifest's decoder section: FusedLM for the
    fused graph (kv_layout "slots"), OrtLM for the exported KV-concat graph."""
    if decoder.get("kv_layout") == "slots":
        return FusedLM(path, shape, int(decoder["max_context"]), threads)
    return OrtLM(path, shape, threads)


def batched_greedy(lm: OrtLM, prompts: list[list[int]], steps: int, pad_id: int) -> list[list[int]]:
    """``steps`` greedy tokens for each prompt, all decoded together in one left-padded batch
    (no early stop, so every row runs every step). One prompt: the same loop, alone."""
    if isinstance(lm, FusedLM):
        return lm.batched_greedy(prompts, steps)
    feeds = left_pad(prompts, pad_id)
    past, out = lm.empty_past(len(prompts)), [[] for _ in prompts]
    for _ in range(steps):
        logits, past = lm.step(feeds, past)
        tokens = logits[:, -1].argmax(-1).astype(np.int64)[:, None]
        for row, t in enumerate(tokens[:, 0]):
            out[row].append(int(t))
        feeds = {
            "input_ids": tokens,
            "attention_mask": np.concatenate([feeds["attention_mask"], np.ones_like(tokens)], axis=1),
            "position_ids": feeds["position_ids"][:, -1:] + 1,
        }
    return out


def timed_decode(lm: OrtLM, prompt: list[int], steps: int) -> float:
    """Greedy decode tokens/s of one stream after its prefill (which is not timed)."""
    import time

    if isinstance(lm, FusedLM):
        return lm.timed_decode(prompt, steps)

    feeds, past = left_pad([prompt], 0), lm.empty_past(1)
    logits, past = lm.step(feeds, past)
    n = len(prompt)
    t0 = time.perf_counter()
    for i in range(steps):
        token = int(logits[0, -1].argmax())
        logits, past = lm.step({
            "input_ids": np.array([[token]], np.int64),
            "attention_mask": np.ones((1, n + i + 1), np.int64),
            "position_ids": np.array([[n + i]], np.int64),
        }, past)
    return steps / (time.perf_counter() - t0)


def _torch_step(model, feeds: dict[str, np.ndarray], cache):
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}, past_key_values=cache, use_cache=True)
    return out.logits.float().numpy(), out.past_key_values


def torch_greedy(model, prompt: list[int], max_new: int, eos_ids: list[int], pad_id: int) -> list[int]:
    """``model.generate(do_sample=False)`` with nothing from the checkpoint's generation defaults
    (no repetition penalty etc.): plain argmax, stopping at an eos id, which is kept."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new, eos_token_id=eos_ids, pad_token_id=pad_id
    )
    saved = model.generation_config
    model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=pad_id)
    try:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    finally:
        model.generation_config = saved
    return out[0, len(prompt) :].tolist()


@dataclass
class LMReference:
    """Everything the gate compares against, computed once with PyTorch."""

    prompts: list[list[int]]  # chat-templated token ids
    max_new: list[int]  # per prompt: parity_new_tokens, clipped to the context
    eos_ids: list[int]
    greedy: list[list[int]]  # PyTorch generate: new tokens
    batch: dict[str, np.ndarray]  # left-padded prefill feeds
    prefill_logits: np.ndarray  # [b, s, vocab]
    decode_tokens: list[np.ndarray] = field(default_factory=list)  # [b, 1] per step: PyTorch's argmax
    decode_logits: list[np.ndarray] = field(default_factory=list)  # [b, vocab] per step
    heldout: list[int] = field(default_factory=list)
    window: int = 0
    ppl: float = float("nan")  # PyTorch's, on the held-out text


def build_reference(spec: DeploymentSpec, model, tokenizer, eos_ids: list[int], progress=lambda msg: None) -> LMReference:
    g = spec.generation
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    prompts = [encode_chat(tokenizer, m) for m in chat_prompts(g.parity_prompts)]
    too_long = [i for i, p in enumerate(prompts) if len(p) >= g.max_context]
    if too_long:
        raise ValueError(f"parity prompts {too_long} do not fit max_context {g.max_context}")
    max_new = [min(g.parity_new_tokens, g.max_context - len(p)) for p in prompts]

    # logits: shortest, a middle and the longest prompt in one left-padded batch, then decode steps
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    rows = sorted({order[0], order[len(order) // 2], order[-1]})
    batch = left_pad([prompts[i] for i in rows], pad_id)
    from transformers.cache_utils import DynamicCache

    logits, cache = _torch_step(model, batch, DynamicCache())
    ref = LMReference(prompts, max_new, eos_ids, [], batch, logits)
    feeds, last = batch, logits[:, -1]
    for _ in range(g.parity_decode_steps):
        tokens = last.argmax(-1)[:, None].astype(np.int64)
        feeds = {
            "input_ids": tokens,
            "attention_mask": np.concatenate([feeds["attention_mask"], np.ones_like(tokens)], axis=1),
            "position_ids": feeds["position_ids"][:, -1:] + 1,
        }
        step_logits, cache = _torch_step(model, feeds, cache)
        last = step_logits[:, -1]
        ref.decode_tokens.append(tokens)
        ref.decode_logits.append(last)

    progress(f"PyTorch greedy decoding: {len(prompts)} prompts x {g.parity_new_tokens} new tokens")
    ref.greedy = [torch_greedy(model, p, n, eos_ids, pad_id) for p, n in zip(prompts, max_new)]

    ref.heldout = tokenizer(heldout_text())["input_ids"]
    ref.window = min(g.max_context, len(ref.heldout))

    def torch_logits(ids: list[int]) -> np.ndarray:
        return _torch_step(model, left_pad([ids], pad_id), None)[0][0]

    ref.ppl = windowed_perplexity(torch_logits, ref.heldout, ref.window)
    return ref


# --- figures and verdicts --------------------------------------------------------------


def logits_figures(ref: LMReference, lm: OrtLM) -> dict[str, float]:
    """Max |diff| of logits on the padded prefill (real tokens only) and over the decode steps."""
    if isinstance(lm, FusedLM):
        return lm.logits_figures(ref)
    logits, past = lm.step(ref.batch, lm.empty_past(ref.batch["input_ids"].shape[0]))
    real = ref.batch["attention_mask"].astype(bool)
    prefill = float(np.abs(logits - ref.prefill_logits)[real].max())
    decode, feeds = 0.0, ref.batch
    for tokens, expected in zip(ref.decode_tokens, ref.decode_logits):
        feeds = {
            "input_ids": tokens,
            "attention_mask": np.concatenate([feeds["attention_mask"], np.ones_like(tokens)], axis=1),
            "position_ids": feeds["position_ids"][:, -1:] + 1,
        }
        logits, past = lm.step(feeds, past)
        decode = max(decode, float(np.abs(logits[:, -1] - expected).max()))
    return {"prefill_max_abs_diff": prefill, "decode_max_abs_diff": decode}


def greedy_figures(reference: list[list[int]], got: list[list[int]]) -> dict[str, float]:
    """Identity count, mean agreement and the earliest divergence (-1: none) of greedy generations."""
    prefixes = [common_prefix(a, b) for a, b in zip(reference, got)]
    diverged = [p for p, a, b in zip(prefixes, reference, got) if a != b]
    return {
        "greedy_identical": float(sum(a == b for a, b in zip(reference, got))),
        "greedy_prompts": float(len(reference)),
        "greedy_agreement": float(np.mean([agreement(a, b) for a, b in zip(reference, got)])),
        "greedy_first_divergence": float(min(diverged)) if diverged else -1.0,
    }


def generate_all(ref: LMReference, lm: OrtLM) -> list[list[int]]:
    return [lm.greedy(p, n, ref.eos_ids) for p, n in zip(ref.prompts, ref.max_new)]


def graph_perplexity(ref: LMReference, lm: OrtLM) -> float:
    return windowed_perplexity(lm.logits, ref.heldout, ref.window)


def fp32_figures(ref: LMReference, lm: OrtLM) -> tuple[dict[str, float], list[list[int]], float]:
    """(figures, the graph's greedy generations, its perplexity): the latter two are the
    reference the quantized variants are judged against."""
    figures = logits_figures(ref, lm)
    generated = generate_all(ref, lm)
    figures.update(greedy_figures(ref.greedy, generated))
    ppl = graph_perplexity(ref, lm)
    figures.update({"ppl": ppl, "ppl_torch": ref.ppl, "ppl_ratio_vs_torch": ppl / ref.ppl})
    return figures, generated, ppl


def quantized_figures(ref: LMReference, fp32_generated: list[list[int]], fp32_ppl: float, lm: OrtLM) -> dict[str, float]:
    figures = greedy_figures(fp32_generated, generate_all(ref, lm))
    ppl = graph_perplexity(ref, lm)
    figures.update({"ppl": ppl, "ppl_fp32": fp32_ppl, "ppl_ratio": ppl / fp32_ppl})
    return figures


def gate_lm(spec: DeploymentSpec, precision: Precision, figures: dict[str, float], inputs: int) -> ParityReport:
    g = spec.generation
    if precision is Precision.fp32:
        thresholds = [
            at_most("prefill_max_abs_diff", g.max_logits_abs_diff),
            at_most("decode_max_abs_diff", g.max_logits_abs_diff),
            at_least("greedy_identical", g.parity_prompts),
        ]
        reference = "PyTorch fp32 (transformers, eager attention; greedy via model.generate)"
    else:
        thresholds = [at_most("ppl_ratio", g.max_perplexity_ratio)]
        reference = "the fp32 graph (perplexity on export/data/heldout.txt, greedy agreement)"
    return ParityReport.judged(reference, inputs, figures, thresholds)
