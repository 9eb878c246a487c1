"""Memory estimate of a training step before any weight is loaded: `estimate(config, seq_len, ...)`.

An analytic model of the engines' tensor lifetimes, kept next to the code it describes: for each method it
walks the stages the engine marks (forward, loss, backward; mesp.memory.stage) and, at each stage's worst
moment, adds up the tensors alive there, named the way mesp/methods/*.py name them. Nothing is fitted: every
term is a count of tensors of known shapes, so a change in an engine's lifetimes must be mirrored here (the
tests compare the estimate with the allocator peak that mesp.memory measures).

Shapes, with B samples of T tokens: X = [B, T, d] (a layer input, n1, h1, n2), Q = [B, T, Hq*D] (q, o, o_flat),
K = [B, T, Hkv*D] (k, v), Fm = [B, T, F] (G, U, M and their gradients), a score block [B, Hq, attn_block, T]
in the accumulation dtype (fp32 for fp32 and bf16), the LM head's logits.

The step peak (what mesp.memory.PeakMemory measures: tensor bytes above the step's start) is the largest stage
total. The private peak (what a device counts) adds what lives outside the step: the runtime floor (Python +
torch), the resident base weights, the LoRA weights and the optimizer state. `terms` split the private peak;
the step's terms (STEP_TERMS) sum to the step peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import MespError
from .families import ModelConfig, expected_shapes
from .lora import ALL_TARGETS, adapter_dtype
from .memory import MiB, runtime_floor_bytes

METHODS = ("mesp", "mebp", "autograd", "mezo")
CHECKPOINTING = ("mesp", "mebp")
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ACC_BYTES = 4  # the accumulation dtype of fp32, bf16 and fp16 compute (mesp.ops.acc_dtype)
LOSS_CHUNK_BYTES = 8 << 20  # mesp.methods.common.chunked_loss's fp32 logits bound per vocabulary slice
DEFAULT_LOSS_CHUNK = 1024  # tokens per LM-head chunk when loss_chunk is None (chunked_loss)
DECODE_ELEMENTS = 1 << 23  # mesp.quant.CHUNK_ELEMENTS: weight values a quantized or streamed matrix decodes at once
OPTIMIZER_STATES = {"adamw": 2, "sgd": 0, "sgd_momentum": 1}  # LoRA-sized buffers each optimizer keeps

# term names (the CLI prints and the JSON keys them)
RUNTIME = "runtime floor"
WEIGHTS = "resident weights"
LORA_STATE = "LoRA + optimizer state"
CHECKPOINTS = "layer checkpoints"
KEPT = "kept layer intermediates"
WORKING = "layer working set"
LOSS = "loss chunk"
LOGITS = "full-vocabulary logits"
GRADS = "LoRA gradients"
DECODE = "weight decode buffer"
STEP_TERMS = (CHECKPOINTS, KEPT, WORKING, LOSS, LOGITS, GRADS, DECODE)


# the MeSP engine's defaults (mesp.methods.mesp: token_chunks and attention_block state the same rules)
WHOLE_UP_TO = 256  # token_chunk None: the whole sequence up to this many positions
DEFAULT_TOKEN_CHUNK = 128  # ... and chunks of this many positions beyond
DEFAULT_ATTN_BLOCK = 128  # attn_block None: this many query rows, fewer where a score block passes
SCORE_BLOCK_BYTES = 8 << 20  # ... this many bytes
MIN_ATTN_BLOCK = 16


def default_token_chunk(seq_len: int) -> int:
    """The engine's token chunk when token_chunk is None: the whole sequence (0) up to WHOLE_UP_TO positions,
    DEFAULT_TOKEN_CHUNK positions beyond."""
    return DEFAULT_TOKEN_CHUNK if seq_len > WHOLE_UP_TO else 0


def attention_rows(attn_block: int | None, batch_size: int, heads: int, seq_len: int) -> int:
    """Query rows per attention block: attn_block as given; None = DEFAULT_ATTN_BLOCK, or fewer (not under
    MIN_ATTN_BLOCK) where one fp32 score block [B, heads, rows, T] would pass SCORE_BLOCK_BYTES."""
    if attn_block is not None:
        return attn_block
    row_bytes = batch_size * heads * seq_len * ACC_BYTES
    return max(MIN_ATTN_BLOCK, min(DEFAULT_ATTN_BLOCK, SCORE_BLOCK_BYTES // row_bytes))


@dataclass
class Estimate:
    """A prediction: bytes per term at the step's worst stage, the step peak (the step's terms) and the private
    peak (every term). `stage` is where the step peaks; `stage_peaks` the step total of every stage."""
    method: str
    seq_len: int
    batch_size: int
    step_peak_bytes: int
    private_peak_bytes: int
    terms: dict[str, int]
    stage: str
    stage_peaks: dict[str, int]
    settings: dict = field(default_factory=dict)

    @property
    def dominant(self) -> str:
        """The largest term."""
        return max(self.terms, key=self.terms.get)

    def as_json(self) -> dict:
        """What `mesp estimate --json` prints: MiB figures (3 decimals) and the dominant term."""
        mib = lambda b: round(b / MiB, 3)  # noqa: E731
        return {"method": self.method, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "step_peak_mib": mib(self.step_peak_bytes), "private_peak_mib": mib(self.private_peak_bytes),
                "terms": {k: mib(v) for k, v in self.terms.items()}, "dominant": self.dominant,
                "peak_stage": self.stage, "stage_peaks_mib": {k: mib(v) for k, v in self.stage_peaks.items()},
                "settings": self.settings}


# ---- the model's config, without its weights ------------------------------------------------------------

def model_config(source: str) -> ModelConfig:
    """The ModelConfig of a preset, a Hugging Face directory (config.json) or a GGUF file (its metadata),
    without reading a weight."""
    from .loaders import resolve_source, source_config

    src = str(source)
    return source_config(src, *resolve_source(src))


# ---- sizes ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shapes:
    """Byte sizes of the tensors the engines hold, for one configuration."""
    B: int
    T: int
    d: int
    F: int
    qd: int  # Hq * D
    kvd: int  # Hkv * D
    Hq: int
    L: int
    V: int
    e: int  # compute dtype bytes
    adapter_e: int  # LoRA weights' dtype bytes (mesp.lora.adapter_dtype: fp32 under a bf16 base)
    qk_norm: bool
    sandwich: bool
    activation: str  # the MLP activation's config.json name

    def X(self, tokens=None):
        return self.B * (self.T if tokens is None else tokens) * self.d * self.e

    def Q(self, tokens=None):
        return self.B * (self.T if tokens is None else tokens) * self.qd * self.e

    def K(self, tokens=None):
        return self.B * (self.T if tokens is None else tokens) * self.kvd * self.e

    def Fm(self, tokens=None, element=None):
        return self.B * (self.T if tokens is None else tokens) * self.F * (element or self.e)

    def upcast(self, width: int) -> int:
        """A LoRA projection's input [B, T, width] cast to the adapter's dtype (0 when the dtypes agree): the
        modules' LoRA branch runs in the adapter's dtype, as PEFT's does."""
        return 0 if self.adapter_e == self.e else self.B * self.T * width * self.adapter_e

    def lse(self):
        return self.B * self.Hq * self.T * ACC_BYTES

    def score_block(self, attn_block):
        return self.B * self.Hq * min(attention_rows(attn_block, self.B, self.Hq, self.T), self.T) * self.T * ACC_BYTES

    def logits(self, element):
        return self.B * self.T * self.V * element


def shapes_of(config: ModelConfig, seq_len: int, batch_size: int, dtype: str) -> Shapes:
    spec = config.layer_spec(0)
    return Shapes(B=batch_size, T=seq_len, d=config.hidden_size, F=config.intermediate_size,
                  qd=config.num_attention_heads * config.head_dim, kvd=config.num_key_value_heads * config.head_dim,
                  Hq=config.num_attention_heads, L=config.num_hidden_layers, V=config.vocab_size,
                  e=ELEMENT_BYTES[dtype], adapter_e=adapter_dtype(getattr(torch, dtype)).itemsize,
                  qk_norm=bool(spec.qk_norm), sandwich=bool(spec.sandwich_norms), activation=spec.activation.hf_name)


def lora_bytes_per_layer(config: ModelConfig, rank: int, targets, element: int) -> int:
    """One layer's LoRA A and B (r x in + out x r per targeted projection), `element` bytes each."""
    shapes = expected_shapes(config)
    total = 0
    for name in targets:
        for prefix in ("self_attn", "mlp"):
            shape = shapes.get(f"model.layers.0.{prefix}.{name}.weight")
            if shape is not None:
                total += rank * (shape[0] + shape[1]) * element
    return total


def weight_bytes(config: ModelConfig, element: int, quantize: str | None, weights: str) -> int:
    """The base weights the process keeps in memory: every tensor in `element` bytes, matrices in their
    quantized form (int8: a byte and a per-row fp32 scale; int4: half a byte and an fp32 (scale, zero) per group
    of 64, the tables int8), none of a streamed file's matrices and none of a mapped one's tensors (weights
    "mapped": loaders.mapped_base; file-backed pages are not private)."""
    total = 0
    for name, shape in expected_shapes(config).items():
        n = math.prod(shape)
        matrix = name.endswith(".weight") and len(shape) == 2
        if not matrix:
            total += 0 if weights == "mapped" else n * element
        elif weights in ("stream", "mapped"):
            continue
        elif quantize == "int8" or (quantize == "int4" and name in ("model.embed_tokens.weight", "lm_head.weight")):
            total += n + shape[0] * 4
        elif quantize == "int4":
            total += n // 2 + (n // 64) * 8
        else:  # dense (or a GGUF's blocks, which the dense size bounds)
            total += n * element
    return total


# ---- per method: the tensors alive at each stage's worst moment ------------------------------------------

def kept_saved_bytes(s: Shapes) -> int:
    """What a kept layer holds from its forward to its backward (mesp.methods.mesp.KEPT_SLOTS): its Saved but o
    and M, i.e. n1, q, k, v, lse, o_flat, h1, n2, G, U (+ a and d with sandwich norms, + q_pre and k_pre with
    q/k norms)."""
    return attention_saved(s) - s.Q() + s.X() + 2 * s.Fm() + (s.X() if s.sandwich else 0)


def default_keep_layers(config: ModelConfig, seq_len: int, batch_size: int = 1, dtype: str = "float32",
                        method: str = "mesp", offload_checkpoints: bool = False, weights: str = "resident",
                        quantize: str | None = None) -> int:
    """How many of the last layers `mesp train` lets keep their intermediates by default (its keep_layers None):
    as many as fit in the bytes of two fp32 full-vocabulary logits tensors [B, T, V], the logits and their
    gradient that autograd's loss holds at once (three such tensors in all: full_logits_bytes) and MeSP's chunked
    head never builds. A kept layer skips its recompute, about a third of its products: with one logits tensor's
    worth (10 of Qwen2.5-0.5B's 24 layers) `mesp train`'s step was 1.09x transformers + PEFT with gradient
    checkpointing at T=1024, with two (20 layers, and huge pages, mesp.hugepages) 0.69x (0.81x at T=256), and
    the whole process stays under half that peer's private footprint (0.32x, 0.44x; `mesp bench peers`,
    docs/results.md): both grow with T. None are kept for a method other than mesp
    (only MeSP recomputes layers), or where the run asked for the least memory: offloaded checkpoints, a base
    streamed from its file (weights "stream", the default for a GGUF file: the paper's setting) or a quantized
    base (quantize int8 / int4 / gguf; with 20 kept layers an int4 Qwen2.5-0.5B run at T=256 held 951 MiB
    private, more than half of mlx-lm's 4-bit LoRA)."""
    if method != "mesp" or offload_checkpoints or weights == "stream" or quantize not in (None, "none"):
        return 0
    s = shapes_of(config, seq_len, batch_size, dtype)
    per_layer = kept_saved_bytes(s)
    return min(s.L, 2 * s.logits(ACC_BYTES) // per_layer) if per_layer > 0 else 0  # estimate() rejects T or B < 1


def attention_saved(s: Shapes, tokens=None) -> int:
    """n1, q, k, v, o, lse, o_flat, h1 (+ a, q_pre, k_pre where the family has them)."""
    n = 2 * s.X(tokens) + 3 * s.Q() + 2 * s.K() + s.lse()
    if s.sandwich:
        n += s.X(tokens)
    if s.qk_norm:
        n += s.Q() + s.K()
    return n


def activation_backward_transient(s: Shapes, tokens) -> int:
    """The activation backward's fp32 temporaries beside its inputs: swiglu_backward's sigma(G), g_up and the
    slope; geglu_backward's tanh, g_up, the slope's polynomial and the slope; plus G upcast when the compute
    dtype is not fp32."""
    temporaries = 3 if s.activation == "silu" else 4
    return (temporaries + (s.e != ACC_BYTES)) * s.Fm(tokens, ACC_BYTES)


def mesp_stages(s: Shapes, chunk: int, keep: int, attn_block: int, offload: bool, grads_layer: int,
                keep_grads: bool, loss_tokens: int) -> dict[str, dict[str, int]]:
    """MeSP (mesp.methods.mesp.gradients) stage by stage."""
    L, X = s.L, s.X()
    c = min(chunk, s.T) if chunk else s.T
    chunked = c < s.T
    ckpt_all = X if offload else L * X  # a scratch file's slots are not allocator memory; x itself is
    saved = kept_saved_bytes(s)
    kept_before = max(0, min(keep, L) - 1) * saved  # every kept layer but the one running

    # forward: the last layer runs with every checkpoint put; a kept layer saves instead of dropping
    # n1, q, k, v, o, a score block and logsumexp's temporary of its size
    attend = s.X() + 2 * s.Q() + 2 * s.K() + 2 * s.score_block(attn_block)
    if chunked:  # y, q, k, v, o whole; one chunk's h1, n2, G, U, act(G), M
        mlp_forward = X + 2 * s.Q() + 2 * s.K() + 2 * s.X(c) + 4 * s.Fm(c)
    else:  # h1, G, U, act(G), M
        mlp_forward = X + 4 * s.Fm()
    # a kept layer builds its Saved as it goes: at worst all of it, M and the activation's temporary (and o
    # whole beside the chunks)
    kept_forward = saved + 2 * s.Fm(c) + (s.Q() if chunked else 0)
    forward_working = max(mlp_forward, attend, kept_forward if keep else 0)
    forward = {CHECKPOINTS: ckpt_all, KEPT: kept_before, WORKING: forward_working}

    loss = {CHECKPOINTS: ckpt_all, KEPT: min(keep, L) * saved, WORKING: 0, LOSS: loss_chunk_bytes(s, loss_tokens)}

    # backward: the worst of the MLP's activation backward and attention's backward
    if chunked:  # the engine's docstring: attention's tensors whole, the token-wise ones for one chunk
        whole = 3 * s.Q() + 2 * s.K() + 2 * s.lse() + (s.Q() + s.K() if s.qk_norm else 0)  # q o go k v lse delta
        per_chunk = (2 + 2 * s.sandwich) * s.X(c) + s.Q(c)  # n2, h1 (a, d), o_flat
        mlp_peak = whole + per_chunk + 3 * s.Fm(c) + activation_backward_transient(s, c)  # G, U, gM
        attention_peak = (3 * s.Q() + 2 * s.K() + 2 * s.lse()  # q, go, gq, k, v, lse, delta
                          + 2 * s.B * s.T * s.kvd * ACC_BYTES + 2 * s.score_block(attn_block)  # gk gv; P, gS
                          + s.B * s.T * s.qd * ACC_BYTES)  # k or v broadcast over a group's heads
    else:  # the paper's layer: the whole Saved, then the MLP's backward (n2, G, U, gM), then attention's
        mlp_peak = attention_saved(s) + X + 3 * s.Fm() + activation_backward_transient(s, None)
        attention_peak = (3 * X + 5 * s.Q() + 2 * s.K() + s.lse()  # gh1, n1 (x counted), q, o, go, its copy, gq
                          + 2 * s.B * s.T * s.kvd * ACC_BYTES + 2 * s.score_block(attn_block))  # gk, gv; P, gS
    backward_working = X + max(mlp_peak, attention_peak)  # + g
    # a kept layer's backward starts from what it kept (every chunk's tensors); a chunk's M recomputed, then gM
    # in its place beside the activation backward's temporaries
    kept_working = X + saved + s.Fm(c) + activation_backward_transient(s, c) if keep else 0
    first = {CHECKPOINTS: ckpt_all, KEPT: kept_before, WORKING: max(backward_working, kept_working), GRADS: 0}
    last = {CHECKPOINTS: X, KEPT: 0, WORKING: backward_working,
            GRADS: (L - 1) * grads_layer if keep_grads else 0}
    backward = max(first, last, key=lambda t: sum(t.values()))
    return {"forward": forward, "loss": loss, "backward": backward}


def loss_chunk_bytes(s: Shapes, loss_tokens: int) -> int:
    """chunked_loss's pass over the vocabulary: the final x, its norm and g_hidden [B, T, d]; one chunk's rows h,
    their fp32 gradient, a [n, d] product; one fp32 logits slice of at most LOSS_CHUNK_BYTES."""
    n = min(loss_tokens, s.B * s.T)
    vc = max(1, min(s.V, LOSS_CHUNK_BYTES // (n * ACC_BYTES), LOSS_CHUNK_BYTES // (s.d * ACC_BYTES)))
    rows = n * s.d
    return 3 * s.X() + rows * (2 * s.e + ACC_BYTES) + n * vc * ACC_BYTES


def full_logits_bytes(s: Shapes) -> int:
    """full_logits_loss under autograd, at log-softmax's backward: its saved fp32 output, the incoming gradient
    and its own result, three fp32 [B, T, V] tensors. Under a bf16 base the bf16 logits are gone by then (the
    cast to fp32 saves nothing for its backward), so the count is the same in every dtype."""
    return 3 * s.logits(ACC_BYTES)


def autograd_layer_saved(s: Shapes) -> int:
    """What autograd keeps of one layer for its backward (transformers-style modules, mesp.model.LayerRun): n1,
    q, k, v, attention's output and its merged heads, h1, n2 ([B, T, d]-sized) and G, U, act(G), M; under a
    bf16 base also each LoRA projection's input cast to the fp32 adapter (q, k, v, gate, up, o, down)."""
    upcasts = 5 * s.upcast(s.d) + s.upcast(s.qd) + s.upcast(s.F)
    return 3 * s.X() + 3 * s.Q() + 2 * s.K() + 4 * s.Fm() + upcasts


def module_forward_working(s: Shapes, graph: bool = False) -> int:
    """A layer's forward through the modules: h1, G, U, act(G), M, and the LoRA branch's output beside the
    frozen one for half of the MLP's projections on average; without a graph, under a bf16 base, also down's
    input cast to the fp32 adapter (a graph keeps that cast, counted in autograd_layer_saved)."""
    return s.X() + 4 * s.Fm() + s.Fm() // 2 + (0 if graph else s.upcast(s.F))


def mebp_stages(s: Shapes, offload: bool, grads_layer: int, keep_grads: bool) -> dict[str, dict[str, int]]:
    """MeBP (mesp.methods.mebp.gradients): checkpoints, full logits under autograd, one layer under autograd."""
    L, X = s.L, s.X()
    ckpt_all = X if offload else L * X
    forward = {CHECKPOINTS: ckpt_all, WORKING: module_forward_working(s)}
    loss = {CHECKPOINTS: ckpt_all, WORKING: 2 * X, LOGITS: full_logits_bytes(s)}
    # g; the layer's graph; gM, gG, gU (down's fp32 input, under a bf16 base, is freed by its backward first)
    working = X + autograd_layer_saved(s) + 3 * s.Fm() - s.upcast(s.F)
    first = {CHECKPOINTS: ckpt_all, WORKING: working, GRADS: 0}
    last = {CHECKPOINTS: X, WORKING: working, GRADS: (L - 1) * grads_layer if keep_grads else 0}
    return {"forward": forward, "loss": loss, "backward": max(first, last, key=lambda t: sum(t.values()))}


def autograd_stages(s: Shapes, grads_layer: int) -> dict[str, dict[str, int]]:
    """Autograd over the whole model: every layer's graph until the backward frees it."""
    graph = s.L * autograd_layer_saved(s) + s.X()
    return {"forward": {KEPT: graph, WORKING: module_forward_working(s, graph=True)},
            "loss": {KEPT: graph, LOGITS: full_logits_bytes(s)},
            "backward": {KEPT: graph, LOGITS: s.logits(ACC_BYTES), WORKING: 3 * s.Fm(), GRADS: grads_layer}}


def mezo_stages(s: Shapes, loss_tokens: int, grads_layer: int, keep_grads: bool) -> dict[str, dict[str, int]]:
    """MeZO: two inference passes (the modules, no graph) and the chunked loss without its gradient; the
    gradient estimate's buffers (mesp.methods.mezo.gradients; training's update keeps none)."""
    estimate_buffers = s.L * grads_layer if keep_grads else 0  # the estimate, returned as the gradients
    # x, the layer's output and its forward (SDPA holds no score matrix)
    return {"forward": {WORKING: s.X() + module_forward_working(s), GRADS: estimate_buffers},
            "loss": {LOSS: loss_chunk_bytes(s, loss_tokens) - s.X(), GRADS: estimate_buffers}}


# ---- the estimate -----------------------------------------------------------------------------------------

def estimate(config: ModelConfig, seq_len: int, batch_size: int = 1, rank: int = 8, method: str = "mesp",
             dtype: str = "float32", quantize: str | None = None, weights: str = "resident",
             offload_checkpoints: bool = False, targets=ALL_TARGETS, token_chunk: int | None = None,
             keep_layers: int = 0, loss_chunk: int | None = None, attn_block: int | None = None,
             optimizer: str = "adamw", per_layer_update: bool = False,
             runtime_floor: int | None = None) -> Estimate:
    """Predict one training step's allocator peak and the whole process's private peak (module docstring).

    token_chunk: None = the engine's default (default_token_chunk), 0 = whole sequence. attn_block: None = the
    engine's default (attention_rows). keep_layers: how many of
    the last layers keep their intermediates. per_layer_update: gradients are consumed layer by layer (mesp
    train's default for MeSP) instead of all returned at the end (compute_gradients). runtime_floor: bytes;
    None measures it once (mesp.memory.runtime_floor_bytes), 0 where unknown."""
    if method not in METHODS:
        raise MespError(f"method: unknown {method!r}; choose from {', '.join(METHODS)}")
    if dtype not in ELEMENT_BYTES:
        raise MespError(f"dtype: unknown {dtype!r}; choose from {', '.join(ELEMENT_BYTES)}")
    for name, value, least in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1), ("rank", rank, 1),
                               ("attn_block", 1 if attn_block is None else attn_block, 1),
                               ("keep_layers", keep_layers, 0), ("token_chunk", token_chunk or 0, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise MespError(f"{name}: must be an integer >= {least}, got {value!r}")
    if offload_checkpoints and method not in CHECKPOINTING:
        raise MespError(f"offload_checkpoints: method {method} keeps no per-layer checkpoints; use mesp or mebp")
    s = shapes_of(config, seq_len, batch_size, dtype)
    e = s.e
    grads_layer = lora_bytes_per_layer(config, rank, targets, s.adapter_e)
    keep_grads = not per_layer_update
    loss_tokens = loss_chunk or DEFAULT_LOSS_CHUNK
    chunk = default_token_chunk(seq_len) if token_chunk is None else token_chunk
    if method == "mesp":
        stages = mesp_stages(s, chunk, min(keep_layers, s.L), attn_block, offload_checkpoints, grads_layer,
                             keep_grads, loss_tokens)
    elif method == "mebp":
        stages = mebp_stages(s, offload_checkpoints, grads_layer, keep_grads)
    elif method == "autograd":
        stages = autograd_stages(s, s.L * grads_layer)
    else:
        stages = mezo_stages(s, loss_tokens, grads_layer, keep_grads)
    if quantize or weights == "stream":  # a matrix decodes a block of rows at each use
        largest = max(math.prod(shape) for shape in expected_shapes(config).values())
        for terms in stages.values():
            terms[DECODE] = min(largest, DECODE_ELEMENTS) * e
    totals = {name: sum(t.values()) for name, t in stages.items()}
    peak_stage = max(totals, key=totals.get)
    step_terms = {k: v for k, v in stages[peak_stage].items()}
    lora = s.L * grads_layer
    states = OPTIMIZER_STATES.get(optimizer, 0) if method != "mezo" else 0
    state_bytes = s.L * lora_bytes_per_layer(config, rank, targets, ACC_BYTES)  # mesp.optim: fp32 state
    floor = runtime_floor_bytes() if runtime_floor is None else runtime_floor
    terms = {RUNTIME: floor or 0, WEIGHTS: weight_bytes(config, e, quantize, weights),
             LORA_STATE: lora + states * state_bytes, **step_terms}
    settings = {"rank": rank, "dtype": dtype, "quantize": quantize, "weights": weights,
                "offload_checkpoints": offload_checkpoints, "token_chunk": chunk if method == "mesp" else None,
                "keep_layers": keep_layers if method == "mesp" else 0, "loss_chunk": loss_tokens,
                "attn_block": attention_rows(attn_block, batch_size, config.num_attention_heads, seq_len),
                "optimizer": optimizer, "per_layer_update": per_layer_update}
    return Estimate(method=method, seq_len=seq_len, batch_size=batch_size, step_peak_bytes=totals[peak_stage],
                    private_peak_bytes=sum(terms.values()), terms=terms, stage=peak_stage, stage_peaks=totals,
                    settings=settings)


def longest_fitting(config: ModelConfig, budget_bytes: int, measure: str = "private", **options) -> int:
    """The longest sequence length whose estimate fits `budget_bytes` (measure "private": the private peak;
    "step": the step's allocator peak), up to the model's max_position_embeddings; 0 when none does. The
    estimate grows with T, so a binary search finds it."""
    key = "private_peak_bytes" if measure == "private" else "step_peak_bytes"
    fits = lambda T: getattr(estimate(config, T, **options), key) <= budget_bytes  # noqa: E731
    lo, hi = 0, config.max_position_embeddings
    if fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
