"""The fresh process of one memory measurement: `python -m mesp.bench.worker CASE_JSON OUT_JSON`.

Internal (mesp.bench.sweep.measure_case starts it; use `mesp bench memory`). It measures one MemoryCase with
measure_here and writes the result row, or {"input_error": ...} for bad input, to OUT_JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..errors import MespError
from ..memory import return_freed_memory_to_os
from .sweep import MemoryCase, measure_here


def main(argv: list[str]) -> int:
    """Measure the case in argv[0] (MemoryCase fields as JSON) and write its row to argv[1]."""
    return_freed_memory_to_os()  # as the mesp CLI does: peak RSS then tracks live tensors, not glibc's heap
    spec, out = argv
    case = MemoryCase(**json.loads(spec))
    if case.threads:
        torch.set_num_threads(case.threads)
    try:
        row = measure_here(case)
    except MespError as e:
        row = {"input_error": str(e)}
    Path(out).write_text(json.dumps(row))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m mesp.bench.worker CASE_JSON OUT_JSON (internal; use `mesp bench memory`)")
    sys.exit(main(sys.argv[1:]))
