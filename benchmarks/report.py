"""Keep docs/benchmarks.md current: each benchmark owns one marked section, rewritten in place."""

from __future__ import annotations

import datetime
import os
import platform


def replace_section(path: str, key: str, title: str, body: str) -> None:
    begin, end = f"<!-- bench:{key}:begin -->", f"<!-- bench:{key}:end -->"
    stamp = f"_{datetime.date.today().isoformat()}, {platform.processor() or platform.machine()}, " \
            f"{os.cpu_count()} cores, torch {__import__('torch').__version__}_"
    section = f"{begin}\n## {title}\n\n{stamp}\n\n{body}\n{end}"
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n\nEvery figure comes with the command that produced it.\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)


def command_line(bench: str, argv: list[str] | None) -> str:
    """The command that produced a figure: `longtrain bench NAME` and its arguments, quoted."""
    import shlex
    import sys

    return f"longtrain bench {bench} " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
