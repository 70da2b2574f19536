"""Layouts of N ranks that can run a config, best first.

Every factorization of N into pp x tp x cp_ulysses x cp_ring x dp (x ep over dp x cp for MoE)
is validated exactly as `longtrain train` would validate it (heads, vocabulary, sequence
divisibility, micro-batches for the pipeline), planned with the config's ZeRO level or, where
that does not fit, the lowest higher one that does, and kept if its peak fits the memory per rank. They are ordered by a
lower bound on the step time: the FLOPs per rank at the given rate, plus the bytes of the
collectives that block compute (tp, Ulysses, expert all-to-alls, ZeRO's gather of updated
chunks) at the given link speed; what longtrain overlaps with compute (the ring's messages,
FSDP2's prefetched gathers and its reduce-scatters, the gradient reductions its hooks start
during the last backward) is counted only where it exceeds the compute beside it
(`exposed_seconds`).
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


@dataclass(frozen=True)
class CommTimes:
    """Seconds of a step's traffic at the link speeds, by how it meets compute."""

    blocking: float  # per-micro-batch tp / Ulysses / expert collectives, ZeRO's gather after the step, ...
    grad_sync: float  # gradient reductions: started by hooks during the last micro-batch's backward
    fsdp: float  # ZeRO-3 (FSDP2): gathers prefetched a block ahead, reduce-scatters behind the backward
    ring: float  # ring attention's K/V messages: sent while the previous block computes


def _comm_seconds(cfg: TrainConfig, sent: dict[str, float], links: Links) -> CommTimes:
    """Each kind at its link. Tensor and Ulysses collectives of the micro-batches stay inside a
    node; the ring (when its group spans nodes), the pipeline, the expert all-to-alls, FSDP and
    the gradient reductions cross nodes once the job spans more than one: the replica group's
    collectives (FSDP, gradients, ZeRO's gather) over all its members' NICs of a node at once,
    point-to-point traffic and all-to-alls at one NIC's speed."""
    p = cfg.parallel
    one_node = links.gpus_per_node is None or p.world_size <= links.gpus_per_node
    across = links.intra if one_node else links.inter
    # the replica group (dp x cp, ranks tp apart) has this many members on each node; NCCL runs
    # its collectives over every member's own NIC at once (one ring per rail), so a node moves
    # the group's bytes at that many links' speed, at most the speed inside the node
    per_node = 1 if one_node else max(1, min(p.dp * p.cp_ring * p.cp_ulysses, links.gpus_per_node // p.tp))
    replicas = links.intra if one_node else min(links.intra, per_node * links.inter)
    ring_link = links.intra if one_node or p.tp * p.cp_ulysses * p.cp_ring <= links.gpus_per_node else links.inter
    micro = micro_batch_bytes(cfg)
    blocking = grad_sync = fsdp = ring = 0.0
    for kind, nbytes in sent.items():
        if kind.startswith("ring"):
            ring += nbytes / ring_link
        elif kind == "fsdp":
            fsdp += nbytes / replicas
        elif kind in BLOCKING:
            per_micro = kind in ("all_to_all", "all_gather", "reduce_scatter", "all_reduce")
            inside = min(nbytes, micro.get(kind, 0.0) * cfg.grad_accum) if per_micro else 0.0
            blocking += inside / links.intra
            if kind in ("all_reduce", "reduce_scatter"):  # gradients, over the replica group
                grad_sync += (nbytes - inside) / replicas
            elif kind == "all_gather":  # ZeRO-1/2: the updated chunks, over the replica group
                blocking += (nbytes - inside) / replicas
            else:
                blocking += (nbytes - inside) / across
    return CommTimes(blocking, grad_sync, fsdp, ring)


def exposed_seconds(cfg: TrainConfig, t: CommTimes, compute: float) -> float:
    """Communication not hidden behind `compute` (the step's FLOPs at the rate): blocking
    collectives in full; FSDP's and the ring's traffic where together they exceed the compute
    they run beside, plus FSDP's first block gather (nothing to hide it); the gradient
    reductions where they exceed the last micro-batch's backward (two thirds of its compute)."""
    first_gather = t.fsdp / (2 * cfg.grad_accum * max(1, cfg.model.n_layers))
    last_backward = compute * 2 / 3 / cfg.grad_accum
    return (t.blocking + max(0.0, t.fsdp + t.ring - compute) + first_gather
            + max(0.0, t.grad_sync - last_backward))


def evaluate(cfg: TrainConfig, baseline: float, rate: float, link: float | Links) -> Candidate:
    links = link if isinstance(link, Links) else Links(link, link)
    mem = memory_plan(cfg, baseline)
    fl = step_flops(cfg)
    sent = step_bytes(cfg)
    compute = fl.per_rank / rate
    comm = exposed_seconds(cfg, _comm_seconds(cfg, sent, links), compute)
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
