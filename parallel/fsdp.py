"""ZeRO-3 on FSDP2: every decoder block's parameters sharded over their replicas.

`shard_blocks` applies `fully_shard` to each block over the data x sequence-parallel mesh
(`dp_cp`) and, inside MoE blocks, to the expert stacks over the expert-data-parallel mesh
(`edp`): FSDP2 all-gathers a block's parameters for its forward and its backward and
reduce-scatters its gradients (summed: gloo has no averaging reduction). Under it the tensor-
and expert-parallel layers keep their own plain-tensor shards and collectives: FSDP's chunk of
a parameter is a `torch.chunk` along dim 0 of this rank's tp (or ep) slice, the same rule as
`sharding.ZeroSlice`, so the checkpoint views it with the same nested placements as ZeRO-1/2.
The embedding, the final norm and the head stay outside FSDP (ZeRO-2: chunked moments and
gradients): the chunked loss reads the head's weight outside the head's forward, where FSDP's
all-gather hooks would not run.
"""

from __future__ import annotations

import torch
from torch import nn

from .comm import CommStats, nbytes
from .sharding import fsdp_slice, is_sharded, retag, shard, sharding_of


def shard_blocks(model: nn.Module, mesh, param_dtype: torch.dtype | None = None) -> None:
    """`fully_shard` each block (over dp_cp) and each expert stack (over edp) of `model`;
    every rank calls it alike (building meshes and sharding are collectives). `param_dtype`
    (bf16 training): FSDP2's mixed-precision policy gathers the blocks' parameters in that
    dtype for compute (half the all-gather bytes) while the sharded fp32 parameters stay the
    master copy, and reduces gradients in fp32."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    # inputs are left alone: autocast casts what the matmuls take, and FSDP's input cast would
    # rebuild the attention plan (a dataclass) field by field, its CommStats included
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if param_dtype else MixedPrecisionPolicy()

    described = {n: sharding_of(p) for n, p in model.named_parameters()}
    # Every block is its own FSDP root (the model around them is not sharded), and FSDP keeps a
    # root's parameters gathered from its forward to its backward unless told otherwise: that
    # would hold every block whole through the step. Each reshards after its forward instead.
    for block in model.layers:
        if getattr(block, "moe", False) and mesh.size("edp") > 1:
            fully_shard(block.mlp.experts, mesh=mesh.device_mesh("edp")["edp"], reshard_after_forward=True,
                        mp_policy=policy)
        if mesh.size("dp_cp") > 1:
            fully_shard(block, mesh=mesh.device_mesh("dp_cp")["dp_cp"], reshard_after_forward=True, mp_policy=policy)
    gather, scatter = counted_comms(mesh.stats)
    for m in model.modules():
        if isinstance(m, FSDPModule):  # sums, as the rest of the gradient sync (gloo cannot average)
            m.set_force_sum_reduction_for_comms(True)
            m.set_gradient_divide_factor(1.0)
            m.set_custom_all_gather(gather)
            m.set_custom_reduce_scatter(scatter)
    for n, p in model.named_parameters():  # FSDP made new parameters: carry their descriptions over,
        shard(p, described[n])  # with the chunk FSDP gave each
        if is_sharded(p):
            retag(p, chunk=fsdp_slice(p))


def counted_comms(stats: CommStats | None):
    """FSDP's own all-gather and reduce-scatter, with their bytes recorded under `fsdp` in
    `stats` (as `comm` counts its collectives: an all-gather sends the input to p-1 ranks, a
    reduce-scatter (p-1)/p of its input), through FSDP2's custom-collective hooks; the
    collectives themselves are FSDP's defaults."""
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

    class CountedAllGather(DefaultAllGather):
        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            if stats is not None:
                stats.record("fsdp", nbytes(input_tensor) * (group.size() - 1))
            return super().__call__(output_tensor, input_tensor, group, async_op)

    class CountedReduceScatter(DefaultReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            if stats is not None:
                p = group.size()
                stats.record("fsdp", nbytes(input_tensor) * (p - 1) // p)
            return super().__call__(output_tensor, input_tensor, group, op, async_op)

    return CountedAllGather(), CountedReduceScatter()
