"""Mixture-of-Experts: expert-parallel layouts against one process, idle EP ranks, capacity
drops, the balance losses (against Megatron's), and that the balance loss evens the load."""

from __future__ import annotations

import pytest
import torch

from longtrain.models.config import ModelConfig
from longtrain.models.moe import MoEConfig, MoELayer, apply_capacity
from longtrain.parallel.mesh import ParallelMesh
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


def _layer_case(degrees, seed: int, force_first_rank: bool = False, capacity_factor: float | None = None,
                slices: int = 1):
    """An MoE layer (4 experts, top-2) on a [4, 8, 16] batch; returns (loss, full gradients,
    output, input gradient, first batch row held here, experts' global load, dropped).

    `degrees` None: one process, over the batch in `slices` separate calls (gradients
    accumulate). Otherwise each data/sequence rank takes its share of batch rows, and the
    loss and gradients are summed over ranks (`sync_gradients`), then gathered to full shape.
    `force_first_rank`: the router bias sends every token to experts 0 and 1, so the second
    EP rank of each group receives no token at all."""
    from longtrain.parallel.comm import all_reduce, group_rank, group_size
    from longtrain.parallel.grads import sync_gradients
    from longtrain.parallel.sharding import full_tensor
    from longtrain.parallel.sharding import sharding_of
    from tests.dist import mesh_for

    mesh = ParallelMesh.single() if degrees is None else mesh_for(**degrees)
    cfg = MoEConfig(num_experts=4, top_k=2, expert_bias=True, capacity_factor=capacity_factor,
                    **({} if capacity_factor is None else dict(aux_loss_coef=0.0, z_loss_coef=0.0)))
    from longtrain.models.parallelize import apply_ep, bind

    layer = MoELayer(16, 24, cfg)
    apply_ep(layer, mesh)
    bind(layer, mesh.with_sequence_parallel(False))  # tokens: dp x cp, as the model without TP-SP
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            s = sharding_of(p)
            p.copy_(s.local_slice(torch.randn(s.full_shape, generator=g) * 0.3))
        if force_first_rank:
            layer.router.bias.copy_(torch.tensor([50.0, 50.0, -50.0, -50.0]))
    x = torch.randn(4, 8, 16, generator=g)
    tokens = mesh.group("dp_cp")
    n, r = group_size(tokens), group_rank(tokens)
    x = x.chunk(n)[r].clone().requires_grad_()  # [4/n, 8, 16]: this rank's batch rows
    loss, outs, dropped = torch.zeros(()), [], 0
    for part in x.chunk(slices):
        out, aux = layer(part)
        part_loss = out.square().sum() + aux  # the ranks' aux losses add up to the global one
        part_loss.backward()
        loss, dropped = loss + part_loss.detach(), dropped + layer.last.dropped
        outs.append(out.detach())
    sync_gradients(layer.parameters(), mesh)
    loss = all_reduce(loss, tokens)
    grads = {name: full_tensor(p, mesh, p.grad) for name, p in layer.named_parameters()}
    return loss.item(), grads, torch.cat(outs), x.grad, r * x.shape[0], layer.last.load, dropped


def _compare_layer(results, ref):
    """Loss and every parameter's full gradient (test_model.compare), then each rank's output
    rows and input gradient against the same rows of the reference."""
    compare([res[:2] for res in results], ref[:2])
    _, _, ref_out, ref_dx, *_ = ref
    for _, _, out, dx, row, *_ in results:
        rows = slice(row, row + out.shape[0])
        for got, want in ((out, ref_out[rows]), (dx, ref_dx[rows])):
            err = (torch.from_numpy(got) - want).abs().max().item()
            assert err <= 1e-5 * want.abs().max().item() + 1e-8, err


@pytest.mark.parametrize("force_first_rank", [False, True], ids=["spread", "ep-rank1-idle"])
def test_moe_layer_two_ranks(pool2, force_first_rank):
    """dp2 x ep2: with forced routing EP rank 1 receives no token at all; outputs and
    gradients (its experts': zero, not None after sync) still match one process."""
    ref = _layer_case(None, 0, force_first_rank)
    if force_first_rank:
        assert ref[-2][2:].sum() == 0 and (ref[1]["experts.w1"][2:] == 0).all()
    _compare_layer(pool2.run(_layer_case, dict(dp=2, ep=2), 0, force_first_rank), ref)


@pytest.mark.parametrize("degrees", [dict(dp=4, ep=2), dict(dp=2, cp_ring=2, ep=4)], ids=["dp4-ep2", "dp2-ring2-ep4"])
@pytest.mark.parametrize("force_first_rank", [False, True], ids=["spread", "ep-idle"])
def test_moe_layer_four_ranks(pool4, degrees, force_first_rank):
    """ep2 inside dp4: each expert lives on two ranks (expert gradients summed over the edp
    group); ep4: one expert per rank, tokens from data- and sequence-parallel ranks."""
    _compare_layer(pool4.run(_layer_case, degrees, 1, force_first_rank), _layer_case(None, 1, force_first_rank))


def test_moe_layer_capacity_drops(pool2):
    """Capacity is per rank by design (each expert takes at most ceil(cf*N*k/E) of *this
    rank's* assignments), so which assignments drop depends on the layout, and a one-process
    run over the whole batch is not the reference. The exact reference is one process over
    the same per-rank slices (slices=2 for dp2), gradients summed; balance losses are off
    because their statistics are global, unlike the slices' capacities."""
    ref = _layer_case(None, 2, capacity_factor=1.0, slices=2)
    assert ref[-1] > 0  # the case must actually drop assignments
    res = pool2.run(_layer_case, dict(dp=2, ep=2), 2, capacity_factor=1.0)
    assert sum(r[-1] for r in res) == ref[-1]
    _compare_layer(res, ref)


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
    layer.step_load = torch.tensor([10.0, 0.0, 5.0, 5.0])
    layer.update_bias()
    assert layer.step_load is None  # consumed: the next step starts from zero
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
