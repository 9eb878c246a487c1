"""The memory sweep: peak memory and step time of one training step per (model, T, r, method).

Each configuration runs in its own fresh Python process (`measure_case` starts `python -m mesp.bench.worker`,
which calls `measure_here`), so allocator state, profiler counters and RSS start clean. What is measured is
the same for every method (see mesp.memory): `peak_bytes` is the allocator-level peak of tensor bytes above the
step's start (weights, adapter and data excluded), split by the stage in force (forward / loss / backward).
The process's peak RSS is read separately (Linux: VmHWM reset just before the first step), its private
footprint (what a device counts: mesp.memory.FootprintMeter) is sampled over the whole fresh process, loading
included, and the step time
is the median of unprofiled steps: the CPU profiler that gives the allocator peak slows a step down, so the
profiled step is never timed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import MespError
from ..lora import ALL_TARGETS, LoraConfig, add_lora
from ..loaders import WEIGHTS, WEIGHTS_HELP, load_model, read_hf_config
from ..presets import PRESETS
from ..memory import (FootprintMeter, PeakMemory, current_rss_bytes, format_mib, peak_rss_since_reset,
                      reset_peak_rss, stage, tensor_bytes)
from ..methods import compute_gradients
from ..estimate import estimate
from ..planner import engine_knobs
from ..settings import setting
from .machine import machine_info

log = logging.getLogger(__name__)

ENGINE_METHODS = ("autograd", "mebp", "mesp", "mezo")
PEER = "hf+peft(gc)"  # transformers + PEFT with gradient checkpointing: the peer every engine is compared with
METHOD_ALIASES = {"hf": PEER, "peer": PEER}
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}


@dataclass
class MemoryCase:
    """One measurement: a training step of `method` on `model` with a [batch_size, seq_len] batch."""
    model: str
    seq_len: int
    rank: int
    method: str
    dtype: str = "fp32"
    batch_size: int = 1
    repeats: int = 1
    quantize: str = "none"
    weights: str | None = None  # load_model's weights= (None: its default)
    store_h: bool = False
    device: str = "cpu"
    seed: int = 0
    threads: int | None = None  # torch intra-op threads in the worker (None: PyTorch's default)


# ---- one configuration, in this process ------------------------------------------------------------------

def _token_batch(vocab_size: int, case: MemoryCase, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(case.seed)
    return torch.randint(0, vocab_size, (case.batch_size, case.seq_len), generator=g).to(device)


def model_hf_config(source: str) -> dict:
    """The transformers config dict of a model source, without building its weights where possible."""
    preset = PRESETS.get(source)
    if preset is not None and preset["kind"] == "random":
        return dict(preset["config"])
    if Path(source).is_dir():
        return read_hf_config(Path(source)).to_hf()
    return load_model(source).config.to_hf()  # a GGUF: read it whole (small enough to be the shipped model)


def _engine_step(case: MemoryCase):
    """(step function, facts) for one of mesp's own engines."""
    model = load_model(case.model, dtype=DTYPES[case.dtype], device=case.device, quantize=case.quantize,
                       weights=case.weights)
    add_lora(model, LoraConfig(r=case.rank), seed=case.seed)
    ids = _token_batch(model.config.vocab_size, case, model.device)
    options = {"store_h": True} if case.store_h else {}
    facts = {"weights_bytes": tensor_bytes(w for _, w in model.base_weights())
             + tensor_bytes(model.lora_parameters().values()),
             "lora_bytes": tensor_bytes(model.lora_parameters().values()),
             "lora_parameters": sum(p.numel() for p in model.lora_parameters().values()),
             "estimated_peak_bytes": predicted_peak(model.config, case)}

    def step():
        loss, grads = compute_gradients(model, ids, ids, method=case.method, **options)
        return float(loss), tensor_bytes(grads.values())

    return step, facts


def predicted_peak(config, case: MemoryCase) -> int | None:
    """mesp.estimate's step peak for `case` (the engine's default chunks, every gradient returned), printed
    beside the measured one; None for the store-h ablation, which the estimate does not model."""
    if case.store_h:
        return None
    return estimate(config, case.seq_len, batch_size=case.batch_size, rank=case.rank, method=case.method,
                    dtype=DTYPES[case.dtype], quantize=None if case.quantize == "none" else case.quantize,
                    weights=case.weights or "resident", runtime_floor=0,
                    token_chunk=None if "token_chunk" in engine_knobs() else 0).step_peak_bytes


def _peer_step(case: MemoryCase):
    """(step function, facts) for transformers + PEFT with gradient checkpointing, same shape and LoRA."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hf = model_hf_config(case.model)
    hf.pop("architectures", None)
    config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    config.use_cache = False
    torch.manual_seed(case.seed)  # weights are random: memory and time do not depend on their values
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if DTYPES[case.dtype] == "float32"
                                             else torch.bfloat16).to(case.device)
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x; the old name warns
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_config = PeftLoraConfig(r=case.rank, lora_alpha=16, lora_dropout=0.0, target_modules=list(ALL_TARGETS),
                                 task_type="CAUSAL_LM")
    # PEFT upcasts a bf16 adapter to fp32 by default, as mesp does (lora.adapter_dtype)
    with warnings.catch_warnings():  # PEFT reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, peft_config)
    model.train()  # transformers checkpoints only in training mode (dropout is 0 in these configs)
    base = model.get_base_model()
    lora = [p for p in model.parameters() if p.requires_grad]
    ids = _token_batch(config.vocab_size, case, case.device)
    facts = {"weights_bytes": tensor_bytes(model.parameters()), "lora_bytes": tensor_bytes(lora),
             "lora_parameters": sum(p.numel() for p in lora)}

    def step():
        with stage("forward"):
            logits = model(input_ids=ids).logits
        with stage("loss"):
            loss = base.loss_function(logits=logits, labels=ids, vocab_size=config.vocab_size)
        del logits
        with stage("backward"):
            loss.backward()
        grad_bytes = tensor_bytes(p.grad for p in lora)
        for p in lora:
            p.grad = None
        return float(loss.detach()), grad_bytes

    return step, facts


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure_here(case: MemoryCase) -> dict:
    """Measure `case` in this process (bench_memory runs it in a fresh one). Returns the result row.

    Order: `repeats` unprofiled, timed steps first, then one step under PeakMemory. The peak RSS is that of
    the first step in this fresh process (the profiled one when repeats is 0: no time is then reported). The
    CPU tracker counts only what is allocated while it runs, so the earlier steps do not move its baseline.
    The private-footprint peak covers the process from before the model is loaded to the end of the unprofiled
    steps (the profiler's own event records would add to it), or of the profiled step when repeats is 0."""
    torch.manual_seed(case.seed)
    meter = FootprintMeter().__enter__()
    try:
        with stage("load"):
            step, facts = (_peer_step if case.method == PEER else _engine_step)(case)
        return _measure_steps(case, step, facts, meter)
    finally:
        meter.__exit__(None, None, None)  # a no-op when _measure_steps stopped it already


def _measure_steps(case: MemoryCase, step, facts: dict, meter: FootprintMeter) -> dict:
    row = {**asdict(case), **facts, "threads": torch.get_num_threads(), "rss_before_step_bytes": current_rss_bytes()}
    rss_reset = reset_peak_rss()

    def read_rss(scope):
        row["peak_rss_bytes"] = peak_rss_since_reset()
        row["peak_rss_scope"] = scope if rss_reset else "process lifetime"

    times = []
    for _ in range(case.repeats):
        _sync(case.device)
        t0 = time.perf_counter()
        step()
        _sync(case.device)
        times.append(time.perf_counter() - t0)
        if len(times) == 1:
            read_rss("first step")

    def read_private(scope):
        meter.__exit__(None, None, None)
        row.update(private_peak_bytes=meter.private_peak_bytes, private_peak_scope=scope,
                   stage_private_peaks=dict(meter.stage_private_peaks))

    if times:
        read_private("load and unprofiled steps")
    with PeakMemory(case.device) as pm:
        loss, grad_bytes = step()
    if not times:
        read_rss("first step (profiled)")
        read_private("load and the profiled step")
    row.update(loss=loss, lora_grad_bytes=grad_bytes, peak_bytes=pm.peak_bytes, stage_peaks=pm.stage_peaks,
               step_seconds=statistics.median(times) if times else None, step_seconds_all=times)
    return row


# ---- one configuration, in a fresh process ---------------------------------------------------------------

def measure_case(case: MemoryCase, timeout: float | None = None) -> dict:
    """Measure `case` in a fresh Python process. A crash (e.g. killed for memory) gives a row with `error`."""
    with tempfile.TemporaryDirectory(prefix="mesp-bench-") as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, "-m", "mesp.bench.worker", json.dumps(asdict(case)), str(out)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**asdict(case), "error": f"timed out after {timeout:.0f} s"}
        if proc.returncode == 0 and out.is_file():
            row = json.loads(out.read_text())
            if "input_error" in row:
                raise MespError(row["input_error"])
            return row
        tail = (proc.stderr.strip().splitlines() or [""])[-1][:300]
        why = f"killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0 else \
            f"exit status {proc.returncode}: {tail}"
        log.warning("%s: %s", case, why)
        return {**asdict(case), "error": why}


# ---- the sweep -------------------------------------------------------------------------------------------

def peer_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("transformers", "peft"))


def check_model_source(source: str) -> None:
    """MespError unless `source` is a preset or an existing file or directory (before any process starts)."""
    if source not in PRESETS and not Path(source).exists():
        raise MespError(f"model {source!r}: not a preset ({', '.join(PRESETS)}) nor an existing file or directory")


def memory_cases(models, seq_lens, ranks, methods, dtype="fp32", batch_size=1, repeats=1, quantize="none",
                 store_h=False, device="cpu", peer=None, threads=None, weights=None) -> list[MemoryCase]:
    """Every configuration of the sweep, checked before anything runs. peer=None adds the transformers+PEFT
    row when transformers and peft are importable (and the weights are not quantized)."""
    methods = [METHOD_ALIASES.get(m, m) for m in methods]
    unknown = [m for m in methods if m not in ENGINE_METHODS + (PEER,)]
    if unknown or not methods:
        raise MespError(f"methods: unknown {', '.join(unknown) or '(none)'}; choose from "
                        f"{', '.join(ENGINE_METHODS + (PEER,))}")
    if dtype not in DTYPES:
        raise MespError(f"dtype: unknown {dtype!r}; choose fp32 or bf16")
    dtype = {"float32": "fp32", "bfloat16": "bf16"}.get(dtype, dtype)
    for name, values, least in (("seq-lens", seq_lens, 1), ("ranks", ranks, 1), ("batch-size", [batch_size], 1),
                                ("repeats", [repeats], 0), ("threads", [threads or 1], 1)):
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < least for v in values):
            raise MespError(f"{name}: must be integers >= {least}, got {values!r}")
    if not models:
        raise MespError("models: give at least one")
    for m in models:
        check_model_source(m)
    quantize = quantize or "none"
    if device == "cuda" and not torch.cuda.is_available():
        raise MespError("device cuda: no CUDA device is available")
    if peer is None:
        peer = peer_available() and quantize == "none"
    if PEER in methods and not peer_available():
        raise MespError(f"method {PEER}: needs transformers and peft installed")
    if PEER in methods and quantize != "none":
        raise MespError(f"method {PEER}: has no quantized-weight equivalent here; use --quantize none")
    if peer and PEER not in methods:
        methods.append(PEER)
    cases = []
    for model in models:
        for T in seq_lens:
            for r in ranks:
                for method in methods:
                    cases.append(MemoryCase(model=model, seq_len=T, rank=r, method=method, dtype=dtype,
                                            batch_size=batch_size, repeats=repeats, quantize=quantize,
                                            weights=weights, store_h=bool(store_h and method == "mesp"), device=device,
                                            threads=threads))
    return cases


@dataclass
class MemorySettings:
    """`mesp bench memory`: which configurations to measure, how, and where to write the results. The report's
    memory runs are instances too (see mesp.bench.plan)."""
    models: list[str] = setting(factory=lambda: ["qwen2.5-0.5b"],
                                help="comma-separated presets, HF directories or .gguf files")
    seq_lens: list[int] = setting(factory=lambda: [256], help="comma-separated sequence lengths")
    ranks: list[int] = setting(factory=lambda: [8], help="comma-separated LoRA ranks")
    methods: list[str] = setting(factory=lambda: ["mebp", "mesp", "autograd", "mezo"],
                                 help="comma-separated: autograd, mebp, mesp, mezo, or hf for hf+peft(gc)",
                                 default_text="default the four engines, plus hf+peft(gc) when transformers and "
                                              "peft are installed")
    dtype: str = setting("fp32", "weights and compute dtype", choices=("fp32", "bf16"))
    batch_size: int = setting(1, "sequences per step")
    repeats: int = setting(3, "unprofiled steps timed, the median reported; 0: no timing, RSS read in the "
                              "profiled step")
    quantize: str = setting("none", "quantized base weights (passed to load_model)", choices=("none", "int8", "int4"))
    weights: str | None = setting(None, WEIGHTS_HELP, choices=WEIGHTS)
    store_h: bool = setting(False, "mesp keeps every LoRA h = xA (the paper's ablation)")
    no_peer: bool = setting(False, "leave out the transformers+PEFT row")
    device: str = setting("cpu", "where the step runs", choices=("cpu", "cuda"))
    threads: int | None = setting(None, "torch threads per measurement", default_text="default: PyTorch's")
    timeout: float | None = setting(None, "seconds allowed per configuration")
    json: str | None = setting(None, "write the rows and the machine as JSON here")
    plot: str | None = setting(None, "write grouped bars of peak MiB here (PNG)")

    def cases(self) -> list[MemoryCase]:
        return memory_cases(self.models, self.seq_lens, self.ranks, self.methods, dtype=self.dtype,
                            batch_size=self.batch_size, repeats=self.repeats, quantize=self.quantize,
                            weights=self.weights, store_h=self.store_h, device=self.device, peer=False if self.no_peer else None,
                            threads=self.threads)

    def command(self) -> str:
        """The `mesp bench memory` command line that measures these cases (outputs left out)."""
        parts = ["mesp bench memory", "--models " + ",".join(self.models),
                 "--seq-lens " + ",".join(map(str, self.seq_lens)), "--ranks " + ",".join(map(str, self.ranks)),
                 "--methods " + ",".join(self.methods), f"--dtype {self.dtype}", f"--repeats {self.repeats}"]
        defaults = MemorySettings()
        for name in ("batch_size", "quantize", "weights", "device"):
            if getattr(self, name) != getattr(defaults, name):
                parts.append(f"--{name.replace('_', '-')} {getattr(self, name)}")
        if self.store_h:
            parts.append("--store-h")
        if self.no_peer:
            parts.append("--no-peer")
        if self.threads:
            parts.append(f"--threads {self.threads}")
        return " ".join(parts)

    def record(self) -> dict:
        """The run as the report's raw results keep it (memory.json's "run")."""
        return {"models": self.models, "seq_lens": self.seq_lens, "ranks": self.ranks, "methods": self.methods,
                "repeats": self.repeats, "store_h": self.store_h, "peer": False if self.no_peer else None,
                "threads": self.threads}

    @classmethod
    def from_record(cls, record: dict) -> MemorySettings:
        record = dict(record)
        no_peer = record.pop("peer", None) is False
        return cls(**record, no_peer=no_peer)


def bench_memory(cases: list[MemoryCase], progress: bool = True, timeout: float | None = None) -> dict:
    """Measure every case (each in a fresh process) with a progress bar. {"rows": [...], "machine": {...}}."""
    from tqdm import tqdm

    machine = machine_info()
    if cases and cases[0].threads:
        machine["torch_threads"] = cases[0].threads
    rows = []
    bar = tqdm(cases, desc="bench memory", unit="config", disable=not progress, file=sys.stderr)
    for case in bar:
        bar.set_postfix_str(f"{case.model} T={case.seq_len} r={case.rank} {case.method}")
        rows.append(measure_case(case, timeout))
    bar.close()
    return {"rows": rows, "machine": machine}


def config_label(row: dict) -> str:
    label = f"{row['model']} T={row['seq_len']} r={row['rank']} {row['dtype']}"
    if row.get("batch_size", 1) != 1:
        label += f" B={row['batch_size']}"
    if row.get("quantize", "none") != "none":
        label += f" {row['quantize']}"
    return label


def method_label(row: dict) -> str:
    return row["method"] + (" (store h)" if row.get("store_h") else "")


def memory_table(result: dict) -> str:
    """A plain-text table of a bench_memory result (what the CLI prints)."""
    head = ("config", "method", "peak MiB", "estimate", "forward", "loss", "backward", "weights MiB", "RSS MiB",
            "private MiB", "step s")
    lines = [head]
    for r in result["rows"]:
        if "error" in r:
            lines.append((config_label(r), method_label(r), "failed: " + r["error"], *[""] * (len(head) - 3)))
            continue
        st = r.get("stage_peaks", {})
        lines.append((config_label(r), method_label(r), format_mib(r["peak_bytes"]),
                      format_mib(r.get("estimated_peak_bytes")),
                      *(format_mib(st[s]) if s in st else "-" for s in ("forward", "loss", "backward")),
                      format_mib(r["weights_bytes"], 0), format_mib(r["peak_rss_bytes"], 0),
                      format_mib(r.get("private_peak_bytes"), 0),
                      "-" if r["step_seconds"] is None else f"{r['step_seconds']:.2f}"))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in
                               enumerate(zip(line, widths))).rstrip() for line in lines)
