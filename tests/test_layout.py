"""One layout object and one description of where each parameter lives.

`ParallelMesh` answers every group's size and this rank's place in it from the degrees alone,
the same numbers its process groups have; a layout built without groups (`planned`) lays out
exactly the model a running rank builds, and refuses to communicate. Each parameter's
`Sharding` names axes (never groups), and records the chunk ZeRO or FSDP gave it and the tied
copy a pipeline keeps."""

from __future__ import annotations

import pytest
import torch

from longtrain.data.loader import PackedLoader
from longtrain.data.prepare import prepare
from longtrain.models.config import ModelConfig
from longtrain.models.parallelize import parallelize
from longtrain.models.transformer import LongLM, Part, build_model
from longtrain.parallel.comm import group_rank, group_size
from longtrain.parallel.mesh import GROUPS, ParallelDims, ParallelMesh
from longtrain.parallel.sharding import is_sharded, sharding_of, tied_name
from longtrain.train.trainer import Trainer
from tests.dist import mesh_for
from tests.test_trainer import _cfg

LAYOUTS = [ParallelDims(), ParallelDims(tp=2, dp=2, cp_ring=2, ep=4), ParallelDims(pp=3, cp_ulysses=2, dp=2, ep=2),
           ParallelDims(pp=2, tp=2, dp=3), ParallelDims(dp=2, cp_ring=3, cp_ulysses=2, ep=3)]
TIED_MOE = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, tie_embeddings=True,
                qkv_bias=True, moe=dict(num_experts=4, top_k=2, every=2, shared_expert=True),
                moh=dict(shared_heads=1, top_k=2))


@pytest.mark.parametrize("dims", LAYOUTS, ids=lambda d: "x".join(f"{a}{v}" for a, v in vars(d).items() if isinstance(v, int) and v > 1) or "one")
def test_places_follow_the_rank_lists(dims):
    """Every group's size and every rank's place in it, from the rank lists the groups are made of."""
    for name in GROUPS:
        lists = dims.rank_lists(name)
        for rank in range(dims.world_size):
            mesh = ParallelMesh.planned(dims, rank)
            mine = [ranks for ranks in lists if rank in ranks]
            assert len(mine) <= 1, (name, rank)
            assert mesh.size(name) == (len(mine[0]) if mine else 1), (name, rank)
            assert mesh.index(name) == (mine[0].index(rank) if mine else 0), (name, rank)


def _group_places(degrees):
    mesh = mesh_for(**degrees)
    return {name: (group_size(mesh.group(name)), group_rank(mesh.group(name)), mesh.size(name), mesh.index(name))
            for name in GROUPS}


@pytest.mark.parametrize("degrees", [dict(dp=2, cp_ring=2, ep=2), dict(tp=2, cp_ulysses=2), dict(pp=2, tp=2),
                                     dict(pp=4)], ids=str)
def test_places_are_those_of_the_process_groups(pool4, degrees):
    for places in pool4.run(_group_places, degrees):
        for name, (size, rank, want_size, want_rank) in places.items():
            assert (size, rank) == (want_size, want_rank), name


def test_a_planned_layout_lays_out_but_cannot_communicate():
    mesh = ParallelMesh.planned(ParallelDims(tp=2, dp=2), rank=3)
    assert mesh.group("pp") is None and mesh.size("tp") == 2 and mesh.index("tp") == 1
    with pytest.raises(RuntimeError, match="without process groups"):
        mesh.group("tp")
    with pytest.raises(KeyError, match="no group 'sp'"):
        mesh.group("sp")
    one = ParallelMesh.single()
    assert all(one.group(name) is None and one.size(name) == 1 for name in GROUPS)


def _descriptions(degrees):
    """On each rank: the rank's model on its real layout against the same rank's on a planned
    layout (meta device): names, local shapes and `Sharding`s."""
    mesh = mesh_for(**degrees)
    pp = mesh.coord("pp")
    part = Part((pp,), first=pp == 0, last=pp == mesh.size("pp") - 1) if mesh.size("pp") > 1 else None
    cfg = ModelConfig(**TIED_MOE)
    real = build_model(cfg, mesh, part=part)
    with torch.device("meta"):
        planned = parallelize(LongLM(cfg), ParallelMesh.planned(mesh.dims, mesh.rank,
                                                                sequence_parallel=mesh.sequence_parallel), part)
    mine = {n: (tuple(p.shape), sharding_of(p), tied_name(n, p)) for n, p in real.named_parameters()}
    laid = {n: (tuple(p.shape), sharding_of(p), tied_name(n, p)) for n, p in planned.named_parameters()}
    return mine == laid, sorted(mine), {n: v[2] for n, v in mine.items() if v[2] != n}


@pytest.mark.parametrize("degrees", [dict(tp=2, dp=2, ep=2), dict(pp=2, tp=2)], ids=str)
def test_a_planned_layout_builds_what_a_rank_builds(pool4, degrees):
    for same, names, copies in pool4.run(_descriptions, degrees):
        assert same and names
        if "pp" in degrees:  # the tied embedding split over two stages: the head stands for it
            assert copies == ({"head.weight": "embed.weight"} if "head.weight" in names else {})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("layoutdata")
    prepare(["stdlib"], str(out), limit_bytes=100_000)
    return str(out)


def _chunks(data_dir, degrees, stage):
    """Each parameter's recorded chunk against the optimizer's: (name, replica axis, chunk axis,
    parts, dim, FSDP-managed) for every parameter; fails if the two disagree."""
    mesh = mesh_for(**degrees)
    loader = PackedLoader(data_dir, seq_len=64, batch_size=1, dp_rank=mesh.coord("dp"), dp_size=mesh.size("dp"))
    t = Trainer(_cfg(model=dict(TIED_MOE, vocab_size=320, tie_embeddings=False), optim={"zero": stage}), mesh, loader)
    out = []
    for n, p in t.model.named_parameters():
        s = sharding_of(p)
        assert s.chunk is t.opt.slices.get(p), n
        out.append((n, s.replicas, None if s.chunk is None else s.chunk.axis,
                    None if s.chunk is None else s.chunk.parts, None if s.chunk is None else s.chunk.dim, is_sharded(p)))
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_and_fsdp_record_each_chunk_on_the_parameter(data_dir, pool4, stage):
    for rows in pool4.run(_chunks, data_dir, dict(dp=4, ep=2), stage):
        for name, replicas, axis, parts, dim, fsdp in rows:
            assert axis == replicas and parts == (2 if replicas == "edp" else 4), name
            in_blocks = name.startswith("layers.") and (replicas == "edp" or ".mlp.experts." not in name)
            assert fsdp == (stage == 3 and in_blocks), name
            assert not fsdp or dim == 0, name  # FSDP2 shards dim 0
