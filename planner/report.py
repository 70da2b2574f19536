"""The plan as one JSON-ready object, and as the tables `longtrain plan` prints."""

from __future__ import annotations

from longtrain.config.train import TrainConfig

from .comm import step_bytes
from .documents import ring_balance
from .memory import MIB, MemoryPlan
from .search import Candidate
from .shapes import local_sizes


def plan_object(cfg: TrainConfig, cand: Candidate, rate: float, source: str, limit: float | None = None,
                peak: float | None = None) -> dict:
    """The plan of `cfg` (its layout evaluated as `cand`) as one JSON-ready object. `rate`: the
    FLOP/s a rank is planned at; `peak`: what MFU divides by (default `rate`)."""
    p, mem, fl = cfg.parallel, cand.memory, cand.flops
    loc = local_sizes(cfg.model, p, cfg.data.seq_len, cfg.data.batch_size, cfg.sequence_parallel)
    return {
        "layout": {"tp": p.tp, "cp_ulysses": p.cp_ulysses, "cp_ring": p.cp_ring, "dp": p.dp, "ep": p.ep, "pp": p.pp,
                   "world": p.world_size, "zero": cfg.optim.zero,
                   **({"schedule": cfg.pipeline.schedule, "virtual_stages": cfg.pipeline.virtual_stages,
                       "planned_pp_rank": mem.pp_rank} if p.pp > 1 else {})},
        "tokens_per_rank": loc.tokens,
        "device": cfg.device,
        "peak_mib": round(mem.peak / MIB, 1),
        "host_mib": round(mem.host / MIB, 1),  # GPU: in the node's memory, not the card's (checkpoint staging)
        "fits": None if limit is None else mem.peak <= limit,
        "limit_mib": None if limit is None else round(limit / MIB, 1),
        "memory_mib": {"baseline": round(mem.baseline / MIB, 1),
                       **{g: {i.name: round(i.bytes / MIB, 1) for i in items} for g, items in mem.groups.items()},
                       "backward_peak": round(mem.backward_peak / MIB, 1), "step_peak": round(mem.step_peak / MIB, 1)},
        "activation_bytes_per_token_per_layer": round((mem.total("saved") + mem.total("transient"))
                                                      / loc.tokens / cfg.model.n_layers, 1),
        "flops": {"model_per_step": fl.model, "hardware_per_step": fl.hardware, "per_rank": fl.per_rank,
                  "attention_over": fl.attention_basis},
        "bytes_per_step": {k: round(v) for k, v in cand.sent.items()},  # the busiest ring rank
        "bytes_per_step_rank0": {k: round(v) for k, v in step_bytes(cfg, 0, 0).items()},  # what metrics.jsonl counts
        "ring_balance": ring_balance(cfg),  # attention work per ring rank on the data's documents
        "step_seconds_min": round(cand.seconds, 3),
        "step_seconds": {"compute": round(cand.compute_seconds - cand.bubble_seconds, 3),
                         "communication_not_hidden": round(cand.comm_seconds, 3),
                         "pipeline_bubble": round(cand.bubble_seconds, 3)},
        "tokens_per_s_per_rank": round(cfg.tokens_per_step / cand.seconds / p.world_size, 1),
        "mfu": round(fl.model / cand.seconds / (p.world_size * (peak or rate)), 4),
        "peak_flops_per_rank": peak or rate,
        "rate_flops_per_rank": rate,
        "source": source,
    }


def _mib(x: float) -> str:
    return f"{x:,.0f}"


def plan_text(obj: dict, mem: MemoryPlan) -> str:
    lay = obj["layout"]
    ep = f" (ep {lay['ep']})" if lay["ep"] > 1 else ""
    pp = (f"pp {lay['pp']} ({lay['schedule']}; memory of pipeline rank {lay['planned_pp_rank']}) x "
          if lay["pp"] > 1 else "")
    zero = f", ZeRO-{lay['zero']}" if lay["zero"] else ""
    lines = [f"layout: {pp}tp {lay['tp']} x cp_ulysses {lay['cp_ulysses']} x cp_ring {lay['cp_ring']} x dp {lay['dp']}"
             f"{ep}{zero} = {lay['world']} ranks; "
             f"{obj['tokens_per_rank']:,} tokens per rank per micro-batch", "",
             "| memory per rank | MiB | what |", "|---|---|---|",
             f"| baseline | {_mib(obj['memory_mib']['baseline'])} | the process before its tensors ({obj['source']}) |"]
    for group, items in mem.groups.items():
        for i in items:
            lines.append(f"| {group}: {i.name} | {_mib(i.bytes / MIB)} | {i.note} |")
    m = obj["memory_mib"]
    fits = "" if obj["fits"] is None else (" (fits)" if obj["fits"] else f" (does NOT fit {obj['limit_mib']:,.0f})")
    lines += [f"| **peak** | **{_mib(obj['peak_mib'])}**{fits} | max(backward {_mib(m['backward_peak'])}, "
              f"optimizer step {_mib(m['step_peak'])}) |", ""]
    if obj["device"] == "cuda":
        lines += [f"host memory per rank, apart from the GPU's: {_mib(obj['host_mib'])} MiB (checkpoint staging)", ""]
    if obj.get("placement_problem"):
        lines += [f"NOT PLACEABLE: {obj['placement_problem']}", ""]
    lines += [
              f"activations: {obj['activation_bytes_per_token_per_layer']:,.0f} B per local token per layer", "",
              "| sent per step per rank | MiB |", "|---|---|"]
    lines += [f"| {k} | {v / MIB:,.2f} |" for k, v in obj["bytes_per_step"].items()]
    f = obj["flops"]
    lines += ["", f"FLOPs per step: model {f['model_per_step']:.3g}, with recomputation {f['hardware_per_step']:.3g} "
                  f"({f['per_rank']:.3g} per rank; attention over {f['attention_over']})",
              f"step time >= {obj['step_seconds_min']:.2f} s at {obj['rate_flops_per_rank'] / 1e9:,.0f} GFLOP/s per rank: "
              f"compute {obj['step_seconds']['compute']:.2f} s, communication not hidden "
              f"{obj['step_seconds']['communication_not_hidden']:.2f} s, pipeline bubble "
              f"{obj['step_seconds']['pipeline_bubble']:.2f} s; {obj['tokens_per_s_per_rank']:,.0f} tokens/s per rank, "
              f"MFU {obj['mfu']:.1%} of {obj['peak_flops_per_rank'] / 1e12:,.3g} TFLOP/s"]
    bal = obj.get("ring_balance")
    if bal:
        used = bal[bal["cp_layout"]]
        lines += ["", f"ring balance over {bal['samples']} sampled sequences of the data (attention work per ring rank, "
                      f"query-key pairs): parallel.cp_layout = \"{bal['cp_layout']}\" gives max / mean "
                      f"{used['work_max_over_mean']:.3f} (worst {used['work_max_over_mean_worst']:.2f}); zigzag "
                      f"{bal['zigzag']['work_max_over_mean']:.3f}, documents {bal['documents']['work_max_over_mean']:.3f}"]
    return "\n".join(lines)


def layout_table(fits, rejected, limit: float | None, source: str) -> str:
    lines = [f"layouts that fit{'' if limit is None else f' in {limit / MIB:,.0f} MiB per rank'}, best first "
             f"({source}):", "", "| layout | peak MiB | host MiB | step s >= | compute s | comm not hidden s | bubble s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {c.name()} | {_mib(c.peak_bytes / MIB)} | {_mib(c.memory.host / MIB)} | {c.seconds:.2f} | "
              f"{c.compute_seconds - c.bubble_seconds:.2f} | {c.comm_seconds:.2f} | {c.bubble_seconds:.2f} |"
              for c in fits]
    if rejected:
        lines += ["", "not possible:"] + [f"- {f'pp{d.pp} x ' if d.pp > 1 else ''}tp{d.tp} x ulysses{d.cp_ulysses} x "
                                          f"ring{d.cp_ring} x dp{d.dp}{f' (ep{d.ep})' if d.ep > 1 else ''}: {why}"
                                          for d, why in rejected]
    return "\n".join(lines)


def header_lines(obj: dict, command: str) -> list[str]:
    """The comment lines a shipped config carries about its plan (`longtrain plan ... --header`);
    tests/test_configs.py fails when a config's lines differ from what the plan gives now."""
    unit = "GPU" if obj["device"] == "cuda" else "rank"
    fits = "" if obj["fits"] is None else (f" of {obj['limit_mib']:,.0f} (fits)" if obj["fits"]
                                           else f" of {obj['limit_mib']:,.0f} (does NOT fit)")
    st = obj["step_seconds"]
    lines = [f"# Plan: `{command}` (regenerate with --header)",
             f"#   peak {obj['peak_mib']:,.0f} MiB per {unit}{fits}"
             + (f"; host memory apart {obj['host_mib']:,.0f} MiB per rank" if obj["device"] == "cuda" else ""),
             f"#   step >= {obj['step_seconds_min']:.2f} s: compute {st['compute']:.2f}, communication not hidden "
             f"{st['communication_not_hidden']:.2f}, pipeline bubble {st['pipeline_bubble']:.2f}",
             f"#   {obj['tokens_per_s_per_rank']:,.0f} tokens/s per {unit}, MFU {obj['mfu']:.1%} of "
             f"{obj['peak_flops_per_rank'] / 1e12:,.3g} TFLOP/s"]
    if obj.get("placement_problem"):
        lines.append(f"#   NOT PLACEABLE: {obj['placement_problem']}")
    return lines
