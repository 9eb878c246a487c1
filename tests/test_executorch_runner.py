"""The MeSP step exported by `mesp export --format executorch` (run from the ExecuTorch environment .et/) and run
by the native runner build/runner/mesp-runner (scripts/dev.sh runner makes both), on a tiny random Qwen2:
its loss trajectories (SGD and AdamW, masked labels) equal eager mesp's, its gradients equal autograd's, the
adapter it writes loads in mesp and in PEFT, and bad files get one line and a non-zero exit, not a crash.

Skipped, with the reason, where .et/ (with ExecuTorch) or the built runner is missing."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mesp
from mesp.export_executorch import PROGRAM_FILE, TOKENS_FILE, WEIGHTS_FILE
from tests.helpers import relative_error
from tests.test_executorch import LR, T, engine_trajectory, tiny_step_model, tokens

ROOT = Path(__file__).resolve().parent.parent
ET_MESP = ROOT / ".et" / "bin" / "mesp"
RUNNER = ROOT / "build" / "runner" / "mesp-runner"
GRAD_LR = 1e3  # one step's update then carries the gradient to ~1e-7 (see test_executorch)
STEPS = 5


def missing() -> str | None:
    if not ET_MESP.exists():
        return f"{ET_MESP} missing: scripts/dev.sh runner makes the ExecuTorch environment"
    if not RUNNER.exists():
        return f"{RUNNER} missing: scripts/dev.sh runner builds it (needs a C++ compiler)"
    return None


pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")


def rows(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n rows of token ids and labels: batch s of the trajectory is rows 2s, 2s+1 (the runner's order)."""
    batches = [tokens(s) for s in range(n // 2)]
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


@pytest.fixture(scope="module")
def exported(make_hf_model, tmp_path_factory):
    """{name: program dir} for the sgd, adamw and gradient (sgd at GRAD_LR) steps, each exported by the CLI of
    .et/ from the same adapter (random lora_B) and data, the data as tokens.bin beside it (--data)."""
    root = tmp_path_factory.mktemp("et")
    model = tiny_step_model(make_hf_model)
    mesp.save_adapter(model, root / "adapter")
    ids, labels = rows(2 * STEPS)
    with open(root / "data.jsonl", "w") as f:
        for i, l in zip(ids.tolist(), labels.tolist()):
            f.write(json.dumps({"input_ids": i, "labels": l}) + "\n")
    programs = {"sgd": ("sgd", LR["sgd"], "none"), "adamw": ("adamw", LR["adamw"], "none"),
                "grad": ("sgd", GRAD_LR, "none"), "int8": ("sgd", LR["sgd"], "int8")}
    for name, (optimizer, lr, quantize) in programs.items():
        r = subprocess.run([str(ET_MESP), "export", "--format", "executorch", "--model", str(make_hf_model("qwen2")[0]),
                            "--adapter", str(root / "adapter"), "--seq-len", str(T), "--batch-size", "2",
                            "--optimizer", optimizer, "--lr", str(lr), "--quantize", quantize,
                            "--data", str(root / "data.jsonl"),
                            "--out", str(root / name)], capture_output=True, text=True, timeout=900,
                           env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert r.returncode == 0, r.stderr[-3000:]
    return root


def run_runner(program: Path, out: Path, steps: int = STEPS, pte=None, ptd=None, data=None):
    return subprocess.run([str(RUNNER), str(pte or program / PROGRAM_FILE), str(ptd or program / WEIGHTS_FILE),
                           "--data", str(data or program / TOKENS_FILE), "--steps", str(steps), "--out",
                           str(out / "adapter_model.safetensors")], capture_output=True, text=True, timeout=300)


def runner_losses(stdout: str) -> list[float]:
    return [float(line.split()[3]) for line in stdout.splitlines() if line.startswith("step ")]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_runner_trajectory_equals_mesp(exported, make_hf_model, tmp_path, optimizer):
    r = run_runner(exported / optimizer, tmp_path / "run" / "nested")  # --out's directory is made
    assert r.returncode == 0, r.stderr
    losses = runner_losses(r.stdout)
    model = tiny_step_model(make_hf_model)
    ids, labels = rows(2 * STEPS)
    batches = [(ids[2 * s:2 * s + 2], labels[2 * s:2 * s + 2]) for s in range(STEPS)]
    ref_losses, ref_params = engine_trajectory(model, batches, optimizer, LR[optimizer])
    assert len(losses) == STEPS and len(set(losses)) == STEPS
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 1e-5 * abs(b), (losses, ref_losses)
    written = load_file(str(tmp_path / "run" / "nested" / "adapter_model.safetensors"))
    assert set(written) == set(ref_params)
    # AdamW divides each update by its gradient's size, so an element whose gradient is near zero carries the
    # products' rounding into the weights: eager mesp and autograd, both exact, end 5 steps 7.8e-6 apart on
    # layer 0's down_proj lora_A (the runner: 1.26e-5); SGD's update is the gradient's, held to 1e-5
    tolerance = 3e-5 if optimizer == "adamw" else 1e-5
    for name, t in ref_params.items():
        assert relative_error(written[name], t) < tolerance, name
    # the three memory figures and the step time come before the write
    assert "private footprint peak" in r.stdout and "RssFile peak" in r.stdout and "VmHWM" in r.stdout
    assert r.stdout.index("mean step time") < r.stdout.index("wrote ")


def test_runner_int8_trajectory_equals_mesp_on_the_int8_base(exported, make_hf_model, tmp_path):
    """--quantize int8: base.ptd holds int8 codes and scales (0.40 of the fp32 file on this tiny model) and the runner's
    5 SGD steps equal eager mesp's on load_model(quantize="int8"), the same codes."""
    assert (exported / "int8" / WEIGHTS_FILE).stat().st_size < 0.5 * (exported / "sgd" / WEIGHTS_FILE).stat().st_size
    r = run_runner(exported / "int8", tmp_path)
    assert r.returncode == 0, r.stderr
    losses = runner_losses(r.stdout)
    model = mesp.load_model(make_hf_model("qwen2")[0], quantize="int8")
    mesp.load_adapter(model, exported / "adapter")
    ids, labels = rows(2 * STEPS)
    batches = [(ids[2 * s:2 * s + 2], labels[2 * s:2 * s + 2]) for s in range(STEPS)]
    ref_losses, ref_params = engine_trajectory(model, batches, "sgd", LR["sgd"])
    dense_losses = runner_losses(run_runner(exported / "sgd", tmp_path / "dense").stdout)
    assert len(losses) == STEPS and losses != dense_losses  # the int8 base is not the fp32 one
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 1e-5 * abs(b), (losses, ref_losses)
    written = load_file(str(tmp_path / "adapter_model.safetensors"))
    for name, t in ref_params.items():
        assert relative_error(written[name], t) < 1e-5, name


def test_runner_gradients_equal_autograd(exported, make_hf_model, tmp_path):
    r = run_runner(exported / "grad", tmp_path, steps=1)
    assert r.returncode == 0, r.stderr
    model = tiny_step_model(make_hf_model)
    ids, labels = rows(2)
    ref_loss, ref_grads = mesp.compute_gradients(model, ids, labels, method="autograd")
    assert abs(runner_losses(r.stdout)[0] - float(ref_loss)) <= 1e-5 * float(ref_loss)
    before = {mesp.lora.peft_key(k): p.detach() for k, p in model.lora_parameters().items()}
    after = load_file(str(tmp_path / "adapter_model.safetensors"))
    for name, g in ref_grads.items():
        assert relative_error((before[name] - after[name]) / GRAD_LR, g) < 1e-5, name


def test_runner_adapter_loads_in_mesp_and_peft(exported, make_hf_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    r = run_runner(exported / "sgd", tmp_path, steps=2)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    path = make_hf_model("qwen2")[0]
    model = mesp.load_adapter(mesp.load_model(path), tmp_path)
    written = load_file(str(tmp_path / "adapter_model.safetensors"))
    ours = {mesp.lora.peft_key(k): p.detach() for k, p in model.lora_parameters().items()}
    assert set(ours) == set(written) and all(torch.equal(ours[k], written[k]) for k in ours)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), str(tmp_path)).eval()
    ids = tokens(7)[0]
    with torch.no_grad():
        theirs = peft(input_ids=ids).logits
    assert (mesp.forward(model, ids) - theirs).abs().max() < 1e-4


def one_line_failure(r, names: str):
    assert r.returncode == 1, (r.returncode, r.stderr)  # not a signal (negative) nor an abort
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mesp-runner: ") and names in lines[0], r.stderr
    assert "step " not in r.stdout


@pytest.mark.parametrize("which", [PROGRAM_FILE, WEIGHTS_FILE, TOKENS_FILE])
def test_truncated_file_gives_one_line(exported, tmp_path, which):
    source = exported / "sgd" / which
    cut = tmp_path / which
    cut.write_bytes(source.read_bytes()[: source.stat().st_size * 2 // 3])
    files = {"pte": cut} if which == PROGRAM_FILE else {"ptd": cut} if which == WEIGHTS_FILE else {"data": cut}
    one_line_failure(run_runner(exported / "sgd", tmp_path / "out", **files), str(cut))


def test_wrong_weights_file_and_bad_out_give_one_line(exported, tmp_path):
    # a file that is no ExecuTorch data file at all (the program) in the weights' place
    one_line_failure(run_runner(exported / "sgd", tmp_path, ptd=exported / "sgd" / PROGRAM_FILE),
                     str(exported / "sgd" / PROGRAM_FILE))
    blocker = tmp_path / "file"
    blocker.write_text("")
    one_line_failure(run_runner(exported / "sgd", blocker / "sub"), str(blocker / "sub"))
