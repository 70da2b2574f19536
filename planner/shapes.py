"""What one rank holds, from the config and the layout alone, without starting a process:
token counts and head splits (`local_sizes`, mirroring how the layers split them), and
parameter counts read from the model itself, built on the meta device (`param_counts`), so
they cannot drift from it. Tests compare both with real models on real layouts.
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


def param_counts(m: ModelConfig, p: ParallelDims, sequence_parallel: bool = True,
                 part: tuple[tuple[int, ...], bool, bool] | None = None) -> Params:
    """The parameters one rank holds, read from the model itself (`module_counts`). `part`:
    (layers, first stage, last stage) of a pipeline rank (`pipeline.rank_part`); default the
    whole model."""
    per = module_counts(m, p.tp, p.ep, sequence_parallel)
    layers, first, last = part or (range(m.n_layers), True, True)
    outside = (["embed"] if first else []) + (["norm", "head"] if last else [])
    if m.tie_embeddings and first and last:
        outside.remove("head")  # one parameter serves both
    total = [sum(per[k][i] for k in [*outside, *layers]) for i in range(3)]
    return Params(dense=total[0], expert=total[1], tp_partial=total[2],
                  outside_blocks=sum(per[k][0] for k in outside))


def module_counts(m: ModelConfig, tp: int, ep: int, sequence_parallel: bool) -> dict:
    """Per top-level module of the model ("embed", "norm", "head", and each layer's index):
    (dense, expert, partial-over-tp) parameter elements on one rank. Read from the model: it is
    built on the meta device for a rank of a layout without process groups
    (`ParallelMesh.planned`), and each parameter's `Sharding` says how its gradient is reduced.
    What a rank holds depends on tp, ep and TP sequence parallel only, so one build serves every
    layout and pipeline stage with those."""
    key = (repr(m), tp, ep, bool(sequence_parallel))
    if key not in _COUNTS:
        _COUNTS[key] = _count(m, ParallelDims(tp=tp, dp=ep, ep=ep), sequence_parallel)
    return _COUNTS[key]


_COUNTS: dict = {}  # the layout search asks for the same few (tp, ep) for many layouts


def _count(m: ModelConfig, dims: ParallelDims, sequence_parallel: bool) -> dict:
    import torch

    from longtrain.models.parallelize import parallelize
    from longtrain.models.transformer import LongLM
    from longtrain.parallel.mesh import ParallelMesh
    from longtrain.parallel.sharding import sharding_of

    with torch.device("meta"):
        model = parallelize(LongLM(m), ParallelMesh.planned(dims, sequence_parallel=sequence_parallel))
    out = {k: [0, 0, 0] for k in ("embed", "norm", "head", *range(m.n_layers))}
    for name, t in model.named_parameters(remove_duplicate=False):  # a tied head too, on its own
        top, _, rest = name.partition(".")
        key = int(rest.partition(".")[0]) if top == "layers" else top
        s, n = sharding_of(t), t.numel()
        out[key][0 if s.replicas == "dp_cp" else 1] += n
        out[key][2] += n if s.partial_over_tp else 0
    return out


def pipeline_parts(cfg) -> list[tuple[tuple[int, ...], bool, bool]]:
    """Every pipeline rank's (layers, first, last), in pp order (one entry without pp)."""
    from longtrain.parallel.pipeline import rank_part

    p, pl = cfg.parallel, cfg.pipeline
    return [rank_part(cfg.model.n_layers, p.pp, pl.virtual_stages, r, pl.split) for r in range(p.pp)]


def full_params(m: ModelConfig) -> int:
    """Parameters of the whole model (every shard and every expert once)."""
    return param_counts(m, ParallelDims()).total
