"""Packing and simulation speed.

    python benchmarks/simulate.py
"""

import time

import numpy as np

from difftrack.packing import pack_spheres
from difftrack.simulate import simulate


def best(f, repeat=3):
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = f()
        ts.append(time.perf_counter() - t)
    return min(ts), out


def main():
    for n_target, phi in [(1_000, 0.58), (10_000, 0.55), (10_000, 0.58)]:
        R = 1.0
        L = (n_target * 4 / 3 * np.pi * R**3 / phi) ** (1 / 3)
        box = (0.8 * L, 1.1 * L, 1.0 / (0.8 * 1.1) * L)
        t, (c, r) = best(lambda: pack_spheres(box, phi, R, polydispersity=0.05, seed=1))
        print(f"pack_spheres: {len(c)} spheres, phi {phi}, 5% polydispersity: {t:.2f} s")
    simulate((8, 16, 16), seed=0)  # compile once
    t, s = best(lambda: simulate((64, 128, 128), voxel_size=(0.2, 0.1, 0.1), radius=0.4,
                                 volume_fraction=0.55, seed=2))
    print(f"simulate (64,128,128), radius 0.4 um, phi 0.55: {len(s.truth)} particles rendered "
          f"(stack + margin) in {t:.2f} s")


if __name__ == "__main__":
    main()
