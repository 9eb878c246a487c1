"""mesp.estimate and `mesp estimate`: terms that add up, predictions against the allocator peaks mesp.memory
measures on tiny models, the longest fitting sequence, the JSON schema, bad input, and the memory bench's
column."""

from __future__ import annotations

import json

import pytest
import torch

from mesp.cli import main
from mesp.estimate import (CHECKPOINTS, KEPT, METHODS, STEP_TERMS, WORKING, estimate, longest_fitting,
                           model_config)
from mesp.families import ModelConfig
from mesp.loaders import load_random
from mesp.lora import LoraConfig, add_lora
from mesp.memory import MiB, PeakMemory
from mesp.methods import compute_gradients

# a tiny model whose MLP is wide, so a step's peak is dominated by the tensors the estimate counts
WIDE = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=512, hidden_size=64,
            intermediate_size=768, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
GEMMA = {**WIDE, "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "head_dim": 16,
         "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 64,
         "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]}
QWEN3 = {**WIDE, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 16}


@pytest.fixture(autouse=True)
def known_floor(monkeypatch):
    # no measuring subprocess for the CLI's estimates (unless an earlier test measured the floor: it is cached)
    monkeypatch.setenv("MESP_RUNTIME_FLOOR_BYTES", str(100 * MiB))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("options", [{}, {"dtype": "bfloat16"}, {"quantize": "int4"}, {"weights": "stream"},
                                     {"offload_checkpoints": True}, {"keep_layers": 2, "token_chunk": 48},
                                     {"batch_size": 3, "rank": 16, "per_layer_update": True}])
def test_terms_sum_to_the_totals(method, options):
    if options.get("offload_checkpoints") and method not in ("mesp", "mebp"):
        pytest.skip("only checkpointing methods offload")
    e = estimate(ModelConfig.from_hf(dict(WIDE)), 200, method=method, runtime_floor=100 * MiB, **options)
    assert sum(e.terms.values()) == e.private_peak_bytes
    assert sum(v for k, v in e.terms.items() if k in STEP_TERMS) == e.step_peak_bytes
    assert e.step_peak_bytes == max(e.stage_peaks.values()) == e.stage_peaks[e.stage]
    assert e.terms["runtime floor"] == 100 * MiB
    assert e.terms[e.dominant] == max(e.terms.values())
    assert all(isinstance(v, int) and v >= 0 for v in e.terms.values())


@pytest.mark.parametrize("hf, dtype", [(WIDE, "float32"), (QWEN3, "float32"), (GEMMA, "float32"),
                                       (WIDE, "bfloat16")], ids=["qwen2", "qwen3", "gemma3", "qwen2-bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_estimate_within_15_percent_of_the_measured_allocator_peak(hf, dtype, method):
    model = load_random("wide", dict(hf), getattr(torch, dtype), "cpu")
    add_lora(model, LoraConfig(r=4))
    T, B = 256, 2
    ids = torch.randint(0, hf["vocab_size"], (B, T), generator=torch.Generator().manual_seed(0))
    with PeakMemory() as pm:
        compute_gradients(model, ids, ids, method=method)
    # today's engine runs the whole sequence at once (token_chunk 0)
    e = estimate(model.config, T, batch_size=B, rank=4, method=method, dtype=dtype, token_chunk=0, runtime_floor=0)
    assert abs(e.step_peak_bytes / pm.peak_bytes - 1) <= 0.15, (e.stage_peaks, pm.stage_peaks)


@pytest.mark.parametrize("hf", [WIDE, QWEN3, GEMMA], ids=["qwen2", "qwen3", "gemma3"])
@pytest.mark.parametrize("token_chunk", [0, 48])
@pytest.mark.parametrize("keep", [1, 3])
def test_kept_layers_estimate_within_5_percent(hf, token_chunk, keep):
    """The planner's speed lever: layers keeping their intermediates (KEPT_SLOTS), whole or in token chunks."""
    model = load_random("wide", dict(hf), torch.float32, "cpu")
    add_lora(model, LoraConfig(r=4))
    T, B = 256, 2
    ids = torch.randint(0, hf["vocab_size"], (B, T), generator=torch.Generator().manual_seed(0))
    L = model.config.num_hidden_layers
    with PeakMemory() as pm:
        compute_gradients(model, ids, ids, method="mesp", token_chunk=token_chunk,
                          keep_layers=frozenset(range(L - keep, L)))
    e = estimate(model.config, T, batch_size=B, rank=4, method="mesp", dtype="float32", token_chunk=token_chunk,
                 keep_layers=keep, runtime_floor=0)
    assert abs(e.step_peak_bytes / pm.peak_bytes - 1) <= 0.05, (e.stage_peaks, pm.stage_peaks)


def test_estimate_follows_the_knobs():
    cfg = model_config("qwen2.5-0.5b")
    base = estimate(cfg, 1024, token_chunk=0, runtime_floor=0)
    assert estimate(cfg, 2048, token_chunk=0, runtime_floor=0).step_peak_bytes > base.step_peak_bytes
    offloaded = estimate(cfg, 1024, token_chunk=0, offload_checkpoints=True, runtime_floor=0)
    assert offloaded.terms[CHECKPOINTS] < base.terms[CHECKPOINTS] / 10
    kept = estimate(cfg, 1024, token_chunk=0, keep_layers=4, runtime_floor=0)
    assert kept.terms[KEPT] > 0 and kept.step_peak_bytes > base.step_peak_bytes
    chunked = estimate(cfg, 1024, token_chunk=128, runtime_floor=0)
    assert chunked.terms[WORKING] < base.terms[WORKING] / 2
    bf16 = estimate(cfg, 1024, token_chunk=0, dtype="bfloat16", runtime_floor=0)
    assert bf16.terms["resident weights"] * 2 == base.terms["resident weights"]
    assert estimate(cfg, 1024, quantize="int4", runtime_floor=0).terms["resident weights"] < \
        base.terms["resident weights"] / 3
    # MeBP's full-vocabulary logits dominate its step at this length
    mebp = estimate(cfg, 1024, method="mebp", runtime_floor=0)
    assert mebp.stage == "loss" and mebp.step_peak_bytes > 5 * base.step_peak_bytes


def test_longest_fitting_is_the_boundary():
    cfg = model_config("qwen2.5-0.5b")
    budget = 300 * MiB
    T = longest_fitting(cfg, budget, measure="step", token_chunk=0, runtime_floor=0)
    assert 0 < T < cfg.max_position_embeddings
    assert estimate(cfg, T, token_chunk=0, runtime_floor=0).step_peak_bytes <= budget
    assert estimate(cfg, T + 1, token_chunk=0, runtime_floor=0).step_peak_bytes > budget
    assert longest_fitting(cfg, 1, measure="step", runtime_floor=0) == 0


def test_estimate_cli_json_schema(capsys):
    assert main(["estimate", "--model", "qwen2.5-0.5b", "--seq-len", "256", "--dtype", "float32", "--json",
                 "--budget", "3000", "--keep-layers", "0"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {"step_peak_mib", "private_peak_mib", "terms", "dominant", "longest_seq_len"} <= set(shown)
    assert shown["dominant"] in shown["terms"] and shown["dominant"] == "resident weights"
    assert all(isinstance(v, float) for v in shown["terms"].values())
    assert abs(sum(shown["terms"].values()) - shown["private_peak_mib"]) < 0.01
    assert abs(shown["step_peak_mib"] - 56.2) / 56.2 < 0.15  # docs/results: the measured 0.5B T=256 peak
    assert shown["longest_seq_len"] > 256
    assert main(["estimate", "--model", "qwen2.5-0.5b", "--seq-len", "256", "--method", "mebp"]) == 0
    text = capsys.readouterr().out
    assert "dominant: " in text and "full-vocabulary logits" in text


@pytest.mark.parametrize("argv, match", [
    (["--model", "no-such-model"], "unknown model"),
    (["--model", "qwen2.5-0.5b", "--seq-len", "0"], "seq_len: must be an integer >= 1"),
    (["--model", "qwen2.5-0.5b", "--method", "mezo", "--offload-checkpoints"], "keeps no per-layer checkpoints"),
    (["--seq-len", "8"], "model: required"),
])
def test_estimate_cli_bad_input_is_one_line(argv, match, capsys):
    assert main(["estimate", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mesp estimate: error: ") and match in err[0], err


def test_memory_bench_prints_the_estimate_beside_the_measured_peak():
    from mesp.bench.sweep import MemoryCase, memory_table, predicted_peak

    case = MemoryCase(model="qwen2.5-0.5b", seq_len=256, rank=8, method="mesp")
    predicted = predicted_peak(model_config(case.model), case)
    assert abs(predicted / (56.2 * MiB) - 1) < 0.15  # docs/results/memory.json's measured peak of this case
    row = {"model": case.model, "seq_len": 256, "rank": 8, "dtype": "fp32", "method": "mesp",
           "peak_bytes": int(56.2 * MiB), "estimated_peak_bytes": predicted, "stage_peaks": {}, "weights_bytes": 0,
           "peak_rss_bytes": 0, "step_seconds": None}
    head, line = memory_table({"rows": [row]}).splitlines()
    assert head.split()[4] == "estimate" and f"{predicted / MiB:.1f}" in line.split()


def test_default_keep_layers_fit_in_the_logits_mesp_never_builds():
    """mesp train's default keeps as many of the last layers as fit in two fp32 [B, T, V] logits tensors (the
    logits and their gradient autograd's loss holds): at every length the default step stays under MeBP's
    estimated peak, and `mesp estimate` counts it."""
    from mesp.estimate import default_keep_layers, kept_saved_bytes, shapes_of

    cfg = model_config("qwen2.5-0.5b")
    for T in (256, 1024):
        keep = default_keep_layers(cfg, T)
        s = shapes_of(cfg, T, 1, "float32")
        assert keep * kept_saved_bytes(s) <= 2 * s.logits(4) < (keep + 1) * kept_saved_bytes(s)
        default = estimate(cfg, T, keep_layers=keep, runtime_floor=0).step_peak_bytes
        assert default < 0.75 * estimate(cfg, T, method="mebp", runtime_floor=0).step_peak_bytes
    assert keep == 20
    tiny = dict(cfg.to_hf(), vocab_size=1000, num_hidden_layers=4)
    assert default_keep_layers(ModelConfig.from_hf(tiny), 256) == 0  # a small vocabulary leaves no room


def test_a_streamed_or_quantized_base_keeps_no_layer_by_default():
    """A base streamed from its file (the default for GGUF files) or quantized asked for the least memory, as
    offloaded checkpoints do: mesp train and mesp estimate keep nothing unless told to (--keep-layers)."""
    from mesp.estimate import default_keep_layers
    from mesp.train_config import TrainConfig, kept_layer_count

    cfg = model_config("qwen2.5-0.5b")
    assert default_keep_layers(cfg, 256, weights="stream") == 0
    assert default_keep_layers(cfg, 256, weights="resident") == 20
    assert default_keep_layers(cfg, 256, quantize="int4") == 0 and default_keep_layers(cfg, 256, quantize="none") == 20
    gguf = TrainConfig(model="/models/qwen2.5-0.5b-q4_0.gguf", seq_len=256)
    assert kept_layer_count(gguf, cfg, "float32") == 0
    assert kept_layer_count(TrainConfig(model="/models/qwen2.5-0.5b-q4_0.gguf", seq_len=256, weights="resident"),
                            cfg, "float32") == 20
    assert kept_layer_count(TrainConfig(model="/models/qwen2.5-0.5b", seq_len=256), cfg, "float32") == 20
    assert kept_layer_count(TrainConfig(model="/models/qwen2.5-0.5b", seq_len=256, quantize="int4"), cfg,
                            "float32") == 0
    assert kept_layer_count(TrainConfig(model="/models/qwen2.5-0.5b-q4_0.gguf", seq_len=256, keep_layers=3),
                            cfg, "float32") == 3


MAPPED = dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=256)  # ~64 MiB of fp32 weights: RssAnon sees a copy

RSS_ANON_AFTER_LOAD = """
import sys, mesp
def anon():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon')) * 1024
before = anon()
model = mesp.load_model(sys.argv[1], dtype=sys.argv[2])
print(anon() - before, sum(w.nbytes for _, w in model.base_weights()))
"""


def test_an_fp32_safetensors_base_is_mapped_not_private(make_hf_model):
    """An HF directory loaded in its stored dtype keeps its weights as the file's pages (no private copy), so the
    planner counts none of them: `mesp train --memory-budget` refused budgets that mesp met (bench peers, AdamW
    at T=256: 1373 MiB refused for a 1885 MiB 'resident weights' term; the run peaked at 608 MiB). A cast to
    bf16, a quantized base or a preset's random weights are private and counted."""
    import subprocess
    import sys

    from mesp.planner import estimated_weights

    path, _ = make_hf_model("qwen2", **MAPPED)
    grown, weights = map(int, subprocess.run([sys.executable, "-c", RSS_ANON_AFTER_LOAD, str(path), "float32"],
                                             capture_output=True, text=True, check=True).stdout.split())
    assert weights > 60 * MiB and grown < weights / 4, (grown, weights)  # mapped: what the planner assumes
    grown_bf16, _ = map(int, subprocess.run([sys.executable, "-c", RSS_ANON_AFTER_LOAD, str(path), "bfloat16"],
                                            capture_output=True, text=True, check=True).stdout.split())
    assert grown_bf16 > weights / 4  # a cast is a private copy
    assert estimated_weights(path, "float32", None, None) == "mapped"
    assert estimated_weights(path, "bfloat16", None, None) == "resident"
    assert estimated_weights(path, "float32", "int4", None) == "resident"
    assert estimated_weights("qwen2.5-0.5b", "float32", None, None) == "resident"
    cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    mapped, resident = (estimate(cfg, 64, weights=w, runtime_floor=0) for w in ("mapped", "resident"))
    assert mapped.terms["resident weights"] == 0 < resident.terms["resident weights"]
