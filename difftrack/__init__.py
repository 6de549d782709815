"""difftrack: find every particle in 3D confocal stacks of dense colloids, as precisely as
the light allows, with a JAX differentiable-rendering fitter.

Conventions: axis order (z, y, x); positions in voxels with voxel centres at integer
indices; physical sizes in the unit of ``voxel_size`` (um unless the file says otherwise).
"""

# the submodule difftrack.refine first: importing it later would replace the function
# ``difftrack.refine`` (the API call) by the module of the same name
from . import refine as _refine_module  # noqa: F401  (isort: skip)
from .api import Preprocessed, Refined, SeriesResult, Tracked, locate, preprocess, refine, track
from .detect import find_peaks
from .io import Stack, read_series, read_stack, read_table, write_stack, write_table
from .metrics import Score, match, score
from .model import Model, fit_shape
from .packing import pack_spheres
from .simulate import SimulatedStack, simulate

__all__ = [
    "Model", "Preprocessed", "Refined", "Score", "SeriesResult", "SimulatedStack", "Stack",
    "Tracked", "locate", "preprocess", "refine", "track",
    "find_peaks", "fit_shape", "match", "pack_spheres", "read_series", "read_stack",
    "read_table", "score", "simulate", "write_stack", "write_table",
]
__version__ = "0.1.0"
