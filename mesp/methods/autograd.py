"""Plain PyTorch autograd through the whole model: the reference every other method is checked against."""

from __future__ import annotations

import torch

from ..memory import stage
from .common import LossBatch, collect_grads, full_logits_loss


def gradients(model, batch: LossBatch):
    for p in model.lora_parameters().values():
        p.requires_grad_(True)
        p.grad = None
    with torch.enable_grad():
        with stage("forward"):
            hidden, _ = model(batch.input_ids, batch.attention_mask, return_hidden=True)
        with stage("loss"):
            loss = full_logits_loss(hidden, model, batch)
        with stage("backward"):
            loss.backward()
    return loss.detach(), collect_grads(model)
