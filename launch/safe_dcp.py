"""Reading a DCP checkpoint someone else wrote without running their code.

torch.distributed.checkpoint keeps its metadata (`.metadata`) as a plain pickle, and reads it
with `pickle.load`: a tampered file runs whatever its `__reduce__` names, on every rank,
before anything is checked (the checksums in COMMITTED.json catch bit rot, not a checkpoint
handed over by someone else: they can be rewritten too). Its default load planner also
unpickles non-tensor entries with `torch.load(weights_only=False)`.

Here the metadata goes through an unpickler that admits only the classes DCP's metadata is
made of (and torch dtypes, sizes, layouts, paths), non-tensor entries go through
`torch.load(weights_only=True)`, and every data file the metadata names must be a plain file
in the checkpoint's own folder. Tensor data is already read with `weights_only=True` by DCP.
Anything else is refused with the checkpoint's name and what was refused.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from longtrain.data.shards import plain_file

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


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f, where: Path):
        super().__init__(f)
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED or _is_dtype(module, name):
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f"checkpoint {self.where}: its metadata names {module}.{name}, which DCP metadata "
                               "never holds; refused without loading it (unpickling it could run code). Use a "
                               "checkpoint from a source you trust, or one longtrain wrote")


def read_metadata(path: str | os.PathLike, rank: int | None = None):
    """The DCP `Metadata` of the checkpoint in `path`, through the restricted unpickler, with
    every data file it names checked to be a plain file of that folder."""
    path = Path(path)
    name = ".metadata" if rank is None else f"__{rank}.metadata"
    try:
        raw = (path / name).read_bytes()
    except OSError as e:
        raise UnsafeCheckpoint(f"checkpoint {path}: cannot read {name} ({e})") from e
    try:
        metadata = _MetadataUnpickler(io.BytesIO(raw), path).load()
    except UnsafeCheckpoint:
        raise
    except Exception as e:  # truncated, garbled: not a pickle DCP wrote
        raise UnsafeCheckpoint(f"checkpoint {path}: {name} is not DCP metadata ({type(e).__name__}: {e})") from e
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpoint(f"checkpoint {path}: {name} holds a {type(metadata).__name__}, not DCP metadata")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if plain_file(path, name) is None:
            raise UnsafeCheckpoint(f"checkpoint {path}: its metadata names the data file {name!r}, which is not a "
                                   "plain file of the checkpoint's folder; refused")
    return metadata


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
