"""`mesp bench`: memory (fresh-process measurements, JSON, PNG), gradient fidelity, convergence (CSV, PNG) and the
report's rendering, on tiny random models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mesp import bench
from mesp.bench import plan
from mesp.cli import main
from mesp.errors import MespError
from mesp.memory import PeakMemory

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A vocabulary large against the width, so full-vocabulary logits dominate MeBP's step as they do for Qwen2.5.
WIDE_VOCAB = dict(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)
ROW_FIELDS = {"model", "seq_len", "rank", "method", "dtype", "peak_bytes", "step_seconds", "stage_peaks",
              "weights_bytes", "peak_rss_bytes", "lora_grad_bytes", "loss"}


@pytest.fixture(scope="module")
def tiny_dir(make_hf_model):
    path, _ = make_hf_model("qwen2", **WIDE_VOCAB)
    return str(path)


@pytest.fixture(scope="module")
def memory_run(tiny_dir, tmp_path_factory):
    """One `mesp bench memory` run (two fresh worker processes) shared by the tests below."""
    out = tmp_path_factory.mktemp("bench")
    js, png = out / "memory.json", out / "memory.png"
    rc = main(["bench", "memory", "--models", tiny_dir, "--seq-lens", "256", "--ranks", "8", "--methods",
               "mesp,mebp", "--repeats", "2", "--no-peer", "--threads", "1", "--json", str(js), "--plot", str(png)])
    assert rc == 0
    return json.loads(js.read_text()), png


def test_memory_json_rows_and_png(memory_run, tiny_dir):
    result, png = memory_run
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"mesp", "mebp"}
    for r in rows.values():
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert (r["model"], r["seq_len"], r["rank"], r["dtype"]) == (tiny_dir, 256, 8, "fp32")
        assert r["peak_bytes"] > 0 and r["step_seconds"] > 0 and len(r["step_seconds_all"]) == 2
        assert {"forward", "loss", "backward"} <= set(r["stage_peaks"])
        assert max(r["stage_peaks"].values()) == r["peak_bytes"]
        assert r["peak_rss_bytes"] >= r["weights_bytes"]
        if r["private_peak_bytes"] is not None:  # Linux: sampled over the whole fresh worker, loading included
            assert r["private_peak_bytes"] >= r["weights_bytes"] and "load" in r["stage_private_peaks"]
    assert "private MiB" in bench.memory_table(result).splitlines()[0]
    assert rows["mesp"]["weights_bytes"] == rows["mebp"]["weights_bytes"]
    assert rows["mesp"]["lora_grad_bytes"] == rows["mebp"]["lora_grad_bytes"] == rows["mesp"]["lora_bytes"]
    assert rows["mesp"]["loss"] == pytest.approx(rows["mebp"]["loss"], rel=1e-5)
    # MeBP's loss stage holds [T, V] fp32 logits (4 MiB here); MeSP's chunked head never builds them
    logits = 256 * WIDE_VOCAB["vocab_size"] * 4
    assert rows["mebp"]["stage_peaks"]["loss"] >= logits
    assert rows["mesp"]["peak_bytes"] * 2 < rows["mebp"]["peak_bytes"]
    assert {"cpu", "cores", "ram_bytes", "torch"} <= set(result["machine"])
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_peer_and_store_h_in_process(tiny_dir):
    """transformers+PEFT(gc) holds the same weights as mesp's model; store_h keeps the gradient-free step working."""
    case = bench.MemoryCase(model=tiny_dir, seq_len=64, rank=4, method=bench.PEER)
    peer = bench.measure_here(case)
    mesp = bench.measure_here(bench.MemoryCase(model=tiny_dir, seq_len=64, rank=4, method="mesp", store_h=True))
    assert peer["weights_bytes"] == mesp["weights_bytes"] and peer["lora_bytes"] == mesp["lora_bytes"]
    assert peer["lora_grad_bytes"] == peer["lora_bytes"]
    assert {"forward", "loss", "backward"} <= set(peer["stage_peaks"])
    # the peer's loss stage holds full-vocabulary fp32 logits
    assert peer["stage_peaks"]["loss"] >= 64 * WIDE_VOCAB["vocab_size"] * 4
    assert math.isfinite(peer["loss"]) and mesp["peak_bytes"] < peer["peak_bytes"]


def test_tracker_baseline_is_its_own():
    """Two trackers in one process: what the first allocated and was freed later does not count in the second."""
    with PeakMemory() as first:
        kept = torch.empty(4 << 20)
    del kept
    with PeakMemory() as second:
        x = torch.empty(1 << 18)
    assert first.peak_bytes >= 16 << 20
    assert (1 << 20) <= second.peak_bytes < (2 << 20)
    del x


def test_memory_bad_input_is_one_line(tiny_dir, capsys):
    assert main(["bench", "memory", "--models", tiny_dir, "--methods", "mesp,sgd"]) == 2
    assert "unknown sgd" in capsys.readouterr().err
    assert main(["bench", "memory", "--models", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err
    with pytest.raises(MespError, match="seq-lens"):
        bench.memory_cases([tiny_dir], [0], [8], ["mesp"])


def test_cases_add_the_peer_when_available(tiny_dir):
    cases = bench.memory_cases([tiny_dir], [16, 32], [4], ["mesp", "hf"], store_h=True)
    assert [(c.seq_len, c.method, c.store_h) for c in cases] == [
        (16, "mesp", True), (16, bench.PEER, False), (32, "mesp", True), (32, bench.PEER, False)]
    assert [c.method for c in bench.memory_cases([tiny_dir], [16], [4], ["mebp"])] == ["mebp", bench.PEER]


def test_grads_exact_and_mezo_cosine(tiny_dir, tmp_path):
    js = tmp_path / "grads.json"
    assert main(["bench", "grads", "--models", tiny_dir, "--seq-len", "16", "--rank", "4", "--directions", "1,32",
                 "--trials", "4", "--json", str(js)]) == 0
    (row,) = json.loads(js.read_text())["rows"]
    for method in ("mesp", "mebp"):
        assert row[method]["max_rel_error"] < 1e-5 and row[method]["loss_abs_diff"] < 1e-5
        assert 0 <= row[method]["median_rel_error"] <= row[method]["max_rel_error"]
    # against fp64 every fp32 method shows rounding only, and MeBP runs autograd's own ops
    for method in ("autograd", "mesp", "mebp"):
        assert 0 < row[method]["max_rel_error_vs_fp64"] < 1e-5
    assert row["mebp"]["max_rel_error_vs_fp64"] == pytest.approx(row["autograd"]["max_rel_error_vs_fp64"], rel=1e-3)
    one, many = row["mezo"]
    d = row["lora_parameters"]
    assert one["trials"] == 4 and many["trials"] == 1
    assert one["theory"] == pytest.approx(math.sqrt(2 / (math.pi * d)))
    assert many["theory"] == pytest.approx(math.sqrt(32 / d), rel=0.01)
    # one direction is nearly orthogonal; 32 directions move toward the gradient, as the theory says
    assert abs(one["cosine_mean"]) < 5 * one["theory"]
    assert many["cosine_mean"] > 3 * one["theory"]
    assert many["theory"] / 3 < many["cosine_mean"] < 3 * many["theory"]


def test_converge_csv_png_and_equal_curves(tiny_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    g = torch.Generator().manual_seed(0)
    data.write_text("".join(json.dumps({"input_ids": torch.randint(0, 4096, (12,), generator=g).tolist()}) + "\n"
                            for _ in range(8)))
    csv, png = tmp_path / "curves.csv", tmp_path / "curves.png"
    assert main(["bench", "converge", "--model", tiny_dir, "--data", str(data), "--steps", "3", "--mezo-factor", "2",
                 "--batch-size", "2", "--seq-len", "12", "--csv", str(csv), "--plot", str(png)]) == 0
    lines = csv.read_text().splitlines()
    assert lines[0] == "method,step,loss,valid_loss,lr,seconds"
    rows = [dict(zip(lines[0].split(","), line.split(","))) for line in lines[1:]]
    steps = {m: [int(r["step"]) for r in rows if r["method"] == m] for m in ("mesp", "mebp", "mezo")}
    assert steps == {"mesp": [1, 2, 3], "mebp": [1, 2, 3], "mezo": [1, 2, 3, 4, 5, 6]}
    mesp = [float(r["loss"]) for r in rows if r["method"] == "mesp"]
    mebp = [float(r["loss"]) for r in rows if r["method"] == "mebp"]
    assert mesp == pytest.approx(mebp, rel=1e-4)  # exact gradients, same optimizer: the same run
    first_mezo = next(float(r["loss"]) for r in rows if r["method"] == "mezo")
    assert first_mezo == pytest.approx(mesp[0], rel=1e-3)  # same first batch and initial adapter
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_report_renders_measured_rows(memory_run, tiny_dir, monkeypatch):
    """The report's tables come from the rows: the headline check and the numbers follow the measurement."""
    result, _ = memory_run
    monkeypatch.setattr(plan, "REPORT_MODEL", tiny_dir)
    run = bench.MemorySettings([tiny_dir], [256], [8], ["mesp", "mebp"], repeats=2, no_peer=True)
    memory = {"runs": [{"run": run.record(), "command": run.command(), "result": result}] + [
        {"run": bench.MemorySettings([tiny_dir], [1], [1], ["mesp"]).record(), "command": "", "result": {
            "rows": [], "machine": result["machine"]}}] * 4}
    md = bench.render_report(memory, None, None, {})
    rows = {r["method"]: r for r in result["rows"]}
    assert f"**{rows['mesp']['peak_bytes'] / 2**20:.1f}**" in md
    assert f"MeSP/MeBP = {rows['mesp']['peak_bytes'] / rows['mebp']['peak_bytes']:.3f}" in md
    assert "— **met**" in md
    assert run.command() in md
    assert "Not measured yet: run `mesp bench report --only grads`" in md
    assert "360.8" in md and "136.2" in md  # the paper's column beside ours
    assert "issue" not in md.lower() and "shared/" not in md  # the report names nothing outside the repository
    assert bench.MemorySettings.from_record(run.record()) == run  # memory.json keeps each run's settings


def test_repeats_zero_measures_memory_only(tiny_dir):
    row = bench.measure_here(bench.MemoryCase(model=tiny_dir, seq_len=32, rank=4, method="mebp", repeats=0))
    assert row["step_seconds"] is None and row["step_seconds_all"] == []
    assert row["peak_bytes"] > 0 and row["peak_rss_bytes"] >= row["weights_bytes"]
    assert "-" in bench.memory_table({"rows": [row]}).splitlines()[1].split()


def test_frontier_plans_fit_and_are_timed_against_mebp(tiny_dir, tmp_path, capsys):
    js, png = tmp_path / "frontier.json", tmp_path / "frontier.png"
    assert main(["bench", "frontier", "--model", tiny_dir, "--seq-len", "128", "--rank", "4", "--points", "3",
                 "--rounds", "2", "--threads", "1", "--json", str(js), "--plot", str(png)]) == 0
    assert "vs MeBP" in capsys.readouterr().out
    result = json.loads(js.read_text())
    mebp, *plans = result["rows"]
    assert mebp["method"] == "mebp" and plans and all(r["method"] == "mesp" for r in plans)
    # the default budgets end at MeBP's own measured peak: MeSP given exactly MeBP's memory
    assert max(r["budget_mib"] for r in plans) == pytest.approx(mebp["peak_mib"])
    for r in result["rows"]:
        assert len(r["seconds"]) == 2 and r["seconds_min"] == min(r["seconds"]) > 0
        assert r["speedup"] == pytest.approx(mebp["seconds_min"] / r["seconds_min"])
    for r in plans:
        assert r["estimate_mib"] <= r["budget_mib"] and r["peak_mib"] <= 1.15 * r["budget_mib"], r
    # more memory buys more kept layers (never fewer)
    kept = [r["plan"]["keep_layers"] for r in sorted(plans, key=lambda r: r["budget_mib"])]
    assert kept == sorted(kept) and len({tuple(r["plan"].values()) for r in plans}) == len(plans)
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_frontier_bad_budgets_are_one_line(tiny_dir, capsys):
    assert main(["bench", "frontier", "--model", tiny_dir, "--budgets", "12,abc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--budgets" in err[0], err


def test_precision_times_fp32_and_bf16_side_by_side(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MESP_AUTO_DTYPE", raising=False)  # what auto picks on this CPU, by its flags
    js = tmp_path / "precision.json"
    assert main(["bench", "precision", "--model", tiny_dir, "--seq-len", "32", "--methods", "mesp,mebp",
                 "--rounds", "2", "--threads", "1", "--json", str(js)]) == 0
    assert "--dtype auto picks" in capsys.readouterr().out
    result = json.loads(js.read_text())
    assert [(r["method"], r["dtype"]) for r in result["rows"]] == [
        ("mesp", "float32"), ("mesp", "bfloat16"), ("mebp", "float32"), ("mebp", "bfloat16")]
    for r in result["rows"]:
        assert len(r["seconds"]) == 2 and r["seconds_min"] == min(r["seconds"]) > 0
        fp32 = next(x for x in result["rows"] if x["method"] == r["method"] and x["dtype"] == "float32")
        assert r["speedup_vs_float32"] == pytest.approx(fp32["seconds_min"] / r["seconds_min"])
    native = any(f in result["machine"]["cpu_flags"] for f in ("avx512_bf16", "amx_bf16"))
    assert result["auto_dtype"] == ("bfloat16" if native else "float32")


def test_precision_bad_methods_are_one_line(tiny_dir, capsys):
    assert main(["bench", "precision", "--model", tiny_dir, "--methods", "mesp,sgd"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--methods" in err[0] and "sgd" in err[0], err


def test_report_says_when_the_whole_process_part_ran():
    """Every part the report measured is dated, the whole-process runs (`mesp bench process`) included."""
    from mesp.bench.machine import machine_info

    machine = {**machine_info(), "date_utc": "2031-01-02 03:04 UTC", "load_average": [0.25, 0, 0]}
    process = {"runs": [{"command": "mesp bench process --models M --seq-lens 256 --json J   # one run per M",
                         "result": {"rows": [], "machine": machine}}], "seconds": 600}
    md = bench.render_report(None, None, None, {}, process)
    assert ("- process: --models M --seq-lens 256 # one run per M: 2031-01-02 03:04 UTC, load average 0.25, "
            f"{machine['torch_threads']} torch threads") in md
    assert "process 10 min" in md
