"""What every method shares: the loss batch (shifted targets, counted tokens), the loss, and the gradient dict."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import blockwise, ops
from ..data import IGNORE
from ..errors import MespError
from ..lora import peft_key
from ..model import Model


@dataclass
class LossBatch:
    """A batch as the loss sees it: the labels shifted into per-position targets, and the loss's divisor.
    (mesp.data.Batch is the collated token batch it is made from.)"""
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor | None  # [B, T] (1 = real token), None when nothing is padded
    targets: torch.Tensor  # [B, T]: targets[:, t] = labels[:, t+1]; last column IGNORE
    normalizer: float  # how many targets count (loss = sum over them / normalizer)
    counted_rows: torch.Tensor | None = None  # flat [B*T] indices of the counted targets, when known beforehand

    @property
    def key_mask(self) -> torch.Tensor | None:
        return None if self.attention_mask is None else self.attention_mask.bool()


def prepare_batch(model: Model, input_ids, labels, attention_mask=None, normalizer=None) -> LossBatch:
    """Check shapes and shift labels as transformers does (the model predicts labels[t+1] at position t).

    `normalizer` overrides the count of labelled tokens, so micro-batches of one accumulated step share the
    divisor of the whole step."""
    if input_ids.dim() != 2:
        raise MespError(f"input_ids: expected [batch, seq], got shape {tuple(input_ids.shape)}")
    if labels.shape != input_ids.shape:
        raise MespError(f"labels: shape {tuple(labels.shape)} differs from input_ids {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise MespError(f"attention_mask: shape {tuple(attention_mask.shape)} differs from input_ids "
                        f"{tuple(input_ids.shape)}")
    if input_ids.shape[1] > model.config.max_position_embeddings:
        raise MespError(f"input_ids: {input_ids.shape[1]} tokens exceed the model's "
                        f"max_position_embeddings {model.config.max_position_embeddings}")
    device = model.device
    input_ids, labels = input_ids.to(device), labels.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
        if bool(attention_mask.all()):
            attention_mask = None
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    count = int((targets != IGNORE).sum())
    if count == 0:
        raise MespError("labels: no token is labelled (every label is -100 after the shift)")
    return LossBatch(input_ids, attention_mask, targets, float(normalizer or count))


def full_logits_loss(hidden: torch.Tensor, model: Model, batch: LossBatch) -> torch.Tensor:
    """Differentiable loss through full-vocabulary logits [B, T, V] (the autograd and MeBP way)."""
    logits = ops.frozen_linear(hidden, model.lm_head_weight)
    logits = logits.to(ops.acc_dtype(logits.dtype))  # bf16 -> fp32; fp64 stays fp64
    logits = blockwise.softcap_logits(logits, model.config.final_logit_softcapping)
    loss_sum = F.cross_entropy(logits.view(-1, logits.shape[-1]), batch.targets.view(-1),
                               ignore_index=IGNORE, reduction="sum")
    return loss_sum / batch.normalizer


def chunked_loss(hidden: torch.Tensor, model: Model, batch: LossBatch, loss_chunk: int | None = None,
                 compute_grad: bool = True, loss_chunk_bytes: int = 8 << 20):
    """Loss (and its gradient w.r.t. `hidden`, the final-normed states) with the LM head run only on labelled
    tokens, `loss_chunk` tokens at a time against vocabulary slices whose fp32 logits stay within
    `loss_chunk_bytes`: full-vocabulary logits never exist. Returns (loss fp32 scalar, g_hidden or None)."""
    B, T, d = hidden.shape
    loss_sum, g = blockwise.lm_head_cross_entropy(hidden.reshape(B * T, d), model.lm_head_weight,
                                            batch.targets.reshape(-1), batch.normalizer, loss_chunk or 1024,
                                            compute_grad, loss_chunk_bytes, model.config.final_logit_softcapping,
                                            batch.counted_rows)
    return loss_sum / batch.normalizer, None if g is None else g.view(B, T, d)


@torch.no_grad()
def forward_loss(model: Model, batch: LossBatch, loss_chunk: int | None = None) -> float:
    """The loss without gradients, at inference memory: one forward pass, then the chunked LM head (no
    full-vocabulary logits). For evaluation and for MeZO's perturbed losses."""
    hidden, _ = model(batch.input_ids, batch.attention_mask, return_hidden=True)
    return float(chunked_loss(hidden, model, batch, loss_chunk, compute_grad=False)[0])


def collect_grads(model: Model) -> dict[str, torch.Tensor]:
    """PEFT-keyed .grad of every LoRA parameter (zeros where none flowed), detached; clears .grad."""
    out = {}
    for name, p in model.lora_parameters().items():
        out[peft_key(name)] = p.grad if p.grad is not None else torch.zeros_like(p)
        p.grad = None
    return out


def require_lora(model: Model) -> None:
    if not model.lora_parameters():
        raise MespError("the model has no LoRA adapter: call mesp.add_lora(model, mesp.LoraConfig(...)) first")
