"""One rule for deriving seeds, so every seeded stream in mesp (epoch orders, MeZO directions) is reproducible
from the run's seed and no two streams of one run share their numbers."""

from __future__ import annotations


def mix_seed(seed: int, j: int) -> int:
    """The seed of stream `j` under `seed`: distinct for distinct (seed, j) pairs of practical size, and a valid
    torch.Generator seed (non-negative, below 2**63)."""
    return (seed * 1_000_003 + j) % (2**63 - 1)
