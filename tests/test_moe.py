"""Mixture-of-Experts: expert-parallel layouts against one process, idle EP ranks, capacity
drops, the balance losses (against Megatron's), and that the balance loss evens the load."""

from __future__ import annotations

import pytest
import torch

from longtrain.models.config import ModelConfig
from longtrain.models.moe import MoEConfig, MoELayer, apply_capacity
from tests.test_model import CFG, compare, parallel_step, reference

MOE = dict(num_experts=4, top_k=2)


def moe_cfg(**kw):
    return dict(CFG, moe=dict(MOE, **kw))


@pytest.mark.parametrize("degrees,moe", [
    (dict(dp=2, ep=2), {}),
    (dict(cp_ring=2, ep=2), dict(score="sigmoid", shared_expert=True)),
], ids=["dp2-ep2", "ring2-ep2-sigmoid-shared"])
def test_expert_parallel_two_ranks(pool2, degrees, moe):
    cfg = moe_cfg(**moe)
    compare(pool2.run(parallel_step, degrees, cfg, 2, 64, 0), reference(cfg, 2, 64, 0))


@pytest.mark.parametrize("degrees", [dict(dp=2, tp=2, ep=2), dict(cp_ring=2, tp=2, ep=2), dict(dp=2, cp_ulysses=2, ep=4)],
                         ids=["dp2-tp2-ep2", "ring2-tp2-ep2", "dp2-ulysses2-ep4"])
def test_expert_parallel_four_ranks(pool4, degrees):
    cfg = moe_cfg(shared_expert=True)
    compare(pool4.run(parallel_step, degrees, cfg, 2, 64, 1), reference(cfg, 2, 64, 1))


def test_expert_parallel_without_tp_sequence_parallel(pool4):
    cfg = moe_cfg()
    compare(pool4.run(parallel_step, dict(dp=2, tp=2, ep=2), cfg, 2, 64, 1, sequence_parallel=False),
            reference(cfg, 2, 64, 1))


def _layer_case(degrees, force_first_rank: bool, seed: int):
    """An MoE layer whose router sends every token to experts 0 and 1 (held by EP rank 0)."""
    from tests.dist import mesh_for

    mesh = None if degrees is None else mesh_for(**degrees)
    cfg = MoEConfig(num_experts=4, top_k=2, expert_bias=True)
    layer = MoELayer(16, 24, cfg, ep_group=None if mesh is None else mesh.group("ep"),
                     token_group=None if mesh is None else mesh.group("dp_cp"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in layer.named_parameters():
            full = torch.randn(getattr(p, "full_shape", p.shape), generator=g) * 0.3
            if getattr(p, "shard_dim", None) is not None:
                full = full.chunk(mesh.size("ep"), 0)[mesh.coord("dp")]
            p.copy_(full)
        if force_first_rank:
            layer.router.bias.copy_(torch.tensor([50.0, 50.0, -50.0, -50.0]))
    x = torch.randn(2 * 8, 16, generator=g).view(2, 8, 16)
    if mesh is not None:
        x = x[mesh.coord("dp"):mesh.coord("dp") + 1]
    x.requires_grad_()
    out, aux = layer(x)
    (out.square().sum() + aux).backward()
    grads = {n: p.grad.clone() if p.grad is not None else None for n, p in layer.named_parameters()}
    return out.detach(), x.grad, grads, layer.last.load


def test_rank_with_no_tokens(pool2):
    """EP rank 1 receives no token at all; outputs and gradients still match one process."""
    ref_out, ref_dx, ref_grads, load = _layer_case(None, True, 0)
    assert load[2:].sum() == 0
    res = pool2.run(_layer_case, dict(dp=2, ep=2), True, 0)
    for r, (out, dx, grads, _) in enumerate(res):
        assert torch.allclose(torch.from_numpy(out), ref_out[r:r + 1], atol=1e-5)
        assert torch.allclose(torch.from_numpy(dx), ref_dx[r:r + 1], atol=1e-5)
    assert grads["experts.w1"] is not None  # idle rank-1 experts: zero gradient, not None after sync


def test_capacity_drops_are_counted():
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 3]])  # expert 0 chosen 4 times
    kept, dropped = apply_capacity(idx, 4, 1.0)  # capacity ceil(1.0 * 4 * 2 / 4) = 2
    assert dropped == 2
    assert kept.tolist() == [[0, 1], [0, 2], [-1, 1], [-1, 3]]
    cfg = MoEConfig(num_experts=4, top_k=2, capacity_factor=0.5)
    layer = MoELayer(8, 16, cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    out, _ = layer(torch.randn(1, 32, 8))
    assert layer.last.dropped > 0 and out.shape == (1, 32, 8)


def test_aux_and_z_loss_match_megatron():
    from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func, z_loss_func

    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=2, aux_loss_coef=1.0, z_loss_coef=1.0)
    layer = MoELayer(16, 32, cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(64, 16)
    idx, _, scores, logits = layer.router(x)
    aux, z, load = layer._balance(idx, scores, logits)
    want = switch_load_balancing_loss_func(scores, load, 64, 2, 8, 1.0)
    assert torch.allclose(aux, want, rtol=1e-5)
    assert torch.allclose(z, z_loss_func(logits, 1.0), rtol=1e-5)


def _train_router(aux_coef: float, steps: int = 150) -> float:
    """Toy task with skewed inputs; returns max/mean expert load at the end."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=1, aux_loss_coef=aux_coef, z_loss_coef=0.0)
    layer = MoELayer(16, 32, cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    with torch.no_grad():
        layer.router.weight[0] += 0.15  # router starts biased toward expert 0
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    target = torch.randn(16, 16)
    for _ in range(steps):
        x = torch.randn(256, 16) + 0.5
        out, aux = layer(x[None])
        loss = (out[0] - x @ target).pow(2).mean() + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
    load = layer.last.load
    return (load.max() / load.mean()).item()


def test_balance_loss_evens_expert_load():
    """The task alone collapses routing onto few experts (rich get richer); the balance loss
    keeps the load spread (max/mean load; 8 = everything on one expert, 1 = even)."""
    skew_without = _train_router(0.0)
    skew_with = _train_router(1.0)
    assert skew_without > 6.0, skew_without
    assert skew_with < 0.6 * skew_without, (skew_with, skew_without)


def test_invalid_moe_configs():
    with pytest.raises(ValueError, match="top_k=5 must be between 1 and num_experts=4"):
        MoEConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="num_experts=6 must be divisible by ep=4"):
        ModelConfig(**moe_cfg(num_experts=6)).check_layout(tp=1, cp_ulysses=1, ep=4)


def test_expert_bias_update_and_sigmoid_weights():
    cfg = MoEConfig(num_experts=4, top_k=2, expert_bias=True, bias_update_rate=0.1, score="sigmoid")
    layer = MoELayer(8, 16, cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    idx, w, scores, _ = layer.router(torch.randn(10, 8))
    assert torch.allclose(w.sum(-1), torch.ones(10))  # sigmoid weights are renormalized over the k choices
    layer.last.load = torch.tensor([10.0, 0.0, 5.0, 5.0])
    layer.update_bias()
    assert layer.router.bias.tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.0])


def test_capacity_matches_one_hot_queue():
    torch.manual_seed(0)
    idx = torch.randint(0, 6, (50, 2))
    kept, dropped = apply_capacity(idx, 6, 0.8)
    onehot = torch.nn.functional.one_hot(idx.reshape(-1), 6)
    position = (onehot.cumsum(0) * onehot).sum(-1) - 1
    cap = -(-int(0.8 * 100) // 6)
    assert kept.reshape(-1).tolist() == torch.where(position < cap, idx.reshape(-1), -1).tolist()
    assert dropped == int((position >= cap).sum())
