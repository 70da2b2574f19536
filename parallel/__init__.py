"""How ranks cooperate: the mesh, collectives and parallel layers. Imports nothing from
models, data or launch."""

from .comm import CommStats
from .mesh import AXES, LayoutError, ParallelDims, ParallelMesh, build_mesh

__all__ = ["AXES", "CommStats", "LayoutError", "ParallelDims", "ParallelMesh", "build_mesh"]
