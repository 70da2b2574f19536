"""The parallel layout: one validated `ParallelDims`, one named mesh built from it, passed down.

Rank order (outermost first): ``pp, dp, cp_ring, cp_ulysses, tp``. Global rank is the
row-major index over those axes, so ``tp`` is innermost (consecutive ranks), then Ulysses,
then ring, then data, then pipeline. Why: tensor parallel and Ulysses issue blocking
collectives on every layer (all-reduce / all-to-all) and need the fastest links, so their
groups should sit inside one node (launchers place consecutive ranks on one node). Ring
attention only talks to its neighbours and overlaps that with compute, so it tolerates the
slower inter-node links; data parallel reduces once per step; pipeline sends one
activation per micro-batch and goes outermost.

Expert parallelism is not an extra axis of the world: as in Megatron, experts are spread
over the data- and sequence-parallel ranks. ``ep`` must divide ``dp * cp_ring * cp_ulysses``;
an EP group is ``ep`` consecutive ranks of that flattened (dp, cp_ring, cp_ulysses) block,
at fixed (pp, tp).

Nothing here is global: `build_mesh` returns a `ParallelMesh` that owns its groups and a
`CommStats` for byte accounting; layers take the groups they need in their constructors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .comm import CommStats

AXES: tuple[str, ...] = ("pp", "dp", "cp_ring", "cp_ulysses", "tp")


class LayoutError(ValueError):
    """A parallel layout that cannot work; the message says what to change."""


@dataclass(kw_only=True, frozen=True)
class ParallelDims:
    """Degrees of every parallel axis. Validates itself on construction."""

    dp: int = 1
    pp: int = 1
    tp: int = 1
    cp_ulysses: int = 1
    cp_ring: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise LayoutError(f"ParallelDims.{f.name} must be a positive integer, got {v!r}")
        span = self.dp * self.cp
        if span % self.ep:
            raise LayoutError(
                f"ep={self.ep} must divide dp*cp_ring*cp_ulysses={span}: experts are spread over "
                f"the data- and sequence-parallel ranks; choose ep from the divisors of {span}"
            )

    @property
    def cp(self) -> int:
        """Total sequence-parallel degree (ring x Ulysses)."""
        return self.cp_ring * self.cp_ulysses

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp_ring * self.cp_ulysses * self.tp

    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in AXES)

    def check_world_size(self, world_size: int) -> None:
        if world_size != self.world_size:
            axes = " x ".join(f"{a}={getattr(self, a)}" for a in AXES)
            raise LayoutError(
                f"the layout {axes} needs {self.world_size} ranks but the job has {world_size}; "
                f"change the degrees so their product is {world_size}, or launch {self.world_size} ranks"
            )

    def coords(self, rank: int) -> dict[str, int]:
        """Coordinates of a global rank on each axis (row-major, tp innermost)."""
        out: dict[str, int] = {}
        for a in reversed(AXES):
            n = getattr(self, a)
            out[a] = rank % n
            rank //= n
        return {a: out[a] for a in AXES}

    def rank_grid(self) -> torch.Tensor:
        """Global ranks laid out as a tensor of shape `shape()`."""
        return torch.arange(self.world_size).reshape(self.shape())

    def axis_groups(self, *axes: str) -> list[list[int]]:
        """All rank lists that form groups along `axes` (every other coordinate fixed);
        several axes give their flattened product, in rank order."""
        idx = sorted(AXES.index(a) for a in axes)
        n = 1
        for i in idx:
            n *= self.shape()[i]
        grid = self.rank_grid().movedim(idx, list(range(5 - len(idx), 5))).reshape(-1, n)
        return grid.tolist()

    def _dp_cp_blocks(self) -> torch.Tensor:
        grid = self.rank_grid()  # [pp, dp, cp_ring, cp_ulysses, tp]
        grid = grid.permute(0, 4, 1, 2, 3).reshape(self.pp * self.tp, -1)  # [pp*tp, dp*cp]
        return grid.reshape(self.pp * self.tp, -1, self.ep)  # [pp*tp, dp*cp/ep, ep]

    def ep_groups(self) -> list[list[int]]:
        """Rank lists of the expert-parallel groups (see module docstring)."""
        return self._dp_cp_blocks().reshape(-1, self.ep).tolist()

    def device_grid(self, *axes: str) -> torch.Tensor:
        """Global ranks as [rest, *sizes of `axes`]: every rank list along `axes` (in that order)
        is one row of the trailing dims. `axes` are mesh axes, ``ep``, ``edp`` or ``dp_cp``;
        this is the layout of a DTensor whose placements follow `axes` (`ParallelMesh.device_mesh`)."""
        grid = self.rank_grid().permute(0, 4, 1, 2, 3)  # [pp, tp, dp, cp_ring, cp_ulysses]
        names = ["pp", "tp", "dp", "cp_ring", "cp_ulysses"]
        if {"ep", "edp"} & set(axes):
            grid, names = grid.reshape(self.pp, self.tp, -1, self.ep), ["pp", "tp", "edp", "ep"]
        elif "dp_cp" in axes:
            grid, names = grid.reshape(self.pp, self.tp, -1), ["pp", "tp", "dp_cp"]
        missing = [a for a in axes if a not in names]
        if missing or len(set(axes)) != len(axes):
            raise ValueError(f"device_grid: cannot lay out axes {axes}")
        idx = [names.index(a) for a in axes]
        rest = [i for i in range(len(names)) if i not in idx]
        return grid.permute(rest + idx).reshape(-1, *(grid.shape[i] for i in idx))

    def pp_end_groups(self) -> list[list[int]]:
        """Per (dp, cp, tp) coordinate, the first and last pipeline rank: the embedding and the
        head a tied model shares across stages."""
        return [[g[0], g[-1]] for g in self.axis_groups("pp")] if self.pp > 1 else []

    def edp_groups(self) -> list[list[int]]:
        """Expert-data-parallel groups: ranks holding the same experts (same place in their EP
        group), over which expert gradients are summed."""
        blocks = self._dp_cp_blocks()
        return blocks.transpose(1, 2).reshape(-1, blocks.shape[1]).tolist()


@dataclass(eq=False)
class ParallelMesh:
    """This rank's view of the layout: its coordinates and one process group per axis, plus
    ``cp`` (ring x Ulysses: every rank holding part of one sequence) and ``dp_cp`` (data x
    sequence: the replicas of a parameter, over which gradients are summed).

    Groups of size one are ``None`` (no communication). `device_mesh(*axes)` gives the same
    layout as a torch `DeviceMesh` over some axes, for DTensor views (checkpoints).
    """

    dims: ParallelDims
    rank: int
    device_type: str
    groups: dict[str, ProcessGroup | None]
    ep_group: ProcessGroup | None
    stats: CommStats = field(default_factory=CommStats)
    _device_meshes: dict = field(default_factory=dict, repr=False)

    def device_mesh(self, *axes: str):
        """A DeviceMesh [rest, *axes] (see `ParallelDims.device_grid`), built on first use and
        kept: building one is a collective, so every rank must ask for the same ones in the
        same order (the checkpoint does, parameter by parameter)."""
        if axes not in self._device_meshes:
            from torch.distributed.device_mesh import DeviceMesh

            self._device_meshes[axes] = DeviceMesh(self.device_type, self.dims.device_grid(*axes),
                                                   mesh_dim_names=("rest", *axes))
        return self._device_meshes[axes]

    def size(self, axis: str) -> int:
        return self.dims.world_size if axis == "world" else getattr(self.dims, axis)  # "cp" is a property

    def coord(self, axis: str) -> int:
        return self.dims.coords(self.rank)[axis]

    def group(self, axis: str) -> ProcessGroup | None:
        return self.ep_group if axis == "ep" else self.groups[axis]

    def __repr__(self) -> str:
        axes = ", ".join(f"{a}={getattr(self.dims, a)}" for a in AXES)
        return f"ParallelMesh(rank={self.rank}, {axes}, ep={self.dims.ep}, device={self.device_type})"


def backend_for(device_type: str) -> str:
    """CPU means gloo, CUDA means NCCL."""
    return "nccl" if device_type == "cuda" else "gloo"


def _new_groups(rank_lists: list[list[int]], rank: int, timeout: timedelta) -> ProcessGroup | None:
    """Create every group in `rank_lists` (a collective: all ranks call it in the same order)
    and return the one containing `rank`, or None if that group has a single member."""
    mine = None
    for ranks in rank_lists:
        if len(ranks) == 1:
            continue
        g = dist.new_group(ranks=ranks, timeout=timeout)
        if rank in ranks:
            mine = g
    return mine


def build_mesh(
    dims: ParallelDims,
    *,
    device_type: str | None = None,
    timeout: timedelta = timedelta(minutes=5),
) -> ParallelMesh:
    """Build this rank's `ParallelMesh`. The default process group must be initialized;
    `device_type` defaults to the device its backend communicates on.

    Validation happens before any group is created, so a bad layout never hangs.
    """
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized; call launch.init_distributed() first")
    world = dist.get_world_size()
    dims.check_world_size(world)
    rank = dist.get_rank()
    device_type = device_type or ("cuda" if dist.get_backend() == "nccl" else "cpu")  # the backend's device
    groups = {a: _new_groups(dims.axis_groups(a), rank, timeout) for a in AXES}
    # both sequence-parallel axes together: checks that must involve every rank of a sequence
    groups["cp"] = _new_groups(dims.axis_groups("cp_ring", "cp_ulysses"), rank, timeout)
    # data x sequence: the ranks holding replicas of the same (non-expert) parameters
    groups["dp_cp"] = _new_groups(dims.axis_groups("dp", "cp_ring", "cp_ulysses"), rank, timeout)
    # all ranks of one pipeline stage: different tokens of one batch (MoE balance statistics)
    groups["dp_cp_tp"] = _new_groups(dims.axis_groups("dp", "cp_ring", "cp_ulysses", "tp"), rank, timeout)
    groups["edp"] = _new_groups(dims.edp_groups(), rank, timeout)
    groups["world"] = dist.group.WORLD if world > 1 else None  # job-wide reports (per-rank peaks)
    groups["pp_ends"] = _new_groups(dims.pp_end_groups(), rank, timeout)  # tied embedding across stages
    ep_group = _new_groups(dims.ep_groups(), rank, timeout) if dims.ep > 1 else None
    return ParallelMesh(dims=dims, rank=rank, device_type=device_type, groups=groups, ep_group=ep_group)
