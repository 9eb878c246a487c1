"""The compute dtype that fits the machine: `auto_dtype(device)`.

bf16 halves every activation and weight and, where the CPU multiplies bf16 natively (AVX512_BF16 or AMX), runs
a step about twice as fast as fp32; on CPUs without those instructions PyTorch emulates bf16 matmuls and a step
is several times slower, so "auto" picks fp32 there. CUDA GPUs run bf16 natively. LoRA weights and the
optimizer's state stay fp32 under a bf16 base (mesp.lora.adapter_dtype, mesp.optim); fp32 stays the exactness
reference.

$MESP_AUTO_DTYPE (float32 or bfloat16), when set, is what "auto" means on this machine: a test suite or a
benchmark then runs the same precision on every CPU (the tests set it to float32).
"""

from __future__ import annotations

import os

import torch

from .cpu import native_bf16
from .errors import MespError

AUTO = "auto"
AUTO_ENV = "MESP_AUTO_DTYPE"
AUTO_CHOICES = ("float32", "bfloat16")


def auto_dtype(device="cpu", flags=None) -> str:
    """"bfloat16" on CUDA or on a CPU with native bf16 (`flags`: /proc/cpuinfo-style flags, default this
    machine's CPU as mesp.cpu reads it), else "float32". Without `flags`, $MESP_AUTO_DTYPE decides when set."""
    forced = os.environ.get(AUTO_ENV) if flags is None else None
    if forced:
        if forced not in AUTO_CHOICES:
            raise MespError(f"${AUTO_ENV}: {forced!r} is not one of {', '.join(AUTO_CHOICES)}")
        return forced
    if torch.device(device).type == "cuda":
        return "bfloat16"
    return "bfloat16" if native_bf16(flags) else "float32"


def resolve_dtype(dtype: str, device="cpu") -> str:
    """A dtype name as given, or auto_dtype(device) for "auto"."""
    return auto_dtype(device) if dtype == AUTO else dtype
