"""Tiny random checkpoints with real tokenizers, built in seconds: a 2-layer BERT (WordPiece)
and a 2-layer Llama (byte-level BPE, ChatML template) trained a few steps so its greedy text
varies. The tests build them, and so does `kiln faults` (real serving, no download)."""

from __future__ import annotations

from pathlib import Path

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
