"""What one rank holds, from the config and the layout alone: token counts, head splits and
parameter counts, without building the model or starting a process.

Every count here mirrors how the model is built (`models.layers`, `models.moe`,
`parallel.tensor`): tests compare them with the parameters of real models on real layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

from longtrain.models.config import ModelConfig
from longtrain.parallel.mesh import ParallelDims


@dataclass(frozen=True)
class Local:
    """Per-rank sizes of one micro-batch on one layout (elements, not bytes)."""

    tokens: int  # T: tokens of a rank's sequence share (batch included), before Ulysses
    stream: int  # tokens of the residual stream on a rank (T / tp under TP sequence parallel)
    ring_tokens: int  # tokens of a ring rank's share after the Ulysses all-to-all (T * cp_ulysses)
    q_dim: int  # query features per rank before Ulysses: heads/tp * head_dim
    kv_dim: int  # K/V features per rank before Ulysses
    kv_dim_ring: int  # K/V features per rank after Ulysses, times cp_ulysses (replicated K/V heads count)
    heads: int  # query heads per tp rank
    ffn: int  # dense FFN hidden per tp rank


def local_sizes(m: ModelConfig, p: ParallelDims, seq_len: int, batch: int, sequence_parallel: bool = True) -> Local:
    tp, cu, cr = p.tp, p.cp_ulysses, p.cp_ring
    tokens = batch * seq_len // (cr * cu)
    sp = tp if sequence_parallel and tp > 1 else 1
    heads, kv = m.n_heads // tp, m.n_kv_heads // tp
    hd = m.head_dim
    kv_after = max(1, kv // cu) * cu  # K/V heads a Ulysses group holds after the all-to-all (replicated if fewer)
    return Local(tokens=tokens, stream=tokens // sp, ring_tokens=tokens * cu, q_dim=heads * hd, kv_dim=kv * hd,
                 kv_dim_ring=kv_after * hd, heads=heads, ffn=m.ffn_hidden // tp)


@dataclass(frozen=True)
class Params:
    """Parameter elements on one rank, by how their gradients are reduced."""

    dense: int  # replicated over dp x cp (tp-sharded or not)
    expert: int  # expert weights: replicated over the expert-data-parallel group
    tp_partial: int  # part of `dense` whose gradient is also summed over tp (TP sequence parallel)
    outside_blocks: int = 0  # part of `dense` outside the decoder blocks: embedding, final norm, head

    @property
    def total(self) -> int:
        return self.dense + self.expert

    @property
    def block_dense(self) -> int:
        """Dense parameters inside the decoder blocks (what ZeRO-3 shards with FSDP)."""
        return self.dense - self.outside_blocks


def _swiglu(dim: int, hidden: int, tp: int) -> int:
    return 3 * dim * (hidden // tp)


def param_counts(m: ModelConfig, p: ParallelDims, sequence_parallel: bool = True,
                 part: tuple[tuple[int, ...], bool, bool] | None = None) -> Params:
    """`part`: (layers, first stage, last stage) of a pipeline rank (`pipeline.rank_part`);
    default the whole model."""
    tp, d, hd = p.tp, m.dim, m.head_dim
    layers, first, last = part or (range(m.n_layers), True, True)
    vocab = (m.vocab_size // tp) * d
    dense = (vocab if first else 0) + (vocab + d if last else 0)  # embedding; LM head, final norm
    if m.tie_embeddings and first and last:
        dense -= vocab
    outside = dense
    replicated = d if last else 0  # final norm: not split over tp
    routers = 0  # MoH routers: each tp rank differentiates only its own heads' gates
    expert = 0
    for i in layers:
        attn = d * (m.n_heads // tp) * hd * 2 + d * (m.n_kv_heads // tp) * hd * 2  # wq, wo, wk, wv
        if m.qkv_bias:
            attn += (m.n_heads + 2 * m.n_kv_heads) // tp * hd
        dense += attn + 2 * d  # two norms
        replicated += 2 * d
        if m.moh is not None:
            router = (max(m.moh.shared_heads, 1) + m.n_heads - m.moh.shared_heads + 2) * d
            dense += router
            routers += router
        if m.is_moe_layer(i):
            e = m.moe
            hidden = e.expert_hidden or m.ffn_hidden
            dense += e.num_experts * d  # router (replicated)
            replicated += e.num_experts * d
            expert += (e.num_experts // p.ep) * 3 * d * hidden
            if e.shared_expert:
                dense += _swiglu(d, hidden, tp)
        else:
            dense += _swiglu(d, m.ffn_hidden, tp)
    # under TP-SP every weight not split over tp (experts too: each tp rank routes its own
    # tokens); without it the final norm (it runs inside the tp region, per loss chunk) and the
    # MoH routers
    partial = ((replicated + expert) if sequence_parallel else (d if last else 0)) + routers if tp > 1 else 0
    return Params(dense=dense, expert=expert, tp_partial=partial, outside_blocks=outside)


def pipeline_parts(cfg) -> list[tuple[tuple[int, ...], bool, bool]]:
    """Every pipeline rank's (layers, first, last), in pp order (one entry without pp)."""
    from longtrain.parallel.pipeline import rank_part

    p, pl = cfg.parallel, cfg.pipeline
    return [rank_part(cfg.model.n_layers, p.pp, pl.virtual_stages, r, pl.split) for r in range(p.pp)]


def full_params(m: ModelConfig) -> int:
    """Parameters of the whole model (every shard and every expert once)."""
    return param_counts(m, ParallelDims()).total
