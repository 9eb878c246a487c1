"""What `--dtype auto` buys on this CPU: one training step in fp32 and in bf16, timed side by side in one process.

Both copies of the model are loaded at once and, after one untimed step each, their steps alternate round by
round, so load on a shared machine falls on both alike; the result records what auto picks here (mesp.precision.auto_dtype) and the CPU's
vector flags, which decide it. To see what a CPU without native bf16 gets, restrict PyTorch's kernels before the
process starts (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2) and mesp's view of the CPU with them
(MESP_CPU_FLAGS="avx avx2 fma", mesp.cpu); the result names what restricted it (`kernels_restricted`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..cpu import MASK_ENV
from ..errors import MespError
from ..methods import METHODS
from ..settings import setting
from .machine import machine_info
from .rounds import time_alternating

DTYPES = ("float32", "bfloat16")
RESTRICTING_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", MASK_ENV)


@dataclass
class PrecisionSettings:
    """`mesp bench precision`: the model and step, the methods, how many timed rounds."""
    model: str = setting("qwen2.5-0.5b", "preset, HF directory or .gguf file (loaded resident in both dtypes)")
    seq_len: int = setting(256, "tokens per sample")
    rank: int = setting(8, "LoRA rank")
    methods: list[str] = setting(factory=lambda: ["mesp", "mebp"], help="comma-separated: " + ", ".join(METHODS))
    rounds: int = setting(3, "timed rounds; each configuration's minimum is reported")
    threads: int | None = setting(None, "torch threads", default_text="default: PyTorch's")
    json: str | None = setting(None, "write the result as JSON here")


def bench_precision(s: PrecisionSettings, progress: bool = True) -> dict:
    """Time one step per (dtype, method) in alternating rounds (module docstring). Returns {"rows": [{dtype,
    method, seconds, seconds_min, seconds_median, speedup_vs_float32}], "auto_dtype", "kernels_restricted",
    "settings", "machine"}."""
    from .. import LoraConfig, add_lora, load_model
    from ..methods import compute_gradients
    from ..precision import auto_dtype

    if s.rounds < 1:
        raise MespError(f"--rounds: expected at least 1, got {s.rounds}")
    unknown = [m for m in s.methods if m not in METHODS]
    if unknown or not s.methods:
        raise MespError(f"--methods: {', '.join(unknown) or 'none given'}; choose from {', '.join(METHODS)}")
    models = {}
    for dtype in DTYPES:
        models[dtype] = add_lora(load_model(s.model, dtype=getattr(torch, dtype), weights="resident"),
                                 LoraConfig(r=s.rank, alpha=2 * s.rank))
    vocab = models["float32"].config.vocab_size
    ids = torch.randint(0, vocab, (1, s.seq_len), generator=torch.Generator().manual_seed(0))
    rows = [{"dtype": d, "method": m} for m in s.methods for d in DTYPES]
    steps = [lambda r=r: compute_gradients(models[r["dtype"]], ids, ids, method=r["method"]) for r in rows]
    # a warm-up step each: a process's first step pays one-time costs (4x here)
    time_alternating(rows, steps, s.rounds, "bench precision", lambda r: f"{r['method']} {r['dtype']}",
                     warmup=True, progress=progress)
    for r in rows:
        fp32 = next(x for x in rows if x["method"] == r["method"] and x["dtype"] == "float32")
        r["speedup_vs_float32"] = fp32["seconds_min"] / r["seconds_min"]
    restricted = {k: os.environ[k] for k in RESTRICTING_ENV if os.environ.get(k)}
    return {"rows": rows, "auto_dtype": auto_dtype("cpu", flags=None), "kernels_restricted": restricted or None,
            "settings": {**vars(s)}, "machine": machine_info()}


def precision_table(result: dict) -> str:
    """What the CLI prints: each (method, dtype)'s minimum step time and its speed against fp32, then auto's pick."""
    lines = [f"{'method':8} {'dtype':9} {'step s (min)':>12} {'vs fp32':>8}"]
    for r in result["rows"]:
        lines.append(f"{r['method']:8} {r['dtype']:9} {r['seconds_min']:12.2f} {r['speedup_vs_float32']:7.2f}x")
    restricted = result["kernels_restricted"]
    lines.append(f"--dtype auto picks {result['auto_dtype']} on this CPU ({' '.join(result['machine']['cpu_flags'])})"
                 + (f"; kernels restricted by {restricted}" if restricted else ""))
    return "\n".join(lines)
