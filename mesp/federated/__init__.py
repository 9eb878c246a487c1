"""Federated personalization on Flower: many devices train one LoRA adapter, no data leaves them.

- local_training: one client's round in plain mesp (global adapter in, trained adapter and metrics out);
- client_app / server_app: the Flower ClientApp and ServerApp (FedAvg weighted by examples), run by
  `flwr run` from the app directory `APP_DIR` on any Flower deployment;
- checks: what the server checks in every returned adapter (and a client in the global one);
- credentials: a throw-away CA, TLS certificate and SuperNode keys for a local federation;
- processes: ports and the process groups of a federation;
- local: `mesp federated`'s launcher of a whole federation on 127.0.0.1 (a SuperLink, a SuperNode per client);
- cli: `mesp federated`'s flags and printed progress (registered by mesp.cli).

Flower itself is the optional extra mesp[federated]; only client_app and server_app import it (the launcher
runs Flower's commands, so without Flower `mesp federated` says what to install).
"""

from pathlib import Path

APP_DIR = Path(__file__).parent / "app"
PROGRESS_MARK = "mesp-federated: "  # the ServerApp's progress lines on stdout: this, then one JSON object
SUMMARY = "summary.json"  # written last by the ServerApp into its out-dir: its presence says the run finished
ROUND_RECORD = "round.json"  # written last into round-N/: its presence says round N is complete
SETTINGS = "federation.json"  # the launcher's settings, written first into its out-dir: what --resume reads
