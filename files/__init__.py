"""Reading files that others hand over: checkpoints, datasets, model folders.

Every file longtrain reads from such a folder is a *regular* file *inside* that folder: a name
with no separators and no `..`, and if it is a symbolic link, one that stays in the folder.
Anything else (a link leading out, a FIFO that would block a reader forever, a device such as
/dev/zero that never ends) is refused in one line naming the file, before it is opened for
reading. Files that are parsed whole (JSON, DCP metadata) are also read up to a size bound,
so a crafted file cannot exhaust memory. Opening uses O_NONBLOCK and checks the *opened* file
(fstat), so a file swapped for a FIFO between a check and the open still cannot block.

This module imports nothing of longtrain: data/, checkpoints and the HF loader all use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

JSON_LIMIT = 64 << 20  # manifests, COMMITTED.json, HF configs and indexes are far smaller
METADATA_LIMIT = 1 << 30  # DCP .metadata: one entry per saved chunk, ~200 B each


class UnsafeFile(ValueError):
    """A file that is not a regular file of its folder, or larger than what it may be."""


def plain_file(folder: Path, name) -> Path | None:
    """`folder / name` if `name` is a plain file name that stays in `folder` (no separators, no
    `..`, no symbolic link leading out), else None. Says nothing about what kind of file it is."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name \
            or "\0" in name:
        return None
    target = Path(folder) / name
    if target.is_symlink() and target.resolve().parent != Path(folder).resolve():
        return None
    return target


def confined(folder: Path, name, what: str = "file", error: type[Exception] = UnsafeFile) -> Path:
    """`folder / name`, refused (`error`) unless it is a plain name that stays in `folder`."""
    path = plain_file(folder, name)
    if path is None:
        raise error(f"{what} {name!r} of {folder} is not a plain file of that folder (a path, or a symbolic link "
                    "leading out of it); refused")
    return path


def _refuse_kind(path: Path, st: os.stat_result, error: type[Exception]) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise error(f"{path} is {kind}, not a regular file; refused without reading it")


def regular(path: Path, error: type[Exception] = UnsafeFile) -> os.stat_result:
    """`path`'s stat (following a link), refused unless it is a regular file. Opens nothing."""
    st = os.stat(path)
    _refuse_kind(Path(path), st, error)
    return st


def open_regular(path: Path, error: type[Exception] = UnsafeFile):
    """`path` opened for binary reading, refused unless the opened file is a regular file. A FIFO
    does not block the open (O_NONBLOCK, cleared once the file is known to be regular)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        _refuse_kind(Path(path), os.fstat(fd), error)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: Path, limit: int, error: type[Exception] = UnsafeFile) -> bytes:
    """The whole of regular file `path`, refused if it is larger than `limit` bytes."""
    with open_regular(path, error) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise error(f"{path} is {size:,} bytes, more than the {limit:,} such a file may hold; refused "
                        "without reading it")
        raw = f.read(limit + 1)
    if len(raw) > limit:  # grew while read
        raise error(f"{path} holds more than the {limit:,} bytes such a file may hold; refused")
    return raw


def read_json(path: Path, limit: int = JSON_LIMIT, error: type[Exception] = UnsafeFile):
    """JSON from regular file `path` of at most `limit` bytes; ValueError (`error`) if malformed."""
    raw = read_bytes(path, limit, error)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{path} is not valid JSON ({str(e)[:200]})") from e


def sha256_file(path: Path, error: type[Exception] = UnsafeFile) -> str:
    """SHA-256 of regular file `path` (a FIFO or device is refused, never read)."""
    h = hashlib.sha256()
    with open_regular(path, error) as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
