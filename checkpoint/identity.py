"""What a checkpoint belongs to: the model it was trained as and the data it was trained on.

Each checkpoint's COMMITTED.json carries `run_identity(cfg)`. Before any process starts (and
again on every rank at resume), the run's config is compared with its newest checkpoint's:
resuming a different model (n_heads 4 -> 8 with the same shapes loads silently and trains
another function) or on other data (the sample order would continue on different documents)
is refused, naming the fields, with the two ways forward. Fields that change how the model is
computed or trained but not what it computes (loss and MLP chunking, activation checkpointing,
activation quantization, balance-loss coefficients, the init scale) may change on resume; a start from another run's weights (`init_from`, e.g. a
context extension) needs only the parameter shapes to match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

# how the model is computed or trained, not what it computes: free to change on resume
# (a whole section by its name, or one field by its dotted key)
EXECUTION = ("loss_chunk", "mlp_chunk", "checkpoint", "act_quant", "init_std", "moe.aux_loss_coef",
             "moe.z_loss_coef", "moe.bias_update_rate", "moh.balance_coef")
# what decides the parameters' shapes: must match for init_from
SHAPES = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "moe.num_experts",
          "moe.expert_hidden", "moe.shared_expert", "moe.every", "moe", "moh", "moh.shared_heads", "qkv_bias",
          "tie_embeddings")


class IdentityError(ValueError):
    """A checkpoint that belongs to another model or other data; the message says how to go on."""


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {prefix: "set"} if prefix else {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else k))
    return out


def data_identity(data) -> dict:
    """The dataset a run reads: its manifest's hash and tokenizer (shards), or the task."""
    if data.source == "passkey":
        return {"source": "passkey", "digits": data.passkey_digits}
    from longtrain.files import JSON_LIMIT, confined, read_bytes

    try:
        raw = read_bytes(confined(Path(data.path), "manifest.json", "manifest"), JSON_LIMIT)
        tokenizer = json.loads(raw).get("tokenizer")
    except (OSError, ValueError, AttributeError):
        return {"source": "shards", "manifest_sha256": None, "tokenizer": None}  # the loader reports it
    return {"source": "shards", "manifest_sha256": hashlib.sha256(raw).hexdigest(), "tokenizer": tokenizer}


def _as_saved(tree):
    """As COMMITTED.json holds it (tuples become lists), so saved and current compare equal."""
    return json.loads(json.dumps(tree))


def run_identity(cfg) -> dict:
    """What a checkpoint belongs to: the model config and the data (compared on resume), and how
    it was trained (its precision and context: `longtrain export`'s defaults; never compared)."""
    return _as_saved({"model": dataclasses.asdict(cfg.model), "data": data_identity(cfg.data),
                      "trained": {"precision": cfg.precision, "seq_len": cfg.data.seq_len, "data_path": cfg.data.path}})


def differences(saved: dict, mine: dict, resume: bool) -> list[str]:
    """Human-readable differences that forbid loading `saved` into a run described by `mine`."""
    out = []
    old, new = _flat(saved.get("model", {})), _flat(mine["model"])
    for key in sorted(set(old) | set(new)):
        free = key in EXECUTION or key.split(".")[0] in EXECUTION
        relevant = not free if resume else key in SHAPES
        if relevant and old.get(key) != new.get(key):
            out.append(f"model.{key}: checkpoint {old.get(key)!r}, config {new.get(key)!r}")
    if resume and "data" in saved:
        d_old, d_new = saved["data"], mine["data"]
        if d_old.get("source") != d_new.get("source") or d_old.get("digits") != d_new.get("digits"):
            out.append(f"data: checkpoint trained on {d_old.get('source')}, config reads {d_new.get('source')}")
        elif d_old.get("tokenizer") != d_new.get("tokenizer"):
            out.append(f"data tokenizer: checkpoint {d_old.get('tokenizer')}, data now {d_new.get('tokenizer')}")
        elif d_old.get("manifest_sha256") != d_new.get("manifest_sha256") and d_new.get("manifest_sha256"):
            out.append("data: the dataset's manifest.json differs from the one this run trained on")
    return out


def check(saved: dict | None, cfg, where: str, resume: bool = True) -> None:
    """Raise IdentityError if the checkpoint at `where` (its saved identity) does not belong to
    this config. A checkpoint saved without one (`checkpoint.save` called with no identity, as
    a library user may) has nothing to compare and passes."""
    if not saved:
        return
    problems = differences(saved, run_identity(cfg), resume)
    if not problems:
        return
    if resume:
        fix = (f"to start a new run, choose another out_dir (--set out_dir=...); to start from these weights "
               f"on purpose, use a new out_dir with --set checkpoint.init_from={where} (parameter shapes must "
               f"match); nothing in {where} was changed")
    else:
        fix = "init_from needs a model with the same parameter shapes; choose a checkpoint of this model"
    raise IdentityError(f"{where} does not belong to this run: {'; '.join(problems)}. {fix}")
