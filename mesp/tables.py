"""Training data as users have it: JSONL, Parquet, CSV, or a Hugging Face `datasets` directory, one record at a time.

`read_records(path, columns)` yields (number, where, record) for every sample of

    FILE.jsonl            one JSON object per line (mesp.data.read_jsonl), as is a file of any other suffix;
                          number = the line
    FILE.parquet          row groups read batch by batch with pyarrow, only the columns a format uses
    FILE.csv              Python's csv module, row by row; a messages, input_ids or labels cell holds JSON text
    DIR                   what `datasets.Dataset.save_to_disk` writes: Arrow IPC stream files listed in
                          state.json, memory-mapped and read batch by batch (pyarrow alone; no `datasets`)

For tables number is the 1-based data row (the header is not a row) and `where` is "FILE row N", so a bad row gets
the same one-line error as a bad JSONL line. Nothing reads a whole file: a 2 GB Parquet file costs one record batch
of private memory at a time (scripts/parquet_footprint.py measures it). A null cell is an absent key, so a table
whose rows mix formats reads as the equivalent JSONL.

`columns` maps the keys mesp reads (text, prompt, completion, messages, input_ids, labels) to the names a file
uses (`mesp train --text-column body`); a mapped column a table lacks is an error naming the file and the column.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

from dataclasses import dataclass

from .errors import MespError, one_line
from .settings import setting

KEYS = ("text", "prompt", "completion", "messages", "input_ids", "labels")  # the record keys of mesp.data's formats
JSON_CELLS = ("messages", "input_ids", "labels")  # list-valued keys, spelled as JSON text in a CSV cell
BATCH_ROWS = 256  # rows per record batch read from Parquet / Arrow
DATA_HELP = "training data: a JSONL, Parquet or CSV file, or a Hugging Face datasets directory (save_to_disk)"
PYARROW_MISSING = "needs pyarrow: pip install 'mesp[data]'"


@dataclass
class DataColumns:
    """The data's own names for the keys the formats read, for every command that reads data (mesp train's --data
    and --valid, mesp eval's --data): --text-column body reads column (or JSONL key) "body" as "text"."""
    text_column: str | None = setting(None, "the column (or JSONL key) holding the text", default_text="default text", metavar="NAME")
    prompt_column: str | None = setting(None, "the column holding the prompt", default_text="default prompt", metavar="NAME")
    completion_column: str | None = setting(None, "the column holding the completion",
                                            default_text="default completion", metavar="NAME")
    messages_column: str | None = setting(None, "the column holding the chat messages",
                                          default_text="default messages", metavar="NAME")
    input_ids_column: str | None = setting(None, "the column holding pre-tokenized ids",
                                           default_text="default input_ids", metavar="NAME")
    labels_column: str | None = setting(None, "the column holding pre-tokenized labels",
                                        default_text="default labels", metavar="NAME")

    def columns(self) -> dict[str, str]:
        """mesp key -> the data's column name, for the keys renamed (read_records' `columns`)."""
        return {k: getattr(self, f"{k}_column") for k in KEYS if getattr(self, f"{k}_column")}


def kind_of(path) -> str:
    """"parquet", "csv", "datasets" (a directory) or "jsonl" (any other file) by the path."""
    path = Path(path)
    if path.is_dir():
        return "datasets"
    if not path.is_file():
        raise MespError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".csv":
        return "csv"
    return "jsonl"  # .jsonl, .json, .ndjson, or anything else: one JSON object per line, as mesp always read


def read_records(path, columns: dict[str, str] | None = None):
    """Yield (number, where, record) for every sample of `path` (see the module docstring), keys renamed from the
    file's names to mesp's by `columns` (mesp key -> file column)."""
    from .data import read_jsonl  # mesp.data reads through this module; JSONL parsing stays there

    columns = {k: v for k, v in (columns or {}).items() if v and v != k}
    kind = kind_of(path)
    if kind == "jsonl":
        rename = {v: k for k, v in columns.items()}
        for number, where, obj in read_jsonl(path):
            yield number, where, {rename.get(k, k): v for k, v in obj.items()}
        return
    reader = {"parquet": _parquet_rows, "csv": _csv_rows, "datasets": _datasets_rows}[kind]
    for number, row in reader(Path(path), columns):
        yield number, f"{path} row {number}", row


def _wanted(path: Path, names, columns: dict[str, str]) -> dict[str, str]:
    """file column -> mesp key for the columns a table has that some format reads; a mapped column it lacks is an
    error."""
    names = list(names)
    for key, column in columns.items():
        if column not in names:
            raise MespError(f"{path}: no column {column!r} (given for {key}); columns: {', '.join(names) or 'none'}")
    mapped = set(columns.values())
    out = {column: key for key, column in columns.items()}
    out.update({k: k for k in KEYS if k in names and k not in columns and k not in mapped})
    return out


def _rows_of_batches(batches, wanted: dict[str, str]):
    for batch in batches:
        for row in batch.to_pylist():
            yield {wanted[k]: v for k, v in row.items() if v is not None}


def numbered(rows, start: int = 1):
    """(1-based row number, row) pairs."""
    return enumerate(rows, start=start)


def _pyarrow(path: Path, what: str):
    try:
        import pyarrow
    except ImportError as e:
        raise MespError(f"{path}: reading {what} {PYARROW_MISSING}") from e
    return pyarrow


def _parquet_rows(path: Path, columns: dict[str, str]):
    pa = _pyarrow(path, "Parquet")
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path, memory_map=True)
    except (pa.ArrowException, OSError) as e:
        raise MespError(f"{path}: not a readable Parquet file ({one_line(e)})") from e
    with f:
        wanted = _wanted(path, f.schema_arrow.names, columns)
        try:
            yield from numbered(_rows_of_batches(f.iter_batches(batch_size=BATCH_ROWS, columns=list(wanted)), wanted))
        except pa.ArrowException as e:
            raise MespError(f"{path}: unreadable Parquet data ({one_line(e)})") from e


def _csv_rows(path: Path, columns: dict[str, str]):
    try:
        f = open(path, newline="", encoding="utf-8-sig")  # -sig: a byte order mark is not part of the header
    except OSError as e:
        raise MespError(f"{path}: unreadable ({e.strerror})") from e
    with f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                return
            wanted = _wanted(path, header, columns)
            index = [(i, wanted[name]) for i, name in enumerate(header) if name in wanted]
            for number, cells in enumerate(reader, start=1):
                if not any(cells):
                    continue  # a blank line
                if len(cells) != len(header):
                    raise MespError(f"{path} row {number}: {len(cells)} cells, the header has {len(header)}")
                yield number, {key: _csv_cell(cells[i], key, f"{path} row {number}") for i, key in index}
        except UnicodeDecodeError as e:
            raise MespError(f"{path}: not UTF-8 (byte {e.start})") from e
        except csv.Error as e:
            raise MespError(f"{path} line {reader.line_num}: bad CSV ({one_line(e)})") from e


def _csv_cell(cell: str, key: str, where: str):
    if key not in JSON_CELLS:
        return cell
    try:
        return json.loads(cell)
    except json.JSONDecodeError as e:
        raise MespError(f"{where}: column {key!r} must hold JSON ({e.msg} at column {e.colno})") from e


def datasets_files(path: Path) -> list[Path]:
    """The Arrow files of a `save_to_disk` directory, in order (state.json's _data_files)."""
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        raise MespError(f"{path}: a DatasetDict; give one split's directory ({', '.join(splits) or 'none found'})")
    state = path / "state.json"
    if not state.is_file():
        raise MespError(f"{path}: a directory, but not one written by datasets' save_to_disk (no state.json)")
    try:
        names = [d["filename"] for d in json.loads(state.read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MespError(f"{state}: not a datasets state file ({one_line(e)})") from e
    files = [path / n for n in names]
    for f in files:
        if not f.is_file():
            raise MespError(f"{f}: listed in {state} but missing")
    return files


def _datasets_rows(path: Path, columns: dict[str, str]):
    pa = _pyarrow(path, "a datasets directory")
    number = 0
    for f in datasets_files(path):
        try:
            reader = pa.ipc.open_stream(pa.memory_map(str(f)))
        except (pa.ArrowException, OSError) as e:
            raise MespError(f"{f}: not an Arrow stream file ({one_line(e)})") from e
        wanted = _wanted(path, reader.schema.names, columns)
        try:
            for number, row in numbered(_rows_of_batches((b.select(list(wanted)) for b in reader), wanted),
                                        start=number + 1):
                yield number, row
        except pa.ArrowException as e:
            raise MespError(f"{f}: unreadable Arrow data ({one_line(e)})") from e


def data_sha256(path) -> str:
    """SHA-256 of a data file's bytes; of a datasets directory, of its Arrow files' hashes in order (a resumed run
    checks its data did not change)."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in datasets_files(path):
        h.update(bytes.fromhex(file_sha256(f)))
    return h.hexdigest()


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
