"""The memory planner: `mesp estimate` (the settings and the text it prints) and `plan_memory`, which picks the
fastest engine settings whose estimate (mesp.estimate) fits a budget, for `mesp train --memory-budget MB`.

The planner tries the candidate settings cheapest first by step_cost, a model of a MeSP step's time in units of
one layer's forward products, and takes the first whose estimate fits. What it counts, from side-by-side runs
(Qwen2.5-0.5B, T=256, fp32, 1 thread, AMD EPYC; `mesp bench frontier` measures the trade again):
- a layer's forward and its backward's input-gradient products: 2 units per layer, always;
- a layer that does not keep its intermediates recomputes its forward: +1 unit (every layer kept: 7.3 s a step,
  none: 9.0 s; the LM head and attention make up the rest);
- token chunks below 128 rows (batch rows x positions) make the products slower: 64-token chunks measured 7%
  slower than 128-token ones or the whole sequence (which ran within 5% of each other): CHUNK_PENALTY per unit
  (its 32-row entry is an assumption, not measured);
- a scratch file for the checkpoints writes and reads every layer input once: OFFLOAD_COST units per layer
  (an assumption, not measured: one sequential write and read of [B, T, d] against a layer's products);
- a 256-token loss chunk and 64/32-row attention blocks: ties broken by the order of LOSS_CHUNKS and
  ATTN_BLOCKS (their products are the same; fewer, larger ones first).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

from .errors import MespError
from .estimate import CHECKPOINTING, METHODS, Estimate, default_keep_layers, estimate, longest_fitting, model_config
from .lora import ALL_TARGETS
from .loaders import QUANTIZE_CHOICES, QUANTIZE_HELP, WEIGHTS, default_weights, mapped_base
from .memory import MiB, format_mib
from .methods import mesp as mesp_engine
from .precision import AUTO, resolve_dtype
from .settings import setting

TOKEN_CHUNKS = (0, 512, 256, 128, 64)  # 0: the whole sequence
LOSS_CHUNKS = (1024, 256)
ATTN_BLOCKS = (None, 64, 32)  # None: the engine's default rows


@dataclass
class EstimateSettings:
    """`mesp estimate`: the run to predict (flags named as mesp train's)."""
    model: str | None = setting(None, "HF model directory, .gguf file or preset name (only its config is read)")
    seq_len: int = setting(512, "tokens per sample")
    batch_size: int = setting(1, "samples per micro-batch")
    rank: int = setting(8, "LoRA rank")
    method: str = setting("mesp", "gradient method", choices=METHODS)
    dtype: str = setting(AUTO, "compute dtype; auto: bf16 where the CPU has native bf16 (or CUDA), else fp32",
                         choices=(AUTO, "float32", "bfloat16", "float16"))
    device: str = setting("cpu", "where the step would run (decides --dtype auto)")
    quantize: str = setting("none", QUANTIZE_HELP, choices=QUANTIZE_CHOICES)
    weights: str | None = setting(None, "base weights resident in memory or streamed from their file",
                                  choices=WEIGHTS, default_text="default: as load_model, stream for a GGUF")
    offload_checkpoints: bool = setting(False, "mesp, mebp: layer inputs in a memory-mapped scratch file")
    token_chunk: int | None = setting(None, "mesp: tokens per chunk of a layer's token-wise steps (0: whole)",
                                      default_text="default: the engine's")
    keep_layers: int | None = setting(None, "mesp: how many of the last layers keep their intermediates (0: none)",
                                      default_text="default: mesp train's (default_keep_layers; none with "
                                                   "--offload-checkpoints)")
    loss_chunk: int | None = setting(None, "tokens per LM-head chunk", default_text="default 1024")
    attn_block: int | None = setting(None, "query rows per attention block",
                                     default_text="default: the engine's (128, fewer at long T)")
    optimizer: str = setting("adamw", "optimizer whose state is counted", choices=("adamw", "sgd"))
    budget: float | None = setting(None, "a private-footprint budget in MiB: also print the longest sequence "
                                         "that fits", metavar="MB")
    json: bool = setting(False, "print one JSON object instead of text")

    def options(self, config=None) -> dict:
        """estimate()'s keyword arguments (beside the config and seq_len); keep_layers None is mesp train's
        default for the ModelConfig `config` (read from --model when not given)."""
        dtype = resolve_dtype(self.dtype, self.device)
        weights = self.weights or default_weights(self.model, self.quantize)
        keep = self.keep_layers
        if keep is None:
            keep = default_keep_layers(config or model_config(self.model), self.seq_len, self.batch_size, dtype,
                                       self.method, self.offload_checkpoints, weights, self.quantize)
        return dict(batch_size=self.batch_size, rank=self.rank, method=self.method,
                    dtype=dtype,
                    quantize=None if self.quantize == "none" else self.quantize,
                    weights=estimated_weights(self.model, dtype, self.quantize, weights),
                    offload_checkpoints=self.offload_checkpoints, token_chunk=self.token_chunk,
                    keep_layers=keep, loss_chunk=self.loss_chunk, attn_block=self.attn_block,
                    optimizer=self.optimizer)


def run_estimate(s: EstimateSettings) -> tuple[Estimate, int | None]:
    """The estimate of `s`, and with a budget the longest sequence length that fits it."""
    if not s.model:
        raise MespError("model: required")
    config = model_config(s.model)
    options = s.options(config)
    e = estimate(config, s.seq_len, **options)
    longest = None if s.budget is None else longest_fitting(config, int(s.budget * MiB), **options)
    return e, longest


def estimate_text(e: Estimate, longest: int | None = None, budget_mib: float | None = None) -> str:
    """What `mesp estimate` prints: both peaks, every term (largest first) and the dominant one."""
    lines = [f"{e.method}, T={e.seq_len}, batch {e.batch_size}, {e.settings['dtype']}: step allocator peak "
             f"{format_mib(e.step_peak_bytes)} MiB (at the {e.stage}), private peak "
             f"{format_mib(e.private_peak_bytes)} MiB"]
    width = max(map(len, e.terms))
    for name, b in sorted(e.terms.items(), key=lambda kv: -kv[1]):
        if b:
            lines.append(f"  {name:<{width}}  {format_mib(b):>9} MiB")
    lines.append(f"dominant: {e.dominant}")
    if budget_mib is not None:
        lines.append(f"longest sequence within {budget_mib:g} MiB: " +
                     (f"{longest} tokens" if longest else "none (the fixed terms alone exceed it)"))
    return "\n".join(lines)


# ---- the budget planner -------------------------------------------------------------------------------------

@dataclass
class Plan:
    """The engine settings chosen for a budget, and their estimate."""
    offload_checkpoints: bool
    keep_layers: int
    token_chunk: int
    loss_chunk: int
    attn_block: int
    estimate: Estimate
    budget_bytes: int

    def engine_options(self, n_layers: int) -> dict:
        """compute_gradients' options for MeSP under this plan (keep_layers as the set of the last layers)."""
        options = {"token_chunk": self.token_chunk, "loss_chunk": self.loss_chunk, "attn_block": self.attn_block,
                   "keep_layers": frozenset(range(n_layers - self.keep_layers, n_layers))}
        return {k: v for k, v in options.items() if v is not None}

    def describe(self) -> str:
        """The plan as the CLI prints it (one line, then the estimate's terms)."""
        e = self.estimate
        chunk = "whole sequence" if not self.token_chunk or self.token_chunk >= e.seq_len else \
            f"{self.token_chunk}-token chunks"
        head = (f"memory plan for {format_mib(self.budget_bytes, 0)} MiB: {e.method}, checkpoints "
                f"{'offloaded to a scratch file' if self.offload_checkpoints else 'in RAM'}, "
                f"{self.keep_layers} of {e.settings.get('layers', '?')} layers keep their intermediates, "
                f"{chunk}, loss chunk {self.loss_chunk}, attention block "
                f"{e.settings['attn_block']} rows")
        return head + "\n" + estimate_text(e)


CHUNK_PENALTY = {64: 0.07, 32: 0.25}  # extra cost per unit of chunks of at most this many rows (step_cost)
OFFLOAD_COST = 0.05  # per layer: its input written to and read back from the scratch file (step_cost)


def step_cost(n_layers: int, batch_size: int, offload: bool, keep: int, chunk: int, seq_len: int) -> float:
    """A MeSP step's time in units of one layer's forward products (module docstring): what orders the
    planner's candidates."""
    rows = batch_size * (min(chunk, seq_len) if chunk else seq_len)
    penalty = next((p for limit, p in sorted(CHUNK_PENALTY.items()) if rows <= limit), 0.0)
    units = 2 * n_layers + (n_layers - keep)
    return units * (1 + penalty) + (OFFLOAD_COST * n_layers if offload else 0.0)


PLANNED_KNOBS = ("keep_layers", "token_chunk")  # the MeSP engine options the planner varies besides the chunks


def engine_knobs() -> frozenset[str]:
    """The PLANNED_KNOBS the MeSP engine accepts (mesp.methods.mesp.gradients' parameters): a plan uses no other."""
    params = inspect.signature(mesp_engine.gradients).parameters
    return frozenset(k for k in PLANNED_KNOBS if k in params)


def _candidates(method: str, n_layers: int, offload_allowed: bool, knobs, batch_size: int, seq_len: int):
    """Engine settings, cheapest first by step_cost (ties: RAM checkpoints, more kept layers, the whole sequence
    and larger chunks, LOSS_CHUNKS' and ATTN_BLOCKS' order): (offload, keep, token_chunk, loss_chunk,
    attn_block)."""
    offloads = (False, True) if offload_allowed and method in CHECKPOINTING else (False,)
    if method != "mesp":
        return [(offload, 0, 0, loss_chunk, ATTN_BLOCKS[0]) for offload in offloads for loss_chunk in LOSS_CHUNKS]
    keeps = range(n_layers, -1, -1) if "keep_layers" in knobs else (0,)
    chunks = TOKEN_CHUNKS if "token_chunk" in knobs else (0,)
    ordered = [(offload, keep, chunk) for offload in offloads for keep in keeps for chunk in chunks]
    ordered.sort(key=lambda c: step_cost(n_layers, batch_size, *c, seq_len))  # stable: ties keep that order
    return [(offload, keep, chunk, loss_chunk, block) for offload, keep, chunk in ordered
            for loss_chunk in LOSS_CHUNKS for block in ATTN_BLOCKS]


def plan_memory(config, budget_bytes: int, seq_len: int, measure: str = "private", offload_allowed: bool = True,
                knobs=None, **options) -> Plan:
    """The fastest settings whose estimate fits `budget_bytes` (measure "private": the private peak; "step": the
    step's allocator peak). knobs: which of PLANNED_KNOBS may vary (default: those the engine has,
    engine_knobs()). `options`: estimate()'s other arguments (method, rank, dtype, ...). Nothing fits:
    MespError naming the dominant term of the smallest plan and what would fit."""
    knobs = engine_knobs() if knobs is None else frozenset(knobs)
    key = "private_peak_bytes" if measure == "private" else "step_peak_bytes"
    method = options.get("method", "mesp")
    smallest = None
    for offload, keep, chunk, loss_chunk, block in _candidates(method, config.num_hidden_layers, offload_allowed,
                                                                knobs, options.get("batch_size", 1), seq_len):
        e = estimate(config, seq_len, offload_checkpoints=offload, keep_layers=keep, token_chunk=chunk,
                     loss_chunk=loss_chunk, attn_block=block, **options)
        if getattr(e, key) <= budget_bytes:
            e.settings["layers"] = config.num_hidden_layers
            return Plan(offload, keep, chunk, loss_chunk, block, e, budget_bytes)
        if smallest is None or getattr(e, key) < getattr(smallest[1], key):
            smallest = ((offload, keep, chunk, loss_chunk, block), e)
    (offload, keep, chunk, loss_chunk, block), e = smallest
    least = {"offload_checkpoints": offload, "keep_layers": keep, "token_chunk": chunk, "loss_chunk": loss_chunk,
             "attn_block": block}
    raise MespError(f"memory budget {format_mib(budget_bytes, 0)} MiB: nothing fits; the smallest plan needs "
                    f"{format_mib(getattr(e, key), 0)} MiB, dominated by {e.dominant} "
                    f"({format_mib(e.terms[e.dominant], 0)} MiB); " + what_would_fit(config, budget_bytes, seq_len,
                                                                                   key, {**options, **least}))


def what_would_fit(config, budget_bytes: int, seq_len: int, key: str, options: dict) -> str:
    """The changes that would fit the budget: a shorter sequence, a smaller rank, streamed weights."""
    fits = []
    longest = longest_fitting(config, budget_bytes, "private" if key == "private_peak_bytes" else "step",
                              **options)
    if longest:
        fits.append(f"--seq-len {longest}")
    rank = options.get("rank", 8)
    for r in (r for r in (rank // 2, rank // 4, 1) if 0 < r < rank):
        if getattr(estimate(config, seq_len, **{**options, "rank": r}), key) <= budget_bytes:
            fits.append(f"--rank {r}")
            break
    if options.get("weights", "resident") == "resident":
        if not options.get("quantize") and getattr(estimate(config, seq_len, **{**options, "quantize": "int4"}),
                                                   key) <= budget_bytes:
            fits.append("--quantize int4")
        if getattr(estimate(config, seq_len, **{**options, "weights": "stream"}), key) <= budget_bytes:
            fits.append("--weights stream (a GGUF file; `mesp quantize` writes one)")
    return ("would fit: " + ", or ".join(fits)) if fits else "no shorter sequence, smaller rank or streamed " \
                                                             "weights fits either: a larger budget is needed"


def estimated_weights(model, dtype: str, quantize, weights: str | None) -> str:
    """estimate()'s `weights`: how load_model will hold `model`'s base ("stream", "resident", or "mapped" where
    a resident base stays the safetensors file's pages: loaders.mapped_base)."""
    weights = weights or default_weights(model, quantize)
    return "mapped" if weights == "resident" and mapped_base(model, dtype, quantize) else weights


def plan_train(c, device: str = "cpu") -> Plan:
    """The plan for a resolved TrainConfig with memory_budget set (MiB of private footprint)."""
    config = model_config(c.model)
    per_layer = bool(getattr(c, "per_layer_update", False))
    quantize = None if c.quantize in (None, "none") else c.quantize
    dtype = resolve_dtype(c.dtype, device)
    options = dict(batch_size=c.batch_size, rank=c.rank, method=c.method, dtype=dtype, quantize=quantize,
                   weights=estimated_weights(c.model, dtype, quantize, c.weights),
                   targets=c.targets or ALL_TARGETS, optimizer=c.optimizer or "adamw", per_layer_update=per_layer)
    return plan_memory(config, int(c.memory_budget * MiB), c.seq_len, offload_allowed=True, **options)


def apply_plan(c, plan: Plan):
    """A copy of TrainConfig `c` with the plan's settings: checkpoint placement and kept layers, and the token
    chunk, loss chunk and attention block where the config has those fields (the engine's knobs)."""
    chosen = {"offload_checkpoints": plan.offload_checkpoints, "keep_layers": plan.keep_layers,
              "token_chunk": plan.token_chunk, "loss_chunk": plan.loss_chunk, "attn_block": plan.attn_block}
    names = {f.name for f in dataclasses.fields(c)}
    return dataclasses.replace(c, **{k: v for k, v in chosen.items() if k in names})
