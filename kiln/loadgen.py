"""One load generator for every OpenAI-compatible server `kiln bench` compares.

The same client code (the official `openai` client, async, one event loop) hits the kiln
gateway, llama.cpp's server and the FastAPI + PyTorch baseline, so a difference in the
table is a difference between servers, not between clients.

- chat: streamed chat completions, greedy (temperature 0), `max_tokens` per stream, `streams`
  concurrent streams started together. Per stream: time to first content chunk (TTFT),
  decode tokens/s after it, and the gaps between content chunks; per wave: aggregate
  tokens/s over the wave's wall time.
- embeddings: single-sentence requests from `clients` concurrent clients, each sending its
  next request when the last one answered (closed loop); sentences/s and latency.

Each call measures one *run*; a bench row is the median of several runs (`median_of`).
The arithmetic lives in pure functions that the unit tests drive with made-up timings.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np


# ----------------------------------------------------------------------------- pure maths
def percentile_ms(values_s: Sequence[float], q: float) -> float | None:
    """The q-th percentile of `values_s` (seconds) in milliseconds; None for no values."""
    if len(values_s) == 0:
        return None
    return float(np.percentile(np.asarray(values_s, dtype=np.float64) * 1e3, q))


@dataclass(frozen=True)
class StreamTiming:
    """One streamed answer: perf_counter() stamps of the request and of each content chunk."""

    start: float
    chunk_times: tuple[float, ...]  # arrival of every chunk that carried text
    end: float  # the stream closed
    completion_tokens: int  # the server's usage figure, else the number of content chunks

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first over the time from first to last content chunk."""
        if self.completion_tokens < 2 or len(self.chunk_times) < 2:
            return None
        span = self.chunk_times[-1] - self.chunk_times[0]
        return (self.completion_tokens - 1) / span if span > 0 else None

    @property
    def gaps_s(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


@dataclass(frozen=True)
class ChatRun:
    """One wave of `streams` concurrent streams (or the median of several waves)."""

    streams: int
    ttft_p50_ms: float | None  # median over the wave's streams
    decode_tokens_per_s: float | None  # per stream, median over the wave's streams
    tokens_per_s: float  # aggregate: all completion tokens / wave wall time
    gap_p50_ms: float | None  # inter-chunk gaps, all streams pooled
    gap_p95_ms: float | None
    tokens: int
    wall_s: float


def summarize_chat(timings: Sequence[StreamTiming], wall_s: float) -> ChatRun:
    if not timings:
        raise ValueError("no streams: nothing was timed")
    if wall_s <= 0:
        raise ValueError(f"wall time must be positive, got {wall_s}")
    ttfts = [t.ttft_s for t in timings if t.ttft_s is not None]
    rates = [t.decode_tokens_per_s for t in timings if t.decode_tokens_per_s is not None]
    gaps = [g for t in timings for g in t.gaps_s]
    tokens = sum(t.completion_tokens for t in timings)
    return ChatRun(
        streams=len(timings),
        ttft_p50_ms=percentile_ms(ttfts, 50),
        decode_tokens_per_s=statistics.median(rates) if rates else None,
        tokens_per_s=tokens / wall_s,
        gap_p50_ms=percentile_ms(gaps, 50),
        gap_p95_ms=percentile_ms(gaps, 95),
        tokens=tokens,
        wall_s=wall_s,
    )


@dataclass(frozen=True)
class EmbedRun:
    """Closed-loop single-sentence load from `clients` clients (or the median of runs)."""

    clients: int
    requests: int
    sentences_per_s: float
    p50_ms: float
    p95_ms: float
    wall_s: float


def summarize_embed(latencies_s: Sequence[float], wall_s: float, clients: int, sentences_per_request: int = 1) -> EmbedRun:
    if len(latencies_s) == 0:
        raise ValueError("no requests: nothing was timed")
    if wall_s <= 0:
        raise ValueError(f"wall time must be positive, got {wall_s}")
    return EmbedRun(clients, len(latencies_s), sentences_per_request * len(latencies_s) / wall_s,
                    percentile_ms(latencies_s, 50), percentile_ms(latencies_s, 95), wall_s)


def spread(values: Sequence[float]) -> float | None:
    """max / min of a row's per-run figures (1.0: the runs agree); None when undefined."""
    vals = [v for v in values if v is not None]
    return max(vals) / min(vals) if vals and min(vals) > 0 else None


NOISY_SPREAD = 2.0  # runs of one row further apart than this are flagged as noisy


def median_of(runs: Sequence):
    """Field-wise median of several runs of one dataclass (None where every run had None).
    Integer counts (tokens, requests) are summed: they say how much was measured."""
    if not runs:
        raise ValueError("no runs to take the median of")
    out = {}
    for f in fields(runs[0]):
        values = [getattr(r, f.name) for r in runs]
        if f.name in ("tokens", "requests", "wall_s"):
            out[f.name] = sum(values)
        elif f.name in ("streams", "clients"):
            out[f.name] = values[0]
        else:
            present = [v for v in values if v is not None]
            out[f.name] = statistics.median(present) if present else None
    return replace(runs[0], **out)


# ----------------------------------------------------------------------------- the clients
def _client(base_url: str, api_key: str = "none"):
    import openai

    return openai.AsyncOpenAI(base_url=base_url.rstrip("/") + "/v1", api_key=api_key, max_retries=0, timeout=600.0)


async def _chat_stream(client, model: str, prompt: str, max_tokens: int, extra_body: dict | None) -> StreamTiming:
    start = time.perf_counter()
    chunk_times: list[float] = []
    usage_tokens = None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body=extra_body or None)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunk_times.append(time.perf_counter())
        if getattr(chunk, "usage", None) is not None:
            usage_tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    # llama-cpp-python's server sends no usage in a stream: there one chunk is one token
    return StreamTiming(start, tuple(chunk_times), end, usage_tokens if usage_tokens is not None else len(chunk_times))


async def _chat_wave(base_url: str, model: str, prompts: Sequence[str], max_tokens: int, extra_body: dict | None) -> ChatRun:
    client = _client(base_url)
    try:
        t0 = time.perf_counter()
        timings = await asyncio.gather(*(_chat_stream(client, model, p, max_tokens, extra_body) for p in prompts))
        wall = time.perf_counter() - t0
    finally:
        await client.close()
    return summarize_chat(timings, wall)


def chat_wave(base_url: str, model: str, prompts: Sequence[str], max_tokens: int = 128,
              extra_body: dict | None = None) -> ChatRun:
    """One run: len(prompts) streams started together, each greedy up to `max_tokens`."""
    return asyncio.run(_chat_wave(base_url, model, prompts, max_tokens, extra_body))


async def _embed_load(base_url: str, model: str, sentences: Sequence[str], clients: int, seconds: float,
                      max_requests: int, min_requests: int) -> EmbedRun:
    client = _client(base_url)
    latencies: list[list[float]] = [[] for _ in range(clients)]

    async def one(i: int) -> None:
        await client.embeddings.create(model=model, input=sentences[i % len(sentences)], encoding_format="float")

    async def worker(k: int, deadline: float) -> None:
        i = k
        while len(latencies[k]) < max_requests and (len(latencies[k]) < min_requests or time.perf_counter() < deadline):
            t0 = time.perf_counter()
            await one(i)
            latencies[k].append(time.perf_counter() - t0)
            i += clients

    try:
        await asyncio.gather(*(one(k) for k in range(clients)))  # open and warm every connection
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k, t0 + seconds) for k in range(clients)))
        wall = time.perf_counter() - t0
    finally:
        await client.close()
    return summarize_embed([x for per in latencies for x in per], wall, clients)


def embed_load(base_url: str, model: str, sentences: Sequence[str], clients: int, seconds: float = 1.5,
               max_requests: int = 200, min_requests: int = 3) -> EmbedRun:
    """One run: `clients` closed-loop clients send one sentence per request for `seconds`
    (each at least `min_requests`, at most `max_requests`)."""
    return asyncio.run(_embed_load(base_url, model, sentences, clients, seconds, max_requests, min_requests))
