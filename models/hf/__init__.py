"""Start from a pretrained Hugging Face model, and write one back.

    model = from_pretrained("path/to/llama", mesh, checkpoint="selective",
                            rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096})
    ...
    save_pretrained(model, "path/to/out")   # config.json + safetensors, loadable by transformers

`from_pretrained` reads `config.json` (JSON) and safetensors only: nothing in the folder can
run code, and nothing outside it is read. On any layout each rank reads only its slices.
`save_pretrained` gathers each sharded parameter over its shard group (a collective: every
rank calls it) and global rank 0 writes, into a temporary folder renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .config import UnsupportedModel, from_hf_config, to_hf_config
from longtrain.files import confined, read_json
from longtrain.parallel.mesh import ParallelMesh
from longtrain.parallel.sharding import full_tensor, tied_name

from .weights import Reader, hf_tensors, write

__all__ = ["from_pretrained", "load_weights", "save_pretrained", "read_config", "check_weights", "UnsupportedModel"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_config(path: str | os.PathLike, **overrides):
    """(ModelConfig, the HF config dict) of the model in `path`."""
    folder = Path(path)
    file = folder / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"no config.json in {folder}: not a Hugging Face model folder")
    hf = read_json(confined(folder, "config.json", "model config", ValueError), error=ValueError)
    if not isinstance(hf, dict):
        raise ValueError(f"{file} holds a {type(hf).__name__}, not a model config object")
    return from_hf_config(hf, file, **overrides), hf


def check_weights(path: str | os.PathLike, cfg) -> Reader:
    """A reader of the weights in `path`, their declared shapes checked against `cfg` (the
    config read from the same folder) before anything is allocated."""
    reader = Reader(Path(path))
    try:
        reader.check_shapes(cfg)
    except ValueError as e:
        raise UnsupportedModel(f"{path}: {e}; the weights do not match its config.json") from None
    return reader


def from_pretrained(path: str | os.PathLike, mesh: ParallelMesh | None = None, *, device: str = "cpu",
                    dtype=torch.float32, **overrides):
    """A `LongLM` for this rank of `mesh` (left out: one process) with the weights in `path`.
    `overrides` change training-only `ModelConfig` fields (checkpoint, loss_chunk, window,
    rope_scaling to extend the context, ...)."""
    from ..transformer import build_model

    cfg, hf = read_config(path, **overrides)
    reader = check_weights(path, cfg)
    mesh = ParallelMesh.single(torch.device(device).type) if mesh is None else mesh
    model = build_model(cfg, mesh, device=device, dtype=dtype, source=reader)
    _no_unused(reader, model, path)
    model.hf_source = {"kind": hf["model_type"], "max_position_embeddings": hf.get("max_position_embeddings"),
                       "dtype": hf.get("dtype") or hf.get("torch_dtype") or "float32"}
    return model


def load_weights(model, path: str | os.PathLike) -> None:
    """Copy this rank's slices of the HF model's weights in `path` into `model`, already built
    (any layout, a pipeline rank's part included) for the config `read_config` gives."""

    reader = check_weights(path, model.cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(reader(tied_name(name, p), p))
    _no_unused(reader, model, path)


def _no_unused(reader: Reader, model, path) -> None:
    """Every tensor of the folder has a place in the whole model (`check_weights` placed them),
    else UnsupportedModel naming them."""
    extra = reader.unused(model.cfg.tie_embeddings)
    if extra:
        raise UnsupportedModel(f"{path}: tensors {extra[:5]}{' ...' if len(extra) > 5 else ''} have no place in "
                               "the architecture its config.json describes")


def save_pretrained(model, path: str | os.PathLike, *, kind: str | None = None, max_position_embeddings: int | None = None,
                    dtype: str | None = None, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> Path:
    """Write `model` (any layout; every rank calls this) as a HF model folder: config.json and
    safetensors. `kind`: llama / mistral / qwen2 / mixtral (default: the architecture it was loaded from,
    else chosen from the config). Refuses an existing non-empty `path` unless `overwrite`."""
    import torch.distributed as dist

    cfg, src = model.cfg, getattr(model, "hf_source", {})
    kind = kind or src.get("kind") or ("mixtral" if cfg.moe is not None else "qwen2" if cfg.qkv_bias
                                       else "mistral" if any(cfg.windows) else "llama")
    hf = to_hf_config(cfg, kind, max_position_embeddings or src.get("max_position_embeddings") or 4096)
    dtype = dtype or src.get("dtype") or "float32"
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} must be one of {sorted(_DTYPES)}")
    hf["dtype"] = dtype
    out = Path(path)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder, or pass overwrite=True")
    tensors = {}
    for n, p in model.named_parameters():
        tensors.update(hf_tensors(n, full_tensor(p, model.mesh).to(_DTYPES[dtype]).cpu()))
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    failure = None
    if rank0:
        try:
            _write_folder(out, tensors, hf, max_shard_bytes)
        except OSError as e:
            failure = e
    said = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    if dist.is_initialized():  # every rank learns whether rank 0 wrote it: none is left waiting
        dist.broadcast_object_list(said, src=0)
    if failure is not None:
        raise failure
    if said[0] is not None:
        raise RuntimeError(f"rank 0 could not write {out}: {said[0]}")
    return out


def _write_folder(out: Path, tensors: dict, hf: dict, max_shard_bytes: int) -> None:
    """Into a temporary folder beside `out`, then renamed into place: a failure leaves nothing."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp, tensors, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
