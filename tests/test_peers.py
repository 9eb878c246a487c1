"""`mesp bench peers` on a tiny random model: each peer's loss trajectory read back from its own process, the exact
peers agreeing with mesp train step by step from the shared initial adapter, and the outside sampler against a
known allocation. transformers + PEFT run from this Python (the test extra); torchtune and mlx-lm only where the
peers environment (.peers/, scripts/dev.sh peers) has them, skipped otherwise."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from mesp.bench import peers
from mesp.cli import main
from mesp.errors import MespError
from mesp.memory import MiB, ProcessSampler

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
STEPS = 9  # timed steps after the warm-up: the first 10 steps' losses
EXACT_LOSS_TOL = 1e-4  # fp32 losses of the same step on the same weights, summed in different orders
LR = 0.05  # large enough that the trajectory depends on the initial adapter (1e-4 hides a wrong init)


def installed_peers() -> list[str]:
    s = peers.PeersSettings()
    return [name for name, tool in peers.TOOLS.items()
            if tool.worker and tool.exact and peers.tool_python(tool, s)[0] is not None]


@pytest.fixture(scope="module")
def peers_run(make_hf_model, tmp_path_factory):
    """One `mesp bench peers` run over mesp and every exact peer installed here, one round, 1 + 9 steps."""
    path, _ = make_hf_model("qwen2", **TINY)
    out = tmp_path_factory.mktemp("peers")
    js, png = out / "peers.json", out / "peers.png"
    tools = ["mesp", *installed_peers()]
    rc = main(["bench", "peers", "--model", str(path), "--seq-lens", "32", "--tools", ",".join(tools),
               "--rounds", "1", "--steps", str(STEPS), "--lr", str(LR), "--work", str(out / "work"), "--json", str(js),
               "--plot", str(png), "--timeout", "300"])
    assert rc == 0
    return json.loads(js.read_text()), png, tools


def test_every_peer_trains_and_is_read_back(peers_run):
    result, png, tools = peers_run
    rows = {r["tool"]: r for r in result["rows"]}
    assert set(rows) == set(tools)
    assert "hf+peft(gc)" in rows  # transformers + PEFT are in the test extra: that path always runs
    for name, r in rows.items():
        assert "error" not in r, f"{name}: {r.get('error')}"
        assert len(r["losses"]) == 1 + STEPS
        assert r["losses"][-1] < r["losses"][0], f"{name}: the loss did not go down"
        assert r["private_peak_bytes"] > 50 * MiB and r["rss_peak_bytes"] >= r["private_peak_bytes"] / 2
        assert r["step_seconds"] > 0 and r["tokens_per_s"] > 0
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert "hf+peft(gc)" in peers.peers_table(result) and "| T |" in peers.peers_markdown(result)


def test_exact_peers_follow_mesps_losses_step_by_step(peers_run):
    """Every exact peer starts from the shared adapter (mesp's init for --seed) and takes the same samples in the
    same order: its ten losses equal mesp train's. Without the shared init (B = 0 makes step 1 agree anyway),
    step 2 on would differ by far more than the tolerance."""
    result, _, _ = peers_run
    rows = {r["tool"]: r for r in result["rows"]}
    for name, r in rows.items():
        assert r["loss_max_abs_diff"] < EXACT_LOSS_TOL, (name, r["losses"], rows["mesp"]["losses"])
    assert rows["mesp"]["loss_max_abs_diff"] == 0


def test_sample_order_is_mesp_trains():
    from mesp.data import MicroBatchStream

    stream = MicroBatchStream(peers.N_SAMPLES, 1, 3)
    assert peers.sample_order(12, 3) == [stream.indices(m)[0] for m in range(12)]
    assert sorted(peers.sample_order(peers.N_SAMPLES, 3)) == list(range(peers.N_SAMPLES))  # one epoch: a permutation


HOLD = ("import sys, time\n"
        "n = int(sys.argv[1]) << 20\n"
        "buf = bytearray(n)\n"
        "for i in range(0, n, 4096): buf[i] = 1\n"  # touch every page: anonymous memory the process owns
        "print('held', flush=True)\n"
        "time.sleep(0.6)\n")


def sampled_peak(mib: int) -> tuple[int, int]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(mib)], stdout=subprocess.PIPE, text=True)
    with ProcessSampler(proc.pid, interval=0.005) as s:
        assert proc.stdout.readline().strip() == "held"
        proc.wait(timeout=30)
    return s.private_peak_bytes, s.rss_peak_bytes


def test_sampler_sees_a_known_allocation_of_another_process():
    small, small_rss = sampled_peak(1)
    big, big_rss = sampled_peak(200)
    assert 190 * MiB < big - small < 215 * MiB
    assert 190 * MiB < big_rss - small_rss < 215 * MiB


def test_sampler_counts_the_child_of_a_child():
    """A tool that forks its worker is measured whole: the sampler sums the process tree."""
    outer = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {HOLD!r}, '150'])"
    proc = subprocess.Popen([sys.executable, "-c", outer])
    with ProcessSampler(proc.pid, interval=0.005) as s:
        proc.wait(timeout=30)
    assert s.private_peak_bytes > 150 * MiB


def test_sampler_of_a_process_that_is_gone_reads_nothing():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    time.sleep(0.05)
    with ProcessSampler(proc.pid) as s:
        pass
    assert s.private_peak_bytes is None and s.samples == 0


def test_bad_settings_are_one_line_errors(make_hf_model, tmp_path):
    with pytest.raises(MespError, match="tools: unknown nope"):
        peers.PeersSettings(tools=["nope"]).check()
    with pytest.raises(MespError, match="budgets"):
        peers.PeersSettings(budgets=["cheapest"]).check()
    with pytest.raises(MespError, match="rounds"):
        peers.PeersSettings(rounds=0).check()


def test_a_peer_not_installed_is_a_row_saying_why(make_hf_model, tmp_path):
    path, _ = make_hf_model("qwen2", **TINY)
    s = peers.PeersSettings(model=str(path), seq_lens=[16], tools=["mesp", "mlx-lm"], rounds=1, steps=1,
                            work=str(tmp_path / "work"), peers_python=str(tmp_path / "no-python"))
    result = peers.bench_peers(s, progress=False)
    rows = {r["tool"]: r for r in result["rows"]}
    assert "error" not in rows["mesp"]
    assert rows["mlx-lm"]["error"].startswith("not run: mlx_lm is not installed")


def test_a_benchmark_stopped_part_way_keeps_its_finished_runs(make_hf_model, tmp_path, monkeypatch):
    """--json holds the rows of every finished run while the benchmark goes on ("complete": false), so a
    benchmark stopped after its first run keeps that run; a finished one says "complete": true."""
    path, _ = make_hf_model("qwen2", **TINY)
    js = tmp_path / "peers.json"
    s = peers.PeersSettings(model=str(path), seq_lens=[16], tools=["mesp", "mesp 4-bit"], rounds=1, steps=1,
                            work=str(tmp_path / "work"), json=str(js))
    real_run_mesp, calls = peers.run_mesp, []

    def stopped_at_the_second_run(tool, *args):
        calls.append(tool.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run_mesp(tool, *args)

    monkeypatch.setattr(peers, "run_mesp", stopped_at_the_second_run)
    with pytest.raises(KeyboardInterrupt):
        peers.bench_peers(s, progress=False)
    kept = json.loads(js.read_text())
    assert kept["complete"] is False and [r["tool"] for r in kept["rows"]] == ["mesp"]
    assert kept["rows"][0]["private_peak_bytes"] > 0 and len(kept["rows"][0]["losses"]) == 2
    monkeypatch.setattr(peers, "run_mesp", real_run_mesp)
    assert peers.bench_peers(s, progress=False)["complete"] is True


def test_mesp_streams_a_q4_0_copy_of_the_shared_model(make_hf_model, tmp_path):
    """"mesp q4_0 streamed" trains on the shared model quantized once to a q4_0 GGUF beside it: its losses are
    near mesp's on the fp32 weights, not equal to them (the 4-bit base is not the fp32 one)."""
    from gguf import GGMLQuantizationType, GGUFReader

    path, _ = make_hf_model("qwen2", **TINY)
    s = peers.PeersSettings(model=str(path), seq_lens=[16], tools=["mesp", "mesp q4_0 streamed"], rounds=1,
                            steps=2, lr=LR, work=str(tmp_path / "work"))
    rows = {r["tool"]: r for r in peers.bench_peers(s, progress=False)["rows"]}
    r = rows["mesp q4_0 streamed"]
    assert "error" not in r, r.get("error")
    gguf = next((tmp_path / "work" / "models").glob("*-q4_0.gguf"))
    assert f"--model {gguf}" in r["command"]
    types = {t.tensor_type for t in GGUFReader(gguf).tensors}
    assert GGMLQuantizationType.Q4_0 in types
    dense = rows["mesp"]["losses"]
    assert r["losses"] != dense and all(abs(a - b) < 0.05 * b for a, b in zip(r["losses"], dense))


def test_data_is_packed_as_mesp_train_tokenizes_it(tmp_path):
    """--data: the file's samples, tokenized as mesp train does, laid end to end into N_SAMPLES windows of T
    tokens, wrapping to the first sample when the file runs out (three short chats cannot fill 8 windows)."""
    from mesp.data import load_data
    from mesp.tokenizer import load_tokenizer

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {n}'s colour?"},
                                                     {"role": "assistant", "content": f"{n} likes teal."}]}) + "\n"
                            for n in ("Ilse", "Tomasz", "Amara")))
    model, T = "smollm2-135m-instruct", 24
    tokenizer = load_tokenizer(model)
    stream = [t for s in load_data(data, get_tokenizer=lambda: tokenizer).samples for t in s.input_ids.tolist()]
    assert len(stream) < peers.N_SAMPLES * T  # the test needs the wrap
    windows = peers.packed_tokens(str(data), model, T)
    assert [len(w) for w in windows] == [T] * peers.N_SAMPLES
    flat = [t for w in windows for t in w]
    assert flat == (stream * (len(flat) // len(stream) + 1))[:len(flat)]
    assert "Ilse likes teal." in tokenizer.decode(flat)
    s = peers.PeersSettings(model=model, data=str(data), tools=["mesp"])
    path = peers.shared_tokens(s, 49152, T, tmp_path)
    assert [json.loads(line)["input_ids"] for line in path.read_text().splitlines()] == windows
    assert "--data" in s.command()


def test_a_quantized_gguf_is_shared_as_its_dequantized_fp32_weights(make_hf_model, tmp_path):
    """A GGUF model (the shipped SmolLM2 is Q4_1) is written into the shared directory dequantized: every tool
    trains the weights mesp computes with."""
    import mesp
    from safetensors.torch import load_file

    path, _ = make_hf_model("llama", **TINY)
    gguf = tmp_path / "tiny.q4_1.gguf"
    mesp.quantize_model(path, "q4_1", gguf)
    hf_dir, adapter = peers.shared_model(peers.PeersSettings(model=str(gguf), tools=["mesp"]), tmp_path / "work")
    written = load_file(str(hf_dir / "model.safetensors"))
    model = mesp.load_model(gguf)
    quantized = 0
    for name, w in model.base_weights():
        dense = w if isinstance(w, torch.Tensor) else w.dequantize(torch.float32)
        quantized += not isinstance(w, torch.Tensor)
        assert written[name].dtype == torch.float32 and torch.equal(written[name], dense), name
    assert quantized > 0 and (adapter / "adapter_model.safetensors").is_file()
