"""Side-by-side timing for the in-process benchmarks (frontier, precision): every configuration's step runs once
per round, round after round, so load on a shared machine falls on all of them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def time_alternating(rows: list[dict], steps: list[Callable[[], object]], rounds: int, desc: str,
                     label: Callable[[dict], str], warmup: bool = False, progress: bool = True) -> None:
    """Run steps[i] (the step of rows[i]) once per round for `rounds` rounds, after one untimed step each with
    `warmup` (a process's first step pays one-time costs); fill each row's "seconds" (one per round),
    "seconds_min" and "seconds_median"."""
    from tqdm import tqdm

    bar = tqdm(total=(rounds + warmup) * len(rows), desc=desc, unit="step", disable=not progress)
    if warmup:
        for step in steps:
            step()
            bar.update()
    for r in rows:
        r["seconds"] = []
    for _ in range(rounds):
        for r, step in zip(rows, steps):
            t0 = time.perf_counter()
            step()
            r["seconds"].append(time.perf_counter() - t0)
            bar.set_postfix_str(f"{label(r)}: {r['seconds'][-1]:.2f} s")
            bar.update()
    bar.close()
    for r in rows:
        r["seconds_min"] = min(r["seconds"])
        r["seconds_median"] = statistics.median(r["seconds"])
