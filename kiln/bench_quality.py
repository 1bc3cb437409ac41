"""The "as right" half of the chat bench: greedy answers of the served variant and of llama.cpp
on the same GGUF, each against kiln's fp32 graph (which equals PyTorch's greedy at export).

For each conversation of export/data/quality_prompts.txt (32: facts, arithmetic, short
instructions, multi-turn), ``NEW_TOKENS`` greedy new tokens from the fp32 graph in process and
from every server, one request at a time (no co-batching). Every answer's text is encoded with
the model's tokenizer, the reference's too, so all are compared as token ids the same way:
identical over the first 32 and over all 64 tokens, and the mean matching prefix (as a fraction
of the reference's tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from rich.table import Table

NEW_TOKENS = 64
SHORT = 32


@dataclass(frozen=True)
class Agreement:
    path: str
    prompts: int
    identical_short: int  # the first SHORT tokens equal the reference's
    identical_all: int  # all NEW_TOKENS (or up to the reference's end) equal
    mean_prefix: float  # mean of matching prefix / reference tokens

    def as_dict(self) -> dict:
        return {"path": self.path, "prompts": self.prompts, f"identical_{SHORT}": self.identical_short,
                f"identical_{NEW_TOKENS}": self.identical_all, "mean_prefix": self.mean_prefix}


def agreement(path: str, reference: Sequence[list[int]], answers: Sequence[list[int]]) -> Agreement:
    from export.lm_parity import common_prefix

    refs = [r[:NEW_TOKENS] for r in reference]
    got = [a[:NEW_TOKENS] for a in answers]
    return Agreement(
        path, len(refs),
        sum(r[:SHORT] == g[:SHORT] for r, g in zip(refs, got)),
        sum(r == g for r, g in zip(refs, got)),
        sum(common_prefix(r, g) / max(1, len(r)) for r, g in zip(refs, got)) / max(1, len(refs)),
    )


def reference_answers(spec, manifest, conversations: Sequence[list[dict]], new_tokens: int = NEW_TOKENS) -> list[str]:
    """The fp32 graph's greedy answers, in process (the engine the served model runs)."""
    from kiln.bench_profile import make_engine, served_session
    from kiln_runtime.generation.chat_template import encode_prompt
    from kiln_runtime.generation.params import SamplingParams

    session, _ = served_session(spec.with_precision("fp32"), manifest)
    engine, tok, template = make_engine(spec, manifest, session, max_concurrent=1, ignore_eos=False)
    answers = []
    for i, messages in enumerate(conversations):
        engine.submit(str(i), encode_prompt(tok, messages=messages, template=template),
                      SamplingParams(max_tokens=new_tokens, temperature=0.0))
        text = []
        while engine.has_work():
            text += [ev.text for ev in engine.step()]
        answers.append("".join(text))
    return answers


def served_answers(base_url: str, model: str, conversations: Sequence[list[dict]], extra: dict | None = None,
                   new_tokens: int = NEW_TOKENS) -> list[str]:
    """Greedy answers from an OpenAI-compatible server, one request at a time."""
    import openai

    with openai.OpenAI(base_url=base_url.rstrip("/") + "/v1", api_key="none", max_retries=0, timeout=600) as client:
        return [client.chat.completions.create(model=model, messages=messages, max_tokens=new_tokens, temperature=0.0,
                                               extra_body=extra).choices[0].message.content or ""
                for messages in conversations]


def token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]


def quality_table(rows: Sequence[Agreement], about: str) -> Table:
    t = Table(title=f"greedy agreement with kiln's fp32 graph ({rows[0].prompts if rows else 0} conversations, "
                    f"{NEW_TOKENS} new tokens)", caption=about)
    for col in ("path", f"identical, first {SHORT}", f"identical, all {NEW_TOKENS}", "mean matching prefix"):
        t.add_column(col, justify="left" if col == "path" else "right")
    for r in rows:
        t.add_row(r.path, f"{r.identical_short}/{r.prompts}", f"{r.identical_all}/{r.prompts}", f"{r.mean_prefix:.2f}")
    return t
