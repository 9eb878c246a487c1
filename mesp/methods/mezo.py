"""MeZO (Malladi et al., 2023): zeroth-order SPSA with the seed trick.

theta += eps z; l+ = L; theta -= 2 eps z; l- = L; theta += eps z; projected gradient p = (l+ - l-) / (2 eps).
z ~ N(0, I) is never stored: it is regenerated from its seed, parameter by parameter in a fixed order.
Forward passes run without autograd and with the chunked LM head, so memory is that of inference.
"""

from __future__ import annotations

import torch

from ..lora import peft_key
from ..seeds import mix_seed
from .common import LossBatch, forward_loss


def z_of(params, seed: int):
    """Yield (param, z) with z regenerated from `seed`; the same seed gives the same z every time."""
    gen = None
    for p in params:
        if gen is None or gen.device != p.device:
            gen = torch.Generator(device=p.device).manual_seed(seed)
        yield p, torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32).to(p.dtype)


@torch.no_grad()
def perturb(params, seed: int, step: float) -> None:
    for p, z in z_of(params, seed):
        p.add_(z, alpha=step)


@torch.no_grad()
def projected_gradient(model, batch: LossBatch, seed: int, eps: float, loss_chunk=None):
    """Two forward passes at theta +- eps z; theta is restored in place. Returns (p, (l+ + l-) / 2)."""
    params = list(model.lora_parameters().values())
    perturb(params, seed, eps)
    plus = forward_loss(model, batch, loss_chunk)
    perturb(params, seed, -2 * eps)
    minus = forward_loss(model, batch, loss_chunk)
    perturb(params, seed, eps)
    return (plus - minus) / (2 * eps), (plus + minus) / 2


@torch.no_grad()
def gradients(model, batch: LossBatch, eps: float = 1e-3, n_directions: int = 1, seed: int = 0, loss_chunk=None):
    """MeZO's gradient estimate, mean over n directions of p_j z_j, PEFT-keyed so it can be compared with
    the true gradient (training never materialises it: see `update`)."""
    named = list(model.lora_parameters().items())
    params = [p for _, p in named]
    estimate = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    losses = []
    for j in range(n_directions):
        s = mix_seed(seed, j)
        proj, loss = projected_gradient(model, batch, s, eps, loss_chunk)
        losses.append(loss)
        for buf, (_, z) in zip(estimate, z_of(params, s)):
            buf.add_(z.float(), alpha=proj / n_directions)
    grads = {peft_key(n): e.to(p.dtype) for (n, p), e in zip(named, estimate)}
    return torch.tensor(sum(losses) / len(losses)), grads


@torch.no_grad()
def update(model, batch: LossBatch, lr: float, seed: int, eps: float = 1e-3, weight_decay: float = 0.0,
           loss_chunk=None) -> float:
    """One MeZO-SGD step: theta -= lr (p z + wd theta), z regenerated from `seed`. Returns the loss."""
    params = list(model.lora_parameters().values())
    proj, loss = projected_gradient(model, batch, seed, eps, loss_chunk)
    for p, z in z_of(params, seed):
        if weight_decay:
            p.mul_(1 - lr * weight_decay)
        p.add_(z, alpha=-lr * proj)
    return loss
