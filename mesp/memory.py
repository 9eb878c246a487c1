"""Peak memory at the allocator level, the way every number in this project is measured.

`PeakMemory` measures the peak of tensor bytes allocated above the moment it was entered:
- on CUDA, torch.cuda.max_memory_allocated after reset_peak_memory_stats;
- on CPU, PyTorch's CPU allocator reports each allocation and free to the profiler (profile_memory=True)
  with its running total; the peak of that total is the CPU figure. It sees every tensor the step creates,
  including the loss stage, and nothing allocated before the step (weights, adapters, data).
Engines mark their stages with `stage("forward")` etc.; the tracker splits the peak by the stage in force.

Beside it: the process's resident set (peak, current, and a resettable peak on Linux), glibc's return of freed
memory, and `format_mib`, the one formatter of every MiB figure the CLI prints and the report writes.
"""

from __future__ import annotations

import os
import resource
import sys
from contextlib import contextmanager

import torch

STAGE_PREFIX = "mesp.stage:"
MiB = 1 << 20


def format_mib(n_bytes: int | None, digits: int = 1) -> str:
    """A byte count in mebibytes with `digits` decimals, without the unit ("12.3"); "—" when unknown (None).
    The one formatter behind every MiB figure the CLI prints and the benchmark report writes."""
    return "—" if n_bytes is None else f"{n_bytes / MiB:.{digits}f}"


@contextmanager
def stage(name: str):
    """Mark a stage of a step (free when no tracker is running)."""
    with torch.profiler.record_function(STAGE_PREFIX + name):
        yield


class PeakMemory:
    """with PeakMemory(device) as pm: step();  pm.peak_bytes, pm.stage_peaks ({stage: peak bytes})."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.stage_peaks: dict[str, int] = {}

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                profile_memory=True)
            with _quiet_native_stderr():
                self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return False
        with _quiet_native_stderr():
            self._prof.__exit__(*exc)
        if exc[0] is None:
            self._read_cpu_events()
        return False

    def _read_cpu_events(self):
        from torch._C._profiler import _EventType

        allocations, stages = [], []
        pending = list(self._prof.profiler.kineto_results.experimental_event_tree())
        while pending:
            node = pending.pop()
            pending.extend(node.children)
            if node.tag == _EventType.Allocation:
                f = node.extra_fields
                allocations.append((node.start_time_ns, f.total_allocated, f.alloc_size))
            elif node.name.startswith(STAGE_PREFIX):
                stages.append((node.start_time_ns, node.end_time_ns, node.name[len(STAGE_PREFIX):]))
        allocations.sort()
        # The allocator's running total is process-wide: a tensor allocated under an earlier tracker and freed
        # while none ran stays in it. The total before this tracker's first event is its baseline.
        base = allocations[0][1] - allocations[0][2] if allocations else 0
        allocations = [(t, total - base) for t, total, _ in allocations]
        self.peak_bytes = max((total for _, total in allocations), default=0)
        peaks: dict[str, int] = {}
        for t, total in allocations:
            # the innermost (latest-starting) stage containing t
            inside = [s for s in stages if s[0] <= t <= s[1]]
            name = max(inside)[2] if inside else "other"
            peaks[name] = max(peaks.get(name, 0), total)
        self.stage_peaks = peaks


@contextmanager
def _quiet_native_stderr():
    """Silence file descriptor 2 for a moment: the profiler's native code prints 'USDT ... profiler_start/stop'
    lines there on every start and stop, which would litter every command that measures memory."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS record (VmHWM) from the current RSS; False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_bytes(field: str) -> int | None:
    """A size field of /proc/self/status (kB there) in bytes; None off Linux."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss_bytes() -> int | None:
    """The process's resident set size now (Linux VmRSS); None where unknown."""
    return _proc_status_bytes("VmRSS")


def peak_rss_since_reset() -> int:
    """VmHWM (after reset_peak_rss), else the process's lifetime peak."""
    hwm = _proc_status_bytes("VmHWM")
    return hwm if hwm is not None else peak_rss_bytes()


def return_freed_memory_to_os(threshold_bytes: int = 1 << 20) -> bool:
    """Have glibc serve every allocation of `threshold_bytes` or more with its own mmap, returned to the OS when
    freed. By default glibc raises that threshold to the size of each large block freed (up to 32 MiB), after
    which blocks allocated and freed per layer (dequantized weights, logits slices) come from the heap, which
    keeps their pages: one int4 Qwen2.5-0.5B MeSP step at 256 tokens peaked at 958 MiB RSS by default and
    710 MiB with this (its allocator-level peak is 70 MiB either way). False where glibc's mallopt is absent."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_MMAP_THRESHOLD = -3
    return bool(mallopt(M_MMAP_THRESHOLD, threshold_bytes))


def tensor_bytes(tensors) -> int:
    """Bytes held by an iterable of tensors (or quantized weights exposing nbytes)."""
    return sum(t.nelement() * t.element_size() if isinstance(t, torch.Tensor) else t.nbytes for t in tensors)
