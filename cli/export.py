"""`longtrain export CHECKPOINT --hf OUT`: a trained checkpoint as a Hugging Face model folder
(config.json + safetensors, loadable by transformers)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    """`longtrain export CHECKPOINT --hf OUT`: a trained checkpoint as a HF model folder."""
    ap = argparse.ArgumentParser(prog="longtrain export", description="write a checkpoint as a Hugging Face model "
                                 "(config.json + safetensors, loadable by transformers)")
    ap.add_argument("checkpoint", help="a step-N checkpoint directory, or a checkpoints folder (its newest valid one)")
    ap.add_argument("--hf", required=True, metavar="OUT", help="the folder to write (must not exist, or be empty)")
    ap.add_argument("--arch", choices=["llama", "mistral", "qwen2", "mixtral"],
                    help="architecture (default: mixtral with MoE, qwen2 with q/k/v biases, mistral with a window, "
                         "else llama)")
    ap.add_argument("--max-position-embeddings", type=int, help="recorded in config.json (default: the context the "
                    "checkpoint was trained at, or the rope scaling's original context for dynamic NTK)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="weights' dtype (default: bfloat16 for a run trained in bf16, else float32)")
    args = ap.parse_args(argv)
    try:
        out = export(args.checkpoint, args.hf, args.arch, args.max_position_embeddings, args.dtype)
    except (OSError, ValueError) as e:
        print(f"longtrain export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (load it with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def export(checkpoint: str, out: str, arch: str | None, max_pos: int | None, dtype: str) -> Path:
    from longtrain.checkpoint import store as ckpt
    from longtrain.config.loading import build
    from longtrain.models.config import ModelConfig
    from longtrain.models.hf import save_pretrained
    from longtrain.models.transformer import build_model
    from longtrain.parallel.mesh import ParallelMesh

    path = ckpt.find(checkpoint, log=lambda *_: None)
    if path is None:
        raise FileNotFoundError(f"no valid checkpoint in {checkpoint}")
    saved = ckpt.saved_identity(path)
    if not saved or "model" not in saved:
        raise ValueError(f"{path} does not record its model config (it was saved without the run identity a training run records: export needs the model config)")
    model = build_model(build(ModelConfig, saved["model"], "model"), ParallelMesh.single())
    ckpt.load(path, model, None, model.mesh, log=lambda *_: None)
    trained = saved.get("trained") or {}
    dtype = dtype or ("bfloat16" if trained.get("precision") == "bf16" else "float32")
    max_pos = max_pos or trained.get("seq_len")
    written = save_pretrained(model, out, kind=arch, max_position_embeddings=max_pos, dtype=dtype)
    copy_tokenizer(trained.get("data_path"), written)
    return written


def copy_tokenizer(data_path: str | None, out: Path) -> list[str]:
    """The tokenizer files `prepare` copied into the dataset the run trained on, copied beside
    the exported weights (read as any file of someone else's folder: `longtrain.files`); none
    for the byte tokenizer, or when that dataset is not there."""
    from longtrain.data.prepare import TOKENIZER_FILES
    from longtrain.files import JSON_LIMIT, confined, read_bytes, read_json

    if not data_path:
        return []
    try:
        manifest = read_json(confined(Path(data_path), "manifest.json", "manifest"))
        names = [n for n in manifest.get("tokenizer_files") or [] if n in TOKENIZER_FILES]
        files = {n: read_bytes(confined(Path(data_path), n, "tokenizer file"), JSON_LIMIT) for n in names}
    except (OSError, ValueError, AttributeError):
        return []
    for name, data in files.items():
        (out / name).write_bytes(data)
    return names
