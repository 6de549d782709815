"""Neural detector vs the classical one: recall, precision, RMSE, speed.

    python benchmarks/detector.py [--weights W.npz] [--dev] [--sim] [--quick] [--speed]

--dev   the stacks in ../shared/data/dev (truth in the .csv beside each, metadata in .json)
--sim   difftrack.simulate stacks: volume fraction 0.3 / 0.5 / 0.58 x radius 2.5 / 4 / 7 px
        x PSF z elongation 1 / 2 / 3 (voxel 0.15 x 0.1 x 0.1, 100 photons, 10 background),
        plus harder ones (dark particles, low contrast-to-noise); --quick: elongation 2 only
--speed inference speed (voxels of the original stack per second) on 64x128x128 and
        96x256x256 stacks (radius 3.5 px), after a first call that compiles
With no selection, all three. Both detectors are told the true radius; scores by
difftrack.metrics.score (interior one radius from each face, matching within a radius).
"""

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from difftrack import neural
from difftrack.detect import find_peaks
from difftrack.io import read_stack
from difftrack.metrics import score
from difftrack.simulate import simulate

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "dev"
SIM_VS = (0.15, 0.1, 0.1)


def _row(name, image, truth, radius, vs, invert, weights, extra=None):
    r_vox = radius / np.asarray(vs)
    row = dict(stack=name, **(extra or {}))
    t0 = time.perf_counter()
    nn = neural.detect(image, r_vox, invert=invert, weights=weights)
    t1 = time.perf_counter()
    cl = find_peaks(image, r_vox, invert=invert)
    t2 = time.perf_counter()
    for tag, found, dt in (("neural", nn, t1 - t0), ("classical", cl, t2 - t1)):
        s = score(found[["z", "y", "x"]].to_numpy(), truth, radius=radius, voxel_size=vs,
                  shape=image.shape)
        row[f"{tag}_recall"] = round(s.recall, 3)
        row[f"{tag}_precision"] = round(s.precision, 3)
        row[f"{tag}_rmse"] = " ".join(f"{v:.2f}" for v in s.rmse)
        row[f"{tag}_s"] = round(dt, 2)
    row["n_true"] = s.n_true
    print(json.dumps(row), flush=True)
    return row


def dev_rows(weights):
    rows = []
    for meta_path in sorted(DEV.glob("dev_*.json")):
        meta = json.loads(meta_path.read_text())
        name = meta["name"]
        st = read_stack(DEV / f"{name}.tif")
        truth = pd.read_csv(DEV / f"{name}.csv")[["z", "y", "x"]].to_numpy()
        if "px_um" in meta:
            vs = (meta["zstep_um"], meta["px_um"], meta["px_um"])
            radius = meta["radius_um"]
        else:
            vs, radius = (1.0, 1.0, 1.0), meta["radius"]
        invert = meta.get("bright") is False
        rows.append(_row(name, st.image, truth, radius, vs, invert, weights))
    return rows


def sim_cases(quick):
    elong = (2.0,) if quick else (1.0, 2.0, 3.0)
    for phi, r_px, el in itertools.product((0.3, 0.5, 0.58), (2.5, 4.0, 7.0), elong):
        yield dict(volume_fraction=phi, r_px=r_px, elongation=el, photons=100.0, dark=False)
    for dark, photons in ((True, 100.0), (False, 12.0), (True, 12.0), (False, 5.0)):
        yield dict(volume_fraction=0.5, r_px=4.0, elongation=2.0, photons=photons, dark=dark)


def sim_rows(weights, quick=False, seed=777):
    rows = []
    for i, c in enumerate(sim_cases(quick)):
        radius = 0.1 * c["r_px"]
        r_vox = radius / np.asarray(SIM_VS)
        shape = tuple(int(round(n * rv / 3.0)) for n, rv in zip((40, 64, 64), r_vox))
        sim = simulate(shape, voxel_size=SIM_VS, radius=radius,
                       volume_fraction=c["volume_fraction"], elongation=c["elongation"],
                       photons=c["photons"], dark=c["dark"], seed=seed + i)
        truth = sim.truth[["z", "y", "x"]].to_numpy()
        name = (f"phi{c['volume_fraction']:.2f}_r{c['r_px']:g}_el{c['elongation']:g}"
                f"_ph{c['photons']:g}" + ("_dark" if c["dark"] else ""))
        rows.append(_row(name, sim.image, truth, radius, SIM_VS, c["dark"], weights,
                         dict(shape="x".join(map(str, shape)))))
    return rows


def speed(weights, shape=(64, 128, 128), r_px=3.5, tiles=(None, 160)):
    sim = simulate(shape, voxel_size=(0.1, 0.1, 0.1), radius=0.1 * r_px, volume_fraction=0.5,
                   seed=5)
    out = {}
    for tile in tiles:
        neural.detect(sim.image, r_px, weights=weights, tile=tile)  # compile
        t0 = time.perf_counter()
        found = neural.detect(sim.image, r_px, weights=weights, tile=tile)
        dt = time.perf_counter() - t0
        out[f"tile={tile}"] = dict(seconds=round(dt, 2),
                                   voxels_per_s=round(np.prod(shape) / dt),
                                   particles=len(found))
    t0 = time.perf_counter()
    find_peaks(sim.image, r_px)
    out["classical_s"] = round(time.perf_counter() - t0, 2)
    out.update(shape=shape, radius_px=r_px, cpus=os.cpu_count())
    print(json.dumps(out), flush=True)
    return out


def summary(rows, label):
    df = pd.DataFrame(rows)
    for tag in ("neural", "classical"):
        print(f"{label} {tag}: mean recall {df[f'{tag}_recall'].mean():.3f}, mean precision "
              f"{df[f'{tag}_precision'].mean():.3f}, min recall {df[f'{tag}_recall'].min():.3f}, "
              f"min precision {df[f'{tag}_precision'].min():.3f}")


def markdown(rows):
    cols = ["stack", "neural_recall", "neural_precision", "classical_recall",
            "classical_precision", "neural_rmse", "classical_rmse", "neural_s", "classical_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=None, help="detector weights (default: shipped)")
    p.add_argument("--dev", action="store_true")
    p.add_argument("--sim", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--speed", action="store_true")
    p.add_argument("--markdown", action="store_true", help="print markdown tables")
    a = p.parse_args(argv)
    every = not (a.dev or a.sim or a.speed)
    w = neural.get_model(a.weights)
    print("weights:", a.weights or neural.DEFAULT_WEIGHTS, json.dumps(
        {k: w[1].get(k) for k in ("steps", "threshold", "train_seconds", "device", "calibration")}))
    if (a.dev or every) and DEV.is_dir():
        rows = dev_rows(w)
        summary(rows, "dev")
        if a.markdown:
            print(markdown(rows))
    if a.sim or every:
        rows = sim_rows(w, quick=a.quick)
        summary(rows, "sim")
        if a.markdown:
            print(markdown(rows))
    if a.speed or every:
        speed(w)
        speed(w, shape=(96, 256, 256), tiles=(None,))


if __name__ == "__main__":
    main()
