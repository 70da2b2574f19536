"""Peak memory of one rank, tensor by tensor, from the config and the layout.

The peak of a training step is the larger of two moments:
- backward of the top layer: weights, gradients and optimizer state, everything every layer
  saved for backward (what the checkpoint policy keeps, quantized where act_quant says), the
  tensors the top layer recomputes and the gradients it produces, plus the buffers of its
  collectives (ring K/V in flight, Ulysses all-to-all copies);
- the gradient sync and optimizer step: weights, gradients, moments and one bucket.
Under ZeRO the moments are this rank's chunks (1/R of each parameter over its R replicas) and,
at ZeRO-2, the step holds gradient chunks instead of whole gradients. Under pipeline parallelism
each pipeline rank holds its own layers, and the activations of as many micro-batches as its
schedule keeps in flight (`pipeline.in_flight`); the plan is the largest pipeline rank's.
Both include the host copy of the weights and moments a background checkpoint save holds
while it writes (`checkpoint.async_save`), as the steps it overlaps do.
On CPU the measured peak is the resident set, so the process's own baseline (Python, torch,
the backend, the data reader) is added; on GPU the allocator's peak, without it.
Sizes follow the code (`models.transformer`, `models.layers`, `parallel.attention`):
`bench plan` measures them side by side with real runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from longtrain.config.train import TrainConfig

from longtrain.parallel.attention.ringplan import BAND_ROWS, message_rows

from longtrain.parallel.grads import BUCKET_BYTES as BUCKET
from longtrain.parallel.pipeline import in_flight, rank_stages

from .comm import act_bytes
from .shapes import Local, Params, local_sizes, param_counts, pipeline_parts

MIB = 2**20


@dataclass
class Item:
    name: str
    bytes: float
    note: str = ""


@dataclass
class MemoryPlan:
    """Per-rank memory items (bytes) in groups, and the peak."""

    groups: dict[str, list[Item]] = field(default_factory=dict)
    baseline: float = 0.0
    pp_rank: int = 0  # which pipeline rank this is (the largest one's plan is reported)
    not_at_step: tuple[str, ...] = ()  # items of "state" freed before the optimizer step (ZeRO-2 gradients)

    def total(self, group: str) -> float:
        return sum(i.bytes for i in self.groups.get(group, []))

    @property
    def backward_peak(self) -> float:
        return self.baseline + sum(self.total(g) for g in ("state", "batch", "saved", "transient", "runtime"))

    @property
    def step_peak(self) -> float:
        state = sum(i.bytes for i in self.groups.get("state", []) if i.name not in self.not_at_step)
        return self.baseline + state + self.total("batch") + self.total("sync") + self.total("runtime")

    @property
    def host(self) -> float:
        """Bytes in the node's memory, apart from the device's (GPU: a checkpoint's staging copy)."""
        return self.total("host")

    @property
    def peak(self) -> float:
        return max(self.backward_peak, self.step_peak)


def replicas(cfg: TrainConfig) -> tuple[int, int]:
    """(R dense, R expert): the ranks holding each copy, over which ZeRO cuts (1: ZeRO off)."""
    p = cfg.parallel
    span = p.dp * p.cp_ring * p.cp_ulysses
    return (span, span // p.ep) if cfg.optim.zero else (1, 1)


def _state(cfg: TrainConfig, n: Params) -> list[Item]:
    rd, re_ = replicas(cfg)
    chunks = n.dense / rd + n.expert / re_  # elements whose moments this rank keeps
    zero = f", ZeRO-{cfg.optim.zero}: 1/{rd} of each dense and 1/{re_} of each expert parameter" if cfg.optim.zero else ""
    grads = ("fp32, whole during backward; reduce-scattered to chunks before the step (ZeRO-2)"
             if cfg.optim.zero == 2 else "fp32, in the gradient buckets (kept between steps)")
    held = n.total
    if cfg.optim.zero == 3:  # the blocks' parameters and gradients are FSDP chunks between uses
        held = n.outside_blocks + n.block_dense / rd + n.expert / re_
        grads = "fp32: FSDP chunks of the blocks' (reduce-scattered in backward), whole for embedding and head"
    return [Item("parameters", 4 * held, f"{held:,.0f} fp32 on this rank"
                 + (" (the blocks' as FSDP chunks)" if cfg.optim.zero == 3 else "")),
            Item("gradients", 4 * held, grads),
            Item("AdamW moments", 8 * chunks, "exp_avg + exp_avg_sq, fp32" + zero),
            Item("checkpoint staging", 4 * held + 8 * chunks if cfg.checkpoint.async_save and cfg.checkpoint.every
                 else 0, "host copy of parameters and moments while a background save writes them")]


def _batch(cfg: TrainConfig, loc: Local) -> list[Item]:
    full = cfg.data.batch_size * (cfg.data.seq_len + 1) * cfg.grad_accum
    cp = cfg.parallel.cp_ring > 1
    return [Item("batches", 8 * 3 * full + 8 * 3 * loc.tokens * cfg.grad_accum,
                 "ids, labels, doc ids: the loader's full sequences and this rank's shards, int64"),
            Item("document ids, whole sequence", 8 * cfg.data.batch_size * cfg.data.seq_len if cp else 0,
                 "gathered once per batch for the ring plan")]


def _attention_saved(cfg: TrainConfig, loc: Local, e: int) -> float:
    """What one layer's attention keeps for backward: q, k, v, out and the fp32 lse; int8 under act_quant."""
    m = cfg.model
    kvp = max(cfg.parallel.cp_ulysses, m.n_kv_heads // cfg.parallel.tp) * m.head_dim  # K/V after Ulysses
    elems = loc.tokens * (2 * loc.q_dim + 2 * kvp)
    lse = loc.tokens * loc.heads * 4
    q = m.act_quant
    if q is not None and "attention" in q.layers:  # [.., heads, head_dim] tensors: 1 byte + a scale per head
        return elems + (elems / m.head_dim * 4 if q.scale == "token" else 0) + lse
    return elems * e + lse


def _layer_saved(cfg: TrainConfig, loc: Local, e: int) -> float:
    m = cfg.model
    x = loc.stream * m.dim * e  # the layer's input: every policy keeps it
    if m.checkpoint == "full":
        return x
    if m.checkpoint == "selective":
        return _selective_layer_saved(cfg, loc, e)
    return _none_layer_saved(cfg, loc, e)


def _selective_layer_saved(cfg: TrainConfig, loc: Local, e: int) -> float:
    m, p = cfg.model, cfg.parallel
    q = m.act_quant
    # the attention output as the rest of the block receives it: a new tensor after the Ulysses
    # all-to-all, and kept in full precision beside attention's quantized copy under act_quant
    o = loc.tokens * loc.q_dim * e if p.cp_ulysses > 1 or (q is not None and "attention" in q.layers) else 0
    gates = loc.tokens * loc.heads * 4 if m.moh is not None else 0
    return loc.stream * m.dim * e + _attention_saved(cfg, loc, e) + o + gates


def _none_layer_saved(cfg: TrainConfig, loc: Local, e: int) -> float:
    """No checkpointing: both norms keep their input, normalized value and 1/rms; the linears
    their (tp-gathered) input; SwiGLU its gate, up, activation and product (unless chunked,
    which recomputes them). RoPE keeps only its tables (shared)."""
    m, p = cfg.model, cfg.parallel
    x = loc.stream * m.dim * e
    sp = p.tp > 1 and cfg.sequence_parallel
    norms = 3 * x + 2 * loc.stream * 4  # h, both normalized values, both 1/rms
    linear_in = 2 * loc.tokens * m.dim * e if sp else 2 * loc.stream * m.dim * e
    q = m.act_quant
    mlp_e = 1 + 4 / q.group_size if q is not None and "mlp" in q.layers else e
    mlp = 0 if m.mlp_chunk else 4 * loc.tokens * loc.ffn * mlp_e
    return _selective_layer_saved(cfg, loc, e) + norms + linear_in + mlp


def _saved(cfg: TrainConfig, loc: Local, part, pp_rank: int) -> list[Item]:
    m, e, p, pl = cfg.model, act_bytes(cfg), cfg.parallel, cfg.pipeline
    layers, _, last = part
    per = _layer_saved(cfg, loc, e)
    sp = p.tp > 1 and cfg.sequence_parallel
    final = (loc.tokens if sp else loc.stream) * m.dim * e if last else 0  # the loss chunks' input
    flight = in_flight(pl.schedule, p.pp, pl.virtual_stages, cfg.grad_accum, pp_rank)
    layers_kept = len(layers) / pl.virtual_stages * flight if p.pp > 1 else len(layers)
    why = f"; {flight} stage forwards in flight ({pl.schedule})" if p.pp > 1 else ""
    tables = cfg.grad_accum if p.pp > 1 else 1  # a pipeline makes every micro-batch's inputs first
    items = [Item("layers", per * layers_kept, f"{per / max(1, loc.tokens):.0f} B per local token per layer "
                                               f"(checkpoint={m.checkpoint}){why}")]
    if p.pp > 1:
        items.append(_pipeline_buffers(cfg, loc, pp_rank, flight))
    return items + [
            Item("final norm + loss input", final, "the last layer's output (gathered over tp under TP-SP); "
                                                  "the norm and logits are recomputed per chunk"),
            Item("rotary tables", tables * loc.tokens * m.head_dim * 4, "cos, sin [tokens, head_dim/2] fp32"
                 + (", every micro-batch's" if tables > 1 else ""))]


def _pipeline_buffers(cfg: TrainConfig, loc: Local, pp_rank: int, flight: int) -> Item:
    """torch's pipeline stages allocate a receive buffer per micro-batch up front (activations
    into every stage but the first, their gradients into every stage but the last), and keep
    each in-flight micro-batch's stage output until its backward."""
    p, pl, m = cfg.parallel, cfg.pipeline, cfg.grad_accum
    x = loc.stream * cfg.model.dim * 4 + 4  # the fp32 residual stream and the balance-loss sum
    stages = rank_stages(pp_rank, p.pp, pl.virtual_stages)
    last = p.pp * pl.virtual_stages - 1
    recv = sum((k > 0) + (k < last) for k in stages) * m * x
    outputs = sum(k < last for k in stages) * flight / pl.virtual_stages * x
    return Item("pipeline buffers", recv + outputs, f"receive buffers for {m} micro-batches per stage and "
                                                    "the outputs of those in flight, fp32")


def _attention_backward(cfg: TrainConfig, loc: Local, e: int) -> float:
    """Attention's backward workspace: dout, fp32 dq/dk/dv accumulators, one batched tile call's
    gradients and reversed copies (`bands`, at most BAND_ROWS rows), ring messages in flight
    both ways with their dK/dV accumulators, the Ulysses all-to-all buffers."""
    m, p = cfg.model, cfg.parallel
    kvp = max(p.cp_ulysses, m.n_kv_heads // p.tp) * m.head_dim
    qkv = loc.tokens * (loc.q_dim + 2 * kvp)
    # Under windows one batched call holds at most BAND_ROWS rows of the ring's sequence, which
    # Ulysses made cp_ulysses times longer with 1/cp_ulysses of the heads: in this rank's token
    # units, BAND_ROWS / cp_ulysses. (Full-causal blocks are not banded: kept as before.)
    per_call = BAND_ROWS * cfg.data.batch_size // (p.cp_ulysses if all(m.windows) else 1)
    tile_rows = min(loc.tokens, per_call)
    out = loc.tokens * loc.q_dim * e + qkv * 4
    out += tile_rows * (loc.q_dim + 2 * kvp) * 4 + 5 * tile_rows * loc.q_dim * e
    if kvp < loc.q_dim:  # GQA: the fused kernel gets K/V repeated to the query heads, and gives
        out += 4 * tile_rows * loc.q_dim * e  # their gradients at that size before the heads are summed
    if any(m.windows):  # a window's far edge runs on reversed rows: its gradients come back reversed
        out += tile_rows * (loc.q_dim + 2 * kvp) * 4
    if p.cp_ring > 1:
        rows = max(hi - lo for i in range(m.n_layers) for r in range(p.cp_ring) for s in (1, -1)
                   for lo, hi in [message_rows(cfg.data.seq_len, p.cp_ring, r, s, True, m.layer_window(i), "zigzag")])
        kv = 2 * cfg.data.batch_size * rows * (kvp // p.cp_ulysses) * e
        out += 4 * kv + 4 * kv // e * 4
    if p.cp_ulysses > 1:  # send stack + receive buffer of the largest all-to-all
        out += 2 * loc.tokens * loc.q_dim * e
    return out


def _transient(cfg: TrainConfig, loc: Local) -> list[Item]:
    """The top layer's backward: what it recomputes (all that no checkpointing would have kept,
    less what the policy did keep), attention's backward workspace, the residual gradients."""
    m, p, e = cfg.model, cfg.parallel, act_bytes(cfg)
    attn = _attention_backward(cfg, loc, e)
    sp = p.tp > 1 and cfg.sequence_parallel
    x = loc.stream * m.dim * e
    chunk = min(m.mlp_chunk or loc.tokens, loc.tokens)
    mlp = 6 * chunk * loc.ffn * e  # SwiGLU hidden states of one chunk and their gradients
    linear_in = (loc.tokens if sp else loc.stream) * m.dim * e
    if m.checkpoint == "full":  # the whole block again, then its gradients
        redo = _none_layer_saved(cfg, loc, e) - x
        work = redo + max(attn, mlp + 2 * linear_in)
        what = f"the block recomputed ({redo / MIB:.0f} MiB) + attention backward ({attn / MIB:.0f} MiB)"
    elif m.checkpoint == "selective":  # the MLP half recomputed, later the q/k/v projections
        rest = 3 * x + linear_in + loc.tokens * m.dim * e + mlp  # h, norm, gathered, partial out
        qkv = linear_in + 2 * loc.tokens * (loc.q_dim + 2 * loc.kv_dim) * e  # normed in, q/k/v and grads
        work = max(rest, attn, qkv)
        what = f"max(MLP part {rest / MIB:.0f}, attention {attn / MIB:.0f}, q/k/v part {qkv / MIB:.0f} MiB)"
    else:
        work = attn + 2 * linear_in
        what = f"attention backward {attn / MIB:.0f} MiB"
    resid = 2 * x  # gradient of the residual stream, in and out
    rows = min(m.loss_chunk, loc.tokens // cfg.data.batch_size) * cfg.data.batch_size
    loss = 3 * rows * (m.vocab_size // p.tp) * 4  # logits, softmax, gradient of one chunk (fp32)
    items = [Item("top layer backward", work + resid, what + " + residual gradients")]
    if cfg.optim.zero == 3:  # FSDP unshards a block for its backward (and prefetches the next)
        n = param_counts(m, p, cfg.sequence_parallel)
        block = (n.block_dense + n.expert) / m.n_layers * 4
        items.append(Item("FSDP unsharded blocks", 3 * block, "two blocks' parameters (one prefetched) and one's "
                                                              "unsharded gradients, fp32"))
    if p.pp > 1:  # the gradient of a stage's input, to be sent back
        items.append(Item("pipeline gradient", loc.stream * m.dim * 4, "the stage input's gradient, fp32"))
    return items + [Item("loss chunk", loss, f"{rows} rows x vocab/tp logits, fp32, recomputed per chunk")]


def _sync(cfg: TrainConfig, n: Params) -> list[Item]:
    rd, re_ = replicas(cfg)
    b = min(BUCKET, 4 * n.total)
    items = []
    if cfg.optim.zero == 2:
        items.append(Item("gradient chunks", 4 * (n.dense / rd + n.expert / re_), "this rank's reduced chunks, fp32"))
    if cfg.optim.zero >= 2:
        items.append(Item("reduce-scatter bucket", 2 * b, "packed chunks sent and received (one bucket at a time)"))
    if cfg.optim.zero:
        items.append(Item("all-gather bucket", b * (1 + 1 / rd), "this rank's updated chunks and every rank's"))
    return items or [Item("gradient bucket", 0, "reduced in place (gradients are views of their bucket)")]


def memory_plan(cfg: TrainConfig, baseline_bytes: float = 0.0) -> MemoryPlan:
    """The plan of the pipeline rank with the largest peak (every rank's, without pp)."""
    loc = local_sizes(cfg.model, cfg.parallel, cfg.data.seq_len, cfg.data.batch_size, cfg.sequence_parallel)
    plans = []
    for r, part in enumerate(pipeline_parts(cfg)):
        n = param_counts(cfg.model, cfg.parallel, cfg.sequence_parallel, part)
        groups = {"state": _state(cfg, n), "batch": _batch(cfg, loc), "saved": _saved(cfg, loc, part, r),
                  "transient": _transient(cfg, loc), "sync": _sync(cfg, n)}
        if cfg.device == "cuda":  # the staging copy is in host memory; the process holds a context and NCCL buffers
            groups["host"] = [i for i in groups["state"] if i.name == "checkpoint staging"]
            groups["state"] = [i for i in groups["state"] if i.name != "checkpoint staging"]
            groups["runtime"] = _runtime(cfg)
        plans.append(MemoryPlan(groups, baseline_bytes, r, ("gradients",) if cfg.optim.zero == 2 else ()))
    return max(plans, key=lambda plan: plan.peak)


def _runtime(cfg: TrainConfig) -> list[Item]:
    """What a GPU process holds beside its tensors (planner/gpus.py: estimates, stated there)."""
    from .gpus import CUDA_CONTEXT, NCCL_PER_GROUP, communicators

    groups = communicators(cfg.parallel)
    return [Item("CUDA context", CUDA_CONTEXT, "context, cuBLAS / cuDNN workspaces (estimate)"),
            Item("NCCL buffers", NCCL_PER_GROUP * len(groups),
                 f"{NCCL_PER_GROUP // MIB} MiB for each of {len(groups)} communicators: {', '.join(groups) or 'none'}"
                 " (estimate)")]

