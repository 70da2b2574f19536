"""ZeRO-1/2 and overlapped gradient buckets: the same training as one process, a quarter of the
optimizer state at four replicas, and checkpoints that move between ZeRO and plain layouts."""

from __future__ import annotations

import pytest
import torch

from longtrain.data.loader import PackedLoader
from longtrain.data.prepare import prepare
from longtrain.checkpoint import store as ckpt
from longtrain.train.trainer import Trainer
from longtrain.parallel.sharding import local
from longtrain.parallel.sharding import full_tensor
from longtrain.parallel.mesh import ParallelDims, ParallelMesh
from longtrain.parallel.sharding import ZeroSlice
from tests.dist import mesh_for
from tests.test_trainer import _cfg

# no dimension of most weights divides by 4: ZeRO chunks over 4 replicas are uneven
UNEVEN = dict(dim=70, n_heads=5, n_kv_heads=1, ffn_hidden=90)
MOE = dict(moe=dict(num_experts=4, top_k=2, every=1))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("zerodata")
    prepare(["stdlib"], str(out), limit_bytes=200_000)
    return str(out)


@pytest.mark.parametrize("shape,parts", [((10, 3), 4), ((3,), 4), ((7, 5, 2), 3), ((8, 6), 4), ((1,), 2)])
def test_zero_slice_pack_roundtrip(shape, parts):
    t = torch.randn(shape)
    rows = None
    for r in range(parts):
        z = ZeroSlice(shape, _dim(shape, parts), parts, r, "dp_cp")
        packed = z.pack(t)
        assert packed.shape == (parts, z.packed)
        mine = z.unpack_mine(packed[r])
        assert torch.equal(mine, z.view(t)) and torch.equal(z.pack_mine(z.view(t)), packed[r])
        chunks = t.chunk(parts, z.dim)  # DTensor's Shard rule; trailing ranks may hold nothing
        assert torch.equal(mine, chunks[r]) if r < len(chunks) else mine.numel() == 0
        rows = packed
    out = torch.empty_like(t)
    z.unpack_all(rows, out)
    assert torch.equal(out, t)


def _dim(shape, parts):
    even = [d for d, n in enumerate(shape) if n >= parts and n % parts == 0]
    return even[0] if even else max(range(len(shape)), key=lambda d: shape[d])


def _model_params() -> dict:
    from longtrain.models.config import ModelConfig
    from longtrain.models.transformer import LongLM
    from tests.test_trainer import MODEL

    with torch.device("meta"):
        return dict(LongLM(ModelConfig(**MODEL)).named_parameters())


def test_device_grid_matches_the_groups():
    dims = ParallelDims(pp=2, dp=2, cp_ring=2, tp=2, ep=2)
    rows = lambda g: sorted(map(sorted, g.reshape(-1, g.shape[-1]).tolist()))  # noqa: E731
    assert rows(dims.device_grid("tp")) == sorted(dims.axis_groups("tp"))
    assert rows(dims.device_grid("dp_cp")) == sorted(dims.axis_groups("dp", "cp_ring", "cp_ulysses"))
    assert rows(dims.device_grid("ep")) == sorted(dims.ep_groups())
    assert rows(dims.device_grid("edp")) == sorted(dims.edp_groups())
    g = dims.device_grid("tp", "dp_cp")  # [rest, tp, dp_cp]: tp rows and dp_cp rows of one block
    assert g.shape == (2, 2, 4) and sorted(g[0, :, 0].tolist()) in dims.axis_groups("tp")


def _train(data_dir, degrees, cfg_kw, steps, root=None, save_at=None, resume=False):
    """(losses, full parameters, optimizer state bytes on this rank)."""
    mesh = mesh_for(**degrees) if degrees else ParallelMesh.single()
    dp = mesh.size("dp")
    rank = mesh.coord("dp")
    loader = PackedLoader(data_dir, seq_len=64, batch_size=4 // dp, seed=3, dp_rank=rank, dp_size=dp)
    t = Trainer(_cfg(steps=8, **cfg_kw), mesh, loader)
    if resume:
        extra = ckpt.load(ckpt.latest_valid(root), t.model, t.opt, mesh)
        t.step = extra["step"]
        t.loader.load_state_dict(extra["loader"])
    losses = []
    for _ in range(steps):
        losses.append(t.train_step().loss)
        if t.step == save_at:
            ckpt.save(root, t.step, t.model, t.opt, mesh, {"step": t.step, "loader": t.loader.state_dict()})
    params = {n: full_tensor(p, t.mesh) for n, p in t.model.named_parameters()}
    state = sum(local(v).numel() * v.element_size() for st in t.opt.state.values() for v in st.values()
                if torch.is_tensor(v) and v.dim())
    held = sum(local(p).numel() * p.element_size() for p in t.model.parameters())
    return losses, params, state, held


def _close(got, want, plain):
    """Losses as one process's; parameters as the same layout's without ZeRO, to well under one
    AdamW step (lr 3e-3 per element: a chunk updated or gathered wrongly is off by that much).
    Not to one process's: AdamW's first steps turn reduction-order noise in tiny gradients into
    whole steps of lr, on any layout."""
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    for n, p in plain[1].items():
        assert abs(got[1][n] - p).max() <= 3e-5, n


CASES = [
    ("dp2 x tp2, ZeRO-1", dict(dp=2, tp=2), dict(optim={"zero": 1}), {}),
    ("dp2 x tp2, ZeRO-2", dict(dp=2, tp=2), dict(optim={"zero": 2}), {}),
    ("dp4, ZeRO-2, uneven chunks", dict(dp=4), dict(optim={"zero": 2}), UNEVEN),
    ("dp2 x ring2, ZeRO-2, grad_accum 2", dict(dp=2, cp_ring=2), dict(optim={"zero": 2}, grad_accum=2), {}),
    ("dp4 x ep2 MoE, ZeRO-2", dict(dp=4, ep=2), dict(optim={"zero": 2}), MOE),
    ("dp2 x tp2, ZeRO-3", dict(dp=2, tp=2), dict(optim={"zero": 3}), {}),
    ("dp4, ZeRO-3, uneven chunks", dict(dp=4), dict(optim={"zero": 3}), UNEVEN),
    ("dp4 x ep2 MoE, ZeRO-3", dict(dp=4, ep=2), dict(optim={"zero": 3}), MOE),
    ("dp2 x ring2, ZeRO-3, full checkpointing, grad_accum 2", dict(dp=2, cp_ring=2),
     dict(optim={"zero": 3}, grad_accum=2), {"checkpoint": "full"}),
]


@pytest.mark.parametrize("name,degrees,kw,model", CASES, ids=[c[0] for c in CASES])
def test_zero_matches_one_process(data_dir, pool4, name, degrees, kw, model):
    accum = kw.get("grad_accum", 1)
    ref = _train(data_dir, None, dict(model=model, grad_accum=accum), 3)
    plain = pool4.run(_train, data_dir, degrees, dict(model=model, grad_accum=accum), 3)
    for got, same in zip(pool4.run(_train, data_dir, degrees, dict(kw, model=model), 3), plain):
        _close(got, ref, same)


def test_zero_quarters_optimizer_state_and_overlap_changes_nothing(data_dir, pool4):
    plain = pool4.run(_train, data_dir, dict(dp=4), dict(optim={"overlap_grad_reduce": False}), 2)
    overlapped = pool4.run(_train, data_dir, dict(dp=4), {}, 2)
    zero1 = pool4.run(_train, data_dir, dict(dp=4), dict(optim={"zero": 1}), 2)
    zero3 = pool4.run(_train, data_dir, dict(dp=4), dict(optim={"zero": 3}), 2)
    blocks = sum(p.numel() * 4 for n, p in _model_params().items() if n.startswith("layers."))
    for a, b in zip(plain, overlapped):
        assert a[0] == b[0]  # the same buckets summed: identical, whether started early or not
    for a, z, z3 in zip(plain, zero1, zero3):
        assert z[2] == pytest.approx(a[2] / 4, rel=0.02)  # MODEL's dims all divide by 4
        assert z[0] == pytest.approx(a[0], rel=1e-5) and z3[0] == pytest.approx(a[0], rel=1e-5)
        assert z3[2] == pytest.approx(a[2] / 4, rel=0.02)
        assert z3[3] == pytest.approx(a[3] - blocks * 3 / 4, rel=0.01)  # the blocks' parameters: a quarter each


def test_checkpoints_move_between_zero_and_plain_layouts(data_dir, tmp_path, pool4):
    root = str(tmp_path / "zero2")
    full = pool4.run(_train, data_dir, dict(dp=4), dict(optim={"zero": 2}, model=UNEVEN), 4, root, 2)[0][0]
    same = pool4.run(_train, data_dir, dict(dp=4), dict(optim={"zero": 2}, model=UNEVEN), 2, root, resume=True)
    assert same[0][0] == full[2:]
    plain = pool4.run(_train, data_dir, dict(dp=2, cp_ring=2), dict(model=UNEVEN), 2, root, resume=True)
    assert plain[0][0] == pytest.approx(full[2:], rel=1e-5)
    single = _train(data_dir, None, dict(model=UNEVEN), 2, root, resume=True)
    assert single[0] == pytest.approx(full[2:], rel=1e-5)
    root3 = str(tmp_path / "zero3")  # ZeRO-3 (FSDP) checkpoints: the same global view
    full = pool4.run(_train, data_dir, dict(dp=2, tp=2), dict(optim={"zero": 3}), 4, root3, 2)[0][0]
    for resumed in pool4.run(_train, data_dir, dict(dp=4), dict(optim={"zero": 3}), 2, root3, resume=True):
        assert resumed[0] == pytest.approx(full[2:], rel=1e-5)
    assert _train(data_dir, None, {}, 2, root3, resume=True)[0] == pytest.approx(full[2:], rel=1e-5)
    back = str(tmp_path / "plain")  # and from a plain checkpoint into ZeRO
    full = pool4.run(_train, data_dir, dict(tp=2, cp_ring=2), {}, 4, back, 2)[0][0]
    for resumed in pool4.run(_train, data_dir, dict(dp=2, tp=2), dict(optim={"zero": 1}), 2, back, resume=True):
        assert resumed[0] == pytest.approx(full[2:], rel=1e-5)
