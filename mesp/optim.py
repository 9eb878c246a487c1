"""Optimizers over LoRA tensors only, updated one tensor at a time, with learning-rate schedules.

`update(key, param, grad, lr)` applies one step to one tensor, so the MeSP engine's per-layer hook can update
a layer the moment its gradients exist (the gradient of the layer's input was already computed with the old
weights) and drop them: no full gradient set is ever held. Applying it to every tensor after a full backward
is the ordinary step; both give the same weights bit for bit.

The arithmetic is PyTorch's (single-tensor torch.optim.SGD / AdamW: coupled weight decay for SGD, decoupled
for AdamW, bias-corrected moments, per-tensor step counts). State is computed and kept in fp32 whatever the
parameter dtype, as plain tensors keyed `<PEFT key>.<name>`, so it saves to safetensors.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import MespError
from .formats.safetensors import write_safetensors

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine")


class Optimizer:
    """Per-tensor state; subclasses implement `_step(param32, grad32, state, lr)` on fp32 copies."""

    state_names: tuple[str, ...] = ()

    def __init__(self, weight_decay: float = 0.0):
        if not weight_decay >= 0:  # NaN too
            raise MespError(f"weight_decay: must be >= 0, got {weight_decay!r}")
        self.weight_decay = weight_decay
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def update(self, key: str, param: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        """One step for one tensor (`key` names its state, normally the PEFT key)."""
        state = self.state.setdefault(key, {})
        p32 = param.detach().float() if param.dtype != torch.float32 else param.data
        self._step(p32, grad.to(torch.float32), state, lr)
        if p32 is not param.data:
            param.data.copy_(p32)

    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], lr: float) -> None:
        """The ordinary step: every tensor of `grads` (keys as in `params`)."""
        for key, g in grads.items():
            self.update(key, params[key], g, lr)

    def _step(self, p, g, state, lr):
        raise NotImplementedError

    # ---- state on disk ---------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{key}.{name}": t for key, s in self.state.items() for name, t in s.items()}

    def save(self, path: str | Path) -> None:
        write_safetensors(path, self.state_tensors(), metadata={"optimizer": type(self).__name__})

    def load(self, path: str | Path, params: dict[str, torch.Tensor]) -> None:
        """Replace the state with a saved one; every key must belong to `params` with a matching shape."""
        try:
            flat = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise MespError(f"{path}: unreadable optimizer state ({e})") from e
        state: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in flat.items():
            key, _, field = name.rpartition(".")
            if key not in params or field not in self.state_names:
                raise MespError(f"{path}: unexpected optimizer tensor {name!r} for this adapter and optimizer")
            if field != "step" and t.shape != params[key].shape:
                raise MespError(f"{path}: {name} has shape {tuple(t.shape)}, expected {tuple(params[key].shape)}")
            state.setdefault(key, {})[field] = t.to(params[key].device)
        self.state = state


class SGD(Optimizer):
    """torch.optim.SGD: g += wd * p; with momentum, buf = g (first step) then buf = m * buf + g; p -= lr * buf."""

    state_names = ("momentum_buffer",)

    def __init__(self, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(weight_decay)
        if not 0.0 <= momentum < 1.0:
            raise MespError(f"momentum: must be in [0, 1), got {momentum!r}")
        self.momentum = momentum

    def _step(self, p, g, state, lr):
        if self.weight_decay:
            g = g.add(p, alpha=self.weight_decay)
        if self.momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.clone()
            else:
                buf.mul_(self.momentum).add_(g)
            g = buf
        p.add_(g, alpha=-lr)


class AdamW(Optimizer):
    """torch.optim.AdamW (amsgrad off): p *= 1 - lr * wd; bias-corrected Adam step."""

    state_names = ("step", "exp_avg", "exp_avg_sq")

    def __init__(self, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(weight_decay)
        self.beta1, self.beta2 = betas
        self.eps = eps

    def _step(self, p, g, state, lr):
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = float(state["step"])
        if self.weight_decay:
            p.mul_(1 - lr * self.weight_decay)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g, 1 - self.beta1)
        v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        step_size = lr / (1 - self.beta1 ** t)
        denom = (v.sqrt() / (1 - self.beta2 ** t) ** 0.5).add_(self.eps)
        p.addcdiv_(m, denom, value=-step_size)


def make_optimizer(name: str, weight_decay: float = 0.0, momentum: float = 0.0) -> Optimizer:
    if name == "sgd":
        return SGD(momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        if momentum:
            raise MespError("momentum: applies to optimizer sgd only (adamw has its own betas)")
        return AdamW(weight_decay=weight_decay)
    raise MespError(f"optimizer: unknown {name!r}; choose from {', '.join(OPTIMIZERS)}")


def learning_rate(step: int, base_lr: float, total_steps: int, schedule: str = "constant", warmup: int = 0) -> float:
    """The learning rate of update number `step` (0-based): linear warmup over the first `warmup` updates
    (reaching base_lr at update warmup-1), then constant or a cosine decay towards 0 over the rest."""
    if schedule not in SCHEDULES:
        raise MespError(f"schedule: unknown {schedule!r}; choose from {', '.join(SCHEDULES)}")
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def squared_norm(grads: dict[str, torch.Tensor]) -> float:
    """The sum of the squares of every element of `grads` (fp64 accumulation)."""
    return sum(float(g.double().pow(2).sum()) for g in grads.values())


def clip_grad_norm(grads: dict[str, torch.Tensor], max_norm: float) -> float:
    """Scale `grads` in place so their global L2 norm is at most max_norm (torch.nn.utils.clip_grad_norm_'s
    rule). Returns the norm before clipping."""
    norm = math.sqrt(squared_norm(grads))
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for g in grads.values():
            g.mul_(coef)
    return norm
