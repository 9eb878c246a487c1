"""The MeSP training step as an ExecuTorch program: `mesp export --format executorch` and the module it exports.

    .et/bin/mesp export --format executorch --model qwen2.5-0.5b --rank 8 --seq-len 256 --data train.jsonl --out et/
    build/runner/mesp-runner et/step.pte et/base.ptd --data et/tokens.bin --steps 5 --out run/adapter_model.safetensors

TrainingStep is an nn.Module whose forward is one whole step of MeSP, run by the engine itself
(mesp.methods.mesp.gradients: the forward keeping only layer inputs, the per-layer recompute, the hand-derived
backward, the chunked LM-head loss) with the optimizer's update (SGD or AdamW, mesp.optim's arithmetic) of each
layer as soon as its gradients exist (the engine's on_layer_grads).
Nothing in it uses autograd, so the step is an ordinary forward program that torch.export traces and
ExecuTorch runs:

    forward(input_ids [B, T] int64, labels [B, T] int64, *state) -> (loss fp32 [], *updated state)

labels follow transformers (-100 = no loss; shifted inside, the loss divided by the count of labelled targets).
state: every LoRA tensor in lora_names order (PEFT keys, lora_A then lora_B per projection), then the
optimizer's (adamw: each tensor's exp_avg, then each one's exp_avg_sq, then the step count, fp32 []). The host
keeps them and feeds each step's outputs back as the next step's inputs. Shapes are fixed at export: B, T, and
the LM head runs on every position but each row's last (a masked one counts for nothing), so no
data-dependent shape is traced. Right padding needs no attention mask: a causal model's real tokens never see
the pads after them, and the pads' labels are -100.

The frozen base weights are the module's buffers: exported as constants tagged external (external_constants),
so the program names them and base.ptd, which the runtime memory-maps (file-backed pages, not private memory),
holds them. With --quantize int8 each matrix is held as its int8 codes and per-channel scales
(ProgramInt8Weight: two buffers, dequantized inside the step a block of rows at a time by portable ops), so
base.ptd is a quarter of the fp32 file and its values are mesp train --quantize int8's. The CLI traces a
model of placeholders (mesp.loaders.load_placeholders: no memory) and writes base.ptd itself, the real weights
one at a time (mesp.executorch_data, ExecuTorch's own format byte for byte).
The program's method `initial_state` returns the starting state (the adapter as mesp.add_lora or --adapter
makes it, zero moments and step), so a runner needs nothing but the two files. Constant methods carry the rest:
`lora_names` (the PEFT keys joined by newlines), `adapter_config` (PEFT's JSON), `batch_size`, `seq_len`,
`optimizer`.

ExecuTorch itself lives in an environment of its own (.et/, made by scripts/dev.sh runner): torch.export of
the step needs only torch; to_edge / to_executorch import executorch lazily.
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE
from .errors import MespError
from .executorch_data import WeightSource, external_entries, write_ptd
from .executorch_plan import offset_plan
from .fileio import atomic_write
from .lora import peft_key
from .methods.common import LossBatch
from .methods.mesp import gradients
from .optim import AdamW
from .quant import FrozenWeight, Int8Weight

log = logging.getLogger(__name__)

PROGRAM_FILE, WEIGHTS_FILE, TOKENS_FILE = "step.pte", "base.ptd", "tokens.bin"
WEIGHTS_TAG = WEIGHTS_FILE[:-4]  # the external-constants tag ExecuTorch names the file by
OPTIMIZERS = ("sgd", "adamw")
# most weight values an int8 product dequantizes at once inside the program: each block is an arena tensor,
# so it is kept well under the arena's own size (2 MiB of codes, 8 MiB in fp32)
PROGRAM_CHUNK_ELEMENTS = 1 << 21


class TrainingStep(nn.Module):
    """One MeSP step of `model` (with its LoRA added) on a fixed [batch, seq_len] token batch, then the update:
    sgd (torch.optim.SGD without momentum: g += wd * p; p -= lr * g) or adamw (mesp.optim.AdamW's defaults:
    betas (0.9, 0.999), eps 1e-8, decoupled weight decay), both at a constant lr."""

    def __init__(self, model, batch: int, seq_len: int, lr: float, optimizer: str = "sgd",
                 weight_decay: float = 0.0, **engine_options):
        super().__init__()
        if seq_len < 2:
            raise MespError(f"seq_len: {seq_len} leaves no token to predict; use at least 2")
        if optimizer not in OPTIMIZERS:
            raise MespError(f"optimizer {optimizer}: the ExecuTorch step exports {', '.join(OPTIMIZERS)} only")
        if not weight_decay >= 0:
            raise MespError(f"weight_decay: must be >= 0, got {weight_decay!r}")
        self.model, self.batch, self.seq_len, self.lr = model, batch, seq_len, float(lr)
        self.optimizer, self.weight_decay = optimizer, float(weight_decay)
        self.engine_options = engine_options
        self.lora_paths = list(model.lora_parameters())
        if not self.lora_paths:
            raise MespError("the model has no LoRA adapter: call mesp.add_lora first")
        self.lora_names = [peft_key(p) for p in self.lora_paths]
        # every position but each row's last has a target: fixed flat row indices of the loss
        rows = torch.arange(batch * seq_len, device=model.device).view(batch, seq_len)[:, :-1].reshape(-1)
        self.register_buffer("counted_rows", rows, persistent=False)

    @property
    def state_names(self) -> list[str]:
        """The state tensors' names in forward's order (the optimizer's as mesp.optim keys them)."""
        if self.optimizer == "sgd":
            return list(self.lora_names)
        return ([*self.lora_names] + [f"{k}.exp_avg" for k in self.lora_names]
                + [f"{k}.exp_avg_sq" for k in self.lora_names] + ["step"])

    def initial_state(self) -> list[torch.Tensor]:
        """The LoRA tensors the model holds now (copies), in lora_names order, then the optimizer's zeros."""
        params = self.model.lora_parameters()
        lora = [params[p].detach().clone() for p in self.lora_paths]
        if self.optimizer == "sgd":
            return lora
        moments = [torch.zeros_like(t, dtype=torch.float32) for t in lora]
        return [*lora, *moments, *[m.clone() for m in moments], torch.zeros((), device=self.model.device)]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, *state: torch.Tensor):
        if len(state) != len(self.state_names):
            raise MespError(f"expected {len(self.state_names)} state tensors, got {len(state)}")
        n = len(self.lora_paths)
        lora = state[:n]
        targets = torch.full_like(labels, IGNORE)
        targets[:, :-1] = labels[:, 1:]
        count = (targets != IGNORE).sum().clamp(min=1).to(torch.float32)  # all masked: loss 0, no update
        batch = LossBatch(input_ids, None, targets, count, self.counted_rows)
        modules = dict(self.model.named_modules())
        index = {name: i for i, name in enumerate(self.lora_names)}
        updated = [None] * len(state)
        if self.optimizer == "adamw":  # the step count first: every tensor's update reads the new one
            updated[-1] = state[-1] + 1

        def update(layer, grads):
            """A layer's update as soon as its gradients exist (the engine's on_layer_grads: its LoRA tensors are
            read no more), so no gradient outlives its layer in the program's arena and each update, written in
            place into its state tensor, is that tensor's last reader."""
            at = [index[name] for name in grads]
            g = [grads[name].to(torch.float32) for name in grads]
            p = [lora[i] for i in at]
            if self.optimizer == "sgd":
                new = self.sgd(p, g)
            else:
                new = self.adamw(p, g, [state[n + i] for i in at], [state[2 * n + i] for i in at], updated[-1])
            for k, i in enumerate(at):
                for j, t in enumerate(new[k::len(at)]):
                    updated[j * n + i] = t

        held = []
        try:  # the step's LoRA tensors take the parameters' place for the engine (restored after)
            for path, t in zip(self.lora_paths, lora):
                owner, attr = path.rsplit(".", 1)
                held.append((modules[owner], attr, modules[owner]._parameters[attr]))
                modules[owner]._parameters[attr] = t  # a plain tensor: setattr accepts only a Parameter
            loss, _ = gradients(self.model, batch, on_layer_grads=update, **self.engine_options)
        finally:
            for module, attr, value in held:
                module._parameters[attr] = value
        missing = [self.state_names[i] for i, t in enumerate(updated) if t is None]
        if missing:
            raise MespError(f"the engine gave no gradient for {', '.join(missing[:3])}")
        return (loss, *updated)

    def sgd(self, lora, grads):
        if self.weight_decay:
            grads = [g + self.weight_decay * p for p, g in zip(lora, grads)]
        return [torch.add(p, g, alpha=-self.lr) for p, g in zip(lora, grads)]

    def adamw(self, lora, grads, exp_avg, exp_avg_sq, step):
        """mesp.optim.AdamW._step, out of place, with the step count a tensor (already advanced: this step's)."""
        b1, b2, eps = AdamW().beta1, AdamW().beta2, AdamW().eps
        step_size = self.lr / (1 - torch.pow(b1, step))
        bias2_sqrt = torch.sqrt(1 - torch.pow(b2, step))
        new_p, new_m, new_v = [], [], []
        for p, g, m, v in zip(lora, grads, exp_avg, exp_avg_sq):
            if self.weight_decay:
                p = p * (1 - self.lr * self.weight_decay)
            m = torch.lerp(m, g, 1 - b1)
            v = torch.addcmul(v * b2, g, g, value=1 - b2)
            denom = torch.sqrt(v) / bias2_sqrt + eps
            new_p.append(p - step_size * (m / denom))
            new_m.append(m)
            new_v.append(v)
        return [*new_p, *new_m, *new_v]


class ProgramInt8Weight(Int8Weight):
    """An Int8Weight whose codes and scales are buffers of the module that holds it (`{attr}_q`,
    `{attr}_scale`), so that torch.export names them as base.ptd's constants, computed in ops ExecuTorch's
    portable kernels have: rows by gathering (Int8Weight's range check reads the ids' values, which a trace
    has not), each product over blocks of at most PROGRAM_CHUNK_ELEMENTS dequantized rows, joined by cat rather
    than written into a preallocated output (a traced write copies the whole output)."""

    chunk_elements = PROGRAM_CHUNK_ELEMENTS

    def __init__(self, owner: nn.Module, attr: str, weight: Int8Weight):
        FrozenWeight.__init__(self, weight.shape, weight.dtype)
        self.owner, self.attr, self.block = owner, attr, weight.block

    @property
    def q(self):  # read at each use: torch.export swaps the module's buffers for its own while it traces
        return getattr(self.owner, f"{self.attr}_q")

    @property
    def scale(self):
        return getattr(self.owner, f"{self.attr}_scale")

    rows = Int8Weight.gathered_rows

    def linear(self, x):
        N, K = self.shape
        x2 = x.reshape(-1, K)
        parts = [F.linear(x2, self.dense_rows(n0, n1, x.dtype)) for n0, n1 in self.row_blocks()]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return y.view(*x.shape[:-1], N)


@contextlib.contextmanager
def program_weights(model):
    """Every Int8Weight of `model` made a ProgramInt8Weight over buffers of its module while the step is traced;
    the model as it was after."""
    swapped = []
    try:
        for module in model.modules():
            for attr, w in list(vars(module).items()):
                if isinstance(w, Int8Weight):
                    module.register_buffer(f"{attr}_q", w.q)
                    module.register_buffer(f"{attr}_scale", w.scale)
                    setattr(module, attr, ProgramInt8Weight(module, attr, w))
                    swapped.append((module, attr, w))
        yield model
    finally:
        for module, attr, w in swapped:
            setattr(module, attr, w)
            del module._buffers[f"{attr}_q"], module._buffers[f"{attr}_scale"]


def program_tensors(named_weights):
    """(the program's constant name, tensor) of every base weight in (HF name, weight) pairs: a dense tensor as
    itself, an Int8Weight as its codes and scales (program_weights' buffers), keyed as the step's program names
    them (TrainingStep holds the model as `model`)."""
    for name, w in named_weights:
        if isinstance(w, torch.Tensor):
            yield f"model.{name}", w
        elif isinstance(w, Int8Weight):
            yield f"model.{name}_q", w.q
            yield f"model.{name}_scale", w.scale
        else:
            raise MespError(f"{name}: a {type(w).__name__} has no form in base.ptd; export dense or int8 weights")


class InitialState(nn.Module):
    """The program's `initial_state` method: the starting state, as constants."""

    def __init__(self, tensors: list[torch.Tensor]):
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_buffer(f"t{i}", t)
        self.n = len(tensors)

    def forward(self):
        return tuple(getattr(self, f"t{i}").clone() for i in range(self.n))


def export_step(step: TrainingStep):
    """torch.export of the step's forward and of its initial_state method: {method name: ExportedProgram}."""
    ids = torch.zeros(step.batch, step.seq_len, dtype=torch.long, device=step.model.device)
    state = step.initial_state()
    with torch.no_grad(), program_weights(step.model):
        forward = torch.export.export(step, (ids, ids.clone(), *state), strict=False)
        initial = torch.export.export(InitialState(state), (), strict=False)
    return {"forward": forward, "initial_state": initial}


def to_executorch_program(programs: dict, constant_methods: dict):
    """ExecuTorch's portable lowering (no delegate: XNNPACK would pack the frozen weights into private memory
    at load), every constant tagged for the external data file: an ExecutorchProgramManager.

    forward's inputs and outputs stay out of its memory plan: the runner hands the state's own buffers in and
    the same buffers out (each update is the step's last, elementwise reader of its input), so the state exists
    once, in the runner, and the planned arena holds only the step's activations and gradients, placed by
    mesp.executorch_plan where that beats ExecuTorch's greedy plan."""
    try:
        from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge
        from executorch.exir.memory_planning import MemoryPlanningAlgorithmSuite, greedy
        from executorch.exir.passes import MemoryPlanningPass
    except ImportError as e:
        raise MespError("mesp export --format executorch needs ExecuTorch: run .et/bin/mesp "
                        "(scripts/dev.sh runner makes .et)") from e
    edge = to_edge(programs, constant_methods=constant_methods,
                   compile_config=EdgeCompileConfig(_check_ir_validity=False))
    algorithms = MemoryPlanningAlgorithmSuite([greedy, offset_plan])  # the smaller plan of the two
    planning = {"forward": MemoryPlanningPass(algorithms, alloc_graph_input=False, alloc_graph_output=False)}
    return edge.to_executorch(ExecutorchBackendConfig(external_constants=lambda node: WEIGHTS_TAG,
                                                      memory_planning_pass=planning))


def model_weights(model) -> WeightSource:
    """The model's own base weights as the program's constants (program_tensors): the weight source when they
    are real."""
    return lambda: program_tensors(model.base_weights())


def source_weights(source, quantize: str | None = None) -> WeightSource:
    """load_model(source, quantize=quantize)'s base weights one at a time (mesp.loaders.iter_weights, each
    quantized as load_model quantizes it), as model_weights gives them: the weight source of a model of
    placeholders."""
    from .loaders import check_mode, iter_weights, place_weight

    quantize, cpu = check_mode(quantize), torch.device("cpu")
    return lambda: program_tensors((name, place_weight(name, w, quantize, w.dtype, cpu))
                                   for name, w in iter_weights(source))


def export_executorch(model, out_dir, batch: int = 1, seq_len: int = 256, lr: float = 1e-3,
                      optimizer: str = "sgd", weight_decay: float = 0.0, weights: WeightSource | None = None,
                      **engine_options) -> dict:
    """Write out_dir/step.pte and out_dir/base.ptd for `model` (with its LoRA added). Returns what was written.

    weights: where base.ptd's base weights come from (model_weights(model) by default: the model's own); a model
    of placeholders (mesp.loaders.load_placeholders) is traced without holding its weights, and
    source_weights(its source) gives the real ones to the file, one at a time (mesp.executorch_data)."""
    out = Path(out_dir)
    step = TrainingStep(model, batch, seq_len, lr, optimizer, weight_decay, **engine_options)
    out.mkdir(parents=True, exist_ok=True)
    lora_config = getattr(model, "lora_config", None)
    constants = {"lora_names": "\n".join(step.lora_names), "batch_size": batch, "seq_len": seq_len,
                 "optimizer": optimizer,
                 "adapter_config": json.dumps(lora_config.to_peft(model) if lora_config else {})}
    log.info("exporting the step (B=%d, T=%d, %s, %d LoRA tensors)", batch, seq_len, optimizer,
             len(step.lora_names))
    program = to_executorch_program(export_step(step), constants)
    base_keys = {key for key, _ in program_tensors(model.base_weights())}
    entries = external_entries(program, WEIGHTS_TAG, base_keys)

    def write_program(tmp):
        with open(tmp, "wb") as f:
            program.write_to_file(f)

    atomic_write(out / PROGRAM_FILE, write_program)
    del program  # its copy of the constants (the placeholders' zeros) goes before the weights are read
    log.info("writing %s (%d tensors, one at a time)", out / WEIGHTS_FILE, len(entries))
    write_ptd(out / WEIGHTS_FILE, entries, weights or model_weights(model))
    return {"program": str(out / PROGRAM_FILE), "weights": str(out / WEIGHTS_FILE), "lora": step.lora_names}


TOKENS_MAGIC = b"MESPTOK2"


def write_tokens(path, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    """The runner's tokens file (runner/main.cpp): TOKENS_MAGIC, rows and seq_len as little-endian int64, then
    the [rows, seq_len] token ids and the [rows, seq_len] labels (-100 = no loss; default: the ids), each as
    little-endian int64; written atomically."""
    if input_ids.dim() != 2:
        raise MespError(f"tokens: expected [rows, seq_len], got shape {tuple(input_ids.shape)}")
    labels = input_ids if labels is None else labels
    if labels.shape != input_ids.shape:
        raise MespError(f"labels: shape {tuple(labels.shape)} differs from input_ids {tuple(input_ids.shape)}")
    header = TOKENS_MAGIC + struct.pack("<qq", *input_ids.shape)
    body = b"".join(t.to(torch.int64).contiguous().numpy().astype("<i8").tobytes() for t in (input_ids, labels))
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(header + body))


def data_tokens(model, data, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`data` (any mesp train --data source) as [rows, seq_len] ids and labels, read as mesp train reads it
    (each sample cut to seq_len), right-padded as mesp.data.collate pads (labels -100 on pads: exact without an
    attention mask, see the module's doc)."""
    from .data import collate, load_data
    from .tokenizer import load_tokenizer

    samples = load_data(data, lambda: load_tokenizer(model), seq_len=seq_len,
                        vocab_size=model.config.vocab_size).samples
    if not samples:
        raise MespError(f"--data {data}: no sample to train on")
    batch = collate(samples)
    pad = seq_len - batch.input_ids.shape[1]
    return (torch.nn.functional.pad(batch.input_ids, (0, pad)),
            torch.nn.functional.pad(batch.labels, (0, pad), value=IGNORE))


def export_executorch_cli(args) -> dict:
    """`mesp export --format executorch`: the model with the given or a fresh adapter, exported; with --data,
    the data as DIR/tokens.bin too."""
    from .loaders import load_placeholders
    from .lora import LoraConfig, add_lora, load_adapter
    from .train_config import DEFAULT_LR

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise MespError(f"--out {out}: not a directory")
    if not args.overwrite and any((out / f).exists() for f in (PROGRAM_FILE, WEIGHTS_FILE)):
        raise MespError(f"--out {out}: holds a {PROGRAM_FILE} already; pass --overwrite to replace it")
    for name in ("rank", "seq_len", "batch_size"):
        if getattr(args, name) < 1:
            raise MespError(f"--{name.replace('_', '-')}: expected a whole number >= 1, got {getattr(args, name)}")
    lr = DEFAULT_LR[args.optimizer] if args.lr is None else args.lr
    if not lr > 0:
        raise MespError(f"--lr: expected a number > 0, got {lr}")
    model = load_placeholders(args.model, quantize=args.quantize)  # traced without its weights: base.ptd gets them one at a time
    tokens = None
    if args.data:  # before the long export, so bad data fails at once
        tokens = data_tokens(model, args.data, args.seq_len)
    if args.adapter:
        load_adapter(model, args.adapter)
    else:
        add_lora(model, LoraConfig(r=args.rank, alpha=args.alpha), seed=args.seed)
    r = export_executorch(model, out, args.batch_size, args.seq_len, lr, args.optimizer, args.weight_decay,
                          weights=source_weights(args.model, args.quantize))
    if tokens is not None:
        write_tokens(out / TOKENS_FILE, *tokens)
        r["tokens"] = str(out / TOKENS_FILE)
    return {**r, "lr": lr}
