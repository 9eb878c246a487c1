"""What every peer worker shares: the spec it is given, the samples in the order mesp train takes them, the timed
step loop and the result file. Imports nothing but the standard library (each tool brings its own array
library); run as part of a worker script, never imported by mesp."""

from __future__ import annotations

import json
import os
import sys
import time


def read_spec() -> dict:
    """The JSON spec named by the worker's only argument; the thread count is applied to the environment's
    native libraries before any of them is imported."""
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} SPEC.json")
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(spec["threads"])
    return spec


def step_samples(spec: dict) -> list[list[int]]:
    """The token ids of each step's sample (batch 1), warm-up first: spec["order"] indexes the token file's lines."""
    with open(spec["tokens"]) as f:
        rows = [json.loads(line)["input_ids"] for line in f if line.strip()]
    return [rows[i] for i in spec["order"]]


def run_steps(spec: dict, step, tool: str, version: str) -> None:
    """Run step(token_ids) -> loss for every sample of step_samples (the first is the warm-up), time each one and
    write spec["out"]: {"tool", "version", "losses", "seconds", "tokens_per_step"}, atomically."""
    losses, seconds = [], []
    for ids in step_samples(spec):
        t0 = time.perf_counter()
        loss = float(step(ids))
        seconds.append(time.perf_counter() - t0)
        losses.append(loss)
        print(f"{tool} step {len(losses)}: loss {loss:.6f}, {seconds[-1]:.3f} s", file=sys.stderr, flush=True)
    result = {"tool": tool, "version": version, "losses": losses, "seconds": seconds,
              "tokens_per_step": len(step_samples(spec)[0])}
    tmp = spec["out"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, spec["out"])
