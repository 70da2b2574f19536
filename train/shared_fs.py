"""Before training: every rank must see the run's folders, the same ones.

On a cluster the data and `out_dir` must be on a file system every node mounts at the same
path; a node that has its own copy (or none) would train on other data or write checkpoints
no other node finds. So at set-up rank 0 writes a token with a fresh nonce into `out_dir`,
every rank reads it back and opens the data's manifest, and the ranks compare what they saw
(one gather on the default group, before any other collective). A rank that does not see them
stops the job on every rank, with one line naming the rank, its node and the folder.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

TOKEN = ".longtrain-ranks-see-this"


class FolderNotShared(ValueError):
    """A rank does not see the run's data or out_dir (not on a file system every node shares)."""


def _problems(cfg, nonce: str) -> tuple[str | None, str | None]:
    """(what is wrong with this rank's view of out_dir, of the data), None where nothing is."""
    token, out = Path(cfg.out_dir) / TOKEN, None
    try:
        if token.read_text() != nonce:
            out = f"out_dir {Path(cfg.out_dir).resolve()} holds another launch's token"
    except OSError:
        out = f"cannot see out_dir {Path(cfg.out_dir).resolve()} (the token rank 0 wrote there is missing)"
    data = None
    if cfg.data.source == "shards":
        for path in dict.fromkeys(p for p in (cfg.data.path, cfg.data.eval_path) if p):
            if not (Path(path) / "manifest.json").is_file():
                data = f"cannot see the data at {Path(path).resolve()} (no manifest.json, which rank 0 sees)"
                break
    return out, data


def check_shared_folders(cfg) -> None:
    """Every rank sees `out_dir` and the data, the same ones (see the module docstring); one
    process: nothing to compare. Raises FolderNotShared on every rank otherwise."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    box = [None]
    if dist.get_rank() == 0:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        box = [secrets.token_hex(8)]
        tmp = Path(cfg.out_dir) / f"{TOKEN}.{os.getpid()}"
        tmp.write_text(box[0])
        os.replace(tmp, Path(cfg.out_dir) / TOKEN)
    dist.broadcast_object_list(box, src=0)
    said: list = [None] * dist.get_world_size()
    dist.all_gather_object(said, (socket.gethostname(), *_problems(cfg, box[0])))
    # data that rank 0 does not see either is missing, not unshared: the loader says so itself
    shared_data = said[0][2] is None
    bad = [(rank, host, out or (data if shared_data else None)) for rank, (host, out, data) in enumerate(said)]
    bad = [b for b in bad if b[2]]
    if bad:
        rank, host, problem = bad[0]
        others = f" (and {len(bad) - 1} other rank(s))" if len(bad) > 1 else ""
        raise FolderNotShared(f"rank {rank} on node {host} {problem}{others}: the data and out_dir must be on a file "
                              "system every node mounts at the same path (give absolute paths)")
