"""How a parameter is laid out over the mesh: one typed description per parameter.

Every parameter carries a `Sharding` (set with `shard`, read with `sharding_of`). It names mesh
axes, never process groups, so a model built on a layout without groups
(`ParallelMesh.planned`, on the meta device) carries exactly the descriptions a running rank's
does, and the planner counts from them. It says:

- the full shape, and which dimension is cut over which axis (``tp`` for the Megatron-style
  layers, ``ep`` for experts): into how many `parts`, this rank holding slice `index`;
- which group holds replicas of the same slice (`replicas`: ``dp_cp`` for dense weights, the
  expert-data-parallel ``edp`` for experts; their gradients are summed), and, once ZeRO or FSDP
  is applied, this rank's `chunk` of it over those replicas (`ZeroSlice`: the part whose
  optimizer state, and under FSDP whose storage, this rank holds);
- whether a tp rank's gradient is only a partial sum (TP sequence parallel: each tp rank saw
  part of the sequence), and whether it is a `tied` copy of a parameter held on another pipeline
  stage (the head of a tied model, kept equal to the first stage's embedding);
- how it is initialized.

The model writes the cut when it is built, ZeRO and FSDP the chunk when they are applied;
everything else reads only this: initialization (`models.transformer.materialize`), the
gradient sync and norm (`grads`), ZeRO (`zero`), the checkpoint's DTensor views, the Hugging
Face reader and writer, and the planner. Slices follow `torch.chunk` along `dim` (the same rule
as DTensor's `Shard`), so the checkpoint's global view and the model's local slices agree by
construction.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from .comm import CommStats, all_gather_cat

INITS = ("normal", "scaled", "ones", "zeros")
SHARD_AXES = {"tp": "dp_cp", "ep": "edp"}  # the axis a parameter is cut over -> its replica group


@dataclass(frozen=True, kw_only=True)
class Sharding:
    """How one parameter (or tagged buffer) is laid out; see the module docstring."""

    full_shape: tuple[int, ...]
    dim: int | None = None  # cut along this dim over `axis` (None: every rank holds all of it)
    axis: str = "tp"  # the mesh axis whose ranks hold the slices
    parts: int = 1  # slices along `dim` (1: not cut)
    index: int = 0  # the slice this rank holds
    partial_over_tp: bool = False  # its gradient is also summed over tp (each tp rank saw part of it)
    init: str = "normal"  # normal | scaled (output projections: std / sqrt(2 n_layers)) | ones | zeros
    chunk: "ZeroSlice | None" = field(default=None, compare=False)  # over `replicas`: set by ZeRO / FSDP
    tied: str | None = None  # the name this copy stands for and is kept equal to on another stage

    def __post_init__(self) -> None:
        object.__setattr__(self, "full_shape", tuple(int(n) for n in self.full_shape))
        if self.axis not in SHARD_AXES:
            raise ValueError(f"Sharding.axis={self.axis!r} must be one of {sorted(SHARD_AXES)}")
        if self.init not in INITS:
            raise ValueError(f"Sharding.init={self.init!r} must be one of {INITS}")
        if self.dim is not None and not 0 <= self.dim < len(self.full_shape):
            raise ValueError(f"Sharding.dim={self.dim} is not a dimension of a {len(self.full_shape)}-d tensor")
        if (self.dim is None and self.parts != 1) or not 0 <= self.index < self.parts:
            raise ValueError(f"Sharding: slice {self.index} of {self.parts} along dim {self.dim} is not a cut")

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
        return full.chunk(self.parts, dim=self.dim)[self.index]

    def local_range(self) -> tuple[int, int]:
        """[start, stop) of this rank's slice along `dim`."""
        if self.dim is None:
            raise ValueError("local_range: the tensor is not cut along any dimension")
        return chunk_range(self.full_shape[self.dim], self.parts, self.index)

    def gather(self, local: torch.Tensor, mesh, stats: CommStats | None = None) -> torch.Tensor:
        """The full tensor from every rank's slice (a collective over `mesh`'s `axis` when cut)."""
        if not self.sharded:
            return local
        if self.full_shape[self.dim] % self.parts:
            raise ValueError(f"cannot gather a {self.full_shape} tensor cut unevenly in {self.parts} along dim {self.dim}")
        return all_gather_cat(local.contiguous(), mesh.group(self.axis), self.dim, stats)


def chunk_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of chunk `index` of `n` rows cut into `parts` as `torch.chunk` cuts them
    (ceil-sized, the last ones smaller or empty): the rule every slice and chunk here follows."""
    step = -(-n // parts)
    lo = min(n, index * step)
    return lo, min(n, lo + step)


def cut(module: torch.nn.Module, name: str, dim: int, mesh, axis: str = "tp") -> None:
    """Keep only this rank's slice of `module`'s whole parameter `name`, cut along `dim` over
    `mesh`'s `axis`, and record the cut on its `Sharding`. A meta parameter stays on meta (a
    model is laid out before it is given memory); a real one keeps its slice's values."""
    p = getattr(module, name)
    s = dataclasses.replace(sharding_of(p), dim=dim, axis=axis, parts=mesh.size(axis), index=mesh.index(axis))
    piece = s.local_slice(p.detach())
    new = torch.nn.Parameter(torch.empty_like(piece) if p.is_meta else piece.clone(), requires_grad=p.requires_grad)
    setattr(module, name, shard(new, s))


def shard(t: torch.Tensor, sharding: Sharding) -> torch.Tensor:
    """Attach `sharding` to `t` (a parameter or buffer); returns `t`."""
    t.sharding = sharding
    return t


def sharding_of(t: torch.Tensor) -> Sharding:
    """`t`'s description; a tensor without one is whole on every rank of its stage."""
    s = getattr(t, "sharding", None)
    return s if s is not None else Sharding(full_shape=tuple(t.shape))


def full_tensor(p: torch.Tensor, mesh, t: torch.Tensor | None = None) -> torch.Tensor:
    """The full (unsharded) value of `t` (default: `p` itself, or a gradient or state shaped like
    it): gathered over FSDP's replicas first for a ZeRO-3 DTensor, then over `p`'s shard axis of
    `mesh` (a collective there: every rank calls it alike)."""
    t = p.detach() if t is None else t
    return sharding_of(p).gather(t.full_tensor() if is_sharded(t) else t, mesh)


def tied_name(name: str, t: torch.Tensor) -> str:
    """The parameter `t` (named `name` in its module) stands for: "embed.weight" for the head of
    a tied model whose head and embedding sit on different pipeline stages."""
    return sharding_of(t).tied or name


def retag(t: torch.Tensor, **changes) -> torch.Tensor:
    """Change some fields of `t`'s description (its init, a partial gradient, its chunk); returns `t`."""
    return shard(t, dataclasses.replace(sharding_of(t), **changes))


# ---------------------------------------------------------------- the replica chunk (ZeRO, FSDP)
@dataclass(frozen=True, eq=False)
class ZeroSlice:
    """This rank's chunk of a (local, possibly tp-sharded) parameter of `shape`, cut along
    `dim` into `parts` chunks over the replica group `axis` (torch.chunk sizes: ceil, the last
    ones smaller or empty), this rank holding chunk `rank`. Packed forms pad every chunk to the
    same length, for collectives."""

    shape: tuple[int, ...]
    dim: int
    parts: int
    rank: int
    axis: str  # the replica group: "dp_cp" or "edp"

    @classmethod
    def of(cls, shape: tuple[int, ...], mesh, axis: str) -> "ZeroSlice":
        """ZeRO's chunk of a parameter over `mesh`'s `axis`: along the first dimension that
        divides evenly, else the longest (fewest padding rows)."""
        parts = mesh.size(axis)
        even = [d for d, n in enumerate(shape) if n >= parts and n % parts == 0]
        dim = even[0] if even else max(range(len(shape)), key=lambda d: shape[d])
        return cls(tuple(shape), dim, parts, mesh.index(axis), axis)

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
        return chunk_range(self.shape[self.dim], self.parts, self.rank if rank is None else rank)

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
    """This rank's FSDP chunk of `p` (an FSDP DTensor) as a `ZeroSlice`: dim 0 over FSDP's 1-D
    mesh, which is `p`'s replica group."""
    mesh = p.device_mesh
    return ZeroSlice(tuple(p.shape), 0, mesh.size(), mesh.get_local_rank(), sharding_of(p).replicas)
