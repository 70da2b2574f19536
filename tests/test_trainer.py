"""The training step: the same global loss whatever the accumulation or layout, a falling loss,
the schedule, and the NaN policy."""

from __future__ import annotations

import math

import pytest
import torch

from longtrain.data.prepare import prepare
from longtrain.train.trainer import NonFiniteLoss, Trainer, lr_at
from longtrain.config.train import TrainConfig
from longtrain.config.loading import build
from longtrain.data.loader import PackedLoader
from longtrain.parallel.mesh import ParallelMesh
from tests.dist import mesh_for

MODEL = dict(vocab_size=258 + 62, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("stdlib")
    prepare(["stdlib"], str(out), limit_bytes=300_000)
    return str(out)


def _cfg(**kw) -> TrainConfig:
    tree = {"model": MODEL, "optim": {"lr": 3e-3, "warmup_steps": 2}, "steps": 6}
    for k, v in kw.items():
        tree[k] = {**tree.get(k, {}), **v} if isinstance(v, dict) else v
    return build(TrainConfig, tree)


def _run(data_dir, degrees, cfg_kw, batch, steps):
    cfg = _cfg(**cfg_kw)
    mesh = mesh_for(**degrees) if degrees else ParallelMesh.single()
    dp = mesh.size("dp")
    rank = mesh.coord("dp")
    loader = PackedLoader(data_dir, seq_len=64, batch_size=batch, seed=3, dp_rank=rank, dp_size=dp)
    trainer = Trainer(cfg, mesh, loader)
    return [trainer.train_step().loss for _ in range(steps)]


def test_loss_independent_of_accumulation_and_layout(data_dir, pool4):
    ref = _run(data_dir, None, {}, 4, 3)
    accum = _run(data_dir, None, {"grad_accum": 2}, 2, 3)
    assert accum == pytest.approx(ref, rel=1e-5)
    for losses in pool4.run(_run, data_dir, dict(dp=2, tp=2), {"grad_accum": 2}, 1, 3):
        assert losses == pytest.approx(ref, rel=1e-4)


def test_loss_falls(data_dir):
    losses = _run(data_dir, None, {"steps": 30}, 4, 30)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5


def test_schedule():
    cfg = _cfg(optim={"lr": 1.0, "warmup_steps": 10, "min_lr_ratio": 0.1}, steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_nan_policy(data_dir):
    cfg = _cfg(nan_policy="skip", max_nan_skips=1)
    trainer = Trainer(cfg, ParallelMesh.single(), PackedLoader(data_dir, seq_len=64, batch_size=2))
    with torch.no_grad():
        trainer.model.embed.weight[:, 0] = math.nan
    before = [p.detach().clone() for p in trainer.model.parameters()]
    assert trainer.train_step().skipped  # the optimizer did not step
    assert all(torch.allclose(a, b, equal_nan=True) for a, b in zip(before, trainer.model.parameters()))
    with pytest.raises(NonFiniteLoss, match="max_nan_skips=1"):
        trainer.train_step()
    strict = Trainer(_cfg(), ParallelMesh.single(), PackedLoader(data_dir, seq_len=64, batch_size=2))
    with torch.no_grad():
        strict.model.norm.weight.fill_(math.nan)
    with pytest.raises(NonFiniteLoss, match="non-finite"):
        strict.train_step()


def _bf16_run(data_dir, degrees):
    """Losses of 3 bf16-autocast steps, and the dtypes of parameters and AdamW moments."""
    losses = _run(data_dir, degrees, {"precision": "bf16"}, 2, 3)
    cfg = _cfg(precision="bf16")
    mesh = mesh_for(**degrees) if degrees else ParallelMesh.single()
    trainer = Trainer(cfg, mesh, PackedLoader(data_dir, seq_len=64, batch_size=2, seed=3))
    trainer.train_step()
    dtypes = {p.dtype for p in trainer.model.parameters()}
    dtypes |= {v.dtype for st in trainer.opt.state.values() for v in st.values() if v.dim()}
    return losses, sorted(str(d) for d in dtypes)


def test_bf16_autocast_keeps_fp32_master_weights(data_dir, pool4):
    """bf16 autocast: parameters and optimizer moments stay fp32; the losses follow fp32's
    closely, in one process and on tp2 x ring2 alike."""
    fp32 = _run(data_dir, None, {}, 2, 3)
    bf16, dtypes = _bf16_run(data_dir, None)
    assert dtypes == ["torch.float32"]
    assert bf16 == pytest.approx(fp32, rel=2e-2)
    assert bf16 != fp32  # autocast really ran in bf16
    for losses, dt in pool4.run(_bf16_run, data_dir, dict(tp=2, cp_ring=2)):
        assert dt == ["torch.float32"]
        assert losses == pytest.approx(bf16, rel=2e-2)


MOE_BIAS = dict(MODEL, moe=dict(num_experts=4, top_k=2, expert_bias=True, bias_update_rate=0.01))
# the balance losses are per micro-batch (as in Megatron), so accumulation changes them: off
# where the comparison is with another accumulation
NO_AUX = dict(MODEL, moe=dict(MOE_BIAS["moe"], aux_loss_coef=0.0, z_loss_coef=0.0))


def _bias_run(data_dir, degrees, grad_accum, batch, model=MOE_BIAS, steps=3):
    """Router biases after `steps` steps (MoE with aux-loss-free balancing)."""
    cfg = _cfg(model=model, grad_accum=grad_accum)
    mesh = mesh_for(**degrees) if degrees else ParallelMesh.single()
    dp = mesh.size("dp")
    rank = mesh.coord("dp")
    trainer = Trainer(cfg, mesh, PackedLoader(data_dir, seq_len=64, batch_size=batch, seed=3, dp_rank=rank, dp_size=dp))
    for _ in range(steps):
        trainer.train_step()
    return [m.router.bias.clone() for m in trainer.model.moe_layers()]


def test_expert_bias_follows_the_whole_steps_load(data_dir, pool4):
    """The aux-loss-free bias moves once per step by the load of every micro-batch on every data-
    and sequence-parallel rank: the same with or without accumulation, on any layout."""
    whole = _bias_run(data_dir, None, 1, 4, NO_AUX)
    assert any(b.abs().sum() > 0 for b in whole)
    for got, want in zip(_bias_run(data_dir, None, 2, 2, NO_AUX), whole):
        assert torch.equal(got, want)
    ref = _bias_run(data_dir, None, 2, 2)
    for biases in pool4.run(_bias_run, data_dir, dict(dp=2, cp_ring=2, ep=2), 2, 1):
        for got, want in zip(biases, ref):
            assert torch.allclose(torch.as_tensor(got), want, atol=1e-7), (got, want)


def _zero3_run(data_dir, degrees, precision):
    """ZeRO-3 (FSDP2) losses of 3 steps, parameter and moment dtypes, and FSDP's bytes in the last step."""
    cfg = _cfg(precision=precision, optim={"zero": 3})
    mesh = mesh_for(**degrees)
    loader = PackedLoader(data_dir, seq_len=64, batch_size=2 // mesh.size("dp"), seed=3, dp_rank=mesh.coord("dp"),
                          dp_size=mesh.size("dp"))
    trainer = Trainer(cfg, mesh, loader)
    losses = []
    for _ in range(3):
        mesh.stats.reset()
        losses.append(trainer.train_step().loss)
    dtypes = {p.dtype for p in trainer.model.parameters()}
    dtypes |= {v.dtype for st in trainer.opt.state.values() for v in st.values() if v.dim()}
    return losses, sorted(str(d) for d in dtypes), mesh.stats.bytes_sent.get("fsdp", 0)


def test_bf16_under_zero3_gathers_bf16_and_keeps_fp32_masters(data_dir, pool4):
    """FSDP2's mixed-precision policy under bf16: the blocks' parameters are gathered in bf16
    (the all-gathers carry half the bytes; gradients are reduce-scattered in fp32), the sharded
    parameters and AdamW moments stay fp32, and the losses follow one process's bf16 run."""
    one = _run(data_dir, None, {"precision": "bf16"}, 2, 3)
    fp32 = pool4.run(_zero3_run, data_dir, dict(dp=2, cp_ring=2), "fp32")
    bf16 = pool4.run(_zero3_run, data_dir, dict(dp=2, cp_ring=2), "bf16")
    for (losses, dtypes, sent), (_, _, sent32) in zip(bf16, fp32):
        assert dtypes == ["torch.float32"] and losses == pytest.approx(one, rel=2e-2)
        assert 0.5 * sent32 < sent < 0.9 * sent32  # all-gathers halved, reduce-scatters still fp32
