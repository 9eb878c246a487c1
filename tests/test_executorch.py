"""The MeSP step as an ExecuTorch program (mesp.export_executorch), in eager PyTorch: the step module against
autograd (masked labels included) and against the engine's own SGD and AdamW trajectories. The exported program
run by the native runner is tests/test_executorch_runner.py."""

from __future__ import annotations

import pytest
import torch

import mesp
from mesp.data import IGNORE
from mesp.errors import MespError
from mesp.export_executorch import TrainingStep
from mesp.lora import peft_key
from mesp.optim import make_optimizer
from tests.helpers import randomize_lora_b, relative_error

B, T = 2, 24
LR = {"sgd": 0.05, "adamw": 1e-2}


def tiny_step_model(make_hf_model):
    model = mesp.load_model(make_hf_model("qwen2")[0])
    mesp.add_lora(model, mesp.LoraConfig(r=4, alpha=8.0), seed=0)
    randomize_lora_b(model, seed=1)
    return model


def tokens(seed: int, rows: int = B, vocab: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels with masked spans (a prompt-like prefix, one row's tail: padding), as the runner gets."""
    ids = torch.randint(0, vocab, (rows, T), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :5] = IGNORE
    labels[rows - 1, T - 7:] = IGNORE
    return ids, labels


def engine_trajectory(model, batches, optimizer: str, lr: float) -> tuple[list[float], dict]:
    """The reference: eager mesp's gradients (compute_gradients) and mesp.optim's update, step by step."""
    params = {peft_key(k): p for k, p in model.lora_parameters().items()}
    opt = make_optimizer(optimizer)
    losses = []
    for ids, labels in batches:
        loss, grads = mesp.compute_gradients(model, ids, labels, method="mesp")
        with torch.no_grad():
            opt.step(params, grads, lr)
        losses.append(float(loss))
    return losses, {k: p.detach().clone() for k, p in params.items()}


def test_step_gradients_equal_autograd_with_masked_labels(make_hf_model):
    model = tiny_step_model(make_hf_model)
    lr = 1e3  # p - lr g in fp32 then carries g to ~1e-7: the update's rounding is relative to lr |g|
    step = TrainingStep(model, B, T, lr)
    ids, labels = tokens(0)
    state = step.initial_state()
    loss, *updated = step(ids, labels, *state)
    ref_loss, ref_grads = mesp.compute_gradients(model, ids, labels, method="autograd")
    assert relative_error(loss, ref_loss) < 1e-6
    for name, before, after in zip(step.lora_names, state, updated):
        assert relative_error((before - after) / lr, ref_grads[name]) < 1e-5, name
    for path, t in zip(step.lora_paths, state):  # the model's own parameters are untouched by the step
        assert torch.equal(model.lora_parameters()[path].detach(), t)


def test_step_masked_rows_count_for_nothing(make_hf_model):
    """Changing a masked position's label (not its token) changes nothing: the mask, not the row, decides."""
    model = tiny_step_model(make_hf_model)
    step = TrainingStep(model, B, T, LR["sgd"])
    ids, labels = tokens(0)
    other = labels.clone()
    other[:, :5] = ids[:, :5]  # unmasked: now they count
    a = step(ids, labels, *step.initial_state())
    b = step(ids, other, *step.initial_state())
    assert relative_error(a[0], b[0]) > 1e-3  # the masked spans do carry weight when unmasked


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_step_trajectory_equals_engine(make_hf_model, optimizer):
    model = tiny_step_model(make_hf_model)
    step = TrainingStep(model, B, T, LR[optimizer], optimizer)
    batches = [tokens(s) for s in range(5)]
    state = step.initial_state()
    assert len(state) == len(step.state_names)
    losses = []
    for ids, labels in batches:
        loss, *state = step(ids, labels, *state)
        losses.append(float(loss))
    ref_losses, ref_params = engine_trajectory(model, batches, optimizer, LR[optimizer])
    assert len(set(losses)) == 5
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 1e-5 * abs(b)
    for name, t in zip(step.lora_names, state):
        assert relative_error(t, ref_params[name]) < 1e-5, name
    if optimizer == "adamw":
        assert float(state[-1]) == 5.0  # the step count travels in the state


def test_step_rejects_what_it_cannot_export(make_hf_model):
    model = tiny_step_model(make_hf_model)
    with pytest.raises(MespError, match="optimizer lion"):
        TrainingStep(model, B, T, 0.1, "lion")
    with pytest.raises(MespError, match="seq_len: 1"):
        TrainingStep(model, B, 1, 0.1)
