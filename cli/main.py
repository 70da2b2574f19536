"""The `longtrain` command.

    longtrain check [--ranks 4] [--device]  the kernel each block kind gets; exact sequence-parallel attention on local gloo ranks
    longtrain prepare INPUTS --out DIR      text / JSONL / Parquet / 'stdlib' -> Arrow token shards
    longtrain check-data DIR [--quick]      verify a prepared dataset: manifest, sizes, SHA-256, contents
    longtrain train CONFIG [--set k=v]      train (embedded Ray, a cluster, torchrun/srun, or local ranks;
                                            resumes from the last valid checkpoint)
    longtrain eval CONFIG [--batches N]     held-out loss / accuracy of the run's newest checkpoint
    longtrain plan CONFIG [--world N]       memory per rank, bytes, FLOPs and a step-time bound, before launch
    longtrain export CHECKPOINT OUT         a checkpoint as a Hugging Face model folder
    longtrain config show CONFIG [--set]    the resolved config, every key (TOML, or --json)
    longtrain config schema [--json]        every key: type, default, description
    longtrain --version
    longtrain bench attention [...]         attention benchmark table (docs/benchmarks.md)
    longtrain bench actquant [...]          activation quantization: memory, gradient error, loss
    longtrain bench passkey [CONFIG]        train + evaluate passkey retrieval at 16K (docs/benchmarks.md)
    longtrain bench comm [--layers 4]       collectives and host syncs of one micro-batch, per kind
    longtrain bench plan [--only NAME]      the plan (memory, bytes) against short training runs
    longtrain bench longrun CONFIG [...]    a long-context run against its plan, killed and resumed (1M tokens)
    longtrain bench checkpoint [CONFIG]     step time around a checkpoint save, synchronous vs in the background
    longtrain bench pipeline [CONFIG]       pipeline bubble vs the 1F1B bound, interleaved gain, overlap, ZeRO memory
    longtrain bench verify [--gib 1]        checkpoint verification on resume: one rank against several
    longtrain bench gpu [--device cpu]      a GPU machine's first checks: kernels, NCCL layouts, a run vs its plan
"""

from __future__ import annotations

import argparse
import sys


# every subcommand: (module whose `main(argv)` runs it, one line for `longtrain --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("longtrain.cli.check", "exact sequence-parallel attention on local gloo ranks (and devices)"),
    "prepare": ("longtrain.data.prepare", "text / JSONL / Parquet / 'stdlib' -> Arrow token shards"),
    "check-data": ("longtrain.data.check", "verify a prepared dataset: manifest, sizes, SHA-256, contents"),
    "train": ("longtrain.cli.train", "train (embedded Ray, a cluster, torchrun/srun, or local ranks); resumes"),
    "eval": ("longtrain.cli.eval", "held-out loss / accuracy of the run's newest checkpoint"),
    "plan": ("longtrain.cli.plan", "memory per rank, bytes, FLOPs and a step-time bound, before launch"),
    "export": ("longtrain.cli.export", "a checkpoint as a Hugging Face model folder"),
    "config": ("longtrain.cli.config", "the resolved config of a run (show), or every key (schema)"),
    "bench": ("", "benchmarks that write docs/benchmarks.md (longtrain bench --help)"),
}
BENCHMARKS = ("attention", "actquant", "passkey", "comm", "plan", "longrun", "checkpoint", "pipeline", "verify", "balance", "step", "published", "gpu")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("longtrain")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _bench(argv: list[str]) -> int:
    import importlib
    import importlib.util

    if not argv or argv[0] not in BENCHMARKS:
        lines = []
        for name in BENCHMARKS:  # each benchmark's first docstring line, without importing torch
            spec = importlib.util.find_spec(f"longtrain.benchmarks.{name}")
            first = _first_line(spec.origin) if spec and spec.origin else ""
            lines.append(f"  {name:<11} {first}")
        out = sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr
        print("usage: longtrain bench NAME [options]   (longtrain bench NAME --help: its options)\n\nbenchmarks:\n"
              + "\n".join(lines), file=out)
        return 0 if out is sys.stdout else 2
    return importlib.import_module(f"longtrain.benchmarks.{argv[0]}").main(argv[1:])


def _first_line(path: str) -> str:
    import ast

    with open(path, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    sentence = doc.split("\n\n")[0].replace("\n", " ").split(". ")[0].rstrip(".")
    return sentence.removeprefix("Benchmark: ")


def _run(command: str, argv: list[str]) -> int:
    if command == "bench":
        return _bench(argv)
    import importlib

    return importlib.import_module(COMMANDS[command][0]).main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    listing = "\n".join(f"  {name:<11} {text}" for name, (_, text) in COMMANDS.items())
    ap = argparse.ArgumentParser(prog="longtrain", description="long-context distributed training",
                                 epilog=f"commands:\n{listing}\n\nlongtrain COMMAND --help: its options",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"longtrain {_version()}")
    ap.add_argument("command", choices=list(COMMANDS), metavar="COMMAND")
    ap.add_argument("args", nargs=argparse.REMAINDER)
    ns = ap.parse_args(argv[:1])
    from longtrain.train.host_memory import request_huge_pages

    request_huge_pages()  # before torch is imported here or in any rank started from here
    from longtrain.train.stopping import Stopped

    try:
        rc = _run(ns.command, argv[1:])
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return rc
    except (Stopped, KeyboardInterrupt) as e:  # Ctrl-C outside a training run: no traceback either
        print(f"longtrain {ns.command}: {str(e) or 'stopped by SIGINT'}", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except BrokenPipeError:  # output piped into `head` and closed: not an error of longtrain's
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit must not fail
        return 0


if __name__ == "__main__":
    sys.exit(main())
