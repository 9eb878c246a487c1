"""The Flower ServerApp: Flower's FedAvg over the clients' LoRA tensors, weighted by their example counts.

Every round it keeps, under the run's `out-dir`: `round-N/global/` (the averaged adapter, PEFT format) and
`round-N/clients/NAME/` (each client's returned adapter, PEFT format, with metrics.json holding num_examples,
train_loss, private_peak_bytes, seconds); `round-0/global/` is the starting adapter. With a `valid` file it
also records the global adapter's held-out loss after every round. `summary.json` is written last: its presence
says the run finished. A failed or missing client reply ends the run (a silently smaller average would be a
different experiment). Progress goes to stdout as one JSON object per line after PROGRESS_MARK, which the local
launcher (mesp.federated.local) shows.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from ..data import load_jsonl
from ..errors import MespError
from ..fileio import write_json
from ..loaders import load_model
from ..lora import adapter_state, add_lora, save_adapter
from ..tokenizer import load_tokenizer
from ..train import evaluate
from ..train_config import lora_config
from . import PROGRESS_MARK, SUMMARY
from .client_app import CLIENT, METRICS
from .local_training import ClientSettings, set_adapter

log = logging.getLogger(__name__)


app = ServerApp()


def report(event: dict) -> None:
    print(PROGRESS_MARK + json.dumps(event), flush=True)


def aggregate_client_metrics(records, weight_key: str) -> MetricRecord:
    """The round's metrics: the example-weighted train loss, the total examples and the largest client
    private-footprint peak (a mean of peaks would describe no device)."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    total = sum(float(m[weight_key]) for m in metrics)
    return MetricRecord({"train-loss": sum(float(m["train-loss"]) * float(m[weight_key]) for m in metrics) / total,
                         "num-examples": int(total),
                         "private-peak-bytes": max(int(m["private-peak-bytes"]) for m in metrics)})


class AdapterStore:
    """Writes adapters in PEFT format through a model that carries the run's LoRA layout."""

    def __init__(self, settings: ClientSettings, out_dir: Path):
        self.out_dir = out_dir
        self.model = load_model(settings.model)
        config = settings.train_config(os.devnull)
        add_lora(self.model, lora_config(config), seed=config.seed)
        # the round-0 global adapter: mesp's LoRA init (A random from the seed, B = 0), as `mesp train` starts
        self.initial = {k: v.detach().float().clone() for k, v in adapter_state(self.model).items()}

    def save(self, tensors: dict, where: Path, what: str) -> None:
        set_adapter(self.model, tensors, what)
        save_adapter(self.model, where)


class MespFedAvg(FedAvg):
    """FedAvg that keeps every round's global and client adapters and refuses a round with a failed client."""

    def __init__(self, store: AdapterStore, num_clients: int, memory_budget_bytes: int | None):
        super().__init__(fraction_evaluate=0.0, min_train_nodes=num_clients, min_available_nodes=num_clients,
                         train_metrics_aggr_fn=aggregate_client_metrics)
        self.store = store
        self.num_clients = num_clients
        self.memory_budget_bytes = memory_budget_bytes
        self.history: list[dict] = []

    def aggregate_train(self, server_round: int, replies):
        replies = list(replies)
        failed = [m for m in replies if m.has_error()]
        if failed:
            reason = failed[0].error.reason
            # Flower wraps a ClientApp's exception as "<class 'TYPE'>:<'MESSAGE'>": keep the message
            wrapped = re.fullmatch(r"<class '[^']*'>:<'(.*)'>", reason, re.S)
            raise MespError(f"round {server_round}: a client failed: {wrapped[1] if wrapped else reason}")
        if len(replies) < self.num_clients:
            raise MespError(f"round {server_round}: {len(replies)} of {self.num_clients} clients replied")
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            raise MespError(f"round {server_round}: no adapter to average")
        round_dir = self.store.out_dir / f"round-{server_round}"
        clients = []
        for m in replies:
            name = str(m.content[CLIENT]["name"])
            mr = m.content[METRICS]
            client_metrics = {"num_examples": int(mr["num-examples"]), "train_loss": float(mr["train-loss"]),
                              "private_peak_bytes": int(mr["private-peak-bytes"]) or None,
                              "seconds": float(mr["seconds"])}
            budget = self.memory_budget_bytes
            if budget and client_metrics["private_peak_bytes"]:
                client_metrics["over_memory_budget"] = client_metrics["private_peak_bytes"] > budget
            where = round_dir / "clients" / name
            self.store.save(next(iter(m.content.array_records.values())).to_torch_state_dict(), where,
                            f"client {name}")
            write_json(where / "metrics.json", client_metrics)
            clients.append({"name": name, **client_metrics})
        self.store.save(arrays.to_torch_state_dict(), round_dir / "global", f"round {server_round} average")
        entry = {"round": server_round, "train_loss": float(metrics["train-loss"]),
                 "clients": sorted(clients, key=lambda c: c["name"])}
        self.history.append(entry)
        report({"event": "round", **entry})
        return arrays, metrics


def held_out_loss_fn(store: AdapterStore, settings: ClientSettings, valid: str):
    """evaluate_fn for Strategy.start: the mean held-out loss per labelled token of the global adapter."""
    model = store.model
    dataset = load_jsonl(valid, get_tokenizer=lambda: load_tokenizer(model), seq_len=settings.seq_len,
                         vocab_size=model.config.vocab_size)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        set_adapter(model, arrays.to_torch_state_dict(), f"round {server_round} global adapter")
        loss = evaluate(model, dataset, settings.batch_size)
        report({"event": "eval", "round": server_round, "valid_loss": loss})
        return MetricRecord({"valid-loss": loss})

    return evaluate_global


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    try:
        settings = ClientSettings.from_run_config(rc)
        out_dir = Path(str(rc["out-dir"])).expanduser().resolve()
        num_clients = int(rc["num-clients"])
        budget_mb = float(rc["memory-budget-mb"])
        store = AdapterStore(settings, out_dir)
        start = store.initial
        store.save(start, out_dir / "round-0" / "global", "initial adapter")
        strategy = MespFedAvg(store, num_clients, int(budget_mb * 2**20) if budget_mb > 0 else None)
        valid = str(rc["valid"]).strip()
        report({"event": "start", "rounds": settings.rounds, "clients": num_clients})
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(start), num_rounds=settings.rounds,
                                train_config=ConfigRecord(), evaluate_fn=held_out_loss_fn(store, settings, valid)
                                if valid else None)
        valid_losses = {int(r): float(m["valid-loss"]) for r, m in result.evaluate_metrics_serverapp.items()}
        write_json(out_dir / SUMMARY, {"settings": {k: rc[k] for k in rc}, "rounds": strategy.history,
                                       "valid_loss": valid_losses or None})
        report({"event": "done", "out": str(out_dir)})
    except Exception as e:
        report({"event": "error", "message": f"{type(e).__name__}: {e}" if not isinstance(e, MespError)
                else str(e)})
        raise
