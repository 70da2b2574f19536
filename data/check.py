"""`longtrain check-data DIR [--quick]`: verify a prepared dataset completely, before a run needs it.

Training checks what it must on every open (sizes always, SHA-256 through the stamp cache) and
stops at the first bad shard. This command checks everything and reports every problem, one
line each: the manifest's format and fields, then each shard (present, size, full SHA-256,
readable Arrow, document and token counts, token ids inside the vocabulary). A full check
records the stamps of the shards it hashed, so the next training run starts without hashing;
``--quick`` trusts those stamps, as training does.

Exit status: 0 all good, 1 problems found (listed on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .shards import DataError, StampCache, load_manifest, manifest_problems, open_shard

PROG = "longtrain check-data"


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())  # pyarrow messages can span lines


def check_dataset(data_dir: Path, quick: bool = False) -> tuple[dict, list[str]]:
    """Print one line per shard; return the manifest and the problems found (empty: all good)."""
    try:
        manifest = load_manifest(data_dir)
    except DataError as e:
        return {}, [_one_line(e)]
    problems = manifest_problems(manifest, data_dir)
    if problems:  # the shard entries cannot be trusted, so nothing is opened
        return manifest, problems
    vocab = manifest["tokenizer"]["vocab_size"]
    stamps = StampCache(data_dir, trust=quick)
    try:
        for entry in manifest["shards"]:
            try:
                shard = open_shard(data_dir / entry["file"], entry, vocab, True, stamps)
            except (DataError, OSError) as e:
                problems.append(_one_line(e))
                print(f"BAD  {entry['file']}")
                continue
            print(f"ok   {entry['file']}  {shard.documents} documents  {entry['tokens']} tokens")
            del shard  # release the memory map before the next one
    finally:
        stamps.save()
    return manifest, problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0].split(": ", 1)[1])
    ap.add_argument("dir", help="dataset folder written by `longtrain prepare --out DIR`")
    ap.add_argument("--quick", action="store_true",
                    help="skip the SHA-256 of shards whose size and times match the stamp of their last good hash")
    args = ap.parse_args(argv)
    data_dir = Path(args.dir)
    if not data_dir.is_dir():
        print(f"{PROG}: {data_dir} is not a directory; pass the folder `longtrain prepare --out` wrote",
              file=sys.stderr)
        return 2
    m, problems = check_dataset(data_dir, args.quick)
    for p in problems:
        print(f"{PROG}: {p}", file=sys.stderr)
    if problems:
        print(f"{PROG}: {len(problems)} problem(s) in {data_dir}", file=sys.stderr)
        return 1
    how = "size + stamp, SHA-256 where changed" if args.quick else "full SHA-256"
    print(f"{data_dir}: {len(m['shards'])} shards, {m['documents']} documents, {m['tokens']} tokens: "
          f"all verified ({how})")
    return 0
