"""Hostile and mistyped model and adapter files, generated: seeded mutations of the header fields of small GGUF,
safetensors, config.json and adapter_config.json files. Every outcome must be success or one line on stderr with
exit 2, under a tight address-space limit: never a traceback, an out-of-memory, a hang or a kill.

The cases run in one child process (importing torch per case would take minutes) that calls the CLI's main()
for each, with an alarm per case; its address space is limited so an allocation sized by a lying field fails
there instead of filling the machine."""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

from helpers import write_gguf

SEED = 1234
CASES_PER_KIND = 70
ADDRESS_SPACE = 4 << 30
SECONDS_PER_CASE = 30

CHILD = r"""
import contextlib, io, json, resource, signal, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, resource.RLIM_INFINITY))
from mesp.cli import main

class Hang(BaseException):
    pass

def alarm(*_):
    raise Hang()

signal.signal(signal.SIGALRM, alarm)
results = []
for argv in json.load(open(sys.argv[1])):
    err = io.StringIO()
    signal.alarm({seconds})
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
    except Hang:
        rc = "hang"
    except BaseException as e:
        rc = "escaped " + type(e).__name__
    finally:
        signal.alarm(0)
    results.append([rc, err.getvalue()])
json.dump(results, open(sys.argv[2], "w"))
"""

# values a lying or mistyped field takes: empty, negative, huge, fractional, the wrong JSON type
JSON_VALUES = [0, -1, 1, 3, 10 ** 9, 2 ** 63, 1e300, 1.5, float("nan"), float("inf"), -0.5, "x", "", None, [], [1],
               {}, {"a": 1}, True]
CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
               "tie_word_embeddings", "rope_scaling", "rope_parameters", "model_type", "architectures",
               "attention_bias", "torch_dtype"]
ADAPTER_KEYS = ["r", "lora_alpha", "target_modules", "lora_dropout", "bias", "fan_in_fan_out", "use_dora",
                "layers_to_transform", "modules_to_save", "peft_type", "rank_pattern", "alpha_pattern",
                "use_rslora", "lora_bias"]


def mutate_json(rng: random.Random, obj: dict, keys: list[str]) -> dict:
    obj = json.loads(json.dumps(obj))
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(keys)
        if rng.random() < 0.1:
            obj.pop(key, None)
        else:
            obj[key] = rng.choice(JSON_VALUES)
    return obj


def numeric_parts(reader) -> list[tuple[int, np.ndarray]]:
    """(file offset, array) of every numeric part of the GGUF header: counts, lengths, value types, metadata
    values, tensor dims, types and data offsets (names and strings excluded)."""
    parts = []
    fields = list(reader.fields.values()) + [t.field for t in reader.tensors]
    for f in fields:
        at = f.offset
        for p in f.parts:
            if p.dtype != np.uint8:
                parts.append((at, np.array(p)))
            at += p.nbytes
    return parts


def mutate_gguf(rng: random.Random, raw: bytes, parts, data_offset: int) -> bytes:
    b = bytearray(raw)
    choice = rng.random()
    if choice < 0.15:  # cut short anywhere
        return bytes(b[:rng.randrange(len(b))])
    if choice < 0.25:  # random bytes anywhere in the header
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(data_offset)] = rng.randrange(256)
        return bytes(b)
    for _ in range(rng.randint(1, 2)):
        at, arr = rng.choice(parts)
        i = rng.randrange(arr.size)
        info = np.iinfo(arr.dtype) if arr.dtype.kind in "iu" else None
        old = arr.reshape(-1)[i]
        if info is not None:
            value = rng.choice([0, 1, int(old) + 1, max(int(old) - 1, info.min), info.max, info.max // 2,
                                rng.randrange(int(info.min), int(info.max) + 1), min(1 << 20, info.max)])
        else:
            value = rng.choice([0.0, -1.0, float("nan"), float("inf"), 1e30, float(old) * 3])
        new = np.array([value], dtype=arr.dtype).tobytes()
        start = at + i * arr.dtype.itemsize
        b[start:start + len(new)] = new
    return bytes(b)


def mutate_safetensors(rng: random.Random, raw: bytes) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    choice = rng.random()
    if choice < 0.15:
        return raw[:rng.randrange(len(raw))]
    if choice < 0.25:
        return struct.pack("<Q", rng.choice([0, 1, n + 1, len(raw), 2 ** 40, 2 ** 64 - 1])) + raw[8:]
    name = rng.choice([k for k in header if k != "__metadata__"])
    t = header[name]
    what = rng.choice(["shape", "dtype", "offsets", "drop", "dim"])
    if what == "shape":
        t["shape"] = rng.choice([[], [0], [-1, 4], [10 ** 12, 10 ** 12], t["shape"][::-1], t["shape"] + [1], "x"])
    elif what == "dim" and t["shape"]:
        t["shape"][rng.randrange(len(t["shape"]))] = rng.choice([0, -1, 2 ** 40, 2 ** 63, 1.5, "3"])
    elif what == "dtype":
        t["dtype"] = rng.choice(["F64", "I8", "BOOL", "F8_E4M3", "XX", 3, None])
    elif what == "offsets":
        a, e = t["data_offsets"]
        t["data_offsets"] = rng.choice([[e, a], [a, e + 4], [a, 2 ** 50], [-8, e], [a], [0, 0], "x", [a - 4, e - 4]])
    else:
        del header[name]
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def write_cases(tmp: Path, hf_dir: Path, hf_model, n: int, seed: int) -> list[list[str]]:
    """The model/adapter variants on disk, and the CLI command that loads each."""
    import gguf

    import mesp

    rng = random.Random(seed)
    data = tmp / "ids.jsonl"
    data.write_text("".join(json.dumps({"input_ids": [1, 2, 3, 4, 5, 6, 7, 8]}) + "\n" for _ in range(2)))
    train = ["train", "--data", str(data), "--steps", "1", "--seq-len", "8", "--rank", "2", "--batch-size", "1",
             "--optimizer", "sgd", "--overwrite"]
    cases = []

    def train_case(model_path, i):
        return [*train, "--model", str(model_path), "--out", str(tmp / f"run{i % 8}")]

    base_gguf = tmp / "base.gguf"
    write_gguf(base_gguf, hf_model, [gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F32])
    raw = base_gguf.read_bytes()
    reader = gguf.GGUFReader(str(base_gguf))
    parts, data_offset = numeric_parts(reader), reader.data_offset
    del reader
    for i in range(n):
        p = tmp / f"g{i}.gguf"
        p.write_bytes(mutate_gguf(rng, raw, parts, data_offset))
        cases.append(train_case(p, i))

    st = hf_dir / "model.safetensors"
    st_raw = st.read_bytes()
    for i in range(n):
        d = tmp / f"s{i}"
        shutil.copytree(hf_dir, d)
        (d / "model.safetensors").write_bytes(mutate_safetensors(rng, st_raw))
        cases.append(train_case(d, i))

    config = json.loads((hf_dir / "config.json").read_text())
    for i in range(n):
        d = tmp / f"c{i}"
        d.mkdir()
        (d / "model.safetensors").symlink_to(st)
        (d / "config.json").write_text(json.dumps(mutate_json(rng, config, CONFIG_KEYS)))
        cases.append(train_case(d, i))

    model = mesp.load_model(hf_dir)
    mesp.add_lora(model, mesp.LoraConfig(r=2, alpha=4))
    adapter = tmp / "adapter"
    mesp.save_adapter(model, adapter)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    for i in range(n):
        d = tmp / f"a{i}"
        d.mkdir()
        (d / "adapter_model.safetensors").symlink_to(adapter / "adapter_model.safetensors")
        (d / "adapter_config.json").write_text(json.dumps(mutate_json(rng, adapter_config, ADAPTER_KEYS)))
        cases.append(["merge", "--model", str(hf_dir), "--adapter", str(d), "--out", str(tmp / "merged"),
                      "--overwrite"])
    return cases


def test_mutated_headers_end_in_success_or_one_line(tmp_path, make_hf_model):
    hf_dir, hf_model = make_hf_model("qwen2", num_key_value_heads=2)
    cases = write_cases(tmp_path, Path(hf_dir), hf_model, CASES_PER_KIND, SEED)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    child = CHILD.format(limit=ADDRESS_SPACE, seconds=SECONDS_PER_CASE)
    r = subprocess.run([sys.executable, "-c", child, str(tmp_path / "cases.json"), str(tmp_path / "out.json")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "out.json").read_text())
    bad = []
    for argv, (rc, err) in zip(cases, results):
        lines = err.strip().splitlines()
        ok = rc == 0 or (rc == 2 and len(lines) == 1 and "internal error" not in err and "out of memory" not in err)
        if not ok:
            bad.append(f"{' '.join(argv[-6:])}: rc={rc}: {err.strip()[-300:]}")
    assert not bad, f"{len(bad)} of {len(cases)} cases failed:\n" + "\n".join(bad[:25])
    assert sum(rc == 0 for rc, _ in results) < len(results)  # the mutations did reach the checks
