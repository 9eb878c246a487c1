"""MeBP (Apple, arXiv 2510.03425): per-layer gradient checkpointing.

Forward keeps only each decoder layer's input; the loss runs through full-vocabulary logits under autograd;
backward re-runs one layer at a time under autograd and pushes the gradient of its input down.
"""

from __future__ import annotations

import torch

from ..memory import stage
from ..model import LayerRun, SdpaMasks
from ..scratch import LayerCheckpoints
from .common import LossBatch, collect_grads, full_logits_loss


def gradients(model, batch: LossBatch, offload_checkpoints=None):
    """Loss and PEFT-keyed LoRA gradients. offload_checkpoints: a directory for the scratch file that then holds
    the layer inputs (mesp.scratch)."""
    layers = model.model.layers
    T = batch.input_ids.shape[1]
    rope = model.rope(torch.arange(T, device=model.device))
    masks = SdpaMasks(batch.attention_mask, T, 0, model.device)
    for p in model.lora_parameters().values():
        p.requires_grad_(True)
        p.grad = None

    with torch.no_grad(), stage("forward"):
        x = model.embed(batch.input_ids)
    with LayerCheckpoints(x, len(layers), offload_checkpoints) as checkpoints:  # one [B, T, d] per layer
        with torch.no_grad(), stage("forward"):
            for i, layer in enumerate(layers):
                checkpoints.put(i, x)
                x = layer(x, LayerRun(rope[i], masks))

        with torch.enable_grad(), stage("loss"):
            x = x.requires_grad_(True)
            loss = full_logits_loss(model.model.norm(x), model, batch)
            loss.backward()
        g = x.grad
        del x

        for i in reversed(range(len(layers))):
            # detach: a fresh leaf over the checkpoint's storage, whose .grad is this layer's input gradient
            x = checkpoints.pop(i).detach().requires_grad_(i > 0)
            with torch.enable_grad(), stage("backward"):
                y = layers[i](x, LayerRun(rope[i], masks))
                y.backward(g)
            g = x.grad
            del x, y
    return loss.detach(), collect_grads(model)
