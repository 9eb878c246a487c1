"""docs/results.md from the raw results: the fixed text comes from report_template.md, this module computes
the numbers and table rows that fill it (each part reads "not measured yet" until it has been measured)."""

from __future__ import annotations

import re
import statistics
from functools import cache
from importlib import resources
from pathlib import Path
from string import Template

from ..memory import RUNTIME_FLOOR_LABEL, MiB, format_mib
from . import plan
from .machine import machine_line
from .sweep import PEER, MemorySettings, model_hf_config

BLOCK = re.compile(r"^<!-- block: (\w+) -->$", re.MULTILINE)


@cache
def _templates() -> dict[str, Template]:
    text = resources.files(__package__).joinpath("report_template.md").read_text(encoding="utf-8")
    parts = BLOCK.split(text)[1:]  # [name, body, name, body, ...] after the file's leading comment
    return {name: Template(body.strip("\n")) for name, body in zip(parts[::2], parts[1::2])}


def fill(block: str, **values) -> str:
    """The template block `block` with its $placeholders filled (KeyError names a placeholder left unfilled)."""
    return _templates()[block].substitute(**values)


def _ratio(new, old) -> str:
    return "—" if not new or not old else f"{new / old:.2f}x"


def _pct(new, old) -> str:
    return "—" if not new or not old else f"{100 * (1 - new / old):.0f}%"


def _find(rows, **want):
    for r in rows:
        if "error" not in r and all(r.get(k) == v for k, v in want.items()):
            return r
    return None


def _failed(rows, **want):
    return next((r for r in rows if "error" in r and all(r.get(k) == v for k, v in want.items())), None)


def _peak(rows, **want) -> str:
    r = _find(rows, **want)
    if r is not None:
        return format_mib(r["peak_bytes"])
    bad = _failed(rows, **want)
    return f"failed ({bad['error']})" if bad else "not measured"


def _secs(rows, **want) -> str:
    r = _find(rows, **want)
    return "—" if r is None or r["step_seconds"] is None else f"{r['step_seconds']:.1f}"


def _rss_pair(mebp, mesp) -> str:
    return f"{format_mib(mebp and mebp['peak_rss_bytes'])} / {format_mib(mesp and mesp['peak_rss_bytes'])}"


def _commands(runs) -> str:
    return "```\n" + "\n".join(r.command() for r in runs) + "\n```"


def _figure(block: str, figures: dict, name: str) -> str:
    return fill(block, path=figures[name]) if name in figures else ""


def render_report(memory: dict | None, grads: dict | None, converge: dict | None, figures: dict,
                  process: dict | None = None) -> str:
    """results.md from the raw results (each None when not measured yet); `figures` maps a figure's name
    (memory, seq_len, converge) to its path relative to results.md."""
    blocks = [fill("intro", machine=_machine_section(memory, grads, converge, process))]
    if memory:
        runs = [MemorySettings.from_record(r["run"]) for r in memory["runs"]]
        rows = [row for r in memory["runs"] for row in r["result"]["rows"]]
        blocks += [_headline_section(rows, runs[:1], figures), _table1_section(rows, runs[:2]),
                   _table2_section(rows, [runs[0], runs[2]], figures), _table3_section(rows, [runs[0], runs[3]]),
                   _ablation_section(rows, [r for r in runs if r.store_h] + runs[:2])]
    else:
        blocks.append(fill("memory_missing"))
    blocks.append(_process_section(process))
    blocks.append(_grads_section(grads))
    blocks.append(_converge_section(converge, figures))
    text = re.sub(r"\n{3,}", "\n\n", "\n\n".join(blocks))  # a block left out leaves no extra blank lines
    return text.rstrip() + "\n"


def _machine_section(memory, grads, converge, process=None) -> str:
    parts = [(f"memory: {r['command'].split(' --dtype')[0].removeprefix('mesp bench memory ')}",
              r["result"]["machine"]) for r in (memory or {}).get("runs", [])]
    parts += [("process: " + " ".join(r["command"].removeprefix("mesp bench process ").replace(" --json J", "")
                                      .split()), r["result"]["machine"]) for r in (process or {}).get("runs", [])]
    parts += [(name, x["machine"]) for name, x in (("grads", grads), ("converge", converge)) if x]
    if not parts:
        return ""
    when = "\n".join(f"- {name}: {m['date_utc']}, load average {m.get('load_average', ['?'])[0]}, "
                     f"{m['torch_threads']} torch threads" for name, m in parts)
    took = [f"{name} {x['seconds'] / 60:.0f} min" for name, x in (("memory", memory), ("process", process),
                                                                  ("grads", grads), ("converge", converge))
            if x and "seconds" in x]
    return fill("machine", machine=machine_line(parts[0][1]), parts=when,
                took=fill("took", took=", ".join(took)) if took else "")


def _headline_section(rows, runs, figures) -> str:
    key = dict(model=plan.REPORT_MODEL, seq_len=256, rank=8, store_h=False)
    mebp, mesp, peer = (_find(rows, method=m, **key) for m in ("mebp", "mesp", PEER))
    lines = []
    for method in ("autograd", "mebp", "mesp", "mezo", PEER):
        r = _find(rows, method=method, **key)
        if r is None:
            lines.append(f"| {method} | {_peak(rows, method=method, **key)} | | | | | | | | |")
            continue
        st = r["stage_peaks"]
        lines.append(f"| {method} | **{format_mib(r['peak_bytes'])}** | {format_mib(st.get('forward'))} | "
                     f"{format_mib(st.get('loss'))} | {format_mib(st.get('backward'))} | "
                     f"{format_mib(r['lora_grad_bytes'])} | {format_mib(r['weights_bytes'])} | "
                     f"{format_mib(r['peak_rss_bytes'])} | {_secs(rows, method=method, **key)} | "
                     f"{_ratio(r['peak_bytes'], mebp and mebp['peak_bytes'])} |")
    check = outside_loss = ""
    if mesp and mebp:
        checks = [f"MeSP/MeBP = {mesp['peak_bytes'] / mebp['peak_bytes']:.3f}"]
        ok = mesp["peak_bytes"] * 2 <= mebp["peak_bytes"]
        if peer:
            checks.append(f"MeSP/hf+peft(gc) = {mesp['peak_bytes'] / peer['peak_bytes']:.3f}")
            ok = ok and mesp["peak_bytes"] * 2 <= peer["peak_bytes"]
        timing = ""
        if mesp["step_seconds"] and mebp["step_seconds"]:
            paper = plan.PAPER_TABLE1.get(plan.REPORT_MODEL)
            paper_timing = "" if paper is None else " " + fill(
                "headline_timing_paper", mesp=paper["mesp"][1], mebp=paper["mebp"][1],
                ratio=f"{paper['mesp'][1] / paper['mebp'][1]:.2f}")
            timing = " " + fill("headline_timing", ratio=f"{mesp['step_seconds'] / mebp['step_seconds']:.2f}",
                                paper=paper_timing)
        check = fill("headline_check", checks=", ".join(checks), verdict="met" if ok else "NOT met", timing=timing)

        def outside(r):
            return max(v for k, v in r["stage_peaks"].items() if k != "loss")
        a, b = outside(mebp), outside(mesp)
        outside_loss = " " + fill("outside_loss_same" if a < 1.25 * b else "outside_loss", mebp=format_mib(a),
                                  mesp=format_mib(b))
    vocab = int(model_hf_config(plan.REPORT_MODEL)["vocab_size"])
    return fill("headline", model=plan.REPORT_MODEL, rows="\n".join(lines), check=check, vocab=f"{vocab:,}",
                logits_mib=format_mib(vocab * 256 * 4, 0), outside_loss=outside_loss, commands=_commands(runs),
                figure=_figure("headline_figure", figures, "memory"))


def _table1_section(rows, runs) -> str:
    lines, sums = [], [0, 0, 0, 0]
    for model, paper in plan.PAPER_TABLE1.items():
        key = dict(model=model, seq_len=256, rank=8, store_h=False)
        mebp, mesp = _find(rows, method="mebp", **key), _find(rows, method="mesp", **key)
        lines.append(f"| {model} | {_peak(rows, method='mebp', **key)} | {_peak(rows, method='mesp', **key)} | "
                     f"{_pct(mesp and mesp['peak_bytes'], mebp and mebp['peak_bytes'])} | "
                     f"{_peak(rows, method=PEER, **key)} | {_rss_pair(mebp, mesp)} | "
                     f"{_secs(rows, method='mebp', **key)} | {_secs(rows, method='mesp', **key)} | "
                     f"{paper['mebp'][0]} ({paper['mebp'][1]}) | {paper['mesp'][0]} ({paper['mesp'][1]}) | "
                     f"{_pct(paper['mesp'][0], paper['mebp'][0])} |")
        if mebp and mesp:
            sums[0] += mebp["peak_bytes"]
            sums[1] += mesp["peak_bytes"]
        sums[2] += paper["mebp"][0]
        sums[3] += paper["mesp"][0]
    return fill("table1", rows="\n".join(lines), ours=_pct(sums[1], sums[0]), paper=_pct(sums[3], sums[2]),
                commands=_commands(runs))


def _process_section(process) -> str:
    """Table 1 on the paper's own measure: the whole `mesp train` process's private-footprint peak."""
    if not process:
        return fill("process_missing")
    rows = [row for r in process["runs"] for row in r["result"]["rows"]]
    floor = next((r["result"].get("runtime_floor_bytes") for r in process["runs"]), None)

    def private(model, seq_len, method, offload=False):
        want = dict(model=model, seq_len=seq_len, method=method, offload_checkpoints=offload)
        r = _find(rows, **want)
        if r is not None:
            return r["private_peak_bytes"], format_mib(r["private_peak_bytes"])
        bad = _failed(rows, **want)
        return None, f"failed ({bad['error']})" if bad else "not measured"

    def verdict(value, target_mib):
        met = "—" if value is None else "met" if value <= target_mib * MiB else "NOT met"
        return f"{met} (target ≤ {target_mib} MiB)"

    lines = []
    for model, paper in plan.PAPER_TABLE1.items():
        (mesp, mesp_text), (mebp, mebp_text) = private(model, 256, "mesp"), private(model, 256, "mebp")
        ratio = "—" if not (mesp and mebp) else f"{mesp / mebp:.2f}"
        ratio_ok = "—" if ratio == "—" else ("met" if mesp <= plan.PROCESS_TARGET_RATIO * mebp else "NOT met")
        lines.append(f"| {model} | 256 | {mesp_text} | {mebp_text} | {ratio}{f' ({ratio_ok})' * (ratio != '—')} | "
                     f"{verdict(mesp, plan.PROCESS_TARGETS_MIB[(model, 256)])} | {paper['mesp'][0]:.0f} | "
                     f"{paper['mebp'][0]:.0f} | {_pct(paper['mesp'][0], paper['mebp'][0])} |")
    p = plan.PEER_3B_T1024
    long_value, long_text = private(p["model"], p["seq_len"], "mesp", offload=True)
    return fill("process", rows="\n".join(lines), floor=format_mib(floor), floor_label=RUNTIME_FLOOR_LABEL,
                ratio_target=f"{plan.PROCESS_TARGET_RATIO:g}", long_model=p["model"], long_seq_len=p["seq_len"],
                long_private=long_text + (" MiB" if long_value is not None else ""),
                long_verdict=verdict(long_value, plan.PROCESS_TARGETS_MIB[(p["model"], p["seq_len"])]),
                peer_source=p["source"], peer_exact=f"{p['exact_gb']:g}", peer_approx=f"{p['approximate_softmax_gb']:g}",
                commands="```\n" + "\n".join(r["command"] for r in process["runs"]) + "\n```")


def _sweep_section(rows, runs, paper, key_name, fixed, title, note, figure="") -> str:
    lines = []
    for value, (p_mebp, p_mesp) in paper.items():
        key = dict(model=plan.REPORT_MODEL, store_h=False, **fixed, **{key_name: value})
        mebp, mesp = _find(rows, method="mebp", **key), _find(rows, method="mesp", **key)
        lines.append(f"| {value} | {_peak(rows, method='mebp', **key)} | {_peak(rows, method='mesp', **key)} | "
                     f"{_pct(mesp and mesp['peak_bytes'], mebp and mebp['peak_bytes'])} | {_rss_pair(mebp, mesp)} | "
                     f"{p_mebp} | {p_mesp} | {_pct(p_mesp, p_mebp)} |")
    return fill("sweep", title=title, label="T" if key_name == "seq_len" else "r", rows="\n".join(lines), note=note,
                commands=_commands(runs), figure=figure)


def _table2_section(rows, runs, figures) -> str:
    hf = model_hf_config(plan.REPORT_MODEL)
    return _sweep_section(rows, runs, plan.PAPER_TABLE2, "seq_len", {"rank": 8},
                          fill("table2_title", model=plan.REPORT_MODEL),
                          fill("table2_note", layers=hf["num_hidden_layers"], hidden=hf["hidden_size"]),
                          _figure("table2_figure", figures, "seq_len"))


def _table3_section(rows, runs) -> str:
    grads = {r["rank"]: r["lora_grad_bytes"] for r in rows if "error" not in r and r["method"] == "mesp"
             and r["model"] == plan.REPORT_MODEL and r["seq_len"] == 256 and not r.get("store_h")}
    held = ", ".join(f"r={k}: {format_mib(v)} MiB" for k, v in sorted(grads.items()))
    return _sweep_section(rows, runs, plan.PAPER_TABLE3, "rank", {"seq_len": 256},
                          fill("table3_title", model=plan.REPORT_MODEL), fill("table3_note", held=held))


def _ablation_section(rows, runs) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows if r.get("store_h")))
    lines = [] if models else [fill("ablation_missing")]
    for model in models:
        key = dict(model=model, seq_len=256, rank=8)
        mebp, store, recompute = (dict(method="mebp", store_h=False, **key), dict(method="mesp", store_h=True, **key),
                                  dict(method="mesp", store_h=False, **key))
        lines.append(f"| {model} | {_peak(rows, **mebp)} | {_peak(rows, **store)} | {_peak(rows, **recompute)} | "
                     f"{_secs(rows, **mebp)} | {_secs(rows, **store)} | {_secs(rows, **recompute)} |")
    p = plan.PAPER_ABLATION
    return fill("ablation", rows="\n".join(lines), paper_model=p["model"], paper_mebp=p["mebp"][0],
                paper_store=p["store_h"][0], paper_recompute=p["recompute_h"][0], paper_mebp_s=p["mebp"][1],
                paper_store_s=p["store_h"][1], paper_recompute_s=p["recompute_h"][1], commands=_commands(runs))


def _grads_section(grads) -> str:
    if not grads:
        return fill("grads_missing")
    error_rows = [f"| {r['model']} | {r['seq_len']} | {r['lora_parameters']:,} | {r['mesp']['max_rel_error']:.1e} | "
                  f"{r['mesp']['median_rel_error']:.1e} | {r['mebp']['max_rel_error']:.1e} | "
                  f"{r['mebp']['median_rel_error']:.1e} | {r['mesp']['loss_abs_diff']:.1e} |" for r in grads["rows"]]
    fp64_rows = []
    for r in grads["rows"]:
        cells = [f"{r[m]['max_rel_error_vs_fp64']:.1e} / {r[m]['median_rel_error_vs_fp64']:.1e}"
                 for m in ("autograd", "mebp", "mesp")]
        fp64_rows.append(f"| {r['model']} | {' | '.join(cells)} |")
    mezo_rows = [f"| {r['model']} | {r['lora_parameters']:,} | {z['n_directions']} | {z['trials']} | "
                 f"{z['cosine_mean']:.2e} | {z['theory']:.2e} |" for r in grads["rows"] for z in r["mezo"]]
    g = plan.REPORT_GRADS
    command = (f"mesp bench grads --models {','.join(g.models)} --seq-len {g.seq_len} --rank {g.rank} "
               f"--directions {','.join(map(str, g.directions))} --trials {g.trials} "
               f"--threads {grads['machine']['torch_threads']}")
    return fill("grads", error_rows="\n".join(error_rows), fp64_rows="\n".join(fp64_rows),
                eps=f"{grads['rows'][0]['eps']:g}", paper_cosine=plan.PAPER_MEZO_COSINE,
                mezo_rows="\n".join(mezo_rows), command=command)


def _converge_section(converge, figures) -> str:
    if not converge:
        return fill("converge_missing")
    s = converge["settings"]
    lines = []
    for method in dict.fromkeys(r["method"] for r in converge["rows"]):
        rows = [r for r in converge["rows"] if r["method"] == method]
        valid = [r["valid_loss"] for r in rows if r["valid_loss"] is not None]
        lines.append(f"| {method} | {rows[-1]['step']} | {rows[0]['loss']:.4f} | {rows[-1]['loss']:.4f} | "
                     f"{f'{valid[-1]:.4f}' if valid else '—'} | "
                     f"{statistics.median(r['seconds'] for r in rows):.2f} |")
    mesp = [r["loss"] for r in converge["rows"] if r["method"] == "mesp"]
    mebp = [r["loss"] for r in converge["rows"] if r["method"] == "mebp"]
    equal = "" if not (mesp and mebp) else fill(
        "converge_equal", diff=f"{max(abs(a - b) for a, b in zip(mesp, mebp)):.1e}")
    command = (f"mesp bench converge --steps {s['steps']} --mezo-factor {s['mezo_steps'] // s['steps']} "
               f"--batch-size {s['batch_size']} --threads {converge['machine']['torch_threads']} "
               "--csv docs/results/converge.csv --plot docs/converge.png")
    return fill("converge", train_file=Path(s["train_file"]).name,
                valid_file=Path(s["valid_file"]).name if s["valid_file"] else "none", model=s["model"],
                rank=s["rank"], alpha=f"{s['alpha']:g}", batch_size=s["batch_size"], seq_len=s["seq_len"],
                steps=s["steps"], lr=f"{s['lr']:g}", warmup=s["warmup"], mezo_steps=s["mezo_steps"],
                mezo_lr=f"{s['mezo_lr']:g}", rows="\n".join(lines), equal=equal,
                figure=_figure("converge_figure", figures, "converge"), command=command)
