"""Transparent huge pages for PyTorch's large CPU tensors, switched on before torch is imported.

Why: the CLI returns every block of 1 MiB or more to the OS when it is freed (memory.return_freed_memory_to_os),
so the private footprint follows the live tensors. The price is that each large tensor of a step is a fresh
mapping whose 4 KiB pages fault in one by one: a Qwen2.5-0.5B `mesp train` step at T=1024 took ~2.6 million
more minor faults and ~5 s more system time than with glibc's default (which keeps freed blocks, and the private
footprint with them: +281 MiB on an int4 step). PyTorch's own switch THP_MEM_ALLOC_ENABLE aligns tensors of
2 MiB or more to 2 MiB and madvises them MADV_HUGEPAGE, so they fault in 2 MiB at a time. PyTorch reads the variable once, at its
first allocation (during `import torch`), which is why this runs from mesp/__init__.py before anything imports
torch. A value the user set (0 turns it off) is kept; where torch is already imported, or the kernel has THP off
or absent, nothing changes.
"""

from __future__ import annotations

import os
import sys

VARIABLE = "THP_MEM_ALLOC_ENABLE"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
set_here = False  # whether this process's mesp set VARIABLE (mesp bench peers keeps it out of the peers' processes)


def kernel_allows_madvise(mode_path: str = THP_MODE) -> bool:
    """True where the kernel's THP mode is `always` or `madvise` (the selected mode is the bracketed word)."""
    try:
        with open(mode_path) as f:
            mode = f.read()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def enable_torch_hugepages(environ=os.environ, modules=sys.modules, mode_path: str = THP_MODE) -> bool:
    """Set THP_MEM_ALLOC_ENABLE=1 when it can still take effect; True when it is on for this process's torch."""
    if VARIABLE in environ:
        return environ[VARIABLE] == "1"
    if "torch" in modules or not kernel_allows_madvise(mode_path):
        return False
    global set_here
    environ[VARIABLE] = "1"
    set_here = environ is os.environ
    return True
