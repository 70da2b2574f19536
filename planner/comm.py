"""Bytes one rank sends per optimizer step, per collective kind, as `CommStats` counts them.

Mirrors the collectives the model issues (`models.transformer`, `parallel.*`) and their byte
convention (`parallel.comm`: all-reduce 2(P-1)/P of its input, all-gather (P-1) shards,
reduce-scatter and all-to-all (P-1)/P of their input, a ring hop its whole message), with the
forward collectives that activation checkpointing repeats in backward. Expert all-to-alls
depend on routing; they are planned for a uniform router (the balance losses' target).
"""

from __future__ import annotations

from collections import Counter

from longtrain.config.train import TrainConfig
from longtrain.parallel.attention.blocks import hop_plan
from longtrain.parallel.attention.ringplan import message_rows

from longtrain.parallel.pipeline import rank_stages

from .shapes import local_sizes, param_counts, pipeline_parts

META_INTS = 11  # values in the attention plan's agreement vector (`attention.plan._validate`)


def _ar(nbytes: float, p: int) -> float:
    return 2 * nbytes * (p - 1) / p if p > 1 else 0.0


def _rs(nbytes: float, p: int) -> float:  # reduce-scatter and all-to-all of an `nbytes` input
    return nbytes * (p - 1) / p if p > 1 else 0.0


def act_bytes(cfg: TrainConfig) -> int:
    return 2 if cfg.precision == "bf16" else 4


def ring_rows(seq_len: int, ring: int, window: int | None, rank: int = 0) -> tuple[int, int]:
    """(K/V rows ring rank `rank` sends in one pass, dK/dV rows it sends in backward): its own
    message and those it relays, in each direction (`ringplan.message_rows`)."""
    sent = acc = 0
    for shift, hops in zip((1, -1), hop_plan(seq_len, ring, True, window, "zigzag")):
        rows = [message_rows(seq_len, ring, (rank - s * shift) % ring, shift, True, window, "zigzag")
                for s in range(hops + 1)]
        sizes = [hi - lo for lo, hi in rows]
        sent += sum(sizes[:hops])  # own message, then the ones received, relayed on (not the last)
        acc += sum(sizes[1:hops + 1]) if hops else 0  # relayed accumulators, then the last one home
    return sent, acc


def _layer(cfg: TrainConfig, window: int | None, moe: bool, ring_rank: int) -> Counter:
    """One layer, forward + backward (recomputation included), one micro-batch."""
    m, p, e = cfg.model, cfg.parallel, act_bytes(cfg)
    loc = local_sizes(m, p, cfg.data.seq_len, cfg.data.batch_size, cfg.sequence_parallel)
    c: Counter = Counter()
    # Checkpointed blocks run their forward again in backward, up to the last op that saves a
    # tensor (torch's early stop): the tp regions' entries again, and every exit but the last.
    recompute = 0 if m.checkpoint == "none" else 1
    attn_again = 1 if m.checkpoint == "full" else 0  # Ulysses and ring run again only under full
    x = loc.tokens * m.dim * e
    regions = 2 if not moe or m.moe.shared_expert else 1  # attention, then the dense FFN (or shared expert)
    if p.tp > 1 and cfg.sequence_parallel:  # gather in, reduce-scatter out of each region
        c["all_gather"] += _rs(x, p.tp) * regions * (2 + recompute)
        c["reduce_scatter"] += _rs(x, p.tp) * (regions * 2 + recompute * (regions - 1))
    elif p.tp > 1:  # backward all-reduce in, forward all-reduce out
        c["all_reduce"] += _ar(x, p.tp) * (regions * 2 + recompute * (regions - 1))
    u = p.cp_ulysses
    if u > 1:
        kv_heads = max(m.n_kv_heads // p.tp, u)  # replicated up to the Ulysses degree
        qkvo = loc.tokens * (2 * loc.q_dim + 2 * kv_heads * m.head_dim) * e
        c["all_to_all"] += _rs(qkvo, u) * (2 + attn_again)
    if p.cp_ring > 1:
        row = 2 * cfg.data.batch_size * (loc.kv_dim_ring // u) * e  # stacked K and V of one position
        sent, acc = ring_rows(cfg.data.seq_len, p.cp_ring, window, ring_rank)
        c["ring_kv"] += sent * row * (2 + attn_again)
        c["ring_dkv"] += acc * row // e * 4  # fp32 accumulators travel home
    if moe and p.ep > 1:
        rows = loc.stream * m.moe.top_k * m.dim * e * (p.ep - 1) / p.ep  # uniform routing
        c["expert_all_to_all"] += rows * 2 * (2 + recompute)
    return c


def micro_batch_bytes(cfg: TrainConfig, ring_rank: int = 0, pp_rank: int = 0) -> Counter:
    """Forward + backward of one micro-batch (the plan's collectives included), on a rank at
    `ring_rank` of its ring (ring messages carry only the keys their receivers need, so ring
    ranks send different amounts) and `pp_rank` of its pipeline (its own layers only)."""
    m, p = cfg.model, cfg.parallel
    loc = local_sizes(m, p, cfg.data.seq_len, cfg.data.batch_size, cfg.sequence_parallel)
    layers, first, last = pipeline_parts(cfg)[pp_rank]
    c: Counter = Counter()
    for i in layers:
        c.update(_layer(cfg, m.layer_window(i), m.is_moe_layer(i), ring_rank))
    if p.pp > 1:  # per stage: its output forward (unless last), its input's gradient back (unless first)
        stages = rank_stages(pp_rank, p.pp, cfg.pipeline.virtual_stages)
        last_stage = p.pp * cfg.pipeline.virtual_stages - 1
        x = loc.stream * m.dim * 4 + 4  # the fp32 residual stream and the balance-loss sum
        c["pipeline"] += x * (sum(k != last_stage for k in stages) + sum(k != 0 for k in stages))
    cp = p.cp_ring * p.cp_ulysses
    if cp > 1:
        c["agreement"] += META_INTS * 8 * (cp - 1)
        b, s = cfg.data.batch_size, cfg.data.seq_len
        ids = cfg.data.source != "shards" or cfg.data.document_mask  # a plain causal stream has none
        c["doc_ids"] += ids * (b * s // cp * 8 * (p.cp_ulysses - 1) + b * s // p.cp_ring * 8 * (p.cp_ring - 1))
    if p.tp > 1:
        x = loc.tokens * m.dim * act_bytes(cfg)
        if cfg.sequence_parallel:  # embedding reduce-scatter, loss-input gather (and their backward)
            c["reduce_scatter"] += first * _rs(x, p.tp) + last * _rs(x, p.tp)
            c["all_gather"] += first * _rs(x, p.tp) + last * _rs(x, p.tp)
        else:
            c["all_reduce"] += first * _ar(x, p.tp) + last * _ar(x, p.tp)
        # vocab-parallel cross-entropy: max, sum-exp and target per token (fp32), again in backward
        c["all_reduce"] += last * 6 * _ar(loc.tokens * 4, p.tp)
    return c


def step_bytes(cfg: TrainConfig, ring_rank: int | None = None, pp_rank: int | None = None) -> dict[str, float]:
    """Every kind for one optimizer step: micro-batches, then the gradient reductions (and
    ZeRO's all-gather of the updated chunks), sent by a rank at `ring_rank` of its ring and
    `pp_rank` of its pipeline (None: the one that sends the most)."""
    m, p = cfg.model, cfg.parallel
    if ring_rank is None or pp_rank is None:
        options = [(r, q) for r in ([ring_rank] if ring_rank is not None else range(p.cp_ring))
                   for q in ([pp_rank] if pp_rank is not None else range(p.pp))]
        ring_rank, pp_rank = max(options, key=lambda o: sum(step_bytes(cfg, *o).values()))
    c = Counter({k: v * cfg.grad_accum for k, v in micro_batch_bytes(cfg, ring_rank, pp_rank).items()})
    n = param_counts(m, p, cfg.sequence_parallel, pipeline_parts(cfg)[pp_rank])
    dp_cp = p.dp * p.cp_ring * p.cp_ulysses
    zero = cfg.optim.zero
    groups = ((n.dense, dp_cp), (n.expert, dp_cp // p.ep))
    if zero == 3:  # FSDP: each block gathered for forward and again for backward (in bf16 under bf16
        # training: FSDP's mixed-precision policy), gradients reduce-scattered in fp32, every
        # micro-batch (FSDP's collectives, counted by `fsdp.counted_comms`)
        gathered = act_bytes(cfg)
        for elems, r in ((n.block_dense, dp_cp), (n.expert, dp_cp // p.ep)):
            c["fsdp"] += cfg.grad_accum * (2 * elems * gathered / r * (r - 1) + _rs(elems * 4, r))
        groups = ((n.outside_blocks, dp_cp),)  # the rest as under ZeRO-2
    for elems, r in groups:
        if zero >= 2:
            c["reduce_scatter"] += _rs(elems * 4, r)
        else:
            c["all_reduce"] += _ar(elems * 4, r)
        if zero and r > 1:
            c["all_gather"] += elems * 4 / r * (r - 1)
    partial = n.tp_partial / dp_cp if zero >= 2 else n.tp_partial  # under ZeRO-2/3 only the chunks are summed
    c["all_reduce"] += _ar(partial * 4, p.tp)
    _, first, last = pipeline_parts(cfg)[pp_rank]
    if p.pp > 1 and m.tie_embeddings and first != last:  # the tied embedding's two copies: gradients summed
        c["all_reduce"] += _ar(m.vocab_size // p.tp * m.dim * 4 / (dp_cp if zero >= 2 else 1), 2)
    return {k: float(v) for k, v in sorted(c.items()) if v}
