"""Data as users have it: Parquet, CSV and Hugging Face `datasets` directories (save_to_disk, written by datasets
itself) give the same samples and batches as the equivalent JSONL in each of the four formats, with columns named
otherwise mapped back; a bad row or a missing column is named by file and row."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from mesp.cli import main
from mesp.data import check_data, load_data
from mesp.errors import MespError
from mesp.tables import data_sha256
from mesp.tokenizer import load_tokenizer

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

CHAT = [{"role": "user", "content": "Who wrote Hamlet?"}, {"role": "assistant", "content": "Shakespeare."}]
ROWS = {
    "text": [{"text": "The quick brown fox."}, {"text": "Jumps over, \"the\" lazy dog\nand on."}],
    "prompt/completion": [{"prompt": "Two plus two?", "completion": " Four."},
                          {"prompt": "Capital of France?", "completion": " Paris, of course."}],
    "messages": [{"messages": CHAT}, {"messages": [{"role": "system", "content": "Be brief."}, *CHAT]}],
    "input_ids": [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8]}, {"input_ids": [9, 10, 11],
                                                                              "labels": [-100, -100, 11]}],
}
RENAMED = {"text": "body", "prompt": "question", "completion": "answer", "messages": "conversation",
           "input_ids": "tokens", "labels": "targets"}


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path, rows, row_group_size=1):
    keys = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist takes the first row's keys otherwise
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), path,
                   row_group_size=row_group_size)
    return path


def write_csv(path, rows):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for r in rows:
            w.writerow([json.dumps(r[k]) if isinstance(r.get(k), list) else r.get(k, "") for k in keys])
    return path


def write_datasets_dir(path, rows):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


WRITERS = {"jsonl": (write_jsonl, "t.jsonl"), "parquet": (write_parquet, "d.parquet"), "csv": (write_csv, "d.csv"),
           "datasets": (write_datasets_dir, "d_dir")}


def renamed(rows):
    return [{RENAMED[k]: v for k, v in r.items()} for r in rows]


def assert_same_data(a, b):
    assert len(a) == len(b) and a.formats == b.formats
    for x, y in zip(a.samples, b.samples):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
        assert x.line == y.line
    for i in range(0, len(a), 2):
        ba, bb = a.collate(range(i, min(i + 2, len(a)))), b.collate(range(i, min(i + 2, len(b))))
        for field in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(getattr(ba, field), getattr(bb, field))


@pytest.mark.parametrize("kind", WRITERS)
@pytest.mark.parametrize("fmt", ROWS)
def test_tables_give_the_batches_of_the_equivalent_jsonl(tmp_path, tok, kind, fmt):
    rows = ROWS[fmt]
    reference = load_data(write_jsonl(tmp_path / "d.jsonl", rows), get_tokenizer=lambda: tok, seq_len=64)
    assert reference.n_targets > 0
    write, name = WRITERS[kind]
    table = load_data(write(tmp_path / name, rows), get_tokenizer=lambda: tok, seq_len=64)
    assert_same_data(table, reference)
    # the same data under other column names, mapped back (mesp train --text-column body, ...)
    other = write(tmp_path / f"renamed_{name}", renamed(rows))
    columns = {k: v for k, v in RENAMED.items() if any(k in r for r in rows)}
    assert_same_data(load_data(other, get_tokenizer=lambda: tok, seq_len=64, columns=columns), reference)
    with pytest.raises(MespError, match="unknown format"):
        load_data(other, get_tokenizer=lambda: tok, seq_len=64)  # unmapped: the renamed columns mean nothing


def test_rows_of_mixed_formats_and_extra_columns(tmp_path, tok):
    """A null cell is an absent key (a Parquet table of mixed formats reads as the JSONL of the same rows), and
    columns no format reads are not even read."""
    rows = [{"text": "Hello there.", "id": 1}, {"prompt": "Hi?", "completion": " Hello.", "id": 2}]
    reference = load_data(write_jsonl(tmp_path / "d.jsonl", rows), get_tokenizer=lambda: tok)
    assert_same_data(load_data(write_parquet(tmp_path / "d.parquet", rows), get_tokenizer=lambda: tok), reference)


def test_a_bad_row_is_named(tmp_path, tok):
    rows = [{"text": "fine"}, {"text": "also fine"}, {"text": 3}]
    p = write_parquet(tmp_path / "bad.parquet", [{"text": "fine"}, {"text": "also fine"}, {"text": None}])
    with pytest.raises(MespError, match=r"bad\.parquet row 3: unknown format \(keys: none\)"):
        check_data(p)
    # a Parquet column has one type: a column of numbers fails at its first row
    p = write_parquet(tmp_path / "ints.parquet", [{"prompt": "a", "completion": 4}, {"prompt": "c", "completion": 5}])
    with pytest.raises(MespError, match=r"ints\.parquet row 1: field 'completion' must be a string, got int"):
        load_data(p, get_tokenizer=lambda: tok)
    p = tmp_path / "bad.csv"
    p.write_text('prompt,completion\nHi?, Hello.\nOnly one cell\n')
    with pytest.raises(MespError, match=r"bad\.csv row 2: 1 cells, the header has 2"):
        check_data(p)
    p = tmp_path / "ids.csv"
    p.write_text('input_ids\n"[1, 2, 3]"\n"[4, 5"\n')
    with pytest.raises(MespError, match=r"ids\.csv row 2: column 'input_ids' must hold JSON"):
        check_data(p)
    p = write_datasets_dir(tmp_path / "neg_dir", [{"input_ids": [1, 2]}, {"input_ids": [3, -4]}])
    with pytest.raises(MespError, match=r"neg_dir row 2: input_ids holds -4"):
        load_data(p, vocab_size=10)
    with pytest.raises(MespError, match=r"d\.parquet: no column 'body' \(given for text\); columns: text"):
        check_data(write_parquet(tmp_path / "d.parquet", rows[:2]), {"text": "body"})
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(MespError, match=r"junk\.parquet: not a readable Parquet file"):
        check_data(tmp_path / "junk.parquet")
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(MespError, match=r"plain_dir: a directory, but not one written by datasets' save_to_disk"):
        check_data(tmp_path / "plain_dir")


def test_a_dataset_dict_asks_for_a_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    d = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS["input_ids"]),
                              "test": datasets.Dataset.from_list(ROWS["input_ids"])})
    d.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(MespError, match=r"dd: a DatasetDict; give one split's directory \(test, train\)"):
        check_data(tmp_path / "dd")
    assert len(load_data(tmp_path / "dd" / "train")) == 2


def test_train_reads_parquet_with_mapped_columns(tmp_path, make_hf_model):
    """`mesp train` on a Parquet file whose columns are named otherwise equals the run on the JSONL."""
    path, _ = make_hf_model("qwen2", num_key_value_heads=2)
    rows = [{"input_ids": [(7 * i + j) % 96 for j in range(6 + i)]} for i in range(6)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    write_parquet(tmp_path / "d.parquet", [{"tokens": r["input_ids"]} for r in rows], row_group_size=4)
    common = ["train", "--model", str(path), "--steps", "2", "--batch-size", "3", "--seq-len", "16"]
    assert main([*common, "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--data", str(tmp_path / "d.parquet"), "--input-ids-column", "tokens",
                 "--out", str(tmp_path / "b")]) == 0
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("a", "b")]
    assert losses[0] == losses[1]


def test_a_datasets_directory_has_a_fingerprint(tmp_path):
    d = write_datasets_dir(tmp_path / "d", ROWS["input_ids"])
    before = data_sha256(d)
    write_datasets_dir(tmp_path / "e", ROWS["input_ids"][:1])
    assert data_sha256(tmp_path / "e") != before and data_sha256(d) == before
