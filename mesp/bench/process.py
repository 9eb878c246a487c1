"""The whole-process measure: the private-footprint peak of `mesp train` as a device would see it.

Per model, the source is quantized once with `mesp quantize SRC --to q4_0 --out F.gguf` (kept in the work
directory and reused), a pre-tokenized JSONL of random token ids is written beside it, and then each
(T, method) trains for a few steps in its own fresh `mesp train` process, batch 1, SGD, the quantized base
streamed from the file (the loader's default for GGUF). The figure is what that process reports in its run's
memory.json (mesp.memory.FootprintMeter, sampled over the whole run, loading included), never a measure of
this process. The runtime floor (Python + torch) is measured once here and passed to every run.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import MespError
from ..fileio import write_text
from ..memory import RUNTIME_FLOOR_LABEL, format_mib, runtime_floor_bytes
from ..settings import setting
from ..wholeprocess import child_env, run_mesp, shown, train_process_memory
from .machine import machine_info
from .sweep import check_model_source, model_hf_config

log = logging.getLogger(__name__)

PROCESS_METHODS = ("mesp", "mebp", "autograd")
QUANT_TYPES = ("q4_0", "q4_1", "q8_0")
N_SAMPLES = 4  # token sequences in the data file: enough for the default steps at batch 1


@dataclass
class ProcessCase:
    """One `mesp train` process: `method` for `steps` steps on `model` quantized to `to`, [1, seq_len] batches."""
    model: str
    seq_len: int
    rank: int
    method: str
    to: str = "q4_0"
    steps: int = 2
    offload_checkpoints: bool = False
    threads: int | None = None
    dtype: str = "float32"  # pinned, not "auto": the table's figures then mean the same on every CPU


@dataclass
class ProcessSettings:
    """`mesp bench process`: whole-process private-footprint peaks of `mesp train` on a quantized base."""
    models: list[str] = setting(factory=lambda: ["qwen2.5-0.5b"],
                                help="comma-separated presets, HF directories or .gguf files (each quantized once)")
    seq_lens: list[int] = setting(factory=lambda: [256], help="comma-separated sequence lengths")
    rank: int = setting(8, "LoRA rank")
    methods: list[str] = setting(factory=lambda: ["mesp", "mebp"], help="comma-separated: mesp, mebp, autograd")
    to: str = setting("q4_0", "quantized type of the base (mesp quantize --to)", choices=QUANT_TYPES)
    steps: int = setting(2, "SGD steps per run")
    offload_checkpoints: bool = setting(False, "train with --offload-checkpoints (layer inputs in a scratch file)")
    work: str = setting("runs/bench-process", "directory of the quantized models, the token data and the runs "
                                              "(quantized files are reused)")
    threads: int | None = setting(None, "torch threads per run", default_text="default: PyTorch's")
    timeout: float | None = setting(None, "seconds allowed per run (and per quantization)")
    json: str | None = setting(None, "write the rows and the machine as JSON here")

    def cases(self) -> list[ProcessCase]:
        unknown = [m for m in self.methods if m not in PROCESS_METHODS]
        if unknown or not self.methods:
            raise MespError(f"methods: unknown {', '.join(unknown) or '(none)'}; choose from "
                            f"{', '.join(PROCESS_METHODS)}")
        for name, values in (("seq-lens", self.seq_lens), ("rank", [self.rank]), ("steps", [self.steps]),
                             ("threads", [self.threads or 1])):
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise MespError(f"{name}: must be integers >= 1, got {values!r}")
        if not self.models:
            raise MespError("models: give at least one")
        for m in self.models:
            check_model_source(m)
        return [ProcessCase(model=m, seq_len=T, rank=self.rank, method=method, to=self.to, steps=self.steps,
                            offload_checkpoints=self.offload_checkpoints, threads=self.threads)
                for m in self.models for T in self.seq_lens for method in self.methods]

    def command(self) -> str:
        """The `mesp bench process` command line that measures these cases (outputs left out)."""
        parts = ["mesp bench process", "--models " + ",".join(self.models),
                 "--seq-lens " + ",".join(map(str, self.seq_lens)), f"--rank {self.rank}",
                 "--methods " + ",".join(self.methods), f"--to {self.to}", f"--steps {self.steps}"]
        if self.offload_checkpoints:
            parts.append("--offload-checkpoints")
        if self.threads:
            parts.append(f"--threads {self.threads}")
        return " ".join(parts)


def _slug(source: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(source).name or source)


def quantized_path(source: str, to: str, work) -> Path:
    """Where the quantized copy of `source` is kept: WORK/models/SOURCE-TO.gguf."""
    return Path(work) / "models" / f"{_slug(source)}-{to}.gguf"


def quantized_model(source: str, to: str, work: Path, env: dict, timeout: float | None) -> Path:
    """quantized_path(...), made by `mesp quantize` in its own process unless it is there already."""
    path = quantized_path(source, to, work)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        args = ["quantize", source, "--to", to, "--out", str(path)]
        log.info("mesp %s", " ".join(args))
        try:
            run_mesp(args, env, timeout)
        except MespError as e:
            raise MespError(f"{source}: {e}") from e
    return path


def token_data(source: str, seq_len: int, work: Path) -> Path:
    """WORK/data/tokens-VOCAB-T.jsonl: N_SAMPLES pre-tokenized sequences of seq_len random ids (no tokenizer
    needed; memory does not depend on the token values)."""
    vocab = int(model_hf_config(source)["vocab_size"])
    path = work / "data" / f"tokens-{vocab}-{seq_len}.jsonl"
    if not path.is_file():
        g = torch.Generator().manual_seed(seq_len)
        ids = torch.randint(0, vocab, (N_SAMPLES, seq_len), generator=g).tolist()
        write_text(path, "".join(json.dumps({"input_ids": row}) + "\n" for row in ids))
    return path


def train_args(case: ProcessCase, model_file: Path, data: Path) -> list[str]:
    """The `mesp train` arguments of a case (--out aside)."""
    args = ["--model", str(model_file), "--data", str(data), "--seq-len", str(case.seq_len), "--rank",
            str(case.rank), "--batch-size", "1", "--optimizer", "sgd", "--steps", str(case.steps), "--method",
            case.method, "--dtype", case.dtype, "--overwrite"]
    return args + (["--offload-checkpoints"] if case.offload_checkpoints else [])


def measure_process(case: ProcessCase, model_file: Path, data: Path, work: Path, env: dict,
                    timeout: float | None = None) -> dict:
    """One fresh `mesp train` process; its row holds the run's memory.json (or `error`)."""
    run = work / "runs" / f"{_slug(case.model)}-{case.to}-T{case.seq_len}-r{case.rank}-{case.method}" \
                          f"{'-offload' if case.offload_checkpoints else ''}"
    args = train_args(case, model_file, data)
    row = {**asdict(case), "command": shown(args + ["--out", str(run)])}
    started = time.perf_counter()
    try:
        summary = train_process_memory(args, run, env, timeout)
    except MespError as e:
        log.warning("%s: %s", case, e)
        return {**row, "seconds": time.perf_counter() - started, "error": str(e)}
    return {**row, "seconds": time.perf_counter() - started, **summary}


def bench_process(settings: ProcessSettings, progress: bool = True) -> dict:
    """Measure every case of `settings`, each in a fresh `mesp train` process. {"rows", "machine",
    "runtime_floor_bytes", "runtime_floor_label", "settings"}."""
    from tqdm import tqdm

    cases = settings.cases()
    work = Path(settings.work)
    floor = runtime_floor_bytes()
    env = child_env(settings.threads)
    machine = machine_info()
    if settings.threads:
        machine["torch_threads"] = settings.threads
    rows = []
    bar = tqdm(cases, desc="bench process", unit="run", disable=not progress, file=sys.stderr)
    for case in bar:
        bar.set_postfix_str(f"{case.model} T={case.seq_len} {case.method}")
        try:
            model_file = quantized_model(case.model, case.to, work, env, settings.timeout)
        except MespError as e:
            rows.append({**asdict(case), "error": str(e)})
            continue
        rows.append(measure_process(case, model_file, token_data(case.model, case.seq_len, work), work, env,
                                    settings.timeout))
    bar.close()
    return {"rows": rows, "machine": machine, "runtime_floor_bytes": floor, "runtime_floor_label": RUNTIME_FLOOR_LABEL,
            "settings": asdict(settings)}


def process_table(result: dict) -> str:
    """A plain-text table of a bench_process result (what the CLI prints), with the runtime floor named."""
    head = ("model", "T", "r", "to", "method", "private peak MiB", "above floor", "RSS peak MiB", "load", "forward",
            "backward", "s")
    floor = result.get("runtime_floor_bytes")
    lines = [head]
    for r in result["rows"]:
        label = (r["model"], r["seq_len"], r["rank"], r["to"] + (" offload" if r.get("offload_checkpoints") else ""),
                 r["method"])
        if "error" in r:
            lines.append((*label, "failed: " + r["error"], *[""] * (len(head) - 6)))
            continue
        st = r.get("stage_private_peaks") or {}
        above = None if floor is None or r["private_peak_bytes"] is None else r["private_peak_bytes"] - floor
        lines.append((*label, format_mib(r["private_peak_bytes"]), format_mib(above), format_mib(r["rss_peak_bytes"]),
                      *(format_mib(st.get(s)) for s in ("load", "forward", "backward")), f"{r['seconds']:.1f}"))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    text = "\n".join("  ".join(str(c).ljust(w) if i in (0, 3, 4) else str(c).rjust(w) for i, (c, w) in
                               enumerate(zip(line, widths))).rstrip() for line in lines)
    return text + f"\n{result.get('runtime_floor_label', RUNTIME_FLOOR_LABEL)}: {format_mib(floor)} MiB"
