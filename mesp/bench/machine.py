"""What a benchmark ran on: CPU (model name and the vector instruction sets that decide which kernels PyTorch
runs), cores, RAM, library versions and the load at the start, recorded beside every raw result."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time

import torch

# CPU flags that change which kernels run (fp32/bf16/int8 matmuls, packed int4 layouts) and so the step times
SIMD_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
              "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


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


def _cpuinfo_field(name: str) -> str | None:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith(name))
    except (OSError, StopIteration):
        return None


def cpu_flags() -> list[str]:
    """The SIMD_FLAGS this CPU has (Linux /proc/cpuinfo), in SIMD_FLAGS order; [] where unknown."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return [f for f in SIMD_FLAGS if f in flags]


def machine_info() -> dict:
    """What the numbers were measured on (CPU, its vector flags, cores, RAM, library versions, load at the start)."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    info["cpu"] = _lscpu_model_name() or _cpuinfo_field("model name") or platform.processor() or platform.machine()
    info["cpu_flags"] = cpu_flags()
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    try:
        info["ram_bytes"] = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo")
                                 if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        info["ram_bytes"] = None
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    for name in ("transformers", "peft"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def machine_line(m: dict) -> str:
    """The hardware and software of a machine_info() dict, in one line (no date, load or threads). Results
    recorded before the CPU flags were kept read without them."""
    ram = f"{m['ram_bytes'] / (1 << 30):.1f} GiB RAM" if m.get("ram_bytes") else "RAM unknown"
    gpu = f", {m['cuda_device']}" if m.get("cuda_device") else ""
    flags = f" ({' '.join(m['cpu_flags'])})" if m.get("cpu_flags") else ""
    kernels = f" ({m['torch_cpu_capability']} kernels)" if m.get("torch_cpu_capability") else ""
    return (f"{m.get('cpu')}{flags}, {m.get('cores')} cores, {ram}{gpu}; {m.get('platform')}; "
            f"torch {m.get('torch')}{kernels}, transformers {m.get('transformers')}, peft {m.get('peft')}, "
            f"Python {m.get('python')}")
