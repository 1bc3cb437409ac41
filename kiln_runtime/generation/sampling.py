"""Picking the next token from logits, per request, as transformers and OpenAI define it."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from kiln_runtime.generation.params import SamplingParams


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
