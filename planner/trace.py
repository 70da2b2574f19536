"""Live tensor bytes through a training step, by the op that made them.

The resident set a CPU run measures is live tensors plus what the allocator keeps (glibc's heap
holds freed 16-32 MiB blocks while a backward pass allocates and frees around them). To tell
a planning error from allocator waste, `LiveBytes` (a TorchDispatchMode) records every output
storage of every op with a weak reference, and after each op sums the storages still alive:
its peak is what the tensors alone need, and `at_peak` says which ops made them.
"""

from __future__ import annotations

import collections

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the CPU tensors created while active (tensors made before are not
    counted: parameters, the batch). `every`: sum every that many ops (1: exact peak)."""

    def __init__(self, every: int = 1):
        super().__init__()
        self.every, self.ops = every, 0
        self.live: dict[int, tuple] = {}
        self.peak, self.at_peak = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_meta:
                s = t.untyped_storage()
                old = self.live.get(s.data_ptr())
                if old is None or old[0].expired():
                    self.live[s.data_ptr()] = (StorageWeakRef(s), s.nbytes(), str(func), tuple(t.shape))
        self.ops += 1
        if self.ops % self.every == 0:
            self._measure()
        return out

    def _measure(self) -> None:
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        total = sum(v[1] for v in self.live.values())
        if total > self.peak:
            self.peak, self.at_peak = total, [(v[2], v[3], v[1]) for v in self.live.values()]

    def top(self, n: int = 10) -> list[tuple[float, str, tuple]]:
        """The `n` largest (MiB, op, shape) groups alive at the peak."""
        groups: collections.Counter = collections.Counter()
        for op, shape, nbytes in self.at_peak:
            groups[(op, shape)] += nbytes
        return [(b / 2**20, op, shape) for (op, shape), b in groups.most_common(n)]
