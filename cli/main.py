"""The `longtrain` command.

    longtrain check [--ranks 4]             exact sequence-parallel attention on local gloo ranks
    longtrain prepare INPUTS --out DIR      text / JSONL / Parquet / 'stdlib' -> Arrow token shards
    longtrain check-data DIR [--quick]      verify a prepared dataset: manifest, sizes, SHA-256, contents
    longtrain train CONFIG [--set k=v]      train (embedded Ray, a cluster, torchrun/srun, or local ranks;
                                            resumes from the last valid checkpoint)
    longtrain eval CONFIG [--batches N]     held-out loss / accuracy of the run's newest checkpoint
    longtrain plan CONFIG [--world N]       memory per rank, bytes, FLOPs and a step-time bound, before launch
    longtrain bench attention [...]         attention benchmark table (docs/benchmarks.md)
    longtrain bench actquant [...]          activation quantization: memory, gradient error, loss
    longtrain bench passkey [CONFIG]        train + evaluate passkey retrieval at 16K (docs/benchmarks.md)
    longtrain bench comm [--layers 4]       collectives and host syncs of one micro-batch, per kind
    longtrain bench plan [--only NAME]      the plan (memory, bytes) against short training runs
    longtrain bench longrun CONFIG [...]    a long-context run against its plan, killed and resumed (1M tokens)
    longtrain bench checkpoint [CONFIG]     step time around a checkpoint save, synchronous vs in the background
    longtrain bench pipeline [CONFIG]       pipeline bubble vs the 1F1B bound, interleaved gain, overlap, ZeRO memory
"""

from __future__ import annotations

import argparse
import sys


def _check(argv: list[str]) -> int:
    from longtrain.cli.check import main

    return main(argv)


BENCHMARKS = ("attention", "actquant", "passkey", "comm", "plan", "longrun", "checkpoint", "pipeline")


def _bench(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: longtrain bench {{{','.join(BENCHMARKS)}}} [options]  (see --help)", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(f"longtrain.benchmarks.{argv[0]}").main(argv[1:])


def _prepare(argv: list[str]) -> int:
    from longtrain.data.prepare import main

    return main(argv)


def _check_data(argv: list[str]) -> int:
    from longtrain.data.check import main

    return main(argv)


def _train(argv: list[str]) -> int:
    from longtrain.cli.train import main

    return main(argv)


def _eval(argv: list[str]) -> int:
    from longtrain.cli.eval import main

    return main(argv)


def _plan(argv: list[str]) -> int:
    from longtrain.cli.plan import main

    return main(argv)


def _export(argv: list[str]) -> int:
    from longtrain.cli.export import main as export_main

    return export_main(argv)


COMMANDS = {"export": _export, "plan": _plan, "check": _check, "bench": _bench, "prepare": _prepare, "check-data": _check_data, "train": _train,
            "eval": _eval}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="longtrain", description="long-context distributed training")
    ap.add_argument("command", choices=sorted(COMMANDS))
    ap.add_argument("args", nargs=argparse.REMAINDER)
    ns = ap.parse_args(argv[:1])
    from longtrain.train.host_memory import request_huge_pages

    request_huge_pages()  # before torch is imported here or in any rank started from here
    from longtrain.train.stopping import Stopped

    try:
        return COMMANDS[ns.command](argv[1:])
    except (Stopped, KeyboardInterrupt) as e:  # Ctrl-C outside a training run: no traceback either
        print(f"longtrain {ns.command}: {e or 'stopped by SIGINT'}", file=sys.stderr)
        return getattr(e, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())
