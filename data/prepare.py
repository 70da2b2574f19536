"""`longtrain prepare`: text files, JSONL or Parquet (or a built-in source) -> token shards.

Inputs are read as documents: a .txt/.md/.py (any other) file is one document, a .jsonl file
one document per line (field ``--text-field``, default "text"), a .parquet file one per row
of that column. Directories are walked in sorted order. Built-in sources: ``stdlib`` (the
running Python's standard-library source, real text that needs no download) and
``passkey`` (see `data.passkey`, synthetic long-range retrieval).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from .shards import FORMAT, MANIFEST, DataError, batched, load_manifest, write_manifest, write_shard
from .tokenizer import load_tokenizer

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text"}


def _iter_files(paths: list[str]) -> Iterator[Path]:
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(q for q in p.rglob("*") if q.is_file())
        elif p.exists():
            yield p
        else:
            raise DataError(f"input {p} does not exist")


def _jsonl(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n} is not valid JSON ({e.msg})") from e
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise DataError(f"{path}:{n} has no string field {field!r}; pass --text-field NAME")
            yield row[field]


def _parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds
        raise DataError(f"{path} is not a readable Parquet file ({e})") from e
    if field not in pf.schema_arrow.names:
        raise DataError(f"{path} has no column {field!r} (columns: {pf.schema_arrow.names}); pass --text-field NAME")
    for batch in pf.iter_batches(columns=[field]):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield value


def documents(inputs: list[str], text_field: str = "text", limit_bytes: int | None = None) -> Iterator[str | bytes]:
    """Documents from files or built-in sources ('stdlib')."""
    if inputs == ["stdlib"]:
        from .sources import stdlib_documents

        yield from stdlib_documents(limit_bytes)
        return
    for path in _iter_files(inputs):
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            yield from _jsonl(path, text_field)
        elif suffix == ".parquet":
            yield from _parquet(path, text_field)
        else:
            yield path.read_bytes()


def prepare(inputs: list[str], out_dir: str, tokenizer: str | None = None, text_field: str = "text",
            shard_tokens: int = 1 << 24, limit_bytes: int | None = None, overwrite: bool = False) -> dict:
    """Tokenize `inputs` into shards of about `shard_tokens` tokens under `out_dir`.

    Nothing existing is lost: a non-empty `out_dir` is refused unless `overwrite`; the dataset
    is written into a temporary folder beside it and renamed into place only when complete, so
    a failure leaves `out_dir` as it was (and no empty folder), and with `overwrite` the old
    dataset is replaced in one rename. `overwrite` replaces only a longtrain dataset (a manifest
    and the shards it lists): any other folder is refused. A symbolic link as `out_dir` stays
    in place: the dataset is written where it points."""
    tok = load_tokenizer(tokenizer)
    out = _target(Path(out_dir), overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        text_bytes = [0]  # of the documents kept (those with any token), for bits per byte

        def encoded():
            for d in documents(inputs, text_field, limit_bytes):
                t = tok.encode(d)
                if len(t):
                    text_bytes[0] += len(d) if isinstance(d, bytes) else len(d.encode("utf-8", errors="surrogatepass"))
                    yield t

        entries = [write_shard(tmp / f"shard-{i:05d}.arrow", group, tok.vocab_size)
                   for i, group in enumerate(batched(encoded(), shard_tokens))]
        if not entries:
            raise DataError(f"no text found in {inputs}; nothing to prepare")
        copied = _copy_tokenizer(tokenizer, tmp)
        manifest = write_manifest(tmp, entries, tok.describe(), " ".join(inputs), text_bytes[0], copied)
        _into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _copy_tokenizer(spec: str | None, into: Path) -> list[str]:
    """A HF tokenizer's files (the JSON file given, and beside it its config and special tokens
    map) copied into the dataset, so the dataset says how to read it back and `longtrain
    export` can hand the tokenizer on with the model. Nothing for the byte tokenizer."""
    if spec in (None, "", "bytes"):
        return []
    source = Path(spec)
    copied = []
    for name, path in [("tokenizer.json", source)] + [(n, source.parent / n) for n in TOKENIZER_FILES[1:]]:
        if path.is_file() and not path.is_symlink():
            shutil.copyfile(path, into / name)
            copied.append(name)
    return copied


def _target(out: Path, overwrite: bool) -> Path:
    """Where the dataset goes: `out`, or the folder it links to; refused if that holds something
    this call may not replace."""
    if out.is_symlink():
        out = Path(os.path.realpath(out))
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return out
    if not overwrite:
        raise DataError(f"--out {out} already exists and is not empty; choose another folder, or pass "
                        "--overwrite to replace it")
    if not out.is_dir():
        raise DataError(f"--out {out} is a file, not a longtrain dataset; --overwrite replaces only a dataset "
                        "folder: choose another --out")
    try:
        manifest = load_manifest(out)
    except DataError as e:
        raise DataError(f"--out {out} is not a longtrain dataset ({e}); --overwrite replaces only a dataset "
                        "folder: choose another --out") from None
    shards = manifest.get("shards") if manifest.get("format") == FORMAT else None
    ours = {MANIFEST} | {e.get("file") for e in shards or [] if isinstance(e, dict)} | \
        {n for n in manifest.get("tokenizer_files") or [] if n in TOKENIZER_FILES}
    others = sorted(p.name for p in out.iterdir() if p.name not in ours)
    if shards is None or others:
        what = f"it also holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}" if others \
            else f"its {MANIFEST} is not a longtrain manifest"
        raise DataError(f"--out {out} is not only a longtrain dataset ({what}); --overwrite replaces only a dataset "
                        "folder: move those files away, or choose another --out")
    return out


def _into_place(tmp: Path, out: Path) -> None:
    """Rename the finished dataset to `out`; an existing one (only with --overwrite) is moved
    aside first and deleted after the new one is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtrain prepare", description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("inputs", nargs="+", help="files or directories (.txt/.jsonl/.parquet/...), or 'stdlib'")
    ap.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    ap.add_argument("--tokenizer", default="bytes", help="'bytes' or a tokenizers JSON file")
    ap.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    ap.add_argument("--shard-tokens", type=int, default=1 << 24)
    ap.add_argument("--limit-bytes", type=int, default=None, help="stop after about this much input (stdlib)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    args = ap.parse_args(argv)
    try:
        m = prepare(args.inputs, args.out, args.tokenizer, args.text_field, args.shard_tokens, args.limit_bytes,
                    overwrite=args.overwrite)
    except DataError as e:
        print(f"longtrain prepare: {e}", file=sys.stderr)
        return 2
    vocab = m["tokenizer"]["vocab_size"]
    print(f"{m['documents']} documents, {m['tokens']} tokens in {len(m['shards'])} shards -> {args.out}; "
          f"vocabulary {vocab} token ids: model.vocab_size = {-(-vocab // 64) * 64} (or a multiple of 64 x tp)")
    return 0
