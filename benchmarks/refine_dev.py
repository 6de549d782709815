"""refine_positions on the dev stacks from degraded truth (issue 4's protocol).

    python benchmarks/refine_dev.py [NAME ...] [--options JSON] [--seed N] [--save DIR]
        [--constants JSON] [--from-truth]

``--options '{"polydispersity": null}'``: keyword arguments for ``refine_positions``.
``--seed N``: the degraded start's seed (default 0, the one every table used); the runs are
chaotic in their start and rounding, so several seeds tell a change from the spread.
``--save DIR``: also write each run's table to DIR/NAME_seedN.csv (for analyses after).
``--constants '{"DEPTH_PRIOR": 0}'``: set module constants of ``difftrack.refine`` first
(experiments on a constant without editing the code).
``--from-truth``: start from every true centre instead (no jitter, none deleted, none
spurious; the seed is ignored): what is left then is the model's error, not the search's.

Start: the true centres jittered by U(-0.5, 0.5) voxel per axis, 10% deleted, 2% spurious
added uniformly in the stack (seeded). Scored on the interior (one radius from each face):
recall, precision, RMSE per axis over the Cramer-Rao bound (crlb.json), and calibration
std((found - true) / sigma) per axis; and where the error sits (``_diagnostics``).
"""

import argparse
import importlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from difftrack import match, read_stack, score
from difftrack.refine import refine_positions

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "dev"
NAMES = ["dev_peri_r4_phi48_bright", "dev_peri_r3_phi50_dark", "dev_small_dense", "dev_large"]


def degraded_start(truth, shape, rng):
    t = truth[["z", "y", "x"]].to_numpy()
    start = t + rng.uniform(-0.5, 0.5, t.shape)
    start = start[rng.random(len(t)) > 0.10]
    spurious = rng.uniform(0, 1, (int(round(0.02 * len(t))), 3)) * (np.asarray(shape) - 1)
    return np.clip(np.vstack([start, spurious]), -0.5, np.asarray(shape) - 0.5)


def tail_restarts(stats):
    """``stats["tail_restarts"]`` to 7 digits (empty with ``TAIL_RESTART`` off): the first
    round's shape fit's loss from the PSF as it was, from fresh tails, and what the first
    still gained over its last 50 steps."""
    return [tuple(float(f"{v:.7g}") for v in t) for t in stats.get("tail_restarts", [])]


def _diagnostics(f, t, crlb, shape, rad_vox):
    """Where the error sits (matched interior pairs ``f``, ``t``):

    - ``rmse_over_crlb_deep``: particles at least 3 radii from every z face (and one from
      the others): the faces' share of the error;
    - ``z_trend``: the slope of the z error against depth (voxel per voxel), a robust line
      fit; a depth-dependent focal shift of the light shows as a slope no tracker can see
      (the light of a particle at depth z sits at z (1 + slope) + const);
    - ``rmse_over_crlb_z_detrended``: z RMSE / CRLB after removing that line (a diagnostic,
      fitted to the truth: not a result);
    - ``worst_2pct_share``: per axis, the share of the squared error carried by the worst 2%
      of the particles (at least one), and ``rmse_over_crlb_without_worst_2pct``: the RMSE
      without them (diagnostics: on the partial-volume stacks half of z's squared error
      sits in 2% of the particles, most of them within 1.5 radii of a z face);
    - ``z_face``: z RMSE / CRLB and count of the particles within 1.5 radii of a z face, and
      the fraction of their z errors that point towards that face.
    """
    shape = np.asarray(shape)
    deep = (t[:, 0] >= 3 * rad_vox[0] - 0.5) & (t[:, 0] <= shape[0] - 0.5 - 3 * rad_vox[0])
    e = f - t
    zc = (shape[0] - 1) / 2
    A = np.c_[np.ones(len(t)), t[:, 0] - zc]
    w = np.ones(len(t))
    for _ in range(20):  # iteratively reweighted least squares: a robust line
        coef = np.linalg.lstsq(A * w[:, None], e[:, 0] * w, rcond=None)[0]
        w = 1.0 / np.sqrt(np.maximum(np.abs(e[:, 0] - A @ coef), 1e-3))
    ez = e[:, 0] - A @ coef
    e2 = np.sort(e**2, axis=0)[::-1]
    k = max(1, int(round(0.02 * len(t))))
    zf = np.minimum(t[:, 0], shape[0] - 1 - t[:, 0])
    near = zf < 1.5 * rad_vox[0]
    towards = np.sign(e[:, 0]) == np.where(t[:, 0] < zc, -1.0, 1.0)
    z_face = (round(float(np.sqrt((e[near, 0] ** 2).mean()) / crlb[0]), 2), int(near.sum()),
              round(float(towards[near].mean()), 2)) if near.any() else None
    return dict(worst_2pct_share=np.round(e2[:k].sum(axis=0) / e2.sum(axis=0), 2).tolist(),
                rmse_over_crlb_without_worst_2pct=np.round(np.sqrt(e2[k:].mean(axis=0)) / crlb, 2).tolist(),
                z_face=z_face,
                rmse_over_crlb_deep=np.round(np.sqrt((e[deep] ** 2).mean(axis=0)) / crlb, 2).tolist(),
                n_deep=int(deep.sum()), z_trend=round(float(coef[1]), 4),
                rmse_over_crlb_z_detrended=round(float(np.sqrt((ez**2).mean()) / crlb[0]), 2))


def main(names, options=None, seed=0, save=None, from_truth=False):
    crlb = json.loads((DEV / "crlb.json").read_text())
    rows = []
    for name in names:
        st = read_stack(DEV / f"{name}.tif")
        meta = json.loads((DEV / f"{name}.json").read_text())
        truth = pd.read_csv(DEV / f"{name}.csv")
        vs, rad = (st.voxel_size, meta["radius_um"]) if "px_um" in meta else (None, meta["radius"])
        vse = np.asarray(vs or (1.0, 1.0, 1.0))
        start = np.clip(truth[["z", "y", "x"]].to_numpy(), -0.5, np.asarray(st.image.shape) - 0.5) \
            if from_truth else degraded_start(truth, st.image.shape, np.random.default_rng(seed))
        t0 = time.perf_counter()
        res = refine_positions(st.image, start, voxel_size=vs, radius=rad, **(options or {}))
        dt = time.perf_counter() - t0
        f = res.particles[["z", "y", "x"]].to_numpy()
        t = truth[["z", "y", "x"]].to_numpy()
        s = score(f, t, radius=rad, voxel_size=tuple(vse), shape=st.image.shape)
        i, j = match(f, t, cutoff=rad, voxel_size=tuple(vse))
        inner = np.all((t[j] >= rad / vse - 0.5) & (t[j] <= np.asarray(st.image.shape) - 0.5 - rad / vse), axis=1)
        sig = res.particles[["sigma_z", "sigma_y", "sigma_x"]].to_numpy()[i][inner]
        cal = ((f[i] - t[j])[inner] / sig).std(axis=0)
        c = np.asarray(crlb[name]["crlb_rms_zyx"])
        med = np.median(np.abs(f[i] - t[j])[inner], axis=0)
        row = dict(stack=name, seed=seed, recall=s.recall, precision=s.precision,
                   rmse_over_crlb=np.round(s.rmse / c, 2).tolist(),
                   median_abs_err_vox=np.round(med, 3).tolist(),
                   mean_error_vox=np.round((f[i] - t[j])[inner].mean(axis=0), 3).tolist(), calibration=np.round(cal, 2).tolist(),
                   median_sigma_over_crlb=np.round(np.median(sig, axis=0) / c, 2).tolist(),
                   **_diagnostics(f[i][inner], t[j][inner], c, st.image.shape, rad / vse),
                   added=res.stats["added"], removed=res.stats["removed"],
                   splits=(res.stats.get("splits_tried"), res.stats.get("splits_kept")),
                   split_log=res.stats.get("split_log", []),
                   seconds=round(dt, 1),
                   seconds_by_phase=res.stats["seconds_by_phase"],
                   joint_fits=res.stats.get("joint_fits"), joint_steps=res.stats["steps"],
                   fits=res.stats.get("fits"),
                   tail_restarts=tail_restarts(res.stats),
                   particles_per_second=round(len(f) / dt, 1))
        rows.append(row)
        if save is not None:
            Path(save).mkdir(parents=True, exist_ok=True)
            res.particles.to_csv(Path(save) / f"{name}_seed{seed}.csv", index=False)
        print(row, flush=True)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=NAMES, help="dev stacks (default: all four)")
    ap.add_argument("--options", type=json.loads, default=None,
                    help="JSON object of keyword arguments for refine_positions")
    ap.add_argument("--seed", type=int, default=0, help="the degraded start's seed (default 0)")
    ap.add_argument("--save", default=None, help="write each run's table to DIR/NAME_seedN.csv")
    ap.add_argument("--constants", type=json.loads, default=None,
                    help="JSON object of difftrack.refine module constants to set first")
    ap.add_argument("--from-truth", action="store_true",
                    help="start from every true centre (no jitter, none deleted or spurious)")
    args = ap.parse_args()
    refine_module = importlib.import_module("difftrack.refine")
    for key, value in (args.constants or {}).items():
        if not hasattr(refine_module, key):
            raise SystemExit(f"difftrack.refine has no constant {key!r}")
        setattr(refine_module, key, value)
    main(args.names or NAMES, args.options, args.seed, args.save, args.from_truth)
