"""Gradient fidelity: how far mesp's and mebp's gradients are from autograd's (and all three from the fp64
truth), and how well MeZO's SPSA estimate points along the true gradient, beside its theoretical cosine."""

from __future__ import annotations

import math
import statistics
import sys
from dataclasses import dataclass

import torch

from ..errors import MespError
from ..lora import LoraConfig, add_lora
from ..loaders import load_model
from ..methods import compute_gradients
from ..settings import setting
from ..testing import cosine, randomize_lora_b, relative_errors
from .machine import machine_info
from .sweep import check_model_source


@dataclass
class GradsSettings:
    """`mesp bench grads`: the models and batch, MeZO's directions and trials, where to write the result."""
    models: list[str] = setting(factory=lambda: ["smollm2-135m-instruct", "qwen2.5-0.5b"],
                                help="comma-separated models")
    seq_len: int = setting(32, "tokens in the batch")
    rank: int = setting(8, "LoRA rank")
    directions: list[int] = setting(factory=lambda: [1, 10, 100], help="MeZO directions n")
    trials: int = setting(10, "seeds averaged for n: max(1, trials // n)")
    eps: float = setting(1e-3, "MeZO perturbation", default_text="default 1e-3")
    seed: int = setting(0, "LoRA init, batch and MeZO directions", flag=False)
    threads: int | None = setting(None, "torch threads", default_text="default: PyTorch's")
    json: str | None = setting(None, "write the result as JSON here")


def spsa_cosine_theory(d: int, n: int) -> float:
    """E[cos] between the mean of n SPSA estimates (g.z) z and g, z ~ N(0, I_d), for n << d:
    sqrt(2/d) Gamma((n+1)/2) / Gamma(n/2). n = 1 gives the paper's figure sqrt(2/(pi d)); large n ~ sqrt(n/d)."""
    return math.sqrt(2.0 / d) * math.exp(math.lgamma((n + 1) / 2) - math.lgamma(n / 2))


def bench_grads(settings: GradsSettings, progress: bool = True) -> dict:
    """Relative error of mesp and mebp against autograd per tensor (fp32); of all three against the fp64
    autograd gradient (the truth, which shows fp32's own rounding); and MeZO's cosine with the true gradient for
    each n in `directions` (mean over max(1, trials // n) independent seeds)."""
    from tqdm import tqdm

    s = settings
    for m in s.models:
        check_model_source(m)
    if s.seq_len < 2 or s.rank < 1 or not s.directions or min(s.directions) < 1:
        raise MespError("grads: seq-len >= 2, rank >= 1 and directions >= 1 required")
    rows = []
    bar = tqdm(total=len(s.models) * (4 + sum(max(1, s.trials // n) for n in s.directions)), desc="bench grads",
               disable=not progress, file=sys.stderr)
    for source in s.models:
        bar.set_postfix_str(source)
        model = load_model(source)
        add_lora(model, LoraConfig(r=s.rank), seed=s.seed)
        randomize_lora_b(model, s.seed, std=0.02)
        g = torch.Generator().manual_seed(s.seed)
        ids = torch.randint(0, model.config.vocab_size, (1, s.seq_len), generator=g)
        d = sum(p.numel() for p in model.lora_parameters().values())
        row = {"model": source, "seq_len": s.seq_len, "rank": s.rank, "dtype": "fp32", "lora_parameters": d,
               "eps": s.eps}
        loss_ref, ref = compute_gradients(model, ids, ids, method="autograd")
        fp32 = {"autograd": ref}
        row["autograd"] = {}
        bar.update()
        for method in ("mesp", "mebp"):
            loss, fp32[method] = compute_gradients(model, ids, ids, method=method)
            errs = relative_errors(fp32[method], ref)
            row[method] = {"max_rel_error": max(errs.values()), "median_rel_error": statistics.median(errs.values()),
                           "worst_tensor": max(errs, key=errs.get), "loss_abs_diff": abs(float(loss - loss_ref))}
            bar.update()
        row["loss"] = float(loss_ref)
        row["mezo"] = []
        for n in s.directions:
            cosines = []
            for t in range(max(1, s.trials // n)):
                _, est = compute_gradients(model, ids, ids, method="mezo", n_directions=n, eps=s.eps,
                                           seed=s.seed + 1000 * t + n)
                cosines.append(cosine(est, ref))
                bar.update()
            row["mezo"].append({"n_directions": n, "trials": len(cosines), "cosine_mean": statistics.mean(cosines),
                                "cosines": cosines, "theory": spsa_cosine_theory(d, n)})
        model.double()  # same weights and adapter in fp64: the reference the fp32 gradients all round from
        _, truth = compute_gradients(model, ids, ids, method="autograd")
        bar.update()
        for method, grads in fp32.items():
            errs = relative_errors(grads, truth)
            row[method].update(max_rel_error_vs_fp64=max(errs.values()),
                               median_rel_error_vs_fp64=statistics.median(errs.values()))
        rows.append(row)
        del model
    bar.close()
    return {"rows": rows, "machine": machine_info()}


def grads_table(result: dict) -> str:
    """A plain-text summary of a bench_grads result (what the CLI prints)."""
    lines = []
    for r in result["rows"]:
        lines.append(f"{r['model']}  T={r['seq_len']} r={r['rank']} fp32  d={r['lora_parameters']:,} LoRA parameters")
        for m in ("mesp", "mebp"):
            e = r[m]
            lines.append(f"  {m} vs autograd: max rel error {e['max_rel_error']:.2e}, median "
                         f"{e['median_rel_error']:.2e}, |loss diff| {e['loss_abs_diff']:.1e}")
        lines.append("  vs the fp64 gradient (max/median): " + ", ".join(
            f"{m} {r[m]['max_rel_error_vs_fp64']:.1e}/{r[m]['median_rel_error_vs_fp64']:.1e}"
            for m in ("autograd", "mesp", "mebp")))
        for z in r["mezo"]:
            lines.append(f"  mezo n={z['n_directions']:<4d} cosine {z['cosine_mean']:+.2e} (mean of {z['trials']}); "
                         f"theory {z['theory']:.2e}")
    return "\n".join(lines)
