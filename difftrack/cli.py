"""Command line: ``difftrack locate``, ``difftrack demo`` and ``difftrack simulate`` (a thin
layer over the API)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _demo(args):
    from .api import preprocess, refine, track
    from .io import check_writable, write_stack, write_table
    from .metrics import score
    from .simulate import simulate

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "particles.csv"
    check_writable(table)
    t0 = time.perf_counter()
    vs = (0.2, 0.1, 0.1)
    radius = 0.4
    sim = simulate(tuple(args.shape), voxel_size=vs, radius=radius, volume_fraction=0.5,
                   elongation=2.5, photons=60.0, bg_photons=8.0, seed=args.seed)
    t1 = time.perf_counter()
    print(f"simulated a {sim.image.shape} stack (voxel size {vs} um, radius {radius} um, "
          f"volume fraction 0.50, PSF 2.5x longer along z, Poisson + read noise): "
          f"{len(sim.truth)} particles in {t1 - t0:.1f} s")
    truth = sim.truth[["z", "y", "x"]].to_numpy()

    def report(what, df, seconds):
        s = score(df[["z", "y", "x"]].to_numpy(), truth, radius=radius, voxel_size=vs,
                  shape=sim.image.shape)
        print(f"{what}: {len(df)} particles in {seconds:.1f} s; against the truth (interior, "
              f"one radius from every face): {s}")

    data = preprocess(sim.image, voxel_size=vs, radius=radius, invert=False)
    t2 = time.perf_counter()
    result = track(data, detector=args.detector)
    report(f"track ({result.detector} detector)", result.particles, time.perf_counter() - t2)
    if result.detector != "classical":
        t3 = time.perf_counter()
        report("track (classical detector, for comparison)",
               track(data, detector="classical").particles, time.perf_counter() - t3)
    if args.refine:
        t4 = time.perf_counter()
        result = refine(result, progress=True)
        report("refine (fit of the whole stack)", result.particles, time.perf_counter() - t4)
    write_table(result.particles, table)
    write_table(sim.truth, out / "truth.csv")
    write_stack(out / "stack.tif", sim.image, voxel_size=vs)
    print(f"wrote {table}  (and stack.tif, truth.csv beside it)")
    return 0


def _simulate(args):
    from .io import check_writable, write_stack, write_table
    from .simulate import simulate

    path = Path(args.output)
    truth_path = path.with_name(path.stem + "_truth.csv")
    check_writable(path, suffixes=(".tif", ".tiff"))
    check_writable(truth_path)
    sim = simulate(tuple(args.shape), voxel_size=tuple(args.voxel_size), radius=args.radius,
                   volume_fraction=args.volume_fraction, polydispersity=args.polydispersity,
                   elongation=args.elongation, photons=args.photons, dark=args.dark,
                   seed=args.seed)
    write_stack(path, sim.image, voxel_size=sim.voxel_size)
    write_table(sim.truth, truth_path)
    print(f"wrote {path} ({sim.image.shape}, {len(sim.truth)} particles) and {truth_path}")
    return 0


def _fmt_sigma(df, vs, unit=None):
    """Median uncertainty per axis, voxels (and the unit of voxel size when known)."""
    import numpy as np

    if not {"sigma_z", "sigma_y", "sigma_x"} <= set(df.columns) or len(df) == 0:
        return None
    med = [float(np.median(df[f"sigma_{c}"])) for c in "zyx"]
    text = "median uncertainty (z, y, x) " + ", ".join(f"{m:.3f}" for m in med) + " voxels"
    if vs is not None:
        text += " = " + ", ".join(f"{m * v:.3g}" for m, v in zip(med, vs)) + f" {unit or 'um'}"
    return text


def _locate(args):
    from tqdm.auto import tqdm

    from . import api
    from .io import check_writable, write_table

    out = check_writable(args.output)  # before the long job: no surprise at the end
    src = Path(args.stack).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"no such file: '{src}'")
    if src.is_dir():
        raise IsADirectoryError(f"expected a TIFF file, got a directory: '{src}'")
    invert = True if args.invert else (False if args.bright else "auto")
    vs = tuple(args.voxel_size) if args.voxel_size is not None else None
    options = {}
    if args.max_rounds is not None:
        options["max_rounds"] = args.max_rounds
    if args.steps is not None:
        options["steps"] = options["shape_steps"] = args.steps
    t0 = time.perf_counter()
    quiet = args.quiet
    stacks, series = api._read_any(src, vs)
    nt = len(stacks)
    first = stacks[0]
    what = f"{nt} frames of {first.image.shape}" if series else f"{first.image.shape}"
    if not quiet:
        print(f"read {src}: {what}, {first.image.dtype}, voxel size "
              f"{first.voxel_size or 'unknown (lengths in voxels)'}", flush=True)
    steps = ("preprocess", "track") if args.no_refine else ("preprocess", "track", "refine")
    bar = tqdm(total=nt * len(steps), desc="locate", unit="step", disable=quiet or None,
               leave=False)

    def stage(t, name, res):
        bar.update(1)
        prefix = f"frame {t + 1}/{nt}: " if series else ""
        if name == "preprocess":
            if t == 0 and not quiet:
                unit = "voxels" if res.voxel_size is None else (res.unit or "um")
                tqdm.write(f"radius {res.radius:.3g} {unit} "
                           f"({'estimated' if res.radius_estimated else 'given'}), "
                           f"{'dark' if res.invert else 'bright'} particles "
                           f"({'estimated' if res.invert_estimated else 'given'}), "
                           f"noise {res.noise:.3g}")
            bar.set_postfix_str(prefix + "detecting")
        elif name == "track" and not args.no_refine:
            bar.set_postfix_str(prefix + f"refining {len(res.particles)} detections")

    try:
        results, psf, hold = api._run(
            stacks, series, voxel_size=vs, radius=args.radius, invert=invert,
            track_kw=dict(detector=args.detector, weights=args.weights), do_refine=not args.no_refine,
            ropts=dict(options, progress=not quiet and sys.stderr.isatty())
            if not args.no_refine else {},
            stage=stage)
    finally:
        bar.close()
    table = api._with_frames(results) if series else results[0].particles
    write_table(table, out)
    dt_s = time.perf_counter() - t0
    per = f" in {nt} frames" if series else ""
    how = "detection only" if args.no_refine else "refined"
    det = (getattr(results[0], "tracked", None) or results[0]).detector
    print(f"found {len(table)} particles{per} in {dt_s:.1f} s (detector: {det}, {how})")
    data0 = results[0].data
    sig = _fmt_sigma(table, data0.voxel_size, data0.unit)
    if sig:
        print(sig)
    if series and not args.no_refine and not hold:
        print("note: the particle shape was learned again on every frame")
    print(f"wrote {out}")
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="difftrack", description=(
        "Locate particles in 3D confocal stacks of dense colloids."))
    sub = p.add_subparsers(dest="command", required=True)

    loc = sub.add_parser(
        "locate", help="locate the particles of a 3D stack or a 4D time series (TIFF)",
        description=(
            "Locate every particle of a 3D confocal stack (z, y, x) or of each frame of a 4D "
            "(t, z, y, x) time series, and write a table: z, y, x (voxels), sigma_z, sigma_y, "
            "sigma_x (uncertainty, voxels), amplitude, radius, quality, and z_um, y_um, x_um "
            "when the voxel size is known; a frame column for a time series. The voxel size "
            "is read from the TIFF's ImageJ or OME metadata unless --voxel-size is given; "
            "the radius and whether the particles are dark are estimated unless given."))
    loc.add_argument("stack", help="input TIFF: a 3D (z, y, x) stack or a 4D (t, z, y, x) "
                     "time series")
    loc.add_argument("-o", "--output", required=True,
                     help="output table: .csv, or .parquet/.pq (needs pyarrow); written "
                     "atomically at the end")
    loc.add_argument("--radius", type=float, default=None,
                     help="particle radius in the unit of the voxel size (voxels if unknown); "
                     "default: estimated from the image")
    loc.add_argument("--voxel-size", type=float, nargs=3, default=None, metavar=("Z", "Y", "X"),
                     help="voxel size (um); default: from the file's metadata")
    pol = loc.add_mutually_exclusive_group()
    pol.add_argument("--invert", action="store_true",
                     help="dark particles on a bright background (default: decided from the "
                     "image)")
    pol.add_argument("--bright", action="store_true",
                     help="bright particles on a dark background (default: decided from the "
                     "image)")
    loc.add_argument("--detector", choices=("auto", "classical", "unet"), default="auto",
                     help="auto: the U-Net when its weights are installed, else classical "
                     "(default auto)")
    loc.add_argument("--weights", default=None, metavar="DETECTOR.npz",
                     help="U-Net weights to use instead of the shipped ones (e.g. from "
                     "'difftrack train --from-shape')")
    loc.add_argument("--no-refine", action="store_true",
                     help="detection only: fast, no uncertainties (z, y, x, score)")
    loc.add_argument("--max-rounds", type=int, default=None,
                     help="refinement rounds of fit / add / remove (default 6; fewer is "
                     "faster)")
    loc.add_argument("--steps", type=int, default=None,
                     help="optimiser steps per fit (default 150; fewer is faster, less "
                     "precise)")
    loc.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    loc.set_defaults(func=_locate)

    d = sub.add_parser("demo", help="simulate a dense stack, locate its particles, score them")
    d.add_argument("--out", default="difftrack_demo", help="folder for the outputs")
    d.add_argument("--shape", type=int, nargs=3, default=(32, 96, 96), metavar=("Z", "Y", "X"))
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--detector", choices=("auto", "classical", "unet"), default="auto",
                   help="detector to show (auto: the U-Net when its weights are installed); "
                   "the classical one is scored beside it")
    d.add_argument("--refine", action="store_true",
                   help="also refine (fit the whole stack; minutes on a laptop)")
    d.set_defaults(func=_demo)

    s = sub.add_parser("simulate", help="write a synthetic stack (TIFF) and its truth (CSV)")
    s.add_argument("output", help="output TIFF path; the truth goes to NAME_truth.csv")
    s.add_argument("--shape", type=int, nargs=3, default=(32, 64, 64), metavar=("Z", "Y", "X"))
    s.add_argument("--voxel-size", type=float, nargs=3, default=(0.2, 0.1, 0.1),
                   metavar=("Z", "Y", "X"))
    s.add_argument("--radius", type=float, default=0.4, help="mean radius (unit of voxel size)")
    s.add_argument("--volume-fraction", type=float, default=0.5)
    s.add_argument("--polydispersity", type=float, default=0.05)
    s.add_argument("--elongation", type=float, default=2.5, help="PSF z/xy elongation")
    s.add_argument("--photons", type=float, default=100.0)
    s.add_argument("--dark", action="store_true", help="dark particles on a bright fluid")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_simulate)

    # listed here; its options live in difftrack.training, which imports flax: ``main``
    # hands ``train`` over to it, so no other command pays for that import
    sub.add_parser("train", add_help=False, help="train the neural detector on simulated "
                   "stacks, or fine-tune it on the particle shape learned from your stack "
                   "(--from-shape); see 'difftrack train --help'")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        from . import training

        return training.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, RuntimeError, ImportError, ArithmeticError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"difftrack: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("difftrack: interrupted (nothing written)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
