"""Fine-tuning the detector on a shape it was not trained on (issue 5's loop).

    python benchmarks/finetune.py [--steps 150] [--elongation 4] [--radius-px 2.5] [--sigma-xy S]
    python benchmarks/finetune.py ... --save-spec out/ft/s1.npz --steps 0   # for finetune_gpu.py
    python benchmarks/finetune.py ... --score out/ft/*.npz                # score weights made elsewhere

A simulated stack whose PSF lies outside the general model's training range (z elongation
above 3 at a small radius, dense; or, with ``--sigma-xy``, a lateral PSF std above the
training range of 0.12-0.4 radius) is written to a TIFF; `difftrack train --from-shape`'s
path learns its shape (``training.learn_shape``: detector -> ``fit_shape``, or with
``--learn refine`` track -> refine) and fine-tunes the shipped weights on renders with
that shape. Recall /
precision of the neural detector before and after, on that stack and on a held-out stack
of the same kind (another seed). ``--true-shape``: fine-tune on the simulator's own PSF
instead (the control: what a perfectly learned shape would give). ``--jitter`` and
``--mix``: as ``training.shape_spec_from`` (default: ``train``'s).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from difftrack import neural, score, simulate, training, write_stack
from difftrack.simulate import default_psf
from difftrack.detect import find_peaks

VS = (0.15, 0.1, 0.1)


FIELDS = ("log_sigma_xy", "log_sigma_z", "z_offset", "logit_weight", "log_grid",
          "depth_log_sigma_xy", "depth_log_sigma_z")  # the last three: or None


def save_spec(path, spec, true_psf, true_radius, cnr):
    """The learned shape (``spec`` from ``training.shape_spec_from``) and the true one, for
    ``load_spec`` (benchmarks/finetune_gpu.py)."""
    np.savez(path, **{f"{who}_{k}": np.asarray(getattr(p, k))
                      for who, p in (("learned", spec["psf"]), ("true", true_psf)) for k in FIELDS
                      if getattr(p, k) is not None},
             voxel_size=np.asarray(spec["voxel_size"]), learned_radius=spec["radius"],
             true_radius=true_radius, cnr=float(cnr), dark=bool(spec["dark"]))


def load_spec(path, which):
    """``which`` = "learned" or "true": dict(psf, voxel_size, radius, cnr, dark) of a
    ``save_spec`` file (dark None where the file predates it)."""
    from difftrack.shape import PSF

    d = np.load(path)
    psf = PSF(*(np.asarray(d[f"{which}_{k}"], np.float32) if f"{which}_{k}" in d else None
                for k in FIELDS))  # no grid saved: None
    return dict(psf=psf, voxel_size=tuple(d["voxel_size"]), radius=float(d[f"{which}_radius"]),
                cnr=float(d["cnr"]), dark=bool(d["dark"]) if "dark" in d else None)


def evaluate(sim, radius, weights, threshold=None):
    r_vox = radius / np.asarray(VS)
    t = sim.truth[["z", "y", "x"]].to_numpy()
    out = {}
    kw = {} if threshold is None else {"threshold": threshold}
    for tag, found in (("neural", neural.detect(sim.image, r_vox, weights=weights, **kw)),
                       ("classical", find_peaks(sim.image, r_vox))):
        s = score(found[["z", "y", "x"]].to_numpy(), t, radius=radius, voxel_size=VS,
                  shape=sim.image.shape)
        out[tag] = (round(s.recall, 3), round(s.precision, 3))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--elongation", type=float, default=4.0)
    ap.add_argument("--radius-px", type=float, default=2.5)
    ap.add_argument("--phi", type=float, default=0.58)
    ap.add_argument("--sigma-xy", type=float, default=None,
                    help="lateral PSF std in radii (default: simulate's, 0.25)")
    ap.add_argument("--learn", choices=("fit_shape", "refine"), default="fit_shape",
                    help="how the shape is learned (training.learn_shape)")
    ap.add_argument("--true-shape", action="store_true",
                    help="fine-tune on the simulator's PSF instead of the learned one")
    ap.add_argument("--jitter", type=float, default=None)
    ap.add_argument("--mix", type=float, default=None)
    ap.add_argument("--save-spec", default=None, metavar="NPZ",
                    help="save the learned and the true shape for benchmarks/finetune_gpu.py")
    ap.add_argument("--score", nargs="+", default=None, metavar="WEIGHTS",
                    help="only score these weights on the two stacks (threshold sweep too)")
    args = ap.parse_args()
    radius = 0.1 * args.radius_px
    shape = (40, 64, 64)
    sxy = None if args.sigma_xy is None else args.sigma_xy * radius
    kw = dict(voxel_size=VS, radius=radius, volume_fraction=args.phi, photons=100.0,
              psf=default_psf(VS, radius, sigma_xy=sxy, elongation=args.elongation))
    user = simulate(shape, seed=101, **kw)
    held = simulate(shape, seed=202, **kw)
    if args.score:
        for w in args.score:
            sweep = {t: evaluate(held, radius, w, t)["neural"] for t in (0.1, 0.2, 0.3, 0.4, 0.5)}
            print(json.dumps(dict(weights=w, user=evaluate(user, radius, w)["neural"],
                                  held_out=evaluate(held, radius, w)["neural"],
                                  held_out_sweep=sweep)), flush=True)
        return
    before = dict(user=evaluate(user, radius, None), held_out=evaluate(held, radius, None))
    print("before", json.dumps(before), flush=True)
    with tempfile.TemporaryDirectory() as d:
        stack = Path(d) / "user.tif"
        write_stack(stack, user.image, voxel_size=VS)
        t0 = time.perf_counter()
        model, cnr = training.learn_shape(stack, radius=radius, how=args.learn)
        t_shape = time.perf_counter() - t0
        learned = dict(psf_std_z_xy=[round(float(v), 4) for v in model.psf.moments()],
                       radius=round(float(np.median(model.particles["radius"])), 4),
                       true_psf_std_z_xy=[round(float(v), 4) for v in kw["psf"].moments()],
                       true_radius=radius, cnr=round(float(cnr), 2))
        print("learned shape", json.dumps(learned), f"({t_shape:.0f} s)", flush=True)
        if args.save_spec:
            save_spec(args.save_spec, training.shape_spec_from(model, cnr=cnr), kw["psf"],
                      radius, cnr)
            print("wrote", args.save_spec, flush=True)
        if args.steps == 0:
            return
        shape = kw["psf"] if args.true_shape else model
        extra = dict(voxel_size=VS, radius=radius) if args.true_shape else {}
        out = Path(d) / "tuned.npz"
        for k in ("jitter", "mix"):
            if getattr(args, k) is not None:
                extra[k] = getattr(args, k)
        training.train(args.steps, batch=4, seed=0, out=out, init=neural.DEFAULT_WEIGHTS,
                       shape=shape, cnr=cnr, workers=0, calibrate=4, log=None, **extra)
        dt = time.perf_counter() - t0
        after = dict(user=evaluate(user, radius, str(out)), held_out=evaluate(held, radius, str(out)))
        print("after", json.dumps(after), flush=True)
        # recall at matched precision: the lowest threshold at which the tuned model is at
        # least as precise on the held-out stack as the general model was
        sweep = {t: evaluate(held, radius, str(out), t)["neural"] for t in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)}
        print("held-out sweep of the tuned model (threshold: recall, precision)", json.dumps(sweep), flush=True)
        ok = [t for t, (r, p) in sweep.items() if p >= before["held_out"]["neural"][1]]
        if ok:
            t = min(ok)
            after["held_out_matched_precision"] = dict(threshold=t, neural=sweep[t])
    print(json.dumps(dict(elongation=args.elongation, radius_px=args.radius_px, phi=args.phi,
                          sigma_xy_radii=args.sigma_xy, true_shape=args.true_shape, learn=args.learn,
                          jitter=args.jitter, mix=args.mix,
                          learned=learned, shape_seconds=round(t_shape),
                          steps=args.steps, fine_tune_seconds=round(dt), before=before,
                          after=after)))


if __name__ == "__main__":
    main()
