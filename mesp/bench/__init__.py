"""Benchmarks that turn the paper's claims into measurements on this machine.

    sweep      bench_memory: peak memory and step time of one training step per method, each configuration
               measured in a fresh subprocess (worker: `python -m mesp.bench.worker`)
    process    bench_process: the whole-process private-footprint peak of `mesp train` on a quantized base,
               each run a fresh `mesp train` process (the device's measure)
    fidelity   bench_grads: gradient error of mesp/mebp against autograd; MeZO's cosine
    frontier   bench_frontier: MeSP's step time under a range of memory budgets against MeBP's, in one process
    precision  bench_precision: one step in fp32 and in bf16 side by side, and what --dtype auto picks here
    converge   bench_converge: loss curves of mesp, mebp and mezo on the bundled demo data
    peers      bench_peers: mesp beside transformers + PEFT, torchtune and mlx-lm, each (tool, round) a fresh
               process sampled from outside (workers: mesp/bench/peer_workers, run by the peers' Python)
    rounds     time_alternating: the side-by-side timing frontier and precision share
    plots      plot_memory / plot_converge: PNG figures
    plan       what the report measures, and the paper's figures beside it
    report     bench_report: measure the plan and write docs/results.md (render: its text, from
               report_template.md)
    machine    machine_info: what the numbers were measured on

Each `mesp bench` subcommand has a settings dataclass (MemorySettings, ProcessSettings, GradsSettings,
ConvergeSettings, FrontierSettings, PeersSettings, PrecisionSettings, ReportSettings) from which the CLI's flags are generated.
"""

from .converge import ConvergeSettings, bench_converge, converge_csv
from .frontier import FrontierSettings, bench_frontier, frontier_table, plot_frontier
from .peers import PeersSettings, bench_peers, peers_markdown, peers_table, plot_peers
from .precision import PrecisionSettings, bench_precision, precision_table
from .fidelity import GradsSettings, bench_grads, grads_table, spsa_cosine_theory
from .machine import machine_info, machine_line
from .plots import plot_converge, plot_memory
from .process import ProcessCase, ProcessSettings, bench_process, process_table
from .render import render_report
from .report import ReportSettings, bench_report
from .sweep import PEER, MemoryCase, MemorySettings, bench_memory, measure_case, measure_here, memory_cases, \
    memory_table

__all__ = ["ConvergeSettings", "FrontierSettings", "GradsSettings", "MemoryCase", "MemorySettings", "PEER", "PeersSettings",
           "PrecisionSettings", "ProcessCase", "ProcessSettings", "ReportSettings", "bench_converge",
           "bench_frontier", "bench_grads", "bench_memory", "bench_peers", "bench_precision", "bench_process", "bench_report",
           "converge_csv", "frontier_table", "grads_table", "machine_info", "machine_line", "measure_case",
           "measure_here", "memory_cases", "memory_table", "peers_markdown", "peers_table", "plot_peers", "plot_converge", "plot_frontier", "plot_memory",
           "precision_table", "process_table", "render_report", "spsa_cosine_theory"]
