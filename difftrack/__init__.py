"""difftrack: find every particle in 3D confocal stacks of dense colloids, as precisely as
the light allows, with a JAX differentiable-rendering fitter.

Conventions: axis order (z, y, x); positions in voxels with voxel centres at integer
indices; physical sizes in the unit of ``voxel_size`` (um unless the file says otherwise).
"""

from .detect import find_peaks
from .io import Stack, read_series, read_stack, read_table, write_stack, write_table
from .metrics import Score, match, score
from .model import Model, fit_shape
from .packing import pack_spheres
from .simulate import SimulatedStack, simulate

__all__ = [
    "Model", "Score", "SimulatedStack", "Stack",
    "find_peaks", "fit_shape", "match", "pack_spheres", "read_series", "read_stack",
    "read_table", "score", "simulate", "write_stack", "write_table",
]
__version__ = "0.1.0"
