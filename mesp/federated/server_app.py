"""The Flower ServerApp: Flower's FedAvg over the clients' LoRA tensors, weighted by their example counts, over
only the replies that pass every check (mesp.federated.checks).

Every round it keeps, under the run's `out-dir`: `round-N/clients/NAME/` (each accepted client's adapter, PEFT
format, with metrics.json holding num_examples, train_loss, private_peak_bytes, seconds), `round-N/global/`
(the average, PEFT format, each file written atomically) and last `round-N/round.json` (the round's record:
who was averaged, who dropped out and who was rejected, and why), whose presence says round N is complete;
`round-0/global/` is the starting adapter. With a `valid` file it also records the global adapter's held-out
loss (`round-N/valid.json`). `summary.json` is written last: its presence says the run finished.

Each round goes to every connected SuperNode (the first waits up to `join-timeout` s for all `num-clients`).
A reply is left out of the average, and its client named in the log, when it is an error (the ClientApp
failed, or the SuperLink reports the node gone), when none arrives within `round-timeout` s, or when its
content fails a check: anything but the LoRA tensors, the named metrics and the client's name; other keys,
shapes or dtype than the global adapter; a value that is not finite; an update whose norm exceeds
`max-update-norm`. The round fails when fewer than `min-fraction` of the clients it was sent to are averaged.
With `resume-round` N > 0 the run continues from `round-N/global/` with round N + 1.

Progress goes to stdout as one JSON object per line after PROGRESS_MARK, which the local launcher
(mesp.federated.local) shows.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from safetensors.torch import load_file

from ..data import load_data
from ..errors import MespError
from ..fileio import write_json
from ..loaders import load_model
from ..lora import ADAPTER_WEIGHTS, adapter_state, add_lora, save_adapter
from ..tokenizer import load_tokenizer
from ..train import evaluate
from ..train_config import lora_config
from . import PROGRESS_MARK, ROUND_RECORD, SUMMARY
from .checks import adapter_problem
from .client_app import ARRAYS, CLIENT, METRIC_KEYS, METRICS
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


def error_reason(reason: str) -> str:
    """Flower wraps a ClientApp's exception as "<class 'TYPE'>:<'MESSAGE'>": keep the message."""
    wrapped = re.fullmatch(r"<class '[^']*'>:<'(.*)'>", reason, re.S)
    return wrapped[1] if wrapped else reason


def reply_problem(content: RecordDict, reference: dict, max_update_norm: float | None) -> str | None:
    """Why a train reply may not be averaged: other records than the client's tensors, metrics and name;
    a metric missing, extra or not finite; a non-positive example count; an adapter that fails the checks."""
    records = set(content.keys())
    if records != {ARRAYS, METRICS, CLIENT}:
        return f"the reply holds records {sorted(records)}, expected {sorted([ARRAYS, METRICS, CLIENT])}"
    if set(content[CLIENT].keys()) != {"name"}:
        return f"the client record holds {sorted(content[CLIENT].keys())}, expected ['name']"
    metrics = content[METRICS]
    if set(metrics.keys()) != set(METRIC_KEYS):
        return f"the metrics are {sorted(metrics.keys())}, expected {sorted(METRIC_KEYS)}"
    if not all(isinstance(metrics[k], (int, float)) and math.isfinite(metrics[k]) for k in METRIC_KEYS):
        return "a metric is not a finite number"
    if not metrics["num-examples"] >= 1:
        return f"num-examples is {metrics['num-examples']}"
    return adapter_problem(content[ARRAYS].to_torch_state_dict(), reference, max_update_norm)


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

    def load_global(self, server_round: int) -> dict:
        """The global adapter of a complete round, as it was sent: fp32, PEFT-keyed, checked against the LoRA."""
        path = self.out_dir / f"round-{server_round}" / "global" / ADAPTER_WEIGHTS
        try:
            tensors = {k: v.float() for k, v in load_file(path).items()}
        except OSError as e:
            raise MespError(f"{path}: cannot read the round-{server_round} global adapter ({e})") from e
        problem = adapter_problem(tensors, self.initial)
        if problem:
            raise MespError(f"{path}: {problem}")
        return tensors


class MespFedAvg(FedAvg):
    """Flower's FedAvg over the replies that pass the checks (see the module docstring), every round kept."""

    def __init__(self, store: AdapterStore, num_clients: int, memory_budget_bytes: int | None,
                 max_update_norm: float | None, min_fraction: float, join_timeout: float, first_round: int = 0):
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1,
                         train_metrics_aggr_fn=aggregate_client_metrics)
        self.store = store
        self.num_clients = num_clients
        self.memory_budget_bytes = memory_budget_bytes
        self.max_update_norm = max_update_norm
        self.min_fraction = min_fraction
        self.join_timeout = join_timeout
        self.first_round = first_round  # rounds already complete (a resumed run): Flower's round r is ours r + this
        self.names: dict[int, str] = {}  # node id -> the name its replies gave
        self.sent: dict[str, int] = {}  # this round's message id -> destination node id
        self.messages: list[Message] = []
        self.global_tensors: dict = {}
        self.history: list[dict] = []

    def who(self, node_id: int) -> str:
        return f"{self.names[node_id]} (node {node_id})" if node_id in self.names else f"node {node_id}"

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        """Every connected node gets the global adapter; the first round waits for all clients to join."""
        server_round += self.first_round
        deadline = time.monotonic() + (self.join_timeout if not self.history else 0.0)
        while len(nodes := list(grid.get_node_ids())) < self.num_clients and time.monotonic() < deadline:
            time.sleep(1.0)
        need = self.needed(self.num_clients)
        if len(nodes) < need:
            raise MespError(f"round {server_round}: {len(nodes)} of {self.num_clients} clients are connected; "
                            f"--min-fraction {self.min_fraction:g} needs {need}")
        self.global_tensors = arrays.to_torch_state_dict()
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        self.messages = [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n)
                         for n in sorted(nodes)]
        return self.messages

    def needed(self, sent: int) -> int:
        return max(1, math.ceil(self.min_fraction * sent - 1e-9))

    def aggregate_train(self, server_round: int, replies):
        server_round += self.first_round
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self.messages}
        accepted, dropped, rejected, names_seen = [], [], [], set()
        answered = set()
        for m in replies:
            node = sent.get(m.metadata.reply_to_message_id, m.metadata.src_node_id)
            answered.add(node)
            if m.has_error():
                dropped.append({"client": self.who(node), "reason": error_reason(m.error.reason)})
                continue
            name = str(m.content[CLIENT]["name"]) if CLIENT in m.content.config_records else ""
            if name:
                self.names.setdefault(node, name)
            problem = reply_problem(m.content, self.global_tensors, self.max_update_norm)
            if problem is None and name in names_seen:
                problem = f"the name {name!r} is already taken this round"
            if problem:
                rejected.append({"client": f"{name} (node {node})" if name else f"node {node}", "reason": problem})
                continue
            names_seen.add(name)
            accepted.append((name, m))
        for node in sorted(set(sent.values()) - answered):
            dropped.append({"client": self.who(node), "reason": "no reply within the round timeout"})
        for kind, entries in (("dropped", dropped), ("rejected", rejected)):
            for e in entries:
                log.warning("round %d: %s %s: %s", server_round, kind, e["client"], e["reason"])
                report({"event": kind, "round": server_round, **e})
        need = self.needed(len(sent))
        if len(accepted) < need:
            left_out = "; ".join(f"{e['client']}: {e['reason']}" for e in dropped + rejected)
            raise MespError(f"round {server_round}: {len(accepted)} of {len(sent)} clients sent an adapter that "
                            f"could be averaged, --min-fraction {self.min_fraction:g} needs {need} ({left_out})")
        accepted.sort(key=lambda a: a[0])  # a fixed summation order: a re-run averages to the same bits
        arrays, metrics = super().aggregate_train(server_round, [m for _, m in accepted])
        round_dir = self.store.out_dir / f"round-{server_round}"
        clients = []
        for name, m in accepted:
            mr = m.content[METRICS]
            client_metrics = {"num_examples": int(mr["num-examples"]), "train_loss": float(mr["train-loss"]),
                              "private_peak_bytes": int(mr["private-peak-bytes"]) or None,
                              "seconds": float(mr["seconds"])}
            budget = self.memory_budget_bytes
            if budget and client_metrics["private_peak_bytes"]:
                client_metrics["over_memory_budget"] = client_metrics["private_peak_bytes"] > budget
            where = round_dir / "clients" / name
            self.store.save(m.content[ARRAYS].to_torch_state_dict(), where, f"client {name}")
            write_json(where / "metrics.json", client_metrics)
            clients.append({"name": name, **client_metrics})
        self.store.save(arrays.to_torch_state_dict(), round_dir / "global", f"round {server_round} average")
        entry = {"round": server_round, "train_loss": float(metrics["train-loss"]), "clients": clients,
                 "dropped": dropped, "rejected": rejected}
        write_json(round_dir / ROUND_RECORD, entry)  # last: the round is complete
        self.history.append(entry)
        report({"event": "round", **entry})
        return arrays, metrics


def held_out_loss_fn(store: AdapterStore, settings: ClientSettings, valid: str, first_round: int):
    """evaluate_fn for Strategy.start: the mean held-out loss per labelled token of the global adapter."""
    model = store.model
    dataset = load_data(valid, get_tokenizer=lambda: load_tokenizer(model), seq_len=settings.seq_len,
                         vocab_size=model.config.vocab_size)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        server_round += first_round
        set_adapter(model, arrays.to_torch_state_dict(), f"round {server_round} global adapter")
        loss = evaluate(model, dataset, settings.batch_size)
        write_json(store.out_dir / f"round-{server_round}" / "valid.json", {"valid_loss": loss})
        report({"event": "eval", "round": server_round, "valid_loss": loss})
        return MetricRecord({"valid-loss": loss})

    return evaluate_global


def completed_rounds(out_dir: Path, upto: int) -> list[dict]:
    """The records of rounds 1..upto, as written when each completed."""
    return [json.loads((out_dir / f"round-{r}" / ROUND_RECORD).read_text()) for r in range(1, upto + 1)]


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    try:
        settings = ClientSettings.from_run_config(rc)
        out_dir = Path(str(rc["out-dir"])).expanduser().resolve()
        num_clients = int(rc["num-clients"])
        budget_mb = float(rc["memory-budget-mb"])
        max_norm = float(rc["max-update-norm"])
        first = int(rc["resume-round"])
        store = AdapterStore(settings, out_dir)
        if first:
            start = store.load_global(first)
            history = completed_rounds(out_dir, first)
        else:
            start, history = store.initial, []
            store.save(start, out_dir / "round-0" / "global", "initial adapter")
        strategy = MespFedAvg(store, num_clients, int(budget_mb * 2**20) if budget_mb > 0 else None,
                              max_norm if max_norm > 0 else None, float(rc["min-fraction"]),
                              float(rc["join-timeout"]), first_round=first)
        valid = str(rc["valid"]).strip()
        report({"event": "start", "rounds": settings.rounds, "clients": num_clients, "first_round": first + 1})
        strategy.start(grid=grid, initial_arrays=ArrayRecord(start), num_rounds=settings.rounds - first,
                       timeout=float(rc["round-timeout"]), train_config=ConfigRecord(),
                       evaluate_fn=held_out_loss_fn(store, settings, valid, first) if valid else None)
        valid_losses = {}
        for r in range(0, settings.rounds + 1):
            path = out_dir / f"round-{r}" / "valid.json"
            if path.is_file():
                valid_losses[r] = json.loads(path.read_text())["valid_loss"]
        write_json(out_dir / SUMMARY, {"settings": {k: rc[k] for k in rc}, "rounds": history + strategy.history,
                                       "valid_loss": valid_losses or None})
        report({"event": "done", "out": str(out_dir)})
    except Exception as e:
        report({"event": "error", "message": f"{type(e).__name__}: {e}" if not isinstance(e, MespError)
                else str(e)})
        raise
