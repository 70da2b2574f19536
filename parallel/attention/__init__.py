"""Exact sequence-parallel attention: ring, Ulysses and the 2-D hybrid, one file per algorithm."""

from .hybrid import sequence_parallel_attention
from .layout import local_positions, sequence_positions, shard_sequence, sp_groups, unshard_sequence
from .plan import AttentionPlan, plan_attention
from .ring import ring_attention
from .ulysses import ulysses_attention

__all__ = [
    "sequence_parallel_attention", "plan_attention", "AttentionPlan", "shard_sequence", "unshard_sequence",
    "sequence_positions", "local_positions", "ring_attention", "ulysses_attention", "sp_groups",
]
