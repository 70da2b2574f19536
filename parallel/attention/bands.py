"""Equal tiles along a diagonal, as one batched kernel call: strided views, no copies.

A sliding window cut into row bands (`tiles`) gives, per band, the same three shapes (ANTI,
FULL, CAUSAL) shifted by the band height n along both queries and keys. Calling the fused
kernel once per band leaves it small problems (its efficiency grows with size) and merges
every band separately; stacking the bands on the batch axis gives one call per shape. The
query bands are consecutive rows (a reshape); the key bands overlap (a band of m keys every
n rows), which `as_strided` reads without copying. Gradients of overlapping key bands are
added back in strips of at most n keys, each strip a set of disjoint windows.
"""

from __future__ import annotations

import torch


def band_rows(x: torch.Tensor, count: int) -> torch.Tensor:
    """[b, count*n, ...] -> [b*count, n, ...] (consecutive row bands)."""
    b, rows = x.shape[0], x.shape[1]
    return x.reshape(b * count, rows // count, *x.shape[2:])


def unband_rows(x: torch.Tensor, count: int) -> torch.Tensor:
    """[b*count, n, ...] -> [b, count*n, ...]."""
    return x.reshape(x.shape[0] // count, count * x.shape[1], *x.shape[2:])


def unband_lse(lse: torch.Tensor, count: int) -> torch.Tensor:
    """[b*count, h, n] -> [b, h, count*n]."""
    bc, h, n = lse.shape
    return lse.view(bc // count, count, h, n).transpose(1, 2).reshape(bc // count, h, count * n)


def band_lse(lse: torch.Tensor, count: int) -> torch.Tensor:
    """[b, h, count*n] -> [b*count, h, n]."""
    b, h, cn = lse.shape
    return lse.reshape(b, h, count, cn // count).transpose(1, 2).reshape(b * count, h, cn // count)


def _windows(x: torch.Tensor, count: int, step: int, width: int, start: int = 0) -> torch.Tensor:
    """[b, L, ...] -> [b, count, width, ...]: window i = rows start + i*step .. + width (a view)."""
    st = x.stride()
    return x.as_strided((x.shape[0], count, width, *x.shape[2:]), (st[0], step * st[1], *st[1:]),
                        x.storage_offset() + start * st[1])


def band_keys(x: torch.Tensor, count: int, step: int) -> torch.Tensor:
    """[b, (count-1)*step + m, ...] -> [b*count, m, ...]: overlapping key bands. A view when
    b == 1; a copy of the bands otherwise (batch and band axes do not fold into one stride)."""
    m = x.shape[1] - (count - 1) * step
    w = _windows(x, count, step, m)
    return w[0] if x.shape[0] == 1 else w.reshape(x.shape[0] * count, m, *x.shape[2:])


def add_band_keys(acc: torch.Tensor, part: torch.Tensor, count: int, step: int) -> None:
    """acc [b, (count-1)*step + m, ...] += the key bands `part` [b*count, m, ...]."""
    b, m = acc.shape[0], part.shape[1]
    part = part.view(b, count, m, *part.shape[2:])
    for j in range(0, m, step):  # strips of <= step keys: the count windows of a strip are disjoint
        w = min(step, m - j)
        _windows(acc, count, step, w, j).add_(part[:, :, j:j + w])
