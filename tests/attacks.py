"""Files and folders built the way an attacker would build them, by hand, for tests/test_security.py.

Each builder edits a copy of a genuine checkpoint, dataset or Hugging Face folder in place, and
where a checkpoint's COMMITTED.json would otherwise give the edit away, rewrites its checksums
too (anyone who can edit a checkpoint can): what keeps these files out must be the format and the
reader, not the checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import stat
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from longtrain.checkpoint import store as ckpt


def recommit(step: Path) -> None:
    """COMMITTED.json made to match the files again."""
    marker = step / ckpt.MARKER
    info = json.loads(marker.read_text())
    for name in info["files"]:
        raw = (step / name).read_bytes()
        info["files"][name] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    marker.write_text(json.dumps(info))


def genuine_metadata(step: Path):
    return pickle.loads((step / ".metadata").read_bytes())  # the test's own checkpoint: trusted here


def write_metadata(step: Path, md) -> None:
    (step / ".metadata").write_bytes(pickle.dumps(md, protocol=2))
    recommit(step)


# ---------------------------------------------------------------- pickles that touch classes
def _frame(global_: tuple[str, str], state: bytes) -> bytes:
    """Protocol-2 opcodes that look up `global_` and BUILD it with `state`, then pop it."""
    module, name = global_
    return b"c" + f"{module}\n{name}\n".encode() + state + b"b0"


def _unicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def class_rewrite(step: Path, target=("pathlib", "PosixPath"), attribute="is_symlink",
                  value=("torch", "Size")) -> None:
    """A `.metadata` whose unpickling first sets `target.attribute = value` on the class itself
    (BUILD with slot state: (None, {attribute: value})), then yields the genuine metadata. With
    `is_symlink` = torch.Size, `Path.is_symlink()` returns an empty Size: false, everywhere."""
    slot = b"N}" + _unicode(attribute) + b"c" + f"{value[0]}\n{value[1]}\n".encode() + b"s\x86"
    genuine = pickle.dumps(genuine_metadata(step), protocol=2)
    assert genuine[:2] == b"\x80\x02"
    (step / ".metadata").write_bytes(b"\x80\x02" + _frame(target, slot) + genuine[2:])
    recommit(step)


def function_state(step: Path) -> None:
    """BUILD on an allowed *function*: torch.serialization._get_layout's layout cache replaced."""
    state = b"}" + _unicode("cache") + b"}" + b"s"
    genuine = pickle.dumps(genuine_metadata(step), protocol=2)
    (step / ".metadata").write_bytes(b"\x80\x02" + _frame(("torch.serialization", "_get_layout"), state)
                                     + genuine[2:])
    recommit(step)


# ---------------------------------------------------------------- files that are not files
def zero_device(path: Path) -> None:
    """`path` made a character device with /dev/zero's numbers (needs root), inside its folder."""
    path.unlink()
    os.mknod(path, stat.S_IFCHR | 0o644, os.makedev(1, 5))


def link_to(path: Path, target: Path | str) -> None:
    path.unlink()
    os.symlink(target, path)


def fifo(path: Path, release_after_s: float = 15.0) -> None:
    """`path` made a FIFO. A reader that opens it waits for a writer forever; here a writer shows
    up after `release_after_s` and closes at once, so a reader that wrongly opened it gets an
    empty file late instead of hanging the test session (the row then fails on its time)."""
    path.unlink()
    os.mkfifo(path)

    def release():
        deadline = time.monotonic() + release_after_s + 60
        time.sleep(release_after_s)
        while time.monotonic() < deadline and path.exists():
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO while no reader has it open
            except OSError:
                time.sleep(0.2)
    threading.Thread(target=release, daemon=True).start()


def moved_out(path: Path, outside: Path) -> Path:
    """`path` moved into `outside` and linked back: a file the folder reaches only by a link."""
    away = outside / path.name
    shutil.move(path, away)
    os.symlink(away, path)
    return away


# ---------------------------------------------------------------- DCP metadata that lies
def _entry(md, fqn: str):
    return md.state_dict_metadata[fqn]


def huge_tensor(step: Path, fqn: str = "model.embed.weight") -> None:
    """The tensor `fqn` declared 10 TB (its chunks still inside it)."""
    import torch

    md = genuine_metadata(step)
    entry = _entry(md, fqn)
    entry.size = torch.Size([10**7, 2**18])  # 10 TB in fp32
    write_metadata(step, md)


def chunk_outside(step: Path, fqn: str = "model.embed.weight") -> None:
    import torch

    md = genuine_metadata(step)
    chunk = _entry(md, fqn).chunks[0]
    chunk.sizes = torch.Size([s * 1000 for s in chunk.sizes])
    write_metadata(step, md)


def item_past_its_file(step: Path) -> None:
    md = genuine_metadata(step)
    info = next(iter(md.storage_data.values()))
    info.offset, info.length = 0, 10**12
    write_metadata(step, md)


def stream_transform(step: Path) -> None:
    """Every item read through DCP's ZStandard stream transform (a decompression bomb waits there)."""
    md = genuine_metadata(step)
    for info in md.storage_data.values():
        info.transform_descriptors = ["stream.zstd/1"]
    write_metadata(step, md)


def malformed_checksums(step: Path) -> None:
    marker = step / ckpt.MARKER
    info = json.loads(marker.read_text())
    info["files"] = {".metadata": 5}
    marker.write_text(json.dumps(info))


def corrupt(step: Path) -> None:
    """One data file changed in place, its checksum left as it was (bit rot, a partial copy)."""
    data = next(f for f in sorted(step.iterdir()) if f.suffix == ".distcp")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))


# ---------------------------------------------------------------- Arrow shards with lying offsets
def patch_offsets(data: Path, edit) -> str:
    """Shard 0's document offsets rewritten in the file by `edit(offsets) -> offsets` (same count),
    then the manifest's size, checksum and counts made to match. Returns the shard's name."""
    manifest = json.loads((data / "manifest.json").read_text())
    entry = manifest["shards"][0]
    path = data / entry["file"]
    col = pa.ipc.open_file(pa.memory_map(str(path))).read_all().column("tokens").combine_chunks()
    offsets = np.frombuffer(col.buffers()[1], dtype=np.int64)[: len(col) + 1].copy()
    raw = bytearray(path.read_bytes())
    at = raw.find(offsets.tobytes())
    assert at >= 0, "the offsets buffer is stored as written"
    new = np.asarray(edit(offsets), dtype=np.int64)
    raw[at: at + new.nbytes] = new.tobytes()
    path.write_bytes(bytes(raw))
    entry.update(bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest())
    manifest["tokens"] += int(new[-1] - new[0]) - entry["tokens"]
    entry["tokens"] = int(new[-1] - new[0])
    (data / "manifest.json").write_text(json.dumps(manifest))
    return entry["file"]


def out_of_order(offsets: np.ndarray) -> np.ndarray:
    out = offsets.copy()
    out[1], out[2] = out[2], out[1]  # row 0 now ends after row 1 begins: row 1 has negative length
    return out


def past_the_buffer(offsets: np.ndarray) -> np.ndarray:
    out = offsets.copy()
    out[-1] = out[-1] + 10**9
    return out


def hf_config(folder: Path, **fields) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(fields)
    (folder / "config.json").write_text(json.dumps(cfg))
