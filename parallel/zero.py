"""ZeRO: optimizer state (stage 1) and gradients (stage 2) sharded over a parameter's replicas.

A parameter is replicated over its replica group (data x sequence parallel for dense weights,
the expert-data-parallel group for experts: `Sharding.replicas`). Under ZeRO each of the R
replicas owns one `torch.chunk` of it along one dimension (`ZeroSlice`), keeps AdamW moments
for that chunk only and updates only it; after the step the chunks are all-gathered so every
replica holds the whole parameter again. Stage 2 also reduce-scatters the gradients (each rank
receives the sum of its own chunk only) instead of all-reducing them (`grads.GradSync`).

Chunks of each parameter along a dimension, not DeepSpeed's flat partition of all of them, so
every piece of optimizer state is a regular slice of the global tensor: the checkpoint saves it
as a DTensor (`placements`) and loads it into any other layout, with ZeRO or without.
Parameters stay fp32 (bf16 runs under autocast), so they are their own master copy: the chunk
the optimizer updates is a view of the parameter, and no second copy exists.
"""

from __future__ import annotations


import torch
from torch import nn

from .comm import CommStats, all_gather_cat
from .sharding import ZeroSlice, is_sharded, retag, sharding_of


def apply_zero(params: list[nn.Parameter], mesh) -> dict[nn.Parameter, ZeroSlice]:
    """Give each parameter its ZeRO chunk over its replica group (recorded on its `Sharding`;
    none where that group has one rank); FSDP's parameters keep the chunk FSDP gave them.
    Returns every parameter's chunk."""
    out = {}
    for p in params:
        s = sharding_of(p)
        if s.chunk is None and not is_sharded(p) and mesh.size(s.replicas) > 1:
            retag(p, chunk=ZeroSlice.of(tuple(p.shape), mesh, s.replicas))
        if sharding_of(p).chunk is not None:
            out[p] = sharding_of(p).chunk
    return out


def gather_params(slices: dict[nn.Parameter, ZeroSlice], mesh, bucket_bytes: int,
                  stats: CommStats | None = None) -> None:
    """After each rank updated its chunks: all-gather them so every replica holds whole
    parameters again (bucketed per replica group, in the same order on every rank)."""
    by_group: dict[str, list] = {}
    for p, z in slices.items():
        by_group.setdefault(z.axis, []).append((p, z))
    for axis, items in by_group.items():
        for bucket in _buckets(items, bucket_bytes):
            group, parts = mesh.group(axis), bucket[0][1].parts
            mine = torch.cat([z.pack_mine(z.view(p.detach())) for p, z in bucket])
            rows = all_gather_cat(mine, group, 0, stats).view(parts, -1)
            with torch.no_grad():
                for (p, z), part in zip(bucket, rows.split([z.packed for _, z in bucket], dim=1)):
                    z.unpack_all(part, p.data)


def _buckets(items: list, bucket_bytes: int) -> list[list]:
    out, size = [[]], 0
    for p, z in items:
        n = z.packed * z.parts * p.element_size()
        if out[-1] and (size + n > bucket_bytes or p.dtype != out[-1][0][0].dtype):
            out.append([])
            size = 0
        out[-1].append((p, z))
        size += n
    return [b for b in out if b]


class ZeroAdamW:
    """AdamW on this rank's chunk of every parameter (a view of it: the update lands in place),
    then an all-gather of the chunks (`gather_params`). `stage` 1: gradients arrive whole
    (all-reduced) and the chunk's is a view of them; stage 2: `GradSync` hands over each
    parameter's reduced chunk (`grads`). Parameters whose replica group has one rank are
    updated whole, as without ZeRO.

    Stage 3: parameters FSDP already shards (`fsdp.shard_blocks`: DTensors) are updated as they
    are, their chunk being FSDP's; the others as under stage 2. Every chunk is the one recorded
    on the parameter's `Sharding` (`apply_zero`).

    `param_groups` and `state` are the inner AdamW's (keyed by the chunk parameters);
    `chunks` maps each model parameter to its chunk parameter and `ZeroSlice`."""

    def __init__(self, param_groups: list[dict], mesh, stage: int, bucket_bytes: int, **adamw):
        if stage not in (1, 2, 3):
            raise ValueError(f"ZeRO stage {stage} must be 1, 2 or 3")
        self.stage, self.bucket_bytes, self.mesh = stage, bucket_bytes, mesh
        params = [p for g in param_groups for p in g["params"]]
        self.slices = apply_zero(params, mesh)
        self.fsdp = {p: z for p, z in self.slices.items() if is_sharded(p)}
        self.gathered = {p: z for p, z in self.slices.items() if p not in self.fsdp}  # all-gathered after a step
        self.chunks: dict[nn.Parameter, nn.Parameter] = {}
        groups = []
        for g in param_groups:
            own = []
            for p in g["params"]:
                z = self.slices.get(p)
                c = p if z is None or p in self.fsdp else nn.Parameter(z.view(p.data))  # shares p's storage
                self.chunks[p] = c
                own.append(c)
            groups.append({**g, "params": own})
        self.opt = torch.optim.AdamW(groups, **adamw)
        self.param_groups, self.state = self.opt.param_groups, self.opt.state

    def step(self, grads: dict[nn.Parameter, torch.Tensor]) -> None:
        """`grads`: each parameter's reduced gradient (whole, or its chunk under stage 2)."""
        for p, c in self.chunks.items():
            if p in self.fsdp:  # its gradient is FSDP's reduced DTensor already
                continue
            g = grads.get(p)
            z = self.slices.get(p)
            c.grad = None if g is None else (z.view(g) if z is not None and self.stage == 1 else g)
        self.opt.step()
        gather_params(self.gathered, self.mesh, self.bucket_bytes, self.mesh.stats)

    @property
    def chunked_grads(self) -> dict[nn.Parameter, ZeroSlice]:
        """Parameters whose reduced gradient is only this rank's chunk (stages 2 and 3)."""
        return self.slices if self.stage >= 2 else {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)
        for p in self.chunks:
            p.grad = None

    def named_chunks(self, model: nn.Module):
        """(name, model parameter, the parameter its optimizer state is keyed by) for each
        parameter; the state covers the chunk its `Sharding` records (all of it if none)."""
        for n, p in model.named_parameters():
            if p in self.chunks:
                yield n, p, self.chunks[p]
