"""Per family: the largest relative error per LoRA tensor of mesp, mebp and autograd against transformers + PEFT
over the exactness cases of tests/test_engines.py (tiny random models, fp32, random lora_B), as JSON on stdout.
What docs/results/families.md quotes; the tests assert the same bound (1e-5) case by case. A tensor whose true
gradient is zero (q and k when position 0 is the only target) has no relative error: as in the tests, it is left
out when the reference is below 1e-6 of the whole gradient's norm (the method's must then be as small).

    .venv/bin/python scripts/family_exactness.py > docs/results/families_exactness.json
"""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import mesp  # noqa: E402
from helpers import build_hf_model, make_batch  # noqa: E402
from mesp.testing import relative_errors  # noqa: E402
from test_engines import CASES, GQA, our_model, peft_reference  # noqa: E402


def main() -> None:
    worst: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n, (arch, gqa, tied, extra, targets, r, B, T, padding, attn_block, loss_chunk) in enumerate(CASES):
            hf = build_hf_model(arch, **GQA[gqa], tie_word_embeddings=tied, **extra)
            path = Path(tmp) / f"case{n}"
            hf.save_pretrained(path)
            model = our_model(path, targets, r=r)
            ids, labels, mask = make_batch(B, T, model.config.vocab_size, padding, seed=T, prompt=2 if B > 1 else 0)
            _, ref = peft_reference(path, model, ids, labels, mask)
            for method in ("mesp", "mebp", "autograd"):
                _, grads = mesp.compute_gradients(model, ids, labels, mask, method=method)
                total = sum(float(g.double().norm()) ** 2 for g in ref.values()) ** 0.5
                zero = {k for k, g in ref.items() if float(g.double().norm()) <= 1e-6 * total}
                assert all(float(grads[k].double().norm()) <= 1e-5 * total for k in zero), (arch, n, method)
                err = max(e for k, e in relative_errors(grads, ref).items() if k not in zero)
                row = worst.setdefault(arch, {"cases": 0, "max_T": 0})
                row[method] = max(row.get(method, 0.0), err)
            row["cases"] += 1
            row["max_T"] = max(row["max_T"], T)
    json.dump(worst, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
