"""What a benchmark ran on: CPU (model name and the vector instruction sets that decide which kernels PyTorch
runs, from mesp.cpu), cores, RAM, library versions and the load at the start, recorded beside every raw result."""

from __future__ import annotations

import os
import platform
import time

import torch

from ..cpu import cpu_flags, kernel_capabilities, model_name, native_bf16


def machine_info() -> dict:
    """What the numbers were measured on (CPU, its vector flags, cores, RAM, library versions, load at the start)."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    info["cpu"] = model_name()
    info["cpu_flags"] = cpu_flags()
    info["cpu_native_bf16"] = native_bf16()
    info["cpu_kernel_capabilities"] = kernel_capabilities()
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()  # what this process dispatches to
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
