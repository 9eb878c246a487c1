"""Helpers shared by the test suite and the benchmarks: gradient comparison and non-trivial LoRA states."""

from __future__ import annotations

import math

import torch


def randomize_lora_b(model, seed: int = 0, std: float = 0.1):
    """Replace every LoRA B (zero after add_lora) with seeded normal(0, std) values: with B = 0 the gradient of
    A and every path through B vanish, which would hide errors."""
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.lora_parameters().items():
            if name.endswith("lora_B"):
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius, in float64)."""
    a, b = a.double(), b.double()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b).clamp_min(1e-300))


def relative_errors(grads: dict, reference: dict) -> dict[str, float]:
    """relative_error of every tensor of `reference`, by key."""
    return {key: relative_error(grads[key], ref) for key, ref in reference.items()}


def cosine(grads: dict, reference: dict) -> float:
    """Cosine between two gradients over all tensors together."""
    dot = sum(float((grads[k].double() * r.double()).sum()) for k, r in reference.items())
    na = math.sqrt(sum(float(grads[k].double().pow(2).sum()) for k in reference))
    nb = math.sqrt(sum(float(r.double().pow(2).sum()) for r in reference.values()))
    return dot / (na * nb)
