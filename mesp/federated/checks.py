"""What the server checks in every returned adapter before averaging it, and each client in the global adapter
it receives (plain torch, no Flower):

- the same tensor names as the reference (the global adapter, or the client's own LoRA), no more, no fewer;
- the same shape and dtype for each;
- every value finite (no NaN, no inf);
- on the server, the update's size: the L2 norm of (returned - global) over all tensors together at most
  `max_update_norm` (a generous bound: it stops an update that would swamp the average, not a keen client).

    reason = adapter_problem(returned, global_tensors, max_update_norm=1e3)   # None when it passes

The reason is one short sentence naming the first tensor that fails, for the log and the round's record.
"""

from __future__ import annotations

import math

import torch

DEFAULT_MAX_UPDATE_NORM = 1e3  # L2 over the whole adapter; an honest round of LoRA changes it by far less


def adapter_problem(tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                    max_update_norm: float | None = None) -> str | None:
    """Why `tensors` may not stand in for `reference` (see the module docstring), or None when it may."""
    missing = sorted(set(reference) - set(tensors))
    if missing:
        return f"{len(missing)} LoRA tensor(s) missing (first: {missing[0]})"
    unknown = sorted(set(tensors) - set(reference))
    if unknown:
        return f"{len(unknown)} unexpected tensor(s) (first: {unknown[0]})"
    squared = 0.0
    for key in sorted(reference):
        t, ref = tensors[key], reference[key]
        if tuple(t.shape) != tuple(ref.shape):
            return f"{key} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
        if t.dtype != ref.dtype:
            return f"{key} has dtype {t.dtype}, expected {ref.dtype}"
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            return f"{key} has {bad} non-finite value(s)"
        if max_update_norm is not None:
            squared += float((t.double() - ref.double()).pow(2).sum())
    if max_update_norm is not None:
        norm = math.sqrt(squared)
        if not norm <= max_update_norm:
            return f"the update's norm {norm:.4g} exceeds --max-update-norm {max_update_norm:g}"
    return None
