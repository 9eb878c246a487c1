"""The step program's arena: tensors placed by offset in one buffer, so the arena comes close to the step's live peak.

ExecuTorch's greedy planner (executorch.exir.memory_planning.greedy) sorts the planned tensors by size and puts each
into a "shared object" whose size is fixed by the first, largest tensor it received; the arena is the sum of the
objects. A step that keeps 24-36 layer inputs alive while its per-layer intermediates come and go fills many objects
that are mostly empty at any moment: the 1.5B step's greedy arena was 169.4 MiB. offset_plan is the other classic
(TFLite's greedy-by-size offsets): largest tensor first, each at the lowest gap of the one buffer that no tensor
live at the same time occupies (the tightest such gap). ExecuTorch's planning suite runs both and keeps the
smaller plan, so it can only help.

executorch is imported lazily (it lives in .et/ only): the private helpers used here are executorch 1.5.1's, the
version mesp.executorch_data pins too."""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np

log = logging.getLogger(__name__)


def offset_plan(alignment: int, specs, graph_module, graph_signature, extra_padding: int = 0):
    """A memory planning algorithm with greedy's signature and result (a MemoryAlgoResult): every tensor of a
    memory id at an offset in one buffer, no two tensors whose lifetimes meet (inclusive, as greedy) sharing a
    byte. Storage-backed specs (views into a base) follow their base, as in greedy."""
    from executorch.exir.memory_planning import (AllocationSpec, MemoryAlgoResult, SharedObject, SpecAllocResult,
                                                 _compute_total_sizes, _resolve_storage_base_specs)

    result = MemoryAlgoResult({}, [])
    groups, deferred = defaultdict(list), []
    for spec in specs:
        mem_id = 1 if spec.mem_id is None else spec.mem_id
        result.spec_dict[spec] = SpecAllocResult(mem_id, 0, 0)
        spec.realign(alignment)
        (deferred if spec.storage_base is not None else groups[mem_id]).append(spec)
    shared, spec2obj = {}, {}
    for mem_id, group in groups.items():
        group.sort(key=lambda s: -s.allocated_memory)  # stable: equal sizes keep the graph's order
        start = np.array([s.lifetime[0] for s in group], dtype=np.int64)
        end = np.array([s.lifetime[1] for s in group], dtype=np.int64)
        sizes = np.array([s.allocated_memory for s in group], dtype=np.int64)
        offsets = place(sizes, start, end)
        buffer = SharedObject(0, -1, int((offsets + sizes).max()), int(start.min()), int(end.max()))
        buffer.allocations = [AllocationSpec(int(o), s) for o, s in zip(offsets, group)]
        shared[mem_id] = [buffer]
        spec2obj.update((s, buffer) for s in group)
        log.info("arena %d: %.1f MiB by offsets; the live peak (a lower bound for any plan) %.1f MiB", mem_id,
                 buffer.size / 2**20, live_peak(sizes, start, end) / 2**20)
    _resolve_storage_base_specs(deferred, spec2obj, result)
    result.bufsizes = _compute_total_sizes(shared, graph_module, extra_padding, result, len(spec2obj))
    return result


def place(sizes: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Offsets for tensors given largest first: each at the tightest gap, among the tensors already placed whose
    lifetimes [start, end] meet its own, that holds it, else above them all."""
    n = len(sizes)
    offsets = np.zeros(n, dtype=np.int64)
    for i in range(n):
        meet = np.nonzero((start[:i] <= end[i]) & (end[:i] >= start[i]))[0]
        if not meet.size:
            continue
        meet = meet[np.argsort(offsets[meet], kind="stable")]
        lows = offsets[meet]
        tops = np.maximum.accumulate(lows + sizes[meet])
        below = np.concatenate(([0], tops[:-1]))  # the highest byte in use under each placed tensor
        gaps = lows - below
        fits = np.nonzero(gaps >= sizes[i])[0]
        offsets[i] = below[fits[np.argmin(gaps[fits])]] if fits.size else tops[-1]
    return offsets


def live_peak(sizes: np.ndarray, start: np.ndarray, end: np.ndarray) -> int:
    """The most bytes live at one instruction: no plan's buffer can be smaller."""
    change = np.zeros(int(end.max()) + 2, dtype=np.int64)
    np.add.at(change, start, sizes)
    np.add.at(change, end + 1, -sizes)
    return int(np.cumsum(change).max())
