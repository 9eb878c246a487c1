"""Activation checkpoints offloaded to a memory-mapped scratch file (mesp.scratch): the gradients are bit for bit
those kept in RAM (MeSP and MeBP, fp32 and bf16); the checkpoints really live in the file (mapped, its pages
out of the process after each write) while the file has no name in the directory; nothing is left after the
step, after an exception in the backward, or after SIGKILL; `mesp train --offload-checkpoints` end to end; a
bad scratch directory is one line; a tmpfs directory is warned about."""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import make_batch, randomize_lora_b
from safetensors.torch import load_file

import mesp
import mesp.scratch
from mesp.cli import main
from mesp.errors import MespError
from mesp.lora import adapter_dtype
from mesp.scratch import SCRATCH_PREFIX, filesystem_type

VOCAB = 96  # conftest's tiny models


@pytest.fixture(scope="module")
def tiny(make_hf_model):
    path, _ = make_hf_model("qwen2", num_key_value_heads=2)
    return str(path)


def lora_model(path, dtype=torch.float32):
    model = mesp.load_model(path, dtype=dtype)
    mesp.add_lora(model, mesp.LoraConfig(r=4, alpha=8), seed=0)
    return randomize_lora_b(model, 0, std=0.1)


def scratch_maps(directory) -> list[str]:
    """This process's mappings of scratch files in `directory` (lines of /proc/self/maps)."""
    prefix = os.path.join(os.path.realpath(directory), SCRATCH_PREFIX)
    with open("/proc/self/maps") as f:
        return [line for line in f if prefix in line]


def scratch_rss_kib(directory) -> int:
    """Resident KiB of this process's scratch mappings in `directory` (from /proc/self/smaps)."""
    prefix = os.path.join(os.path.realpath(directory), SCRATCH_PREFIX)
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line
                inside = prefix in line
            elif inside and first == "Rss:":
                total += int(line.split()[1])
    return total


def leftovers(directory) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith(SCRATCH_PREFIX)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["mesp", "mebp"])
def test_offloaded_gradients_are_bit_identical(tiny, tmp_path, monkeypatch, method, dtype):
    model = lora_model(tiny, dtype)
    ids, labels, mask = make_batch(3, 21, VOCAB, "left", seed=4)
    loss, grads = mesp.compute_gradients(model, ids, labels, mask, method=method)

    seen = []  # at each pop: (names in the directory, scratch mappings, resident KiB of them)
    pop = mesp.scratch.LayerCheckpoints.pop

    def watching_pop(self, i):
        seen.append((leftovers(tmp_path), scratch_maps(tmp_path), scratch_rss_kib(tmp_path)))
        return pop(self, i)

    monkeypatch.setattr(mesp.scratch.LayerCheckpoints, "pop", watching_pop)
    loss_off, grads_off = mesp.compute_gradients(model, ids, labels, mask, method=method,
                                                 offload_checkpoints=tmp_path)
    assert torch.equal(loss, loss_off)
    assert grads.keys() == grads_off.keys()
    for k in grads:
        assert grads[k].dtype == adapter_dtype(dtype) and torch.equal(grads[k], grads_off[k]), k
    n_layers = len(model.model.layers)
    assert len(seen) == n_layers
    for names, maps, _ in seen:
        assert names == []  # unlinked as soon as it was mapped
        assert len(maps) == 1 and maps[0].rstrip().endswith("(deleted)"), maps
    assert seen[0][2] == 0  # every checkpoint written and dropped from the process before the backward
    assert leftovers(tmp_path) == [] and scratch_maps(tmp_path) == []  # unmapped when the step returned


def test_offload_with_per_layer_updates_matches(tiny, tmp_path):
    model = lora_model(tiny)
    ids, labels, mask = make_batch(2, 17, VOCAB, None, seed=2)
    got = {}
    for where in (None, tmp_path):
        per_layer = {}
        mesp.compute_gradients(model, ids, labels, mask, method="mesp", offload_checkpoints=where,
                               on_layer_grads=lambda i, g, out=per_layer: out.update(g))
        got[where] = per_layer
    assert got[None].keys() == got[tmp_path].keys()
    assert all(torch.equal(got[None][k], got[tmp_path][k]) for k in got[None])


def assert_no_scratch_after_error(tmp_path, run):
    try:
        run()
    except RuntimeError as e:
        assert "injected" in str(e)
    else:
        pytest.fail("the injected failure did not happen")
    gc.collect()  # the traceback's frames (and any view of the map they held) are gone now
    assert leftovers(tmp_path) == []
    assert scratch_maps(tmp_path) == []


def test_no_scratch_left_after_an_error_in_mesp_backward(tiny, tmp_path, monkeypatch):
    model = lora_model(tiny)
    ids, labels, mask = make_batch(2, 17, VOCAB, None, seed=3)
    calls = []

    def failing(*args, **kw):
        calls.append(scratch_maps(tmp_path))
        raise RuntimeError("injected failure in the backward")

    monkeypatch.setattr(mesp.blockwise, "attention_backward", failing)
    assert_no_scratch_after_error(tmp_path, lambda: mesp.compute_gradients(
        model, ids, labels, mask, method="mesp", offload_checkpoints=tmp_path))
    assert len(calls) == 1 and len(calls[0]) == 1  # it failed while the scratch file was mapped


def test_no_scratch_left_after_an_error_in_mebp_backward(tiny, tmp_path, monkeypatch):
    model = lora_model(tiny)
    ids, labels, mask = make_batch(2, 17, VOCAB, None, seed=3)
    first = model.model.layers[0]
    forward, calls = first.forward, []

    def second_call_fails(*args, **kw):  # layer 0 runs once in the forward, then again in the backward
        calls.append(scratch_maps(tmp_path))
        if len(calls) == 2:
            raise RuntimeError("injected failure in the backward")
        return forward(*args, **kw)

    monkeypatch.setattr(first, "forward", second_call_fails)
    assert_no_scratch_after_error(tmp_path, lambda: mesp.compute_gradients(
        model, ids, labels, mask, method="mebp", offload_checkpoints=tmp_path))
    assert len(calls) == 2 and len(calls[1]) == 1


def test_methods_without_checkpoints_refuse(tiny, tmp_path):
    model = lora_model(tiny)
    ids, labels, _ = make_batch(1, 9, VOCAB, None)
    for method in ("autograd", "mezo"):
        with pytest.raises(MespError, match=f"offload_checkpoints: method {method} keeps no per-layer checkpoints"):
            mesp.compute_gradients(model, ids, labels, method=method, offload_checkpoints=tmp_path)


@pytest.mark.parametrize("case", ["missing", "file", "readonly"])
def test_bad_scratch_directory_is_one_line(tiny, tmp_path, case):
    model = lora_model(tiny)
    ids, labels, _ = make_batch(1, 9, VOCAB, None)
    where = tmp_path / "scratch"
    if case == "file":
        where.write_text("not a directory")
    elif case == "readonly":
        if os.geteuid() == 0:
            pytest.skip("root may write into a read-only directory")
        where.mkdir(mode=0o500)
    with pytest.raises(MespError, match=r"^scratch directory .*scratch: (does not exist|not a directory|not "
                                        r"writable)$"):
        mesp.compute_gradients(model, ids, labels, method="mesp", offload_checkpoints=where)


def test_insufficient_space_is_one_line(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(MespError, match=r"cannot reserve 1\.0 MiB .*\(No space left on device\)$"):
        mesp.scratch.ScratchFile(tmp_path, 1 << 20)
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(not os.path.isdir("/dev/shm") or filesystem_type("/dev/shm") != "tmpfs",
                    reason="needs /dev/shm on tmpfs")
def test_tmpfs_scratch_directory_is_warned_about(tiny, caplog):
    import tempfile

    model = lora_model(tiny)
    ids, labels, _ = make_batch(1, 9, VOCAB, None)
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d, caplog.at_level(logging.WARNING, logger="mesp.scratch"):
        mesp.compute_gradients(model, ids, labels, method="mesp", offload_checkpoints=d)
        assert leftovers(d) == []
    assert any("is on tmpfs" in r.getMessage() for r in caplog.records)


def test_disk_scratch_directory_is_not_warned_about(tiny, tmp_path, caplog):
    if filesystem_type(tmp_path) in mesp.scratch.MEMORY_FILESYSTEMS:
        pytest.skip("the test's temporary directory is itself in memory")
    model = lora_model(tiny)
    ids, labels, _ = make_batch(1, 9, VOCAB, None)
    with caplog.at_level(logging.WARNING, logger="mesp.scratch"):
        mesp.compute_gradients(model, ids, labels, method="mesp", offload_checkpoints=tmp_path)
    assert not [r for r in caplog.records if r.name == "mesp.scratch"]


def test_filesystem_type_reads_the_longest_mount_point():
    assert filesystem_type("/proc/self") == "proc"
    assert filesystem_type("/") is not None


# ---- mesp train --------------------------------------------------------------------------------------------

def write_pretokenized(path, n=6):
    import json
    import random

    r = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"input_ids": [r.randrange(VOCAB) for _ in range(r.randint(6, 20))]}) + "\n")
    return str(path)


@pytest.mark.parametrize("method", ["mesp", "mebp"])
def test_train_offload_checkpoints_end_to_end(tiny, tmp_path, method):
    data = write_pretokenized(tmp_path / "train.jsonl")
    base = ["train", "--model", tiny, "--data", data, "--seq-len", "32", "--batch-size", "2", "--steps", "2",
            "--method", method, "--optimizer", "sgd"]
    assert main(base + ["--out", str(tmp_path / "ram")]) == 0
    assert main(base + ["--out", str(tmp_path / "off"), "--offload-checkpoints"]) == 0
    scratch = tmp_path / "elsewhere"
    scratch.mkdir()
    assert main(base + ["--out", str(tmp_path / "other"), "--offload-checkpoints", "--scratch-dir", str(scratch)]) == 0
    ram = load_file(str(tmp_path / "ram" / "adapter_model.safetensors"))
    for run in ("off", "other"):
        got = load_file(str(tmp_path / run / "adapter_model.safetensors"))
        assert ram.keys() == got.keys() and all(torch.equal(ram[k], got[k]) for k in ram), run
        assert leftovers(tmp_path / run) == []
    assert leftovers(scratch) == []


@pytest.mark.parametrize("flags,match", [
    (["--offload-checkpoints", "--scratch-dir", "{tmp}/nope"], r"scratch directory .*/nope: does not exist"),
    (["--offload-checkpoints", "--scratch-dir", "{data}"], r"scratch directory .*train\.jsonl: not a directory"),
    (["--scratch-dir", "{tmp}"], r"scratch_dir: only used with offload_checkpoints"),
    (["--offload-checkpoints", "--method", "autograd"], r"offload_checkpoints: method autograd keeps no per-layer"),
])
def test_train_bad_offload_flags_are_one_line(tiny, tmp_path, capsys, flags, match):
    data = write_pretokenized(tmp_path / "train.jsonl")
    out = tmp_path / "out"
    flags = [f.format(tmp=tmp_path, data=data) for f in flags]
    assert main(["train", "--model", tiny, "--data", data, "--out", str(out), "--seq-len", "32", "--steps", "1"]
                + flags) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mesp train: error: "), err
    assert __import__("re").search(match, lines[0]), lines[0]
    assert not out.exists()


# ---- SIGKILL -----------------------------------------------------------------------------------------------

KILLED_CHILD = textwrap.dedent("""
    import sys, time
    import torch, mesp
    model = mesp.load_model(sys.argv[1])
    mesp.add_lora(model, mesp.LoraConfig(r=4, alpha=8))
    ids = torch.arange(3, 19).view(1, 16)

    def wait_to_be_killed(i, grads):
        print("in the backward", flush=True)
        time.sleep(120)

    mesp.compute_gradients(model, ids, labels=ids, method="mesp", offload_checkpoints=sys.argv[2],
                           on_layer_grads=wait_to_be_killed)
""")


def test_sigkill_mid_step_leaves_no_scratch_file(tiny, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, tiny, str(scratch)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = child.stdout.readline()
        assert line.strip() == "in the backward", child.stderr.read()
        with open(f"/proc/{child.pid}/maps") as f:
            mapped = [m for m in f if os.path.join(os.path.realpath(scratch), SCRATCH_PREFIX) in m]
        assert len(mapped) == 1 and mapped[0].rstrip().endswith("(deleted)")  # in use, but nameless
        assert leftovers(scratch) == []
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert os.listdir(scratch) == []
