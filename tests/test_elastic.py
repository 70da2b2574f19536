"""Which smaller layouts an elastic run may continue on (the launcher's part is tested on a
real multi-node Ray cluster in test_ray_cluster.py)."""

from __future__ import annotations

from longtrain.config.loading import build
from longtrain.launch.elastic import describe, smaller_layouts
from longtrain.config.train import TrainConfig


def _cfg(parallel: dict, **top) -> TrainConfig:
    return build(TrainConfig, {"parallel": parallel, "data": {"seq_len": 1024, "batch_size": 2},
                               "model": {"n_heads": 4, "n_kv_heads": 2}, **top})


def test_dp_shrinks_first_then_the_ring_keeping_the_samples_per_step():
    cfg = _cfg({"dp": 4, "cp_ring": 2, "tp": 2}, grad_accum=1)
    got = [describe(c) for c in smaller_layouts(cfg, 1)]
    assert got == ["8 ranks (dp 2, cp_ring 2, grad_accum 2)", "8 ranks (dp 4, cp_ring 1, grad_accum 1)",
                   "4 ranks (dp 1, cp_ring 2, grad_accum 4)", "4 ranks (dp 2, cp_ring 1, grad_accum 2)",
                   "2 ranks (dp 1, cp_ring 1, grad_accum 4)"]
    for c in smaller_layouts(cfg, 1):  # tp is a node's group: never changed; samples per step kept
        assert c.parallel.tp == 2 and c.parallel.dp * c.grad_accum * c.data.batch_size == 8
        assert c.tokens_per_step == cfg.tokens_per_step
        assert c.eval_batches * c.parallel.dp == cfg.eval_batches * 4  # the same held-out sequences
    assert [c.parallel.world_size for c in smaller_layouts(cfg, 8)] == [8, 8]  # min_world
    assert smaller_layouts(cfg, 1, below=4)[0].parallel.world_size == 2


def test_only_valid_layouts_are_offered():
    # dp 3 does not divide dp x grad_accum = 4; ep = 4 needs dp x cp divisible by 4
    cfg = _cfg({"dp": 4, "ep": 4}, model={"n_heads": 4, "n_kv_heads": 2, "moe": {"num_experts": 4}})
    assert [describe(c) for c in smaller_layouts(cfg, 1)] == []
    cfg = _cfg({"dp": 4, "ep": 2}, model={"n_heads": 4, "n_kv_heads": 2, "moe": {"num_experts": 4}})
    assert [describe(c) for c in smaller_layouts(cfg, 1)] == ["2 ranks (dp 2, cp_ring 1, grad_accum 2)"]
    # a ring of 3 cannot split 1024 tokens into 6 chunks
    cfg = _cfg({"cp_ring": 4})
    assert [c.parallel.cp_ring for c in smaller_layouts(cfg, 1)] == [2, 1]
