"""Elastic layouts: go on with fewer ranks when the cluster cannot hold the job, grow back later.

Only the axes that may span nodes shrink, in the order that costs least: the data-parallel
degree first, then the ring (`cp_ring`: each rank then holds a longer piece of the sequence,
so more memory; plan it with `longtrain plan --set parallel.cp_ring=N`). Tensor-parallel and
Ulysses groups (a placement bundle each, on one node) and the expert layout keep their sizes.
`grad_accum` rises as dp falls, so a step still reads the same samples (the loader deals
step s the samples [s*S, (s+1)*S) for S = dp x batch_size x grad_accum, whatever the split)
and its loss is the same global token mean: only the summation order changes; evaluations
read the same held-out sequences too (`eval_batches` rises with grad_accum where it divides). The checkpoint
reshards parameters and AdamW moments to the new layout (DCP), and the loader's position is
counted in samples, so it follows.
"""

from __future__ import annotations

import dataclasses

from longtrain.config.train import TrainConfig


def smaller_layouts(cfg: TrainConfig, min_world: int, below: int | None = None) -> list[TrainConfig]:
    """The configs `cfg` may shrink to, most ranks first (and, among equal worlds, the larger
    ring: dp gives way first): dp' with dp x grad_accum divisible by dp', cp_ring' <= cp_ring,
    at least `min_world` ranks and fewer than `below` (default: cfg's own). Each is a valid
    config (layout, sequence split, experts) or it is left out."""
    p = cfg.parallel
    span, below = p.dp * cfg.grad_accum, p.world_size if below is None else below
    rest = p.world_size // (p.dp * p.cp_ring)  # tp x cp_ulysses x pp: never changed
    out = []
    for dp in range(p.dp, 0, -1):
        for ring in range(p.cp_ring, 0, -1):
            world = rest * dp * ring
            if span % dp or not max(min_world, 1) <= world < below:
                continue
            evals = cfg.eval_batches * p.dp  # held-out sequences per evaluation, kept when it divides
            try:
                out.append(dataclasses.replace(cfg, parallel=dataclasses.replace(p, dp=dp, cp_ring=ring),
                                               grad_accum=span // dp,
                                               eval_batches=evals // dp if evals % dp == 0 else cfg.eval_batches))
            except ValueError:  # e.g. the sequence does not split over this ring, or ep does not divide
                continue
    return sorted(out, key=lambda c: (-c.parallel.world_size, -c.parallel.cp_ring))


def describe(cfg: TrainConfig) -> str:
    p = cfg.parallel
    return f"{p.world_size} ranks (dp {p.dp}, cp_ring {p.cp_ring}, grad_accum {cfg.grad_accum})"
