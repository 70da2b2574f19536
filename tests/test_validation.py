"""Invalid layouts and inputs raise a clear error on every rank, before any data collective."""

import pytest
import torch

from longtrain.parallel import LayoutError, ParallelDims
from longtrain.parallel.attention import sequence_parallel_attention, shard_sequence
from tests.dist import mesh_for


def test_parallel_dims_validation():
    with pytest.raises(LayoutError, match="positive integer"):
        ParallelDims(tp=0)
    with pytest.raises(LayoutError, match="ep=3 must divide"):
        ParallelDims(dp=2, cp_ring=2, ep=3)
    dims = ParallelDims(dp=2, tp=2)
    with pytest.raises(LayoutError, match="needs 4 ranks but the job has 8"):
        dims.check_world_size(8)


def test_rank_order_tp_innermost():
    dims = ParallelDims(dp=2, cp_ring=2, cp_ulysses=2, tp=2)
    assert dims.axis_groups("tp")[0] == [0, 1]
    assert dims.axis_groups("cp_ulysses")[0] == [0, 2]
    assert dims.axis_groups("cp_ring")[0] == [0, 4]
    assert dims.axis_groups("dp")[0] == [0, 8]
    assert dims.coords(13) == {"pp": 0, "dp": 1, "cp_ring": 1, "cp_ulysses": 0, "tp": 1}
    assert ParallelDims(dp=2, cp_ring=2, ep=4).ep_groups() == [[0, 1, 2, 3]]
    assert ParallelDims(dp=2, cp_ring=2, ep=2, tp=2).ep_groups() == [[0, 2], [4, 6], [1, 3], [5, 7]]


def bad_case(kind):
    mesh = mesh_for(cp_ring=2, cp_ulysses=2)
    rank = torch.distributed.get_rank()
    h, s = 4, 8
    if kind == "heads":
        h = 3  # not divisible by cp_ulysses=2
    if kind == "mismatch":
        s = 8 if rank != 3 else 16
    if kind == "seq":
        return shard_sequence(torch.zeros(1, 20, 4, 8), mesh)
    q = torch.zeros(1, s, h, 8)
    return sequence_parallel_attention(q, q, q, mesh)


@pytest.mark.parametrize("kind,match", [
    ("heads", "not divisible by cp_ulysses=2"),
    ("mismatch", "ranks disagree"),
    ("seq", "must be divisible by 8"),
])
def test_bad_input_raises_on_all_ranks(pool4, kind, match):
    with pytest.raises(RuntimeError, match=match):
        pool4.run(bad_case, kind, timeout=60)
    # the pool is still usable (nobody hung in a collective)
    assert pool4.run(torch.distributed.get_world_size) == [4, 4, 4, 4]


def wrong_world():
    from longtrain.parallel import build_mesh

    return build_mesh(ParallelDims(cp_ring=2, tp=4))


def test_build_mesh_rejects_wrong_world_size(pool4):
    with pytest.raises(RuntimeError, match="needs 8 ranks but the job has 4"):
        pool4.run(wrong_world, timeout=60)
