"""Token shards on disk: Arrow IPC files plus a JSON manifest, read memory-mapped.

Each shard is one Arrow IPC file holding one column ``tokens`` (a list of token ids per
document, uint16 when the vocabulary fits, else uint32) in a single record batch, so its
offsets and values map straight onto numpy arrays backed by the page cache: opening a
corpus costs no memory however large it is. `manifest.json` lists every shard with its
document and token counts and a SHA-256, plus the tokenizer, so a shard that was truncated,
swapped or produced by another tokenizer is caught before training starts.

Checksums are verified on every open that training does (`PackedLoader`), on every rank, so
verification must be cheap: the size is compared always, and the full SHA-256 is computed only
when a shard's (size, mtime_ns, ctime_ns) differ from the stamp recorded after its last
successful hash (see `StampCache`). ctime is in the stamp because an edit that restores the old
mtime (``cp -p``, ``touch -r``) cannot restore ctime. The stamps live in the user's cache folder
(`stamp_path`), never in the dataset's: training reads a dataset and writes nothing into it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa

from longtrain.files import UnsafeFile, plain_file, read_json, regular, sha256_file

FORMAT = "longtrain-shards-v1"
MANIFEST = "manifest.json"
STAMPS_FORMAT = "longtrain-verified-v1"
RACY_NS = 2_000_000_000  # a stamp is recorded only for files last modified at least this long ago
CHANGED = "the shard changed since `longtrain prepare` wrote it: re-run prepare, or restore the file"
SHARD_FIELDS = {"file": str, "documents": int, "tokens": int, "bytes": int, "sha256": str}

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input data; the message names the file and what to do."""


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


def bytes_per_token(manifest: dict) -> float | None:
    """UTF-8 bytes of text per predicted token (each document's tokens and its end-of-document
    token), from what `prepare` recorded; None for a dataset prepared without it."""
    text, tokens, docs = manifest.get("text_bytes"), manifest.get("tokens"), manifest.get("documents")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (text, tokens, docs)):
        return None
    return text / (tokens + docs)


def write_manifest(out_dir: Path, shards: list[dict], tokenizer: dict, source: str,
                   text_bytes: int | None = None, tokenizer_files: list[str] | None = None) -> dict:
    """`text_bytes`: the UTF-8 bytes of the documents' text, so bits per byte can be reported
    for any tokenizer (`bytes_per_token`); `tokenizer_files`: the tokenizer's files copied into
    the dataset folder (a HF tokenizer's)."""
    manifest = {"format": FORMAT, "tokenizer": tokenizer, "source": source, "shards": shards,
                "documents": sum(s["documents"] for s in shards), "tokens": sum(s["tokens"] for s in shards)}
    if text_bytes is not None:
        manifest["text_bytes"] = int(text_bytes)
    if tokenizer_files:
        manifest["tokenizer_files"] = list(tokenizer_files)
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


def stamp_path(data_dir: str | os.PathLike) -> Path:
    """This user's stamp cache for a dataset folder: $XDG_CACHE_HOME (or ~/.cache)/longtrain/
    verified/<hash of the folder's absolute path>.json."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:24]
    return base / "longtrain" / "verified" / f"{key}.json"


class StampCache:
    """Which shards were hashed and found intact, keyed by what changes when a file is edited.

    A shard whose current (size, mtime_ns, ctime_ns) and manifest SHA-256 equal its stamp is
    not hashed again. The cache is advisory: unreadable or malformed means "nothing verified"
    (everything is rehashed), never an error. Ranks opening the dataset at once each write the
    whole cache to a temporary name and rename it into place, merged with what is on disk just
    before, so a reader never sees a half-written file and a lost race costs one rehash. Where
    no cache can be written, the shards are hashed on every open.
    A file modified (or restored with an old mtime: `cp -p`, `touch -r`, which set ctime) within
    RACY_NS of its hash gets no stamp, because a second change inside the same timestamp tick
    would leave the stamp unchanged (git's "racy clean" problem); the later of mtime and ctime
    counts, so coarse ctime ticks cannot hide a restore either.
    """

    def __init__(self, data_dir: str | os.PathLike, trust: bool = True):
        self.path = stamp_path(data_dir)
        self.trust = trust  # False: hash every shard (check-data), but still record the stamps
        self.stamps = self._read() if trust else {}
        self.new: dict[str, dict] = {}

    def _read(self) -> dict:
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError):  # missing, unreadable, not JSON / not UTF-8
            return {}
        ok = isinstance(raw, dict) and raw.get("format") == STAMPS_FORMAT and isinstance(raw.get("shards"), dict)
        return raw["shards"] if ok else {}

    @staticmethod
    def _stamp(entry: dict, st: os.stat_result) -> dict:
        return {"sha256": entry["sha256"], "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}

    def fresh(self, entry: dict, st: os.stat_result) -> bool:
        return self.trust and self.stamps.get(entry["file"]) == self._stamp(entry, st)

    def record(self, entry: dict, st: os.stat_result) -> None:
        """`st` is the stat taken before hashing: an edit during the hash leaves a stale stamp."""
        if _now() - max(st.st_mtime_ns, st.st_ctime_ns) >= RACY_NS:
            self.new[entry["file"]] = self._stamp(entry, st)

    def save(self) -> None:
        if not self.new:
            return
        shards = {**self._read(), **self.new}
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump({"format": STAMPS_FORMAT, "shards": shards}, f, indent=1)
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("cannot record verified shards in %s (%s); they will be hashed again on the next open",
                        self.path, e)
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
        self.new = {}


def _now() -> int:
    return time.time_ns()


def _stat(path: Path, entry: dict) -> os.stat_result:
    """The check every open makes: the shard is there, at the size `prepare` wrote."""
    if not path.exists():
        raise DataError(f"shard {path} listed in the manifest is missing; re-run `longtrain prepare`, "
                        "or restore the file")
    st = regular(path, DataError)
    if st.st_size != entry["bytes"]:
        raise DataError(f"shard {path} is {st.st_size} bytes but the manifest says {entry['bytes']} "
                        f"(truncated or replaced): {CHANGED}")
    return st


def verify_shard(path: Path, entry: dict, stamps: StampCache | None) -> None:
    """Size always; the full SHA-256 unless `stamps` vouches for the file (None: always hash)."""
    st = _stat(path, entry)
    if stamps is not None and stamps.fresh(entry, st):
        return
    try:
        digest = sha256_file(path)
    except (OSError, UnsafeFile) as e:
        raise DataError(f"shard {path} cannot be read ({e}); fix its permissions or restore the file") from e
    if digest != entry["sha256"]:
        raise DataError(f"shard {path} does not match its SHA-256 checksum in the manifest "
                        f"(same size, different content): {CHANGED}")
    if stamps is not None:
        stamps.record(entry, st)


def open_shard(path: Path, entry: dict, vocab_size: int, verify_checksum: bool,
               stamps: StampCache | None = None) -> Shard:
    """Memory-map one shard and check it against its manifest entry. With `verify_checksum`,
    the SHA-256 too (skipped where `stamps` vouches for the file); without, the size only."""
    if verify_checksum:
        verify_shard(path, entry, stamps)
    else:
        _stat(path, entry)
    try:
        mm = pa.memory_map(str(path), "r")
        table = pa.ipc.open_file(mm).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"shard {path} is not a readable Arrow IPC file ({e}); re-run `longtrain prepare`") from e
    kind = table.schema.field("tokens").type if table.schema.names == ["tokens"] else None
    if kind is None or not pa.types.is_large_list(kind) or kind.value_type not in (pa.uint16(), pa.uint32()):
        raise DataError(f"shard {path} has schema {table.schema}, expected one column 'tokens' of "
                        f"large_list<uint16|uint32>; it was not written by `longtrain prepare`")
    chunks = [c for c in table.column("tokens").chunks if len(c)]
    if len(chunks) > 1:
        raise DataError(f"shard {path} holds {len(chunks)} record batches; `longtrain prepare` writes one: re-run it")
    col = chunks[0] if chunks else None
    if col is None:
        offsets, values = np.zeros(1, np.int64), np.zeros(0, np.uint32)
    else:
        offsets, values = _offsets_and_values(path, col)
    if len(offsets) - 1 != entry["documents"] or int(offsets[-1] - offsets[0]) != entry["tokens"]:
        raise DataError(f"shard {path} holds {len(offsets) - 1} documents / {int(offsets[-1] - offsets[0])} "
                        f"tokens, the manifest says {entry['documents']} / {entry['tokens']}")
    if values.size and int(values.max()) >= vocab_size:
        raise DataError(f"shard {path} contains token id {int(values.max())} outside the vocabulary "
                        f"(size {vocab_size}); it was prepared with another tokenizer")
    return Shard(path, offsets - offsets[0], values[offsets[0]:offsets[-1]], mm)


def _offsets_and_values(path: Path, col) -> tuple[np.ndarray, np.ndarray]:
    """The document offsets and token values of a shard's column, read from its buffers
    directly (memory-mapped, no copy) after checking what Arrow itself does not check on a
    read: the offsets never decrease (a negative-length document) and stay inside the values
    buffer (else a read past its end). The first bad row is named."""
    buffers = col.buffers()
    if len(buffers) < 4 or buffers[1] is None or buffers[3] is None:
        raise DataError(f"shard {path}: its tokens column has no offsets or values buffer; re-run `longtrain prepare`")
    offsets = np.frombuffer(buffers[1], dtype=np.int64)
    if len(offsets) < col.offset + len(col) + 1:
        raise DataError(f"shard {path}: its offsets buffer holds {len(offsets)} entries for {len(col)} rows; "
                        "re-run `longtrain prepare`")
    offsets = offsets[col.offset: col.offset + len(col) + 1]
    width = col.type.value_type.bit_width // 8
    values = np.frombuffer(buffers[3], dtype=np.uint16 if width == 2 else np.uint32)
    if col.values.offset:  # a sliced child array: the offsets count from its start
        values = values[col.values.offset:]
    bad = np.flatnonzero(np.diff(offsets) < 0)
    if bad.size:
        row = int(bad[0])
        raise DataError(f"shard {path}: row {row} ends at offset {int(offsets[row + 1])}, before it starts "
                        f"({int(offsets[row])}); the offsets must not decrease: re-run `longtrain prepare`")
    if offsets[0] < 0 or offsets[-1] > len(values):
        row = int(np.flatnonzero((offsets < 0) | (offsets > len(values)))[0])
        raise DataError(f"shard {path}: row {max(row - 1, 0)}'s offsets reach {int(offsets[row])}, outside its "
                        f"{len(values)} token values; re-run `longtrain prepare`")
    return offsets, values


def load_manifest(data_dir: str | os.PathLike) -> dict:
    """The manifest as JSON, not yet validated (`check-data` lists every problem itself)."""
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        raise DataError(f"no {MANIFEST} in {data_dir}; create the dataset with `longtrain prepare`")
    if plain_file(Path(data_dir), MANIFEST) is None:
        raise DataError(f"{path} is a symbolic link leading out of the dataset folder; a dataset is read only "
                        "from the folder it names: copy the manifest into it")
    try:
        manifest = read_json(path, error=DataError)
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e})") from e
    except DataError as e:
        raise DataError(f"{e}; re-run `longtrain prepare`") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path} holds a {type(manifest).__name__}, not a manifest object; re-run `longtrain prepare`")
    return manifest


def manifest_problems(manifest: dict, data_dir: str | os.PathLike) -> list[str]:
    """Every way `manifest` departs from what `write_manifest` writes, one line each."""
    path = Path(data_dir) / MANIFEST
    if manifest.get("format") != FORMAT:
        return [f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}"]
    tok, shards, out = manifest.get("tokenizer"), manifest.get("shards"), []
    if not isinstance(tok, dict) or not all(_is_int(tok.get(k)) for k in ("vocab_size", "eos_id")):
        out.append(f"{path}: 'tokenizer' needs integer 'vocab_size' and 'eos_id'; re-run `longtrain prepare`")
    if shards == []:
        return out + [f"the dataset in {data_dir} is empty (no shards); prepare it from non-empty inputs"]
    if not isinstance(shards, list):
        return out + [f"{path}: 'shards' must be a list; re-run `longtrain prepare`"]
    for i, e in enumerate(shards):
        bad = [k for k, t in SHARD_FIELDS.items() if not isinstance(e, dict) or not _is(e.get(k), t)]
        if bad:
            out.append(f"{path}: shards[{i}] lacks a valid {', '.join(bad)}; re-run `longtrain prepare`")
        elif plain_file(Path(data_dir), e["file"]) is None:
            out.append(f"{path}: shards[{i}] file {e['file']!r} is not a plain file of the dataset folder (a path, "
                       "or a symbolic link leading out of it); list files that are in the folder")
    if out:
        return out
    names = [e["file"] for e in shards]
    if len(set(names)) != len(names):
        out.append(f"{path} lists a shard file twice; re-run `longtrain prepare`")
    for key in ("documents", "tokens"):
        if manifest.get(key) != sum(e[key] for e in shards):
            out.append(f"{path}: total {key} {manifest.get(key)!r} is not the sum over its shards")
    if not out and not manifest["tokens"]:
        out.append(f"the dataset in {data_dir} is empty (0 tokens); prepare it from non-empty inputs")
    return out


def _is(value, t: type) -> bool:
    return _is_int(value) if t is int else isinstance(value, t)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """The validated manifest; a malformed one fails here with its first problem, not later as a
    KeyError deep in the loader."""
    manifest = load_manifest(data_dir)
    problems = manifest_problems(manifest, data_dir)
    if len(problems) > 1:
        problems[0] += f" (and {len(problems) - 1} more; `longtrain check-data {data_dir}` lists them)"
    if problems:
        raise DataError(problems[0])
    return manifest


def open_dataset(data_dir: str | os.PathLike, verify_checksum: bool = False) -> tuple[dict, list[Shard]]:
    """Manifest and memory-mapped shards, validated (sizes, schema, counts, token range) and, with
    `verify_checksum` (what `PackedLoader` does), SHA-256-verified through the stamp cache."""
    manifest = read_manifest(data_dir)
    vocab = int(manifest["tokenizer"]["vocab_size"])
    stamps = StampCache(data_dir) if verify_checksum else None
    try:
        shards = [open_shard(Path(data_dir) / e["file"], e, vocab, verify_checksum, stamps)
                  for e in manifest["shards"]]
    finally:  # shards verified before a failure need no rehash once the bad one is fixed
        if stamps is not None:
            stamps.save()
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
