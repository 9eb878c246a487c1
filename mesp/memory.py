"""Peak memory at the allocator level, the way every number in this project is measured.

`PeakMemory` measures the peak of tensor bytes allocated above the moment it was entered:
- on CUDA, torch.cuda.max_memory_allocated after reset_peak_memory_stats;
- on CPU, PyTorch's CPU allocator reports each allocation and free to the profiler (profile_memory=True)
  with its running total; the peak of that total is the CPU figure. It sees every tensor the step creates,
  including the loss stage, and nothing allocated before the step (weights, adapters, data).
Engines mark their stages with `stage("forward")` etc.; the tracker splits the peak by the stage in force.

Beside it, what a device measures: the process's private footprint (`private_footprint_bytes`, the Linux
analogue of iOS's phys_footprint: anonymous + swapped + shared-anonymous memory, not clean file-backed pages such
as memory-mapped weights), sampled from a thread by `FootprintMeter` with its peak per stage; the runtime floor
(`runtime_floor_bytes`: what Python plus `import torch` costs before mesp does anything); the process's resident
set (peak, current, and a resettable peak on Linux), glibc's return of freed memory, and `format_mib`, the one
formatter of every MiB figure the CLI prints and the report writes.
"""

from __future__ import annotations

import logging
import os
import resource
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)

STAGE_PREFIX = "mesp.stage:"
NO_STAGE = "other"  # what the footprint meter calls time outside every stage
MiB = 1 << 20

current_stage = NO_STAGE  # the innermost stage() in force, read by FootprintMeter's sampling thread
_running_meters: set = set()  # FootprintMeters between enter and exit: each stage's end is sampled for them


def format_mib(n_bytes: int | None, digits: int = 1) -> str:
    """A byte count in mebibytes with `digits` decimals, without the unit ("12.3"); "—" when unknown (None).
    The one formatter behind every MiB figure the CLI prints and the benchmark report writes."""
    return "—" if n_bytes is None else f"{n_bytes / MiB:.{digits}f}"


@contextmanager
def stage(name: str):
    """Mark a stage (load, forward, loss, backward, update): PeakMemory splits the allocator peak by it and
    FootprintMeter the private footprint. Nearly free when neither is running."""
    global current_stage
    outer, current_stage = current_stage, name
    try:
        with torch.profiler.record_function(STAGE_PREFIX + name):
            yield
    finally:
        for meter in list(_running_meters):  # a stage shorter than the sampling interval still gets a sample
            meter.sample()
        current_stage = outer


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


# ---- what a device measures: the private footprint --------------------------------------------------------

PRIVATE_FIELDS = ("RssAnon", "VmSwap", "RssShmem")


def _status_fields(names, pid: int | str = "self") -> dict[str, int]:
    """Size fields of /proc/PID/status (kB there) in bytes, those present; {} off Linux or once PID is gone."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in names:
                    found[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return found


def footprint_and_rss(pid: int | str = "self") -> tuple[int, int] | None:
    """(private footprint, VmRSS) of process `pid` now, in bytes; None off Linux, or for a process gone or a
    zombie (no RssAnon)."""
    fields = _status_fields(PRIVATE_FIELDS + ("VmRSS",), pid)
    if "RssAnon" not in fields:
        return None
    rss = fields.pop("VmRSS", 0)
    return sum(fields.values()), rss


def private_footprint_bytes() -> int | None:
    """The process's private footprint now: RssAnon + VmSwap + RssShmem (Linux), the analogue of iOS's
    phys_footprint. Clean file-backed pages (the program, libraries, memory-mapped weights read from disk) are
    left out: the kernel can drop and re-read them, so they are not memory the process owns. None off Linux."""
    now = footprint_and_rss()
    return now[0] if now is not None else None


class FootprintMeter:
    """with FootprintMeter() as m: work();  m.private_peak_bytes, m.rss_peak_bytes, m.stage_private_peaks, ...

    The kernel keeps no peak of the private footprint, so a daemon thread samples it (and the RSS) every
    `interval` seconds and keeps the peak overall and per stage (the stage() in force at the sample; NO_STAGE
    outside every stage). A peak shorter than the interval can be missed; samples at entry, at exit and at the
    end of every stage are always taken. Peaks are None off Linux. The thread is stopped and joined on exit, exception or not."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.private_peak_bytes: int | None = None
        self.rss_peak_bytes: int | None = None
        self.stage_private_peaks: dict[str, int] = {}
        self.stage_rss_peaks: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        """Take one sample now (the thread calls this; callers may too, e.g. right after a known peak)."""
        now = footprint_and_rss()
        if now is None:
            return
        private, rss = now
        name = current_stage
        with self._lock:
            self.samples += 1
            self.private_peak_bytes = max(self.private_peak_bytes or 0, private)
            self.rss_peak_bytes = max(self.rss_peak_bytes or 0, rss)
            self.stage_private_peaks[name] = max(self.stage_private_peaks.get(name, 0), private)
            self.stage_rss_peaks[name] = max(self.stage_rss_peaks.get(name, 0), rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self):
        self.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="mesp-footprint-meter", daemon=True)
        self._thread.start()
        _running_meters.add(self)
        return self

    def __exit__(self, *exc):
        """Stop and join the thread and take a last sample; a second call does nothing."""
        if self._thread is None:
            return False
        _running_meters.discard(self)
        self._stop.set()
        self._thread.join()
        self._thread = None
        self.sample()
        return False

    def summary(self) -> dict:
        """The peaks as a JSON-ready dict (bytes)."""
        with self._lock:
            return {"private_peak_bytes": self.private_peak_bytes, "rss_peak_bytes": self.rss_peak_bytes,
                    "stage_private_peaks": dict(self.stage_private_peaks),
                    "stage_rss_peaks": dict(self.stage_rss_peaks), "samples": self.samples,
                    "interval_s": self.interval}


def process_tree(pid: int) -> list[int]:
    """`pid` and every live descendant of it (Linux /proc/PID/task/TID/children); [pid] where unreadable."""
    found, pending = [], [pid]
    while pending:
        p = pending.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    pending.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            pass
    return found


class ProcessSampler:
    """with ProcessSampler(child.pid) as s: child.wait();  s.private_peak_bytes, s.rss_peak_bytes

    Another process's memory, sampled from outside: every `interval` seconds a thread reads /proc/PID/status of
    the process and its descendants and keeps the peak of their summed private footprint (PRIVATE_FIELDS:
    RssAnon + VmSwap + RssShmem) and of their summed VmRSS. The same measure for every program, whatever it is
    written in and whatever it reports about itself: the peers benchmark samples each tool's process with it.
    A peak shorter than the interval can be missed. Peaks stay None off Linux or when no sample was read."""

    def __init__(self, pid: int, interval: float = 0.005):
        self.pid, self.interval = pid, interval
        self.private_peak_bytes: int | None = None
        self.rss_peak_bytes: int | None = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        found = [now for now in map(footprint_and_rss, process_tree(self.pid)) if now is not None]
        if found:
            private, rss = sum(f[0] for f in found), sum(f[1] for f in found)
            self.samples += 1
            self.private_peak_bytes = max(self.private_peak_bytes or 0, private)
            self.rss_peak_bytes = max(self.rss_peak_bytes or 0, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self):
        self.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="mesp-process-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        return False

    def summary(self) -> dict:
        return {"private_peak_bytes": self.private_peak_bytes, "rss_peak_bytes": self.rss_peak_bytes,
                "samples": self.samples, "interval_s": self.interval}


# ---- the runtime floor -------------------------------------------------------------------------------------

RUNTIME_FLOOR_LABEL = "runtime floor (python + torch import)"
RUNTIME_FLOOR_ENV = "MESP_RUNTIME_FLOOR_BYTES"  # a known floor in bytes: skips the measuring subprocess
# Python and torch alone (importing mesp would add its own modules to the floor)
_FLOOR_SCRIPT = ("import torch\n"
                 "f = {k: int(v.split()[0]) * 1024 for k, _, v in (l.partition(':') for l in open('/proc/self/status'))"
                 " if k in %r}\n"
                 "print(sum(f.values()) if 'RssAnon' in f else '')" % (PRIVATE_FIELDS,))
_runtime_floor: int | None = None
_runtime_floor_measured = False
_runtime_floor_lock = threading.Lock()


def runtime_floor_bytes(timeout: float = 300) -> int | None:
    """The private footprint of a fresh `python -c "import torch"` (this interpreter): the part of any mesp
    process's footprint that is Python and PyTorch rather than mesp. Measured once per process in a
    subprocess (or read from $MESP_RUNTIME_FLOOR_BYTES) and cached; None off Linux or when the subprocess
    fails. Several threads may ask at once: one measures, the others wait for it."""
    global _runtime_floor, _runtime_floor_measured
    with _runtime_floor_lock:
        if not _runtime_floor_measured:
            _runtime_floor = _measure_runtime_floor(timeout)
            _runtime_floor_measured = True
        return _runtime_floor


def _measure_runtime_floor(timeout: float) -> int | None:
    given = os.environ.get(RUNTIME_FLOOR_ENV)
    if given:
        try:
            return int(given)
        except ValueError:
            log.warning("$%s=%r is not a byte count; measuring the runtime floor instead", RUNTIME_FLOOR_ENV, given)
    if private_footprint_bytes() is None:
        return None
    started = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-c", _FLOOR_SCRIPT], capture_output=True, text=True,
                             timeout=timeout, check=True).stdout.strip()
        floor = int(out) if out else None
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        log.warning("could not measure the %s: %s", RUNTIME_FLOOR_LABEL, e)
        return None
    log.info("%s: %s MiB (measured in %.1f s)", RUNTIME_FLOOR_LABEL, format_mib(floor), time.perf_counter() - started)
    return floor
