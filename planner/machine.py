"""What the plan measures of this machine: the matmul rate, which bounds the step time from below.
(A rank's resident baseline is measured by running training: `longtrain.train.baseline`.)"""

from __future__ import annotations

import time

import torch


def matmul_rate(threads: int, n: int = 1024, seconds: float = 0.5) -> float:
    """fp32 matmul FLOP/s with `threads` threads on this machine (best of a short burst)."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best, end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
        return best
    finally:
        torch.set_num_threads(old)
