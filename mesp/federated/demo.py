"""The federated demo: three devices, each holding facts about a different fictional person, train one adapter
with mesp on Flower; afterwards the global adapter answers held-out questions about all three people, though
no device ever saw another's data.

    report = run_federated_demo(progress=print)

1. asks every person's held-out questions (paraphrases absent from all training data) of the base model;
2. runs a local federation (mesp.federated.local): one SuperNode per person's file, FedAvg over a few rounds;
3. asks them again with the last round's global adapter, and scores both per person (mesp.demo's scoring:
   an answer is right when it contains the expected word);
4. reports each client's private-footprint peak (the largest over the rounds).

The data lives in mesp/demo_data: fed_NAME.jsonl (chat `messages`, the device's own) and
fed_NAME_heldout.jsonl ({"question", "answer"}) for each person.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..demo import DATA_DIR, MODEL, ask, load_heldout
from ..loaders import load_model
from ..lora import load_adapter
from ..tokenizer import load_tokenizer
from .local import FederationSettings, run_local_federation

PEOPLE = ("tomasz", "amara", "rosalind")
MAX_NEW_TOKENS = 16  # the answers are one short sentence


def client_file(person: str) -> Path:
    return DATA_DIR / f"fed_{person}.jsonl"


def heldout_file(person: str) -> Path:
    return DATA_DIR / f"fed_{person}_heldout.jsonl"


def demo_settings(out: str, port: int | None = None) -> FederationSettings:
    """Tuned for SmolLM2-135M on a few CPU cores: every round each client makes `local_steps` steps, and FedAvg
    then scales each client's change by its share of the examples (a third here), so the rate is higher than
    the single-device demo's."""
    return FederationSettings(model=MODEL, clients=[str(client_file(p)) for p in PEOPLE], rounds=4,
                              local_steps=8, out=out, method="mesp", rank=16, alpha=32.0, lr=4e-3, batch_size=4,
                              seq_len=64, port=port)


@dataclass
class FederatedDemoReport:
    scores: dict[str, dict]  # person -> {"before": n, "after": n, "total": n}
    answers: dict[str, list]  # person -> [mesp.demo.Answer]
    peaks: dict[str, int | None]  # client name -> largest private-footprint peak over the rounds, bytes
    rounds: list[dict]
    seconds: float
    federation_seconds: float
    out: str | None  # None when the run went to a temporary directory that is gone now


def run_federated_demo(out: str | None = None, port: int | None = None,
                       progress: Callable[[dict], None] | None = None,
                       announce: Callable[[str], None] | None = None) -> FederatedDemoReport:
    """Run the demo (see the module docstring). progress(event) receives the federation's events; announce(text)
    a line before each phase."""
    say = announce or (lambda text: None)
    started = time.perf_counter()
    run_dir = Path(out) if out else Path(tempfile.mkdtemp(prefix="mesp-fed-demo-")) / "run"
    settings = demo_settings(str(run_dir), port)
    answers = {p: load_heldout(heldout_file(p)) for p in PEOPLE}
    try:
        say(f"mesp federated demo: {len(PEOPLE)} clients ({', '.join(PEOPLE)}), each with facts about one person; "
            f"{settings.rounds} rounds of {settings.local_steps} MeSP steps on {settings.model}; asking the "
            f"held-out questions first ...")
        # the scoring runs in this process, not on a device: resident weights generate faster than streamed
        model = load_model(settings.model, weights="resident")
        tokenizer = load_tokenizer(model)
        for person, items in answers.items():
            for a, text in zip(items, ask(model, tokenizer, [a.question for a in items], MAX_NEW_TOKENS)):
                a.before = text
        del model  # the clients load their own; the launcher's process need not hold one meanwhile
        result = run_local_federation(settings, progress=progress)
        say(f"asking again with the round-{settings.rounds} global adapter ...")
        model = load_model(settings.model, weights="resident")
        load_adapter(model, run_dir / f"round-{settings.rounds}" / "global")
        for person, items in answers.items():
            for a, text in zip(items, ask(model, tokenizer, [a.question for a in items], MAX_NEW_TOKENS)):
                a.after = text
    finally:
        if out is None:
            shutil.rmtree(run_dir.parent, ignore_errors=True)
    scores = {p: {"before": sum(a.correct_before for a in items), "after": sum(a.correct_after for a in items),
                  "total": len(items)} for p, items in answers.items()}
    peaks: dict[str, int | None] = {}
    for r in result.rounds:
        for c in r["clients"]:
            if c["private_peak_bytes"] is not None:
                peaks[c["name"]] = max(peaks.get(c["name"]) or 0, c["private_peak_bytes"])
            else:
                peaks.setdefault(c["name"], None)
    return FederatedDemoReport(scores=scores, answers=answers, peaks=peaks, rounds=result.rounds,
                               seconds=time.perf_counter() - started, federation_seconds=result.seconds,
                               out=str(run_dir) if out else None)
