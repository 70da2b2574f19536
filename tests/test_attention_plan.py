"""The model plans attention once per batch: the cross-rank agreement check and the doc-id
gathers are issued once per forward, whatever the number of layers, and the results are
still those of one process (loss and every gradient)."""

from __future__ import annotations

import pytest

from longtrain.models.config import ModelConfig
from longtrain.models.loss import global_loss
from longtrain.models.transformer import build_model
from longtrain.parallel.attention import shard_sequence
from longtrain.parallel.grads import sync_gradients
from longtrain.parallel.sharding import full_tensor
from tests.dist import mesh_for
from tests.test_model import CFG, compare, make_batch, reference

PLANNED = ("agreement", "doc_ids")


def model_step(degrees, cfg_kw, b, s, seed):
    """One micro-batch forward + backward with packed documents: (collective calls of the
    step before the gradient sync, mean loss, full gradients)."""
    mesh = mesh_for(**degrees)
    cfg = ModelConfig(**cfg_kw)
    model = build_model(cfg, mesh, seed=seed)
    ids, labels, doc = make_batch(b, s, cfg.vocab_size, seed, docs=True)
    model.train()
    mesh.stats.reset()
    out = model(*(shard_sequence(t, mesh) for t in (ids, labels, doc)))
    loss, mean = global_loss(out, mesh.group("dp_cp"))
    loss.backward()
    calls = dict(mesh.stats.calls)
    sync_gradients(model.parameters(), mesh)
    return calls, mean.item(), {n: full_tensor(p, mesh, p.grad) for n, p in model.named_parameters()}


# layout, model variant, doc-id gathers per forward (one per sequence-parallel axis)
CASES = {
    "ring2xulysses2": (dict(cp_ring=2, cp_ulysses=2), {}, 2),
    "tp2xring2-window-ckpt-full": (dict(tp=2, cp_ring=2), dict(window=12, checkpoint="full"), 1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_attention_collectives_once_per_forward(pool4, name):
    degrees, variant, gathers = CASES[name]
    seen = {}
    for n_layers in (2, 4):
        cfg = dict(CFG, n_layers=n_layers, **variant)
        res = pool4.run(model_step, degrees, cfg, 2, 64, 7)
        compare([(loss, grads) for _, loss, grads in res], reference(cfg, 2, 64, 7, docs=True))
        seen[n_layers] = [{kind: calls.get(kind, 0) for kind in PLANNED} for calls, _, _ in res]
        assert all(c == {"agreement": 1, "doc_ids": gathers} for c in seen[n_layers]), seen[n_layers]
    assert seen[2] == seen[4]  # the layer count does not change these collectives
