"""The Flower ClientApp: one device's side of a round.

A SuperNode runs it with its node config naming the device's own data (`data="/path/own.jsonl"`, optional
`name="alice"`, default the file's stem). It takes the global adapter from the message, trains the run's
`local-steps` with mesp on that file (mesp.federated.local_training), and replies with the LoRA tensors (fp32)
and metrics: num-examples (FedAvg's weight), train-loss, private-peak-bytes, seconds. Only the adapter leaves
the device, never the data. The global adapter it receives must pass mesp.federated.checks against
the client's own LoRA (names, shapes, dtype, all finite) before it trains on it.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..errors import MespError
from .local_training import ClientSettings, train_client

# keys of the reply's records, shared with the ServerApp
ARRAYS, METRICS, CLIENT, CONFIG = "arrays", "metrics", "client", "config"
METRIC_KEYS = ("num-examples", "train-loss", "private-peak-bytes", "seconds")  # all a reply measures

app = ClientApp()


def client_identity(node_config) -> tuple[str, str]:
    """(data path, client name) from a SuperNode's node config."""
    data = str(node_config.get("data", "")).strip()
    if not data:
        raise MespError('node config: data="/path/to/own.jsonl" is required on every SuperNode of a mesp run')
    name = str(node_config.get("name", "")).strip() or Path(data).stem
    return data, name


@app.train()
def train(msg: Message, context: Context) -> Message:
    data, name = client_identity(context.node_config)
    settings = ClientSettings.from_run_config(context.run_config)
    server_round = int(msg.content[CONFIG]["server-round"])
    result = train_client(settings, data, msg.content[ARRAYS].to_torch_state_dict(), server_round,
                          check=True)
    metrics = MetricRecord({"num-examples": result.num_examples, "train-loss": result.loss,
                            "private-peak-bytes": int(result.private_peak_bytes or 0),
                            "seconds": result.seconds})
    content = RecordDict({ARRAYS: ArrayRecord(result.tensors), METRICS: metrics,
                          CLIENT: ConfigRecord({"name": name})})
    return Message(content=content, reply_to=msg)
