"""Layouts of N ranks that can run a config, best first.

Every factorization of N into tp x cp_ulysses x cp_ring x dp (x ep over dp x cp for MoE) is
validated exactly as `longtrain train` would validate it (heads, vocabulary, sequence
divisibility), planned, and kept if its peak fits the memory per rank. They are ordered by a
lower bound on the step time: the FLOPs per rank at the given rate, plus the bytes of the
collectives that block compute (tp, Ulysses, expert all-to-alls, the gradient sync) at the
given link speed; ring traffic overlaps compute and is counted only where it exceeds it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from longtrain.launch.train_config import TrainConfig
from longtrain.parallel.mesh import ParallelDims

from .comm import step_bytes
from .flops import StepFlops, step_flops
from .memory import MemoryPlan, memory_plan

BLOCKING = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "expert_all_to_all", "doc_ids", "agreement")


@dataclass
class Candidate:
    """One layout planned: its memory, FLOPs and bytes, and the step-time bound they give."""

    parallel: ParallelDims
    memory: MemoryPlan
    flops: StepFlops
    sent: dict[str, float]  # bytes per kind, the busiest ring rank
    seconds: float  # lower bound on the step time
    compute_seconds: float
    comm_seconds: float

    @property
    def peak_bytes(self) -> float:
        return self.memory.peak

    def name(self) -> str:
        p = self.parallel
        return f"tp{p.tp} x ulysses{p.cp_ulysses} x ring{p.cp_ring} x dp{p.dp}" + (f" (ep{p.ep})" if p.ep > 1 else "")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(world: int, moe: bool) -> list[ParallelDims]:
    out = []
    for tp in _divisors(world):
        for cu in _divisors(world // tp):
            for cr in _divisors(world // (tp * cu)):
                dp = world // (tp * cu * cr)
                for ep in (_divisors(dp * cu * cr) if moe else [1]):
                    out.append(ParallelDims(tp=tp, cp_ulysses=cu, cp_ring=cr, dp=dp, ep=ep))
    return out


def evaluate(cfg: TrainConfig, baseline: float, rate: float, link: float) -> Candidate:
    mem = memory_plan(cfg, baseline)
    fl = step_flops(cfg)
    sent = step_bytes(cfg)
    compute = fl.per_rank / rate
    blocking = sum(v for k, v in sent.items() if k in BLOCKING) / link
    ring = sum(v for k, v in sent.items() if k.startswith("ring")) / link
    comm = blocking + max(0.0, ring - compute)
    return Candidate(cfg.parallel, mem, fl, sent, compute + comm, compute, comm)


def search(cfg: TrainConfig, world: int, limit_bytes: float | None, baseline: float, rate: float,
           link: float) -> tuple[list[Candidate], list[tuple[ParallelDims, str]]]:
    """(layouts that fit, best first; [(layout, why not)] for the others)."""
    fits, rejected = [], []
    for dims in layouts(world, cfg.model.moe is not None):
        try:
            c = dataclasses.replace(cfg, parallel=dims)
        except ValueError as e:
            rejected.append((dims, str(e).split(";")[0]))
            continue
        cand = evaluate(c, baseline, rate, link)
        if limit_bytes is not None and cand.peak_bytes > limit_bytes:
            rejected.append((dims, f"peak {cand.peak_bytes / 2**30:.1f} GiB > {limit_bytes / 2**30:.1f} GiB"))
            continue
        fits.append(cand)
    fits.sort(key=lambda c: (c.seconds, c.peak_bytes))
    return fits, rejected
