"""A CPU rank's resident set, kept close to its live tensors (glibc, torch's CPU allocator).

glibc serves an allocation below its mmap threshold from a heap whose freed pages stay
resident, and it raises that threshold to the size of every mapped block that is freed (up
to 32 MiB). After the first step a training loop's temporaries (MiBs each) therefore come
from the heap, and fragmentation lets the resident set grow far past the live tensors:
measured at tp2 x ulysses2, 128K tokens, no checkpointing, live tensors peak at 604 MiB per
rank (plus a 365 MiB process) while the resident set reached 1,514-1,584 MiB. `longtrain
plan` predicts live tensors, and a user sizes a job by it. Two remedies, side by side on
that step (docs/benchmarks.md, "Host allocator"):

- torch's transparent-huge-page path (THP_MEM_ALLOC_ENABLE=1, read once when torch is
  imported: blocks of >= 2 MiB aligned to 2 MiB and advised as huge pages) is set by the
  `longtrain` command for itself and every rank it starts: 1,105-1,142 MiB (5,107-6,018
  tok/s against 5,828-6,122 without it: within this machine's noise);
- a fixed mmap threshold (`host_mmap_mib`, off by default) maps every block at least that
  big on its own and unmaps it when freed, so the resident set is the live tensors plus a
  small heap: 993-1,026 MiB, at 4,816-5,417 tok/s against 5,107-6,018 (fresh mappings fault in).

`models.memtrim` also returns free heap pages between layers.
"""

from __future__ import annotations

import os
from typing import MutableMapping

from longtrain.models.memtrim import glibc

THP_ENV = "THP_MEM_ALLOC_ENABLE"
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def request_huge_pages(environ: MutableMapping[str, str] = os.environ) -> None:
    """Ask torch for THP-advised large blocks in every process started from here (and in this
    one, if torch is not imported yet); a user's own setting wins."""
    environ.setdefault(THP_ENV, "1")


def map_large_blocks(threshold_mib: float) -> bool:
    """Fix glibc's mmap threshold at `threshold_mib` (0: leave it adaptive). True when set."""
    libc = glibc()
    if threshold_mib <= 0 or libc is None:  # adaptive asked for, or not glibc: nothing to tune
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold_mib * 2**20)))
