"""PNG figures of the benchmarks (matplotlib with the Agg backend, imported only when a figure is drawn;
written atomically, so a crash never leaves half a PNG)."""

from __future__ import annotations

from pathlib import Path

from ..fileio import atomic_write
from ..memory import MiB
from .sweep import config_label, method_label


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> None:
    """Write a matplotlib figure as PNG atomically (a crash never leaves half a PNG)."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def plot_memory(result: dict, path, title: str | None = None) -> None:
    """Grouped bars: peak MiB above the step's start, one group per configuration, one bar per method."""
    plt = _pyplot()
    rows = [r for r in result["rows"] if "error" not in r]
    configs = list(dict.fromkeys(config_label(r) for r in rows))
    methods = list(dict.fromkeys(method_label(r) for r in rows))
    peak = {(config_label(r), method_label(r)): r["peak_bytes"] / MiB for r in rows}
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 + len(configs) * (0.35 + 0.28 * len(methods))), 4.2))
    for j, method in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i, c in enumerate(configs) if (c, method) in peak]
        ys = [peak[(c, method)] for c in configs if (c, method) in peak]
        bars = ax.bar(xs, ys, width, label=method)
        ax.bar_label(bars, labels=[f"{y:.0f}" for y in ys], fontsize=7, padding=1)
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels([c.replace(" T=", "\nT=") for c in configs], fontsize=8)
    ax.set_ylabel("peak MiB above the step's start")
    ax.set_title(title or "Peak memory of one training step (allocator level)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)


def plot_converge(result: dict, path) -> None:
    """Training loss per step (and validation loss as markers) of every method; MeZO runs 10x the steps."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    styles = {"mesp": dict(lw=2.2), "mebp": dict(lw=1.2, ls="--"), "mezo": dict(lw=1.0, alpha=0.8)}
    for method in dict.fromkeys(r["method"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["method"] == method]
        line, = ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=f"{method} (train)",
                        **styles.get(method, {}))
        valid = [r for r in rows if r["valid_loss"] is not None]
        if valid:
            ax.plot([r["step"] for r in valid], [r["valid_loss"] for r in valid], "o", ms=4, color=line.get_color(),
                    label=f"{method} (validation)")
    s = result["settings"]
    ax.set_xscale("symlog", linthresh=max(1, s["steps"]))
    ax.set_xlabel(f"step (linear up to {s['steps']}, then log; MeZO runs {s['mezo_steps']} steps)")
    ax.set_ylabel("loss (mean per labelled token)")
    ax.set_title(f"{Path(s['model']).name}, LoRA r={s['rank']}, batch {s['batch_size']}: "
                 f"AdamW lr {s['lr']:g} vs MeZO-SGD lr {s['mezo_lr']:g}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)
