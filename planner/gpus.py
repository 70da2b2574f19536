"""What the plan assumes of a GPU: its memory, its datasheet rate, and what the process needs
beside the tensors the plan counts. None of these figures has been measured on a GPU by this
project yet; each says where it comes from, and `--device-memory` / `--rate-gflops` override.

- memory: what the driver reports for the card (nvidia-smi's total, MiB);
- the usable share: the memory less `HEADROOM` of it, left to the caching allocator's
  fragmentation and to what the plan does not count (PyTorch's own guidance: plans that fill a
  card to the last gigabyte fail on fragmentation);
- per process: the CUDA context with cuBLAS / cuDNN workspaces (`CUDA_CONTEXT`), and NCCL's
  buffers for each process group the rank communicates in (`NCCL_PER_GROUP`: NCCL_BUFFSIZE of
  4 MiB for each of up to 16 channels, sent and received, rounded);
- host memory apart: what lives in the node's RAM, not on the card (a background checkpoint's
  staging copy), is reported separately and not held against the card;
- speed: the step is planned at `efficiency` of the datasheet rate, collectives at the link they
  cross (tensor and Ulysses groups inside a node; the ring, the pipeline and the gradient
  reductions across nodes once the layout spans more than one).
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 2**20
HEADROOM = 0.10  # of the card's memory, never planned
CUDA_CONTEXT = 1024 * MIB  # CUDA context, cuBLAS / cuDNN workspaces, the kernels' images
NCCL_PER_GROUP = 128 * MIB  # NCCL buffers per communicator this rank uses


@dataclass(frozen=True)
class Gpu:
    name: str
    memory: float  # bytes the driver reports
    bf16: float  # dense bf16 tensor-core FLOP/s (datasheet)
    # the fraction of `bf16` a training step's kernels are assumed to sustain (the step time and
    # tokens/s are planned at bf16 x efficiency; MFU is then efficiency less exposed communication
    # and the pipeline bubble). Assumed, not yet held against published runs (issue 28, item 3).
    efficiency: float
    intra_node: float  # bytes/s a GPU sends to the others of its node (NVLink / PCIe), one direction
    inter_node: float = 50e9  # bytes/s a GPU sends to other nodes: one 400 Gb/s NIC per GPU

    @property
    def usable(self) -> float:
        return self.memory * (1 - HEADROOM)


GPUS = {
    "h100": Gpu("H100 SXM 80 GB", 81559 * MIB, 989e12, 0.40, 450e9),
    "h200": Gpu("H200 SXM 141 GB", 143771 * MIB, 989e12, 0.42, 450e9),
    "a100": Gpu("A100 SXM 80 GB", 81920 * MIB, 312e12, 0.50, 300e9, 25e9),
    "l40s": Gpu("L40S 48 GB", 46068 * MIB, 362e12, 0.35, 32e9, 25e9),
}


def communicators(parallel) -> list[str]:
    """The process groups of more than one rank a rank of this layout communicates in."""
    p = parallel
    groups = {"tp": p.tp, "cp_ulysses": p.cp_ulysses, "cp_ring": p.cp_ring, "pp": p.pp, "ep": p.ep,
              "dp_cp (gradients)": p.dp * p.cp_ring * p.cp_ulysses}
    return [name for name, size in groups.items() if size > 1]


def placement_problem(parallel, gpus_per_node: int | None) -> str | None:
    """Why the launchers cannot place this layout on nodes of `gpus_per_node` GPUs (tp and
    Ulysses groups stay inside a node: their all-to-alls and all-reduces block every layer),
    or None."""
    if not gpus_per_node:
        return None
    inner = parallel.tp * parallel.cp_ulysses
    if gpus_per_node % inner:
        return (f"tp x cp_ulysses = {inner} does not fit inside a node of {gpus_per_node} GPUs (it must divide "
                f"{gpus_per_node}: tensor and Ulysses groups are placed inside a node)")
    return None
