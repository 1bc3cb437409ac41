"""The tensor-name contract: every name a served model, its config, the gateway and the
load test agree on, defined here once.

Standard library only: this module is copied into every generated repository with the
rest of kiln_runtime, and the writer, gateway, load test and python models all read the
same names from it. Dtypes are numpy-style names ("bytes" is Triton's BYTES/TYPE_STRING);
dims exclude the batch axis (-1: any length).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    dims: tuple[int, ...]


# ----------------------------------------------------------------------------- encoders
# public tensors of the encoder ensemble / fused model (what clients send and read)
TEXT = "text"
EMBEDDING = "embedding"
LABEL = "label"
SCORES = "scores"
# what the tokenizer model can produce (the encoder graph's inputs must be among these)
TOKENIZER_FIELDS = ("input_ids", "attention_mask", "token_type_ids")
# where a tokenizer model (or the fused / generation model) keeps its tokenizer, in its version folder
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILE = f"{TOKENIZER_DIR}/tokenizer.json"


def head_outputs(task: str) -> tuple[str, ...]:
    """Output tensor names an encoder head answers, in the order the configs declare them."""
    return (LABEL, SCORES) if task == "text-classification" else (EMBEDDING,)


# ----------------------------------------------------------------------------- generation
# named as in Triton's TensorRT-LLM ensemble so its clients and genai-perf work unchanged;
# plus `messages` and the finish / usage outputs
TEXT_INPUT = "text_input"
MESSAGES = "messages"
MAX_TOKENS = "max_tokens"
TEMPERATURE = "temperature"
TOP_P = "top_p"
TOP_K = "top_k"
RANDOM_SEED = "random_seed"
REPETITION_PENALTY = "repetition_penalty"
PRESENCE_PENALTY = "presence_penalty"
FREQUENCY_PENALTY = "frequency_penalty"
STOP_WORDS = "stop_words"
STREAM = "stream"
# a probe: answered at once without generating (finish_reason "health"), or UNAVAILABLE when the engine is broken
HEALTH = "health"

TEXT_OUTPUT = "text_output"
FINISH_REASON = "finish_reason"
PROMPT_TOKENS = "prompt_tokens"
COMPLETION_TOKENS = "completion_tokens"

GENERATION_INPUTS = (
    Tensor(TEXT_INPUT, "bytes", (1,)),
    Tensor(MESSAGES, "bytes", (1,)),
    Tensor(MAX_TOKENS, "int32", (1,)),
    Tensor(TEMPERATURE, "float32", (1,)),
    Tensor(TOP_P, "float32", (1,)),
    Tensor(TOP_K, "int32", (1,)),
    Tensor(RANDOM_SEED, "uint64", (1,)),
    Tensor(REPETITION_PENALTY, "float32", (1,)),
    Tensor(PRESENCE_PENALTY, "float32", (1,)),
    Tensor(FREQUENCY_PENALTY, "float32", (1,)),
    Tensor(STOP_WORDS, "bytes", (-1,)),
    Tensor(STREAM, "bool", (1,)),
    Tensor(HEALTH, "bool", (1,)),
)
GENERATION_OUTPUTS = (
    Tensor(TEXT_OUTPUT, "bytes", (1,)),
    Tensor(FINISH_REASON, "bytes", (1,)),
    Tensor(PROMPT_TOKENS, "int32", (1,)),
    Tensor(COMPLETION_TOKENS, "int32", (1,)),
)
# the sampling inputs, by the name the engine's SamplingParams gives each (the rest match)
SAMPLING_FIELDS = {
    MAX_TOKENS: "max_tokens", TEMPERATURE: "temperature", TOP_P: "top_p", TOP_K: "top_k", RANDOM_SEED: "seed",
    REPETITION_PENALTY: "repetition_penalty", PRESENCE_PENALTY: "presence_penalty",
    FREQUENCY_PENALTY: "frequency_penalty", STOP_WORDS: "stop",
}
FINISH_REASONS = ("stop", "length", "cancelled")
HEALTH_FINISH_REASON = "health"  # the answer to a HEALTH probe
# how a generation model whose engine is broken starts its refusals: over a gRPC stream the
# UNAVAILABLE code does not reach the client, so the gateway recognises the phrase (503, not 500)
BROKEN_ENGINE = "the generation engine is broken"


# ----------------------------------------------------------------------------- model config
def model_parameters(model_config: str | Mapping) -> dict[str, str]:
    """A Triton model config's `parameters` (the JSON `args["model_config"]`, or its dict) as
    plain strings: what configs.py wrote with `_set_params`."""
    config = json.loads(model_config) if isinstance(model_config, (str, bytes)) else model_config
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
