"""The ServerApp's checks of returned adapters (mesp.federated.checks, MespFedAvg.aggregate_train), in-process:
wrong keys, shape, dtype, NaN, inf and a too-large update are each refused with a reason naming the tensor; a
round over good and bad replies averages (example-weighted) the good ones only; too few good replies fail the
round with one line naming who was left out; a client's reply holds nothing but its LoRA tensors and the named
metrics."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.common.serde import message_to_proto  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from mesp.errors import MespError  # noqa: E402
from mesp.federated.checks import adapter_problem  # noqa: E402
from mesp.federated import client_app  # noqa: E402
from mesp.federated.client_app import ARRAYS, CLIENT, CONFIG, METRIC_KEYS, METRICS  # noqa: E402
from mesp.federated.local_training import ClientSettings, train_client  # noqa: E402
from mesp.federated.server_app import AdapterStore, MespFedAvg  # noqa: E402
from fed_helpers import write_client_files  # noqa: E402

A, B = "base_model.model.layers.0.q_proj.lora_A.weight", "base_model.model.layers.0.q_proj.lora_B.weight"


def adapter(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(4, 16, generator=g), B: torch.randn(16, 4, generator=g) * 0.01}


@pytest.mark.parametrize("damage, expected", [
    (lambda t: t.pop(B), f"missing (first: {B})"),
    (lambda t: t.update({"extra.weight": torch.zeros(2)}), "unexpected tensor(s) (first: extra.weight)"),
    (lambda t: t.update({A: torch.zeros(4, 15)}), f"{A} has shape (4, 15), expected (4, 16)"),
    (lambda t: t.update({B: t[B].double()}), f"{B} has dtype torch.float64, expected torch.float32"),
    (lambda t: t[A].__setitem__((0, 0), float("nan")), f"{A} has 1 non-finite value(s)"),
    (lambda t: t[B].__setitem__((1, 2), float("-inf")), f"{B} has 1 non-finite value(s)"),
    (lambda t: t[A].add_(100.0), "exceeds --max-update-norm 100"),
])
def test_adapter_problem_names_the_tensor(damage, expected):
    reference = adapter(0)
    returned = {k: v.clone() for k, v in reference.items()}
    assert adapter_problem(returned, reference, max_update_norm=100.0) is None
    damage(returned)
    problem = adapter_problem(returned, reference, max_update_norm=100.0)
    assert problem is not None and expected in problem, problem


def test_update_norm_is_over_all_tensors_together():
    reference = adapter(0)
    returned = {A: reference[A] + 3.0 / 8.0, B: reference[B] + 4.0 / 8.0}  # 64 entries each: norms 3 and 4
    assert adapter_problem(returned, reference, max_update_norm=5.0 + 1e-6) is None
    assert "norm 5 exceeds" in adapter_problem(returned, reference, max_update_norm=5.0 - 1e-6)
    assert adapter_problem(returned, reference, max_update_norm=None) is None  # no bound: shapes etc. only


class DiscardingStore:
    """AdapterStore's interface without a model: aggregation is what is tested here, not writing PEFT files."""

    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.saved: dict[str, dict] = {}

    def save(self, tensors, where, what):
        self.saved[str(where)] = tensors


def reply(sent: Message, name: str, tensors: dict, examples: int, loss: float) -> Message:
    content = RecordDict({ARRAYS: ArrayRecord(tensors),
                          METRICS: MetricRecord({"num-examples": examples, "train-loss": loss,
                                                 "private-peak-bytes": 0, "seconds": 0.1}),
                          CLIENT: ConfigRecord({"name": name})})
    return Message(content, reply_to=sent)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What a running ServerApp has and Message() reads: its run and task."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1, raising=False)


def round_of(tmp_path, replies_by_node, min_fraction=0.5, max_update_norm=100.0):
    """One round through MespFedAvg: configure_train to every node, then aggregate the given replies."""
    store = DiscardingStore(tmp_path)
    strategy = MespFedAvg(store, len(replies_by_node), None, max_update_norm, min_fraction, join_timeout=0.0)

    class Grid:
        def get_node_ids(self):
            return list(replies_by_node)

    global_tensors = adapter(0)
    sent = strategy.configure_train(1, ArrayRecord(global_tensors), ConfigRecord(), Grid())
    for i, m in enumerate(sent):
        m.metadata._message_id = f"message-{i}"  # the SuperLink sets it when it pushes the message
    replies = [reply(m, *replies_by_node[m.metadata.dst_node_id](global_tensors)) for m in sent]
    return strategy, strategy.aggregate_train(1, replies), global_tensors


def test_round_averages_only_the_good_replies(tmp_path):
    def good(seed, examples):
        return lambda g: (f"good{seed}", {k: g[k] + 0.1 * v for k, v in adapter(seed).items()}, examples, 1.0)

    def nan(g):
        t = {k: v.clone() for k, v in g.items()}
        t[A][2, 3] = float("nan")
        return "nan", t, 50, 0.5

    def huge(g):
        return "huge", {k: v + 1e3 for k, v in g.items()}, 50, 0.5

    def reshaped(g):
        return "reshaped", {A: g[A][:, :8].contiguous(), B: g[B]}, 50, 0.5

    nodes = {11: good(1, 3), 12: nan, 13: good(2, 5), 14: huge, 15: reshaped, 16: good(3, 2)}
    strategy, (arrays, metrics), g = round_of(tmp_path, nodes)
    goods = [(nodes[n](g)[1], nodes[n](g)[2]) for n in (11, 13, 16)]
    total = sum(w for _, w in goods)
    for key in (A, B):
        expected = sum(t[key].double() * w for t, w in goods) / total
        got = arrays.to_torch_state_dict()[key].double()
        assert (got - expected).abs().max().item() <= 1e-6
    assert int(metrics["num-examples"]) == total
    record = strategy.history[-1]
    assert [c["name"] for c in record["clients"]] == ["good1", "good2", "good3"]
    reasons = {e["client"]: e["reason"] for e in record["rejected"]}
    assert set(reasons) == {"nan (node 12)", "huge (node 14)", "reshaped (node 15)"}
    assert "non-finite" in reasons["nan (node 12)"] and A in reasons["nan (node 12)"]
    assert "exceeds --max-update-norm" in reasons["huge (node 14)"]
    assert "shape (4, 8)" in reasons["reshaped (node 15)"]


def test_round_with_too_few_good_replies_fails_in_one_line(tmp_path):
    def nan(g):
        return "bad", {A: g[A] * math.nan, B: g[B]}, 10, 1.0

    def good(g):
        return "ok", {k: v + 0.01 for k, v in g.items()}, 10, 1.0

    with pytest.raises(MespError) as e:
        round_of(tmp_path, {1: good, 2: nan, 3: nan}, min_fraction=0.5)
    message = str(e.value)
    assert "\n" not in message
    assert "1 of 3 clients" in message and "needs 2" in message and "bad (node 2)" in message, message


def test_nothing_but_lora_tensors_and_the_named_metrics_leave_a_client(make_hf_model, tmp_path):
    """The ClientApp's reply to a real train message, as Flower would send it: the LoRA tensors (exactly the
    trained ones), the named metrics and the client's name; neither the data nor its path, in any record or
    in the serialized message, whose size is the tensors' plus their names and headers."""
    path, hf = make_hf_model("llama")
    data = write_client_files(tmp_path, hf.config.vocab_size, {"alice": 3})["alice"]
    settings = ClientSettings(model=str(path), steps=1, rounds=1, rank=2, seq_len=16, batch_size=2, lr=1e-2)
    start = AdapterStore(settings, tmp_path / "server").initial
    sent = Message(RecordDict({ARRAYS: ArrayRecord(start), CONFIG: ConfigRecord({"server-round": 1})}),
                   dst_node_id=7, message_type=MessageType.TRAIN)
    sent.metadata._message_id = "message-0"  # the SuperLink sets it when it pushes the message
    context = Context(run_id=1, node_id=7, node_config={"data": data, "name": "alice"}, state=RecordDict(),
                      run_config=settings.to_run_config())

    content = client_app.train(sent, context).content
    assert set(content.keys()) == {ARRAYS, METRICS, CLIENT}
    assert (set(content.array_records), set(content.metric_records), set(content.config_records)) == \
        ({ARRAYS}, {METRICS}, {CLIENT})
    tensors = content[ARRAYS].to_torch_state_dict()
    assert set(tensors) == set(start) and all(re.search(r"\.lora_[AB]\.weight$", k) for k in tensors)
    trained = train_client(settings, data, start, server_round=1).tensors
    for key, value in tensors.items():
        assert value.dtype == torch.float32 and torch.equal(value, trained[key]), key
    assert set(content[METRICS].keys()) == set(METRIC_KEYS)
    assert dict(content[CLIENT]) == {"name": "alice"}

    reply = Message(content, reply_to=sent)
    wire = message_to_proto(reply).SerializeToString()
    assert data.encode() not in wire and Path(data).read_bytes()[:20] not in wire
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    framing = 256 * len(tensors) + 1024  # per tensor: its name (twice) and a .npy header; then the metadata
    assert payload <= len(wire) <= payload + framing, (len(wire), payload, len(tensors))
