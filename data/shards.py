"""Token shards on disk: Arrow IPC files plus a JSON manifest, read memory-mapped.

Each shard is one Arrow IPC file holding one column ``tokens`` (a list of token ids per
document, uint16 when the vocabulary fits, else uint32) in a single record batch, so its
offsets and values map straight onto numpy arrays backed by the page cache: opening a
corpus costs no memory however large it is. `manifest.json` lists every shard with its
document and token counts and a SHA-256, plus the tokenizer, so a shard that was truncated,
swapped or produced by another tokenizer is caught before training starts.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa

FORMAT = "longtrain-shards-v1"
MANIFEST = "manifest.json"


class DataError(ValueError):
    """Bad input data; the message names the file and what to do."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _dtype(vocab_size: int):
    return (np.uint16, pa.uint16()) if vocab_size <= 65536 else (np.uint32, pa.uint32())


def write_shard(path: Path, docs: list[np.ndarray], vocab_size: int) -> dict:
    """Write documents (token arrays) as one shard; returns its manifest entry."""
    np_t, pa_t = _dtype(vocab_size)
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(docs).astype(np_t) if docs else np.zeros(0, np_t)
    arr = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa_t))
    table = pa.table({"tokens": arr})
    tmp = path.with_suffix(".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=max(1, len(docs)))
    os.replace(tmp, path)
    return {"file": path.name, "documents": int(len(docs)), "tokens": int(offsets[-1]),
            "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(out_dir: Path, shards: list[dict], tokenizer: dict, source: str) -> dict:
    manifest = {"format": FORMAT, "tokenizer": tokenizer, "source": source, "shards": shards,
                "documents": sum(s["documents"] for s in shards), "tokens": sum(s["tokens"] for s in shards)}
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out_dir / MANIFEST)
    return manifest


@dataclass
class Shard:
    path: Path
    offsets: np.ndarray  # [documents + 1] int64, memory-mapped
    values: np.ndarray  # [tokens] uint16/uint32, memory-mapped
    _keep: object = None  # the memory map

    @property
    def documents(self) -> int:
        return len(self.offsets) - 1

    def document(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]


def open_shard(path: Path, entry: dict, vocab_size: int, verify_checksum: bool) -> Shard:
    if not path.exists():
        raise DataError(f"shard {path} listed in the manifest is missing; re-run `longtrain prepare`")
    size = path.stat().st_size
    if size != entry.get("bytes", size):
        raise DataError(f"shard {path} is {size} bytes but the manifest says {entry['bytes']}: "
                        f"it is truncated or was replaced; re-run `longtrain prepare`")
    if verify_checksum and sha256_file(path) != entry["sha256"]:
        raise DataError(f"shard {path} does not match its checksum in the manifest; re-run `longtrain prepare`")
    try:
        mm = pa.memory_map(str(path), "r")
        table = pa.ipc.open_file(mm).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"shard {path} is not a readable Arrow IPC file ({e}); re-run `longtrain prepare`") from e
    if table.schema.names != ["tokens"] or not pa.types.is_large_list(table.schema.field("tokens").type):
        raise DataError(f"shard {path} has schema {table.schema}, expected one column 'tokens' of "
                        f"large_list<uint16|uint32>; it was not written by `longtrain prepare`")
    col = table.column("tokens").combine_chunks() if table.num_rows else None
    if col is None:
        offsets, values = np.zeros(1, np.int64), np.zeros(0, np.uint32)
    else:
        offsets = np.frombuffer(col.buffers()[1], dtype=np.int64)[col.offset: col.offset + len(col) + 1]
        values = col.values.to_numpy(zero_copy_only=True)
    if len(offsets) - 1 != entry["documents"] or int(offsets[-1] - offsets[0]) != entry["tokens"]:
        raise DataError(f"shard {path} holds {len(offsets) - 1} documents / {int(offsets[-1] - offsets[0])} "
                        f"tokens, the manifest says {entry['documents']} / {entry['tokens']}")
    if values.size and int(values.max()) >= vocab_size:
        raise DataError(f"shard {path} contains token id {int(values.max())} outside the vocabulary "
                        f"(size {vocab_size}); it was prepared with another tokenizer")
    return Shard(path, offsets - offsets[0], values[offsets[0]:], mm)


def read_manifest(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        raise DataError(f"no {MANIFEST} in {data_dir}; create the dataset with `longtrain prepare`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-run `longtrain prepare`") from e
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    if not manifest.get("tokens"):
        raise DataError(f"the dataset in {data_dir} is empty (0 tokens); prepare it from non-empty inputs")
    return manifest


def open_dataset(data_dir: str | os.PathLike, verify_checksum: bool = False) -> tuple[dict, list[Shard]]:
    """Manifest and memory-mapped shards, validated (sizes, schema, counts, token range)."""
    manifest = read_manifest(data_dir)
    vocab = int(manifest["tokenizer"]["vocab_size"])
    shards = [open_shard(Path(data_dir) / e["file"], e, vocab, verify_checksum) for e in manifest["shards"]]
    return manifest, shards


def batched(docs: Iterable[np.ndarray], max_tokens: int) -> Iterable[list[np.ndarray]]:
    """Group documents into shards of about `max_tokens` tokens."""
    group: list[np.ndarray] = []
    size = 0
    for d in docs:
        group.append(d)
        size += len(d)
        if size >= max_tokens:
            yield group
            group, size = [], 0
    if group:
        yield group
