"""The whole-process measure: `mesp train` in a fresh process, and the memory summary that process wrote.

A device counts everything a process holds, loading included, so the figure must come from a process that did
nothing else: this one has imported more, loaded other models and kept its heap. The child measures itself
(mesp.memory.FootprintMeter over the whole run) and writes OUT/memory.json, which is read back here. The
runtime floor is measured once in this process and handed to every child, which then need not measure it.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from .checkpoint import MEMORY_SUMMARY
from .errors import MespError
from .memory import RUNTIME_FLOOR_ENV, runtime_floor_bytes


def shown(train_args: list[str]) -> str:
    """The command as a user would type it."""
    return "mesp train " + shlex.join(train_args)


def child_env(threads: int | None = None) -> dict:
    """The environment of a measured child: this one, plus the runtime floor (and a thread count if given)."""
    env = dict(os.environ)
    floor = runtime_floor_bytes()
    if floor is not None:
        env[RUNTIME_FLOOR_ENV] = str(floor)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_mesp(args: list[str], env: dict | None = None, timeout: float | None = None) -> None:
    """Run `mesp ARGS` in a fresh Python process; MespError with one line saying why when it fails."""
    what = f"mesp {args[0]}"
    try:
        proc = subprocess.run([sys.executable, "-m", "mesp.cli", *args], capture_output=True, text=True,
                              env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise MespError(f"{what} timed out after {timeout:.0f} s") from e
    if proc.returncode < 0:
        raise MespError(f"{what} killed by signal {-proc.returncode} (out of memory?)")
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [""])[-1][:300]
        raise MespError(f"{what} exit status {proc.returncode}: {tail}")


def train_process_memory(train_args: list[str], out, env: dict | None = None, timeout: float | None = None) -> dict:
    """Run `mesp train TRAIN_ARGS --out OUT` in a fresh process and return the memory summary it wrote
    (mesp.train: private_peak_bytes, rss_peak_bytes, stage_private_peaks, runtime_floor_bytes, ...)."""
    run_mesp(["train", *train_args, "--out", str(out)], env if env is not None else child_env(), timeout)
    return json.loads((Path(out) / MEMORY_SUMMARY).read_text())
