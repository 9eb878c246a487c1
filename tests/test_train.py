"""Training: optimizers against torch.optim, per-layer updates equal the ordinary step, gradient accumulation
equals one big batch, resume equals an uninterrupted run, metrics.jsonl, the CLI (config file, overrides,
dry-run) and every bad input (exit 2, one line on stderr, no adapter written)."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import mesp
from mesp.cli import main
from mesp.data import MicroBatchStream, load_data
from mesp.errors import MespError
from mesp.optim import SGD, AdamW, clip_grad_norm, learning_rate
from mesp.train import TrainConfig, resolve, train

VOCAB = 96  # conftest's tiny models


@pytest.fixture(scope="module")
def tiny(make_hf_model):
    path, _ = make_hf_model("qwen2", num_key_value_heads=2)
    return str(path)


def write_pretokenized(path, n=10, seed=0, lo=6, hi=20):
    """n random samples; the first 3 tokens of each are a 'prompt' without loss."""
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            ids = [r.randrange(VOCAB) for _ in range(r.randint(lo, hi))]
            f.write(json.dumps({"input_ids": ids, "labels": [-100] * 3 + ids[3:]}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return {"train": write_pretokenized(d / "train.jsonl", 10, seed=0),
            "valid": write_pretokenized(d / "valid.jsonl", 5, seed=1)}


def config(tiny, data, out, **kw):
    base = dict(model=tiny, data=data["train"], out=str(out), seq_len=32, batch_size=3, seed=1)
    return TrainConfig(**{**base, **kw})


def adapter(out):
    return load_file(str(out / "adapter_model.safetensors"))


def assert_same(a: dict, b: dict, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            assert (a[k] - b[k]).abs().max() <= atol, k


# ---- optimizers --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ours,theirs", [
    (lambda: SGD(), lambda p: torch.optim.SGD(p, lr=0.1)),
    (lambda: SGD(momentum=0.9, weight_decay=0.01), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9,
                                                                              weight_decay=0.01)),
    (lambda: AdamW(), lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.0, foreach=False)),
    (lambda: AdamW(weight_decay=0.1), lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1, foreach=False)),
])
def test_optimizers_match_torch(ours, theirs):
    g = torch.Generator().manual_seed(0)
    init = {"a": torch.randn(4, 6, generator=g), "b": torch.randn(6, 4, generator=g)}
    mine = {k: v.clone() for k, v in init.items()}
    ref = [torch.nn.Parameter(v.clone()) for v in init.values()]
    opt, ref_opt = ours(), theirs(ref)
    for step in range(5):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in init.items()}
        lr = 0.1 * (1 + step) / 5
        opt.step(mine, grads, lr)
        for p, gr in zip(ref, grads.values()):
            p.grad = gr.clone()
        for group in ref_opt.param_groups:
            group["lr"] = lr
        ref_opt.step()
    for (k, v), p in zip(mine.items(), ref):
        assert torch.equal(v, p.detach()), k


def test_schedules_and_clipping():
    assert [learning_rate(s, 1.0, 10, "constant", warmup=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = [learning_rate(s, 2.0, 10, "cosine", warmup=2) for s in range(10)]
    assert cos[:3] == [1.0, 2.0, 2.0] and cos[-1] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a > b for a, b in zip(cos[2:], cos[3:]))
    grads = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}
    assert clip_grad_norm(grads, 1.0) == pytest.approx(5.0)
    assert torch.allclose(grads["a"], torch.tensor([0.6, 0.0]), atol=1e-6)
    with pytest.raises(MespError, match="schedule"):
        learning_rate(0, 1.0, 10, "linear")


# ---- the training loop ------------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer,atol", [("sgd", 0.0), ("adamw", 1e-6)])
def test_per_layer_update_equals_ordinary_step(tiny, data, tmp_path, optimizer, atol):
    runs = {}
    for per_layer in (True, False):
        out = tmp_path / f"per_layer_{per_layer}"
        train(config(tiny, data, out, steps=3, method="mesp", optimizer=optimizer, lr=0.05,
                     per_layer_update=per_layer))
        assert json.loads((out / "train_config.json").read_text())["per_layer_update"] is per_layer
        runs[per_layer] = adapter(out)
    assert_same(runs[True], runs[False], atol)
    assert any(v.abs().sum() > 0 for k, v in runs[True].items() if "lora_B" in k)  # it did train


def test_grad_accumulation_equals_one_big_batch(tiny, data, tmp_path):
    big = tmp_path / "big"
    small = tmp_path / "small"
    train(config(tiny, data, big, steps=1, batch_size=4, grad_accum=1, optimizer="sgd", lr=0.5, method="autograd"))
    train(config(tiny, data, small, steps=1, batch_size=2, grad_accum=2, optimizer="sgd", lr=0.5, method="autograd"))
    a, b = adapter(big), adapter(small)
    assert_same(a, b, atol=1e-6)
    moved = [k for k in a if "lora_B" in k]
    assert all(a[k].abs().max() > 1e-4 for k in moved)
    # the per-step loss is the mean over the whole step's labelled tokens either way
    la = json.loads((big / "metrics.jsonl").read_text().splitlines()[0])
    lb = json.loads((small / "metrics.jsonl").read_text().splitlines()[0])
    assert la["loss"] == pytest.approx(lb["loss"], rel=1e-6) and la["trained_tokens"] == lb["trained_tokens"]


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("method,kw", [("mesp", dict(optimizer="adamw", warmup=2)),
                                       ("mezo", dict(lr=1e-3))])
def test_resume_equals_uninterrupted_run(tiny, data, tmp_path, method, kw):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    settings = dict(steps=6, save_every=3, method=method, valid=data["valid"], eval_every=2, **kw)
    train(config(tiny, data, whole, **settings))

    def stop_after_checkpoint(event):
        if event["event"] == "checkpoint" and event["step"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(config(tiny, data, parts, **settings), progress=stop_after_checkpoint)
    assert not (parts / "adapter_model.safetensors").exists()  # no final adapter from an interrupted run
    result = train(config(tiny, data, parts, resume=True, **settings))
    assert result.resumed_from == 3 and result.steps == 6
    assert_same(adapter(whole), adapter(parts))
    if method != "mezo":
        assert_same(load_file(str(whole / "checkpoint-000006" / "optimizer.safetensors")),
                    load_file(str(parts / "checkpoint-000006" / "optimizer.safetensors")))
    drop = ("seconds", "tokens_per_s", "peak_rss_bytes", "private_peak_bytes")
    rows = [[{k: v for k, v in json.loads(l).items() if k not in drop} for l in (d / "metrics.jsonl").read_text()
             .splitlines()] for d in (whole, parts)]
    assert rows[0] == rows[1] and [r["step"] for r in rows[0]] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in parts.iterdir()) == sorted(p.name for p in whole.iterdir())


def test_metrics_jsonl(tiny, data, tmp_path):
    out = tmp_path / "run"
    c = config(tiny, data, out, steps=4, eval_every=3, valid=data["valid"], optimizer="sgd", lr=0.2,
               schedule="cosine", warmup=1, measure_memory=True)
    result = train(c)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["lr"] for r in rows] == [learning_rate(s, 0.2, 4, "cosine", 1) for s in range(4)]
    assert [("valid_loss" in r) for r in rows] == [False, False, True, True]  # every 3 steps and at the end
    assert all(r["peak_bytes"] > 0 and r["seconds"] > 0 for r in rows)

    # tokens: the real tokens of the step's samples, in the seeded order
    ds = load_data(data["train"], seq_len=32)
    stream = MicroBatchStream(len(ds), 3, seed=1)
    batches = [ds.collate(stream.indices(m)) for m in range(4)]
    assert [r["tokens"] for r in rows] == [b.n_tokens for b in batches]
    assert [r["trained_tokens"] for r in rows] == [b.n_targets for b in batches]

    # step 1's loss is the base model's (lora_B starts at 0), computed here through full logits
    model = mesp.load_model(tiny)
    b = batches[0]
    logits = mesp.forward(model, b.input_ids, b.attention_mask)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), b.labels[:, 1:].reshape(-1), ignore_index=-100)
    assert rows[0]["loss"] == pytest.approx(float(ref), rel=1e-5)

    # the final validation loss is that of the saved adapter
    mesp.load_adapter(model, out)
    valid = load_data(data["valid"], seq_len=32)
    total, count = 0.0, 0
    for s in valid.samples:
        logits = mesp.forward(model, s.input_ids[None])
        total += float(F.cross_entropy(logits[0, :-1], s.labels[1:], ignore_index=-100, reduction="sum"))
        count += s.n_targets
    assert rows[-1]["valid_loss"] == pytest.approx(total / count, rel=1e-5) == result.valid_loss


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tiny, data, tmp_path, capsys):
    out = tmp_path / "nan"
    argv = ["train", "--model", tiny, "--data", data["train"], "--out", str(out), "--seq-len", "32",
            "--steps", "5", "--save-every", "1", "--optimizer", "sgd", "--lr", "1e30", "--method", "mebp"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("not finite" in err[0] or "loss is" in err[0]), err
    assert "checkpoint-000001" in err[0]
    assert not (out / "adapter_model.safetensors").exists()
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 1
    model = mesp.load_model(tiny)
    mesp.load_adapter(model, out / "checkpoint-000001")
    assert all(torch.isfinite(p).all() for p in model.lora_parameters().values())


# ---- the run directory ------------------------------------------------------------------------------------

def test_out_directory_rules(tiny, data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", tiny, "--data", data["train"], "--out", str(out), "--seq-len", "32", "--steps", "2",
            "--save-every", "1"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                    "checkpoint-000002", "checkpoint.json", "memory.json",
                                                    "metrics.jsonl", "train_config.json"]
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(argv) == 2
    assert "holds another run" in capsys.readouterr().err
    assert main(argv + ["--resume", "--lr", "0.5"]) == 2
    assert "resume: lr is 0.5 but the run" in capsys.readouterr().err
    # --resume alone continues with the saved settings; more steps extend the run
    assert main(["train", "--out", str(out), "--resume", "--steps", "3"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert main(argv + ["--overwrite", "--steps", "1"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert (out / "notes.txt").read_text() == "mine"  # overwrite removes only what a run wrote
    capsys.readouterr()
    assert main(["train", "--model", tiny, "--data", data["train"], "--out", str(tmp_path / "empty"), "--resume",
                 "--seq-len", "32"]) == 2
    assert "holds no checkpoint to resume from" in capsys.readouterr().err


def test_library_errors_match_cli(tiny, data, tmp_path):
    with pytest.raises(MespError, match="per_layer_update: needs method mesp"):
        train(config(tiny, data, tmp_path / "x", method="mebp", per_layer_update=True))
    with pytest.raises(MespError, match="MeZO trains with its own"):
        train(config(tiny, data, tmp_path / "x", method="mezo", optimizer="adamw"))
    assert not (tmp_path / "x").exists()


# ---- bad input through the CLI ----------------------------------------------------------------------------

BAD_DATA = {
    "malformed": ('{"input_ids": [1, 2, 3]}\n{"input_ids": [1, 2\n', r"bad\.jsonl:2: invalid JSON"),
    "missing_field": ('{"prompt": "only a prompt"}\n', r"bad\.jsonl:1: missing field 'completion'"),
    "unknown_format": ('{"question": "q"}\n', r"bad\.jsonl:1: unknown format"),
    "empty": ("", r"bad\.jsonl: no samples"),
    "untrainable": ('{"input_ids": [1, 2, 3], "labels": [1, -100, -100]}\n', r"bad\.jsonl:1: no token to train on"),
    "needs_tokenizer": ('{"text": "hello"}\n', r"bad\.jsonl:1: the 'text' format needs a tokenizer"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_exits_2_with_one_line(tiny, tmp_path, capsys, case):
    content, match = BAD_DATA[case]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    out = tmp_path / "out"
    assert main(["train", "--model", tiny, "--data", str(bad), "--out", str(out), "--seq-len", "32"]) == 2
    assert_one_line_error(capsys, match)
    assert not out.exists()


@pytest.mark.parametrize("flags,match", [
    (["--targets", "q_proj,qq_proj"], "targets: unknown qq_proj"),
    (["--seq-len", "4096"], "seq_len 4096 exceeds the model's max_position_embeddings 128"),
    (["--steps", "0"], "steps: must be a positive integer"),
    (["--steps", "2", "--epochs", "1"], "not both"),
    (["--method", "mezo", "--grad-accum", "2"], "grad_accum: not available with method mezo"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--rank", "100000"], "rank: LoRA rank 100000 exceeds the dimensions of model.layers.0"),
])
def test_bad_flags_exit_2_with_one_line(tiny, data, tmp_path, capsys, flags, match):
    out = tmp_path / "out"
    argv = ["train", "--model", tiny, "--data", data["train"], "--out", str(out), "--seq-len", "32"]
    assert main(argv + flags) == 2
    assert_one_line_error(capsys, match)
    assert not out.exists()


def assert_one_line_error(capsys, match):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mesp train: error: "), err
    assert re.search(match, lines[0]), lines[0]
    assert "Traceback" not in err


# ---- config file and dry run ------------------------------------------------------------------------------

def test_config_file_overrides_and_dry_run(tiny, data, tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'model = "{tiny}"\ndata = "{data["train"]}"\nout = "{tmp_path / "o"}"\n'
                   f'batch-size = 2\nseq_len = 48\nlr = 0.001\ntargets = ["q_proj", "v_proj"]\nmethod = "mebp"\n')
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--lr", "0.01", "--steps", "7", "--dry-run"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["batch_size"] == 2 and shown["seq_len"] == 48 and shown["method"] == "mebp"
    assert shown["lr"] == 0.01 and shown["steps"] == 7 and shown["epochs"] is None  # flags win
    assert shown["targets"] == ["q_proj", "v_proj"] and shown["optimizer"] == "adamw"
    assert shown["per_layer_update"] is False  # only mesp updates per layer
    assert not (tmp_path / "o").exists()
    # defaults, resolved
    assert main(["train", "--model", tiny, "--data", data["train"], "--out", "x", "--dry-run"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["method"], shown["optimizer"], shown["lr"], shown["epochs"], shown["per_layer_update"]) == \
        ("mesp", "adamw", 1e-3, 3, True)

    for text, match in (('rank = "8"\n', r"rank = '8' has the wrong type"), ("bogus = 1\n", "unknown setting 'bogus'"),
                        ("lr = \n", "invalid TOML")):
        cfg.write_text(text)
        assert main(["train", "--config", str(cfg), "--model", tiny, "--data", data["train"], "--out", "x"]) == 2
        assert_one_line_error(capsys, match)


def test_help_lists_every_setting_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert re.search(rf"^  --{f.name.replace('_', '-')}\b", text, re.M), f.name
    assert "--no-per-layer-update" in text and "LoRA rank (default 8)" in text and "{none,int8,int4,gguf}" in text


def test_from_toml_reads_the_file_and_overrides_win(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('model = "m"\nbatch-size = 2\nlr = 1\ntargets = ["q_proj"]\n')
    c = TrainConfig.from_toml(cfg, lr=0.5)
    assert (c.model, c.batch_size, c.lr, c.targets, c.rank) == ("m", 2, 0.5, ["q_proj"], 8)


@pytest.mark.parametrize("settings,match", [
    (dict(rank=0), r"^rank: must be a positive integer"),
    (dict(rank=2.0), r"^rank: must be a positive integer"),
    (dict(alpha=-1.0), r"^alpha: must be a positive number"),
    (dict(targets="q_proj,lm_head"), r"^targets: unknown lm_head"),
    (dict(optimizer="sgd", momentum=1.5), r"^momentum: must be in \[0, 1\)"),
    (dict(optimizer="adamw", momentum=0.9), r"^momentum: applies to optimizer sgd only"),
    (dict(weight_decay=-0.1), r"^weight_decay: must be >= 0"),
    (dict(method="mezo", weight_decay=-0.1), r"^weight_decay: must be >= 0"),
    (dict(optimizer="lion"), r"^optimizer: unknown 'lion'"),
    (dict(schedule="linear"), r"^schedule: unknown 'linear'"),
    (dict(method="sgd"), r"^method: unknown 'sgd'"),
    (dict(dtype="int8"), r"^dtype: unknown 'int8'"),
    (dict(lr=0.0), r"^lr: must be a positive number"),
    (dict(warmup=-1), r"^warmup: must be a non-negative integer"),
])
def test_resolve_names_the_setting(tmp_path, settings, match):
    """resolve checks by building the LoRA config, the optimizer and the schedule; errors name the setting."""
    with pytest.raises(MespError, match=match):
        resolve(TrainConfig(model="m", data="d.jsonl", out=str(tmp_path / "o"), **settings))
