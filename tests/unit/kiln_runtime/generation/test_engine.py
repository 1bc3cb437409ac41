"""The generation engine (model_repository/python_models/kiln_generate.py) over a real model.

The decoder is the tiny Llama driven through the exported graph's interface (explicit KV
cache in, presents out) by a torch wrapper, so the engine sees exactly what ONNX Runtime
would hand it. The checkpoint's saved random weights make greedy text collapse into one
repeated token (' is is is'), which would let batching bugs pass unseen; the engine tests
re-initialise the same architecture with larger weights so greedy text wanders.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kiln_runtime.errors import InputError
from kiln_runtime.generation import engine as kg

PROMPTS = [
    "The capital of France is", "Hello, how are you today?", "我爱北京天安门。", "Emoji: 🚀🔥🎉",
    "Triton serves models with dynamic batching. One two three four five six.", "a", "Bonjour, comment ça va ?",
    "One two",
]


# ----------------------------------------------------------------------------- the model
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


@pytest.fixture(scope="module")
def lm(tiny_llama):
    """(model, tokenizers.Tokenizer): the tiny Llama's architecture, weights drawn at std 0.3."""
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_pretrained(tiny_llama)
    cfg.initializer_range = 0.3
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    # a model this small runs fastest on one thread, and on a busy 2-core machine two
    # spinning OpenMP threads slow every call down some twentyfold
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield model, Tokenizer.from_file(str(tiny_llama / "tokenizer.json"))
    torch.set_num_threads(threads)


def make_engine(lm, eos=None, max_concurrent=8, max_context=256, runner=None, max_queue=None):
    model, tok = lm
    cfg = model.config
    return kg.Engine(
        runner or TorchRunner(model), cfg.num_hidden_layers, cfg.num_key_value_heads,
        cfg.hidden_size // cfg.num_attention_heads, [cfg.eos_token_id] if eos is None else eos,
        max_concurrent, max_context, tok, max_queue=max_queue,
    )


def drain(engine, results=None):
    """Step until idle; {request_id: [events]}."""
    results = {} if results is None else results
    while engine.has_work():
        for ev in engine.step():
            results.setdefault(ev.request_id, []).append(ev)
    return results


def tokens(events):
    return [t for ev in events for t in ev.token_ids]


def text(events):
    return "".join(ev.text for ev in events)


def greedy(max_tokens, **kw):
    return kg.SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


def alone(lm, prompt_ids, params, **kw):
    engine = make_engine(lm, **kw)
    engine.submit("solo", prompt_ids, params)
    return drain(engine)["solo"]


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kw, prompt_tokens, message",
    [
        ({"max_tokens": 0}, 10, "max_tokens: must be an integer >= 1"),
        ({"max_tokens": True}, 10, "max_tokens: must be an integer"),
        ({"max_tokens": 2.5}, 10, "max_tokens: must be an integer"),
        ({"max_tokens": 100}, 60, "max_tokens: prompt has 60 tokens, so at most 68 more fit the context of 128"),
        ({}, 128, "prompt: 128 tokens leave no room in the model's context of 128"),
        ({}, 300, "prompt: 300 tokens"),
        ({}, 0, "prompt: empty"),
        ({"temperature": float("nan")}, 10, "temperature: must be a finite number >= 0"),
        ({"temperature": -0.5}, 10, "temperature: must be a finite number >= 0"),
        ({"temperature": "hot"}, 10, "temperature: must be"),
        ({"top_p": 0.0}, 10, r"top_p: must be a number in \(0, 1\]"),
        ({"top_p": 1.5}, 10, r"top_p: must be a number in \(0, 1\]"),
        ({"top_k": -1}, 10, "top_k: must be an integer >= 0"),
        ({"top_k": 2.5}, 10, "top_k: must be an integer >= 0"),
        ({"repetition_penalty": 0}, 10, "repetition_penalty: must be a finite number > 0"),
        ({"repetition_penalty": float("inf")}, 10, "repetition_penalty: must be a finite number > 0"),
        ({"presence_penalty": 2.5}, 10, r"presence_penalty: must be a finite number in \[-2, 2\]"),
        ({"presence_penalty": -3}, 10, r"presence_penalty: must be a finite number in \[-2, 2\]"),
        ({"presence_penalty": "x"}, 10, r"presence_penalty: must be a finite number in \[-2, 2\]"),
        ({"presence_penalty": float("nan")}, 10, r"presence_penalty: must be a finite number in \[-2, 2\]"),
        ({"frequency_penalty": 2.5}, 10, r"frequency_penalty: must be a finite number in \[-2, 2\]"),
        ({"frequency_penalty": -3}, 10, r"frequency_penalty: must be a finite number in \[-2, 2\]"),
        ({"frequency_penalty": "x"}, 10, r"frequency_penalty: must be a finite number in \[-2, 2\]"),
        ({"frequency_penalty": float("nan")}, 10, r"frequency_penalty: must be a finite number in \[-2, 2\]"),
        ({"seed": -1}, 10, "seed: must be an integer in"),
        ({"stop": [""]}, 10, r"stop\[0\]: must be a non-empty string"),
        ({"stop": ["a", 3]}, 10, r"stop\[1\]: must be a non-empty string"),
        ({"stop": ["a"] * 5}, 10, "stop: at most 4 strings"),
        ({"stop": "END"}, 10, "stop: must be a list of strings"),
        ({"stop": ["x" * 257]}, 10, r"stop\[0\]: at most 256 characters"),
    ],
)
def test_sampling_params_errors_name_their_field(kw, prompt_tokens, message):
    with pytest.raises(InputError, match=message):
        kg.SamplingParams(**kw).validate(prompt_tokens, 128)


def test_sampling_params_defaults_fit_the_context():
    p = kg.SamplingParams().validate(100, 128, default_max_tokens=256)
    assert p.max_tokens == 28  # the default is cut to what fits
    assert kg.SamplingParams().validate(10, 128, default_max_tokens=16).max_tokens == 16
    p = kg.SamplingParams(max_tokens=np.int64(5), temperature=np.float32(0.5), stop=("a",)).validate(10, 128)
    assert (type(p.max_tokens), type(p.temperature), p.stop) == (int, float, ["a"])
    p = kg.SamplingParams(presence_penalty=np.float32(-2), frequency_penalty=2).validate(10, 128)  # the bounds are in
    assert (p.presence_penalty, p.frequency_penalty) == (-2.0, 2.0)
    assert (type(p.presence_penalty), type(p.frequency_penalty)) == (float, float)
    with pytest.raises(InputError, match="messages: 130 tokens"):
        kg.SamplingParams().validate(130, 128, prompt_field="messages")


def test_sampling_params_from_dict():
    p = kg.SamplingParams.from_dict({"max_tokens": 8, "temperature": 0, "stop": "END", "seed": None,
                                     "frequency_penalty": 0.5, "presence_penalty": None})
    assert (p.max_tokens, p.temperature, p.stop, p.seed) == (8, 0, ["END"], None)
    assert (p.frequency_penalty, p.presence_penalty) == (0.5, 0.0)
    with pytest.raises(InputError, match="parameters: unknown 'logit_bias', 'n'"):
        kg.SamplingParams.from_dict({"n": 2, "logit_bias": {}})


@pytest.mark.parametrize(
    "raw, message",
    [
        ("not json", "messages: not valid JSON"),
        ('{"role": "user"}', "messages: must be a JSON list"),
        ("[]", "messages: the list is empty"),
        ('["hi"]', r"messages\[0\]: must be an object"),
        ('[{"role": "tool", "content": "x"}]', r"messages\[0\].role: 'tool' is not allowed \(allowed: system, user, assistant\)"),
        ('[{"role": "user", "content": "a"}, {"content": "b"}]', r"messages\[1\].role: None is not allowed"),
        ('[{"role": "user", "content": ["x"]}]', r"messages\[0\].content: must be a string"),
        (b"\xff[]", "messages: not valid UTF-8"),
    ],
)
def test_parse_messages_rejects(raw, message):
    with pytest.raises(InputError, match=message):
        kg.parse_messages(raw)


def test_parse_messages_keeps_role_and_content():
    raw = json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "我爱 🚀", "name": "x"}])
    assert kg.parse_messages(raw.encode()) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "我爱 🚀"},
    ]


def test_encode_prompt_rejects_empty_and_templateless(lm):
    _, tok = lm
    with pytest.raises(InputError, match="prompt: empty"):
        kg.encode_prompt(tok, prompt="")
    with pytest.raises(InputError, match="exactly one"):
        kg.encode_prompt(tok)
    with pytest.raises(InputError, match="messages: this model has no chat template"):
        kg.encode_prompt(tok, messages=[{"role": "user", "content": "hi"}])
    assert kg.encode_prompt(tok, prompt="Hello") == tok.encode("Hello").ids


# ----------------------------------------------------------------------------- chat template
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "我爱北京 🚀"},
     {"role": "assistant", "content": "  ok\n"}, {"role": "user", "content": "{{ not jinja }} <b>&</b>"}],
]
# shapes seen on the Hub: raise_exception, loop controls, namespace, tojson, strip, bos_token
STRICT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(sys='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.sys = m['content'] %}{% continue %}{% endif %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == (1 if ns.sys else 0)) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}\n"
    "    {% if m['role'] == 'user' %}[INST] {{ ns.sys ~ ' ' if ns.sys }}{{ m['content'] | trim }} [/INST]"
    "{% else %}{{ m['content'] | tojson }}{{ eos_token }}{% endif %}\n"
    "{% endfor %}"
)


def _tokenizer_with_template(src: Path, template: str, dst: Path) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    tok.chat_template = template
    tok.save_pretrained(dst)
    return dst


@pytest.mark.parametrize("which", ["chatml", "strict"])
def test_chat_template_renders_like_transformers(tiny_llama, tmp_path, which):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    folder = tiny_llama if which == "chatml" else _tokenizer_with_template(tiny_llama, STRICT_TEMPLATE, tmp_path)
    hf = AutoTokenizer.from_pretrained(folder)
    ours = kg.ChatTemplate.from_dir(str(folder))
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for conv in CONVERSATIONS:
        expected = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert ours.render(conv) == expected
        ids = hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert kg.encode_prompt(tok, messages=conv, template=ours) == list(ids)


def test_chat_template_exception_is_the_clients_error(tiny_llama, tmp_path):
    import jinja2
    from transformers import AutoTokenizer

    folder = _tokenizer_with_template(tiny_llama, STRICT_TEMPLATE, tmp_path)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        AutoTokenizer.from_pretrained(folder).apply_chat_template(bad, tokenize=False)
    with pytest.raises(InputError, match="messages: the model's chat template rejects them: Conversation roles must alternate"):
        kg.ChatTemplate.from_dir(str(folder)).render(bad)


def test_chat_template_from_older_layouts(tmp_path):
    """Template inside tokenizer_config.json (a string, or a named list), special tokens
    only in special_tokens_map.json; no template at all gives None."""
    tpl = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}{% endfor %}"
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": {"content": "<s>"}}))
    for stored in (tpl, [{"name": "tool_use", "template": "x"}, {"name": "default", "template": tpl}]):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": stored, "eos_token": "</s>"}))
        ours = kg.ChatTemplate.from_dir(str(tmp_path))
        assert ours.render([{"role": "user", "content": "hi"}]) == "<s>user:hi"
        assert ours.special_tokens == {"bos_token": "<s>", "eos_token": "</s>"}
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert kg.ChatTemplate.from_dir(str(tmp_path)) is None


@pytest.fixture(scope="module")
def smollm2_tokenizer_dir(tmp_path_factory):
    """The packaged SmolLM2's tokenizer and chat template, read from its GGUF file (seconds:
    no weights are dequantized) and saved as transformers saves them."""
    import warnings

    from transformers import AutoTokenizer

    from kiln_core.sources import gguf_file
    from kiln_core.spec import load_spec

    path = gguf_file(load_spec("smollm2"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    tok.save_pretrained(out)
    return out


def test_chat_template_smollm2_like_transformers(smollm2_tokenizer_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    SMOLLM2 = smollm2_tokenizer_dir
    hf = AutoTokenizer.from_pretrained(SMOLLM2)
    ours = kg.ChatTemplate.from_dir(str(SMOLLM2))
    tok = Tokenizer.from_file(str(SMOLLM2 / "tokenizer.json"))
    for conv in CONVERSATIONS:
        assert ours.render(conv) == hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        ids = hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert kg.encode_prompt(tok, messages=conv, template=ours) == list(ids)
    assert hf.eos_token_id in kg.read_eos_token_ids(str(SMOLLM2), tok)


# ----------------------------------------------------------------------------- detokenizer, stops
def test_detokenizer_never_splits_a_character(lm):
    _, tok = lm
    held_back = 0
    for s in PROMPTS + ["北京🎉 ok 안녕하세요 👩‍👩‍👧 ça"]:
        ids = tok.encode(s).ids
        detok = kg.IncrementalDetokenizer(tok)
        chunks = [detok.push(t) for t in ids] + [detok.flush()]
        assert not any("\ufffd" in c for c in chunks), (s, chunks)
        assert "".join(chunks) == tok.decode(ids, skip_special_tokens=True) == s
        held_back += chunks.count("")
    assert held_back >= 5  # characters really were split across tokens


def test_detokenizer_drops_a_character_cut_off_at_the_end(lm):
    _, tok = lm
    ids = tok.encode("我").ids
    assert len(ids) > 1
    detok = kg.IncrementalDetokenizer(tok)
    assert detok.push(ids[0]) == ""  # the first bytes of 我 alone
    assert tok.decode(ids[:1]) == "\ufffd"
    assert detok.flush() == ""  # generation ended mid-character: never sent broken


def test_detokenizer_skips_special_tokens_and_keeps_prompt_context(lm):
    _, tok = lm
    im_end = tok.token_to_id("<|im_end|>")
    ids = tok.encode("Hello, how are you").ids
    detok = kg.IncrementalDetokenizer(tok, context_ids=ids[:3])
    out = "".join(detok.push(t) for t in ids[3:] + [im_end] + tok.encode(" today").ids) + detok.flush()
    assert out == tok.decode(ids[3:]) + " today"


def test_stop_matcher_holds_back_a_possible_start():
    m = kg.StopMatcher(["END", "\n\n"])
    assert m.push("abcE") == ("abc", False)
    assert m.push("N") == ("", False)
    assert m.push("Dxyz") == ("", True)
    m = kg.StopMatcher(["END"])
    assert m.push("abE") == ("ab", False)
    assert m.push("x") == ("Ex", False)
    assert m.push("EN") == ("", False)
    assert m.flush() == "EN"
    m = kg.StopMatcher(["b\n", "ab"])
    assert m.push("xab\n") == ("x", True)  # the earliest stop wins


def test_stop_string_is_cut_and_finishes_with_stop(lm):
    _, tok = lm
    prompt = tok.encode(PROMPTS[0]).ids
    free = alone(lm, prompt, greedy(30), eos=[])
    full = text(free)
    stop = next(full[i : i + 3] for i in range(4, len(full) - 3) if full[i : i + 3].isascii() and full[i : i + 3].isalpha())
    cut = full.index(stop)
    events = alone(lm, prompt, greedy(30, stop=["@@never@@", stop]), eos=[])
    assert text(events) == full[:cut]
    assert stop not in "".join(ev.text for ev in events)
    assert (events[-1].finished, events[-1].finish_reason) == (True, "stop")
    # it ends at the token that completed the stop string
    ids = tokens(free)
    n = next(n for n in range(1, 31) if stop in tok.decode(ids[:n]))
    assert events[-1].completion_tokens == n == len(tokens(events))


def test_max_tokens_finishes_with_length(lm):
    _, tok = lm
    events = alone(lm, tok.encode(PROMPTS[1]).ids, greedy(7), eos=[])
    assert len(events) == 7 and [ev.finished for ev in events] == [False] * 6 + [True]
    assert events[-1].finish_reason == "length"
    assert events[-1].completion_tokens == 7 == len(tokens(events))
    assert events[-1].prompt_tokens == len(tok.encode(PROMPTS[1]).ids)


def test_eos_finishes_with_stop_and_adds_no_text(lm):
    _, tok = lm
    prompt = tok.encode(PROMPTS[2]).ids
    free = tokens(alone(lm, prompt, greedy(12), eos=[]))
    k = next(i for i in range(3, 12) if free[i] not in free[:i])  # a token first seen at position k
    events = alone(lm, prompt, greedy(12), eos=[free[k]])
    assert tokens(events) == free[: k + 1]
    assert (events[-1].finish_reason, events[-1].completion_tokens) == ("stop", k + 1)
    assert text(events) == tok.decode(free[:k])


def test_context_limit_caps_the_completion(lm):
    _, tok = lm
    prompt = tok.encode(PROMPTS[4]).ids
    engine = make_engine(lm, eos=[], max_context=len(prompt) + 5)
    with pytest.raises(InputError, match=f"max_tokens: prompt has {len(prompt)} tokens, so at most 5 more"):
        engine.submit("r", prompt, greedy(6))
    engine.submit("r", prompt, kg.SamplingParams(temperature=0))  # default max_tokens: what fits
    events = drain(engine)["r"]
    assert (events[-1].finish_reason, events[-1].completion_tokens) == ("length", 5)


# ----------------------------------------------------------------------------- sampling
def _hf_distribution(logits, context, temperature, top_k, top_p, penalty):
    import torch
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    ids = torch.tensor([context])
    x = torch.from_numpy(logits.copy())[None]
    x = RepetitionPenaltyLogitsProcessor(penalty)(ids, x)
    x = TemperatureLogitsWarper(temperature)(ids, x)
    if top_k:
        x = TopKLogitsWarper(top_k)(ids, x)
    if top_p < 1:
        x = TopPLogitsWarper(top_p)(ids, x)
    return x.double().softmax(-1)[0].numpy()


@pytest.mark.parametrize(
    "vocab, scale, temperature, top_k, top_p, penalty",
    [
        (50, 2.0, 1.0, 0, 1.0, 1.0), (50, 2.0, 0.7, 10, 1.0, 1.3), (50, 2.0, 1.3, 0, 0.8, 1.0),
        (50, 2.0, 0.9, 20, 0.5, 1.2), (1000, 8.0, 1.0, 0, 0.9, 1.0),  # nucleus inside the first 256
        (1000, 0.1, 1.0, 0, 0.95, 1.5),  # flat: the nucleus needs the whole vocabulary
    ],
)
def test_sampler_distribution_matches_transformers(vocab, scale, temperature, top_k, top_p, penalty):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=vocab) * scale).astype(np.float32)
    context = [int(t) for t in rng.integers(0, vocab, 12)]
    params = kg.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    ids, probs = kg.Sampler(params, context).distribution(logits)
    ours = np.zeros(vocab)
    ours[ids] = probs
    np.testing.assert_allclose(ours, _hf_distribution(logits, context, temperature, top_k, top_p, penalty), atol=1e-6)


def test_sampler_draws_follow_the_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    sampler = kg.Sampler(kg.SamplingParams(seed=1))
    counts = np.bincount([sampler.sample(logits) for _ in range(20000)], minlength=4) / 20000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.015)


def test_greedy_ties_take_the_lowest_id_and_penalty_applies():
    logits = np.array([0.0, 3.0, 1.0, 3.0, -2.0], np.float32)
    assert kg.Sampler(kg.SamplingParams(temperature=0)).sample(logits) == 1
    s = kg.Sampler(kg.SamplingParams(temperature=0, repetition_penalty=2.0), context_ids=[1, 4])
    np.testing.assert_array_equal(s.adjusted_logits(logits), [0.0, 1.5, 1.0, 3.0, -4.0])  # / 2, or * 2 below 0
    assert s.sample(logits) == 3
    assert s.sample(logits) == 1  # 3 is seen now: 1.5 and 1.5 tie, the lower id wins


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    """OpenAI / vLLM: logits[t] -= frequency * count[t] + presence * (count[t] > 0), count over
    this request's output; the prompt is never penalised."""
    logits = np.array([0.0, 5.0, 4.0, 1.0], np.float32)

    def picks(n, context=(), **kw):
        s = kg.Sampler(kg.SamplingParams(temperature=0, **kw), context_ids=context)
        return [s.sample(logits) for _ in range(n)]

    assert picks(3) == [1, 1, 1]
    assert picks(3, frequency_penalty=0.6) == [1, 1, 2]  # 5 - 2 * 0.6 = 3.8 < 4: the runner-up wins
    assert picks(3, presence_penalty=1.5) == [1, 2, 1]  # 5 - 1.5 = 3.5 once 1 is out, however often
    assert picks(3, [1, 1, 1, 2], frequency_penalty=0.6) == [1, 1, 2]  # the prompt's 1s cost nothing
    assert picks(2, [1], presence_penalty=1.5) == [1, 2]
    # after the repetition penalty (prompt + output), before temperature
    s = kg.Sampler(kg.SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
                   context_ids=[2])
    for t in (1, 1, 3):
        s.observe(t)
    x = np.array([0.0, 3.0, 1.0, -2.0, 0.5], np.float32)
    np.testing.assert_array_equal(s.adjusted_logits(x), [0.0, 0.5, 0.5, -4.75, 0.5])  # 3/2 - (2*.25 + .5), -2*2 - .75
    np.testing.assert_array_equal(x, [0.0, 3.0, 1.0, -2.0, 0.5])  # the caller's logits are untouched
    # sampling draws from the penalised logits too
    s = kg.Sampler(kg.SamplingParams(temperature=0.5, frequency_penalty=-1.0))  # negative: more repetition
    s.observe(3)
    ids, probs = s.distribution(logits)
    expected = np.exp((logits - [0, 0, 0, -1]) / 0.5)
    np.testing.assert_allclose(probs, expected / expected.sum(), rtol=1e-6)


def test_zero_presence_and_frequency_penalties_change_nothing():
    rng = np.random.default_rng(3)
    steps = (rng.normal(size=(20, 50)) * 2).astype(np.float32)
    for kw in ({"temperature": 0}, {"temperature": 0, "repetition_penalty": 1.3}, {"temperature": 0.8, "seed": 5, "top_p": 0.9}):
        plain = kg.Sampler(kg.SamplingParams(**kw), context_ids=[1, 2, 3])
        zero = kg.Sampler(kg.SamplingParams(**kw, presence_penalty=0.0, frequency_penalty=0.0), context_ids=[1, 2, 3])
        assert [plain.sample(x) for x in steps] == [zero.sample(x) for x in steps]
        assert not zero._counts  # no bookkeeping
    s = kg.Sampler(kg.SamplingParams(temperature=0, presence_penalty=0.0, frequency_penalty=0.0))
    x = steps[0]
    assert s.adjusted_logits(x) is x  # no copy


def test_engine_frequency_penalty_matches_a_plain_loop(lm):
    """Through the engine (prefill, then batched decode) the penalty counts what this request
    generated, as a full-recompute loop applying the OpenAI formula does."""
    import torch

    model, tok = lm
    prompt = tok.encode(PROMPTS[0]).ids
    freq, pres = 1.5, 0.5
    ids, counts = list(prompt), {}
    for _ in range(20):
        with torch.no_grad():
            x = model(torch.tensor([ids])).logits[0, -1].numpy().copy()
        for t, c in counts.items():
            x[t] -= np.float32(freq) * np.float32(c) + np.float32(pres)
        nxt = int(np.argmax(x))
        counts[nxt] = counts.get(nxt, 0) + 1
        ids.append(nxt)
    expected = ids[len(prompt):]
    free = tokens(alone(lm, prompt, greedy(20), eos=[]))
    assert expected != free  # the penalty mattered
    engine = make_engine(lm, eos=[])
    engine.submit("pen", prompt, greedy(20, frequency_penalty=freq, presence_penalty=pres))
    engine.submit("other", tok.encode(PROMPTS[1]).ids, greedy(20))  # shares the decode steps, not the counts
    results = drain(engine)
    assert tokens(results["pen"]) == expected
    assert tokens(results["other"]) == tokens(alone(lm, tok.encode(PROMPTS[1]).ids, greedy(20), eos=[]))
    assert tokens(alone(lm, prompt, greedy(20, presence_penalty=0.0, frequency_penalty=0.0), eos=[])) == free


def test_seeded_sampling_reproduces_and_seeds_differ(lm):
    _, tok = lm
    prompt = tok.encode(PROMPTS[3]).ids

    def sample(seed, **kw):
        return tokens(alone(lm, prompt, kg.SamplingParams(max_tokens=20, temperature=1.0, seed=seed, **kw), eos=[]))

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    assert sample(7, top_k=5) != first  # the settings matter, not just the seed
    # a seeded request draws the same tokens while others share its batch
    engine = make_engine(lm, eos=[])
    engine.submit("seeded", prompt, kg.SamplingParams(max_tokens=20, temperature=1.0, seed=7))
    for i, p in enumerate(PROMPTS[:4]):
        engine.submit(f"other{i}", tok.encode(p).ids, kg.SamplingParams(max_tokens=20, temperature=1.0))
    assert tokens(drain(engine)["seeded"]) == first


# ----------------------------------------------------------------------------- engine
def _reference_greedy(model, prompt, n, eos):
    """Full recompute every token, no cache: argmax of the last position."""
    import torch

    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        if nxt in eos:
            break
    return ids[len(prompt):]


def test_engine_greedy_equals_plain_loop_and_hf_generate(lm):
    import torch

    model, tok = lm
    eos = model.config.eos_token_id
    for p in PROMPTS[:4]:
        prompt = tok.encode(p).ids
        events = alone(lm, prompt, greedy(24))
        got = tokens(events)
        assert len(set(got)) > 8  # the text wanders: a bug in the cache could not hide
        assert got == _reference_greedy(model, prompt, 24, {eos})
        with torch.no_grad():
            hf = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, eos_token_id=eos,
                                pad_token_id=model.config.pad_token_id)
        assert got == hf[0, len(prompt):].tolist()
        # a character cut off by max_tokens is dropped rather than sent as U+FFFD
        assert text(events) == tok.decode([t for t in got if t != eos], skip_special_tokens=True).rstrip("\ufffd")
        with torch.no_grad():  # repetition penalty: same rule as transformers
            hf = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, eos_token_id=eos,
                                pad_token_id=model.config.pad_token_id, repetition_penalty=1.3)
        assert tokens(alone(lm, prompt, greedy(24, repetition_penalty=1.3))) == hf[0, len(prompt):].tolist()


def test_greedy_output_does_not_depend_on_batching(lm):
    """8 requests of different lengths, submitted one per step and leaving at different
    times (joins and leaves rebuild the padded batch), give each exactly its solo tokens."""
    _, tok = lm
    prompts = [tok.encode(p).ids for p in PROMPTS]
    assert len({len(p) for p in prompts}) >= 6
    budgets = [30, 12, 25, 18, 30, 9, 22, 16]
    solo = [tokens(alone(lm, p, greedy(n), eos=[])) for p, n in zip(prompts, budgets)]

    engine = make_engine(lm, eos=[])
    results, widths = {}, []
    real = engine.runner
    engine.runner = lambda feeds: widths.append(feeds["input_ids"].shape) or real(feeds)
    for i, (p, n) in enumerate(zip(prompts, budgets)):
        engine.submit(f"r{i}", p, greedy(n))
        for ev in engine.step():
            results.setdefault(ev.request_id, []).append(ev)
    drain(engine, results)
    for i in range(8):
        assert tokens(results[f"r{i}"]) == solo[i], f"request {i} changed when batched"
        assert results[f"r{i}"][-1].finish_reason == "length"
    assert max(b for b, s in widths if s == 1) == 8  # all eight shared decode steps
    assert max(s for b, s in widths if b == 1) == max(len(p) for p in prompts)  # prefill: one request each


def test_a_new_request_joins_while_others_run(lm):
    _, tok = lm
    a, b = tok.encode(PROMPTS[0]).ids, tok.encode(PROMPTS[2]).ids
    engine = make_engine(lm, eos=[])
    engine.submit("a", a, greedy(12))
    results = {}
    for _ in range(4):
        for ev in engine.step():
            results.setdefault(ev.request_id, []).append(ev)
    engine.submit("b", b, greedy(6))
    step = engine.step()
    assert {ev.request_id: ev.completion_tokens for ev in step} == {"a": 5, "b": 1}  # b did not wait for a
    for ev in step:
        results.setdefault(ev.request_id, []).append(ev)
    drain(engine, results)
    assert tokens(results["a"]) == tokens(alone(lm, a, greedy(12), eos=[]))
    assert tokens(results["b"]) == tokens(alone(lm, b, greedy(6), eos=[]))
    assert results["b"][-1].finished and results["a"][-1].completion_tokens == 12


def test_cancel_frees_the_slot_at_the_next_step(lm):
    _, tok = lm
    engine = make_engine(lm, eos=[], max_concurrent=2)
    for rid in "abc":
        engine.submit(rid, tok.encode(PROMPTS[0]).ids, greedy(20))
    first = engine.step()
    assert sorted(ev.request_id for ev in first) == ["a", "b"] and engine.num_waiting == 1
    engine.step()
    assert engine.cancel("a") and not engine.cancel("nobody")
    step = {ev.request_id: ev for ev in engine.step()}
    assert (step["a"].finished, step["a"].finish_reason, step["a"].completion_tokens) == (True, "cancelled", 2)
    assert step["c"].completion_tokens == 1  # admitted into a's slot in the same step
    assert step["b"].completion_tokens == 3 and engine.num_running == 2
    # a waiting request can be cancelled too; a cancelled id can be used again
    engine.submit("d", tok.encode(PROMPTS[1]).ids, greedy(5))
    engine.cancel("d")
    step = {ev.request_id: ev for ev in engine.step()}
    assert (step["d"].finish_reason, step["d"].completion_tokens) == ("cancelled", 0)
    engine.submit("a", tok.encode(PROMPTS[1]).ids, greedy(3))
    results = drain(engine)
    assert results["a"][-1].finish_reason == "length" and not engine.has_work()


def test_submit_rejects_duplicates_and_bad_params(lm):
    _, tok = lm
    engine = make_engine(lm)
    engine.submit("x", tok.encode("a").ids, greedy(3))
    with pytest.raises(ValueError, match="already active"):
        engine.submit("x", tok.encode("a").ids, greedy(3))
    with pytest.raises(InputError, match="top_p"):
        engine.submit("y", tok.encode("a").ids, kg.SamplingParams(top_p=2))
    with pytest.raises(InputError, match="prompt: empty"):
        engine.submit("z", [], greedy(3))
    assert engine.num_waiting == 1


def test_queue_bound_rejects_at_once_and_frees_up(lm):
    """max_queue counts requests waiting beyond the free slots: with one slot and a queue of
    two, three submits fit before any step (one takes the slot at the next step), a fourth is
    rejected with Triton's queue-full phrase, and a drained engine takes new work again."""
    _, tok = lm
    prompt = tok.encode(PROMPTS[0]).ids
    engine = make_engine(lm, eos=[], max_concurrent=1, max_queue=2)
    for rid in "abc":
        engine.submit(rid, prompt, greedy(3))
    with pytest.raises(kg.QueueFull) as err:
        engine.submit("d", prompt, greedy(3))
    assert str(err.value).startswith("Exceeds maximum queue size")
    assert engine.num_waiting == 3
    with pytest.raises(InputError, match="top_p"):  # a bad request hears about its field, not the queue
        engine.submit("e", prompt, kg.SamplingParams(top_p=2))
    engine.step()  # a holds the slot, b and c wait: still full
    assert (engine.num_running, engine.num_waiting) == (1, 2)
    with pytest.raises(kg.QueueFull):
        engine.submit("d", prompt, greedy(3))
    results = drain(engine)
    assert sorted(results) == ["a", "b", "c"] and all(r[-1].finish_reason == "length" for r in results.values())
    engine.submit("d", prompt, greedy(3))  # the rejected id was never taken
    assert drain(engine)["d"][-1].completion_tokens == 3
    with pytest.raises(ValueError, match="max_queue"):
        make_engine(lm, max_queue=0)


def test_driver_thread_streams_events(lm):
    """The way the Triton model drives it: one thread steps, request threads submit and
    cancel, events go back to each request's sender."""
    _, tok = lm
    engine = make_engine(lm, eos=[])
    outbox: dict[str, queue.Queue] = {}
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            if not engine.wait_for_work(timeout=0.05):
                continue
            for ev in engine.step():
                outbox[ev.request_id].put(ev)

    driver = threading.Thread(target=loop, daemon=True)
    driver.start()
    try:
        for i, p in enumerate(PROMPTS[:3]):
            outbox[f"r{i}"] = queue.Queue()
            engine.submit(f"r{i}", tok.encode(p).ids, greedy(10))
        streams = {}
        for rid, q in outbox.items():
            evs = [q.get(timeout=30)]
            while not evs[-1].finished:
                evs.append(q.get(timeout=30))
            streams[rid] = evs
    finally:
        stop.set()
        driver.join(5)
    for i, p in enumerate(PROMPTS[:3]):
        assert tokens(streams[f"r{i}"]) == tokens(alone(lm, tok.encode(p).ids, greedy(10), eos=[]))


def test_decode_steps_per_second_one_vs_eight(lm):
    """Measured, not asserted: one batched decode call serves every running sequence."""
    _, tok = lm
    rates = {}
    for n in (1, 8):
        engine = make_engine(lm, eos=[])
        for i in range(n):
            engine.submit(f"r{i}", tok.encode(PROMPTS[i]).ids, greedy(64))
        engine.step()  # prefills
        t0, steps = time.perf_counter(), 0
        while engine.has_work():
            engine.step()
            steps += 1
        rates[n] = steps / (time.perf_counter() - t0)
    print(f"\ntiny llama decode: 1 sequence {rates[1]:.0f} steps/s ({rates[1]:.0f} tokens/s); "
          f"8 sequences {rates[8]:.0f} steps/s ({8 * rates[8]:.0f} tokens/s)")


# ----------------------------------------------------------------------------- chunked prefill, profile
LONG = " ".join(PROMPTS[i % 8] for i in range(24))  # ~150 tokens of the tiny tokenizer


class CallLog:
    """Wraps a runner: the (batch, new tokens, past) shape of every call, per step."""

    def __init__(self, runner):
        self.runner, self.calls = runner, []

    def __call__(self, feeds):
        b, s = feeds["input_ids"].shape
        self.calls.append((b, s, feeds["past_key_values.0.key"].shape[2]))
        return self.runner(feeds)


def test_chunked_prefill_equals_unchunked(lm):
    """Greedy tokens do not depend on the chunk size; while another stream decodes, a prompt is
    fed one chunk per step on top of its own growing cache (position_ids and attention_mask
    continue where the last chunk ended). With nobody decoding it is prefilled in one call."""
    model, tok = lm
    companion = tok.encode(PROMPTS[5]).ids
    prompts = [tok.encode(LONG).ids, tok.encode(PROMPTS[4]).ids]
    assert len(prompts[0]) > 100
    for prompt in prompts:
        whole = tokens(alone(lm, prompt, greedy(16), eos=[]))
        assert whole == _reference_greedy(model, prompt, 16, set())
        for chunk in (1, 7, 32, len(prompt) - 1, len(prompt)):
            n_chunks = -(-len(prompt) // chunk)
            engine = make_engine(lm, eos=[])
            engine.prefill_chunk = chunk
            engine.submit("run", companion, greedy(n_chunks + 4))
            results = {"run": engine.step()}
            log = engine.runner = CallLog(engine.runner)
            engine.submit("r", prompt, greedy(16))
            drain(engine, results)
            assert tokens(results["r"]) == whole, f"prompt of {len(prompt)} tokens, chunk {chunk}"
            assert tokens(results["run"]) == tokens(alone(lm, companion, greedy(n_chunks + 4), eos=[]))
            # each step: the chunk, then the decode call of "run"
            expected = [(1, min(chunk, len(prompt) - i), i) for i in range(0, len(prompt), chunk)]
            assert log.calls[0 : 2 * n_chunks : 2] == expected  # (rows, chunk, cache so far)
            assert all(c == (1, 1, len(companion) + k) for k, c in enumerate(log.calls[1 : 2 * n_chunks : 2]))
        engine = make_engine(lm, eos=[])
        engine.prefill_chunk = 7
        log = engine.runner = CallLog(engine.runner)
        engine.submit("solo", prompt, greedy(16))
        assert tokens(drain(engine)["solo"]) == whole and log.calls[0] == (1, len(prompt), 0)  # nobody to stall
    with pytest.raises(ValueError, match="prefill_chunk"):
        kg.Engine(lambda f: f, 1, 1, 1, [], 1, 8, tok, prefill_chunk=0)


def test_long_prompt_joins_without_stalling_running_streams(lm):
    """While a long prompt is prefilled in chunks, the running stream gets a token every step;
    a short prompt arriving meanwhile is prefilled whole in its admission step (it does not
    wait behind the long one); a cancel mid-prefill frees the slot. Everyone's tokens are
    their solo tokens."""
    _, tok = lm
    run_ids, long_ids, short_ids = tok.encode(PROMPTS[0]).ids, tok.encode(LONG).ids, tok.encode(PROMPTS[1]).ids
    chunk = 16
    chunks = -(-len(long_ids) // chunk)
    engine = make_engine(lm, eos=[], max_concurrent=3)
    engine.prefill_chunk = chunk
    log = engine.runner = CallLog(engine.runner)
    results = {}

    def step():
        before = len(log.calls)
        evs = engine.step()
        for ev in evs:
            results.setdefault(ev.request_id, []).append(ev)
        return {ev.request_id: ev.completion_tokens for ev in evs}, log.calls[before:]

    engine.submit("run", run_ids, greedy(40))
    step()
    step()
    engine.submit("long", long_ids, greedy(8))
    got, calls = step()
    assert got == {"run": 3} and engine.num_prefilling == 1
    assert calls == [(1, chunk, 0), (1, 1, len(run_ids) + 1)]  # one chunk, then the decode call
    got, _ = step()
    engine.submit("short", short_ids, greedy(6))
    got, calls = step()
    assert got == {"run": 5, "short": 1}  # the short prompt went ahead, whole
    assert calls[0] == (1, len(short_ids), 0) and calls[1] == (1, chunk, 2 * chunk)
    for j in range(4, chunks):  # chunk j of the long prompt runs in step 2 + j
        got, calls = step()
        assert got["run"] == 2 + j and "long" not in got
        assert sum(1 for b, s, p in calls if s > 1) == 1  # never more than one chunk a step
    got, _ = step()
    assert got["long"] == 1 and got["run"] == 2 + chunks and engine.num_prefilling == 0
    drain(engine, results)
    for rid, ids, n in (("run", run_ids, 40), ("long", long_ids, 8), ("short", short_ids, 6)):
        assert tokens(results[rid]) == tokens(alone(lm, ids, greedy(n), eos=[])), rid

    # a prefilling prompt holds its slot; cancelled mid-prefill, the slot goes to the next
    engine = make_engine(lm, eos=[], max_concurrent=2)
    engine.prefill_chunk = chunk
    engine.submit("run", run_ids, greedy(10))
    engine.step()
    engine.submit("long", long_ids, greedy(4))
    engine.submit("next", short_ids, greedy(3))
    assert [ev.request_id for ev in engine.step()] == ["run"]
    assert (engine.num_prefilling, engine.num_waiting) == (1, 1)
    engine.step()
    engine.cancel("long")
    evs = {ev.request_id: ev for ev in engine.step()}
    assert (evs["long"].finish_reason, evs["long"].completion_tokens) == ("cancelled", 0)
    assert evs["next"].completion_tokens == 1 and engine.num_prefilling == 0
    results = drain(engine)
    assert tokens([evs["next"]] + results["next"]) == tokens(alone(lm, short_ids, greedy(3), eos=[]))
    assert results["run"][-1].completion_tokens == 10 and not engine.has_work()


def test_leaves_compact_the_batch_and_trim_common_padding(lm):
    """Leaves move rows instead of rebuilding the batch; when the longest member left and the
    rest would carry mostly padding, the batch is rebuilt narrower. Tokens stay solo tokens."""
    _, tok = lm
    long_ids = tok.encode(LONG).ids
    shorts = [tok.encode(p).ids for p in PROMPTS[:4]]
    engine = make_engine(lm, eos=[])
    log = engine.runner = CallLog(engine.runner)
    engine.submit("long", long_ids, greedy(3))
    budgets = [12, 5, 9, 12]
    for i, (p, n) in enumerate(zip(shorts, budgets)):
        engine.submit(f"s{i}", p, greedy(n))
    results = drain(engine)
    for i, (p, n) in enumerate(zip(shorts, budgets)):
        assert tokens(results[f"s{i}"]) == tokens(alone(lm, p, greedy(n), eos=[]))
    assert tokens(results["long"]) == tokens(alone(lm, long_ids, greedy(3), eos=[]))
    counts = engine.profile()["counts"]
    assert counts["rebuilds"] == 2  # the first batch, then the trim once "long" left
    assert counts["compactions"] >= 1  # s1 and s2 left without a rebuild
    decode = [(b, p) for b, s, p in log.calls if s == 1 and p]
    assert max(p for b, p in decode if b == 4) < len(long_ids)  # the trimmed batch is narrower


def test_common_padding_never_widens_the_batch_past_the_context(lm):
    """After a leave the batch may keep some common left padding; it is trimmed before the
    batch would grow wider than max_context (the graph's contract)."""
    _, tok = lm
    ids = tok.encode(LONG).ids
    long_ids, short_ids = ids[:40], ids[40:70]
    engine = make_engine(lm, eos=[], max_context=48)
    log = engine.runner = CallLog(engine.runner)
    engine.submit("long", long_ids, greedy(2))
    engine.submit("short", short_ids, greedy(18))
    results = drain(engine)
    assert tokens(results["short"]) == tokens(alone(lm, short_ids, greedy(18), eos=[], max_context=48))
    assert tokens(results["long"]) == tokens(alone(lm, long_ids, greedy(2), eos=[], max_context=48))
    counts = engine.profile()["counts"]
    assert (counts["compactions"], counts["rebuilds"]) == (1, 2)  # "long" left by compaction; then the trim
    assert max(p + s for b, s, p in log.calls) <= 48


def test_profile_splits_the_step_time(lm):
    _, tok = lm
    engine = make_engine(lm, eos=[])
    real = engine.runner

    def slow(feeds):  # known runner time: 4 ms a decode call, 6 ms a prefill call
        time.sleep(0.004 if feeds["input_ids"].shape[1] == 1 and feeds["past_key_values.0.key"].shape[2] else 0.006)
        return real(feeds)

    engine.runner = slow
    prof = engine.profile()
    assert prof["steps"] == 0 and set(prof["phases_ms"]) == set(kg.PROFILE_PHASES)
    prompts = [tok.encode(p).ids for p in PROMPTS[:3]]
    for i, p in enumerate(prompts):
        engine.submit(f"r{i}", p, greedy(10, stop=["@@"]))
    wall, n = 0.0, 0
    while engine.has_work():
        t0 = time.perf_counter()
        n += len(engine.step())
        wall += time.perf_counter() - t0
    prof = engine.profile()
    c = prof["counts"]
    assert prof["steps"] == 10 and c["tokens"] == n == 30
    assert (c["prefill_calls"], c["prefill_tokens"]) == (3, sum(map(len, prompts)))
    assert (c["decode_calls"], c["decode_rows"]) == (9, 27)
    assert set(prof["phases_s"]) == set(kg.PROFILE_PHASES)
    assert abs(sum(prof["phases_s"].values()) - prof["step_s"]) < 1e-9
    assert prof["step_s"] <= wall and prof["step_s"] > 0.95 * wall  # step() itself, nothing else
    assert prof["phases_s"]["run_decode"] >= 9 * 0.004 and prof["phases_s"]["run_prefill"] >= 3 * 0.006
    measured = sum(v for k, v in prof["phases_s"].items() if k != "other")
    assert prof["phases_s"]["other"] < 0.25 * measured  # the named phases hold the time
    assert all(prof["phases_s"][k] > 0 for k in ("kv", "sample", "detok"))
    assert abs(sum(prof["phases_pct"].values()) - 100) < 1e-6
    assert abs(prof["step_ms"] - 1000 * prof["step_s"] / 10) < 1e-9 and prof["step_max_ms"] >= prof["step_ms"]
    engine.reset_profile()
    prof = engine.profile()
    assert prof["steps"] == 0 and prof["step_s"] == 0 and not any(prof["counts"].values())


def test_bench_profile_reads_the_engine_profile(lm):
    """kiln/bench_profile.py's in-process half over the tiny engine: decode-only figures, the
    table, and the served-minus-in-process step time a caller reports."""
    from rich.console import Console

    from kiln import bench_profile as bp

    _, tok = lm
    engine = make_engine(lm, eos=[])
    prompts = [tok.encode(p).ids for p in PROMPTS[:3]]
    run = bp.timed_decode(engine, prompts, 12)
    assert run["tokens"] == 3 * 11 and len(run["step_times_ms"]) == 11  # the prefill step is not in it
    result = bp.summarize(run, variant="fp32", file="x.onnx", threads=1, streams=3, new_tokens=12, prompt_tokens=[])
    assert result["counts"]["decode_rows"] == 33 and result["counts"]["prefill_calls"] == 0
    assert result["step_ms"] == pytest.approx(sum(result["phases_ms"].values()))
    assert result["per_stream_tokens_per_s"] == pytest.approx(1000 / result["step_ms"])
    console = Console(width=150, record=True)
    console.print(bp.profile_table([result]))
    shown = console.export_text()
    assert all(label in shown for label in bp.PHASE_LABELS.values()) and "3 streams ms/step" in shown
    gap = bp.served_overhead(result, served_per_stream_tokens_per_s=500 / result["step_ms"])  # served at half the rate
    assert gap["overhead_ms"] == pytest.approx(result["step_ms"]) and gap["overhead_pct"] == pytest.approx(50)
