"""Interruption: SIGINT/SIGTERM during training stop at the next step boundary with a checkpoint of it, the CLI
prints the resume command and exits 128 + the signal, and the resumed run ends bit-identical to an uninterrupted
one; a second signal aborts at once; previous handlers come back; resume sweeps mesp's own temporaries (and
nothing of the user's), as --overwrite deletes only names mesp writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_train import assert_same, write_pretokenized

from mesp.cli import main
from mesp.interrupt import StopRequest
from mesp.train import TrainConfig, TrainingInterrupted, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(make_hf_model):
    path, _ = make_hf_model("qwen2", num_key_value_heads=2)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_pretokenized(tmp_path_factory.mktemp("data") / "train.jsonl", 10, seed=0)


def argv(tiny, data, out, steps):
    return ["train", "--model", tiny, "--data", data, "--out", str(out), "--seq-len", "32", "--batch-size", "3",
            "--seed", "1", "--steps", str(steps), "--save-every", "1000", "--optimizer", "adamw"]


def adapter(out):
    return load_file(str(out / "adapter_model.safetensors"))


def checkpoint_step(out) -> int:
    return json.loads((out / "checkpoint.json").read_text())["step"]


def send_at_step(signum, at: int, times: int = 1):
    """A progress callback that sends this process `signum` `times` times right after step `at`."""
    def progress(event):
        if event["event"] == "step" and event["step"] == at:
            for _ in range(times):
                os.kill(os.getpid(), signum)
    return progress


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_with_a_checkpoint_and_restores_handlers(tiny, data, tmp_path, signum):
    before = signal.getsignal(signum)
    out = tmp_path / "run"
    c = TrainConfig(model=tiny, data=data, out=str(out), seq_len=32, batch_size=3, seed=1, steps=8, save_every=100)
    with pytest.raises(TrainingInterrupted) as info:
        train(c, progress=send_at_step(signum, 3))
    e = info.value
    assert (e.signum, e.step, e.total_steps, e.checkpoint) == (signum, 3, 8, out / "checkpoint-000003")
    assert checkpoint_step(out) == 3 and not (out / "adapter_model.safetensors").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert signal.getsignal(signum) is before
    result = train(TrainConfig(**{**c.to_dict(), "resume": True}))
    assert (result.resumed_from, result.steps) == (3, 8)


def test_second_sigint_aborts_at_once(tiny, data, tmp_path):
    before = signal.getsignal(signal.SIGINT)
    out = tmp_path / "run"
    c = TrainConfig(model=tiny, data=data, out=str(out), seq_len=32, batch_size=3, seed=1, steps=8, save_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(c, progress=send_at_step(signal.SIGINT, 3, times=2))
    assert signal.getsignal(signal.SIGINT) is before
    # step 3 never reached its checkpoint: the last one is step 2's, whole, and nothing is left half-written
    assert checkpoint_step(out) == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-000002", "checkpoint.json", "metrics.jsonl",
                                                    "train_config.json"]


def test_stop_request_outside_the_main_thread_installs_nothing():
    before = signal.getsignal(signal.SIGINT)
    seen = []

    def run():
        with StopRequest():
            seen.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == [before] and signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_cli_signal_prints_the_resume_command_and_resume_is_bit_identical(tiny, data, tmp_path, capsys, signum,
                                                                          status):
    steps = 40
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from mesp.cli import main; sys.exit(main())",
                             *argv(tiny, data, parts, steps)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    first = proc.stdout.readline()  # stdout is a pipe, so the CLI prints plain progress lines: the first at step 1
    assert first.startswith(f"step 1/{steps}:"), first
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == status, err
    reached = checkpoint_step(parts)
    assert 1 <= reached < steps
    assert len((parts / "metrics.jsonl").read_text().splitlines()) == reached
    assert f"resume with: mesp train --out {parts} --resume" in err, err
    assert "Traceback" not in err and not (parts / "adapter_model.safetensors").exists()

    # mesp's own temporaries, left by a crash, are swept on resume; the user's files stay
    (parts / ".adapter_model.safetensors.k2j4x9.tmp").write_bytes(b"half")
    (parts / ".metrics.jsonl.a1b2c3.tmp").write_text("half")
    (parts / f".checkpoint-{reached + 1:06d}.tmp").mkdir()
    (parts / f".checkpoint-{reached + 1:06d}.tmp" / "trainer_state.json").write_text("{")
    mine = ["checkpoint-notes.txt", ".notes.tmp", ".checkpoint-mine.tmp"]
    for name in mine:
        (parts / name).write_text("mine")

    assert main(["train", "--out", str(parts), "--resume"]) == 0
    assert main(argv(tiny, data, whole, steps)) == 0
    assert_same(adapter(whole), adapter(parts))
    assert sorted(p.name for p in parts.iterdir()) == sorted([p.name for p in whole.iterdir()] + mine)
    assert all((parts / name).read_text() == "mine" for name in mine)


def test_overwrite_deletes_only_names_mesp_writes(tiny, data, tmp_path):
    out = tmp_path / "run"
    assert main(argv(tiny, data, out, 2)) == 0
    mine = ["checkpoint-notes.txt", "checkpoint-", "checkpoint-12a", ".checkpoint-000001.tmp.bak"]
    for name in mine:
        (out / name).write_text("mine")
    (out / ".train_config.json.x7y8z9.tmp").write_text("left by a crash")
    assert main(argv(tiny, data, out, 1) + ["--overwrite"]) == 0
    assert checkpoint_step(out) == 1
    assert all((out / name).read_text() == "mine" for name in mine)
    assert not (out / ".train_config.json.x7y8z9.tmp").exists()
