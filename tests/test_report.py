"""What a run reports beyond metrics.jsonl: --report-to tensorboard writes the logged values as TensorBoard
scalars (read back with TensorBoard's own reader), the logged grad_norm is the global gradient norm, and
`mesp plot RUN` draws a PNG."""

from __future__ import annotations

import json
import math

import pytest
from test_train import config, data, tiny  # noqa: F401  (fixtures)

import mesp
from mesp.cli import main
from mesp.data import MicroBatchStream, load_data
from mesp.lora import add_lora
from mesp.methods import compute_gradients
from mesp.train import train
from mesp.train_config import lora_config, resolve


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_read_back(tiny, data, tmp_path):  # noqa: F811
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                            reason="tensorboard is not installed (pip install 'mesp[tensorboard]')")
    out = tmp_path / "run"
    train(config(tiny, data, out, steps=4, eval_every=2, valid=data["valid"], report_to="tensorboard"))
    logged = records(out)
    acc = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    for key, tag, scale in (("loss", "train/loss", 1), ("lr", "train/learning_rate", 1),
                            ("tokens_per_s", "train/tokens_per_s", 1), ("grad_norm", "train/grad_norm", 1),
                            ("valid_loss", "eval/loss", 1), ("private_peak_bytes", "memory/private_peak_mib", 2**-20)):
        expected = [(r["step"], r[key] * scale) for r in logged if r.get(key) is not None]
        assert expected, key
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in expected], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), tag  # stored as float32
    assert [r["step"] for r in logged if "valid_loss" in r] == [2, 4]


def test_resumed_run_keeps_one_point_per_step(tiny, data, tmp_path):  # noqa: F811
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                            reason="tensorboard is not installed")
    """A run that dies after step 3 with its last checkpoint at step 2 resumes from 2: step 3's first points are
    purged, not kept beside the resumed ones."""
    out = tmp_path / "run"
    settings = dict(steps=4, save_every=2, report_to="tensorboard", optimizer="sgd", lr=0.5)

    class Crash(Exception):
        pass

    def crash_after_step_3(event):
        if event["event"] == "step" and event["step"] == 3:
            raise Crash

    with pytest.raises(Crash):
        train(config(tiny, data, out, **settings), progress=crash_after_step_3)
    train(config(tiny, data, out, resume=True, **settings))
    acc = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in records(out)],
                                                                         rel=1e-6)


def test_unknown_report_to_is_one_line(tiny, data, tmp_path, capsys):  # noqa: F811
    with pytest.raises(SystemExit):  # argparse's own choice check
        main(["train", "--model", tiny, "--data", data["train"], "--out", str(tmp_path / "r"), "--report-to", "wandb"])
    assert "--report-to: invalid choice: 'wandb'" in capsys.readouterr().err
    with pytest.raises(mesp.errors.MespError, match="report_to: unknown 'wandb'"):
        resolve(config(tiny, data, tmp_path / "r", report_to="wandb"))


@pytest.mark.parametrize("kw", [dict(optimizer="sgd", lr=0.5), dict(optimizer="sgd", lr=0.5, max_grad_norm=1e-3),
                                dict(optimizer="adamw", per_layer_update=True)])
def test_grad_norm_is_the_global_norm(tiny, data, tmp_path, kw):  # noqa: F811
    """The logged grad_norm of the first step is the norm, before clipping, of the gradients at the initial
    adapter (autograd's), for the ordinary step, a clipped one and the per-layer update."""
    out = tmp_path / "run"
    c = resolve(config(tiny, data, out, steps=1, **kw))
    train(c)
    first = records(out)[0]
    model = mesp.load_model(tiny, dtype="float32")
    add_lora(model, lora_config(c), seed=c.seed)
    dataset = load_data(data["train"], seq_len=32)
    b = dataset.collate(MicroBatchStream(len(dataset), c.batch_size, c.seed).indices(0))
    _, grads = compute_gradients(model, b.input_ids, b.labels, b.attention_mask, method="autograd")
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
    assert norm > 10 * kw.get("max_grad_norm", 0)  # the clipped case is clipped
    assert first["grad_norm"] == pytest.approx(norm, rel=1e-5)


def test_plot_writes_a_png(tiny, data, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    train(config(tiny, data, out, steps=3, eval_every=1, valid=data["valid"]))
    assert main(["plot", str(out)]) == 0
    png = out / "curves.png"
    assert capsys.readouterr().out.strip() == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert main(["plot", str(out), "--out", str(tmp_path / "elsewhere.png")]) == 0
    assert (tmp_path / "elsewhere.png").stat().st_size > 10_000
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.strip().endswith("metrics.jsonl: no such file (is "
                                                    f"{tmp_path / 'nothing'} a mesp train run directory?)")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n')
    assert main(["plot", str(out)]) == 2
    assert f"{out / 'metrics.jsonl'}:2: invalid JSON" in capsys.readouterr().err
