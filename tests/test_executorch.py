"""The MeSP step as an ExecuTorch program (mesp.export_executorch): the eager step module against autograd and
the engine's own SGD trajectory; torch.export of it; and, where the ExecuTorch environment (.et/, made by
scripts/dev.sh runner) and the built runner exist, the .pte run by ExecuTorch and by the native runner."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mesp
from mesp.export_executorch import TrainingStep
from mesp.lora import peft_key
from mesp.optim import make_optimizer
from tests.helpers import randomize_lora_b, relative_error

ROOT = Path(__file__).resolve().parent.parent
ET_PYTHON = ROOT / ".et" / "bin" / "python"
RUNNER = ROOT / "build" / "runner" / "mesp-runner"
B, T, LR = 2, 24, 0.05


def tiny_step_model(make_hf_model):
    model = mesp.load_model(make_hf_model("qwen2")[0])
    mesp.add_lora(model, mesp.LoraConfig(r=4, alpha=8.0), seed=0)
    randomize_lora_b(model, seed=1)
    return model


def tokens(seed: int, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_step_gradients_equal_autograd(make_hf_model):
    model = tiny_step_model(make_hf_model)
    step = TrainingStep(model, B, T, LR)
    ids = tokens(0)
    lora = step.initial_lora()
    loss, *updated = step(ids, *lora)
    ref_loss, ref_grads = mesp.compute_gradients(model, ids, ids.clone(), method="autograd")
    assert relative_error(loss, ref_loss) < 1e-6
    for name, before, after in zip(step.lora_names, lora, updated):
        grad = (before - after) / LR  # the SGD update carries the gradient
        assert relative_error(grad, ref_grads[name]) < 1e-4, name  # rel 1e-5 of g, less the subtraction's rounding
    # the model's own parameters are untouched by the step
    for path, t in zip(step.lora_paths, lora):
        assert torch.equal(model.lora_parameters()[path].detach(), t)


def sgd_trajectory(model, batches, lr: float) -> tuple[list[float], dict]:
    """The engine's SGD steps in eager mesp (compute_gradients, then optimizer.step), the reference trajectory."""
    params = {peft_key(k): p for k, p in model.lora_parameters().items()}
    optimizer = make_optimizer("sgd")
    losses = []
    for ids in batches:
        loss, grads = mesp.compute_gradients(model, ids, ids.clone(), method="mesp")
        with torch.no_grad():
            optimizer.step(params, grads, lr)
        losses.append(float(loss))
    return losses, {k: p.detach().clone() for k, p in params.items()}


def test_step_trajectory_equals_engine(make_hf_model):
    model = tiny_step_model(make_hf_model)
    step = TrainingStep(model, B, T, LR)
    batches = [tokens(s) for s in range(5)]
    lora = step.initial_lora()
    losses = []
    for ids in batches:
        loss, *lora = step(ids, *lora)
        losses.append(float(loss))
    ref_losses, ref_params = sgd_trajectory(model, batches, LR)
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 1e-5 * abs(b)
    for name, t in zip(step.lora_names, lora):
        assert relative_error(t, ref_params[name]) < 1e-6, name
