"""refine_positions on difftrack's own simulator: the table of issue 4.

    python benchmarks/refine_sim.py [--quick] [--corner K ...] [--skip N] [--seed N] [--options JSON]

Grid: volume fraction 0.3 / 0.5 / 0.58, radius 2.5 / 4 / 7 px (lateral), z elongation of
the PSF 1 / 2 / 3, isotropic voxels. Start: the truth jittered by
U(-0.5, 0.5) voxel, 10% deleted, 2% spurious (as benchmarks/refine_dev.py). The Cramer-Rao
bound is computed here from the true model: ``rmse_over_crlb`` with each particle's own
block (neighbours ignored, as crlb.json does for the non-PERI dev stacks: optimistic in
dense packings), ``rmse_over_coupled_crlb`` with its coupled neighbours free too
(``fisher.coupled_covariance``). ``--quick`` runs the three corners only. ``--seed N``
seeds both the simulated stack and the degraded start (default 0, every table's seed).
"""

import argparse
import itertools
import json
import time

import jax
import numpy as np

from difftrack import match, score, simulate
from difftrack.fisher import coupled_covariance, fisher_tables, interp_tables
from difftrack.refine import refine_positions

from refine_dev import degraded_start, tail_restarts  # noqa: E402  (same start protocol)


def crlb(sim):
    p, g = sim.params, sim.geometry
    R = np.asarray(p.particles.radius)
    a = np.asarray(p.particles.amplitude)
    grid = np.unique(np.quantile(R, [0.0, 0.5, 1.0]))
    G = interp_tables(R, grid, fisher_tables(grid, p.psf, g))
    pos = np.asarray(p.particles.pos)
    idx = np.clip(np.rint(pos).astype(int), 0, np.asarray(sim.image.shape) - 1)
    w = 1.0 / sim.noise_variance[idx[:, 0], idx[:, 1], idx[:, 2]]
    D = np.stack([a, a, a, np.ones_like(a), a], axis=1)
    F = G * (D[:, :, None] * D[:, None, :]) * w[:, None, None]
    cov = np.linalg.inv(F + np.eye(5) * 1e-9)
    return np.sqrt(np.median(np.diagonal(cov, axis1=1, axis2=2)[:, :3], axis=0))


def crlb_coupled(sim):
    """The same with each particle's coupled neighbours free too (fisher.coupled_covariance,
    within ~10% of the whole-stack Fisher matrix: tests/test_fisher.py); the weight is the
    true per-voxel 1 / variance."""
    p = sim.params
    n = p.particles.pos.shape[0]
    cov = coupled_covariance(p, np.arange(n), 1.0 / sim.noise_variance, sim.geometry)
    return np.sqrt(np.median(np.diagonal(cov, axis1=1, axis2=2)[:, :3], axis=0))


def run(phi, r_px, elong, shape, seed=0, options=None):
    vs = (0.1, 0.1, 0.1)  # isotropic voxels: the radius is in px on every axis
    radius = r_px * 0.1
    sim = simulate(shape, voxel_size=vs, radius=radius, volume_fraction=phi, elongation=elong,
                   photons=80.0, seed=seed)
    t = sim.truth[["z", "y", "x"]].to_numpy()
    inside = np.all((t >= -0.5) & (t <= np.asarray(shape) - 0.5), axis=1)
    start = degraded_start(sim.truth[inside], shape, np.random.default_rng(seed))
    t0 = time.perf_counter()
    res = refine_positions(sim.image, start, voxel_size=vs, radius=radius, **(options or {}))
    dt = time.perf_counter() - t0
    f = res.particles[["z", "y", "x"]].to_numpy()
    s = score(f, t[inside], radius=radius, voxel_size=vs, shape=shape)
    i, j = match(f, t[inside], cutoff=radius, voxel_size=vs)
    tt = t[inside][j]
    inner = np.all((tt >= radius / np.asarray(vs) - 0.5) & (tt <= np.asarray(shape) - 0.5 - radius / np.asarray(vs)), axis=1)
    sig = res.particles[["sigma_z", "sigma_y", "sigma_x"]].to_numpy()[i][inner]
    cal = ((f[i] - tt)[inner] / sig).std(axis=0)
    c = crlb(sim)
    cc = crlb_coupled(sim)
    return dict(phi=phi, radius_px=r_px, elongation=elong, n=int(inside.sum()),
                recall=round(s.recall, 3), precision=round(s.precision, 3),
                rmse_over_crlb=np.round(s.rmse / c, 2).tolist(),
                rmse_over_coupled_crlb=np.round(s.rmse / cc, 2).tolist(),
                median_sigma_over_coupled_crlb=np.round(np.median(sig, axis=0) / cc, 2).tolist(),
                mean_error_vox=np.round((f[i] - tt)[inner].mean(axis=0), 3).tolist(), calibration=np.round(cal, 2).tolist(),
                seconds=round(dt, 1), particles_per_second=round(len(f) / dt, 1),
                splits=(res.stats.get("splits_tried"), res.stats.get("splits_kept")),
                split_log=res.stats.get("split_log", []),
                tail_restarts=tail_restarts(res.stats))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--corner", type=int, nargs="+", default=None,
                    help="only these corners of the --quick list (0, 1, 2)")
    ap.add_argument("--skip", type=int, default=0,
                    help="leave out the first N stacks of the grid (to finish a table that was cut off)")
    ap.add_argument("--options", type=json.loads, default=None,
                    help="JSON object of keyword arguments for refine_positions")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the simulated stack and of the degraded start")
    args = ap.parse_args()
    grid = list(itertools.product([0.3, 0.5, 0.58], [2.5, 4.0, 7.0], [1.0, 2.0, 3.0]))
    if args.quick:
        grid = [(0.3, 2.5, 1.0), (0.5, 4.0, 2.0), (0.58, 7.0, 3.0)]
        if args.corner is not None:
            grid = [grid[k] for k in args.corner]
    grid = grid[args.skip:]
    for phi, r, e in grid:
        # about 100-300 particles per stack: lateral size 7 diameters, depth 3
        n_xy = int(round(14 * r))
        shape = (max(16, int(round(6 * r))), n_xy, n_xy)
        print(run(phi, r, e, shape, seed=args.seed, options=args.options), flush=True)
        # every stack has its own layout, so its own compiled fits; in one long process
        # they pile up until LLVM cannot map more code ("LLVM compilation error: Cannot
        # allocate memory": the full table died so on its 19th stack, 2026-11-28)
        jax.clear_caches()


if __name__ == "__main__":
    main()
