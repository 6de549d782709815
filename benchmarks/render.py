"""Render, and render + gradient, for 5,000 particles of radius 3.5 px in a 64x128x128 stack.

    python benchmarks/render.py

Prints the median wall time of each over repeated calls (after compilation).
"""

import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from difftrack.render import Background, Geometry, Params, Particles, render
from difftrack.shape import PSF


def timeit(f, repeat=10):
    jax.block_until_ready(f())
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        jax.block_until_ready(f())
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main():
    shape, n_target, R = (64, 128, 128), 5000, 3.5
    # 5,000 spheres of radius 3.5 px fill 86% of a 64x128x128 stack, more than hard
    # spheres can (0.64): the centres are uniform at random, overlaps allowed (the
    # renderer's cost does not depend on them)
    phi = n_target * 4 / 3 * np.pi * R**3 / np.prod(shape)
    rng = np.random.default_rng(0)
    pos = rng.uniform(-0.5, np.asarray(shape) - 0.5, (n_target, 3))
    radii = R * (1 + 0.05 * rng.standard_normal(n_target)).clip(0.85, 1.15)
    n = len(pos)
    geom = Geometry.make(shape, None, max_radius=float(radii.max()), psf_extent=(8.0, 4.0))
    params = Params(Particles(jnp.asarray(pos, jnp.float32), jnp.asarray(radii, jnp.float32),
                              jnp.ones(n, jnp.float32)),
                    PSF.init(1.0, 2.5, 3), Background.constant(0.1, geom))
    data = render(params, geom) + 0.01

    @jax.jit
    def loss_and_grad(p):
        return jax.value_and_grad(lambda q: jnp.sum((render(q, geom) - data) ** 2))(p)

    t_render = timeit(lambda: render(params, geom))
    t_grad = timeit(lambda: loss_and_grad(params))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} on {jax.default_backend()}")
    print(f"{n} particles (sphere volume {phi:.2f} of the stack), radius {R} px, stack {shape}, patch {geom.patch_half}, "
          f"canvas {geom.canvas}")
    print(f"render:            {t_render * 1e3:.1f} ms")
    print(f"render + gradient: {t_grad * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
