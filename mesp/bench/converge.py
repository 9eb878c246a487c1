"""Convergence: loss curves of mesp, mebp and mezo, each a real `mesp.train` run on the bundled demo data."""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..demo import DemoSettings
from ..errors import MespError
from ..settings import setting
from ..train import train
from ..train_config import DEFAULT_LR, TrainConfig
from .machine import machine_info

CONVERGE_COLUMNS = ("method", "step", "loss", "valid_loss", "lr", "seconds")


@dataclass
class ConvergeSettings:
    """`mesp bench converge`: steps, model and data (the demo's unless given), where to write the curves.
    Settings left None take the demo's value."""
    steps: int = setting(30, "steps for mesp and mebp")
    mezo_factor: int = setting(10, "MeZO runs this many times the steps")
    mezo_lr: float | None = setting(None, "MeZO learning rate", default_text="default: mesp.train's MeZO default")
    model: str | None = setting(None, "model", default_text="default: the shipped smollm2-135m-instruct")
    data: str | None = setting(None, "training JSONL", default_text="default: the bundled demo data")
    valid: str | None = setting(None, "validation JSONL", default_text="default: the bundled demo validation data")
    batch_size: int | None = setting(None, "samples per step", default_text="demo default")
    seq_len: int | None = setting(None, "tokens per sample", default_text="demo default")
    rank: int | None = setting(None, "LoRA rank", flag=False)
    alpha: float | None = setting(None, "LoRA alpha", flag=False)
    lr: float | None = setting(None, "AdamW learning rate of mesp and mebp", flag=False)
    warmup: int | None = setting(None, "AdamW warmup steps", flag=False)
    seed: int = setting(0, "LoRA init and data order", flag=False)
    csv: str | None = setting(None, "write the curves here as CSV (one row per method and step)")
    plot: str | None = setting(None, "write the curves here (PNG)")
    threads: int | None = setting(None, "torch threads", default_text="default: PyTorch's")
    json: str | None = setting(None, "write the result as JSON here")


def bench_converge(settings: ConvergeSettings, progress: bool = True) -> dict:
    """Train mesp and mebp for `steps` steps and mezo for mezo_factor x steps with mesp.train, on the bundled
    demo data and the shipped model by default, with the demo's settings (mezo: its own SGD, lr `mezo_lr`).
    Returns {"rows": [{method, step, loss, valid_loss, lr, seconds}], "settings": {...}, "machine": {...}}."""
    from tqdm import tqdm

    c = settings
    if c.steps < 1 or c.mezo_factor < 1:
        raise MespError("converge: steps and mezo-factor must be positive")
    demo = DemoSettings()
    # the demo's validation file belongs to the demo's training data only
    s = {"model": c.model or demo.model, "train_file": c.data or demo.train_file,
         "valid_file": c.valid or (demo.valid_file if c.data is None else None),
         "batch_size": demo.batch_size, "seq_len": demo.seq_len, "rank": demo.rank, "alpha": demo.alpha,
         "lr": demo.lr, "warmup": demo.warmup, "seed": c.seed, "steps": c.steps, "mezo_steps": c.steps * c.mezo_factor,
         "mezo_lr": c.mezo_lr or DEFAULT_LR["mezo"], "optimizer": "adamw", "schedule": "cosine"}
    overrides = {"batch_size": c.batch_size, "seq_len": c.seq_len, "rank": c.rank, "alpha": c.alpha, "lr": c.lr,
                 "warmup": c.warmup}
    s.update({k: v for k, v in overrides.items() if v is not None})
    runs = [("mesp", s["steps"]), ("mebp", s["steps"]), ("mezo", s["mezo_steps"])]
    rows = []
    bar = tqdm(total=sum(n for _, n in runs), desc="bench converge", unit="step", disable=not progress,
               file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="mesp-converge-") as tmp:
        for method, n in runs:
            bar.set_postfix_str(method)
            mezo = method == "mezo"
            config = TrainConfig(model=s["model"], data=s["train_file"], valid=s["valid_file"],
                                 out=str(Path(tmp) / method), method=method, rank=s["rank"], alpha=s["alpha"],
                                 steps=n, batch_size=s["batch_size"], seq_len=s["seq_len"],
                                 lr=s["mezo_lr"] if mezo else s["lr"], optimizer="sgd" if mezo else s["optimizer"],
                                 schedule=s["schedule"], warmup=0 if mezo else s["warmup"], seed=s["seed"],
                                 eval_every=max(1, n // 10), save_every=n, device="cpu")

            def on_event(event, method=method):
                if event["event"] == "step":
                    rows.append({"method": method, "step": event["step"], "loss": event["loss"],
                                 "valid_loss": event.get("valid_loss"), "lr": event["lr"],
                                 "seconds": event["seconds"]})
                    bar.update()

            train(config, progress=on_event)
    bar.close()
    return {"rows": rows, "settings": s, "machine": machine_info()}


def converge_csv(result: dict) -> str:
    """The curves of a bench_converge result as CSV, one row per method and step (CONVERGE_COLUMNS)."""
    def cell(v):
        return "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))

    lines = [",".join(CONVERGE_COLUMNS)]
    lines += [",".join(cell(r[c]) for c in CONVERGE_COLUMNS) for r in result["rows"]]
    return "\n".join(lines) + "\n"
