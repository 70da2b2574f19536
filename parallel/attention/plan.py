"""The per-batch attention plan: validate, agree across ranks and gather document ids once.

Every layer of a model attends over the same sequence layout with the same shapes and the
same document ids; only q/k/v (and perhaps the window) change. Comparing shapes across ranks
(an all-gather and a host copy), gathering document ids and classifying ring blocks against
them (device syncs) on every call costs a collective and several syncs per layer and per hop.
`plan_attention` does that work once per batch; each call then only compares q/k/v with the
plan in Python (no collective, no device sync) and reads the block lists the plan caches per
(causal, window), so layers may use different windows without any further collective.

Hang safety is kept: ranks agree on the plan before any data collective, and every call
checks, locally, that its tensors match the plan, so ranks that pass agree with each other.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Iterable

import torch
from torch.distributed import ProcessGroup

from ..comm import CommStats, all_gather_cat, check_agreement, group_size
from .blocks import LAYOUTS, Layout
from .layout import check_sequence_length, sp_groups
from .ring import ring_plan
from .ringplan import RingPlan
from .ulysses import check_ulysses_heads

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_NAMES = ["batch", "seq_local", "heads", "kv_heads", "head_dim", "causal", "window", "windows",
          "doc_ids", "dtype", "layout"]


@dataclass(eq=False)
class AttentionPlan:
    """What `sequence_parallel_attention` needs beyond q/k/v, for every layer of one batch."""

    mesh: object | None
    ulysses_group: ProcessGroup | None
    ring_group: ProcessGroup | None
    stats: CommStats | None
    shape: tuple[int, int, int, int, int]  # batch, seq_local, heads, kv_heads, head_dim on this rank
    causal: bool
    windows: frozenset  # every window a call may use (None: no window)
    layout: Layout
    dtype: torch.dtype | None  # None: whatever each call brings (autocast), q/k/v alike
    doc_ids: torch.Tensor | None  # as given: a call may pass this very tensor again
    ring: RingPlan  # gathered document ids and cached ring block lists

    def check(self, q, k, v, mesh, causal: bool, window: int | None, layout: Layout,
              doc_ids: torch.Tensor | None = None) -> None:
        """Raise ValueError unless this call matches the plan. Python only: no collective, no sync."""
        b, s, h, hkv, d = self.shape
        if q.shape != (b, s, h, d) or k.shape != (b, s, hkv, d) or v.shape != (b, s, hkv, d):
            raise ValueError(f"the attention plan is for q [{b}, {s}, {h}, {d}] and k/v [{b}, {s}, {hkv}, {d}]; "
                             f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}: build the plan "
                             f"(plan_attention) from the shapes attention receives on this rank")
        if q.dtype != k.dtype or q.dtype != v.dtype or (self.dtype is not None and q.dtype != self.dtype):
            raise ValueError(f"q, k, v must share a dtype{'' if self.dtype is None else f' ({self.dtype})'}; "
                             f"got {q.dtype}, {k.dtype}, {v.dtype}")
        if (mesh.dims, mesh.rank) != (self.mesh.dims, self.mesh.rank) or layout != self.layout:
            raise ValueError(f"the attention plan was built for another mesh or layout ({self.layout!r}, "
                             f"got {layout!r}): pass the same mesh and layout to plan_attention")
        if causal != self.causal or window not in self.windows:
            raise ValueError(f"the attention plan allows causal={self.causal} and windows "
                             f"{sorted(self.windows, key=_window_key)}; got causal={causal}, window={window}: "
                             f"list every layer's window in plan_attention(windows=...)")
        if doc_ids is not None and doc_ids is not self.doc_ids:
            raise ValueError("with a plan, pass doc_ids to plan_attention (once per batch), not to each call")


def _window_key(w: int | None) -> int:
    return -1 if w is None else w


def _validate(q_shape, kv_heads: int, causal: bool, window, windows: frozenset, doc_ids, dtype,
              uly: int, ring: int, layout: Layout) -> list[int]:
    """Local checks of everything the ranks must agree on; returns the vector they compare."""
    if len(q_shape) != 4:
        raise ValueError(f"q must be [batch, seq_local, heads, head_dim]; got {tuple(q_shape)}")
    b, s, h, d = (int(x) for x in q_shape)
    if kv_heads < 1 or h % kv_heads:
        raise ValueError(f"query heads ({h}) must be a multiple of K/V heads ({kv_heads}) for GQA/MQA")
    check_ulysses_heads(h, kv_heads, uly)
    check_sequence_length(s * uly * ring, ring, uly, layout)
    for w in windows:
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 1):
            raise ValueError(f"window must be a positive int (keys per query) or None, got {w!r}")
    if not isinstance(layout, str) and doc_ids is None:
        raise ValueError("a document layout (doclayout.DocumentLayout) needs the batch's doc_ids: its ring messages "
                         "carry only documents that span ranks")
    if doc_ids is not None and tuple(doc_ids.shape) not in ((b, s), (s,)):
        raise ValueError(f"doc_ids must be [batch, seq_local] = [{b}, {s}] (or [seq_local]), "
                         f"got {tuple(doc_ids.shape)}")
    digest = zlib.crc32(repr(sorted(_window_key(w) for w in windows)).encode())
    return [b, s, h, kv_heads, d, int(causal), _window_key(window), digest, int(doc_ids is not None),
            -1 if dtype is None else _DTYPES.get(dtype, 9), layout_code(layout)]


def layout_code(layout) -> int:
    """The sequence layout as a number the ranks compare: a document layout by its pieces' checksum."""
    return LAYOUTS.index(layout) if isinstance(layout, str) else len(LAYOUTS) + layout.key


def _device(mesh, doc_ids) -> torch.device | str:
    """Where the sequence-parallel groups communicate (CUDA for NCCL)."""
    if doc_ids is not None:
        return doc_ids.device
    kind = mesh.device_type
    return torch.device(kind, torch.cuda.current_device()) if kind == "cuda" else kind


def plan_attention(mesh, q_shape, kv_heads: int, *, causal: bool = True, window: int | None = None,
                   windows: Iterable[int | None] = (), doc_ids: torch.Tensor | None = None,
                   layout: Layout = "zigzag", dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> AttentionPlan:
    """Plan one batch of `sequence_parallel_attention` calls: validate, agree, gather documents.

    `q_shape` is this rank's q as attention receives it, [b, s_local, heads, head_dim], with
    `kv_heads` K/V heads; `doc_ids` [b, s_local] (or [s_local]) in the sequence layout.
    Calls may use `window` or any of `windows` (per-layer windows), with the same `causal`.
    `dtype`, if given, is agreed and required of every call; None leaves it to the call (autocast).
    Collectives: one metadata all-gather over the sequence-parallel ranks, and with documents
    one gather per sequence-parallel axis. Then calls issue none of their own.
    """
    (uly, ring, stats), cp = sp_groups(mesh), mesh.group("cp")
    allowed = frozenset([window, *windows])
    meta = _validate(tuple(q_shape), kv_heads, causal, window, allowed, doc_ids, dtype,
                     group_size(uly), group_size(ring), layout)
    check_agreement(meta, cp, "sequence_parallel_attention", _NAMES, device=device or _device(mesh, doc_ids),
                    stats=stats)
    b, s = int(q_shape[0]), int(q_shape[1])
    share = None  # this ring rank's document ids [b, s * U]: the Ulysses ranks' slices side by side
    if doc_ids is not None:
        share = doc_ids.expand(b, s) if doc_ids.dim() == 1 else doc_ids
        share = all_gather_cat(share.contiguous(), uly, dim=1, stats=stats, kind="doc_ids")
    rp = ring_plan(share, ring, s * group_size(uly), stats, layout)
    return AttentionPlan(mesh, uly, ring, stats, (b, s, int(q_shape[2]), int(kv_heads), int(q_shape[3])),
                         bool(causal), allowed, layout, dtype, doc_ids, rp)
