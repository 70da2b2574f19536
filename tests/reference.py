"""Single-process reference attention: plain math in float64 over the full sequence."""

from __future__ import annotations

import torch


def allowed(qpos, kpos, causal, window):
    """[len(qpos), len(kpos)] boolean: may the query at qpos[i] see the key at kpos[j]."""
    i, j = qpos[:, None], kpos[None, :]
    m = torch.ones(len(qpos), len(kpos), dtype=torch.bool)
    if causal:
        m &= j <= i
    if window is not None:
        m &= (i - j) < window
        if not causal:
            m &= (j - i) < window
    return m


def reference_attention(q, k, v, causal=True, window=None, doc_ids=None, scale=None):
    """q [b, s, h, d], k/v [b, s, h_kv, d] full sequences; rows that see no key give 0."""
    b, s, h, d = q.shape
    rep = h // k.shape[2]
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    scale = d ** -0.5 if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    m = allowed(torch.arange(s), torch.arange(s), causal, window)[None, None]
    if doc_ids is not None:
        m = m & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    scores = scores.masked_fill(~m, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v.double()).to(q.dtype)
