"""The MeSP step as an ExecuTorch program (mesp.export_executorch), in eager PyTorch: the step module against
autograd (masked labels included) and against the engine's own SGD and AdamW trajectories; the placeholder
weights it is traced with (mesp.loaders.load_placeholders: no memory, load_model's structure) and the base.ptd
mesp writes one weight at a time (mesp.executorch_data) against the one ExecuTorch writes itself (skipped where
ExecuTorch is missing). The exported program run by the native runner is tests/test_executorch_runner.py."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

import mesp
from mesp.data import IGNORE
from mesp.errors import MespError
from mesp.export_executorch import (PROGRAM_FILE, WEIGHTS_FILE, ProgramInt8Weight, TrainingStep,
                                    export_executorch, export_step, program_tensors, program_weights,
                                    source_weights, to_executorch_program)
from mesp.loaders import iter_weights, load_placeholders
from mesp.lora import peft_key
from mesp.memory import private_footprint_bytes
from mesp.presets import PRESETS
from mesp.optim import make_optimizer
from tests.helpers import randomize_lora_b, relative_error

B, T = 2, 24
LR = {"sgd": 0.05, "adamw": 1e-2}


def tiny_step_model(make_hf_model):
    model = mesp.load_model(make_hf_model("qwen2")[0])
    mesp.add_lora(model, mesp.LoraConfig(r=4, alpha=8.0), seed=0)
    randomize_lora_b(model, seed=1)
    return model


def tokens(seed: int, rows: int = B, vocab: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels with masked spans (a prompt-like prefix, one row's tail: padding), as the runner gets."""
    ids = torch.randint(0, vocab, (rows, T), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :5] = IGNORE
    labels[rows - 1, T - 7:] = IGNORE
    return ids, labels


def engine_trajectory(model, batches, optimizer: str, lr: float) -> tuple[list[float], dict]:
    """The reference: eager mesp's gradients (compute_gradients) and mesp.optim's update, step by step."""
    params = {peft_key(k): p for k, p in model.lora_parameters().items()}
    opt = make_optimizer(optimizer)
    losses = []
    for ids, labels in batches:
        loss, grads = mesp.compute_gradients(model, ids, labels, method="mesp")
        with torch.no_grad():
            opt.step(params, grads, lr)
        losses.append(float(loss))
    return losses, {k: p.detach().clone() for k, p in params.items()}


def test_step_gradients_equal_autograd_with_masked_labels(make_hf_model):
    model = tiny_step_model(make_hf_model)
    lr = 1e3  # p - lr g in fp32 then carries g to ~1e-7: the update's rounding is relative to lr |g|
    step = TrainingStep(model, B, T, lr)
    ids, labels = tokens(0)
    state = step.initial_state()
    loss, *updated = step(ids, labels, *state)
    ref_loss, ref_grads = mesp.compute_gradients(model, ids, labels, method="autograd")
    assert relative_error(loss, ref_loss) < 1e-6
    for name, before, after in zip(step.lora_names, state, updated):
        assert relative_error((before - after) / lr, ref_grads[name]) < 1e-5, name
    for path, t in zip(step.lora_paths, state):  # the model's own parameters are untouched by the step
        assert torch.equal(model.lora_parameters()[path].detach(), t)


def test_step_masked_rows_count_for_nothing(make_hf_model):
    """Changing a masked position's label (not its token) changes nothing: the mask, not the row, decides."""
    model = tiny_step_model(make_hf_model)
    step = TrainingStep(model, B, T, LR["sgd"])
    ids, labels = tokens(0)
    other = labels.clone()
    other[:, :5] = ids[:, :5]  # unmasked: now they count
    a = step(ids, labels, *step.initial_state())
    b = step(ids, other, *step.initial_state())
    assert relative_error(a[0], b[0]) > 1e-3  # the masked spans do carry weight when unmasked


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_step_trajectory_equals_engine(make_hf_model, optimizer):
    model = tiny_step_model(make_hf_model)
    step = TrainingStep(model, B, T, LR[optimizer], optimizer)
    batches = [tokens(s) for s in range(5)]
    state = step.initial_state()
    assert len(state) == len(step.state_names)
    losses = []
    for ids, labels in batches:
        loss, *state = step(ids, labels, *state)
        losses.append(float(loss))
    ref_losses, ref_params = engine_trajectory(model, batches, optimizer, LR[optimizer])
    assert len(set(losses)) == 5
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 1e-5 * abs(b)
    for name, t in zip(step.lora_names, state):
        assert relative_error(t, ref_params[name]) < 1e-5, name
    if optimizer == "adamw":
        assert float(state[-1]) == 5.0  # the step count travels in the state


def test_program_int8_weights_compute_what_int8_weights_do(make_hf_model, monkeypatch):
    """An int8 model's step with its weights in the program's form (buffers of their modules, products over
    several row blocks, rows gathered) gives the step of the same model's own Int8Weights, and the model is
    as it was after; the program names each matrix's codes and scales, int8 and fp32."""
    model = mesp.load_model(make_hf_model("qwen2")[0], quantize="int8")
    mesp.add_lora(model, mesp.LoraConfig(r=4, alpha=8.0), seed=0)
    randomize_lora_b(model, seed=1)
    step = TrainingStep(model, B, T, 1e3)
    ids, labels = tokens(0)
    state = step.initial_state()
    ref = step(ids, labels, *state)
    gate = model.model.layers[0].mlp.gate_proj
    monkeypatch.setattr(ProgramInt8Weight, "chunk_elements", gate.weight.numel() // 3)
    with program_weights(model):
        assert isinstance(gate.weight, ProgramInt8Weight) and len(gate.weight.row_blocks()) == 3
        assert gate.weight.q is gate.weight_q and gate.weight_q.dtype == torch.int8
        got = step(ids, labels, *state)
    assert type(gate.weight) is mesp.quant.Int8Weight and not hasattr(gate, "weight_q")
    assert relative_error(got[0], ref[0]) < 1e-6
    for name, a, b, before in zip(step.lora_names, got[1:], ref[1:], state):  # the gradients, carried by lr
        assert relative_error(a - before, b - before) < 1e-5, name
    keys = dict(program_tensors(model.base_weights()))
    assert keys["model.model.layers.0.mlp.gate_proj.weight_q"].dtype == torch.int8
    assert keys["model.model.layers.0.mlp.gate_proj.weight_scale"].shape == (gate.weight.shape[0], 1)
    assert keys["model.model.norm.weight"].dtype == torch.float32


def test_step_rejects_what_it_cannot_export(make_hf_model):
    model = tiny_step_model(make_hf_model)
    with pytest.raises(MespError, match="optimizer lion"):
        TrainingStep(model, B, T, 0.1, "lion")
    with pytest.raises(MespError, match="seq_len: 1"):
        TrainingStep(model, B, 1, 0.1)


needs_executorch = pytest.mark.skipif(importlib.util.find_spec("executorch") is None,
                                      reason="executorch missing: run with .et/bin/python (scripts/dev.sh runner)")
TINY_PRESET = {**PRESETS["qwen2.5-0.5b"]["config"], "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96}


def structure(model) -> dict:
    """Every buffer's (shape, dtype) by name, the LoRA tensors' too, and where the model came from."""
    tensors = {n: (tuple(t.shape), t.dtype) for n, t in model.named_buffers()}
    tensors.update({n: (tuple(t.shape), t.dtype) for n, t in model.lora_parameters().items()})
    return {"tensors": tensors, "source": model.source, "tokenizer": model.tokenizer_source,
            "config": model.config}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_placeholders_take_no_memory():
    """2 GB of fp32 placeholders, every byte read, leave the private footprint (RssAnon + VmSwap + RssShmem)
    where it was: they are the kernel's zero page, not memory."""
    before = private_footprint_bytes()
    model = load_placeholders("qwen2.5-0.5b")
    total = sum(w.nbytes for _, w in model.base_weights())
    assert total > 1.9e9
    assert sum(float(w.sum()) for _, w in model.base_weights()) == 0.0  # read, all of them
    assert private_footprint_bytes() - before < 32 * 2**20, (private_footprint_bytes() - before) / 2**20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_placeholders_have_load_models_structure(make_hf_model, monkeypatch, dtype):
    """A HF directory and a random preset: the same buffers (names, shapes, dtypes), LoRA tensors, source and
    config as load_model; iter_weights gives load_model's values, one by one."""
    monkeypatch.setitem(PRESETS, "tiny-qwen2.5", {"kind": "random", "config": TINY_PRESET, "description": ""})
    for source in (str(make_hf_model("qwen2")[0]), "tiny-qwen2.5"):
        real, ghost = mesp.load_model(source, dtype=dtype), load_placeholders(source, dtype=dtype)
        for m in (real, ghost):
            mesp.add_lora(m, mesp.LoraConfig(r=4, alpha=8.0), seed=0)
        assert structure(ghost) == structure(real)
        assert all(torch.equal(a, b) for a, b in zip(real.lora_parameters().values(),
                                                     ghost.lora_parameters().values()))
        held = dict(real.base_weights())
        given = dict(iter_weights(source, dtype=dtype))
        assert set(given) == set(held)
        for name, w in given.items():
            assert w.dtype == dtype and torch.equal(w, held[name]), name


@needs_executorch
@pytest.mark.parametrize("kind,quantize", [("hf", None), ("preset", None), ("hf", "int8"), ("preset", "int8")])
def test_base_ptd_equals_executorchs_own(make_hf_model, monkeypatch, tmp_path, kind, quantize):
    """The base.ptd mesp writes from a model of placeholders and the real weights one at a time is byte for byte
    the one ExecuTorch's own external-constants path writes for the real model (the same step, same LoRA): a HF
    directory's weights, and a random preset's, whose equal norms and zero biases share segments; dense, and
    int8 (load_model's codes and scales, each matrix read and quantized on its own)."""
    monkeypatch.setitem(PRESETS, "tiny-qwen2.5", {"kind": "random", "config": TINY_PRESET, "description": ""})
    source = str(make_hf_model("qwen2")[0]) if kind == "hf" else "tiny-qwen2.5"
    real, ghost = mesp.load_model(source, quantize=quantize), load_placeholders(source, quantize=quantize)
    for m in (real, ghost):
        mesp.add_lora(m, mesp.LoraConfig(r=4, alpha=8.0), seed=0)
        randomize_lora_b(m, seed=1)
    theirs = to_executorch_program(export_step(TrainingStep(real, B, T, 0.1)), {"seq_len": T})
    (tmp_path / "theirs").mkdir()
    theirs.write_tensor_data_to_file(tmp_path / "theirs")
    export_executorch(ghost, tmp_path / "ours", B, T, 0.1, weights=source_weights(source, quantize))
    ours_bytes, their_bytes = ((tmp_path / d / WEIGHTS_FILE).read_bytes() for d in ("ours", "theirs"))
    assert len(ours_bytes) == len(their_bytes) and ours_bytes == their_bytes
    assert (tmp_path / "ours" / PROGRAM_FILE).stat().st_size > 0
    if quantize:  # the matrices' codes are a quarter of their fp32 bytes
        dense = sum(w.numel() * 4 for _, w in real.base_weights())
        assert len(ours_bytes) < 0.5 * dense  # 0.40 on this tiny model (scales, vectors, alignment)


@needs_executorch
def test_base_ptd_refuses_weights_that_do_not_fit(make_hf_model, tmp_path):
    source = str(make_hf_model("qwen2")[0])
    ghost = load_placeholders(source)
    mesp.add_lora(ghost, mesp.LoraConfig(r=4, alpha=8.0), seed=0)

    def wrong():
        for key, t in source_weights(source)():
            yield key, t[:-1] if key.endswith("embed_tokens.weight") else t

    with pytest.raises(MespError, match=r"embed_tokens.weight is torch.float32 \(95, 64\); the program expects"):
        export_executorch(ghost, tmp_path, B, T, 0.1, weights=wrong)
    assert not (tmp_path / WEIGHTS_FILE).exists()


def overlapping_pairs(offsets, sizes, start, end) -> list[tuple[int, int]]:
    """Pairs of tensors live at one instruction that share a byte."""
    n = len(sizes)
    return [(i, j) for i in range(n) for j in range(i + 1, n)
            if start[i] <= end[j] and start[j] <= end[i]
            and offsets[i] < offsets[j] + sizes[j] and offsets[j] < offsets[i] + sizes[i]]


def test_offset_plan_shares_no_byte_between_live_tensors():
    """mesp.executorch_plan.place on random lifetimes (largest first, as offset_plan orders them): no two tensors
    live at once overlap, and the buffer lies between the live peak and the sum of the sizes; on a case where the
    greedy's fixed-size shared objects waste memory it reaches the live peak."""
    import numpy as np

    from mesp.executorch_plan import live_peak, place

    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 60))
        sizes = np.sort(rng.integers(1, 50, n) * 64)[::-1].copy()
        start = rng.integers(0, 100, n)
        end = start + rng.integers(0, 30, n)
        offsets = place(sizes, start, end)
        assert not overlapping_pairs(offsets, sizes, start, end)
        assert live_peak(sizes, start, end) <= (offsets + sizes).max() <= sizes.sum()
    # greedy (ExecuTorch's) puts a tensor only above the highest tensor of an object live beside it: D meets C
    # at [4, 8) in the 10-byte object and gets a new object (14 bytes in all), though [0, 4) is free after B
    sizes, start, end = np.array([10, 4, 4, 4]), np.array([0, 3, 3, 6]), np.array([2, 5, 9, 9])
    offsets = place(sizes, start, end)
    assert not overlapping_pairs(offsets, sizes, start, end)
    assert (offsets + sizes).max() == live_peak(sizes, start, end) == 10


@needs_executorch
def test_step_arena_is_no_larger_than_executorchs_greedy(make_hf_model):
    """The exported step's planned arena with offset_plan beside greedy is smaller than greedy's alone (so the
    offsets are the plan taken; the runner tests prove the program exact on it)."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge
    from executorch.exir.passes import MemoryPlanningPass

    def arena(program) -> int:
        plan = next(p for p in program.executorch_program.execution_plan if p.name == "forward")
        return sum(plan.non_const_buffer_sizes)

    model = tiny_step_model(make_hf_model)
    ours = arena(to_executorch_program(export_step(TrainingStep(model, B, T, 0.1)), {"seq_len": T}))
    edge = to_edge(export_step(TrainingStep(model, B, T, 0.1)), compile_config=EdgeCompileConfig(_check_ir_validity=False))
    planning = {"forward": MemoryPlanningPass(alloc_graph_input=False, alloc_graph_output=False)}
    greedy = arena(edge.to_executorch(ExecutorchBackendConfig(memory_planning_pass=planning)))
    assert 0 < ours < greedy  # 252160 and 262912 bytes when written
