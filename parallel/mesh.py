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
`CommStats` for byte accounting, and it is passed down; `ParallelMesh.single()` stands for
one process.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .comm import CommStats

AXES: tuple[str, ...] = ("pp", "dp", "cp_ring", "cp_ulysses", "tp")
# the groups a `ParallelMesh` holds: the axes, and these products of axes ...
COMPOSITE: dict[str, tuple[str, ...]] = {
    "cp": ("cp_ring", "cp_ulysses"),  # every rank holding part of one sequence
    "dp_cp": ("dp", "cp_ring", "cp_ulysses"),  # the replicas of a dense parameter
    "dp_cp_tp": ("dp", "cp_ring", "cp_ulysses", "tp"),  # every rank of a pipeline stage (MoE token statistics)
}
# ... and expert parallel, the replicas of an expert, the tied embedding's two pipeline ends, the job
GROUPS: tuple[str, ...] = (*AXES, *COMPOSITE, "edp", "pp_ends", "ep", "world")


CP_LAYOUTS = ("zigzag", "documents")


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
    # where each token of a sequence lives on the ring ranks: "zigzag" (2 x cp_ring chunks, balanced
    # for a causal mask over the whole sequence) or "documents" (per batch, from its packed documents:
    # short ones whole on one rank, long ones head-and-tail over all; parallel/attention/doclayout.py)
    cp_layout: str = "zigzag"

    def __post_init__(self) -> None:
        if self.cp_layout not in CP_LAYOUTS:
            raise LayoutError(f"cp_layout={self.cp_layout!r} must be one of {CP_LAYOUTS}")
        for f in dataclasses.fields(self):
            if f.name == "cp_layout":
                continue
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
        return torch.arange(self.world_size, device="cpu").reshape(self.shape())  # not the meta device a model is built on

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

    def rank_lists(self, name: str) -> list[list[int]]:
        """Every group of `name` (one of `GROUPS`) as lists of global ranks, each in its group's
        rank order: the lists `build_mesh` creates the groups from."""
        if name in COMPOSITE:
            return self.axis_groups(*COMPOSITE[name])
        lists = {"ep": self.ep_groups, "edp": self.edp_groups, "pp_ends": self.pp_end_groups,
                 "world": lambda: [list(range(self.world_size))]}
        if name in lists:
            return lists[name]()
        if name not in AXES:
            raise KeyError(f"the layout has no group {name!r}; its groups are {list(GROUPS)}")
        return self.axis_groups(name)

    def place(self, name: str, rank: int) -> tuple[int, int]:
        """(`rank`'s index in its group of `name`, that group's size); (0, 1) outside any group
        (the middle pipeline stages have no ``pp_ends`` group)."""
        return _places(self, name).get(rank, (0, 1))


@functools.lru_cache(maxsize=64)
def _places(dims: ParallelDims, name: str) -> dict[int, tuple[int, int]]:
    """Each rank's (index, group size) for `name`, computed once per layout: models ask per layer."""
    return {r: (i, len(ranks)) for ranks in dims.rank_lists(name) for i, r in enumerate(ranks)}


@dataclass(eq=False)
class ParallelMesh:
    """The layout, as this rank sees it: the one object every layer, sync and checkpoint reads.

    It holds this rank's coordinates and one process group per axis name: the five mesh axes,
    ``cp`` (ring x Ulysses: every rank holding part of one sequence), ``dp_cp`` (data x
    sequence: the replicas of a dense parameter, over which gradients are summed), ``dp_cp_tp``
    (every rank of a pipeline stage), ``ep`` and ``edp`` (expert parallel and the replicas of an
    expert), ``pp_ends`` (the first and last pipeline rank: a tied embedding) and ``world``. A
    group of one rank is ``None`` (no communication), so `single` (one process) is the same
    object with every group absent: no caller tells one process apart.

    ``sequence_parallel``: Megatron's TP sequence parallelism (the residual stream is split along
    the sequence over tp); only meaningful with tp > 1, and False otherwise.
    `device_mesh(*axes)` gives the layout as a torch `DeviceMesh` over some axes (DTensor views
    for checkpoints, FSDP2's mesh).
    """

    dims: ParallelDims
    rank: int
    device_type: str
    groups: dict[str, ProcessGroup | None]
    sequence_parallel: bool = False
    stats: CommStats = field(default_factory=CommStats)
    _device_meshes: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.sequence_parallel = bool(self.sequence_parallel) and self.dims.tp > 1

    @classmethod
    def single(cls, device_type: str = "cpu", *, sequence_parallel: bool = False) -> "ParallelMesh":
        """One process: every axis of size one, no groups (works without torch.distributed)."""
        return cls.planned(ParallelDims(), device_type=device_type, sequence_parallel=sequence_parallel)

    @classmethod
    def planned(cls, dims: ParallelDims, rank: int = 0, *, device_type: str = "cpu",
                sequence_parallel: bool = True) -> "ParallelMesh":
        """Rank `rank` of `dims` without process groups: a model built on it (on the meta device)
        has exactly the parameters and `Sharding`s that rank's has, which is what the planner
        reads. Asking it for a group of more than one rank is an error, not a silent no-op."""
        dims.check_world_size(dims.world_size)
        if not 0 <= rank < dims.world_size:
            raise LayoutError(f"rank {rank} is outside the layout's {dims.world_size} ranks")
        return cls(dims=dims, rank=rank, device_type=device_type, groups={}, sequence_parallel=sequence_parallel)

    def with_sequence_parallel(self, on: bool) -> "ParallelMesh":
        """The same layout (groups, statistics, DeviceMeshes shared) with TP sequence parallel
        on or off."""
        return dataclasses.replace(self, sequence_parallel=on)

    def device_mesh(self, *axes: str):
        """A DeviceMesh [rest, *axes] (see `ParallelDims.device_grid`), built on first use and
        kept: building one is a collective, so every rank must ask for the same ones in the
        same order (the checkpoint does, parameter by parameter)."""
        if axes not in self._device_meshes:
            from torch.distributed.device_mesh import DeviceMesh

            self._device_meshes[axes] = DeviceMesh(self.device_type, self.dims.device_grid(*axes),
                                                   mesh_dim_names=("rest", *axes))
        return self._device_meshes[axes]

    def size(self, name: str) -> int:
        """Ranks in this rank's group of `name` (an axis, or one of `GROUPS`)."""
        return self.dims.place(name, self.rank)[1]

    def index(self, name: str) -> int:
        """This rank's place in its group of `name`: which slice it holds of what is cut over it."""
        return self.dims.place(name, self.rank)[0]

    def coord(self, axis: str) -> int:
        return self.dims.coords(self.rank)[axis]

    def group(self, name: str) -> ProcessGroup | None:
        """This rank's process group of `name`; None where it has one rank (nothing to send)."""
        if name not in GROUPS:
            raise KeyError(f"the layout has no group {name!r}; its groups are {list(GROUPS)}")
        g = self.groups.get(name)
        if g is None and self.size(name) > 1:
            raise RuntimeError(f"this layout was built without process groups (`ParallelMesh.planned`): it lays "
                               f"out a model, but cannot run one; the {name!r} group has {self.size(name)} ranks")
        return g

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
    sequence_parallel: bool = True,
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
    # every rank creates every group, in the order of GROUPS (a collective); "world" is the default group
    groups = {name: _new_groups(dims.rank_lists(name), rank, timeout) for name in GROUPS if name != "world"}
    groups["world"] = dist.group.WORLD if world > 1 else None  # job-wide reports (per-rank peaks)
    return ParallelMesh(dims=dims, rank=rank, device_type=device_type, groups=groups,
                        sequence_parallel=sequence_parallel)
