"""What a device measures: the private footprint and its sampling meter against a known allocation, the
runtime floor, the memory summary of a training run (metrics, memory.json, the CLI's line), the private column
of `mesp bench memory` and the whole-process bench on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import mmap
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from helpers import write_gguf

from mesp import bench, memory
from mesp.bench.process import ProcessSettings, quantized_path
from mesp.cli import main
from mesp.memory import (NO_STAGE, RUNTIME_FLOOR_ENV, RUNTIME_FLOOR_LABEL, FootprintMeter, MiB, private_footprint_bytes,
                         runtime_floor_bytes, stage)

LINUX = private_footprint_bytes() is not None
linux_only = pytest.mark.skipif(not LINUX, reason="the private footprint is read from /proc/self/status")
TINY_Q = dict(vocab_size=96, hidden_size=64, intermediate_size=96)  # every matrix's input dim a multiple of 32


def status_fields() -> dict[str, int]:
    fields = {}
    for line in open("/proc/self/status"):
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            fields[key] = int(rest.split()[0]) * 1024
    return fields


@linux_only
def test_private_footprint_is_anon_swap_shmem():
    before = status_fields()
    private = private_footprint_bytes()
    after = status_fields()
    sums = [f["RssAnon"] + f.get("VmSwap", 0) + f.get("RssShmem", 0) for f in (before, after)]
    assert min(sums) - 4 * MiB <= private <= max(sums) + 4 * MiB  # the process may move a little in between
    assert private <= after["VmRSS"] + after.get("VmSwap", 0) + 4 * MiB  # private pages are a part of RSS + swap


@linux_only
def test_meter_sees_a_known_allocation_in_its_stage():
    """64 MiB of fresh anonymous pages, each touched, inside stage("alloc") raise that stage's sampled peak by at
    least 60 MiB, and the samples outside the stage (before and after it) do not see it. An anonymous map rather
    than a tensor: malloc may hand a tensor pages an earlier test freed but kept, which add nothing."""
    held = threading.Event()
    with FootprintMeter(interval=0.001) as meter:
        base = private_footprint_bytes()
        time.sleep(0.02)
        with stage("alloc"):
            x = mmap.mmap(-1, 64 * MiB)
            np.frombuffer(x, dtype=np.uint8)[::4096] = 1  # one byte per page: every page becomes resident
            deadline = time.monotonic() + 5
            while meter.stage_private_peaks.get("alloc", 0) < base + 60 * MiB and time.monotonic() < deadline:
                time.sleep(0.01)  # the thread samples on its own: no explicit sample() here
            held.set()
            x.close()
        time.sleep(0.02)
    assert held.is_set() and meter.samples > 3
    assert meter.stage_private_peaks["alloc"] - base >= 60 * MiB
    assert meter.private_peak_bytes == max(meter.stage_private_peaks.values())
    assert meter.stage_private_peaks[NO_STAGE] < base + 30 * MiB  # unmapped at close
    assert meter.rss_peak_bytes >= meter.private_peak_bytes
    assert memory.current_stage == NO_STAGE


def meter_threads():
    return [t for t in threading.enumerate() if t.name == "mesp-footprint-meter"]


def test_meter_thread_stops_and_joins_even_on_error():
    with pytest.raises(RuntimeError, match="boom"):
        with FootprintMeter() as meter:
            assert meter.running and len(meter_threads()) == 1
            with stage("forward"):
                raise RuntimeError("boom")
    assert not meter.running and meter_threads() == []
    assert memory.current_stage == NO_STAGE  # the stage is left even when its body raised
    peak = meter.private_peak_bytes
    meter.__exit__(None, None, None)  # a second exit takes no sample
    assert meter.private_peak_bytes == peak
    if LINUX:
        assert peak > 0 and set(meter.summary()["stage_private_peaks"]) <= {NO_STAGE, "forward"}


def test_nested_stages_restore_the_outer_one():
    with stage("backward"):
        with stage("update"):
            assert memory.current_stage == "update"
        assert memory.current_stage == "backward"
    assert memory.current_stage == NO_STAGE


def test_runtime_floor_is_measured_in_a_fresh_process_or_given():
    code = "import mesp.memory as m; print(m.runtime_floor_bytes())"
    env = {**os.environ, RUNTIME_FLOOR_ENV: "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "12345"
    if LINUX:
        floor = runtime_floor_bytes()
        # this process imported torch and much more, so it holds at least the floor; the floor holds torch
        assert 20 * MiB < floor <= private_footprint_bytes()
        assert runtime_floor_bytes() == floor  # cached


# ---- a training run's memory summary ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(make_hf_model):
    path, _ = make_hf_model("qwen2", **TINY_Q)
    return str(path)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "tokens.jsonl"
    g = torch.Generator().manual_seed(0)
    path.write_text("".join(json.dumps({"input_ids": torch.randint(0, 96, (24,), generator=g).tolist()}) + "\n"
                            for _ in range(4)))
    return str(path)


def test_train_writes_and_prints_the_labelled_memory_summary(tiny, tokens, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", tiny, "--data", tokens, "--out", str(out), "--seq-len", "24", "--steps", "2",
                 "--batch-size", "1", "--optimizer", "sgd", "--measure-memory"]) == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "memory.json").read_text())
    assert m["runtime_floor_label"] == RUNTIME_FLOOR_LABEL
    assert m["step_allocator_peak_bytes"] > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert m["step_allocator_peak_bytes"] == max(r["peak_bytes"] for r in rows)
    assert "private footprint peak" in printed and RUNTIME_FLOOR_LABEL in printed and "RSS peak" in printed
    assert f"step allocator peak {m['step_allocator_peak_bytes'] / MiB:.1f} MiB above the step's start" in printed
    if LINUX:
        assert {"load", "forward", "loss", "backward", "update"} <= set(m["stage_private_peaks"])
        assert m["private_peak_bytes"] == max(m["stage_private_peaks"].values())
        assert m["rss_peak_bytes"] >= m["private_peak_bytes"] >= m["runtime_floor_bytes"]
        assert f"private footprint peak {m['private_peak_bytes'] / MiB:.1f} MiB" in printed
        peaks = [r["private_peak_bytes"] for r in rows]
        assert peaks == sorted(peaks) and peaks[-1] <= m["private_peak_bytes"]  # the run's peak so far


# ---- benches -------------------------------------------------------------------------------------------------

@linux_only
def test_bench_memory_has_the_private_column(tiny):
    row = bench.measure_here(bench.MemoryCase(model=tiny, seq_len=32, rank=4, method="mesp", repeats=1))
    assert row["private_peak_bytes"] >= row["weights_bytes"] and row["private_peak_scope"]
    assert "load" in row["stage_private_peaks"]
    head, line = bench.memory_table({"rows": [row]}).splitlines()
    assert "private MiB" in head and f"{row['private_peak_bytes'] / MiB:.0f}" in line.split()


def check_process_rows(result, methods):
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == set(methods), result["rows"]
    for r in rows.values():
        assert "error" not in r, r["error"]
        assert r["command"].startswith("mesp train --model ") and "--optimizer sgd" in r["command"]
        if LINUX:
            # the run's own figure, measured in the child: it holds at least the floor torch costs
            assert r["private_peak_bytes"] >= result["runtime_floor_bytes"] > 0
            assert "load" in r["stage_private_peaks"]
    assert f"{result['runtime_floor_label']}: " in bench.process_table(result)


def test_process_bench_reads_each_fresh_train_process(tiny, make_hf_model, tmp_path):
    """The quantized file already in the work directory is used as it is (here: written by the tests' own GGUF
    writer), so this runs without `mesp quantize`."""
    import gguf

    s = ProcessSettings(models=[tiny], seq_lens=[24], rank=4, methods=["mesp", "mebp"], steps=1,
                        work=str(tmp_path / "work"), threads=1)
    path = quantized_path(tiny, s.to, s.work)
    path.parent.mkdir(parents=True)
    write_gguf(path, make_hf_model("qwen2", **TINY_Q)[1], [gguf.GGMLQuantizationType.Q4_0])
    result = bench.bench_process(s, progress=False)
    check_process_rows(result, ["mesp", "mebp"])
    assert (tmp_path / "work" / "data").is_dir()


@pytest.mark.skipif(importlib.util.find_spec("mesp.quantize") is None, reason="mesp quantize not available yet")
def test_process_bench_quantizes_once_through_the_cli(tiny, tmp_path, capsys):
    work = tmp_path / "work"
    js = tmp_path / "process.json"
    argv = ["bench", "process", "--models", tiny, "--seq-lens", "24", "--rank", "4", "--methods", "mesp",
            "--steps", "1", "--work", str(work), "--threads", "1", "--json", str(js)]
    assert main(argv) == 0
    result = json.loads(js.read_text())
    check_process_rows(result, ["mesp"])
    made = quantized_path(tiny, "q4_0", work)
    assert made.is_file()
    stamp = made.stat().st_mtime_ns
    assert main(argv) == 0  # the second run reuses the quantized file
    assert made.stat().st_mtime_ns == stamp
    assert "private peak MiB" in capsys.readouterr().out
