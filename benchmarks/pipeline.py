"""The whole path, track + refine, from the neural start and from the classical start.

    python benchmarks/pipeline.py [NAME ...]     # dev stacks (default: the PERI dark one)
    python benchmarks/pipeline.py --sim          # a simulated ~5,000-particle dense stack
    python benchmarks/pipeline.py --sim --start unet   # one start only

The simulated stack: ``simulate((64, 160, 160), voxel_size=(0.1, 0.1, 0.1), radius=0.35,
volume_fraction=0.5)`` (PSF 2.5x longer along z, contrast/noise about 9), scored on the
interior; its Cramer-Rao bound comes from the true model (as benchmarks/refine_sim.py).

Same refine settings for both starts; scored against the truth on the interior (one
radius from each face): recall, precision, RMSE per axis over the Cramer-Rao bound
(crlb.json), the time of each stage, and the XLA compile time and count within them.
"""

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd
from jax import monitoring

import difftrack as dt

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "dev"

COMPILE = {"s": 0.0, "n": 0}  # XLA compile time, summed over the run


def _count_compiles(event, duration, **_):
    if event == "/jax/core/compile/backend_compile_duration":
        COMPILE["s"] += duration
        COMPILE["n"] += 1


monitoring.register_event_duration_secs_listener(_count_compiles)


def run(name, data, truth, radius, vs, crlb_zyx, starts=("unet", "classical")):
    for detector in starts:
        c0 = dict(COMPILE)
        t0 = time.perf_counter()
        found = dt.track(data, detector=detector)
        t1 = time.perf_counter()
        res = dt.refine(found)
        t2 = time.perf_counter()
        row = dict(stack=name, start=detector, n_true=int(len(truth)))
        for tag, df in (("track", found.particles), ("refine", res.particles)):
            s = dt.score(df[["z", "y", "x"]].to_numpy(), truth, radius=radius,
                         voxel_size=vs, shape=data.shape)
            row[tag] = dict(recall=round(s.recall, 3), precision=round(s.precision, 3),
                            rmse_over_crlb=np.round(s.rmse / np.asarray(crlb_zyx), 2).tolist())
        st = res.stats
        row.update(device=str(jax.devices()[0]),
                   track_s=round(t1 - t0, 1), refine_s=round(t2 - t1, 1),
                   compile_s=round(COMPILE["s"] - c0["s"], 1), compiles=COMPILE["n"] - c0["n"],
                   added=st.get("added"), removed=st.get("removed"), rounds=st.get("rounds"),
                   fit_steps=st.get("steps"), fits=st.get("fits"),
                   seconds_by_phase={k: round(v, 1) for k, v in st.get("seconds_by_phase", {}).items()})
        print(json.dumps(row), flush=True)


def simulated(starts):
    from refine_sim import crlb

    vs, radius = (0.1, 0.1, 0.1), 0.35
    sim = dt.simulate((64, 160, 160), voxel_size=vs, radius=radius, volume_fraction=0.5, seed=5)
    t = sim.truth[["z", "y", "x"]].to_numpy()
    inside = np.all((t >= -0.5) & (t <= np.asarray(sim.image.shape) - 0.5), axis=1)
    print(json.dumps(dict(stack="sim_5k", particles_in_stack=int(inside.sum()),
                          shape=list(sim.image.shape))), flush=True)
    data = dt.preprocess(sim.image, voxel_size=vs, radius=radius, invert=False)
    run("sim_5k", data, t, radius, vs, crlb(sim), starts)


def main(names, sim=False, starts=("unet", "classical")):
    if sim:
        return simulated(starts)
    crlb = json.loads((DEV / "crlb.json").read_text())
    for name in names:
        meta = json.loads((DEV / f"{name}.json").read_text())
        truth = pd.read_csv(DEV / f"{name}.csv")[["z", "y", "x"]].to_numpy()
        if "px_um" in meta:
            vs, radius = (meta["zstep_um"], meta["px_um"], meta["px_um"]), meta["radius_um"]
        else:
            vs, radius = (1.0, 1.0, 1.0), meta["radius"]
        invert = meta.get("bright") is False
        data = dt.preprocess(DEV / f"{name}.tif", voxel_size=vs, radius=radius, invert=invert)
        run(name, data, truth, radius, vs, crlb[name]["crlb_rms_zyx"], starts)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=["dev_peri_r3_phi50_dark"], help="dev stacks")
    ap.add_argument("--sim", action="store_true", help="the simulated ~5,000-particle stack")
    ap.add_argument("--start", choices=("unet", "classical"), default=None,
                    help="one start only (default: both)")
    args = ap.parse_args()
    main(args.names, args.sim, (args.start,) if args.start else ("unet", "classical"))
