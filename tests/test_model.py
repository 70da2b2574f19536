"""The LM on every layout against one process: same seed, same loss and full gradients."""

from __future__ import annotations

import pytest
import torch

from longtrain.models.config import ModelConfig
from longtrain.data.batch import IGNORE
from longtrain.models.loss import global_loss
from longtrain.models.transformer import build_model
from longtrain.parallel.attention import shard_sequence
from longtrain.parallel.grads import sync_gradients
from longtrain.parallel.sharding import full_tensor
from longtrain.parallel.sharding import Sharding, shard
from longtrain.parallel.mesh import ParallelMesh
from tests.dist import mesh_for

CFG = dict(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, loss_chunk=24)


def make_batch(b, s, vocab, seed, docs=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = ids[:, 1:]
    labels[0, 3] = IGNORE  # masked tokens must not count
    doc = torch.sort(torch.randint(0, 3, (b, s), generator=g), dim=1).values if docs else None
    return ids, labels, doc


def reference(cfg_kw, b, s, seed, docs=False):
    cfg = ModelConfig(**cfg_kw)
    model = build_model(cfg, ParallelMesh.single(), seed=seed)
    ids, labels, doc = make_batch(b, s, cfg.vocab_size, seed, docs)
    out = model(ids, labels, doc)
    loss = out.loss_sum / out.tokens
    (loss + out.aux).backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def parallel_step(degrees, cfg_kw, b, s, seed, docs=False, sequence_parallel=True, model=None):
    mesh = mesh_for(**degrees)
    cfg = ModelConfig(**cfg_kw)
    model = model or build_model(cfg, mesh.with_sequence_parallel(sequence_parallel), seed=seed)
    ids, labels, doc = make_batch(b, s, cfg.vocab_size, seed, docs)
    dp, dpr = mesh.size("dp"), mesh.coord("dp")
    rows = slice(dpr * b // dp, (dpr + 1) * b // dp)  # data parallel: a slice of the batch
    local = [None if t is None else shard_sequence(t[rows], mesh) for t in (ids, labels, doc)]
    model.train()
    out = model(*local)
    loss, mean = global_loss(out, mesh.group("dp_cp"))
    loss.backward()
    sync_gradients(model.parameters(), mesh)
    return mean.item(), {n: full_tensor(p, mesh, p.grad) for n, p in model.named_parameters()}


def compare(results, ref, tol=1e-5):
    ref_loss, ref_grads = ref
    for loss, grads in results:
        assert abs(loss - ref_loss) <= tol * abs(ref_loss), (loss, ref_loss)
        assert grads.keys() == ref_grads.keys()
        for n, g in grads.items():
            want = ref_grads[n]
            err = (torch.from_numpy(g) - want).abs().max().item()
            assert err <= tol * want.abs().max().item() + 1e-8, f"{n}: max error {err:.3g} (max |g| {want.abs().max():.3g})"


LAYOUTS2 = {
    "tp2": dict(tp=2),
    "ring2": dict(cp_ring=2),
    "ulysses2": dict(cp_ulysses=2),
    "dp2": dict(dp=2),
}
LAYOUTS4 = {
    "tp2xring2": dict(tp=2, cp_ring=2),
    "tp2xulysses2": dict(tp=2, cp_ulysses=2),
    "ring2xulysses2": dict(cp_ring=2, cp_ulysses=2),
    "dp2xtp2": dict(dp=2, tp=2),
}


@pytest.mark.parametrize("name", list(LAYOUTS2))
def test_two_ranks(pool2, name):
    ref = reference(CFG, 2, 64, 0)
    compare(pool2.run(parallel_step, LAYOUTS2[name], CFG, 2, 64, 0), ref)


@pytest.mark.parametrize("name", list(LAYOUTS4))
def test_four_ranks(pool4, name):
    ref = reference(CFG, 2, 64, 0)
    compare(pool4.run(parallel_step, LAYOUTS4[name], CFG, 2, 64, 0), ref)


def test_tp_without_sequence_parallel(pool2):
    ref = reference(CFG, 2, 64, 1)
    compare(pool2.run(parallel_step, dict(tp=2), CFG, 2, 64, 1, sequence_parallel=False), ref)


@pytest.mark.parametrize("variant", [
    dict(checkpoint="full"), dict(checkpoint="selective", mlp_chunk=16), dict(window=12),
    dict(rope_scaling=4.0, n_kv_heads=4),
    dict(tie_embeddings=True, qkv_bias=True,
         rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
], ids=["ckpt-full", "ckpt-selective-mlp-chunk", "window", "rope-scaling-mha", "tied-qkv-bias-yarn"])
def test_variants_tp2_ring2(pool4, variant):
    cfg = dict(CFG, **variant)
    ref = reference(cfg, 2, 64, 2)
    compare(pool4.run(parallel_step, dict(tp=2, cp_ring=2), cfg, 2, 64, 2), ref)


def test_packed_documents_mqa_hybrid(pool4):
    cfg = dict(CFG, n_kv_heads=1)
    ref = reference(cfg, 2, 64, 3, docs=True)
    compare(pool4.run(parallel_step, dict(cp_ring=2, cp_ulysses=2), cfg, 2, 64, 3, docs=True), ref)


def test_same_weights_on_every_layout(pool4):
    """Initialization depends only on the seed: gathered shards equal the one-process model."""
    ref = build_model(ModelConfig(**CFG), ParallelMesh.single(), seed=5)
    got = pool4.run(_gathered_weights, dict(tp=2, cp_ring=2), 5)
    for weights in got:
        for n, p in ref.named_parameters():
            assert torch.equal(torch.from_numpy(weights[n]), p.detach()), n


def _gathered_weights(degrees, seed):
    mesh = mesh_for(**degrees)
    model = build_model(ModelConfig(**CFG), mesh, seed=seed)
    return {n: full_tensor(p, model.mesh) for n, p in model.named_parameters()}


def test_config_errors():
    with pytest.raises(ValueError, match="n_heads=6 must be a multiple of n_kv_heads=4"):
        ModelConfig(dim=48, n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match="divisible by tp=4"):
        ModelConfig(**CFG).check_layout(tp=4, cp_ulysses=1)
    with pytest.raises(ValueError, match="cp_ulysses=4"):
        ModelConfig(**dict(CFG, n_heads=2, n_kv_heads=2, dim=64)).check_layout(tp=1, cp_ulysses=4)


MOH = dict(CFG, n_heads=8, n_kv_heads=4, moh=dict(shared_heads=2, top_k=3))


@pytest.mark.parametrize("degrees", [dict(tp=2), dict(cp_ulysses=2)], ids=["tp2", "ulysses2"])
def test_moh_two_ranks(pool2, degrees):
    compare(pool2.run(parallel_step, degrees, MOH, 2, 64, 4), reference(MOH, 2, 64, 4))


def test_moh_tp2_ring2(pool4):
    compare(pool4.run(parallel_step, dict(tp=2, cp_ring=2), MOH, 2, 64, 5), reference(MOH, 2, 64, 5))


def test_moh_reports_heads_and_balances():
    from longtrain.models.moh import HeadRouter, MoHConfig

    torch.manual_seed(0)
    router = HeadRouter(16, 8, MoHConfig(shared_heads=2, top_k=3))
    for p in router.parameters():
        torch.nn.init.normal_(p, std=0.5)
    gates, aux = router(torch.randn(2, 32, 16))
    active = (gates > 0).sum(-1).float()
    assert torch.all(active == 5) and router.active_fraction() == 5 / 8
    load = router.head_load_per_rank(2)
    assert load.sum() == 64 * 5 and aux > 0
    # weighted summation, not a mask: the shared heads' gates sum to a_1 * shared_heads
    assert not torch.allclose(gates[..., :2], torch.ones_like(gates[..., :2]))


def _grad_norm(degrees, cfg_kw, seed):
    from longtrain.parallel.grads import global_grad_norm

    mesh = mesh_for(**degrees)
    model = build_model(ModelConfig(**cfg_kw), mesh, seed=seed)
    ids, labels, _ = make_batch(2, 64, cfg_kw["vocab_size"], seed)
    dp, dpr = mesh.size("dp"), mesh.coord("dp")
    local = [shard_sequence(t[dpr * 2 // dp:(dpr + 1) * 2 // dp], mesh) for t in (ids, labels)]
    loss, _ = global_loss(model(*local), mesh.group("dp_cp"))
    loss.backward()
    sync_gradients(model.parameters(), mesh)
    return global_grad_norm(model.parameters(), mesh).item()


@pytest.mark.parametrize("degrees,cfg", [(dict(tp=2, cp_ring=2), CFG),
                                         (dict(dp=2, tp=2, ep=2), dict(CFG, moe=dict(num_experts=4, top_k=2)))],
                         ids=["tp2xring2", "dp2-tp2-ep2-moe"])
def test_global_grad_norm_matches_one_process(pool4, degrees, cfg):
    _, grads = reference(cfg, 2, 64, 6)
    want = torch.sqrt(sum(g.pow(2).sum() for g in grads.values())).item()
    for got in pool4.run(_grad_norm, degrees, cfg, 6):
        assert abs(got - want) <= 1e-5 * want, (got, want)


def _moe_bias_forward(degrees):
    """Build through build_model (the trainer's path) with an expert-bias MoE and run a step."""
    cfg = dict(CFG, moe=dict(num_experts=4, top_k=2, expert_bias=True))
    mesh = mesh_for(**degrees) if degrees else ParallelMesh.single()
    model = build_model(ModelConfig(**cfg), mesh, seed=0)
    assert not any(b.is_meta for b in model.buffers())
    if degrees:
        return parallel_step(degrees, cfg, 2, 64, 0, model=model)[0]
    return reference(cfg, 2, 64, 0)[0]


def test_buffers_materialized_on_every_layout(pool4):
    """Buffers (the MoE router bias, or any registered later) get real storage like parameters,
    on one process and on a layout with experts split over ep."""
    from longtrain.models.transformer import LongLM, materialize

    want = _moe_bias_forward(None)
    for loss in pool4.run(_moe_bias_forward, dict(dp=2, tp=2, ep=2)):
        assert loss == pytest.approx(want, rel=1e-5)
    with torch.device("meta"):
        model = LongLM(ModelConfig(**CFG))
    model.layers[0].register_buffer("later", torch.empty(3, device="meta"))
    ones = torch.empty(2, device="meta")
    shard(ones, Sharding(full_shape=(2,), init="ones"))
    model.norm.register_buffer("scale", ones)
    materialize(model, seed=0)
    assert torch.equal(model.layers[0].later, torch.zeros(3)) and torch.equal(model.norm.scale, torch.ones(2))


# MASFormer-style patterns: full attention at some layers, sliding windows at the others
MAS = dict(CFG, n_layers=3, window=12, global_layers=(1,))
MAS_LW = dict(CFG, n_layers=3, layer_windows=(0, 9, 20))


def test_layer_patterns_take_effect():
    """Each layer attends with its own window: the pattern differs from every uniform choice."""
    assert ModelConfig(**MAS).windows == (12, None, 12) and ModelConfig(**MAS_LW).windows == (None, 9, 20)
    model = build_model(ModelConfig(**MAS), ParallelMesh.single(), seed=0)
    assert [blk.attn.window for blk in model.layers] == [12, None, 12]
    losses = {reference(cfg, 2, 64, 0)[0] for cfg in (MAS, dict(CFG, n_layers=3, window=12), dict(CFG, n_layers=3))}
    assert len(losses) == 3
    for bad, match in [(dict(global_layers=(3,)), "global_layers"), (dict(global_layers=(0,)), "needs window"),
                       (dict(layer_windows=(4,)), "one per layer"), (dict(window=5, layer_windows=(1, 2, 3),
                                                                          global_layers=(0,)), "not both")]:
        with pytest.raises(ValueError, match=match):
            ModelConfig(**dict(CFG, n_layers=3, **bad))


@pytest.mark.parametrize("name,cfg", [("ring2", MAS), ("ulysses2", MAS_LW)])
def test_layer_patterns_two_ranks(pool2, name, cfg):
    compare(pool2.run(parallel_step, LAYOUTS2[name], cfg, 2, 64, 6, docs=True), reference(cfg, 2, 64, 6, docs=True))


@pytest.mark.parametrize("name,cfg", [("ring2xulysses2", MAS_LW), ("tp2xring2", MAS)])
def test_layer_patterns_four_ranks(pool4, name, cfg):
    compare(pool4.run(parallel_step, LAYOUTS4[name], cfg, 2, 64, 7), reference(cfg, 2, 64, 7))
