"""Layouts of N ranks that can run a config, best first.

Every factorization of N into pp x tp x cp_ulysses x cp_ring x dp (x ep over dp x cp for MoE)
is validated exactly as `longtrain train` would validate it (heads, vocabulary, sequence
divisibility, micro-batches for the pipeline), planned with the config's ZeRO level or, where
that does not fit, the lowest higher one that does, and kept if its peak fits the memory per rank. They are ordered by a
lower bound on the step time: the FLOPs per rank at the given rate, plus the bytes of the
collectives that block compute (tp, Ulysses, expert all-to-alls, the gradient sync) at the
given link speed; ring traffic overlaps compute and is counted only where it exceeds it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from longtrain.config.train import TrainConfig
from longtrain.parallel.mesh import ParallelDims

from .comm import micro_batch_bytes, step_bytes
from .flops import StepFlops, step_flops
from .memory import MemoryPlan, memory_plan

BLOCKING = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "expert_all_to_all", "doc_ids", "agreement",
            "fsdp", "pipeline")


@dataclass
class Candidate:
    """One layout planned: its memory, FLOPs and bytes, and the step-time bound they give."""

    parallel: ParallelDims
    zero: int
    memory: MemoryPlan
    flops: StepFlops
    sent: dict[str, float]  # bytes per kind, the busiest ring rank
    seconds: float  # lower bound on the step time
    compute_seconds: float  # the FLOPs at the rate, with the pipeline bubble
    comm_seconds: float  # communication not hidden behind compute
    bubble_seconds: float = 0.0  # of compute_seconds: the pipeline's idle share

    @property
    def peak_bytes(self) -> float:
        return self.memory.peak

    def name(self) -> str:
        p = self.parallel
        return ((f"pp{p.pp} x " if p.pp > 1 else "") + f"tp{p.tp} x ulysses{p.cp_ulysses} x ring{p.cp_ring} x dp{p.dp}"
                + (f" (ep{p.ep})" if p.ep > 1 else "") + (f" ZeRO-{self.zero}" if self.zero else ""))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(world: int, moe: bool, cp_layout: str = "zigzag") -> list[ParallelDims]:
    out = []
    for pp in _divisors(world):
        for tp in _divisors(world // pp):
            for cu in _divisors(world // (pp * tp)):
                for cr in _divisors(world // (pp * tp * cu)):
                    dp = world // (pp * tp * cu * cr)
                    for ep in (_divisors(dp * cu * cr) if moe else [1]):
                        out.append(ParallelDims(pp=pp, tp=tp, cp_ulysses=cu, cp_ring=cr, dp=dp, ep=ep,
                                                cp_layout=cp_layout))
    return out


@dataclass(frozen=True)
class Links:
    """Bytes/s a rank sends inside its node and to other nodes; nodes of `gpus_per_node` ranks
    (None: one link speed for everything, as on one machine)."""

    intra: float
    inter: float
    gpus_per_node: int | None = None


def _comm_seconds(cfg: TrainConfig, sent: dict[str, float], links: Links) -> tuple[float, float]:
    """(seconds of collectives that block compute, seconds of ring traffic). Tensor and Ulysses
    collectives of the micro-batches stay inside a node; the ring, the pipeline, the expert
    all-to-alls and the gradient reductions cross nodes once the job spans more than one."""
    p = cfg.parallel
    if links.gpus_per_node is None or p.world_size <= links.gpus_per_node:
        blocking = sum(v for k, v in sent.items() if k in BLOCKING)
        return blocking / links.intra, sum(v for k, v in sent.items() if k.startswith("ring")) / links.intra
    micro = micro_batch_bytes(cfg)
    intra = inter = 0.0
    for kind, nbytes in sent.items():
        if kind not in BLOCKING:
            continue
        inside = min(nbytes, micro.get(kind, 0.0) * cfg.grad_accum) if kind in ("all_to_all", "all_gather",
                                                                             "reduce_scatter", "all_reduce") else 0.0
        intra, inter = intra + inside, inter + nbytes - inside
    ring_link = links.intra if p.tp * p.cp_ulysses * p.cp_ring <= links.gpus_per_node else links.inter
    return intra / links.intra + inter / links.inter, sum(v for k, v in sent.items() if k.startswith("ring")) / ring_link


def evaluate(cfg: TrainConfig, baseline: float, rate: float, link: float | Links) -> Candidate:
    links = link if isinstance(link, Links) else Links(link, link)
    mem = memory_plan(cfg, baseline)
    fl = step_flops(cfg)
    sent = step_bytes(cfg)
    compute = fl.per_rank / rate
    blocking, ring = _comm_seconds(cfg, sent, links)
    comm = blocking + max(0.0, ring - compute)
    p, m = cfg.parallel, cfg.grad_accum
    bubble = 0.0
    if p.pp > 1:  # the 1F1B bubble (interleaved: divided by the stages per rank); p2p overlaps
        v = cfg.pipeline.virtual_stages
        bubble = compute * (p.pp - 1) / (v if cfg.pipeline.schedule != "1f1b" else 1) / m
    return Candidate(cfg.parallel, cfg.optim.zero, mem, fl, sent, compute + bubble + comm, compute + bubble, comm,
                     bubble)


def search(cfg: TrainConfig, world: int, limit_bytes: float | None, baseline: float, rate: float,
           link: float | Links, gpus_per_node: int | None = None) -> tuple[list[Candidate], list[tuple[ParallelDims, str]]]:
    """(layouts that fit, best first; [(layout, why not)] for the others). With `gpus_per_node`
    only layouts the launchers can place on such nodes are offered (`gpus.placement_problem`)."""
    from .gpus import placement_problem

    fits, rejected = [], []
    for dims in layouts(world, cfg.model.moe is not None, cfg.parallel.cp_layout):
        problem = placement_problem(dims, gpus_per_node)
        if problem:
            rejected.append((dims, problem))
            continue
        try:
            c = dataclasses.replace(cfg, parallel=dims)
        except ValueError as e:
            rejected.append((dims, str(e).split(";")[0]))
            continue
        for zero in range(cfg.optim.zero, 4):  # the lowest ZeRO level that fits
            cand = evaluate(dataclasses.replace(c, optim=dataclasses.replace(c.optim, zero=zero)), baseline, rate, link)
            if limit_bytes is None or cand.peak_bytes <= limit_bytes:
                fits.append(cand)
                break
        else:
            rejected.append((dims, f"peak {cand.peak_bytes / 2**30:.1f} GiB > {limit_bytes / 2**30:.1f} GiB "
                                   "(even with ZeRO-3)"))
    fits.sort(key=lambda c: (c.seconds, c.peak_bytes))
    return fits, rejected
