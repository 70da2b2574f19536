"""Offline text sources: the running Python's standard library as a real-text corpus."""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Iterator


def stdlib_files() -> list[Path]:
    """The standard library's .py files, in a fixed order (tests and site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts]
    return sorted(files)


def stdlib_documents(limit_bytes: int | None = None) -> Iterator[bytes]:
    """Each standard-library source file as one document of UTF-8 bytes."""
    total = 0
    for path in stdlib_files():
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if not data:
            continue
        yield data
        total += len(data)
        if limit_bytes is not None and total >= limit_bytes:
            return
