"""`mesp bench`'s command line (registered by mesp.cli, which prints only through here and its own module): one
subcommand per benchmark, its flags generated from the benchmark's settings dataclass."""

from __future__ import annotations

import argparse

import torch

from .. import bench
from ..errors import MespError
from ..fileio import write_json, write_text
from ..settings import add_arguments, given

BENCH_COMMANDS = {  # name -> (settings class, whose fields are the flags; help; description)
    "memory": (bench.MemorySettings, "peak memory and time of one training step per method and configuration",
               "One training step per method and configuration, each in a fresh process: allocator-level peak "
               "above the step's start (split by stage), resident weights, process peak RSS, median step time "
               "(unprofiled)."),
    "process": (bench.ProcessSettings, "whole-process private-footprint peak of mesp train on a quantized base",
                "Quantize each model once (mesp quantize, kept in --work), then train each (T, method) for a few SGD "
                "steps at batch 1 in a fresh mesp train process, the base streamed from the file, and report the "
                "private-footprint peak that process measured (RssAnon + VmSwap + RssShmem, sampled), beside the "
                "runtime floor of Python + torch."),
    "grads": (bench.GradsSettings, "gradient error of mesp/mebp vs autograd; MeZO's cosine with the truth",
              "Per-tensor relative error of mesp and mebp against autograd (fp32, random non-zero lora_B), and the "
              "cosine of MeZO's estimate with the true gradient for n directions beside the theory sqrt(2/(pi d))."),
    "converge": (bench.ConvergeSettings, "loss curves of mesp, mebp and mezo on the demo data (CSV + PNG)",
                 "Train mesp and mebp for --steps steps and mezo for --mezo-factor times as many, with mesp.train "
                 "on the bundled demo data and the shipped model (demo settings)."),
    "frontier": (bench.FrontierSettings, "MeSP under a range of memory budgets vs MeBP: peak and step time",
                 "In one process: MeBP's step, then MeSP's under each budget (the --memory-budget planner on the "
                 "step's allocator peak), each plan's measured peak, all timed in alternating rounds; the default "
                 "budgets end at MeBP's own peak."),
    "precision": (bench.PrecisionSettings, "one step in fp32 and in bf16, side by side, and what --dtype auto picks",
                  "Load the model in fp32 and in bf16, alternate their training steps round by round and report "
                  "each one's minimum time, the bf16 speed-up and what --dtype auto picks on this CPU."),
    "peers": (bench.PeersSettings, "mesp beside transformers+PEFT, torchtune and mlx-lm: whole process, speed, loss",
              "The same work for every tool (one fp32 HF model directory, the same pre-tokenized samples in the same "
              "order, one initial LoRA adapter), each (tool, round) in a fresh process sampled from outside "
              "(private footprint and RSS peaks), rounds in alternating order: each tool's minimum median step "
              "time, tokens per second and the loss of every step. torchtune and mlx-lm run with "
              ".peers/bin/python (scripts/dev.sh peers builds it), transformers + PEFT with this Python."),
    "report": (bench.ReportSettings, "measure everything and write docs/results.md (under an hour on 2 cores)",
               "Run every benchmark of the report and write results.md, its figures and raw JSON/CSV into --out."),
}


def bench_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_command", required=True)
    for name, (settings_class, help_text, description) in BENCH_COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=description), settings_class)


def _write_outputs(settings, result, plot=None, csv_text=None) -> None:
    if getattr(settings, "json", None):
        write_json(settings.json, result)
        print(f"wrote {settings.json}")
    if getattr(settings, "plot", None) and plot is not None:
        plot(result, settings.plot)
        print(f"wrote {settings.plot}")
    if getattr(settings, "csv", None) and csv_text is not None:
        write_text(settings.csv, csv_text)
        print(f"wrote {settings.csv}")


def bench_run(args) -> int:
    cls = BENCH_COMMANDS[args.bench_command][0]
    s = cls(**given(cls, args))
    if s.threads is not None:
        if s.threads < 1:
            raise MespError(f"--threads: must be a positive integer, got {s.threads}")
        if args.bench_command not in ("memory", "process", "peers"):  # these set it in each fresh process
            torch.set_num_threads(s.threads)
    if args.bench_command == "memory":
        result = bench.bench_memory(s.cases(), progress=True, timeout=s.timeout)
        print(bench.memory_table(result))
        _write_outputs(s, result, plot=bench.plot_memory)
    elif args.bench_command == "process":
        result = bench.bench_process(s)
        print(bench.process_table(result))
        _write_outputs(s, result)
    elif args.bench_command == "grads":
        result = bench.bench_grads(s)
        print(bench.grads_table(result))
        _write_outputs(s, result)
    elif args.bench_command == "converge":
        result = bench.bench_converge(s)
        last = {r["method"]: r for r in result["rows"]}
        for method, r in last.items():
            print(f"{method}: {r['step']} steps, final loss {r['loss']:.4f}")
        _write_outputs(s, result, plot=bench.plot_converge, csv_text=bench.converge_csv(result))
    elif args.bench_command == "frontier":
        result = bench.bench_frontier(s)
        print(bench.frontier_table(result))
        _write_outputs(s, result, plot=bench.plot_frontier)
    elif args.bench_command == "precision":
        result = bench.bench_precision(s)
        print(bench.precision_table(result))
        _write_outputs(s, result)
    elif args.bench_command == "peers":
        result = bench.bench_peers(s)
        print(bench.peers_table(result))
        _write_outputs(s, result, plot=bench.plot_peers)
    else:
        path = bench.bench_report(s)
        print(f"wrote {path}")
    return 0
