"""What a checkpoint holds, as `checkpoint` saves and loads it: DTensor views of this rank's
parameters, persistent buffers and AdamW moments over their global shapes (so DCP reshards them
between layouts), this rank's own state, the layout and the caller's `extra` entry; and how a
loaded state is copied back into the model and the optimizer."""

from __future__ import annotations

import json

import torch

from longtrain.checkpoint.safe_dcp import UnsafeCheckpoint
from longtrain.parallel.sharding import is_sharded, local, sharding_of, tied_name


def _as_dtensor(t: torch.Tensor, p, mesh, chunked: bool = False):
    """`t` (this rank's part of `p`, or of its optimizer state) as a DTensor over the global
    shape: cut over `p`'s shard axis, then, where `t` is only this rank's chunk over the
    replicas (`chunked`: ZeRO's optimizer state; FSDP's parameters always), over those, both as
    `p`'s `Sharding` records; replicated over the rest. DTensor nests shards of one dim left to
    right, which is how the chunks were cut."""
    s = sharding_of(p)
    zero = s.chunk if chunked or is_sharded(p) else None
    t = local(t)
    axes, placements = [], []
    if s.sharded:
        axes.append(s.axis)
        placements.append(s.dim)
    if zero is not None:
        axes.append(s.replicas)
        placements.append(zero.dim)
    if not axes:
        return t
    from torch.distributed.tensor import DTensor, Replicate, Shard

    stride = torch.empty(s.full_shape, device="meta").stride()
    return DTensor.from_local(t, mesh.device_mesh(*axes), [Replicate(), *(Shard(d) for d in placements)],
                              run_check=False, shape=torch.Size(s.full_shape), stride=stride)


def _optim_entries(model, optimizer) -> list[tuple[str, object, object, bool]]:
    """(name, model parameter, the parameter the optimizer keys its state by, whether that state
    is only the chunk the parameter's `Sharding` records) for each parameter the optimizer updates."""
    if optimizer is None:
        return []
    if hasattr(optimizer, "named_chunks"):  # ZeRO: state belongs to this rank's chunk
        return [(tied_name(n, p), p, c, True) for n, p, c in optimizer.named_chunks(model)]
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return [(tied_name(n, p), p, p, False) for n, p in model.named_parameters() if id(p) in owned]


def _layout(mesh) -> dict:
    """The layout a checkpoint was written on (per-rank state is only valid on the same one)."""
    import dataclasses

    return dataclasses.asdict(mesh.dims)


def state_for_checkpoint(model, optimizer, mesh, extra: dict, stage: bool = False) -> dict:
    """The state to save or to load into: DTensor views of parameters, persistent buffers (router
    bias, ...: replicated unless tagged like a parameter) and AdamW moments; this rank's own
    state (running activation-quantization scales) under ``rank_state.rankN``. `stage`: copies
    in host memory instead of views, for a write that runs while training changes the originals."""
    tensors = model.state_dict(keep_vars=True)  # parameters and persistent buffers, with their tags

    def own_copy(t: torch.Tensor) -> torch.Tensor:  # this rank's part (FSDP: its local chunk)
        t = local(t.detach())
        return t.to("cpu", copy=True) if stage else t

    sd = {"model": {n: _as_dtensor(own_copy(t), t, mesh) for n, t in tensors.items()}}
    own = model.quant.state_dict() if hasattr(model, "quant") else {}
    if own:
        sd["rank_state"] = {f"rank{mesh.rank}": {k: own_copy(v) if torch.is_tensor(v) else v for k, v in own.items()}}
    sd["layout"] = json.dumps(_layout(mesh))
    optim = {}
    for name, p, key, chunked in _optim_entries(model, optimizer):
        st = optimizer.state.get(key)
        if not st:
            continue
        optim[name] = {k: (_as_dtensor(own_copy(v), p, mesh, chunked) if torch.is_tensor(v) and v.dim()
                           else own_copy(v) if torch.is_tensor(v) else v) for k, v in st.items()}
    sd["optim"] = optim
    sd["extra"] = json.dumps(extra)  # one opaque entry: loader position, step, anything JSON
    return sd


RANK_STATE_LIMIT = 1 << 20  # elements of one running scale ([groups]): far above any real model's


def _saved_rank_state(saved: dict, mesh, where) -> dict[str, torch.Tensor] | None:
    """Empty tensors to load this rank's own state (running activation-quantization scales,
    created lazily, so the model has none yet to compare with) into, from the checkpoint's
    metadata: each a small vector under a "layer.kind.slot" key, else refused."""
    import re

    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    prefix = f"rank_state.rank{mesh.rank}."
    mine = {}
    for k, m in saved.items():
        if not k.startswith(prefix):
            continue
        key = k[len(prefix):]
        if not re.fullmatch(r"\d+\.\w+\.\d+", key) or not isinstance(m, TensorStorageMetadata) \
                or len(m.size) > 1 or m.size.numel() > RANK_STATE_LIMIT:
            raise UnsafeCheckpoint(f"checkpoint {where}: {k} is not a running scale (a vector of at most "
                             f"{RANK_STATE_LIMIT} elements under 'layer.kind.slot'); refused before reading it")
        mine[key] = torch.empty(tuple(m.size), dtype=m.properties.dtype)
    return mine or None


def check_sizes(sd: dict, saved: dict, where) -> None:
    """Every tensor to load, against what the checkpoint's metadata `saved` declares for it:
    the same global shape, or UnsafeCheckpoint naming the tensor, before DCP allocates anything."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    flat, _ = flatten_state_dict(sd)
    for fqn, value in flat.items():
        entry = saved.get(fqn)
        if entry is None or not torch.is_tensor(value):
            continue  # missing: DCP names it; not a tensor: read as bytes
        if not isinstance(entry, TensorStorageMetadata) or tuple(entry.size) != tuple(value.shape):
            declared = tuple(entry.size) if isinstance(entry, TensorStorageMetadata) else "bytes"
            raise UnsafeCheckpoint(f"checkpoint {where}: {fqn} is {declared} there, {tuple(value.shape)} in this model; it "
                             "belongs to another model config: refused before reading it")


def state_to_load(saved: dict, model, optimizer, mesh, where="") -> dict:
    """The state to load into, given the checkpoint's metadata `saved`: what `state_for_checkpoint`
    saves, less what the caller does not want (no optimizer: weights only); every declared size
    checked first."""
    if optimizer is not None:
        _init_optimizer_state(optimizer)
    sd = state_for_checkpoint(model, optimizer, mesh, extra={})
    sd.pop("rank_state", None)
    if optimizer is None:
        del sd["optim"]
    else:
        own = _saved_rank_state(saved, mesh, where)
        if own is not None:
            sd["rank_state"] = {f"rank{mesh.rank}": own}
    check_sizes(sd, saved, where)
    return sd


def restore(sd: dict, model, optimizer, mesh, other_layout) -> dict:
    """Copy a loaded `state_to_load` into the model and the optimizer; returns its `extra`.
    Per-rank state is restored only on the layout it was written on (else `other_layout()` is
    called on rank 0)."""
    own = sd.get("rank_state", {}).get(f"rank{mesh.rank}")
    if own is not None:
        if json.loads(sd["layout"]) == _layout(mesh):
            model.quant.load_state_dict(own)
        elif mesh.rank == 0:
            other_layout()
    with torch.no_grad():
        for n, t in model.state_dict(keep_vars=True).items():
            src = sd["model"][n]
            local(t).copy_(src.to_local() if hasattr(src, "to_local") else src)
        keys = {n: key for n, _, key, _ in _optim_entries(model, optimizer)}
        for n, st in sd.get("optim", {}).items():
            target = optimizer.state[keys[n]]
            for k, v in st.items():
                v = v.to_local() if hasattr(v, "to_local") else v
                if torch.is_tensor(target.get(k)) and target[k].dim():
                    local(target[k]).copy_(v)
                else:
                    target[k] = v if torch.is_tensor(v) else torch.tensor(v)
    return json.loads(sd["extra"])


def _init_optimizer_state(optimizer) -> None:
    """Create AdamW's moments (zeros) so there is something to load into."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
