"""`mesp bench report`: measure what mesp.bench.plan lists (or read it back), keep the raw results in
OUT/results, draw the figures and write OUT/results.md (see mesp.bench.render)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import MespError
from ..fileio import write_json, write_text
from ..settings import setting
from . import plan
from .converge import bench_converge, converge_csv
from .fidelity import bench_grads
from .plots import plot_converge, plot_memory
from .process import bench_process
from .render import render_report
from .sweep import PEER, bench_memory

log = logging.getLogger(__name__)

PARTS = ("memory", "process", "grads", "converge")


@dataclass
class ReportSettings:
    """`mesp bench report`: where the report goes, and what to measure again."""
    out: str = setting("docs", "directory of results.md and its figures")
    render_only: bool = setting(False, "re-render results.md from the raw results already in OUT/results "
                                       "(no measuring)")
    only: list[str] | None = setting(None, "measure only these parts (memory, process, grads, converge); the "
                                           "others are read from OUT/results")
    threads: int | None = setting(None, "torch threads for every measurement", default_text="default: PyTorch's")


def bench_report(settings: ReportSettings) -> Path:
    """Measure the report's parts (or read them back with render_only / those not in `only`), write the raw
    results into OUT/results, the figures into OUT, and OUT/results.md. Returns the path of results.md."""
    only = settings.only
    if only is not None:
        unknown = [p for p in only if p not in PARTS]
        if unknown or not only:
            raise MespError(f"only: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(PARTS)}")
    measure = set() if settings.render_only else set(only or PARTS)
    out = Path(settings.out)
    raw = out / "results"
    with report_lock(raw) if measure else contextlib.nullcontext():
        return _bench_report(out, raw, measure, settings.threads)


@contextlib.contextmanager
def report_lock(raw: Path):
    """One measuring report at a time per output directory: two at once would share the CPU and both would
    record wrong times (and race on the same files)."""
    raw.mkdir(parents=True, exist_ok=True)
    lock = raw / ".report.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError as e:
            try:
                pid = int(lock.read_text().strip() or 0)
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # left by a run that died: take it over
                continue
            raise MespError(f"{lock}: another `mesp bench report` (pid {pid}) is measuring into {raw.parent}; "
                            "wait for it to finish") from e
    else:
        raise MespError(f"{lock}: could not take the report lock")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _measure(part: str, raw: Path, threads: int | None) -> dict:
    if part == "memory":
        result = {"runs": []}
        for run in (replace(run, threads=threads) for run in plan.report_memory_runs()):
            log.info("%s", run.command())
            result["runs"].append({"run": run.record(), "command": run.command(),
                                   "result": bench_memory(run.cases())})
        return result
    if part == "process":
        result = {"runs": []}
        for run in (replace(run, threads=threads) for run in plan.report_process_runs()):
            log.info("%s", run.command())
            result["runs"].append({"command": run.command(), "result": bench_process(run)})
        return result
    if part == "grads":
        return bench_grads(plan.REPORT_GRADS)
    result = bench_converge(plan.REPORT_CONVERGE)
    write_text(raw / "converge.csv", converge_csv(result))
    return result


def _draw_figures(out: Path, results: dict) -> dict:
    """The report's figures from the raw results: {name: path relative to OUT}."""
    figures = {}
    if results["memory"]:
        rows = [row for r in results["memory"]["runs"] for row in r["result"]["rows"] if not row.get("store_h")]
        by_model = [r for r in rows if r["seq_len"] == 256 and r["rank"] == 8]
        by_len = [r for r in rows if r["model"] == plan.REPORT_MODEL and r["rank"] == 8
                  and r["method"] in ("mebp", "mesp", PEER)]
        for name, selected, what in (("memory", by_model, "per model (T=256, r=8"),
                                     ("seq_len", by_len, f"against T ({plan.REPORT_MODEL}, r=8")):
            if not any("error" not in r for r in selected):
                continue
            plot_memory({"rows": selected}, out / f"{name}.png",
                        title=f"Peak memory of one training step above its start {what}, fp32)")
            figures[name] = f"{name}.png"
    if results["converge"]:
        plot_converge(results["converge"], out / "converge.png")
        figures["converge"] = "converge.png"
    return figures


def _bench_report(out: Path, raw: Path, measure: set, threads: int | None) -> Path:
    results = {}
    for part in PARTS:
        path = raw / f"{part}.json"
        if part in measure:
            started = time.perf_counter()
            result = _measure(part, raw, threads)
            result["seconds"] = time.perf_counter() - started
            write_json(path, result)
            results[part] = result
        elif path.is_file():
            results[part] = json.loads(path.read_text())
        else:
            results[part] = None
    figures = _draw_figures(out, results)
    text = render_report(results["memory"], results["grads"], results["converge"], figures, results["process"])
    # Measurements made with other commands than the bench plan (e.g. whole `mesp train` runs under
    # /usr/bin/time) are kept beside the raw results and appended as they are, each with its command.
    for extra in sorted(raw.glob("*.md")):
        text += "\n" + extra.read_text()
    md = out / "results.md"
    write_text(md, text)
    return md
