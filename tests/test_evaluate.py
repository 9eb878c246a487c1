"""`mesp eval`: the loss it reports equals the loss compute_gradients reports on the same data and adapter, for the
base and the adapter side by side."""

from __future__ import annotations

import json
import math

import mesp
from mesp.cli import main
from mesp.data import load_data
from mesp.lora import LoraConfig, add_lora, save_adapter
from mesp.methods import compute_gradients

from helpers import randomize_lora_b


def test_eval_equals_compute_gradients(tmp_path, make_hf_model, capsys):
    path, _ = make_hf_model("qwen2", num_key_value_heads=2)
    rows = [{"input_ids": [(5 * i + 3 * j) % 96 for j in range(5 + 2 * i)],
             "labels": [-100] * 2 + [(5 * i + 3 * j) % 96 for j in range(2, 5 + 2 * i)]} for i in range(5)]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = mesp.load_model(str(path))
    add_lora(model, LoraConfig(r=4, alpha=8.0), seed=0)
    data = load_data(tmp_path / "test.jsonl")

    def reported_loss():
        return sum(float(compute_gradients(model, b.input_ids, b.labels, b.attention_mask, method="mesp",
                                           normalizer=data.n_targets)[0]) for b in data.batches_in_order(2))

    base = reported_loss()  # lora_B starts at zero: the base model's loss
    randomize_lora_b(model, seed=1)
    save_adapter(model, tmp_path / "adapter")
    adapted = reported_loss()
    assert abs(adapted - base) > 1e-3  # the adapter changes the loss, so the two rows are told apart
    assert main(["eval", "--model", str(path), "--adapter", str(tmp_path / "adapter"), "--data",
                 str(tmp_path / "test.jsonl"), "--batch-size", "3", "--dtype", "float32", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["samples"] == 5 and r["targets"] == data.n_targets
    assert math.isclose(r["base"]["loss"], base, rel_tol=1e-5)
    assert math.isclose(r["adapter"]["loss"], adapted, rel_tol=1e-5)
    assert math.isclose(r["adapter"]["perplexity"], math.exp(adapted), rel_tol=1e-5)
