"""How a parameter is laid out over the mesh: one typed description per parameter.

Every parameter carries a `Sharding` (set with `shard`, read with `sharding_of`): the full
shape, which dimension is cut over which mesh axis (``tp`` for the Megatron-style layers,
``ep`` for experts), which ranks hold replicas of the same slice (their gradients are summed:
``dp_cp`` for dense weights, the expert-data-parallel group ``edp`` for experts), whether a tp
rank's gradient is only a partial sum (TP sequence parallel: each tp rank saw part of the
sequence), and how it is initialized. The model writes it once, when it is built; everything
else reads only it: initialization (`models.transformer.materialize`), the gradient sync and
norm (`grads`), ZeRO (`zero`), the checkpoint's DTensor views and the Hugging Face reader and
writer. Adding an axis means extending this description, not every consumer.

Slices follow `torch.chunk` along `dim` (the same rule as DTensor's `Shard`), so the
checkpoint's global view and the model's local slices agree by construction.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch.distributed import ProcessGroup

from .comm import CommStats, all_gather_cat, group_rank, group_size

INITS = ("normal", "scaled", "ones", "zeros")
SHARD_AXES = {"tp": "dp_cp", "ep": "edp"}  # the axis a parameter is cut over -> its replica group


@dataclass(frozen=True, kw_only=True)
class Sharding:
    """How one parameter (or tagged buffer) is laid out; see the module docstring."""

    full_shape: tuple[int, ...]
    dim: int | None = None  # cut along this dim over `group` (None: every rank holds all of it)
    axis: str = "tp"  # the mesh axis whose group holds the slices
    group: ProcessGroup | None = field(default=None, compare=False, repr=False)
    partial_over_tp: bool = False  # its gradient is also summed over tp (each tp rank saw part of it)
    init: str = "normal"  # normal | scaled (output projections: std / sqrt(2 n_layers)) | ones | zeros

    def __post_init__(self) -> None:
        object.__setattr__(self, "full_shape", tuple(int(n) for n in self.full_shape))
        if self.axis not in SHARD_AXES:
            raise ValueError(f"Sharding.axis={self.axis!r} must be one of {sorted(SHARD_AXES)}")
        if self.init not in INITS:
            raise ValueError(f"Sharding.init={self.init!r} must be one of {INITS}")
        if self.dim is not None and not 0 <= self.dim < len(self.full_shape):
            raise ValueError(f"Sharding.dim={self.dim} is not a dimension of a {len(self.full_shape)}-d tensor")

    @property
    def parts(self) -> int:
        """Number of slices (1: not cut)."""
        return 1 if self.dim is None else group_size(self.group)

    @property
    def sharded(self) -> bool:
        return self.parts > 1

    @property
    def replicas(self) -> str:
        """The mesh group of ranks holding this same slice (gradients are summed over it)."""
        return SHARD_AXES[self.axis]

    def local_slice(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the full tensor."""
        if not self.sharded:
            return full
        return full.chunk(self.parts, dim=self.dim)[group_rank(self.group)]

    def local_range(self) -> tuple[int, int]:
        """[start, stop) of this rank's slice along `dim`."""
        if self.dim is None:
            raise ValueError("local_range: the tensor is not cut along any dimension")
        n = self.full_shape[self.dim]
        step = -(-n // self.parts)
        lo = min(n, group_rank(self.group) * step)
        return lo, min(n, lo + step)

    def gather(self, local: torch.Tensor, stats: CommStats | None = None) -> torch.Tensor:
        """The full tensor from every rank's slice (a collective over `group` when cut)."""
        if not self.sharded:
            return local
        if self.full_shape[self.dim] % self.parts:
            raise ValueError(f"cannot gather a {self.full_shape} tensor cut unevenly in {self.parts} along dim {self.dim}")
        return all_gather_cat(local.contiguous(), self.group, self.dim, stats)


def shard(t: torch.Tensor, sharding: Sharding) -> torch.Tensor:
    """Attach `sharding` to `t` (a parameter or buffer); returns `t`."""
    t.sharding = sharding
    return t


def sharding_of(t: torch.Tensor) -> Sharding:
    """`t`'s description; a tensor without one is whole on every rank of its stage."""
    s = getattr(t, "sharding", None)
    return s if s is not None else Sharding(full_shape=tuple(t.shape))


def retag(t: torch.Tensor, **changes) -> torch.Tensor:
    """Change some fields of `t`'s description (its init, a partial gradient); returns `t`."""
    return shard(t, dataclasses.replace(sharding_of(t), **changes))


# ---------------------------------------------------------------- the replica chunk (ZeRO, FSDP)
@dataclass(frozen=True, eq=False)
class ZeroSlice:
    """This rank's chunk of a (local, possibly tp-sharded) parameter of `shape`, cut along
    `dim` into `parts` chunks over `group` (torch.chunk sizes: ceil, the last ones smaller or
    empty). Packed forms pad every chunk to the same length, for collectives."""

    shape: tuple[int, ...]
    dim: int
    parts: int
    rank: int
    group: ProcessGroup | None

    @classmethod
    def of(cls, shape: tuple[int, ...], group: ProcessGroup | None) -> "ZeroSlice":
        parts = group_size(group)
        even = [d for d, n in enumerate(shape) if n >= parts and n % parts == 0]
        dim = even[0] if even else max(range(len(shape)), key=lambda d: shape[d])  # fewest padding rows
        return cls(tuple(shape), dim, parts, group_rank(group), group)

    @property
    def step(self) -> int:
        return -(-self.shape[self.dim] // self.parts)

    @property
    def inner(self) -> int:
        return math.prod(self.shape) // max(1, self.shape[self.dim])

    @property
    def packed(self) -> int:
        """Elements of one padded chunk."""
        return self.step * self.inner

    def range(self, rank: int | None = None) -> tuple[int, int]:
        n, r = self.shape[self.dim], self.rank if rank is None else rank
        lo = min(n, r * self.step)
        return lo, min(n, lo + self.step)

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's chunk of `t` (a view)."""
        lo, hi = self.range()
        return t.narrow(self.dim, lo, hi - lo)

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t.movedim(self.dim, 0).reshape(self.shape[self.dim], self.inner)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """Every chunk of the whole tensor `t`, padded: [parts, packed]."""
        out = t.new_empty(self.parts, self.packed)
        self.pack_into(t, out)
        return out

    def pack_into(self, t: torch.Tensor, out: torch.Tensor) -> None:
        """`pack` into `out` [parts, packed], which may be a column block of a wider buffer."""
        blocks = out.view(self.parts, self.step, self.inner)
        rows = self._rows(t)
        for r in range(self.parts):
            lo, hi = self.range(r)
            blocks[r, :hi - lo] = rows[lo:hi]
            blocks[r, hi - lo:] = 0

    def pack_mine(self, chunk: torch.Tensor) -> torch.Tensor:
        """This rank's chunk, padded: [packed]."""
        out = chunk.new_zeros(self.step, self.inner)
        lo, hi = self.range()
        out[:hi - lo] = chunk.movedim(self.dim, 0).reshape(hi - lo, self.inner)
        return out.view(-1)

    def unpack_mine(self, flat: torch.Tensor) -> torch.Tensor:
        """Inverse of `pack_mine`: [packed] -> this rank's chunk (a new tensor)."""
        lo, hi = self.range()
        moved = list(self.shape)
        moved.insert(0, moved.pop(self.dim))
        moved[0] = hi - lo
        return flat[:(hi - lo) * self.inner].reshape(moved).movedim(0, self.dim).contiguous()

    def unpack_all(self, rows: torch.Tensor, out: torch.Tensor) -> None:
        """Inverse of `pack`: [parts, packed] -> the whole tensor, written into `out`."""
        n = self.shape[self.dim]
        moved = list(self.shape)
        moved.insert(0, moved.pop(self.dim))
        out.copy_(rows.reshape(self.parts * self.step, self.inner)[:n].reshape(moved).movedim(0, self.dim))


def is_sharded(t) -> bool:
    """Whether `t` is an FSDP-managed (DTensor) parameter or state tensor."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t` (its local tensor if a DTensor: shares its storage)."""
    return t.to_local() if is_sharded(t) else t


def fsdp_slice(p) -> ZeroSlice:
    """This rank's FSDP chunk of `p` as a `ZeroSlice` (dim 0 over FSDP's 1-D mesh)."""
    mesh = p.device_mesh
    return ZeroSlice(tuple(p.shape), 0, mesh.size(), mesh.get_local_rank(), mesh.get_group())
