"""Benchmark: verifying a checkpoint on resume, on one rank and on several.

Writes a committed checkpoint of `--gib` GiB (`--files` files of random bytes with their marker,
as `checkpoint.store.write` commits one), then times what a resume runs before loading,
`checkpoint.store.latest_valid`: on one process, and on `--ranks` local gloo ranks that each
hash their share of the files (the slowest rank's time counts). The files are read once first,
so both runs hash from the page cache: the figure is the hashing, which is CPU-bound, so N ranks
on a machine of C cores take at best max(1/N, 1/C) of one rank's time.

    longtrain bench verify --gib 1 --ranks 4 --write-docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path


def _write(root: Path, gib: float, files: int) -> int:
    """A committed step folder of `files` random files totalling `gib` GiB; returns its bytes."""
    from longtrain.checkpoint.marker import MARKER

    path = root / "step-00000001"
    path.mkdir(parents=True)
    each, record = int(gib * 2**30) // files, {}
    for i in range(files):
        data = os.urandom(each)
        (path / f"__{i}_0.distcp").write_bytes(data)
        record[f"__{i}_0.distcp"] = {"bytes": each, "sha256": hashlib.sha256(data).hexdigest()}
    (path / MARKER).write_text(json.dumps({"step": 1, "files": record}))
    return each * files


def _timed(root: str) -> float:
    """Seconds `latest_valid` takes on this rank (all ranks start together)."""
    import torch.distributed as dist

    from longtrain.checkpoint.store import latest_valid

    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    found = latest_valid(root, log=lambda *_: None)
    seconds = time.perf_counter() - t0
    if found is None or found.name != "step-00000001":
        raise RuntimeError(f"the benchmark's checkpoint in {root} did not verify")
    return seconds


def measure(root: Path, ranks: int, rounds: int) -> dict:
    from longtrain.launch.spawn import spawn_local

    for f in (root / "step-00000001").iterdir():  # into the page cache: both runs hash, neither reads disk
        f.read_bytes()
    one = min(_timed(str(root)) for _ in range(rounds))
    many = min(max(spawn_local(_timed, ranks, str(root), threads=1)) for _ in range(rounds))
    return {"one_s": one, "many_s": many, "ratio": many / one}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtrain bench verify", description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=1.0, help="checkpoint size (GiB)")
    ap.add_argument("--files", type=int, default=16, help="files it is made of (DCP writes one or more per rank)")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="best of this many timings of each")
    ap.add_argument("--dir", default=None, help="where to write it (default: a temporary folder)")
    ap.add_argument("--write-docs", metavar="PATH", help="rewrite this benchmark's section of PATH")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="longtrain-verify-") as tmp:
        size = _write(Path(tmp), args.gib, args.files)
        r = measure(Path(tmp), args.ranks, args.rounds)
    table = ("| checkpoint | files | 1 rank (s) | {n} ranks (s) | {n} ranks / 1 rank |\n|---|---|---|---|---|\n"
             "| {gib:.2f} GiB | {files} | {one:.2f} | {many:.2f} | {ratio:.2f} |").format(
        n=args.ranks, gib=size / 2**30, files=args.files, one=r["one_s"], many=r["many_s"], ratio=r["ratio"])
    print(table)
    if args.write_docs:
        from .report import command_line, replace_section

        command = command_line("verify", argv)
        body = (f"Command: `{command}`\n\nResume verification (`checkpoint.store.latest_valid`): every rank checks "
                f"every file's size and hashes its share of the files; best of {args.rounds}, from the page cache, "
                f"the slowest rank's time. Hashing is CPU-bound: on {os.cpu_count()} cores the bound is "
                f"{max(1 / args.ranks, 1 / (os.cpu_count() or 1)):.2f}.\n\n{table}\n")
        replace_section(args.write_docs, "verify", "Checkpoint verification on resume: one rank against several", body)
    return 0
