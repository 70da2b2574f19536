"""Give freed heap memory back to the OS between layers of the backward pass (CPU, glibc).

glibc serves tensors under its mmap threshold (up to 32 MiB) from the heap, and the pages of
freed ones stay resident: a long-context step frees and reallocates many such tensors (band
temporaries, per-layer activations of a small shard), so the resident set climbs well above
the memory actually live (measured: a 128K-token tp2 x ring2 step peaked at 1145 MiB resident
for about 715 MiB live). `malloc_trim(0)` releases the free pages wherever they are in the
heap; called once per layer of the backward pass it costs milliseconds, not a mapped
allocation per tensor (a lower mmap threshold cost 14% of the step time). No-op elsewhere.

It pays only on long shards, though: every page given back is faulted in and zeroed again by
the next allocation that reuses it, and on short sequences, whose freed temporaries are reused
as they are by the next layer and the next step, that cost 17% (2K tokens) and 10% (8K) of a
one-process step and bought nothing. So trimming is for shards whose residual stream (tokens x
width, fp32) holds at least `TRIM_MIN_MIB`: the long-context runs it was made for (the cpu_1m
config's shard holds 256 MiB) trim as before; short ones never do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch


@functools.lru_cache(maxsize=1)
def glibc():
    """The C library if it is glibc (it has malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt
    except (OSError, AttributeError):
        return None
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return libc


def _malloc_trim():
    libc = glibc()
    return None if libc is None else libc.malloc_trim


def trim() -> None:
    """Return the heap's free pages to the OS (glibc); nothing where that does not exist."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)


TRIM_MIN_MIB = 32  # a residual stream at least this large is a long shard, worth trimming after


def worth_trimming(residual_bytes: int) -> bool:
    """Does a shard whose residual stream holds `residual_bytes` trim (`TRIM_MIN_MIB`)?"""
    return residual_bytes >= TRIM_MIN_MIB * 2**20


def trim_after_backward(x: torch.Tensor) -> None:
    """Trim once the gradient of `x` (a block's input: the residual stream) is computed, on
    CPU, for a long shard."""
    if x.requires_grad and x.device.type == "cpu" and _malloc_trim() is not None and \
            worth_trimming(x.numel() * x.element_size()):
        x.register_hook(_hook)


def _hook(grad: torch.Tensor) -> None:
    trim()
