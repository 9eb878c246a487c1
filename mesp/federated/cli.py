"""`mesp federated`'s command line (registered by mesp.cli; like it, the only place here that prints): its flags,
the federation's progress events as lines, and the run."""

from __future__ import annotations

import argparse

from ..errors import MespError
from ..memory import format_mib
from ..methods import METHODS


def federated_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="base model of every client: HF directory, .gguf file or preset name")
    p.add_argument("--clients", help="comma-separated JSONL files, one SuperNode (client) each; a client's name "
                                     "is its file's stem")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    p.add_argument("--local-steps", type=int, default=10, help="optimizer steps per client per round (default 10)")
    p.add_argument("--out", metavar="DIR", help="run directory: round-N/global/, round-N/clients/NAME/, "
                                                "summary.json, logs/ (must be new or empty)")
    p.add_argument("--method", choices=METHODS, default="mesp", help="gradient method of the clients "
                                                                     "(default mesp)")
    p.add_argument("--memory-budget", type=float, metavar="MB", help="the clients' private-footprint budget in MiB: "
                   "each client's peak is measured and one over it is flagged (reported, not enforced: training "
                   "has no cap to enforce yet)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: mesp train's for the optimizer)")
    p.add_argument("--batch-size", type=int, default=4, help="samples per step (default 4)")
    p.add_argument("--seq-len", type=int, default=256, help="longest sample in tokens (default 256)")
    p.add_argument("--valid", metavar="FILE.jsonl", help="held-out data: the global adapter's loss every round")
    p.add_argument("--port", type=int, help="first local port to try (default: any free ports)")
    p.add_argument("--insecure", action="store_true", help="Flower's --insecure: no TLS (traffic readable on the "
                   "wire) and no SuperNode authentication (any node reaching the SuperLink may join)")
    p.add_argument("--max-update-norm", type=float, default=1000.0, help="leave out a returned adapter whose "
                   "change (L2 over all tensors) exceeds this (default 1000)")
    p.add_argument("--min-fraction", type=float, default=0.5, help="a round fails when fewer than this fraction "
                   "of its clients are averaged (default 0.5)")
    p.add_argument("--round-timeout", type=float, default=3600.0, help="seconds a round waits for replies "
                   "(default 3600)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out from its last "
                   "complete round (its settings come from OUT/federation.json)")
    p.add_argument("--demo", action="store_true", help="three clients, each with facts about a different "
                   "fictional person, on the shipped SmolLM2; scores held-out questions before and after")


def print_federated_event(event: dict) -> None:
    kind = event["event"]
    if kind == "started":
        print(f"started a SuperLink and {len(event['clients'])} SuperNodes ({', '.join(event['clients'])}) on "
              f"127.0.0.1; running the mesp app with flwr run ...", flush=True)
    elif kind == "round":
        peaks = ", ".join(f"{c['name']} {c['train_loss']:.3f}"
                          + (f" ({format_mib(c['private_peak_bytes'], 0)} MiB)" if c["private_peak_bytes"] else "")
                          + (" OVER BUDGET" if c.get("over_memory_budget") else "") for c in event["clients"])
        print(f"  round {event['round']}: mean train loss {event['train_loss']:.4f}; clients: {peaks}", flush=True)
    elif kind in ("dropped", "rejected"):
        print(f"  round {event['round']}: {kind} {event['client']}: {event['reason']}", flush=True)
    elif kind in ("dropout", "refused"):
        print(f"  {event.get('client', '')} {event['message']}".replace("   ", " "), flush=True)
    elif kind == "eval":
        print(f"  round {event['round']}: held-out loss of the global adapter {event['valid_loss']:.4f}",
              flush=True)


def federated_run(args) -> int:
    from ..cli import print_answers  # the demo's answers, printed as `mesp demo` prints them
    from .local import FederationSettings, run_local_federation

    if args.demo:
        from .demo import run_federated_demo

        report = run_federated_demo(out=args.out, port=args.port, progress=print_federated_event,
                                    announce=print)
        for person, answers in report.answers.items():
            print_answers(f"{person}: held-out answers with the global adapter", answers, "after")
        print("\nheld-out answers correct per person, base model -> global adapter:")
        for person, s in report.scores.items():
            print(f"  {person:10s} {s['before']}/{s['total']} -> {s['after']}/{s['total']}")
        print("client private-footprint peaks: " + ", ".join(
            f"{name} {format_mib(b) + ' MiB' if b else 'unknown'}" for name, b in report.peaks.items()))
        print(f"adapters: {report.out}" if report.out else "(pass --out DIR to keep the adapters)")
        print(f"done in {report.seconds:.0f} s ({report.federation_seconds:.0f} s of federation)")
        return 0
    for flag in (("out",) if args.resume else ("model", "clients", "out")):
        if not getattr(args, flag):
            raise MespError(f"--{flag}: required (or --demo)")
    settings = FederationSettings(model=args.model or "", clients=[c for c in (args.clients or "").split(",") if c],
                                  rounds=args.rounds, local_steps=args.local_steps, out=args.out,
                                  method=args.method, memory_budget_mb=args.memory_budget, rank=args.rank,
                                  alpha=args.alpha, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                                  valid=args.valid, port=args.port, insecure=args.insecure,
                                  max_update_norm=args.max_update_norm, min_fraction=args.min_fraction,
                                  round_timeout=args.round_timeout)
    if args.insecure:
        print("--insecure: no TLS and no SuperNode authentication; anything on this machine may read the "
              "traffic or join", flush=True)
    result = run_local_federation(settings, progress=print_federated_event, resume=args.resume)
    print(f"{len(result.rounds)} rounds in {result.seconds:.1f} s; global adapters: "
          f"{result.out}/round-N/global (last: round-{len(result.rounds)})")
    return 0
