"""Pipeline parallelism: every schedule and every axis composed with pp trains as one process
does (losses and full gradients), and wrong pipeline layouts are refused before any rank starts."""

from __future__ import annotations

import pytest
import torch

from longtrain.data.loader import PackedLoader
from longtrain.data.prepare import prepare
from longtrain.checkpoint import store as ckpt
from longtrain.train.trainer import Trainer
from longtrain.parallel.sharding import full_tensor
from longtrain.parallel.pipeline import split_layers
from longtrain.parallel.mesh import ParallelMesh
from tests.dist import mesh_for
from tests.test_trainer import _cfg

MODEL4 = dict(n_layers=4)
MOE = dict(n_layers=4, moe=dict(num_experts=4, top_k=2, every=1))
MOH = dict(n_layers=4, moh=dict(shared_heads=1, top_k=2))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppdata")
    prepare(["stdlib"], str(out), limit_bytes=200_000)
    return str(out)


def _train(data_dir, degrees, cfg_kw, steps, batch=4, root=None, save_at=None, resume=False):
    """(losses, {name: full gradient of the first step} for the parameters this rank holds,
    eval row). `batch`: sequences per step over the whole job, split over dp and grad_accum.
    With `root`: save at step `save_at`, or first resume from its newest checkpoint."""
    from longtrain.train.run import evaluate, held_out_loader

    mesh = mesh_for(**degrees) if degrees else ParallelMesh.single()
    dp = mesh.size("dp")
    accum = cfg_kw.get("grad_accum", 1)
    kw = dict(cfg_kw, optim={"lr": 3e-3, "warmup_steps": 2, "grad_clip": 0.0, **cfg_kw.get("optim", {})},
              data={"seq_len": 64}, parallel=degrees or {})
    cfg = _cfg(steps=8, **kw)
    rank = mesh.coord("dp")
    loader = PackedLoader(data_dir, seq_len=64, batch_size=batch // dp // accum, seed=3, dp_rank=rank, dp_size=dp,
                          accum=accum)
    t = Trainer(cfg, mesh, loader)
    if resume:
        extra = ckpt.load(ckpt.latest_valid(root), t.model, t.opt, mesh)
        t.step = extra["step"]
        t.loader.load_state_dict(extra["loader"])
    grads = {}
    step = t.opt.step

    def capture(*args):
        if not grads:
            reduced = args[0] if args else {p: p.grad for p in t.model.parameters()}
            grads.update({n: full_tensor(p, t.mesh, _whole(t.opt, p, reduced[p])).clone() for n, p in t.model.named_parameters()
                          if reduced.get(p) is not None})
        return step(*args)

    t.opt.step = capture
    losses, norms = [], []
    for _ in range(steps):
        r = t.train_step()
        losses.append(r.loss)
        norms.append(r.grad_norm)
        if t.step == save_at:
            ckpt.save(root, t.step, t.model, t.opt, mesh, {"step": t.step, "loader": t.loader.state_dict()})
    from dataclasses import replace

    cfg_eval = replace(cfg, data=replace(cfg.data, path=data_dir, seq_len=64, batch_size=2 // dp))
    row = evaluate(t, held_out_loader(cfg_eval, mesh), 2)
    return losses, grads, dict(row, grad_norms=norms)


def _whole(opt, p, g):
    """`p`'s reduced gradient whole on this rank: under ZeRO-2/3 each rank holds its chunk only,
    so the chunks are all-gathered over the replica group (as the parameters are after a step)."""
    z = getattr(opt, "slices", {}).get(p)
    if z is None or getattr(opt, "stage", 0) < 2:
        return g
    from longtrain.parallel.comm import all_gather_cat

    out = torch.empty(z.shape, dtype=g.dtype)
    z.unpack_all(all_gather_cat(z.pack_mine(g), opt.mesh.group(z.axis), 0).view(z.parts, -1), out)
    return out


def _check(results, ref, tol=1e-5):
    grads = {}
    for losses, g, row in results:
        assert losses == pytest.approx(ref[0], rel=tol)
        assert row["eval_loss"] == pytest.approx(ref[2]["eval_loss"], rel=1e-4)
        assert row["grad_norms"][0] == pytest.approx(ref[2]["grad_norms"][0], rel=1e-5)  # spans every stage
        grads.update(g)
    if "head.weight" in grads and "head.weight" not in ref[1]:  # tied: the last stage's copy of the embedding
        assert (torch.as_tensor(grads.pop("head.weight")) - torch.as_tensor(grads["embed.weight"])).abs().max() == 0
    assert set(grads) == set(ref[1])  # the stages together hold every parameter
    for n, want in ref[1].items():
        got = torch.as_tensor(grads[n])
        assert (got - want).abs().max() <= tol * max(want.abs().max(), 1e-6), n


CASES = [
    ("pp2 1f1b", dict(pp=2), dict(grad_accum=2), MODEL4),
    ("pp2 gpipe", dict(pp=2), dict(grad_accum=2, pipeline={"schedule": "gpipe"}), MODEL4),
    ("pp2 interleaved", dict(pp=2), dict(grad_accum=2, pipeline={"schedule": "interleaved", "virtual_stages": 2}),
     MODEL4),
    ("pp2 zero bubble", dict(pp=2), dict(grad_accum=2, pipeline={"schedule": "zero_bubble", "virtual_stages": 2}),
     MODEL4),
    ("pp2 uneven split", dict(pp=2), dict(grad_accum=4, pipeline={"split": [3, 1]}), MODEL4),
    ("pp2 x tp2", dict(pp=2, tp=2), dict(grad_accum=2), MODEL4),
    ("pp2 x ring2", dict(pp=2, cp_ring=2), dict(grad_accum=2), MODEL4),
    ("pp2 x ulysses2", dict(pp=2, cp_ulysses=2), dict(grad_accum=2), MODEL4),
    ("pp2 x dp2", dict(pp=2, dp=2), dict(grad_accum=2), MODEL4),
    ("pp2 x ep2 MoE", dict(pp=2, dp=2, ep=2), dict(grad_accum=2), MOE),
    ("pp2 x tp2 MoH", dict(pp=2, tp=2), dict(grad_accum=2), MOH),
    ("pp2 tied embeddings", dict(pp=2), dict(grad_accum=2), dict(n_layers=4, tie_embeddings=True)),
    ("pp2 interleaved x tp2 tied embeddings, ZeRO-2", dict(pp=2, tp=2),
     dict(grad_accum=2, optim={"zero": 2}, pipeline={"schedule": "interleaved", "virtual_stages": 2}),
     dict(n_layers=4, tie_embeddings=True)),
    ("pp2 act-quant + selective checkpointing", dict(pp=2), dict(grad_accum=2),
     dict(n_layers=4, checkpoint="selective", act_quant={"dtype": "int8"})),
]


@pytest.mark.parametrize("name,degrees,kw,model", CASES, ids=[c[0] for c in CASES])
def test_pipeline_matches_one_process(data_dir, request, name, degrees, kw, model):
    from longtrain.parallel.mesh import ParallelDims

    pool = request.getfixturevalue(f"pool{ParallelDims(**degrees).world_size}")
    # one process with the same micro-batches: accumulating them is a different sum than one
    # batch, which AdamW's early steps amplify to ~1e-5 of the loss by step 3 (MoE, MoH)
    ref = _train(data_dir, None, {"model": model, "grad_accum": kw["grad_accum"]}, 3)
    _check(pool.run(_train, data_dir, degrees, dict(kw, model=model), 3), ref)


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_pipeline_with_zero(data_dir, pool4, zero):
    """Losses and full gradients (ZeRO-2/3's chunks gathered) as one process's."""
    ref = _train(data_dir, None, {"model": MODEL4, "grad_accum": 2}, 3)
    _check(pool4.run(_train, data_dir, dict(pp=2, dp=2), dict(grad_accum=2, model=MODEL4, optim={"zero": zero}), 3),
           ref)


def test_checkpoints_move_between_pipeline_layouts(data_dir, tmp_path, pool2, pool4):
    """Saved on pp2 x tp2, resumed on pp1 (ring2 x dp2), pp2 interleaved x ZeRO-2 and one
    process; saved on one process, resumed on pp2 x ulysses2 and pp4: the losses continue as
    the run's own."""
    root = str(tmp_path / "pp")
    kw = dict(grad_accum=2, model=MODEL4)
    full = pool4.run(_train, data_dir, dict(pp=2, tp=2), kw, 4, 4, root, 2)[0][0]
    for degrees, extra, pool in [(dict(dp=2, cp_ring=2), {}, pool4),
                                 (dict(pp=2, dp=2), dict(optim={"zero": 2}, pipeline={"schedule": "interleaved",
                                                                                     "virtual_stages": 2}), pool4),
                                 (dict(pp=2), {}, pool2)]:
        for losses, _, _ in pool.run(_train, data_dir, degrees, dict(kw, **extra), 2, 4, root, resume=True):
            assert losses == pytest.approx(full[2:], rel=1e-5), degrees
    single = _train(data_dir, None, kw, 2, 4, root, resume=True)[0]
    assert single == pytest.approx(full[2:], rel=1e-5)
    back = str(tmp_path / "one")
    full = _train(data_dir, None, kw, 4, 4, back, 2)[0]
    for losses, _, _ in pool4.run(_train, data_dir, dict(pp=2, cp_ulysses=2), kw, 2, 4, back, resume=True):
        assert losses == pytest.approx(full[2:], rel=1e-5)
    for losses, _, _ in pool4.run(_train, data_dir, dict(pp=4), dict(kw, grad_accum=4), 2, 4, back, resume=True):
        assert losses == pytest.approx(full[2:], rel=1e-5)  # pp1 -> pp4: four micro-batches of one
    tied = dict(grad_accum=2, model=dict(MODEL4, tie_embeddings=True))  # a tied embedding split over stages, and back
    root = str(tmp_path / "tied")
    full = pool4.run(_train, data_dir, dict(pp=2, tp=2), tied, 4, 4, root, 2)[0][0]
    assert _train(data_dir, None, tied, 2, 4, root, resume=True)[0] == pytest.approx(full[2:], rel=1e-5)
    back = str(tmp_path / "tied-one")
    full = _train(data_dir, None, tied, 4, 4, back, 2)[0]
    for losses, _, _ in pool2.run(_train, data_dir, dict(pp=2), tied, 2, 4, back, resume=True):
        assert losses == pytest.approx(full[2:], rel=1e-5)


def test_layers_per_stage():
    assert split_layers(5, 2) == [(0, 1, 2), (3, 4)]
    assert split_layers(4, 4) == [(0,), (1,), (2,), (3,)]
    assert split_layers(4, 2, [1, 3]) == [(0,), (1, 2, 3)]


@pytest.mark.parametrize("tree,match", [
    (dict(parallel={"pp": 2}, grad_accum=1), "grad_accum=1 micro-batches cannot fill 2"),
    (dict(parallel={"pp": 2}, grad_accum=2, pipeline={"schedule": "interleaved"}), "virtual_stages >= 2"),
    (dict(parallel={"pp": 2}, grad_accum=3, pipeline={"schedule": "interleaved", "virtual_stages": 2}),
     "multiple of pp=2"),
    (dict(parallel={"pp": 4}, grad_accum=4, model={"n_layers": 2}), "cannot fill 4 pipeline stages"),
    (dict(parallel={"pp": 2}, grad_accum=2, pipeline={"split": [2, 1]}), "summing to model.n_layers=2"),
    (dict(pipeline={"schedule": "zbv"}, parallel={"pp": 2}, grad_accum=2), "must be one of"),
])
def test_bad_pipeline_layouts_are_refused(tree, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**tree)


SLOW = [
    ("pp2 x tp2 x ring2", dict(pp=2, tp=2, cp_ring=2), dict(grad_accum=2), MODEL4),
    ("pp2 x dp2 x ulysses2, ZeRO-2", dict(pp=2, dp=2, cp_ulysses=2), dict(grad_accum=2, optim={"zero": 2}), MODEL4),
    ("pp2 x ep2 x tp2 MoE", dict(pp=2, dp=2, tp=2, ep=2), dict(grad_accum=2), MOE),
    ("pp2 interleaved x tp2 x dp2, ZeRO-1", dict(pp=2, tp=2, dp=2),
     dict(grad_accum=2, optim={"zero": 1}, pipeline={"schedule": "interleaved", "virtual_stages": 2}), MODEL4),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,degrees,kw,model", SLOW, ids=[c[0] for c in SLOW])
def test_pipeline_8_ranks(data_dir, name, degrees, kw, model):
    from tests.dist import RankPool

    ref = _train(data_dir, None, {"model": model, "grad_accum": kw["grad_accum"]}, 3)
    pool = RankPool(8)
    try:
        results = pool.run(_train, data_dir, degrees, dict(kw, model=model), 3)
    finally:
        pool.close()
    _check(results, ref)


def _mismatched(data_dir):
    """Rank 1 runs another schedule than rank 0 (a broken launcher): both must fail, naming it."""
    import torch.distributed as dist

    schedule = "gpipe" if dist.get_rank() == 1 else "1f1b"
    try:
        _train(data_dir, dict(pp=2), dict(grad_accum=2, model=MODEL4, pipeline={"schedule": schedule}), 1)
    except ValueError as e:
        return str(e)
    return "no error"


def test_mismatched_schedules_fail_with_a_message(data_dir, pool2):
    for said in pool2.run(_mismatched, data_dir):
        assert "pipeline schedule: ranks disagree" in said and "'schedule': 0" in said and "'schedule': 1" in said
