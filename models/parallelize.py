"""Laying a built model out over a mesh, one step per kind of parallelism (as torchtitan's
`parallelize_*` and picotron's `apply_*`): the model is built whole, for one process, and
nothing in its constructor depends on the layout.

`parallelize` runs the steps in order on a model that is usually still on the meta device
(`build_model` then gives this rank's slices memory):

1. the layout is checked against the model (heads, vocabulary, experts), before anything changes;
2. `LongLM.keep_part`: a pipeline rank keeps its layers, and the embedding or the head if its stages
   hold them; a tied embedding split over two stages becomes two copies kept equal;
3. `apply_tp`: every tensor-parallel layer keeps its tp slice; parameters whose tp ranks each
   see only part of the computation (MoH routers, the final norm) get partial gradients;
4. `apply_ep`: every expert stack keeps this rank's experts;
5. `apply_sequence_parallel`: under TP sequence parallel every weight not cut over tp has a
   partial gradient (each tp rank saw its own slice of the sequence);
6. `bind`: every layer that communicates gets the mesh whose groups it uses.

ZeRO and FSDP are applied later, to the materialized model, by the trainer (`parallel.zero`,
`parallel.fsdp`). Each step records what it did on the parameters' `Sharding`s.
"""

from __future__ import annotations

from torch import nn

from longtrain.parallel.mesh import ParallelMesh
from longtrain.parallel.sharding import retag, sharding_of
from longtrain.parallel.tensor import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

from .moe import Experts
from .moh import HeadRouter

TP_LAYERS = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)


def parallelize(model, mesh: ParallelMesh, part=None):
    """Lay `model` (a whole `LongLM`) out for this rank of `mesh`; `part`: a pipeline rank's
    layers (`transformer.Part`). Returns `model`, changed in place."""
    model.cfg.check_layout(mesh.size("tp"), mesh.size("cp_ulysses"), mesh.size("ep"))
    if part is not None:
        model.keep_part(part)
    apply_tp(model, mesh)
    model.tie()  # the head and the embedding were cut apart: one parameter again
    if mesh.size("tp") > 1 and model.norm is not None:  # the final norm runs inside the tp region, per
        retag(model.norm.weight, partial_over_tp=True)  # loss chunk, through this rank's vocabulary shard
    apply_ep(model, mesh)
    apply_sequence_parallel(model, mesh)
    bind(model, mesh)
    return model


def apply_tp(module: nn.Module, mesh: ParallelMesh) -> None:
    """Cut every tensor-parallel layer of `module` over tp; mark the MoH routers partial over tp
    (each tp rank differentiates only its own heads' gates)."""
    tp = mesh.size("tp")
    for m in list(module.modules()):
        if isinstance(m, TP_LAYERS):
            m.shard_over(mesh)
        if isinstance(m, HeadRouter) and tp > 1:
            for p in m.parameters():
                retag(p, partial_over_tp=True)


def apply_ep(module: nn.Module, mesh: ParallelMesh) -> None:
    """Keep this rank's experts of every expert stack in `module`."""
    for m in module.modules():
        if isinstance(m, Experts):
            m.shard_over(mesh)


def apply_sequence_parallel(module: nn.Module, mesh: ParallelMesh) -> None:
    """Under TP sequence parallel, every parameter not cut over tp gets a partial gradient."""
    if not mesh.sequence_parallel:
        return
    for p in module.parameters():
        s = sharding_of(p)
        if not (s.sharded and s.axis == "tp"):
            retag(p, partial_over_tp=True)


def bind(module: nn.Module, mesh: ParallelMesh) -> None:
    """Give every layer of `module` that communicates (it holds a `mesh`) this one."""
    for m in module.modules():
        if "mesh" in vars(m):
            m.mesh = mesh
