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


def test_hook_fires_after_the_gradient_and_keeps_it():
    x = torch.randn(4, 3, requires_grad=True)
    y = x * 2
    trim_after_backward(y)
    (y * 3).sum().backward()
    assert torch.equal(x.grad, torch.full((4, 3), 6.0))
