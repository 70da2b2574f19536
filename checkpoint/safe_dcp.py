"""Reading a DCP checkpoint someone else wrote without running their code.

torch.distributed.checkpoint keeps its metadata (`.metadata`) as a plain pickle, and reads it
with `pickle.load`: a tampered file runs whatever its `__reduce__` names, on every rank,
before anything is checked (the checksums in COMMITTED.json catch bit rot, not a checkpoint
handed over by someone else: they can be rewritten too). Its default load planner also
unpickles non-tensor entries with `torch.load(weights_only=False)`.

Here the metadata goes through an unpickler that admits only the classes DCP's metadata is
made of (and torch dtypes, sizes, layouts, paths) and lets pickle's state-setting opcodes act
only on objects the metadata itself built (so it cannot rewrite a class for the whole process);
non-tensor entries go through `torch.load(weights_only=True)`; every data file the metadata
names must be a regular file in the checkpoint's own folder, every item inside its file, and
no item may ask for a stream transform. Tensor data is already read with `weights_only=True`
by DCP. Anything else is refused with the checkpoint's name and what was refused.
"""

from __future__ import annotations

import io
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from longtrain.files import METADATA_LIMIT, confined, plain_file, read_bytes, regular

_DCP = "torch.distributed.checkpoint.metadata"
ALLOWED = {
    (_DCP, n) for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class UnsafeCheckpoint(ValueError):
    """A checkpoint holds something loading it could execute or reach outside its folder."""


def _is_dtype(module: str, name: str) -> bool:
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


def _buildable() -> tuple[type, ...]:
    """The classes whose fresh instances pickle's BUILD may fill in: DCP's metadata dataclasses.
    BUILD on anything else (a class: `pathlib.PosixPath`, a function, an enum member, a dtype)
    would set attributes on an object the whole process shares."""
    from torch.distributed.checkpoint import metadata as md
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    return (md.Metadata, md.MetadataIndex, md.StorageMeta, md.TensorProperties, md.TensorStorageMetadata,
            md.BytesStorageMetadata, md.ChunkStorageMetadata, _StorageInfo)


class _MetadataUnpickler(pickle._Unpickler):  # the Python unpickler: its opcodes can be guarded one by one
    """Looks up only `ALLOWED` globals, and lets the opcodes that change an existing object act
    only on what this pickle built: BUILD on fresh DCP metadata instances, APPEND(S) on lists,
    SETITEM(S) on dicts, ADDITEMS on sets. So nothing outside the metadata can be touched."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, f, where: Path):
        super().__init__(f)
        self.where = where
        self.buildable = _buildable()

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED or _is_dtype(module, name):
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f"checkpoint {self.where}: its metadata names {module}.{name}, which DCP metadata "
                               "never holds; refused without loading it (unpickling it could run code). Use a "
                               "checkpoint from a source you trust, or one longtrain wrote")

    def _refuse(self, opcode: str, target) -> UnsafeCheckpoint:
        what = target.__qualname__ if isinstance(target, type) else type(target).__qualname__ + " object"
        return UnsafeCheckpoint(f"checkpoint {self.where}: its metadata applies {opcode} to {what}, which DCP "
                                "metadata never does (it would change an object outside the checkpoint); refused")

    def _target(self, opcode: str, depth: int, kinds: tuple[type, ...]):
        target = self.stack[-depth]
        if type(target) not in kinds:
            raise self._refuse(opcode, target)
        return target

    def load_build(self):
        self._target("BUILD", 2, self.buildable)
        pickle._Unpickler.load_build(self)
    dispatch[pickle.BUILD[0]] = load_build

    def load_append(self):
        self._target("APPEND", 2, (list,))
        pickle._Unpickler.load_append(self)
    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self):
        items = self.pop_mark()
        self._target("APPENDS", 1, (list,)).extend(items)
    dispatch[pickle.APPENDS[0]] = load_appends

    def load_setitem(self):
        self._target("SETITEM", 3, (dict, OrderedDict))
        pickle._Unpickler.load_setitem(self)
    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self):
        items = self.pop_mark()
        target = self._target("SETITEMS", 1, (dict, OrderedDict))
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_additems(self):
        items = self.pop_mark()
        self._target("ADDITEMS", 1, (set,)).update(items)
    dispatch[pickle.ADDITEMS[0]] = load_additems


def read_metadata(path: str | os.PathLike, rank: int | None = None):
    """The DCP `Metadata` of the checkpoint in `path`, through the restricted unpickler, checked
    (`check_metadata`) before anything reads a data file it names."""
    path = Path(path)
    name = ".metadata" if rank is None else f"__{rank}.metadata"
    try:
        raw = read_bytes(confined(path, name, "metadata file", UnsafeCheckpoint), METADATA_LIMIT, UnsafeCheckpoint)
    except OSError as e:
        raise UnsafeCheckpoint(f"checkpoint {path}: cannot read {name} ({e})") from e
    try:
        metadata = _MetadataUnpickler(io.BytesIO(raw), path).load()
    except UnsafeCheckpoint:
        raise
    except Exception as e:  # truncated, garbled: not a pickle DCP wrote
        raise UnsafeCheckpoint(f"checkpoint {path}: {name} is not DCP metadata ({type(e).__name__}: {e})") from e
    check_metadata(metadata, path, name)
    return metadata


def _is_size(value) -> bool:
    return isinstance(value, torch.Size) and all(isinstance(n, int) and n >= 0 for n in value)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_metadata(metadata, path: Path, name: str = ".metadata") -> None:
    """What DCP takes on trust, checked: every entry is a tensor or bytes entry; every tensor's
    chunks have its rank and lie inside it; every data file named is a regular file of the
    checkpoint's folder, and each item's bytes lie inside it; no item asks for a stream transform
    (longtrain writes none: a decompressor would expand an item whole in memory)."""
    from torch.distributed.checkpoint import metadata as md
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    def bad(what: str) -> UnsafeCheckpoint:
        return UnsafeCheckpoint(f"checkpoint {path}: {name} {what}; refused")

    if not isinstance(metadata, md.Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise bad(f"holds a {type(metadata).__name__}, not DCP metadata")
    for fqn, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, md.BytesStorageMetadata):
            continue
        if not isinstance(entry, md.TensorStorageMetadata) or not _is_size(entry.size) \
                or not isinstance(entry.properties, md.TensorProperties) \
                or not isinstance(getattr(entry.properties, "dtype", None), torch.dtype) \
                or not isinstance(entry.chunks, list):
            raise bad(f"describes {fqn!r} as neither a tensor nor bytes")
        for c in entry.chunks:
            if not isinstance(c, md.ChunkStorageMetadata) or not _is_size(c.offsets) or not _is_size(c.sizes) \
                    or len(c.offsets) != len(entry.size) or len(c.sizes) != len(entry.size) \
                    or any(o + n > whole for o, n, whole in zip(c.offsets, c.sizes, entry.size)):
                raise bad(f"gives {fqn!r} (size {tuple(entry.size)}) a chunk outside it")
    sizes: dict[str, int] = {}
    for index, info in (metadata.storage_data or {}).items():
        if not isinstance(info, _StorageInfo) or not _is_count(info.offset) or not _is_count(info.length):
            raise bad(f"stores {getattr(index, 'fqn', index)!r} in a malformed place")
        if info.transform_descriptors:
            raise bad(f"asks to read {getattr(index, 'fqn', index)!r} through the stream transform(s) "
                      f"{list(info.transform_descriptors)!r}, which longtrain never writes")
        file = info.relative_path
        if file not in sizes:
            target = plain_file(path, file)
            if target is None:
                raise bad(f"names the data file {file!r}, which is not a plain file of the checkpoint's folder")
            try:
                sizes[file] = regular(target, UnsafeCheckpoint).st_size
            except OSError as e:
                raise bad(f"names the data file {file!r}, which cannot be read ({e.strerror})") from e
        if info.offset + info.length > sizes[file]:
            raise bad(f"places {getattr(index, 'fqn', index)!r} at bytes {info.offset}..{info.offset + info.length} "
                      f"of {file}, which holds {sizes[file]}")


class SafeReader(FileSystemReader):
    """DCP's filesystem reader with the metadata read by `read_metadata`."""

    def read_metadata(self, *args, **kwargs):
        metadata = read_metadata(self.path, kwargs.get("rank"))
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's default load planner, reading non-tensor entries with `weights_only=True`."""

    def __init__(self, where: str | os.PathLike, **kwargs):
        super().__init__(**kwargs)
        self.where = where

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            why = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "not plain data")
            raise UnsafeCheckpoint(f"checkpoint {self.where}: its entry {read_item.dest_index.fqn!r} holds more than "
                                   f"plain data ({why}); refused without loading it") from e
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element  # as DCP's own planner

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load(state_dict: dict, path: str | os.PathLike, no_dist: bool) -> None:
    """`dcp.load` through `SafeReader` and `SafePlanner`. A refusal on any rank is raised on
    every rank as itself (DCP gathers each rank's failure, so no rank is left waiting)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    import warnings

    try:
        with warnings.catch_warnings():  # no_dist: DCP warns that it loads in one process, as asked
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load(state_dict, storage_reader=SafeReader(str(path)), planner=SafePlanner(path), no_dist=no_dist)
    except CheckpointException as e:
        refused = [exc for exc, _ in e.failures.values() if isinstance(exc, UnsafeCheckpoint)]
        if refused:
            raise refused[0] from None
        raise
