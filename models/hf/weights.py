"""Hugging Face safetensors weights <-> longtrain parameters.

Reading: each rank opens the safetensors files and reads only its own slice of each tensor
(`safe_open(...).get_slice`), so a tensor-parallel rank never holds a whole weight it does
not keep. Safetensors hold no code; a folder with only `pytorch_model*.bin` (a pickle) is read
through `torch.load(weights_only=True)`, which admits tensors and plain containers only, memory-
mapped. Never `trust_remote_code`, and only files inside the model's folder.
Writing: full tensors (gathered over their shard group by the caller) into one file, or into
several with a `model.safetensors.index.json` above `max_shard_bytes`, as transformers does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from longtrain.files import confined, plain_file, read_json, regular
from longtrain.parallel.sharding import sharding_of

INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN = "pytorch_model.bin.index.json", "pytorch_model.bin"

_LAYER = {"attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
          "attn.wq.weight": "self_attn.q_proj.weight", "attn.wk.weight": "self_attn.k_proj.weight",
          "attn.wv.weight": "self_attn.v_proj.weight", "attn.wo.weight": "self_attn.o_proj.weight",
          "attn.wq.bias": "self_attn.q_proj.bias", "attn.wk.bias": "self_attn.k_proj.bias",
          "attn.wv.bias": "self_attn.v_proj.bias",
          "mlp.mlp.w1.weight": "mlp.gate_proj.weight", "mlp.mlp.w3.weight": "mlp.up_proj.weight",
          "mlp.mlp.w2.weight": "mlp.down_proj.weight"}
_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "head.weight": "lm_head.weight"}
_MOE = {"mlp.router.weight": "block_sparse_moe.gate.weight"}
_EXPERTS = re.compile(r"layers\.(\d+)\.mlp\.experts\.(w[123])")  # longtrain's [E, ...] stacks
# tensors older checkpoints carry that are recomputed, never learned
_DERIVED = re.compile(r".*rotary_emb\.inv_freq$")


def hf_name(name: str) -> str:
    """The transformers name of a longtrain parameter."""
    if name in _TOP:
        return _TOP[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    table = {**_LAYER, **_MOE}
    if m is None or m.group(2) not in table:
        raise ValueError(f"parameter {name} has no Llama / Mistral / Qwen2 / Mixtral counterpart")
    return f"model.layers.{m.group(1)}.{table[m.group(2)]}"


def expert_names(name: str, experts: range) -> list[str] | None:
    """The transformers names (Mixtral: one tensor per expert) of the experts `experts` of a
    longtrain expert stack, or None if `name` is not one."""
    m = _EXPERTS.fullmatch(name)
    if m is None:
        return None
    return [f"model.layers.{m.group(1)}.block_sparse_moe.experts.{e}.{m.group(2)}.weight" for e in experts]


def hf_tensors(name: str, full: torch.Tensor) -> dict[str, torch.Tensor]:
    """{transformers name: tensor} for a longtrain parameter's full tensor."""
    names = expert_names(name, range(full.shape[0]))
    return {hf_name(name): full} if names is None else dict(zip(names, full.unbind(0)))


def weight_files(folder: Path) -> dict[str, Path]:
    """{tensor name: weights file} of a HF model folder (safetensors, else pytorch_model.bin);
    only regular files of the folder itself are read."""
    for index, single in ((INDEX, SINGLE), (BIN_INDEX, BIN)):
        if (folder / index).exists():
            return _indexed(folder, confined(folder, index, "weights index", ValueError))
        if (folder / single).exists():
            path = confined(folder, single, "weights file", ValueError)
            return {name: path for name in _open(path).keys()}
    raise FileNotFoundError(f"no {SINGLE}, {INDEX} or {BIN} in {folder}: not a Hugging Face model folder")


def _indexed(folder: Path, index: Path) -> dict[str, Path]:
    entries = read_json(index, error=ValueError)
    if not isinstance(entries, dict) or not isinstance(entries.get("weight_map"), dict):
        raise ValueError(f"{index} is not a weights index (no 'weight_map' object)")
    out = {}
    for name, file in entries["weight_map"].items():
        path = plain_file(folder, file)
        if path is None:
            raise ValueError(f"{index} maps {name} to {file!r}, which is not a file of {folder}; refused")
        out[name] = path
    return out


class _Pickled:
    """A `pytorch_model.bin` behind safetensors' `safe_open` interface, read with
    `weights_only=True` (no code runs) and memory-mapped; slices are copied out."""

    def __init__(self, path: Path):
        try:
            self.tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - any refusal of the restricted unpickler, or a bad file
            raise ValueError(f"{path} is not a plain tensor file; refused ({str(e).splitlines()[0]})") from e

    def keys(self):
        return self.tensors.keys()

    def get_slice(self, name: str):
        return _Slice(self.tensors[name])


class _Slice:
    def __init__(self, t: torch.Tensor):
        self.t = t

    def get_shape(self) -> list[int]:
        return list(self.t.shape)

    def __getitem__(self, index) -> torch.Tensor:
        return self.t[index].clone()  # never a view of the mapped file


def _open(path: Path):
    regular(path, ValueError)  # never a FIFO or a device
    if path.suffix == ".bin":
        return _Pickled(path)
    from safetensors import safe_open

    return safe_open(str(path), framework="pt")


class Reader:
    """Reads this rank's slice of each parameter from a HF model folder (a `materialize` source)."""

    def __init__(self, folder: Path):
        self.files = weight_files(folder)
        self.open = {p: _open(p) for p in set(self.files.values())}
        self.used: set[str] = set()

    def __call__(self, name: str, p: torch.nn.Parameter) -> torch.Tensor:
        if expert_names(name, range(1)) is not None:
            return self._experts(name, p)
        theirs = hf_name(name)
        if theirs not in self.files:
            raise ValueError(f"the model has no tensor {theirs} (longtrain's {name})")
        sl = self.open[self.files[theirs]].get_slice(theirs)
        s = sharding_of(p)
        if tuple(sl.get_shape()) != s.full_shape:
            raise ValueError(f"tensor {theirs} has shape {tuple(sl.get_shape())}, the config implies {s.full_shape}")
        self.used.add(theirs)
        if not s.sharded:
            return sl[:]
        lo, hi = s.local_range()
        return sl[lo:hi] if s.dim == 0 else sl[:, lo:hi]

    def _experts(self, name: str, p) -> torch.Tensor:
        """This rank's experts (its ep slice of the stack), one HF tensor each."""
        s = sharding_of(p)
        full = s.full_shape
        names = expert_names(name, range(*s.local_range()))
        missing = [t for t in names if t not in self.files]
        if missing:
            raise ValueError(f"the model has no tensor {missing[0]} (longtrain's {name})")
        parts = [self.open[self.files[t]].get_slice(t)[:] for t in names]
        if tuple(parts[0].shape) != full[1:]:
            raise ValueError(f"tensor {names[0]} has shape {tuple(parts[0].shape)}, the config implies {full[1:]}")
        self.used.update(expert_names(name, range(full[0])))  # the other ranks' experts have their place too
        return torch.stack(parts)

    def shape(self, theirs: str) -> tuple[int, ...]:
        """The shape the folder declares for tensor `theirs` (its header only: nothing is read)."""
        if theirs not in self.files:
            raise ValueError(f"the model has no tensor {theirs}")
        return tuple(self.open[self.files[theirs]].get_slice(theirs).get_shape())

    def check_shapes(self, cfg) -> None:
        """Every tensor the model config `cfg` implies, against the shape the files declare, before
        anything is allocated: a config.json that declares sizes its weights do not have (a huge
        vocab_size, more layers or experts) is refused naming the tensor. The whole model is laid
        out on the meta device, once its layer and expert counts match the files."""
        from longtrain.models.transformer import LongLM

        layers = {int(m.group(1)) for n in self.files if (m := re.match(r"model\.layers\.(\d+)\.", n))}
        if cfg.n_layers > len(layers) or not all(i in layers for i in range(cfg.n_layers)):  # layers past them: unused
            raise ValueError(f"the config declares {cfg.n_layers} layers, the weights hold {len(layers)} "
                             f"(numbered {min(layers, default=None)}..{max(layers, default=None)})")
        if cfg.moe is not None:
            experts = {n for n in self.files if n.startswith("model.layers.0.block_sparse_moe.experts.")}
            if len(experts) != 3 * cfg.moe.num_experts:
                raise ValueError(f"the config declares {cfg.moe.num_experts} experts per layer, layer 0's weights "
                                 f"hold {len(experts) // 3}")
        with torch.device("meta"):
            whole = LongLM(cfg)
        for name, p in whole.named_parameters():
            names = expert_names(name, range(p.shape[0]))
            for theirs, want in ([(t, tuple(p.shape[1:])) for t in names] if names is not None
                                 else [(hf_name(name), tuple(p.shape))]):
                if self.shape(theirs) != want:
                    raise ValueError(f"tensor {theirs} has shape {self.shape(theirs)}, the config implies {want}")
        self.place(whole)  # every tensor the whole model has a place for (a pipeline rank reads only its own)

    def place(self, whole_model: torch.nn.Module) -> None:
        """Count the tensors of every parameter of `whole_model` (a meta-device copy of the whole
        model) as having a place: a pipeline stage reads only its own layers, and the tensors of
        the other stages' layers are not unknown."""
        for name, p in whole_model.named_parameters():
            experts = expert_names(name, range(p.shape[0]))
            self.used.update(experts if experts is not None else [hf_name(name)])

    def unused(self, tied: bool = False) -> list[str]:
        """Tensors of the folder no parameter took (with tied embeddings a saved lm_head.weight
        is the embedding's copy, not an unknown tensor)."""
        derived = {"lm_head.weight"} if tied else set()
        return sorted(n for n in set(self.files) - self.used - derived if not _DERIVED.fullmatch(n))


def write(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """Full tensors (HF names) as safetensors in `folder`: one file, or shards and an index."""
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t.contiguous()
        size += nbytes
    shards.append(current)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / SINGLE), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata=meta)
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
