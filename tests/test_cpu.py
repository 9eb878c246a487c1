"""mesp.cpu: what the CPU can execute, read from /proc/cpuinfo and PyTorch's CPUID probes, and what follows from it
on AVX2-only, AVX-512 and AVX-512+BF16 CPUs (simulated here by replacing the two sources)."""

from __future__ import annotations

import os
import platform

import pytest
import torch

from mesp import cpu, quant
from mesp.bench.machine import machine_info
from mesp.precision import auto_dtype

AVX2_ONLY = {"avx", "avx2", "fma", "sse4_2"}
AVX512 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}
AVX512_BF16 = AVX512 | {"avx512_bf16"}
PROBES = {"_is_avx2_supported": "avx2", "_is_avx512_supported": "avx512f",
          "_is_avx512_bf16_supported": "avx512_bf16", "_is_amx_tile_supported": "amx_tile"}


def simulate(monkeypatch, listed, executes=None):
    """This process sees a CPU whose /proc/cpuinfo lists `listed` and whose CPUID probes report `executes`
    (default: what it lists)."""
    executes = listed if executes is None else executes
    monkeypatch.delenv(cpu.MASK_ENV, raising=False)
    monkeypatch.delenv("MESP_AUTO_DTYPE", raising=False)
    monkeypatch.setattr(cpu, "_proc_flags", lambda: None if listed is None else frozenset(listed))
    monkeypatch.setattr(cpu, "_torch_probe", lambda name: PROBES[name] in executes if name in PROBES else None)
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")


@pytest.mark.parametrize("listed, capabilities, bf16", [
    (AVX2_ONLY, ["default", "avx2"], False),
    (AVX512, ["default", "avx2", "avx512"], False),
    (AVX512_BF16, ["default", "avx2", "avx512"], True),
    ({"sse2"}, ["default"], False),
])
def test_what_each_cpu_runs(monkeypatch, listed, capabilities, bf16):
    simulate(monkeypatch, listed)
    assert cpu.kernel_capabilities() == capabilities
    assert cpu.native_bf16() is bf16
    assert auto_dtype("cpu") == ("bfloat16" if bf16 else "float32")
    # the dequantized products run bf16 activations in fp32 where bf16 math is emulated (several times slower)
    x = torch.zeros(2, 3, dtype=torch.bfloat16)
    assert quant._matmul_dtype(x) == (torch.bfloat16 if bf16 else torch.float32)
    assert cpu.cpu_flags() == [f for f in cpu.SIMD_FLAGS if f in listed]


def test_a_flag_listed_but_not_executed_does_not_count(monkeypatch):
    """An emulator or hypervisor may pass the host's /proc/cpuinfo through while presenting a lesser CPU:
    the CPUID probes (what PyTorch's dispatcher trusts) must agree too."""
    simulate(monkeypatch, AVX512_BF16, executes=AVX2_ONLY)
    assert cpu.kernel_capabilities() == ["default", "avx2"]
    assert not cpu.native_bf16()


def test_without_proc_cpuinfo_the_probes_decide(monkeypatch):
    simulate(monkeypatch, None, executes=AVX512_BF16)
    assert cpu.kernel_capabilities() == ["default", "avx2", "avx512"] and cpu.native_bf16()
    assert cpu.cpu_flags() == []


def test_the_mask_only_takes_features_away(monkeypatch):
    simulate(monkeypatch, AVX512_BF16)
    monkeypatch.setenv(cpu.MASK_ENV, "avx avx2 fma")
    assert cpu.kernel_capabilities() == ["default", "avx2"] and not cpu.native_bf16()
    simulate(monkeypatch, AVX2_ONLY)
    monkeypatch.setenv(cpu.MASK_ENV, ",".join(AVX512_BF16))
    assert cpu.kernel_capabilities() == ["default", "avx2"] and not cpu.native_bf16()


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 kernel capabilities")
def test_this_cpu_agrees_with_pytorchs_dispatcher():
    """Unrestricted, PyTorch dispatches to the best capability the CPU has: the last of kernel_capabilities()."""
    restricted = [k for k in ("ATEN_CPU_CAPABILITY", cpu.MASK_ENV) if k in os.environ]
    if restricted:
        pytest.skip(f"this process's view of the CPU is restricted by {', '.join(restricted)}")
    assert cpu.kernel_capabilities()[-1] == torch.backends.cpu.get_cpu_capability().lower()
    for name in cpu.kernel_capabilities():
        assert all(f in cpu.listed_flags() for f in cpu.CAPABILITIES[name][0]), name


def test_the_machine_record_names_what_the_cpu_runs():
    info = machine_info()
    assert info["cpu_kernel_capabilities"] == cpu.kernel_capabilities()
    assert info["cpu_native_bf16"] == cpu.native_bf16()
    assert info["cpu"] and info["cpu_flags"] == cpu.cpu_flags()
