"""The budget/speed frontier: MeSP's step time under a range of `--memory-budget`s against MeBP's, in one process.

For each budget the planner (mesp.planner.plan_memory, measured on the step's allocator peak, checkpoints in RAM)
picks the fastest MeSP settings that fit; each plan's allocator peak is then measured (mesp.memory.PeakMemory,
one profiled step) and every configuration is timed in alternating rounds (MeBP, then each plan, then MeBP
again...), so load on a shared machine falls on all of them alike. The default budgets run from MeSP's
smallest plan up to MeBP's own measured peak: the last point is the issue's comparison, MeSP given exactly the
memory MeBP needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MespError
from ..memory import MiB, PeakMemory, return_freed_memory_to_os
from ..settings import setting
from .machine import machine_info
from .rounds import time_alternating


@dataclass
class FrontierSettings:
    """`mesp bench frontier`: the model and step, the budgets, how many timed rounds."""
    model: str = setting("qwen2.5-0.5b", "preset, HF directory or .gguf file (loaded resident)")
    seq_len: int = setting(256, "tokens per sample")
    rank: int = setting(8, "LoRA rank")
    batch_size: int = setting(1, "samples per step")
    budgets: str | None = setting(None, "comma-separated step budgets in MiB (allocator peak above the step's "
                                        "start)", default_text="default: --points budgets from MeSP's smallest "
                                                               "plan to MeBP's measured peak")
    points: int = setting(5, "how many budgets by default")
    rounds: int = setting(3, "timed rounds; each configuration's minimum is reported")
    threads: int | None = setting(1, "torch threads")
    json: str | None = setting(None, "write the result as JSON here")
    plot: str | None = setting(None, "write peak memory vs step time here (PNG)")


def _budgets(s: FrontierSettings, smallest: float, mebp_peak: float) -> list[float]:
    if s.budgets:
        try:
            values = [float(b) for b in s.budgets.split(",") if b.strip()]
        except ValueError as e:
            raise MespError(f"--budgets: expected comma-separated MiB, got {s.budgets!r}") from e
        if not values or min(values) <= 0:
            raise MespError(f"--budgets: expected positive MiB, got {s.budgets!r}")
        return values
    if s.points < 2:
        raise MespError(f"--points: expected at least 2, got {s.points}")
    return [smallest + (mebp_peak - smallest) * i / (s.points - 1) for i in range(s.points)]


def bench_frontier(s: FrontierSettings, progress: bool = True) -> dict:
    """Measure MeBP and MeSP under each budget (module docstring). Returns {"rows": [...], "settings", "machine"};
    a row: label, method, budget_mib (MeSP), plan (its settings), estimate_mib, peak_mib (measured allocator
    peak), seconds (each round), seconds_min, speedup (MeBP's minimum over this row's)."""
    from .. import LoraConfig, add_lora, load_model
    from ..estimate import estimate
    from ..methods import compute_gradients
    from ..planner import plan_memory

    if s.rounds < 1:
        raise MespError(f"--rounds: expected at least 1, got {s.rounds}")
    return_freed_memory_to_os()  # as the mesp CLI runs training
    model = load_model(s.model, dtype=torch.float32, weights="resident")
    add_lora(model, LoraConfig(r=s.rank, alpha=2 * s.rank))
    L = model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (s.batch_size, s.seq_len),
                        generator=torch.Generator().manual_seed(0))
    step_options = dict(method="mesp", dtype="float32", rank=s.rank, batch_size=s.batch_size)

    def step(method, options):
        return lambda: compute_gradients(model, ids, ids, method=method, **options)

    def peak(fn) -> float:
        with PeakMemory() as pm:
            fn()
        return pm.peak_bytes / MiB

    rows = [{"label": "mebp", "method": "mebp", "plan": None,
             "estimate_mib": estimate(model.config, s.seq_len, **{**step_options, "method": "mebp"})
             .step_peak_bytes / MiB, "peak_mib": peak(step("mebp", {}))}]
    options = [{}]  # compute_gradients' options per row (kept apart: keep_layers is a frozenset, not JSON)
    smallest = estimate(model.config, s.seq_len, **step_options).step_peak_bytes / MiB  # the engine's default
    seen = set()
    # largest first, so a plan that several budgets share is labelled with the largest (MeBP's peak at the top)
    for budget in sorted(_budgets(s, smallest, rows[0]["peak_mib"]), reverse=True):
        try:
            plan = plan_memory(model.config, int(budget * MiB), s.seq_len, measure="step", offload_allowed=False,
                               **step_options)
        except MespError:
            continue  # below MeSP's smallest plan: nothing to time
        chosen = {"keep_layers": plan.keep_layers, "token_chunk": plan.token_chunk, "loss_chunk": plan.loss_chunk,
                  "attn_block": plan.estimate.settings["attn_block"]}
        if tuple(chosen.values()) in seen:
            continue
        seen.add(tuple(chosen.values()))
        options.append(plan.engine_options(L))
        rows.append({"label": f"mesp @ {budget:.0f} MiB", "method": "mesp", "budget_mib": budget, "plan": chosen,
                     "estimate_mib": plan.estimate.step_peak_bytes / MiB,
                     "peak_mib": peak(step("mesp", options[-1]))})
    # each plan's profiled step above was its warm-up
    time_alternating(rows, [step(r["method"], o) for r, o in zip(rows, options)], s.rounds, "bench frontier",
                     lambda r: r["label"], progress=progress)
    for r in rows:
        r["speedup"] = rows[0]["seconds_min"] / r["seconds_min"]
    return {"rows": rows, "settings": {**vars(s)}, "machine": machine_info()}


def frontier_table(result: dict) -> str:
    """A plain-text table of a bench_frontier result (what the CLI prints)."""
    head = ("configuration", "kept layers", "token chunk", "estimate MiB", "peak MiB", "step s (min)", "vs MeBP")
    lines = [head]
    for r in result["rows"]:
        p = r["plan"] or {}
        lines.append((r["label"], str(p.get("keep_layers", "-")),
                      "-" if not p else (str(p["token_chunk"]) if p["token_chunk"] else "whole"),
                      f"{r['estimate_mib']:.1f}", f"{r['peak_mib']:.1f}", f"{r['seconds_min']:.2f}",
                      f"{r['speedup']:.2f}x"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in lines)


def plot_frontier(result: dict, path) -> None:
    """Measured step peak (x) against step time (y): MeBP one point, MeSP one per budget, joined."""
    from .plots import _pyplot, save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    mesp_rows = sorted((r for r in result["rows"] if r["method"] == "mesp"), key=lambda r: r["peak_mib"])
    ax.plot([r["peak_mib"] for r in mesp_rows], [r["seconds_min"] for r in mesp_rows], "o-", label="mesp, planned")
    for r in mesp_rows:
        ax.annotate(f"{r['plan']['keep_layers']} kept", (r["peak_mib"], r["seconds_min"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    mebp = [r for r in result["rows"] if r["method"] == "mebp"]
    ax.plot([r["peak_mib"] for r in mebp], [r["seconds_min"] for r in mebp], "s", ms=8, label="mebp")
    for r in mebp:
        ax.axvline(r["peak_mib"], ls=":", lw=1, color="gray")
        ax.annotate("MeBP's peak", (r["peak_mib"], 0), fontsize=7, xytext=(-4, 4), textcoords="offset points",
                    ha="right")
    rows = result["rows"]
    ax.set_xlim(0, 1.08 * max(r["peak_mib"] for r in rows))
    ax.set_ylim(0, 1.15 * max(r["seconds_min"] for r in rows))
    s = result["settings"]
    ax.set_xlabel("step peak, MiB above the step's start (allocator, measured)")
    ax.set_ylabel("step time, s (minimum of the rounds)")
    ax.set_title(f"{s['model']}, T={s['seq_len']}, r={s['rank']}, fp32, {s['threads']} thread(s): "
                 "MeSP under --memory-budget vs MeBP", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)
