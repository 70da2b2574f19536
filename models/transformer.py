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

from longtrain.parallel.attention import AttentionPlan, plan_attention, sequence_positions
from longtrain.parallel.comm import all_reduce, group_rank, group_size
from longtrain.parallel.sharding import retag, sharding_of
from longtrain.parallel.tensor import ColumnParallelLinear, VocabParallelEmbedding, vocab_parallel_cross_entropy

from .config import ModelConfig
from .layers import Attention, DenseFFN, Parallel, RMSNorm
from .rope import rope_tables
from .actquant import ActQuant
from .memtrim import trim_after_backward
from .moe import MoELayer

IGNORE = -100


class Block(nn.Module):
    """Pre-norm decoder block. Returns (x, balance loss of its MoE FFN or 0)."""

    def __init__(self, cfg: ModelConfig, par: Parallel, index: int, quant: ActQuant, device=None):
        super().__init__()
        self.cfg, self.par, self.index, self.quant = cfg, par, index, quant
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, device)
        self.attn = Attention(cfg, par, device, window=cfg.layer_window(index))
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, device)
        self.moe = cfg.is_moe_layer(index)
        if self.moe:
            m = cfg.moe
            shared = DenseFFN(cfg, par, device, m.expert_hidden or cfg.ffn_hidden) if m.shared_expert else None
            self.mlp = MoELayer(cfg.dim, cfg.ffn_hidden, m, ep_group=par.ep_group, token_group=par.token_group,
                                shared=shared, stats=par.stats, device=device)
        else:
            self.mlp = DenseFFN(cfg, par, device)

    def _qkv(self, x, cos, sin):
        return self.attn.project(self.par.enter(self.attn_norm(x)), (cos, sin))

    def _rest(self, x, o, gates, aux):
        h = x + self.par.leave(self.attn.output(o, gates))
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


@dataclass
class LossOutput:
    """Sum of token losses and count of counted tokens on this rank (labels != -100), and the
    weighted MoE balance losses (already global: computed from statistics of the whole batch)."""

    loss_sum: torch.Tensor
    tokens: torch.Tensor
    aux: torch.Tensor | float = 0.0


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
    def __init__(self, cfg: ModelConfig, par: Parallel | None = None, device=None, part: Part | None = None):
        super().__init__()
        self.cfg, self.par = cfg, par or Parallel()
        self.part = part or Part(tuple(range(cfg.n_layers)))
        cfg.check_layout(self.par.tp, _ulysses(self.par.mesh), group_size(self.par.ep_group))
        g = self.par.tp_group
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.dim, g, device=device) if self.part.first else None
        self.quant = ActQuant(cfg.act_quant)
        self.layers = LayerStack({str(i): Block(cfg, self.par, i, self.quant, device) for i in self.part.layers})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, device) if self.part.last else None
        self.head = ColumnParallelLinear(cfg.dim, cfg.vocab_size, g, device=device) if self.part.last else None
        self.tie()
        if self.par.sequence_parallel and self.par.tp > 1:
            for p in self.parameters():  # not split over tp: each tp rank saw only its sequence slice
                s = sharding_of(p)
                if not (s.sharded and s.axis == "tp"):
                    retag(p, partial_over_tp=True)
        if self.par.tp > 1 and self.norm is not None:  # the final norm runs inside the tp region, per loss chunk: each tp
            retag(self.norm.weight, partial_over_tp=True)  # rank differentiates it through its vocab shard only

    def tie(self) -> None:
        """With `tie_embeddings`, the head's weight is the embedding's: both are [vocab/tp, dim]
        rows of the same tp shard, so one parameter serves both (and is counted once)."""
        if self.cfg.tie_embeddings and self.embed is not None and self.head is not None:
            self.head.weight = self.embed.weight

    def batch_context(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> "BatchContext":
        """What every layer needs for one micro-batch, made once per batch, not per layer:
        rotary tables at the global positions of this rank's tokens, and the attention plan
        (validation across the sequence-parallel ranks, the document-id gathers). Attention
        sees [b, s_local, heads/tp, hd]: under TP-SP the block gathers over tp first."""
        par, cfg = self.par, self.cfg
        seq_len = input_ids.shape[1] * _cp(par.mesh)
        pos = sequence_positions(seq_len, par.mesh, device=input_ids.device)  # global, in the shard layout
        cos, sin = rope_tables(pos, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, seq_len)
        plan = plan_attention(par.mesh, (input_ids.shape[0], input_ids.shape[1], cfg.n_heads // par.tp, cfg.head_dim),
                              cfg.n_kv_heads // par.tp, causal=True, window=cfg.layer_window(0),
                              windows=cfg.windows, doc_ids=doc_ids, device=input_ids.device)
        return BatchContext(cos, sin, plan)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The residual stream [b, s_local(/tp with TP-SP), dim] of the first layer."""
        return self.par.leave(self.embed(input_ids))  # complete the vocab-parallel lookup (and split under TP-SP)

    def run_layers(self, x: torch.Tensor, ctx: "BatchContext", aux: torch.Tensor | None = None):
        """This rank's decoder layers over `x`: (x, balance losses summed onto `aux`)."""
        aux = x.new_zeros((), dtype=torch.float32) if aux is None else aux
        for layer in self.layers:
            x, a = layer(x, ctx.cos, ctx.sin, ctx.plan)
            aux = aux + a
        return x, aux

    def hidden(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None, norm: bool = True):
        """(final hidden states [b, s_local(/tp with TP-SP), dim], normed unless `norm=False`,
        summed balance losses)."""
        x, aux = self.run_layers(self.embed_tokens(input_ids), self.batch_context(input_ids, doc_ids))
        return (self.norm(x) if norm else x), aux

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor | None = None) -> LossOutput:
        h, aux = self.hidden(input_ids, doc_ids, norm=False)  # the final norm runs per loss chunk
        out = self.lm_loss(h, labels)
        out.aux = aux
        return out

    def lm_loss(self, h: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        """Loss sums of the un-normed final residual stream `h` (the norm runs per loss chunk)."""
        return chunked_lm_loss(self.par.enter(h), self.head, labels, self.cfg.loss_chunk, self.par, self.norm)

    @torch.no_grad()
    def eval_counts(self, input_ids: torch.Tensor, labels: torch.Tensor,
                    doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward pass for evaluation on this rank's slice: (loss sum, per-sequence count of
        labeled tokens [b], per-sequence count of those predicted exactly [b]: argmax over the
        whole, possibly vocab-parallel, vocabulary equals the label). Sum over the cp group for
        whole sequences; every tp rank returns the same numbers."""
        h, _ = self.hidden(input_ids, doc_ids)
        return self.head_counts(h, labels)

    @torch.no_grad()
    def head_counts(self, h: torch.Tensor, labels: torch.Tensor):
        """`eval_counts` from the normed final hidden states (the last pipeline stage's part)."""
        h = self.par.enter(h)
        loss = h.new_zeros((), dtype=torch.float32)
        correct = torch.zeros(labels.shape[0], dtype=torch.long, device=labels.device)
        for hc, lc in zip(h.split(self.cfg.loss_chunk, dim=1), labels.split(self.cfg.loss_chunk, dim=1)):
            logits = torch.nn.functional.linear(hc, self.head.weight)  # once per chunk, for both
            loss += _logits_loss(logits, lc, self.par)
            correct += _logits_correct(logits, lc, self.par)
        return loss, (labels != IGNORE).sum(1), correct

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


def _cp(mesh) -> int:
    return 1 if mesh is None else mesh.size("cp_ring") * mesh.size("cp_ulysses")


def _ulysses(mesh) -> int:
    return 1 if mesh is None else mesh.size("cp_ulysses")


def _chunk_loss(h, weight, labels, par, norm=None, norm_weight=None):
    if norm is not None:  # the norm's weight is an explicit input, so the recompute sees it
        h = norm(h)
    return _logits_loss(torch.nn.functional.linear(h, weight), labels, par)  # logits [b, c, V/tp]


def _logits_loss(logits, labels, par):
    mask = labels != IGNORE
    loss = vocab_parallel_cross_entropy(logits, labels.masked_fill(~mask, 0), par.tp_group, par.stats)
    return (loss * mask).sum()


def _logits_correct(logits, labels, par) -> torch.Tensor:
    """Per sequence: labeled positions whose label is the argmax of the vocab-parallel logits."""
    logits = logits.float()
    mask = labels != IGNORE
    local_v = logits.shape[-1]
    idx = labels - group_rank(par.tp_group) * local_v
    here = mask & (idx >= 0) & (idx < local_v)
    label_logit = logits.gather(-1, idx.clamp(0, local_v - 1).unsqueeze(-1)).squeeze(-1) * here
    best = logits.amax(-1)
    if group_size(par.tp_group) > 1:
        best = all_reduce(best, par.tp_group, op=torch.distributed.ReduceOp.MAX)
        label_logit = all_reduce(label_logit, par.tp_group)
    return ((label_logit >= best) & mask).sum(1)


def chunked_lm_loss(h: torch.Tensor, head: ColumnParallelLinear, labels: torch.Tensor, chunk: int,
                    par: Parallel, norm: nn.Module | None = None) -> LossOutput:
    """Sum of token losses over [b, s] in chunks of `chunk` tokens, logits recomputed in backward.
    With `norm`, `h` is the un-normed residual stream and each chunk normalizes its own tokens
    inside the recomputed region: backward keeps only `h`, not h and its normalized copies."""
    total = h.new_zeros((), dtype=torch.float32)
    w = None if norm is None else norm.weight
    for hc, lc in zip(h.split(chunk, dim=1), labels.split(chunk, dim=1)):
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, hc, head.weight, lc, par, norm, w, use_reentrant=False)
        else:
            total = total + _chunk_loss(hc, head.weight, lc, par, norm, w)
    return LossOutput(total, (labels != IGNORE).sum())


def global_loss(out: LossOutput, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, mean loss for reporting): the token mean over every rank of
    `group` (data x sequence parallel). Each rank's loss is its own sum over the global count,
    so summing gradients over the group gives the gradient of the global mean."""
    count = all_reduce(out.tokens.detach().clone().float(), group)
    loss = out.loss_sum / count.clamp(min=1)
    mean = all_reduce(loss.detach().clone(), group)
    return loss + out.aux, mean


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
        seed_name = tied_name(name, model)  # a pipeline's last stage holds its own copy of a tied head
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


def tied_name(name: str, model: nn.Module) -> str:
    """The parameter `name` stands for: "embed.weight" for the head of a tied model whose head
    and embedding sit on different pipeline stages (the head is a copy kept equal to it)."""
    cfg = getattr(model, "cfg", None)
    if name == "head.weight" and cfg is not None and cfg.tie_embeddings and getattr(model, "embed", None) is None:
        return "embed.weight"
    return name


def _set(model: nn.Module, name: str, value: nn.Parameter) -> None:
    mod_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(mod_name) if mod_name else model, attr, value)


def build_model(cfg: ModelConfig, mesh=None, *, seed: int = 0, device: str = "cpu", dtype=torch.float32,
                sequence_parallel: bool = True, source=None, part: Part | None = None) -> LongLM:
    """The model for this rank of `mesh` (None: one process), with seed-determined weights (or
    those `source` gives: see `materialize`); `part`: only these layers (a pipeline stage's)."""
    sp = sequence_parallel and mesh is not None and mesh.size("tp") > 1
    par = Parallel(mesh=mesh, sequence_parallel=sp)
    with torch.device("meta"):
        model = LongLM(cfg, par, part=part)
    return materialize(model, seed, device, dtype, source)
