"""kiln.bench's, kiln.bench_lm's and kiln.loadgen's arithmetic on made-up timings: no server."""

import json

import pytest

from kiln.bench import (
    FASTAPI,
    GATEWAY,
    ONNXRUNTIME,
    PYTORCH,
    SERVED,
    BenchRow,
    Target,
    add_ratios,
    evaluate_targets,
    latency_percentiles,
    make_row,
    median_row,
    request_batches,
    sentence_pool,
    write_results,
)
from kiln_core.spec import load_spec


def test_percentiles_are_in_milliseconds_and_interpolated():
    latencies = [i / 1000 for i in range(1, 101)]  # 1 ms .. 100 ms
    p50, p95 = latency_percentiles(latencies)
    assert p50 == pytest.approx(50.5)
    assert p95 == pytest.approx(95.05)


def test_percentiles_refuse_an_empty_run():
    with pytest.raises(ValueError, match="nothing was timed"):
        latency_percentiles([])


def test_row_throughput_counts_sentences_over_wall_time():
    # 8 concurrent clients, 40 batch-1 requests of 0.2 s each, finished in 1 s of wall time
    row = make_row("served", SERVED, "int8", 1, [0.2] * 40, wall_s=1.0, concurrency=8)
    assert row.sentences_per_s == pytest.approx(40.0)
    assert row.requests == 40 and row.p50_ms == pytest.approx(200.0)
    # 4 sequential batch-32 requests in 2 s
    assert make_row("ort", ONNXRUNTIME, "int8", 32, [0.5] * 4, wall_s=2.0).sentences_per_s == pytest.approx(64.0)


def _row(kind, precision, batch, sps, concurrency=1, p50=1.0):
    return BenchRow(kind, kind, precision, batch, concurrency, 10, sps, p50, 2.0 * p50)


ROWS = [
    _row(PYTORCH, "fp32", 1, 8.0),
    _row(PYTORCH, "fp32", 8, 30.0),
    _row(PYTORCH, "fp32", 32, 40.0),
    _row(ONNXRUNTIME, "fp32", 32, 176.0),
    _row(ONNXRUNTIME, "int8", 1, 200.0, p50=4.0),
    _row(ONNXRUNTIME, "int8", 8, 400.0),
    _row(ONNXRUNTIME, "int8", 32, 440.0),
    _row(SERVED, "int8", 1, 100.0),
    _row(SERVED, "int8", 32, 352.0),
    _row(SERVED, "int8", 1, 300.0, concurrency=8),
    _row(GATEWAY, "int8", 1, 90.0, p50=5.0),
    _row(GATEWAY, "int8", 1, 340.0, concurrency=8),
    _row(FASTAPI, "fp32", 1, 30.0, p50=30.0),
    _row(FASTAPI, "fp32", 1, 100.0, concurrency=8),
]


def test_ratios_compare_the_same_batch_and_the_served_precision():
    rows = add_ratios(ROWS, "int8")
    by = {(r.kind, r.precision, r.batch, r.concurrency): r for r in rows}
    assert by[(SERVED, "int8", 32, 1)].x_pytorch == pytest.approx(352 / 40)
    assert by[(SERVED, "int8", 32, 1)].served_over_inprocess == pytest.approx(352 / 440)
    # 8 concurrent single-sentence clients hold 8 sentences in flight: compared with batch 8
    assert by[(SERVED, "int8", 1, 8)].served_over_inprocess == pytest.approx(300 / 400)
    assert by[(GATEWAY, "int8", 1, 8)].served_over_inprocess == pytest.approx(340 / 400)
    assert by[(GATEWAY, "int8", 1, 8)].x_pytorch == pytest.approx(340 / 30)
    assert by[(FASTAPI, "fp32", 1, 8)].served_over_inprocess is None  # a baseline, not kiln's serving
    assert by[(ONNXRUNTIME, "fp32", 32, 1)].x_pytorch == pytest.approx(176 / 40)
    assert by[(ONNXRUNTIME, "fp32", 32, 1)].served_over_inprocess is None  # only served rows get one
    assert by[(PYTORCH, "fp32", 1, 1)].x_pytorch == pytest.approx(1.0)


def test_targets_pass_and_miss_on_the_figures():
    targets = evaluate_targets(ROWS, "int8", batch=32)
    assert targets["served_vs_inprocess"].value == pytest.approx(0.8)
    assert targets["served_vs_inprocess"].verdict == "PASS"
    assert targets["served_vs_pytorch"].value == pytest.approx(8.8)
    assert targets["served_vs_pytorch"].passed is True

    slow = [r if r.kind != SERVED or r.batch != 32 else _row(SERVED, "int8", 32, 200.0) for r in ROWS]
    targets = evaluate_targets(slow, "int8", batch=32)
    assert targets["served_vs_inprocess"].verdict == "MISS"  # 200 / 440 = 0.45 < 0.7
    assert targets["served_vs_pytorch"].verdict == "MISS"  # 200 / 40 = 5 < 8


def test_targets_ignore_the_concurrent_row_and_say_when_a_row_is_missing():
    # only the concurrent served row at batch 1: the batch-1 target reads the single-client row
    assert evaluate_targets(ROWS, "int8", batch=1)["served_vs_inprocess"].value == pytest.approx(0.5)
    no_served = [r for r in ROWS if r.kind != SERVED]
    t = evaluate_targets(no_served, "int8", batch=32)["served_vs_pytorch"]
    assert t.value is None and t.passed is None and t.verdict == "N/A"


def test_requests_walk_round_the_sentence_pool():
    pool = sentence_pool(["a", "b", "c"], 5)
    assert pool == ["a", "b", "c", "a", "b"]
    assert request_batches(pool, 2, 3) == [["a", "b"], ["c", "a"], ["b", "a"]]
    with pytest.raises(ValueError):
        sentence_pool([], 4)


def test_results_land_in_bench_json_under_the_spec_root(tmp_path):
    spec = load_spec("minilm", workdir=str(tmp_path))
    rows = add_ratios(ROWS, "int8")
    path = write_results(spec, rows, evaluate_targets(rows, "int8"), {"served_vs_inprocess_min_cosine": 1.0}, {})
    assert path == tmp_path / "minilm" / "bench.json"
    doc = json.loads(path.read_text())
    assert len(doc["rows"]) == len(ROWS)
    assert doc["targets"]["served_vs_inprocess"]["passed"] is True
    assert doc["rows"][-1]["concurrency"] == 8


def test_gateway_overhead_rows_subtract_the_direct_grpc_median():
    from kiln.bench_gateway import MAX_ADDED_P50_MS, overhead_rows, target_row

    lat = {"Triton gRPC (direct)": [0.010, 0.011, 0.012], "gateway, HTTP keep-alive (float)": [0.0115, 0.0125, 0.0135],
           "gateway, openai client (base64)": [0.020, 0.021, 0.022]}
    rows = overhead_rows(lat, "Triton gRPC (direct)", 1)
    added = {r.path: r.added_p50_ms for r in rows}
    assert added["Triton gRPC (direct)"] is None
    assert abs(added["gateway, HTTP keep-alive (float)"] - 1.5) < 1e-9 and abs(added["gateway, openai client (base64)"] - 10) < 1e-9
    assert target_row(rows) == (added["gateway, HTTP keep-alive (float)"], True)
    slow = overhead_rows({**lat, "gateway, HTTP keep-alive (float)": [0.0135, 0.0145]}, "Triton gRPC (direct)", 1)
    value, passed = target_row(slow)
    assert value > MAX_ADDED_P50_MS and passed is False
    assert target_row(rows, batch=32) == (None, None)  # not measured is not a pass


def test_interleaved_times_every_path_each_round():
    from kiln.bench_gateway import interleaved

    seen = []
    out = interleaved({"a": lambda i: seen.append(("a", i)), "b": lambda i: seen.append(("b", i))}, rounds=3, warmup=1)
    assert [len(v) for v in out.values()] == [3, 3]
    assert seen[2:] == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]


def test_a_row_is_the_median_of_its_runs():
    runs = [make_row("ort", ONNXRUNTIME, "int8", 1, [lat] * 10, wall_s=10 * lat) for lat in (0.004, 0.010, 0.005)]
    row = median_row(runs)
    assert row.runs == 3 and row.requests == 30
    assert row.sentences_per_s == pytest.approx(200.0)  # median of 250, 100, 200
    assert row.p50_ms == pytest.approx(5.0)
    assert row.sentences_per_s_runs == pytest.approx((250.0, 100.0, 200.0))
    with pytest.raises(ValueError):
        median_row([])


def test_the_served_targets_against_in_process_and_fastapi():
    t = evaluate_targets(ROWS, "int8", batch=32, concurrency=8)
    # gateway p50 5 ms vs in-process batch-1 p50 4 ms: 1.25x <= 1.5x
    assert t["gateway_latency_vs_inprocess"].value == pytest.approx(1.25)
    assert t["gateway_latency_vs_inprocess"].verdict == "PASS"
    assert t["gateway_concurrent_vs_inprocess"].value == pytest.approx(340 / 400)  # 0.85 >= 0.8
    assert t["gateway_concurrent_vs_inprocess"].passed is True
    assert t["gateway_concurrent_vs_fastapi"].value == pytest.approx(3.4)
    assert t["gateway_concurrent_vs_fastapi"].passed is True

    slow = [r for r in ROWS if r.kind != GATEWAY] + [_row(GATEWAY, "int8", 1, 90.0, p50=8.0),
                                                     _row(GATEWAY, "int8", 1, 250.0, concurrency=8)]
    t = evaluate_targets(slow, "int8", concurrency=8)
    assert t["gateway_latency_vs_inprocess"].verdict == "MISS"  # 8 / 4 = 2x > 1.5x
    assert t["gateway_concurrent_vs_inprocess"].verdict == "MISS"  # 250 / 400 < 0.8
    assert t["gateway_concurrent_vs_fastapi"].verdict == "MISS"  # 250 / 100 < 3

    no_fastapi = [r for r in ROWS if r.kind != FASTAPI]
    assert evaluate_targets(no_fastapi, "int8")["gateway_concurrent_vs_fastapi"].verdict == "N/A"


def test_target_direction_and_figures():
    assert Target("latency", 99.0, 100.0, at_most=True, unit="ms").passed is True
    assert Target("latency", 101.0, 100.0, at_most=True, unit="ms").passed is False
    assert Target("latency", 99.0, 100.0, at_most=True, unit="ms").figure == "99.0 ms"
    assert Target("ratio", 1.0, 1.0).passed is True  # the threshold itself passes
    assert Target("ratio", 0.5, 1.0).figure == "0.50x"
    assert Target("ratio", None, 1.0).figure == "not measured"
    assert Target("ratio", 2.0, 1.0).as_dict()["passed"] is True


# ----------------------------------------------------------------------------- kiln.loadgen
def test_stream_timing_ttft_decode_rate_and_gaps():
    from kiln.loadgen import StreamTiming

    # request at 0; first chunk at 0.1 s, then 9 more 0.05 s apart; 10 tokens
    t = StreamTiming(0.0, tuple(0.1 + 0.05 * i for i in range(10)), 0.6, 10)
    assert t.ttft_s == pytest.approx(0.1)
    assert t.decode_tokens_per_s == pytest.approx(9 / 0.45)  # tokens after the first / first-to-last
    assert t.gaps_s == pytest.approx([0.05] * 9)
    # the server's usage may count more tokens than chunks (several tokens in one chunk)
    assert StreamTiming(0.0, (0.1, 0.2), 0.3, 5).decode_tokens_per_s == pytest.approx(4 / 0.1)
    empty = StreamTiming(0.0, (), 0.2, 0)
    assert empty.ttft_s is None and empty.decode_tokens_per_s is None and empty.gaps_s == []


def test_a_chat_wave_aggregates_over_wall_time_and_takes_medians_per_stream():
    from kiln.loadgen import StreamTiming, summarize_chat

    # two streams of 11 tokens; the second waited 1 s for a slot (a server that serializes)
    a = StreamTiming(0.0, tuple(0.1 + 0.1 * i for i in range(11)), 1.1, 11)
    b = StreamTiming(0.0, tuple(1.2 + 0.1 * i for i in range(11)), 2.2, 11)
    run = summarize_chat([a, b], wall_s=2.2)
    assert run.streams == 2 and run.tokens == 22
    assert run.tokens_per_s == pytest.approx(10.0)  # 22 tokens / 2.2 s
    assert run.decode_tokens_per_s == pytest.approx(10.0)  # each stream decodes at 10/s once running
    assert run.ttft_p50_ms == pytest.approx((100 + 1200) / 2)
    assert run.gap_p50_ms == pytest.approx(100.0)
    with pytest.raises(ValueError):
        summarize_chat([], 1.0)


def test_embedding_load_and_the_median_of_runs():
    from kiln.loadgen import EmbedRun, median_of, summarize_embed

    run = summarize_embed([0.1] * 40, wall_s=0.5, clients=8)
    assert run.sentences_per_s == pytest.approx(80.0) and run.p50_ms == pytest.approx(100.0) and run.requests == 40
    runs = [EmbedRun(8, 40, sps, p50, 2 * p50, 0.5) for sps, p50 in ((80.0, 100.0), (60.0, 130.0), (90.0, 90.0))]
    m = median_of(runs)
    assert (m.sentences_per_s, m.p50_ms, m.clients, m.requests) == (80.0, 100.0, 8, 120)
    with pytest.raises(ValueError):
        summarize_embed([], 1.0, 1)


def test_spread_flags_runs_that_disagree():
    from kiln.loadgen import NOISY_SPREAD, spread

    assert spread([30.0, 31.0, 29.0]) == pytest.approx(31 / 29)
    assert spread([5.3, 60.0, 58.0]) > NOISY_SPREAD  # one run hit a busy machine
    assert spread([]) is None and spread([0.0, 1.0]) is None


def test_median_of_chat_runs_skips_missing_figures():
    from kiln.loadgen import ChatRun, median_of

    runs = [ChatRun(1, 90.0, 30.0, 28.0, 33.0, 40.0, 128, 4.6), ChatRun(1, 110.0, 32.0, 30.0, None, None, 128, 4.3),
            ChatRun(1, 100.0, 31.0, 29.0, 35.0, 50.0, 128, 4.4)]
    m = median_of(runs)
    assert (m.ttft_p50_ms, m.decode_tokens_per_s, m.tokens_per_s, m.tokens) == (100.0, 31.0, 29.0, 384)
    assert m.gap_p50_ms == pytest.approx(34.0)  # median of the two runs that had gaps


# ----------------------------------------------------------------------------- kiln.bench_lm
def _lm(kind, streams, ttft, agg, per_stream):
    from kiln.bench_lm import LMRow

    return LMRow(kind, kind, streams, 3, ttft, agg, per_stream, 128 * streams)


def test_chat_targets_against_llama_cpp_and_transformers():
    from kiln.bench_lm import GATEWAY as GW
    from kiln.bench_lm import HF, LLAMA, lm_targets

    rows = [_lm(HF, 1, 600.0, 18.0, 20.0), _lm(GW, 1, 90.0, 30.0, 32.0), _lm(GW, 8, 700.0, 120.0, 16.0),
            _lm(LLAMA, 1, 110.0, 75.0, 80.0), _lm(LLAMA, 8, 5000.0, 80.0, 80.0)]
    t = lm_targets(rows)
    assert t["decode_vs_llama_cpp"].value == pytest.approx(32 / 80) and t["decode_vs_llama_cpp"].verdict == "MISS"
    assert t["ttft"].value == pytest.approx(90.0) and t["ttft"].verdict == "PASS"  # <= 100 ms
    assert t["aggregate_vs_llama_cpp"].value == pytest.approx(1.5) and t["aggregate_vs_llama_cpp"].verdict == "MISS"
    assert t["decode_vs_transformers"].value == pytest.approx(1.6)
    assert t["scaling"].value == pytest.approx(4.0) and t["scaling"].passed is True

    fast = [r for r in rows if r.kind != GW] + [_lm(GW, 1, 120.0, 85.0, 90.0), _lm(GW, 8, 800.0, 170.0, 21.0)]
    t = lm_targets(fast)
    assert t["decode_vs_llama_cpp"].verdict == "PASS" and t["aggregate_vs_llama_cpp"].verdict == "PASS"
    assert t["ttft"].verdict == "MISS"  # 120 ms > 100 ms

    # without llama.cpp (not installed) its targets say N/A, the others still judge
    t = lm_targets([r for r in rows if r.kind != LLAMA])
    assert t["decode_vs_llama_cpp"].verdict == "N/A" and t["aggregate_vs_llama_cpp"].verdict == "N/A"
    assert t["ttft"].verdict == "PASS"


def test_every_server_gets_the_same_prompts_and_each_run_starts_elsewhere():
    from kiln.bench_lm import PROMPTS, _prompts

    assert _prompts(1, 0) == [PROMPTS[0]] and _prompts(1, 2) == [PROMPTS[2]]
    assert sorted(_prompts(8, 1)) == sorted(PROMPTS)  # 8 streams: every prompt once


def test_llama_cpp_server_command_keeps_streams_whole_and_greedy(tmp_path):
    from kiln.baselines import llamacpp_server

    cmd = llamacpp_server.server_command(tmp_path / "m.Q4_1.gguf", 8123, 2)
    args = dict(zip(cmd[3::2], cmd[4::2]))  # after: python -m llama_cpp.server
    assert cmd[1:3] == ["-m", "llama_cpp.server"]
    assert args["--interrupt_requests"] == "false"  # the default lets a new request cut a running stream
    assert (args["--n_threads"], args["--n_ctx"], args["--host"], args["--port"]) == ("2", "2048", "127.0.0.1", "8123")
    assert llamacpp_server.GREEDY_EXTRA == {"repeat_penalty": 1.0}


def test_fastapi_baseline_answers_openai_embeddings(tmp_path):
    import numpy as np
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from kiln.baselines.fastapi_torch import EmbeddingRequest, create_app

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "a", "b"]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(tmp_path)
    cfg = BertConfig(vocab_size=9, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(cfg).save_pretrained(tmp_path)
    app = create_app(tmp_path, "tiny")
    endpoint = next(r.endpoint for r in app.routes if getattr(r, "path", "") == "/v1/embeddings")
    out = endpoint(EmbeddingRequest(model="tiny", input=["hello world", "a", "hello world"]))
    assert out["object"] == "list" and [d["index"] for d in out["data"]] == [0, 1, 2]
    vecs = np.array([d["embedding"] for d in out["data"]])
    assert vecs.shape == (3, 16)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)  # L2-normalised
    assert np.allclose(vecs[0], vecs[2], atol=1e-5)  # the padded batch does not change a text's vector
    one = endpoint(EmbeddingRequest(model="tiny", input="hello world"))  # a bare string is one input
    assert np.allclose(one["data"][0]["embedding"], vecs[0], atol=1e-5)
    assert out["usage"]["prompt_tokens"] > 0
