"""A committed checkpoint's marker (``COMMITTED.json``: every file with its size and SHA-256,
the run it belongs to, how long it took to write) and its verification against it, by one
rank or by every rank of the job, each hashing its share of the files."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from longtrain.files import UnsafeFile, confined, plain_file, read_json, regular, sha256_file

MARKER = "COMMITTED.json"


def _marker_stamp(path: Path) -> tuple | None:
    try:
        st = (path / MARKER).stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _files(path: Path) -> dict:
    """The marker's {file name: {"bytes", "sha256"}}; UnsafeFile (a ValueError) if the marker is
    not a regular file of the folder, is oversized, or is not what `write` writes."""
    marker = read_json(confined(path, MARKER, "marker"))
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(i, dict) and isinstance(i.get("bytes"), int) and not isinstance(i.get("bytes"), bool)
            and isinstance(i.get("sha256"), str) for i in files.values()):
        raise UnsafeFile(f"{path / MARKER} is malformed: 'files' must map each file name to its 'bytes' and "
                         "'sha256'")
    return files


def verify(path: Path, quick: bool = False, share: tuple[int, int] = (0, 1)) -> str | None:
    """None if every file matches the marker, else what is wrong (`quick`: sizes only). Only
    regular files inside the folder are read. `share` (rank, ranks): every file's size is
    checked, but only this rank's share of them is hashed (`verify_together`)."""
    try:
        files = _files(path)
    except (OSError, ValueError) as e:
        return f"unreadable {MARKER} ({e})"
    mine = set(sorted(files)[share[0]::share[1]])
    for name, info in files.items():
        f = plain_file(path, name)
        if f is None:
            return f"{MARKER} names {name!r}, which is not a plain file of the checkpoint's folder"
        if not f.exists():
            return f"{name} is missing"
        try:
            size = regular(f).st_size
            if size != info["bytes"]:
                return f"{name} is {size} bytes, expected {info['bytes']} (truncated)"
            if not quick and name in mine and sha256_file(f) != info["sha256"]:
                return f"{name} does not match its checksum"
        except (OSError, UnsafeFile) as e:
            return str(e)
    return None


def save_rate(path: Path) -> float | None:
    """Bytes per second one rank wrote the checkpoint in `path` at: its files' bytes, shared by
    the ranks that wrote them, over the time from the first shard to the commit (as its marker
    records); None if not recorded."""
    try:
        marker = read_json(confined(path, MARKER, "marker"))
        seconds, ranks = marker.get("written_s"), marker.get("ranks", 1)
        total = sum(info["bytes"] for info in _files(path).values())
    except (OSError, ValueError, AttributeError):
        return None
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (seconds, ranks))
    return total / ranks / seconds if ok and total > 0 else None


def saved_identity(path: Path) -> dict | None:
    """The model config and data identity recorded with a committed checkpoint (None: older)."""
    try:
        run = read_json(confined(path, MARKER, "marker")).get("run")
    except (OSError, ValueError, AttributeError):
        return None
    return run if isinstance(run, dict) else None


def verify_together(path: Path) -> str | None:
    """`verify` with every rank of the job hashing its share of the files (a collective: every
    rank calls it for the same folder); the same answer on every rank, the lowest rank's problem
    if several find one. One process: `verify`."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return verify(path)
    rank, world = dist.get_rank(), dist.get_world_size()
    said: list = [None] * world
    dist.all_gather_object(said, verify(path, share=(rank, world)))
    return next((p for p in said if p), None)
