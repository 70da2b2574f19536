"""How ranks cooperate: the layout (mesh.py), collectives, the description of where each
parameter lives (sharding.py), sequence-parallel attention, tensor- and expert-parallel layers,
gradient sync, ZeRO, FSDP and pipeline stages. Imports only files/."""

from .comm import CommStats
from .mesh import AXES, LayoutError, ParallelDims, ParallelMesh, build_mesh

__all__ = ["AXES", "CommStats", "LayoutError", "ParallelDims", "ParallelMesh", "build_mesh"]
