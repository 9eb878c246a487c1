"""What this machine's CPU is and can execute: its model name, its vector instruction sets, which of PyTorch's
kernel capabilities (ATEN_CPU_CAPABILITY) it can run and whether it multiplies bf16 natively.

One home for these facts, read by `--dtype auto` (mesp.precision), the quantized products (mesp.quant), the
benchmarks' record of the machine (mesp.bench.machine) and the tests, which must run on AVX2-only, AVX-512 and
AVX-512+BF16 CPUs alike and never force an instruction set the CPU lacks (that process dies of SIGILL).

Two sources, and a feature counts only where both agree: the flags Linux lists in /proc/cpuinfo, and PyTorch's
own CPUID probes (torch.cpu._is_*_supported, what its dispatcher trusts). An emulator or a hypervisor may list
flags the CPU it presents does not execute; where /proc/cpuinfo is missing (macOS, Windows), the probes alone.

$MESP_CPU_FLAGS (space- or comma-separated flags), when set, is intersected with what /proc/cpuinfo lists: mesp
then behaves as on a lesser CPU (with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 restricting PyTorch's
kernels alike, an AVX-512 machine runs the suite as an AVX2-only one would). It can only take features away.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess

import torch

# flags that change which kernels run (fp32/bf16/int8 matmuls, packed int4 layouts) and so the step times
SIMD_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
              "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # bf16 arithmetic in hardware: bf16 matmuls beat fp32's
# PyTorch's x86-64 kernel capabilities, weakest first, with the /proc/cpuinfo flags and the torch.cpu probe each
# needs ("default" is plain x86-64 and runs everywhere)
CAPABILITIES = {
    "default": ((), None),
    "avx2": (("avx2", "fma"), "_is_avx2_supported"),
    "avx512": (("avx512f", "avx512bw", "avx512vl", "avx512dq"), "_is_avx512_supported"),
}


def _torch_probe(name: str) -> bool | None:
    """torch.cpu's private CPUID probe `name` (PyTorch has no public query for these), None where absent."""
    probe = getattr(torch.cpu, name, None)
    return bool(probe()) if probe is not None else None


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(name)), None)
    except OSError:
        return None


MASK_ENV = "MESP_CPU_FLAGS"


@functools.cache
def _proc_flags() -> frozenset[str] | None:
    field = _cpuinfo_field("flags")
    return frozenset(field.split()) if field is not None else None


def listed_flags() -> frozenset[str] | None:
    """Every flag /proc/cpuinfo lists for this CPU, less those $MESP_CPU_FLAGS leaves out; None where neither
    /proc/cpuinfo nor $MESP_CPU_FLAGS is there."""
    listed, mask = _proc_flags(), os.environ.get(MASK_ENV)
    if mask is None:
        return listed
    masked = frozenset(mask.replace(",", " ").split())
    return masked if listed is None else listed & masked


def cpu_flags() -> list[str]:
    """The SIMD_FLAGS this CPU lists, in SIMD_FLAGS order; [] where unknown."""
    listed = listed_flags() or frozenset()
    return [f for f in SIMD_FLAGS if f in listed]


def _has(flags: tuple[str, ...], probes: tuple[str, ...]) -> bool:
    """True when /proc/cpuinfo (where present) lists all `flags` and some of the torch.cpu `probes` (where
    PyTorch has them) says yes; with neither source, False."""
    listed = listed_flags()
    answers = [a for a in map(_torch_probe, probes) if a is not None]
    if listed is None and not answers:
        return False
    return (listed is None or all(f in listed for f in flags)) and (not answers or any(answers))


def kernel_capabilities() -> list[str]:
    """The ATEN_CPU_CAPABILITY values this CPU can execute, weakest first ("default" always; none but it off
    x86-64). Setting one it lacks makes PyTorch run instructions the CPU does not have."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["default"]
    return [name for name, (flags, probe) in CAPABILITIES.items()
            if probe is None or _has(flags, (probe,))]


def native_bf16(flags=None) -> bool:
    """Whether the CPU does bf16 arithmetic in hardware (AVX512_BF16 or AMX). `flags`: decide from these
    /proc/cpuinfo-style flags instead of this machine's."""
    if flags is not None:
        return bool(set(flags).intersection(NATIVE_BF16_FLAGS))
    return (_has(("avx512_bf16",), ("_is_avx512_bf16_supported",))
            or _has(("amx_bf16",), ("_is_amx_tile_supported",)))


def model_name() -> str:
    """The CPU's model name as lscpu prints it (else /proc/cpuinfo's, else what Python knows)."""
    return _lscpu_model_name() or _cpuinfo_field("model name") or platform.processor() or platform.machine()


def _lscpu_model_name() -> str | None:
    if shutil.which("lscpu") is None:
        return None
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                             env={**os.environ, "LC_ALL": "C"}).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next((line.split(":", 1)[1].strip() for line in out.splitlines()
                 if line.startswith("Model name:")), None)
