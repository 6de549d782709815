"""Locate the particles of the real confocal stacks in ../shared/data/real and draw them.

    python examples/real_stacks.py                      # every stack: preprocess, track, refine
    python examples/real_stacks.py --no-refine          # detection only (seconds per stack)
    python examples/real_stacks.py emily.tiff katherine.tiff --out /tmp/figs
    python examples/real_stacks.py --detector classical    # auto: the U-Net if shipped

For each stack: the radius (in voxels, from the README's particle sizes; the voxel sizes
were not recorded), the particles found, the time taken, a rough volume fraction, and a
picture docs/img/real_<name>.png with the centres found drawn on an xy slice and an xz
slice (refined centres when refined). Needs matplotlib (pip install ".[plot]").
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

import difftrack as dt

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "real"
OUT = REPO / "docs" / "img"

# from ../shared/data/real/README.md: radius in lateral voxels; voxel_size only where the
# README gives the voxel's aspect (lengths are then in lateral pixels)
SETTINGS = {
    # diameter (z, y, x) = (15, 11, 11) px: the z extent is the blur (2.5x), not the voxel
    "levke_v1.tiff": dict(radius=5.5),
    # diameter about (15, 9, 9) px
    "emily.tiff": dict(radius=4.5),
    # polydisperse droplets 10-20 px across: a radius near the small ones keeps neighbours
    # apart
    "abraham.tiff": dict(radius=6.0),
    # 5 to 7 px particles
    "katherine.tiff": dict(radius=3.0),
    # dark spheres, radius about 5 px; z pixel about 0.89 of the xy pixel
    "small_confocal_image.tif": dict(radius=5.0, voxel_size=(0.89, 1.0, 1.0)),
}


def overlay(data, df, path, title):
    """Centres on the middle xy slice and the middle xz slice: each particle that the slice
    cuts is drawn as its cross-section there (a circle of sqrt(R^2 - d^2), d its distance
    from the slice; the fitted radius when refined), with a dot at its centre when the
    centre lies within half a voxel of the slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import EllipseCollection

    img = np.asarray(data.image, np.float32)
    nz, ny, nx = img.shape
    vs = np.asarray(data.voxel_size or (1.0, 1.0, 1.0))
    z0, y0 = nz // 2, ny // 2
    R = df["radius"].to_numpy() if "radius" in df.columns else np.full(len(df), data.radius)
    fig, ax = plt.subplots(1, 2, figsize=(11, 5.6))
    lo, hi = np.percentile(img, [0.5, 99.5])
    views = ((ax[0], img[z0], z0, 0, 2, 1, "y"), (ax[1], img[:, y0, :], y0, 1, 2, 0, "z"))
    for a, sl, cut, dk, hk, vk, vname in views:
        a.imshow(sl, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest",
                 aspect=vs[vk] / vs[hk])
        if len(df):
            pos = df[["z", "y", "x"]].to_numpy()
            d = (pos[:, dk] - cut) * vs[dk]  # physical distance from the slice
            cutby = np.abs(d) < R
            rho = np.sqrt(np.maximum(R[cutby] ** 2 - d[cutby] ** 2, 0))
            ec = EllipseCollection(2 * rho / vs[hk], 2 * rho / vs[vk], np.zeros(cutby.sum()),
                                   units="xy", offsets=np.c_[pos[cutby, hk], pos[cutby, vk]],
                                   offset_transform=a.transData, facecolors="none",
                                   edgecolors="#ff3030", linewidths=0.8)
            a.add_collection(ec)
            at = np.abs(pos[:, dk] - cut) <= 0.5
            a.plot(pos[at, hk], pos[at, vk], ".", color="#30ff30", ms=3)
        a.set_xlim(-0.5, sl.shape[1] - 0.5)
        a.set_ylim(sl.shape[0] - 0.5, -0.5)
        a.set_xlabel("x (voxels)")
        a.set_ylabel(f"{vname} (voxels)")
        a.set_title(f"xy slice z = {z0}" if dk == 0 else f"xz slice y = {y0}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_one(path, *, refine=True, out=OUT, options=None, detector="auto"):
    name = path.name
    kw = SETTINGS.get(name, {})
    t0 = time.perf_counter()
    data = dt.preprocess(path, **kw)
    t1 = time.perf_counter()
    found = dt.track(data, detector=detector)
    t2 = time.perf_counter()
    res = dt.refine(found, progress=sys.stderr.isatty(), **(options or {})) if refine \
        else found
    t3 = time.perf_counter()
    df = res.particles
    rv = np.asarray(data.radius_vox)
    vol = float(np.prod(data.image.shape))
    # a rough volume fraction: the radius given (or the median fitted one), in voxels
    r_fit = float(np.median(df["radius"])) if refine and len(df) else data.radius
    scale = r_fit / data.radius
    phi = len(df) * 4.0 / 3.0 * math.pi * float(np.prod(rv * scale)) / vol
    line = (f"{name}: shape {data.shape}, radius {data.radius:g} "
            f"({'voxels' if data.voxel_size is None else 'lateral pixels'}), "
            f"{'dark' if data.invert else 'bright'} (auto: "
            f"{dt.preprocess(data.image, radius=data.radius).invert == data.invert}); "
            f"detected {len(found.particles)} in {t2 - t1:.1f} s ({found.detector})")
    if refine:
        q = float(np.median(df["quality"])) if len(df) else float("nan")
        sig = [float(np.median(df[f"sigma_{c}"])) if len(df) else float("nan") for c in "zyx"]
        line += (f"; refined {len(df)} in {t3 - t2:.0f} s (added {res.stats.get('added', 0)}, "
                 f"removed {res.stats.get('removed', 0)}), median radius {r_fit:.2f}, "
                 f"median sigma (z, y, x) {sig[0]:.3f} {sig[1]:.3f} {sig[2]:.3f} voxels, "
                 f"median quality {q:.2f}")
    line += f"; volume fraction ~{phi:.2f}; preprocess {t1 - t0:.1f} s"
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"real_{path.stem}.png"
    title = (f"{name}: {len(df)} particles ({'refined' if refine else 'detected'}, "
             f"{found.detector} detector), radius {r_fit:.3g}"
             f"{' (median fitted)' if refine else ''}")
    overlay(data, df, png, title)
    print(line, flush=True)
    print(f"  wrote {png}", flush=True)
    return dict(name=name, n=len(df), detected=len(found.particles), seconds=t3 - t0, phi=phi)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", help="stack names in ../shared/data/real or paths "
                   "(default: every stack there)")
    p.add_argument("--no-refine", action="store_true", help="detection only")
    p.add_argument("--out", default=str(OUT), help="folder for the pictures")
    p.add_argument("--max-rounds", type=int, default=None)
    p.add_argument("--detector", default="auto", choices=("auto", "classical", "unet"))
    args = p.parse_args(argv)
    if args.files:
        paths = [Path(f) if Path(f).exists() else DATA / f for f in args.files]
    else:
        if not DATA.is_dir():
            print(f"no real stacks: {DATA} is absent", file=sys.stderr)
            return 1
        paths = sorted(q for q in DATA.iterdir() if q.suffix in (".tif", ".tiff"))
    options = {} if args.max_rounds is None else {"max_rounds": args.max_rounds}
    for q in paths:
        run_one(q, refine=not args.no_refine, out=Path(args.out), options=options,
                detector=args.detector)
    return 0


if __name__ == "__main__":
    sys.exit(main())
