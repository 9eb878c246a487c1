"""End-to-end trajectory (llm.c's test_gpt2.c, torchtune's recipe tests): `mesp.train` for a few steps against
the same run written independently in transformers + PEFT + torch.optim.AdamW + LambdaLR.

Same tiny random Qwen2, same initial adapter (ours, copied into PEFT), same micro-batches in the same order
(the seeded epoch order, collated here), the loss of a step summed over its micro-batches and divided by the
step's total label count, the same warmup + cosine learning rate. In fp32 the losses agree step by step and the
final adapters tensor by tensor.

AdamW's first update of an element is lr * g / (|g| + eps): where a gradient element lands near eps (1e-8),
the fp32 rounding of g (MeSP sums in another order than autograd, so the last bits differ) becomes a visible
difference in that element, which says nothing about the engine. The test therefore requires the first step's
gradient elements to be zero or well above eps (checked: a changed setup that breaks it fails with that
message, not with a mysterious adapter difference).
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import mesp
from mesp.data import epoch_order
from mesp.lora import adapter_state
from mesp.train import TrainConfig, train

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

VOCAB = 96  # conftest's tiny models
STEPS, GRAD_ACCUM, BATCH_SIZE, N_SAMPLES = 5, 2, 3, 10  # 10 micro-batches: the run crosses two epoch boundaries
LR, WARMUP, SEED = 2e-2, 1, 0
RANK, ALPHA, TARGETS = 4, 8.0, ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
TOL = 1e-5
ADAMW_EPS = 1e-8  # torch.optim.AdamW's and mesp.optim.AdamW's default


def write_samples(path) -> list[list[int]]:
    """Pre-tokenized samples of varied lengths (every token is labelled)."""
    r = random.Random(0)
    samples = [[r.randrange(VOCAB) for _ in range(r.randint(5, 16))] for _ in range(N_SAMPLES)]
    path.write_text("".join(json.dumps({"input_ids": ids}) + "\n" for ids in samples))
    return samples


def micro_batch(samples, m: int):
    """Micro-batch m of the run: slice m of its epoch's seeded order, right-padded (mask 0, label -100)."""
    per_epoch = math.ceil(len(samples) / BATCH_SIZE)
    epoch, j = divmod(m, per_epoch)
    rows = [samples[i] for i in epoch_order(len(samples), SEED, epoch)[j * BATCH_SIZE:(j + 1) * BATCH_SIZE]]
    T = max(map(len, rows))
    ids = torch.tensor([s + [0] * (T - len(s)) for s in rows])
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in rows])
    return ids, mask, ids.masked_fill(mask == 0, -100)


def warmup_cosine(step: int) -> float:
    """The lr factor of update `step` (0-based): linear warmup reaching 1 at update WARMUP-1, then cosine to 0."""
    if step < WARMUP:
        return (step + 1) / WARMUP
    return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))


def reference_run(path, samples, init: dict[str, torch.Tensor]):
    """The run in transformers + PEFT + torch.optim: per-step losses, the final PEFT-keyed adapter, and the
    smallest non-zero gradient element of the first step."""
    import peft
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                                                     lora_dropout=0.0))
    result = peft.set_peft_model_state_dict(model, init)
    assert not result.unexpected_keys
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == len(init)
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, foreach=False)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)
    losses = []
    for step in range(STEPS):
        batches = [micro_batch(samples, step * GRAD_ACCUM + k) for k in range(GRAD_ACCUM)]
        n_labels = sum(int((labels[:, 1:] != -100).sum()) for _, _, labels in batches)
        step_loss = 0.0
        for ids, mask, labels in batches:
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                   ignore_index=-100, reduction="sum") / n_labels
            loss.backward()
            step_loss += float(loss.detach())
        if step == 0:
            grads = torch.cat([p.grad.flatten() for p in params])
            smallest_first_grad = float(grads[grads != 0].abs().min())
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        losses.append(step_loss)
    return losses, {k: v.detach() for k, v in peft.get_peft_model_state_dict(model).items()}, smallest_first_grad


@pytest.fixture(scope="module")
def setup(make_hf_model, tmp_path_factory):
    path, _ = make_hf_model("qwen2", num_key_value_heads=2)
    d = tmp_path_factory.mktemp("trajectory")
    samples = write_samples(d / "train.jsonl")
    # our initial adapter (A from the seed, B = 0), given to PEFT as its starting point
    init = adapter_state(mesp.add_lora(mesp.load_model(path), mesp.LoraConfig(r=RANK, alpha=ALPHA,
                                                                                  target_modules=TARGETS), seed=SEED))
    reference = reference_run(path, samples, {k: v.detach().clone() for k, v in init.items()})
    return path, d, reference


@pytest.mark.parametrize("method", ["mesp", "mebp", "autograd"])
def test_trajectory_matches_transformers_peft_adamw(setup, method):
    path, d, (ref_losses, ref_adapter, smallest_first_grad) = setup
    assert smallest_first_grad > 100 * ADAMW_EPS, "a first-step gradient element is near AdamW's eps: see the " \
        "module docstring (change SEED)"
    out = d / method
    train(TrainConfig(model=str(path), data=str(d / "train.jsonl"), out=str(out), method=method, rank=RANK,
                      alpha=ALPHA, targets=TARGETS, steps=STEPS, batch_size=BATCH_SIZE, grad_accum=GRAD_ACCUM,
                      seq_len=32, lr=LR, optimizer="adamw", schedule="cosine", warmup=WARMUP, seed=SEED))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([LR * warmup_cosine(s) for s in range(STEPS)], rel=1e-12)
    losses = [r["loss"] for r in rows]
    for step, (ours, theirs) in enumerate(zip(losses, ref_losses, strict=True), 1):
        assert abs(ours - theirs) <= TOL * abs(theirs), f"step {step}: loss {ours!r} vs reference {theirs!r}"
    assert len(set(losses)) == STEPS  # the losses move: the run trains

    ours = load_file(str(out / "adapter_model.safetensors"))
    assert ours.keys() == ref_adapter.keys()
    for key, theirs in ref_adapter.items():
        err = float((ours[key] - theirs).norm() / theirs.norm())
        assert err <= TOL, f"{key}: relative error {err:.2e}"
