"""Gradient methods over the same model, data and loss: autograd (the reference), MeBP, MeSP and MeZO."""

from __future__ import annotations

import torch

from ..errors import MespError
from . import autograd, mebp, mesp, mezo
from .common import prepare_batch, require_lora

METHODS = {"autograd": autograd.gradients, "mebp": mebp.gradients, "mesp": mesp.gradients, "mezo": mezo.gradients}
CHECKPOINTING_METHODS = ("mesp", "mebp")  # the methods whose layer inputs can be offloaded


def compute_gradients(model, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask=None,
                      method: str = "mesp", normalizer: float | None = None, offload_checkpoints=None, **options):
    """Loss and LoRA gradients of `model` on one batch.

    labels follow transformers: same shape as input_ids, shifted inside, -100 ignored; the loss is the mean
    over counted tokens (or the sum divided by `normalizer`, for gradient accumulation). Returns
    (loss: scalar tensor, grads: dict keyed exactly like PEFT's adapter_model.safetensors).
    Options by method: mesp: loss_chunk, attn_block, token_chunk, keep_layers, on_layer_grads, store_h (ablation)
    (see mesp.methods.mesp.gradients); mezo: eps, n_directions, seed; all but autograd/mebp: loss_chunk.
    offload_checkpoints: a directory (mesp and mebp): the layer inputs kept between the forward and the backward
    live in a memory-mapped scratch file there instead of RAM (mesp.scratch), with the same gradients bit for
    bit. autograd keeps its whole graph and MeZO keeps no checkpoints, so for them it is an error.
    """
    if method not in METHODS:
        raise MespError(f"method: unknown {method!r}; choose from {', '.join(METHODS)}")
    require_lora(model)
    dropout = getattr(getattr(model, "lora_config", None), "dropout", 0.0)
    if dropout:  # recomputation-based methods would need every dropout mask replayed exactly
        raise MespError(f"lora dropout {dropout}: training with LoRA dropout is not supported; use 0")
    if offload_checkpoints is not None:
        if method not in CHECKPOINTING_METHODS:
            raise MespError(f"offload_checkpoints: method {method} keeps no per-layer checkpoints; use "
                            f"{' or '.join(CHECKPOINTING_METHODS)}")
        options["offload_checkpoints"] = offload_checkpoints
    batch = prepare_batch(model, input_ids, labels, attention_mask, normalizer)
    return METHODS[method](model, batch, **options)
