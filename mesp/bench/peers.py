"""`mesp bench peers`: mesp beside the tools users would pick instead, on the same work, whole process.

The work is written once into WORK and read by every tool: a Hugging Face directory of the model (config.json +
model.safetensors, fp32), N_SAMPLES pre-tokenized samples per sequence length, the order mesp train takes them
in (mesp.data.MicroBatchStream, so every tool sees the same sample at the same step), and one initial LoRA
adapter in PEFT format (mesp's own init for --seed, which `mesp train --seed` reproduces), so the exact tools'
losses agree step by step. Each (tool, round) runs in a fresh process of its own: the peers as the small
scripts of mesp/bench/peer_workers with the peers environment's Python (.peers/, `scripts/dev.sh peers`), mesp
as `mesp train`. Every process is sampled from outside by mesp.memory.ProcessSampler, the same way for each
tool (private footprint = RssAnon + VmSwap + RssShmem, and VmRSS, of the process and its children, loading
included). Rounds alternate the tools' order; a tool's step time is the minimum over rounds of the median of
its timed steps (the first step of each process is an untimed warm-up).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import hugepages
from ..data import MicroBatchStream, load_data
from ..errors import MespError
from ..fileio import write_json, write_text
from ..formats.safetensors import write_safetensors
from ..loaders import load_model
from ..lora import LoraConfig, add_lora, save_adapter
from ..memory import RUNTIME_FLOOR_LABEL, MiB, ProcessSampler, format_mib, runtime_floor_bytes
from ..precision import auto_dtype
from ..settings import setting
from ..tokenizer import load_tokenizer
from .machine import machine_info

log = logging.getLogger(__name__)

WORKERS = Path(__file__).parent / "peer_workers"
PEERS_PYTHON = Path(".peers/bin/python")  # built by scripts/dev.sh peers
N_SAMPLES = 8


@dataclass(frozen=True)
class Tool:
    """One tool and setting of the table. `worker`: the peer_workers script (None: mesp train); `module`: what
    the peers' Python must import for it to run; `options`: the worker's spec additions, or mesp train's extra
    arguments; `exact`: its gradient is the true one (its losses must agree with mesp's)."""
    name: str
    worker: str | None
    module: str | None = None
    options: dict = field(default_factory=dict)
    exact: bool = True
    precision: str = "fp32"


TOOLS = {t.name: t for t in (
    Tool("hf+peft", "hf_peft.py", "peft"),
    Tool("hf+peft(gc)", "hf_peft.py", "peft", {"gradient_checkpointing": True}),
    Tool("torchtune", "torchtune_lora.py", "torchtune"),
    Tool("torchtune(ac)", "torchtune_lora.py", "torchtune", {"activation_checkpointing": True}),
    Tool("mlx-lm", "mlx_lm_lora.py", "mlx_lm"),
    Tool("mlx-lm(gc)", "mlx_lm_lora.py", "mlx_lm", {"grad_checkpoint": True}),
    Tool("mlx-lm 4-bit", "mlx_lm_lora.py", "mlx_lm", {"bits": 4}, exact=False, precision="4-bit"),
    Tool("mlx-lm 4-bit(gc)", "mlx_lm_lora.py", "mlx_lm", {"bits": 4, "grad_checkpoint": True}, exact=False,
         precision="4-bit"),
    Tool("mesp", None, options={"args": ["--dtype", "float32"]}),
    Tool("mesp(budget)", None, options={"args": ["--dtype", "float32"], "budget": True}),
    Tool("mesp bf16", None, options={"args": ["--dtype", "auto"], "auto_bf16": True}, exact=False, precision="bf16"),
    Tool("mesp 4-bit", None, options={"args": ["--dtype", "float32", "--quantize", "int4"]}, exact=False,
         precision="4-bit"),
    # the shared model as a q4_0 GGUF (mesp quantize), which mesp train streams: its pages are the file's
    Tool("mesp q4_0 streamed", None, options={"args": ["--dtype", "float32"], "gguf": "q4_0"}, exact=False,
         precision="4-bit"),
)}
DEFAULT_TOOLS = list(TOOLS)
BUDGETS = ("smallest", "fastest")  # the full-precision peers whose private peak a budgeted mesp run gets


@dataclass
class PeersSettings:
    """`mesp bench peers`: mesp and the tools users would pick instead, each in its own process, side by side."""
    model: str = setting("qwen2.5-0.5b", "preset or HF directory (written once as an fp32 HF directory in --work)")
    seq_lens: list[int] = setting(factory=lambda: [256], help="comma-separated sequence lengths")
    tools: list[str] = setting(factory=lambda: list(DEFAULT_TOOLS), help="comma-separated: " + ", ".join(TOOLS))
    rounds: int = setting(3, "rounds; each runs every tool once, in alternating order")
    steps: int = setting(5, "timed steps per process, after one warm-up step")
    rank: int = setting(8, "LoRA rank (all seven projections)")
    alpha: float = setting(16.0, "LoRA alpha")
    optimizer: str = setting("sgd", "optimizer of every tool", choices=("sgd", "adamw"))
    lr: float = setting(1e-4, "learning rate (constant)")
    seed: int = setting(0, "random weights, samples and the initial adapter")
    data: str | None = setting(None, "a data file mesp train reads (e.g. the demo's chat JSONL): tokenized with "
                                     "the model's tokenizer and packed into the samples (labels = input_ids)",
                               default_text="default: random token ids")
    budgets: list[str] = setting(factory=lambda: list(BUDGETS),
                                 help="mesp(budget)'s --memory-budget: the private peak of the smallest or the "
                                      "fastest full-precision exact peer (measured in the first round), or MiB")
    threads: int = setting(1, "threads of every tool")
    peers_python: str | None = setting(None, "Python of the peers environment",
                                       default_text="default: .peers/bin/python (hf+peft: this Python)")
    work: str = setting("runs/bench-peers", "directory of the shared model, samples, adapter and the runs")
    timeout: float | None = setting(None, "seconds allowed per process")
    json: str | None = setting(None, "write the rows, the machine and the commands as JSON here")
    plot: str | None = setting(None, "write the private-peak vs step-time figure (PNG) here")

    def check(self) -> None:
        unknown = [t for t in self.tools if t not in TOOLS]
        if unknown or not self.tools:
            raise MespError(f"tools: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(TOOLS)}")
        for name, values in (("seq-lens", self.seq_lens), ("rounds", [self.rounds]), ("steps", [self.steps]),
                             ("rank", [self.rank]), ("threads", [self.threads])):
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise MespError(f"{name}: must be integers >= 1, got {values!r}")
        for b in self.budgets:
            if b not in BUDGETS and not _is_number(b):
                raise MespError(f"budgets: {b!r} is neither {' nor '.join(BUDGETS)} nor a number of MiB")

    def command(self) -> str:
        """The `mesp bench peers` command line of these settings (outputs left out)."""
        return " ".join(["mesp bench peers", f"--model {self.model}", "--seq-lens " + ",".join(map(str, self.seq_lens)),
                         "--tools " + ",".join(self.tools), f"--rounds {self.rounds}", f"--steps {self.steps}",
                         f"--rank {self.rank}", f"--optimizer {self.optimizer}", f"--lr {self.lr:g}",
                         f"--threads {self.threads}", *([f"--data {self.data}"] if self.data else [])])


def _is_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


# ---- the shared work ---------------------------------------------------------------------------------------

def _slug(source: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(source).name or source)


def shared_model(s: PeersSettings, work: Path) -> tuple[Path, Path]:
    """(HF directory, initial adapter directory) in WORK, written once: the model's fp32 weights as one
    safetensors file (a GGUF's quantized blocks dequantized: every tool trains the same dense weights), and
    mesp's LoRA init for --seed in PEFT format."""
    hf_dir = work / "models" / _slug(s.model)
    adapter = work / "adapters" / f"{_slug(s.model)}-r{s.rank}-a{s.alpha:g}-seed{s.seed}"
    if (hf_dir / "model.safetensors").is_file() and (adapter / "adapter_model.safetensors").is_file():
        return hf_dir, adapter
    model = load_model(s.model, dtype=torch.float32)
    if not (hf_dir / "model.safetensors").is_file():
        hf = model.config.to_hf()
        hf["torch_dtype"] = "float32"
        tensors = {}
        for name, w in model.base_weights():
            if name == "lm_head.weight" and hf.get("tie_word_embeddings"):
                continue
            tensors[name] = (w if isinstance(w, torch.Tensor) else w.dequantize(torch.float32)).contiguous()
        write_safetensors(hf_dir / "model.safetensors", tensors, metadata={"format": "pt"})
        write_json(hf_dir / "config.json", hf)
        del tensors
    add_lora(model, LoraConfig(r=s.rank, alpha=s.alpha), seed=s.seed)
    model.source = str(hf_dir)
    save_adapter(model, adapter)
    return hf_dir, adapter


def shared_tokens(s: PeersSettings, vocab: int, seq_len: int, work: Path) -> Path:
    """WORK/data/tokens-VOCAB-T-seedS.jsonl: N_SAMPLES sequences of seq_len random ids (no tokenizer needed:
    speed and memory do not depend on the values, and the losses are compared tool against tool); with s.data,
    WORK/data/tokens-DATA-T.jsonl: packed_tokens of that file."""
    if s.data:
        path = work / "data" / f"tokens-{_slug(s.data)}-{_slug(s.model)}-{seq_len}.jsonl"
        rows = None if path.is_file() else packed_tokens(s.data, s.model, seq_len)
    else:
        path = work / "data" / f"tokens-{vocab}-{seq_len}-seed{s.seed}.jsonl"
        g = torch.Generator().manual_seed(s.seed * 7919 + seq_len)
        rows = None if path.is_file() else torch.randint(0, vocab, (N_SAMPLES, seq_len), generator=g).tolist()
    if rows is not None:
        write_text(path, "".join(json.dumps({"input_ids": row}) + "\n" for row in rows))
    return path


def packed_tokens(data: str, model: str, seq_len: int) -> list[list[int]]:
    """N_SAMPLES windows of seq_len tokens: data's samples as mesp train tokenizes them (chat template and all),
    in file order, end to end (from the first again when the file runs out), every token a target: the same
    sequences for every tool, since the peers read pre-tokenized samples only."""
    samples = load_data(data, get_tokenizer=lambda: load_tokenizer(model)).samples
    stream = itertools.cycle(itertools.chain.from_iterable(s.input_ids.tolist() for s in samples))
    return [list(itertools.islice(stream, seq_len)) for _ in range(N_SAMPLES)]


def sample_order(n_steps: int, seed: int) -> list[int]:
    """The sample of each step, batch 1, in the order `mesp train --seed SEED` takes them."""
    stream = MicroBatchStream(N_SAMPLES, 1, seed)
    return [stream.indices(m)[0] for m in range(n_steps)]


# ---- one process -------------------------------------------------------------------------------------------

def peers_python(s: PeersSettings) -> Path | None:
    """The peers environment's Python, or None when there is none."""
    if s.peers_python:
        return Path(s.peers_python)
    return PEERS_PYTHON.absolute() if PEERS_PYTHON.is_file() else None


def tool_python(tool: Tool, s: PeersSettings) -> tuple[str | None, str | None]:
    """(the Python that runs `tool`, or None; why not, or None). hf+peft runs with this Python, the other peers
    with the peers environment's."""
    if tool.worker is None:
        return sys.executable, None
    # transformers + PEFT run with mesp's own Python (the same pins, in the test extra): PEFT refuses to import
    # beside the older torchao that torchtune needs in the peers environment
    candidates = [Path(sys.executable)] if tool.module == "peft" else [peers_python(s)]
    for python in filter(None, candidates):
        probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({tool.module!r}) is None)"
        if python.is_file() and subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0:
            return str(python), None
    return None, f"{tool.module} is not installed (scripts/dev.sh peers builds .peers/)"


def _child_env(threads: int) -> dict:
    env = dict(os.environ)
    if hugepages.set_here:  # the peers run as their users run them; a mesp child sets it again itself
        env.pop(hugepages.VARIABLE, None)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def run_sampled(argv: list[str], env: dict, timeout: float | None, log_path: Path) -> dict:
    """Run argv in a fresh process sampled from outside; {"private_peak_bytes", "rss_peak_bytes", "samples",
    "wall_s"} or {"error"} (the last line of its output). The child is killed on timeout or Ctrl-C."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            with ProcessSampler(proc.pid) as sampler:
                rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return {"error": f"timed out after {timeout:.0f} s"}
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    result = {**sampler.summary(), "wall_s": time.perf_counter() - started}
    if rc != 0:
        tail = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
        why = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
        return {**result, "error": f"{why}: {(tail or [''])[-1][:300]}"}
    return result


def mlx_quantized(python: str, spec: dict, bits: int, timeout: float | None) -> Path:
    """The mlx-lm copy of the shared model quantized to `bits` (what `mlx_lm convert -q` writes), made once
    beside it by the mlx worker in a process of its own (not measured)."""
    out = Path(spec["model_dir"] + f"-mlx-q{bits}")
    if not (out / "config.json").is_file():
        convert = {**spec, "bits": bits, "convert_to": str(out), "out": ""}
        spec_path = out.with_name(out.name + ".spec.json")
        write_json(spec_path, convert)
        got = run_sampled([python, str(WORKERS / "mlx_lm_lora.py"), str(spec_path)], _child_env(spec["threads"]),
                          timeout, out.with_name(out.name + ".log"))
        if "error" in got:
            raise MespError(f"mlx-lm {bits}-bit conversion: {got['error']}")
    return out


def run_peer(tool: Tool, python: str, spec: dict, run: Path, timeout: float | None) -> dict:
    """One peer worker process: its sampled memory, per-step losses and seconds."""
    run.mkdir(parents=True, exist_ok=True)
    spec = {**spec, **tool.options, "out": str(run / "result.json")}
    if tool.options.get("bits"):
        try:
            spec["mlx_model_dir"] = str(mlx_quantized(python, spec, tool.options["bits"], timeout))
        except MespError as e:
            return {"error": str(e)}
    write_json(run / "spec.json", spec)
    Path(spec["out"]).unlink(missing_ok=True)
    argv = [python, str(WORKERS / tool.worker), str(run / "spec.json")]
    row = run_sampled(argv, _child_env(spec["threads"]), timeout, run / "output.log")
    row["command"] = " ".join([Path(python).name, f"mesp/bench/peer_workers/{tool.worker}", "SPEC.json"])
    if "error" in row:
        return row
    result = json.loads(Path(spec["out"]).read_text())
    return {**row, "losses": result["losses"], "seconds": result["seconds"], "version": result["version"]}


def shared_gguf(model_dir: str, to: str) -> Path:
    """The shared model as a GGUF file of `to` blocks beside it (mesp quantize), written once (not measured)."""
    from ..quantize import quantize_model

    out = Path(f"{model_dir}-{to}.gguf")
    if not out.is_file():
        quantize_model(model_dir, to, out)
    return out


def mesp_train_args(tool: Tool, spec: dict, budget_mib: float | None, run: Path) -> list[str]:
    """`mesp train`'s arguments for the same work as the peers' spec."""
    model = str(shared_gguf(spec["model_dir"], tool.options["gguf"])) if tool.options.get("gguf") else spec["model_dir"]
    args = ["train", "--model", model, "--data", spec["tokens"], "--seq-len", str(spec["seq_len"]),
            "--rank", str(spec["rank"]), "--alpha", f"{spec['alpha']:g}", "--batch-size", "1",
            "--optimizer", spec["optimizer"], "--lr", f"{spec['lr']:g}", "--schedule", "constant",
            "--steps", str(len(spec["order"])), "--seed", str(spec["seed"]), "--out", str(run / "out"),
            "--overwrite", *tool.options["args"]]
    if budget_mib is not None:
        args += ["--memory-budget", f"{budget_mib:.0f}"]
    return args


def run_mesp(tool: Tool, spec: dict, budget_mib: float | None, run: Path, timeout: float | None) -> dict:
    """One `mesp train` process: its sampled memory, and the losses and seconds of its metrics.jsonl."""
    args = mesp_train_args(tool, spec, budget_mib, run)
    row = run_sampled([sys.executable, "-m", "mesp.cli", *args], _child_env(spec["threads"]), timeout,
                      run / "output.log")
    row["command"] = "mesp " + " ".join(args)
    if budget_mib is not None:
        row["memory_budget_mib"] = round(budget_mib)
    if "error" in row:
        return row
    steps = [json.loads(line) for line in (run / "out" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {**row, "losses": [m["loss"] for m in steps], "seconds": [m["seconds"] for m in steps],
            "version": "mesp"}


# ---- the benchmark -----------------------------------------------------------------------------------------

def round_order(names: list[str], r: int) -> list[str]:
    """Round r's order: peers first in round 0 (the budgeted mesp runs need their peaks), then rotated by r."""
    first = [n for n in names if not TOOLS[n].options.get("budget")] + \
            [n for n in names if TOOLS[n].options.get("budget")]
    k = r % len(first)
    return first[k:] + first[:k]


def resolve_budgets(s: PeersSettings, rows: list[dict]) -> dict[str, float]:
    """budget label -> MiB, from the full-precision exact peers measured so far ("smallest": the lowest
    private peak; "fastest": the private peak of the fastest)."""
    peers = [r for r in rows if TOOLS[r["tool"]].worker and TOOLS[r["tool"]].exact and r.get("private_peak_bytes")
             and r.get("step_seconds")]
    out = {}
    for b in s.budgets:
        if _is_number(b):
            out[f"{float(b):g} MiB"] = float(b)
        elif peers:
            pick = (min(peers, key=lambda r: r["private_peak_bytes"]) if b == "smallest"
                    else min(peers, key=lambda r: r["step_seconds"]))
            out[f"{b}: {pick['tool']}"] = pick["private_peak_bytes"] / MiB
    return out


def summarize(row: dict) -> dict:
    """A row's figures over its rounds: memory peaks (the highest round: what a device must fit), step time (the
    lowest round median of the timed steps), tokens per second, the first good round's losses."""
    good = [r for r in row["rounds"] if "error" not in r]
    if not good:
        return {**row, "error": row["rounds"][0]["error"] if row["rounds"] else "not run"}
    medians = [statistics.median(r["seconds"][1:] or r["seconds"]) for r in good]
    step = min(medians)
    return {**row, "private_peak_bytes": max(r["private_peak_bytes"] or 0 for r in good) or None,
            "rss_peak_bytes": max(r["rss_peak_bytes"] or 0 for r in good) or None, "step_seconds": step,
            "round_medians": medians, "tokens_per_s": row["seq_len"] / step, "losses": good[0]["losses"],
            "command": good[0]["command"], "version": good[0]["version"],
            **({"memory_budget_mib": good[0]["memory_budget_mib"]} if "memory_budget_mib" in good[0] else {})}


def compare_losses(rows: list[dict]) -> None:
    """Each row's largest |loss - mesp's loss| over the steps both ran (same T), in place."""
    for r in rows:
        ref = next((m for m in rows if m["tool"] == "mesp" and m["seq_len"] == r["seq_len"] and m.get("losses")),
                   None)
        if ref is not None and r.get("losses"):
            n = min(len(ref["losses"]), len(r["losses"]))
            r["loss_max_abs_diff"] = max(abs(a - b) for a, b in zip(r["losses"][:n], ref["losses"][:n]))


def bench_peers(s: PeersSettings, progress: bool = True) -> dict:
    """Run every tool of `s` for `s.rounds` rounds at every sequence length, each (tool, round) a fresh
    process. {"rows", "machine", "settings", "command", "runtime_floor_bytes", "runtime_floor_label", "complete"};
    with s.json, the rows so far are written there after every run ("complete": false until the end)."""
    from tqdm import tqdm

    s.check()
    work = Path(s.work).absolute()
    machine = machine_info()
    machine["torch_threads"] = s.threads
    hf_dir, adapter = shared_model(s, work)
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    order = sample_order(1 + s.steps, s.seed)
    pythons = {n: tool_python(TOOLS[n], s) for n in s.tools}
    runnable = [n for n in s.tools if pythons[n][0] is not None]
    if "mesp bf16" in runnable and auto_dtype("cpu") != "bfloat16":
        runnable.remove("mesp bf16")
        pythons["mesp bf16"] = (None, "--dtype auto picks float32 on this CPU (no native bf16)")
    rows = []

    def result(done: list[dict]) -> dict:
        return {"rows": done, "machine": machine, "settings": asdict(s), "command": s.command(),
                "runtime_floor_bytes": runtime_floor_bytes(), "runtime_floor_label": RUNTIME_FLOOR_LABEL}

    bar = tqdm(total=len(s.seq_lens) * s.rounds * len(runnable), desc="bench peers", unit="run",
               disable=not progress, file=sys.stderr)
    for T in s.seq_lens:
        spec = {"model_dir": str(hf_dir), "tokens": str(shared_tokens(s, vocab, T, work)), "order": order,
                "adapter": str(adapter), "rank": s.rank, "alpha": s.alpha, "optimizer": s.optimizer, "lr": s.lr,
                "seed": s.seed, "threads": s.threads, "seq_len": T}
        by_key: dict[tuple, dict] = {}
        budgets: dict[str, float] | None = None
        for r in range(s.rounds):
            for name in round_order(runnable, r):
                tool = TOOLS[name]
                if tool.options.get("budget") and budgets is None:
                    budgets = resolve_budgets(s, [summarize(x) for x in by_key.values()])
                for label, mib in (budgets.items() if tool.options.get("budget") else [(None, None)]):
                    key = (name, label)
                    bar.set_postfix_str(f"T={T} {name}{' ' + label if label else ''} round {r + 1}")
                    run = work / "runs" / f"T{T}" / f"{name}{'-' + label if label else ''}".replace(" ", "_") \
                        .replace(":", "").replace("(", "-").replace(")", "") / f"round{r + 1}"
                    if tool.worker:
                        got = run_peer(tool, pythons[name][0], spec, run, s.timeout)
                    else:
                        got = run_mesp(tool, spec, mib, run, s.timeout)
                    if "error" in got:
                        log.warning("T=%d %s round %d: %s", T, name, r + 1, got["error"])
                    row = by_key.setdefault(key, {"tool": name, "budget": label, "seq_len": T,
                                                  "precision": tool.precision, "exact": tool.exact, "rounds": []})
                    row["rounds"].append(got)
                    if s.json:  # a benchmark stopped or killed part way keeps every run it finished
                        partial = rows + [summarize(x) for x in by_key.values()]
                        compare_losses(partial)
                        write_json(s.json, {**result(partial), "complete": False})
                bar.update()
        summarized = [summarize(x) for x in by_key.values()]
        compare_losses(summarized)
        rows += summarized
        rows += [{"tool": n, "budget": None, "seq_len": T, "precision": TOOLS[n].precision, "exact": TOOLS[n].exact,
                  "rounds": [], "error": f"not run: {pythons[n][1]}"} for n in s.tools if n not in runnable]
    bar.close()
    return {**result(rows), "complete": True}


# ---- what it shows -----------------------------------------------------------------------------------------

def row_label(r: dict) -> str:
    return r["tool"] + (f" [{r['budget']}]" if r.get("budget") else "")


def _ratio(a, b) -> str:
    return "—" if not a or not b else f"{a / b:.2f}x"


def peers_table_rows(result: dict) -> list[tuple]:
    """The table as rows of strings: a header, then one row per (T, tool, budget)."""
    head = ("T", "tool", "private peak MiB", "RSS peak MiB", "step s (min)", "tokens/s", "step vs mesp",
            "private vs mesp", "max |Δloss| vs mesp", "losses")
    lines = [head]
    for r in result["rows"]:
        if "error" in r:
            lines.append((r["seq_len"], row_label(r), *["—"] * (len(head) - 3), "failed: " + r["error"]))
            continue
        ref = next((m for m in result["rows"] if m["tool"] == "mesp" and m["seq_len"] == r["seq_len"]
                    and "error" not in m), None)
        diff = r.get("loss_max_abs_diff")
        lines.append((r["seq_len"], row_label(r), format_mib(r["private_peak_bytes"]), format_mib(r["rss_peak_bytes"]),
                      f"{r['step_seconds']:.2f}", f"{r['tokens_per_s']:.1f}",
                      _ratio(r["step_seconds"], ref and ref["step_seconds"]),
                      _ratio(r["private_peak_bytes"], ref and ref["private_peak_bytes"]),
                      "—" if diff is None else f"{diff:.1e}", " ".join(f"{x:.4f}" for x in r["losses"])))
    return lines


def peers_table(result: dict) -> str:
    """A plain-text table of a bench_peers result (what the CLI prints), with the runtime floor named."""
    lines = peers_table_rows(result)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
    text = "\n".join("  ".join(str(c).ljust(w) if i in (1, 9) else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(line, widths))).rstrip() for line in lines)
    return text + f"\n{result.get('runtime_floor_label', RUNTIME_FLOOR_LABEL)}: " \
                  f"{format_mib(result.get('runtime_floor_bytes'))} MiB"


def peers_markdown(result: dict) -> str:
    """The table in Markdown (docs/results.md's peers section)."""
    lines = peers_table_rows(result)
    out = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines[1:]]
    return "\n".join(out)


def plot_peers(result: dict, path) -> None:
    """Private peak against step time, one point per tool and setting (and one panel per sequence length)."""
    from .plots import _pyplot, save_figure

    plt = _pyplot()
    lens = list(dict.fromkeys(r["seq_len"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(lens), figsize=(6.2 * len(lens), 4.6), squeeze=False)
    for ax, T in zip(axes[0], lens):
        rows = [r for r in result["rows"] if r["seq_len"] == T and "error" not in r and r["private_peak_bytes"]]
        for r in rows:
            mesp = r["tool"].startswith("mesp")
            ax.scatter(r["step_seconds"], r["private_peak_bytes"] / MiB, s=46, marker="o" if mesp else "s",
                       color="tab:red" if mesp else "tab:blue", zorder=3)
            ax.annotate(row_label(r), (r["step_seconds"], r["private_peak_bytes"] / MiB), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel("step time, s (min over rounds of the median step)")
        ax.set_ylabel("whole-process private peak, MiB")
        ax.set_title(f"T={T}, LoRA r={result['settings']['rank']}, batch 1, "
                     f"{result['settings']['threads']} thread(s)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
    save_figure(fig, path)
    plt.close(fig)

