"""One client's share of a federated round, in plain mesp (no Flower here): start from the global adapter,
train `steps` optimizer steps on the client's own JSONL file, return the new LoRA tensors and what the server
needs to weigh them.

The learning rate follows one schedule over the whole federation (round r's local step k is global step
(r - 1) * steps + k), so R rounds of K local steps see the same schedule as one K * R step run. The optimizer
state starts afresh each round: FedAvg averages weights, not moments.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import torch

from ..data import MicroBatchStream, load_data
from ..errors import MespError
from ..loaders import load_model
from ..lora import add_lora, adapter_state
from ..memory import FootprintMeter
from ..optim import learning_rate
from ..seeds import mix_seed
from ..tokenizer import load_tokenizer
from ..train import NonFiniteGradient, one_step
from ..train_config import TrainConfig, lora_config, optimizer_of, resolve
from .checks import adapter_problem

log = logging.getLogger(__name__)

@dataclass
class ClientSettings:
    """How every client trains (the run's settings, the same on every client)."""
    model: str
    steps: int  # local optimizer steps per round
    rounds: int
    method: str = "mesp"
    rank: int = 8
    alpha: float = 16.0
    lr: float | None = None
    batch_size: int = 4
    seq_len: int = 256
    warmup: int = 0
    seed: int = 0

    @classmethod
    def from_run_config(cls, run_config) -> "ClientSettings":
        """From a Flower run config (the app's [tool.flwr.app.config] keys; lr 0 means mesp's default)."""
        try:
            return cls(model=str(run_config["model"]), steps=int(run_config["local-steps"]),
                       rounds=int(run_config["num-server-rounds"]), method=str(run_config["method"]),
                       rank=int(run_config["rank"]), alpha=float(run_config["alpha"]),
                       lr=float(run_config["lr"]) or None, batch_size=int(run_config["batch-size"]),
                       seq_len=int(run_config["seq-len"]), warmup=int(run_config["warmup"]),
                       seed=int(run_config["seed"]))
        except KeyError as e:
            raise MespError(f"run config: {e.args[0]!r} missing") from e

    def to_run_config(self) -> dict:
        """The inverse of from_run_config."""
        return {"model": self.model, "local-steps": self.steps, "num-server-rounds": self.rounds,
                "method": self.method, "rank": self.rank, "alpha": float(self.alpha), "lr": float(self.lr or 0.0),
                "batch-size": self.batch_size, "seq-len": self.seq_len, "warmup": self.warmup, "seed": self.seed}

    def train_config(self, data: str) -> TrainConfig:
        """The resolved TrainConfig these settings amount to (every setting checked by mesp's own rules)."""
        return resolve(TrainConfig(model=self.model, data=data, out=os.devnull, method=self.method, rank=self.rank,
                                   alpha=self.alpha, lr=self.lr, batch_size=self.batch_size, seq_len=self.seq_len,
                                   steps=self.steps * self.rounds, warmup=self.warmup, seed=self.seed,
                                   schedule="cosine"))


@dataclass
class ClientResult:
    tensors: dict[str, torch.Tensor]  # PEFT key -> fp32 LoRA tensor after local training
    num_examples: int  # samples in the client's file: FedAvg's weight
    loss: float  # mean training loss of this round's local steps
    seconds: float
    private_peak_bytes: int | None  # private-footprint peak of this round (model load and training)


def set_adapter(model, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy PEFT-keyed tensors into the model's LoRA parameters; every key and shape is checked."""
    params = adapter_state(model)
    if set(params) != set(tensors):
        missing = sorted(set(params) - set(tensors)) or sorted(set(tensors) - set(params))
        raise MespError(f"{where}: the adapter's tensors do not match the model's LoRA (first mismatch: "
                        f"{missing[0]})")
    with torch.no_grad():
        for key, p in params.items():
            t = tensors[key]
            if tuple(t.shape) != tuple(p.shape):
                raise MespError(f"{where}: {key} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            p.copy_(t.to(dtype=p.dtype, device=p.device))


def train_client(settings: ClientSettings, data: str, global_tensors: dict[str, torch.Tensor],
                 server_round: int, check: bool = False) -> ClientResult:
    """Round `server_round` (from 1) of one client: the global adapter trained `settings.steps` steps on
    `data`. Runs under a FootprintMeter so the reply carries the client's private-footprint peak. With `check`
    the global adapter must also match the model's LoRA in dtype and be finite (mesp.federated.checks)."""
    c = settings.train_config(data)
    with FootprintMeter() as meter:
        started = time.perf_counter()
        model = load_model(c.model, dtype=c.dtype)
        dataset = load_data(c.data, get_tokenizer=lambda: load_tokenizer(model), seq_len=c.seq_len,
                             train_on_prompt=c.train_on_prompt, vocab_size=model.config.vocab_size)
        add_lora(model, lora_config(c), seed=c.seed)
        if check and (problem := adapter_problem(global_tensors, {k: v.detach().float() for k, v in
                                                                  adapter_state(model).items()})):
            raise MespError(f"round {server_round}: the global adapter received is refused: {problem}")
        set_adapter(model, global_tensors, f"round {server_round} global adapter")
        params = adapter_state(model)
        optimizer = None if c.method == "mezo" else optimizer_of(c)
        # each round draws its own data order, the same on a re-run
        stream = MicroBatchStream(len(dataset), c.batch_size, mix_seed(c.seed, server_round))
        first = (server_round - 1) * settings.steps
        losses = []
        for k in range(settings.steps):
            step = first + k
            lr = learning_rate(step, c.lr, c.steps, c.schedule, c.warmup)
            batches = [dataset.collate(stream.indices(k))]
            try:
                loss = one_step(model, c, batches, optimizer, params, lr, step)
                bad = None if math.isfinite(loss) else f"loss is {loss}"
            except NonFiniteGradient:
                bad = "a gradient is not finite"
            if bad:
                raise MespError(f"{data}: round {server_round} local step {k + 1}: {bad}")
            losses.append(loss)
        tensors = {k: v.detach().float().cpu().clone() for k, v in adapter_state(model).items()}
        seconds = time.perf_counter() - started
    return ClientResult(tensors=tensors, num_examples=len(dataset), loss=sum(losses) / len(losses),
                        seconds=seconds, private_peak_bytes=meter.private_peak_bytes)
