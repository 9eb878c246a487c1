"""The curves of a training run as one PNG: `mesp plot RUN`.

Two panels from the run's metrics.jsonl: the training loss per step with the validation loss where it was
measured, and the private-footprint peak so far (RssAnon + VmSwap + RssShmem, what a device counts) beside the
RSS peak. Drawn with matplotlib's Agg backend (mesp.bench.plots), written atomically.
"""

from __future__ import annotations

from pathlib import Path

from .bench.plots import save_figure
from .checkpoint import METRICS
from .data import read_jsonl
from .errors import MespError
from .memory import MiB

PLOT_FILE = "curves.png"  # inside the run directory unless told otherwise


def read_run_metrics(run) -> list[dict]:
    """The step records of the run in `run` (a MespError naming the file when there are none or one is bad)."""
    path = Path(run) / METRICS
    if not path.is_file():
        raise MespError(f"{path}: no such file (is {run} a mesp train run directory?)")
    records = [record for _, _, record in read_jsonl(path)]
    if not records:
        raise MespError(f"{path}: no steps yet")
    return records


def plot_run(run, path=None) -> Path:
    """Draw the run's loss and memory curves to `path` (default RUN/curves.png); returns the path."""
    records = read_run_metrics(run)
    path = Path(path) if path else Path(run) / PLOT_FILE
    import matplotlib  # heavy: only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, mem_ax) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in records]
    loss_ax.plot(steps, [r["loss"] for r in records], label="train", linewidth=1.2)
    valid = [(r["step"], r["valid_loss"]) for r in records if r.get("valid_loss") is not None]
    if valid:
        loss_ax.plot(*zip(*valid), "o-", label="validation")
    loss_ax.set(xlabel="step", ylabel="loss per labelled token", title="loss")
    loss_ax.legend()
    for key, label in (("private_peak_bytes", "private footprint peak"), ("peak_rss_bytes", "RSS peak")):
        points = [(r["step"], r[key] / MiB) for r in records if r.get(key) is not None]
        if points:
            mem_ax.plot(*zip(*points), label=label)
    mem_ax.set(xlabel="step", ylabel="MiB", title="memory (whole process, peak so far)")
    mem_ax.legend()
    fig.suptitle(str(run))
    save_figure(fig, path)
    plt.close(fig)
    return path
