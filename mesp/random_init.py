"""Seeded random base weights, as transformers initialises them (normal(0, std) matrices, norms at their neutral
value, biases 0): memory and speed do not depend on the values, so the published architectures can be measured
without downloads. Matrices are drawn on demand, so a loader can quantize them block by block."""

from __future__ import annotations

import torch

from .families import ModelConfig, expected_shapes, layer_shapes
from .model import Model, set_weight


def init_random_weights(model: Model, seed: int = 0, std: float = 0.02) -> Model:
    """Fill `model`'s base weights with random_weights' values, in place; returns the model."""
    dtype = model.dtype if model.model.norm.weight.numel() else torch.float32
    for name, w in random_weights(model.config, seed, std, dtype):
        set_weight(model, name, w if isinstance(w, torch.Tensor) else w.read_rows(0, w.shape[0]))
    return model


class RandomMatrix:
    """A seeded normal(0, std) matrix drawn on demand, rows in order, so a loader can quantize it block by block
    and the full-precision matrix never exists. Blocks whose row counts are multiples of 16 draw exactly the
    numbers one draw of the whole matrix would (PyTorch's CPU normal_ fills 16 values at a time)."""

    def __init__(self, shape, std: float, dtype: torch.dtype, generator: torch.Generator):
        self.shape, self.std, self.dtype, self.generator = torch.Size(shape), std, dtype, generator
        self._next = 0

    def read_rows(self, n0: int, n1: int) -> torch.Tensor:
        if n0 != self._next:
            raise ValueError(f"RandomMatrix rows are drawn in order: asked for row {n0}, next is {self._next}")
        self._next = n1
        return torch.empty(n1 - n0, *self.shape[1:], dtype=self.dtype).normal_(0.0, self.std, generator=self.generator)


def random_weights(cfg: ModelConfig, seed: int = 0, std: float = 0.02, dtype: torch.dtype = torch.float32):
    """(HF name, weight) of init_random_weights' base weights, in their drawing order: vectors as tensors,
    matrices as RandomMatrix. The matrices share one generator: read each one whole (or block by block, in
    order) before taking the next item."""
    g = torch.Generator().manual_seed(seed)
    shapes = expected_shapes(cfg)
    norm_init = cfg.family.norm.init
    yield "model.embed_tokens.weight", RandomMatrix(shapes["model.embed_tokens.weight"], std, dtype, g)
    for i in range(cfg.num_hidden_layers):
        spec = cfg.layer_spec(i)
        for name, shape in layer_shapes(cfg, spec).items():
            if len(shape) == 2:
                yield f"model.layers.{i}.{name}", RandomMatrix(shape, std, dtype, g)
            else:
                value = 0.0 if name.endswith(".bias") else spec.norm.init
                yield f"model.layers.{i}.{name}", torch.full(shape, value, dtype=dtype)
    yield "model.norm.weight", torch.full((cfg.hidden_size,), norm_init, dtype=dtype)
    if "lm_head.weight" in shapes:
        yield "lm_head.weight", RandomMatrix(shapes["lm_head.weight"], std, dtype, g)
