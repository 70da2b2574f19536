"""`longtrain plan CONFIG [--set k=v] [--world N] [--device-memory 80GiB] [--json]`: know before you launch.

Per rank: parameters, gradients, optimizer state, activations saved under the config's
checkpoint and act-quant policy, attention and loss workspace, communication buffers and the
peak; FLOPs per step; bytes sent per step per collective kind; a lower bound on the step
time. With --world N: the layouts of N ranks that fit, best first. --json prints one object
whose `peak_mib` is the largest rank's planned peak, in the unit and sense of the
`peak_mem_mib` that training writes to metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import tempfile

from longtrain.planner.memory import MIB

_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 1e3, "mb": 1e6, "gb": 1e9,
          "tb": 1e12}


def parse_size(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"size {text!r}: give a number and a unit, e.g. 80GiB, 24GB or 512MiB")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def _size(text: str) -> float:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _args(argv):
    ap = argparse.ArgumentParser(prog="longtrain plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", help="TOML file (omit for the defaults)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--world", type=int, help="list the layouts of this many ranks that fit, best first")
    ap.add_argument("--device-memory", type=_size, metavar="SIZE",
                    help="memory per rank (default on CPU: this machine's memory shared by the ranks)")
    ap.add_argument("--gpu", choices=["h100", "h200", "a100", "l40s"],
                    help="plan for this GPU: its memory less 10%% headroom (unless --device-memory), the CUDA context "
                         "and NCCL buffers counted, host memory (checkpoint staging) apart, the datasheet bf16 rate "
                         "(planner/gpus.py)")
    ap.add_argument("--gpus-per-node", type=int, metavar="N",
                    help="GPUs per node: offer only layouts whose tp x cp_ulysses groups fit inside a node")
    ap.add_argument("--baseline-mib", type=float, help="a rank's resident baseline (default: measured, CPU)")
    ap.add_argument("--rate-gflops", type=float, help="FLOP rate per rank (default: measured fp32 matmul, CPU)")
    ap.add_argument("--link-gbps", type=float, default=None,
                    help="GB/s a rank sends at (step-time bound; default 10 on CPU; with --gpu the card's node links)")
    ap.add_argument("--data", metavar="PATH", help="a prepared dataset whose document lengths the plan uses (attention "
                    "work, ring balance); default: the config's data.path")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    ap.add_argument("--header", action="store_true",
                    help="the comment lines a shipped config carries about its plan (configs/*.toml; a test "
                         "compares them with the plan)")
    args = ap.parse_args(argv)
    # the arguments that decide the plan, as given (the --header command line)
    args.argv = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--header", "--json")]
    return args


def _machine(cfg, args, ranks_here: int) -> tuple[float, float, float | None, str]:
    """(baseline bytes, FLOP/s per rank, memory limit per rank, where the numbers come from)."""
    from longtrain.planner.flops import DATASHEET
    from longtrain.planner.machine import matmul_rate

    if args.gpu or cfg.device == "cuda":
        from longtrain.planner.gpus import GPUS, HEADROOM

        gpu = GPUS[args.gpu or "h100"]
        rate = (args.rate_gflops or 0) * 1e9 or DATASHEET[args.gpu or "h100"] * gpu.efficiency
        limit = args.device_memory if args.device_memory is not None else gpu.usable
        room = "" if args.device_memory is not None else f", {gpu.memory / 2**30:.1f} GiB less {HEADROOM:.0%} headroom"
        speed = "" if args.rate_gflops else f"; kernels at {gpu.efficiency:.0%} of its bf16 datasheet rate"
        return (args.baseline_mib or 0) * MIB, rate, limit, f"{gpu.name}{room}{speed} (unverified on GPU)"
    threads = max(1, (os.cpu_count() or 1) // ranks_here)
    rate = (args.rate_gflops or 0) * 1e9 or matmul_rate(threads)
    if args.baseline_mib is not None:
        base, how = args.baseline_mib * MIB, "given baseline"
    else:
        try:
            base, how = measure_baseline_mib(cfg, ranks_here) * MIB, "measured baseline"
        except Exception as e:  # noqa: BLE001 - no data here: say so, plan without it
            base, how = 0.0, f"no baseline ({str(e).splitlines()[0][:80]}); pass --baseline-mib"
    limit = args.device_memory
    if limit is None:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / ranks_here
    return base, rate, limit, f"{how}; fp32 matmul {rate / 1e9:.0f} GFLOP/s per rank ({threads} threads)"


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    from longtrain.config.loading import ConfigError, load_tree
    from longtrain.config.train import expand_stages

    try:
        from longtrain.config.hf import without_absent_hf

        tree, absent = without_absent_hf(load_tree(args.config, args.overrides))
        cfg = expand_stages(tree)[-1]
        if args.gpu:  # planned as a GPU job: device memory apart from host memory
            import dataclasses

            cfg = dataclasses.replace(cfg, device="cuda")
        if args.gpus_per_node is not None and args.gpus_per_node < 1:
            raise ValueError(f"--gpus-per-node {args.gpus_per_node} must be >= 1")
        if args.data:
            import dataclasses

            if not os.path.isfile(os.path.join(args.data, "manifest.json")):
                raise ValueError(f"--data {args.data}: no manifest.json there (prepare it with longtrain prepare)")
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=os.path.abspath(args.data)))
        if args.world is not None and args.world < 1:
            raise ValueError(f"--world {args.world} must be >= 1")
    except (ConfigError, ValueError) as e:
        print(f"longtrain plan: {e}", file=sys.stderr)
        return 2
    from longtrain.planner.flops import DATASHEET
    from longtrain.planner.report import layout_table, plan_object, plan_text

    ranks_here = args.world or cfg.parallel.world_size
    base, rate, limit, source = _machine(cfg, args, ranks_here)
    source += f"; {absent}" if absent else ""
    link = _links(cfg, args)
    peak = DATASHEET[args.gpu or "h100"] if cfg.device == "cuda" else rate  # what MFU divides by
    if args.world is not None:
        from longtrain.planner.search import search

        fits, rejected = search(cfg, args.world, limit, base, rate, link, args.gpus_per_node)
        if args.json:
            print(json.dumps({"world": args.world, "fits": [plan_object(
                _with(cfg, c), c, rate, source, limit, peak) for c in fits],
                "rejected": [{"layout": str(d), "why": why} for d, why in rejected]}))
        else:
            print(layout_table(fits, rejected, limit, source))
        return 0 if fits else 1
    from longtrain.planner.search import evaluate

    from longtrain.planner.gpus import placement_problem

    cand = evaluate(cfg, base, rate, link)
    obj = plan_object(cfg, cand, rate, source, limit, peak)
    obj["placement_problem"] = placement_problem(cfg.parallel, args.gpus_per_node)
    if args.header:
        from longtrain.planner.report import header_lines

        print("\n".join(header_lines(obj, "longtrain plan " + " ".join(shlex.quote(a) for a in args.argv))))
        return 0
    print(json.dumps(obj) if args.json else plan_text(obj, cand.memory))
    return 0


def _links(cfg, args):
    """The links collectives cross: one speed on CPU (--link-gbps, default 10 GB/s); with a GPU
    the card's node links (NVLink inside a node, one NIC per GPU across), nodes of
    --gpus-per-node GPUs."""
    from longtrain.planner.search import Links

    if cfg.device != "cuda" or args.link_gbps is not None:
        speed = (args.link_gbps or 10.0) * 1e9
        return Links(speed, speed, args.gpus_per_node)
    from longtrain.planner.gpus import GPUS

    gpu = GPUS[args.gpu or "h100"]
    return Links(gpu.intra_node, gpu.inter_node, args.gpus_per_node)


def _with(cfg, cand):
    import dataclasses

    return dataclasses.replace(cfg, parallel=cand.parallel, optim=dataclasses.replace(cfg.optim, zero=cand.zero))


def measure_baseline_mib(cfg, ranks_per_machine: int) -> float:
    """Peak resident set (MiB) of one rank of this job with a tiny model (CPU only)."""
    from longtrain.launch.spawn import spawn_local
    from longtrain.train.baseline import baseline_rank, tiny

    threads = max(1, (os.cpu_count() or 1) // max(1, ranks_per_machine))
    with tempfile.TemporaryDirectory(prefix="longtrain-plan-") as out:
        return spawn_local(baseline_rank, 1, tiny(cfg, out), cfg.parallel.pp > 1, threads=threads)[0]


if __name__ == "__main__":
    sys.exit(main())
