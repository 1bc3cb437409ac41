"""Helpers the tests share (pytest puts tests/support on sys.path; the repo root never is):
tiny random checkpoints, tiny specs, the packaged exports in build/, a started stack."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KILN = Path(sys.executable).parent / "kiln"

# sentences the MiniLM serving tests send (several scripts, an emoji, one long)
SENTENCES = [
    "A man is playing a guitar.",
    "The new movie is awesome.",
    "我爱北京天安门。",
    "Emoji work too 🚀🔥",
    "How do I reset my password?",
    "The weather is lovely today and we are going for a long walk along the river.",
    "Paris is the capital of France.",
    "Stocks fell sharply after the announcement.",
]


TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?") + [
    "the", "a", "is", "on", "of", "and", "man", "guitar", "play", "##ing", "##s", "street", "hello", "world",
    "我", "爱", "北", "京", "🚀",
]


def build_tiny_bert(folder: Path, classifier: bool = False) -> Path:
    """A random 2-layer BERT (hidden 32) with a real WordPiece tokenizer, saved as a checkpoint."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        BertTokenizerFast,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(TINY_VOCAB) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    cfg = BertConfig(
        vocab_size=len(TINY_VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        id2label={0: "negative", 1: "neutral", 2: "positive"} if classifier else None,
        label2id={"negative": 0, "neutral": 1, "positive": 2} if classifier else None,
    )
    torch.manual_seed(0)
    model = (BertForSequenceClassification if classifier else BertModel)(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_spec(checkpoint: Path, workdir: Path, **kw):
    from kiln_core.spec import parse_spec

    data = {
        "name": kw.pop("name", "tiny"),
        "source": {"kind": "folder", "path": str(checkpoint)},
        "max_length": 64,
        "precisions": ["fp32", "fp16"],
        "serve_precision": "fp32",
        "workdir": str(workdir),
        "batching": {"max_batch_size": 16, "preferred_batch_sizes": [4, 8], "max_queue_delay_us": 1000},
    }
    data.update(kw)
    return parse_spec(data)


def packaged_export(name: str):
    """A packaged spec's export in the repository's build/ folder, where `make demo` leaves it:
    reused when it matches the spec (the same rule as `kiln demo`), exported there otherwise,
    so CI exports each packaged model once. (spec, manifest)."""
    from rich.console import Console

    from export.reuse import ensure_export
    from kiln_core.spec import load_spec

    workdir = os.path.relpath(REPO / "build")  # as the Makefile names it: the same checkpoint path
    spec = load_spec(name, workdir=workdir)
    return spec, ensure_export(spec, Console(stderr=True))


def serve(repositories, workdir: Path, gateway=None):
    """A started kiln.stack.Stack: Triton on free ports serving `repositories` (one path or
    several), and the gateway in front when `gateway` (GatewayOptions) is given. A fixture
    uses it as `with serve(...) as stack:`, which stops everything on the way out."""
    from kiln.stack import Stack

    return Stack(repositories, workdir, gateway=gateway).start()


def export_and_serve(spec, workdir: Path):
    """The whole path for a fixture: export, write the spec's repository, start Triton (a
    started Stack)."""
    from export.pipeline import run_export
    from model_repository.writer import write_repository

    run_export(spec)
    return serve(write_repository(spec), workdir)


CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TINY_LM_TEXT = [
    "The capital of France is Paris.", "Hello, how are you today?", "我爱北京天安门。", "Emoji: 🚀🔥🎉",
    "Triton serves models with dynamic batching.", "Bonjour, comment ça va ?", "One two three four five six.",
]


TINY_LLAMA_STEPS = 100  # full-batch AdamW steps: the loss falls from ~6 to ~0.01


def build_tiny_llama(folder: Path) -> Path:
    """A 2-layer Llama (hidden 64, GQA 4/2 heads, tied embeddings) with a byte-level BPE
    tokenizer (so emoji and CJK split across tokens) and a ChatML chat template, trained for
    TINY_LLAMA_STEPS on TINY_LM_TEXT. Random weights collapse greedy text into one repeated
    token, which lets stream == non-stream and batching-invariance checks compare nothing; the
    trained model recites and mixes its sentences (varied tokens, and no EOS: the text it
    learned has none, so long generations run to max_tokens), deterministically for a fixed
    seed, in a few seconds on CPU."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TINY_LM_TEXT * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    cfg = LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"), bos_token_id=fast.convert_tokens_to_ids("<|im_start|>"),
        pad_token_id=fast.convert_tokens_to_ids("<|endoftext|>"),
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    ids = torch.tensor([fast(" ".join(TINY_LM_TEXT * 2), add_special_tokens=False)["input_ids"]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(TINY_LLAMA_STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(folder)
    return folder


def post(server, model, payload, stream=False):
    url = f"http://{server.http_url}/v2/models/{model}/{'generate_stream' if stream else 'generate'}"
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            body = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read().decode() or "{}")
    if not stream:
        return status, json.loads(body)
    events = [json.loads(l[5:]) for l in body.splitlines() if l.startswith("data:")]
    return status, events


# chat prompts for the tiny Llama: with its byte-level tokenizer, CJK and emoji split across tokens
CHAT_PROMPTS = [
    "The capital of France is", "Hello, how are you today?", "我爱北京天安门。", "Emoji: 🚀🔥🎉",
    "Triton serves models with dynamic batching. One two three four five six.", "a", "Bonjour, comment ça va ?",
    "One two",
]


class TorchRunner:
    """runner(feeds) -> outputs with the ONNX graph's names and shapes, over a HF causal LM."""

    def __init__(self, model):
        self.model = model
        self.layers = model.config.num_hidden_layers

    def __call__(self, feeds):
        import torch
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if feeds["past_key_values.0.key"].shape[2]:
            for i in range(self.layers):
                cache.update(torch.from_numpy(feeds[f"past_key_values.{i}.key"]),
                             torch.from_numpy(feeds[f"past_key_values.{i}.value"]), i)
        with torch.no_grad():
            out = self.model(
                input_ids=torch.from_numpy(feeds["input_ids"]),
                attention_mask=torch.from_numpy(feeds["attention_mask"]),
                position_ids=torch.from_numpy(feeds["position_ids"]),
                past_key_values=cache, use_cache=True,
            )
        res = {"logits": out.logits.numpy()}
        for i, layer in enumerate(out.past_key_values.layers):
            res[f"present.{i}.key"] = layer.keys.numpy()
            res[f"present.{i}.value"] = layer.values.numpy()
        return res


def make_engine(lm, eos=None, max_concurrent=8, max_context=256, runner=None, max_queue=None):
    model, tok = lm
    cfg = model.config
    from kiln_runtime.generation.engine import Engine

    return Engine(
        runner or TorchRunner(model), cfg.num_hidden_layers, cfg.num_key_value_heads,
        cfg.hidden_size // cfg.num_attention_heads, [cfg.eos_token_id] if eos is None else eos,
        max_concurrent, max_context, tok, max_queue=max_queue,
    )
