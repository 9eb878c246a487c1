"""mesp.planner: a plan fits its budget (the allocator peak mesp.memory measures on a tiny model), the planner
trades speed for memory in the documented order, and `mesp train --memory-budget` prints the plan (--dry-run)
or stops with one line before any work when nothing fits."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from safetensors.torch import load_file

from mesp.cli import main
from mesp.errors import MespError
from mesp.estimate import estimate, model_config
from mesp.families import ModelConfig
from mesp.loaders import load_random
from mesp.lora import LoraConfig, add_lora
from mesp.memory import MiB, PeakMemory
from mesp.methods import compute_gradients, mesp as mesp_engine
from mesp.planner import PLANNED_KNOBS, plan_memory

from test_estimate import WIDE
from test_train import write_pretokenized

ENGINE_KNOBS = set(inspect.signature(mesp_engine.gradients).parameters)


@pytest.fixture(autouse=True)
def known_floor(monkeypatch):
    monkeypatch.setenv("MESP_RUNTIME_FLOOR_BYTES", str(100 * MiB))


@pytest.mark.parametrize("slack", [1.02, 1.3, 3.0])
def test_plan_fits_the_budget_as_measured(slack, tmp_path):
    T, B, r = 256, 2, 4
    cfg = ModelConfig.from_hf(dict(WIDE))
    plain = estimate(cfg, T, batch_size=B, rank=r, token_chunk=0, runtime_floor=0)
    budget = int(plain.step_peak_bytes * slack)
    plan = plan_memory(cfg, budget, T, measure="step", batch_size=B, rank=r, runtime_floor=0)
    assert plan.estimate.step_peak_bytes <= budget
    if slack >= 3.0 and "keep_layers" in ENGINE_KNOBS:
        assert plan.keep_layers == cfg.num_hidden_layers  # room for every layer's intermediates: recompute none
    options = {k: v for k, v in plan.engine_options(cfg.num_hidden_layers).items()
               if v or k in ("loss_chunk", "attn_block")}
    missing = set(options) - ENGINE_KNOBS
    if missing:
        pytest.skip(f"the MeSP engine has no {', '.join(sorted(missing))} yet")
    model = load_random("wide", dict(WIDE), torch.float32, "cpu")
    add_lora(model, LoraConfig(r=r))
    ids = torch.randint(0, WIDE["vocab_size"], (B, T), generator=torch.Generator().manual_seed(0))
    with PeakMemory() as pm:
        compute_gradients(model, ids, ids, method="mesp", offload_checkpoints=tmp_path if plan.offload_checkpoints
                          else None, **options)
    assert pm.peak_bytes <= budget, (pm.peak_bytes, budget, plan.describe())


def test_planner_trades_speed_for_memory_in_order():
    cfg = model_config("qwen2.5-0.5b")
    opts = dict(measure="step", runtime_floor=0, knobs=PLANNED_KNOBS)  # estimates only: every knob
    roomy = plan_memory(cfg, 4000 * MiB, 1024, **opts)
    assert (roomy.keep_layers, roomy.token_chunk, roomy.offload_checkpoints) == (24, 0, False)
    mid = plan_memory(cfg, 400 * MiB, 1024, **opts)
    assert 0 < mid.keep_layers < 24 and not mid.offload_checkpoints
    # RAM checkpoints alone (24 x [4096, 896] fp32 = 336 MiB) exceed 300 MiB: offload, chunk, keep nothing
    tight = plan_memory(cfg, 300 * MiB, 4096, **opts)
    assert tight.offload_checkpoints and tight.token_chunk and tight.estimate.step_peak_bytes <= 300 * MiB
    with pytest.raises(MespError, match=r"nothing fits.*dominated by .*would fit: --seq-len \d+"):
        plan_memory(cfg, 20 * MiB, 4096, **opts)
    with pytest.raises(MespError, match="nothing fits"):
        plan_memory(cfg, 600 * MiB, 1024, method="mebp", **opts)  # MeBP's full logits alone exceed it


def test_train_memory_budget_dry_run_and_impossible_budget(tmp_path, capsys):
    data = write_pretokenized(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    base = ["train", "--model", "qwen2.5-0.5b", "--data", data, "--out", str(out), "--dtype", "float32",
            "--seq-len", "1024", "--batch-size", "1"]
    assert main([*base, "--memory-budget", "2600", "--dry-run"]) == 0
    shown = capsys.readouterr().out
    plan_text, _, settings = shown.partition("{")
    assert plan_text.startswith("memory plan for 2600 MiB: mesp, checkpoints in RAM")
    settings = json.loads("{" + settings)
    assert settings["memory_budget"] == 2600
    assert settings["keep_layers"] == (0 if "keep_layers" not in ENGINE_KNOBS else settings["keep_layers"])
    assert main([*base, "--memory-budget", "900"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mesp train: error: memory budget 900 MiB: nothing fits"), err
    assert "dominated by resident weights" in err[0] and "--quantize int4" in err[0]
    assert not out.exists()  # before any work


def test_budgeted_training_keeps_layers_and_trains_as_without(make_hf_model, tmp_path, capsys):
    """A generous budget makes every layer keep its intermediates; the run then trains as the default one does
    (kept and recomputed intermediates give the same gradients within fp32 rounding)."""
    path, _ = make_hf_model("qwen2", num_key_value_heads=2)
    data = write_pretokenized(tmp_path / "train.jsonl", n=8, lo=10, hi=16)
    base = ["train", "--model", str(path), "--data", data, "--seq-len", "16", "--batch-size", "2", "--steps", "3",
            "--dtype", "float32"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert main([*base, "--out", str(tmp_path / "budget"), "--memory-budget", "100000"]) == 0
    shown = capsys.readouterr().out
    assert "memory plan for 100000 MiB: mesp, checkpoints in RAM, 2 of 2 layers keep their intermediates" in shown
    plain, budget = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("plain", "budget"))
    assert plain.keys() == budget.keys()
    for key in plain:
        assert torch.allclose(plain[key], budget[key], rtol=1e-4, atol=1e-6), key


def test_long_samples_are_skipped_and_counted(make_hf_model, tmp_path, capsys):
    path, _ = make_hf_model("qwen2", num_key_value_heads=2)
    data = write_pretokenized(tmp_path / "train.jsonl", n=10, lo=6, hi=20)
    lengths = [len(json.loads(line)["input_ids"]) for line in open(data)]
    longer = sum(n > 12 for n in lengths)
    assert 0 < longer < len(lengths)
    out = tmp_path / "run"
    assert main(["train", "--model", str(path), "--data", data, "--out", str(out), "--seq-len", "12",
                 "--batch-size", "2", "--steps", "2", "--long-samples", "skip", "--optimizer", "sgd"]) == 0
    shown = capsys.readouterr().out
    assert f"{longer} samples longer than 12 tokens were skipped" in shown and "truncated" not in shown
    all_long = tmp_path / "long.jsonl"
    all_long.write_text(json.dumps({"input_ids": list(range(30))}) + "\n")
    assert main(["train", "--model", str(path), "--data", str(all_long), "--out", str(tmp_path / "r2"),
                 "--seq-len", "12", "--long-samples", "skip"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "all 1 samples are longer than seq_len 12" in err[0], err


@pytest.mark.parametrize("quantize,expected", [(None, "stream"), ("gguf", "resident")])
def test_estimate_assumes_the_weights_load_model_gives(smollm2_gguf, quantize, expected):
    """The estimate and the planner count resident weights exactly when load_model keeps them resident: a GGUF
    streams by default, and quantize="gguf" (keep the file's blocks in memory) makes it resident."""
    from mesp.loaders import default_weights, load_model
    from mesp.planner import EstimateSettings
    from mesp.streamed import MappedWeight

    model = load_model("smollm2-135m-instruct", quantize=quantize)
    streamed = isinstance(model.model.layers[0].mlp.down_proj.weight, MappedWeight)
    assert ("stream" if streamed else "resident") == expected
    assert default_weights("smollm2-135m-instruct", quantize) == ("stream" if streamed else "resident")
    options = EstimateSettings(model="smollm2-135m-instruct", seq_len=64,
                               quantize=quantize or "none").options()
    assert options["weights"] == ("stream" if streamed else "resident")
