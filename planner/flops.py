"""FLOPs of a training step, and a lower bound on its time from a measured or datasheet rate.

Model FLOPs (for MFU) count what the model needs: every matmul forward (2 per multiply-add)
and backward (twice the forward), and attention over the (query, key) pairs each layer's mask
keeps (4 * heads * head_dim per pair forward, 2x that backward), inside the packed documents
of the run's data where attention stays within them (`documents`). Hardware FLOPs add what
activation checkpointing computes again.
"""

from __future__ import annotations

from dataclasses import dataclass

from longtrain.config.train import TrainConfig

from .documents import kept_pairs, pairs_per_sequence
from .gpus import GPUS
from .shapes import param_counts

__all__ = ["DATASHEET", "StepFlops", "kept_pairs", "step_flops"]

# dense bf16 tensor-core peaks (datasheets), FLOP/s, for GPUs the plan may be asked about
DATASHEET = {kind: gpu.bf16 for kind, gpu in GPUS.items()}


@dataclass(frozen=True)
class StepFlops:
    model: float  # whole job, one optimizer step
    hardware: float  # with recomputation
    per_rank: float  # hardware FLOPs one rank computes
    attention_basis: str = "whole windows (no document mask)"  # what attention pairs were counted over

    def mfu(self, seconds: float, rate_per_rank: float, ranks: int) -> float:
        return self.model / seconds / (rate_per_rank * ranks)


def step_flops(cfg: TrainConfig) -> StepFlops:
    m, p = cfg.model, cfg.parallel
    seqs = cfg.data.batch_size * p.dp * cfg.grad_accum  # sequences per step, job-wide
    tokens = seqs * cfg.data.seq_len
    full = param_counts(m, type(p)(), cfg.sequence_parallel)
    embed = m.vocab_size * m.dim
    active_experts = 0
    if m.moe is not None:  # only top_k experts run per token
        hidden = m.moe.expert_hidden or m.ffn_hidden
        moe_layers = sum(m.is_moe_layer(i) for i in range(m.n_layers))
        active_experts = moe_layers * (m.moe.num_experts - m.moe.top_k) * 3 * m.dim * hidden
    matmul = full.total - embed - active_experts  # the LM head is a matmul, the embedding a lookup
    pairs, basis = pairs_per_sequence(cfg)
    attn = sum(4 * m.n_heads * m.head_dim * p_i for p_i in pairs) * seqs
    fwd = 2 * matmul * tokens + attn
    model = 3 * fwd
    layer_fwd = (fwd - 2 * embed * tokens) / m.n_layers  # one layer's share, the head aside
    again = {"none": 0.0, "selective": 1.0, "full": 1.0}[m.checkpoint] * layer_fwd * m.n_layers
    if m.checkpoint == "selective":  # attention itself is kept, not recomputed
        again -= attn
    hardware = model + again
    world = p.dp * p.cp_ring * p.cp_ulysses * p.tp * p.pp
    return StepFlops(model=model, hardware=hardware, per_rank=hardware / world, attention_basis=basis)
