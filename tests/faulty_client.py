"""TEST FAULT INJECTION ONLY, never part of mesp: a Flower ClientApp that is mesp's own
(mesp.federated.client_app.train) for every client but those whose node-config name asks for a fault:

- "mallory": trains honestly, then damages its reply: NaN in round 1, a wrong shape in round 2, an update of
  100 x sqrt(its size) (far over --max-update-norm) in round 3;
- "doomedN": in round N, writes its pid to $MESP_TEST_MARKERS/doomedN and sleeps, so that the test can
  SIGKILL it and its SuperNode mid-round.

The tests copy mesp's app directory, put this file beside its pyproject.toml and point `clientapp` here
(fed_helpers.faulty_app_dir); Flower imports it from the app's own directory. The ServerApp stays mesp's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from mesp.federated import client_app as honest

app = ClientApp()

MARKERS = "MESP_TEST_MARKERS"


def damaged(tensors: dict, server_round: int) -> dict:
    tensors = {k: v.clone() for k, v in tensors.items()}
    first = sorted(tensors)[0]
    if server_round == 1:
        tensors[first].view(-1)[0] = float("nan")
    elif server_round == 2:
        tensors[first] = tensors[first][:-1].contiguous()
    else:
        tensors = {k: v + 100.0 for k, v in tensors.items()}  # finite, but a norm of 100 x sqrt(size)
    return tensors


@app.train()
def train(msg: Message, context: Context) -> Message:
    _, name = honest.client_identity(context.node_config)
    server_round = int(msg.content[honest.CONFIG]["server-round"])
    if name == f"doomed{server_round}":
        marker = Path(os.environ[MARKERS]) / name
        marker.with_suffix(".tmp").write_text(str(os.getpid()))
        marker.with_suffix(".tmp").rename(marker)
        time.sleep(600)  # until the test kills this process and its SuperNode
    reply = honest.train(msg, context)
    if name == "mallory":
        tensors = damaged(reply.content[honest.ARRAYS].to_torch_state_dict(), server_round)
        content = RecordDict({**{k: reply.content[k] for k in reply.content.keys()},
                              honest.ARRAYS: ArrayRecord(tensors)})
        reply = Message(content=content, reply_to=msg)
    return reply
