"""Heap pages freed during a step go back to the OS (glibc), and trimming changes no result."""

from __future__ import annotations

import torch

from longtrain.models.memtrim import _malloc_trim, trim, trim_after_backward


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_trim_returns_freed_heap_pages():
    if _malloc_trim() is None:  # not glibc: nothing to return, nothing to test
        return
    keep = [torch.ones(25_000) for _ in range(2000)]  # 100 KB tensors: from the heap, not mmap
    del keep[::2]  # 100 MB freed, interleaved with live ones: the heap cannot shrink from its top
    before = _rss_mib()
    trim()
    assert _rss_mib() < before - 50, "freed heap pages stayed resident"


def test_hook_fires_after_the_gradient_and_keeps_it(monkeypatch):
    from longtrain.models import memtrim

    fired = []
    monkeypatch.setattr(memtrim, "trim", lambda: fired.append(1))
    for rows, trims in ((1024, 0), (65536, 1)):  # a 1 MiB residual stream: short, not trimmed; 64 MiB: long
        x = torch.randn(rows, 256, requires_grad=True)
        y = x * 2
        trim_after_backward(y)
        (y * 3).sum().backward()
        assert torch.equal(x.grad, torch.full((rows, 256), 6.0))
        assert len(fired) == trims or _malloc_trim() is None
        fired.clear()


_FRAGMENT = """
import sys, torch
from longtrain.train.host_memory import map_large_blocks

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

if sys.argv[1] == "fixed":
    assert map_large_blocks(4)
x = torch.ones(2 << 20)  # 8 MiB, mapped; freeing it raises glibc's adaptive threshold past 8 MiB
del x
base = rss_mib()
pairs = [(torch.ones(2 << 20), torch.ones(1000)) for _ in range(40)]  # 8 MiB blocks between small ones
small = [s for _, s in pairs]
del pairs  # the 8 MiB blocks are free; the small ones pin the heap around them
print(rss_mib() - base)
"""


def test_a_fixed_mmap_threshold_returns_freed_blocks():
    """glibc's adaptive threshold serves repeated 8 MiB blocks from the heap, whose freed pages
    stay resident; `host_mmap_mib` maps them and gives them back on free."""
    import os
    import subprocess
    import sys

    if _malloc_trim() is None:  # not glibc
        return
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE="0")  # torch's huge-page path aligns blocks differently
    kept = {mode: float(subprocess.run([sys.executable, "-c", _FRAGMENT, mode], capture_output=True, text=True,
                                       check=True, env=env).stdout) for mode in ("adaptive", "fixed")}
    assert kept["adaptive"] > 200, kept  # the demonstration: 320 MiB freed, still resident
    assert kept["fixed"] < 40, kept
