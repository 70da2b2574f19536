"""The decoder-only LM, parallel along tp and the sequence axes of the mesh.

Built on the meta device and materialized shard by shard (`materialize`): every parameter is
drawn in full from a generator seeded by (seed, parameter name) and this rank keeps its
slice, so one seed gives the same model on every layout and layouts compare exactly.

The loss is computed in chunks of `loss_chunk` tokens, each chunk's logits recomputed in
backward, so a million-token sequence never holds all its logits. Activation checkpointing
"selective" recomputes everything but attention (its output and log-sum-exp stay saved, as in
LightSeq): recomputing attention would redo the whole ring.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from longtrain.data.batch import labeled
from longtrain.parallel.attention import AttentionPlan, plan_attention, sequence_positions
from longtrain.parallel.attention.blocks import Layout
from longtrain.parallel.sharding import retag, sharding_of, tied_name
from longtrain.parallel.mesh import ParallelMesh
from longtrain.parallel.tensor import ColumnParallelLinear, VocabParallelEmbedding, enter_tp, leave_tp

from .config import ModelConfig
from .layers import Attention, DenseFFN, RMSNorm
from .loss import LossOutput, chunked_lm_loss, logits_correct, logits_loss
from .rope import rope_tables
from .actquant import ActQuant
from .memtrim import trim_after_backward
from .moe import MoELayer
from .parallelize import parallelize

class Block(nn.Module):
    """Pre-norm decoder block. Returns (x, balance loss of its MoE FFN or 0)."""

    def __init__(self, cfg: ModelConfig, index: int, quant: ActQuant, device=None):
        super().__init__()
        self.cfg, self.index, self.quant = cfg, index, quant
        self.mesh = ParallelMesh.single()  # until the model is laid out (`parallelize`)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, device)
        self.attn = Attention(cfg, device, window=cfg.layer_window(index))
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, device)
        self.moe = cfg.is_moe_layer(index)
        if self.moe:
            m = cfg.moe
            shared = DenseFFN(cfg, device, m.expert_hidden or cfg.ffn_hidden) if m.shared_expert else None
            self.mlp = MoELayer(cfg.dim, cfg.ffn_hidden, m, shared=shared, device=device)
        else:
            self.mlp = DenseFFN(cfg, device)

    def _qkv(self, x, cos, sin):
        return self.attn.project(enter_tp(self.attn_norm(x), self.mesh), (cos, sin))

    def _rest(self, x, o, gates, aux):
        h = x + leave_tp(self.attn.output(o, gates), self.mesh)
        with self.quant.site(self.index, "mlp"):
            if self.moe:  # routes the tokens this rank holds; output is complete, no tp reduction
                out, moe_aux = self.mlp(self.mlp_norm(h))
                return h + out, aux + moe_aux
            return h + self.mlp(self.mlp_norm(h)), aux

    def _attend(self, q, k, v, plan):
        with self.quant.site(self.index, "attention"):
            return self.attn.attend(q, k, v, plan)

    def _full(self, x, cos, sin, plan):
        q, k, v, gates, aux = self._qkv(x, cos, sin)
        return self._rest(x, self._attend(q, k, v, plan), gates, aux)

    def forward(self, x, cos, sin, plan: AttentionPlan | None = None):
        """`plan`: the batch's attention plan (doc ids included), shared by every layer."""
        mode = self.cfg.checkpoint if self.training and torch.is_grad_enabled() else "none"
        trim_after_backward(x)  # this block's backward freed its workspace: give it back (CPU heap)
        if mode == "full":
            return checkpoint(self._full, x, cos, sin, plan, use_reentrant=False)
        if mode == "selective":  # attention keeps its own saved tensors; the rest is recomputed
            q, k, v, gates, aux = checkpoint(self._qkv, x, cos, sin, use_reentrant=False)
            o = self._attend(q, k, v, plan)
            return checkpoint(self._rest, x, o, gates, aux, use_reentrant=False)
        return self._full(x, cos, sin, plan)


@dataclass
class BatchContext:
    """Per micro-batch inputs of every layer (`LongLM.batch_context`)."""

    cos: torch.Tensor
    sin: torch.Tensor
    plan: AttentionPlan | None


@dataclass(frozen=True)
class Part:
    """The part of the model one rank holds: its decoder layers (global indices), and whether
    it has the embedding (first pipeline stage) and the final norm and head (last)."""

    layers: tuple[int, ...]
    first: bool = True
    last: bool = True


class LayerStack(nn.ModuleDict):
    """The decoder layers a rank holds, keyed by their global index: parameter names are the
    same ("layers.5.attn.wq.weight") whichever pipeline stage holds them, so a checkpoint moves
    between pipeline layouts. Iterates over the layers in order; `stack[i]` is layer i."""

    def __iter__(self):
        return iter(self.values())

    def __getitem__(self, i):
        return super().__getitem__(str(i))


class LongLM(nn.Module):
    """The whole model, for one process; `parallelize` lays it out over a mesh (a pipeline
    rank's part, tensor and expert cuts, TP sequence parallel), `materialize` gives it memory."""

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.cfg = cfg
        self.mesh = ParallelMesh.single()  # until the model is laid out (`parallelize`)
        self.part = Part(tuple(range(cfg.n_layers)))
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.dim, device=device)
        self.quant = ActQuant(cfg.act_quant)
        self.layers = LayerStack({str(i): Block(cfg, i, self.quant, device) for i in self.part.layers})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, device)
        self.head = ColumnParallelLinear(cfg.dim, cfg.vocab_size, device=device)
        self.tie()

    def keep_part(self, part: Part) -> None:
        """Drop the layers, embedding and head this pipeline rank does not hold (a step of
        `parallelize`). A tied embedding split over two stages becomes two copies: the head's
        stands for the embedding and the two are kept equal over ``pp_ends``."""
        for key in [k for k in self.layers.keys() if int(k) not in part.layers]:
            del self.layers[key]
        if not part.first:
            self.embed = None
        if not part.last:
            self.norm = self.head = None
        self.part = part
        if self.cfg.tie_embeddings and (self.embed is None) != (self.head is None):
            retag((self.embed or self.head).weight, tied="embed.weight")

    def tie(self) -> None:
        """With `tie_embeddings`, the head's weight is the embedding's: both are [vocab/tp, dim]
        rows of the same tp shard, so one parameter serves both (and is counted once)."""
        if self.cfg.tie_embeddings and self.embed is not None and self.head is not None:
            self.head.weight = self.embed.weight

    def batch_context(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                      layout: Layout = "zigzag") -> "BatchContext":
        """What every layer needs for one micro-batch, made once per batch, not per layer:
        rotary tables at the global positions of this rank's tokens, and the attention plan
        (validation across the sequence-parallel ranks, the document-id gathers). Attention
        sees [b, s_local, heads/tp, hd]: under TP-SP the block gathers over tp first. `layout`:
        the sequence layout the batch was sharded in (a `DocumentLayout` lays a batch's rows end
        to end: rotary positions restart at each row)."""
        mesh, cfg, tp = self.mesh, self.cfg, self.mesh.size("tp")
        seq_len = input_ids.shape[1] * mesh.size("cp")
        pos = sequence_positions(seq_len, mesh, device=input_ids.device, layout=layout)  # global, in the layout
        row_len = seq_len if isinstance(layout, str) else layout.row_len or seq_len
        cos, sin = rope_tables(pos % row_len, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, row_len)
        plan = plan_attention(mesh, (input_ids.shape[0], input_ids.shape[1], cfg.n_heads // tp, cfg.head_dim),
                              cfg.n_kv_heads // tp, causal=True, window=cfg.layer_window(0),
                              windows=cfg.windows, doc_ids=doc_ids, layout=layout, device=input_ids.device)
        return BatchContext(cos, sin, plan)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The residual stream [b, s_local(/tp with TP-SP), dim] of the first layer."""
        return leave_tp(self.embed(input_ids), self.mesh)  # complete the vocab-parallel lookup (and split under TP-SP)

    def run_layers(self, x: torch.Tensor, ctx: "BatchContext", aux: torch.Tensor | None = None):
        """This rank's decoder layers over `x`: (x, balance losses summed onto `aux`)."""
        aux = x.new_zeros((), dtype=torch.float32) if aux is None else aux
        for layer in self.layers:
            x, a = layer(x, ctx.cos, ctx.sin, ctx.plan)
            aux = aux + a
        return x, aux

    def hidden(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None, norm: bool = True,
               layout: Layout = "zigzag"):
        """(final hidden states [b, s_local(/tp with TP-SP), dim], normed unless `norm=False`,
        summed balance losses)."""
        x, aux = self.run_layers(self.embed_tokens(input_ids), self.batch_context(input_ids, doc_ids, layout))
        return (self.norm(x) if norm else x), aux

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor | None = None,
                layout: Layout = "zigzag") -> LossOutput:
        h, aux = self.hidden(input_ids, doc_ids, norm=False, layout=layout)  # the final norm runs per loss chunk
        out = self.lm_loss(h, labels)
        out.aux = aux
        return out

    def lm_loss(self, h: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        """Loss sums of the un-normed final residual stream `h` (the norm runs per loss chunk)."""
        return chunked_lm_loss(enter_tp(h, self.mesh), self.head, labels, self.cfg.loss_chunk, self.mesh, self.norm)

    @torch.no_grad()
    def eval_counts(self, input_ids: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor | None = None,
                    layout: Layout = "zigzag", rows: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward pass for evaluation on this rank's slice: (loss sum, per-sequence count of
        labeled tokens [b], per-sequence count of those predicted exactly [b]: argmax over the
        whole, possibly vocab-parallel, vocabulary equals the label). Sum over the cp group for
        whole sequences; every tp rank returns the same numbers. A batch in a `DocumentLayout`
        (its rows end to end in one) gives `rows`, each token's row, and counts per row of it."""
        h, _ = self.hidden(input_ids, doc_ids, layout=layout)
        return self.head_counts(h, labels, None if rows is None else (rows, layout.rows))

    @torch.no_grad()
    def head_counts(self, h: torch.Tensor, labels: torch.Tensor, rows: tuple[torch.Tensor, int] | None = None):
        """`eval_counts` from the normed final hidden states (the last pipeline stage's part);
        `rows`: (each token's row [1, s], rows) when a batch's rows lie end to end."""
        h = enter_tp(h, self.mesh)
        loss = h.new_zeros((), dtype=torch.float32)
        n = labels.shape[0] if rows is None else rows[1]
        tokens = labels if rows is None else rows[0]
        correct = torch.zeros(n, dtype=torch.long, device=labels.device)
        labeled_rows = torch.zeros(n, dtype=torch.long, device=labels.device)
        for hc, lc, rc in zip(h.split(self.cfg.loss_chunk, dim=1), labels.split(self.cfg.loss_chunk, dim=1),
                              tokens.split(self.cfg.loss_chunk, dim=1)):
            logits = torch.nn.functional.linear(hc, self.head.weight)  # once per chunk, for both
            loss += logits_loss(logits, lc, self.mesh)
            if rows is None:
                correct += logits_correct(logits, lc, self.mesh)
                labeled_rows += labeled(lc).sum(1)
            else:
                correct.index_add_(0, rc.reshape(-1), logits_correct(logits, lc, self.mesh, per_token=True)
                                   .reshape(-1).long())
                labeled_rows.index_add_(0, rc.reshape(-1), labeled(lc).reshape(-1).long())
        return loss, labeled_rows, correct

    def moe_layers(self) -> list:
        return [layer.mlp for layer in self.layers if layer.moe]

    @torch.no_grad()
    def end_step(self, apply: bool = True) -> None:
        """Once per optimizer step, after every micro-batch: fold the step's statistics into the
        state they drive (MoE expert bias from the whole step's load; running activation-
        quantization scales), or drop them (`apply=False`: a skipped step). Per step, not per
        micro-batch, so the state is the same for any accumulation and any layout."""
        for layer in self.moe_layers():
            layer.update_bias(apply)
        self.quant.commit(apply)


# ---------------------------------------------------------------- initialization

def _param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _full_init(p: nn.Parameter, name: str, cfg: ModelConfig, seed: int) -> torch.Tensor:
    s = sharding_of(p)
    shape, kind = s.full_shape, s.init
    if kind in ("ones", "zeros"):
        return (torch.ones if kind == "ones" else torch.zeros)(shape)
    std = cfg.init_std / (2 * cfg.n_layers) ** 0.5 if kind == "scaled" else cfg.init_std
    g = torch.Generator().manual_seed(_param_seed(seed, name))
    return torch.randn(shape, generator=g) * std


@torch.no_grad()
def materialize(model: nn.Module, seed: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, source=None) -> nn.Module:
    """Give a meta-device model real storage: this rank's slice of each seed-determined
    parameter (or of `source(name, param)`, which returns that slice: a pretrained model's),
    and every buffer (router bias, anything registered later) on `device`.
    Buffers keep their own dtype; one created on meta starts at zeros, or at its Sharding's
    `init` if it has one ("ones"), since meta tensors carry no values."""
    cfg = model.cfg
    for name, p in list(model.named_parameters()):
        seed_name = tied_name(name, p)  # a pipeline's last stage holds its own copy of a tied head
        local = source(seed_name, p) if source is not None else \
            sharding_of(p).local_slice(_full_init(p, seed_name, cfg, seed))
        new = nn.Parameter(local.to(device=device, dtype=dtype).contiguous())
        new.__dict__.update(p.__dict__)  # its Sharding
        _set(model, name, new)
    for name, b in list(model.named_buffers()):
        if b.is_meta:
            fill = torch.ones if getattr(b, "sharding", None) is not None and b.sharding.init == "ones" else torch.zeros
            new = fill(b.shape, dtype=b.dtype, device=device)
        else:
            new = b.to(device)
        new.__dict__.update(b.__dict__)
        mod_name, _, attr = name.rpartition(".")
        (model.get_submodule(mod_name) if mod_name else model)._buffers[attr] = new
    if hasattr(model, "tie"):
        model.tie()  # a shared parameter is materialized once, under its first name
    return model


def _set(model: nn.Module, name: str, value: nn.Parameter) -> None:
    mod_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(mod_name) if mod_name else model, attr, value)


def build_model(cfg: ModelConfig, mesh: ParallelMesh, *, seed: int = 0, device: str = "cpu", dtype=torch.float32,
                source=None, part: Part | None = None) -> LongLM:
    """The model for this rank of `mesh` (`ParallelMesh.single()`: one process), with seed-
    determined weights (or those `source` gives: see `materialize`); `part`: only these layers
    (a pipeline stage's). Built whole on the meta device, laid out, then given memory."""
    with torch.device("meta"):
        model = parallelize(LongLM(cfg), mesh, part)
    return materialize(model, seed, device, dtype, source)
