"""Where a training step's time goes: mesp's default step, MeBP and transformers + PEFT with gradient
checkpointing, side by side in one process, then (with --profile) torch.profiler's per-op table of mesp's step.

Every method runs on the same architecture (a preset's config, optionally with fewer layers as a quick proxy),
LoRA r=8 alpha 16 on all seven projections, fp32, batch 1, one warm-up step each, then --rounds rounds in
alternating order (so load on a shared machine falls on all of them alike); the minimum and median of each are
printed with the ratio to the peer. Random weights: their values do not change the time.

    .venv/bin/python scripts/profile_step.py --layers 4 --seq-len 256 --rounds 3
    .venv/bin/python scripts/profile_step.py --layers 4 --methods mesp --profile
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mesp import LoraConfig, add_lora  # noqa: E402
from mesp.bench.machine import machine_info, machine_line  # noqa: E402
from mesp.bench.rounds import time_alternating  # noqa: E402
from mesp.bench.sweep import MemoryCase, _peer_step  # noqa: E402
from mesp.loaders import load_random  # noqa: E402
from mesp.methods import compute_gradients  # noqa: E402
from mesp.presets import PRESETS  # noqa: E402

PEER = "hf+peft(gc)"


def build(args):
    config = dict(PRESETS[args.model]["config"])
    if args.layers:
        config["num_hidden_layers"] = args.layers
    ids = torch.randint(0, config["vocab_size"], (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    steps, model = {}, None
    engine_methods = [m for m in args.methods if m != PEER]
    if engine_methods:
        model = load_random(args.model, config, torch.float32, "cpu")
        add_lora(model, LoraConfig(r=args.rank, alpha=16))
        L = config["num_hidden_layers"]
        for m in engine_methods:  # "mesp" or "mesp:{json options}" ("keep_last": n keeps the last n layers)
            method, _, text = m.partition(":")
            opts = json.loads(text) if text else {}
            if "keep_last" in opts:
                opts["keep_layers"] = frozenset(range(L - opts.pop("keep_last"), L))
            steps[m] = (lambda method=method, opts=opts: compute_gradients(model, ids, ids, method=method, **opts))
    if PEER in args.methods:
        # the sweep's peer, built from this (possibly shortened) config
        PRESETS["_profile_proxy"] = {"kind": "random", "config": config}
        case = MemoryCase(model="_profile_proxy", seq_len=args.seq_len, rank=args.rank, method=PEER)
        steps[PEER] = _peer_step(case)[0]
    return steps, model


def profile(step, rows: int, sort: str) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    print(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=40))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=rows,
                                                              max_name_column_width=30, max_shapes_column_width=70))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (0: the preset's)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=["mesp", "mebp", PEER],
                    help='mesp, mebp, hf+peft(gc), or mesp:{"keep_last": 8, "token_chunk": 128} (engine options)')
    ap.add_argument("--profile", action="store_true", help="then profile one step of the first method")
    ap.add_argument("--sort", default="self_cpu_time_total")
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"{machine_line(info)}; threads {torch.get_num_threads()}; load {info.get('load_average')}")
    steps, _ = build(args)
    names = list(steps)
    if args.rounds:
        rows = [{"label": n} for n in names]
        time_alternating(rows, [steps[n] for n in names], args.rounds, "profile_step", lambda r: r["label"],
                         warmup=True, progress=False)
        ref = next((r for r in rows if r["label"] == PEER), None)
        print(f"{args.model} layers={args.layers or 'all'} T={args.seq_len} r={args.rank}")
        for r in rows:
            ratio = f"  {r['seconds_min'] / ref['seconds_min']:.2f}x peer" if ref else ""
            print(f"  {r['label']:28s} min {r['seconds_min']:7.2f} s  median {r['seconds_median']:7.2f} s  "
                  f"all {' '.join(f'{s:.2f}' for s in r['seconds'])}{ratio}")
        print(f"load after: {open('/proc/loadavg').read().split()[:3]}")
    if args.profile:
        if not args.rounds:
            steps[names[0]]()  # warm-up
        t0 = time.perf_counter()
        profile(steps[names[0]], args.rows, args.sort)
        print(f"profiled step of {names[0]}: {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
