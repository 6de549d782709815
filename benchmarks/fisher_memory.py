"""Peak memory and time of the coupled uncertainties (``fisher.coupled_covariance``).

    python benchmarks/fisher_memory.py [N_SIDE ...]

Particles on a jittered cubic lattice (spacing 2.1 R, R = 4 px, z voxels twice as deep),
N_SIDE^2 x N_SIDE/2 of them, the default simulator PSF; weights 1. Peak = the largest
heap held by Python and numpy during the call (tracemalloc), above what was held before.
"""

import sys
import time
import tracemalloc

import jax.numpy as jnp
import numpy as np

from difftrack.fisher import coupled_covariance
from difftrack.model import make_geometry
from difftrack.render import Background, Params, Particles
from difftrack.simulate import default_psf


def main(sides):
    vs, R = (0.2, 0.1, 0.1), 0.4
    psf = default_psf(vs, R)
    rng = np.random.default_rng(0)
    for side in sides:
        step = 2.1 * R / np.asarray(vs)
        nz = side // 2
        g = np.stack(np.meshgrid(np.arange(nz), np.arange(side), np.arange(side), indexing="ij"), -1)
        pos = (g.reshape(-1, 3) + 0.5) * step + rng.uniform(-0.3, 0.3, (g.size // 3, 3))
        shape = tuple(int(np.ceil(v)) for v in np.asarray([nz, side, side]) * step)
        geom = make_geometry(shape, vs, R, psf)
        n = len(pos)
        params = Params(Particles(jnp.asarray(pos, jnp.float32), jnp.full((n,), R, jnp.float32),
                                  jnp.ones((n,), jnp.float32)), psf, Background.constant(0.0, geom))
        w = np.ones(shape, np.float32)
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        coupled_covariance(params, np.arange(n), w, geom)
        dt = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        print(f"{n} particles, stack {shape}: {dt:.1f} s, peak {peak / 2**20:.0f} MiB "
              f"({peak / n / 1024:.1f} KiB per particle)", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [20, 40])
