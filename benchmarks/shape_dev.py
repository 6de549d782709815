"""fit_shape on the independent dev stacks (../shared/data/dev), true positions held.

    python benchmarks/shape_dev.py [--picture docs/img/shape_dev_small_dense.png]

For each stack: the residual's std over the noise level (1.00 = a perfect model), over
the fitted region (fit_shape leaves out a border where particles outside the stack, absent
from the truth, shed light) and over all voxels, plus the fit time and the learned shape.
Noise level: PERI stacks, the sigma in the .json; the others, sqrt(expected photons +
read noise^2 + 1/12) with the expected photons taken from the model (camera offset 100).
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from difftrack import fit_shape, read_stack

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "dev"
NAMES = ["dev_peri_r4_phi48_bright", "dev_peri_r3_phi50_dark", "dev_small_dense", "dev_large"]


def run(name):
    st = read_stack(DEV / f"{name}.tif")
    meta = json.loads((DEV / f"{name}.json").read_text())
    truth = pd.read_csv(DEV / f"{name}.csv")
    vs, radius = (st.voxel_size, meta["radius_um"]) if "px_um" in meta else (None, meta["radius"])
    t = time.perf_counter()
    m = fit_shape(st.image, truth[["z", "y", "x"]].to_numpy(), voxel_size=vs, radius=radius)
    dt = time.perf_counter() - t
    model = m.model_image()
    if "sigma" in meta:
        var = np.full(model.shape, meta["sigma"] ** 2)
    else:
        var = np.clip(model - 100.0, 0, None) + meta["read_noise"] ** 2 + 1 / 12
    z = (st.image - model) / np.sqrt(var)
    w = m.weight > 0
    sz, sxy = (float(v) for v in m.psf.moments())
    true_r = truth["r"].to_numpy() * (meta["px_um"] if "px_um" in meta else 1.0)
    return dict(stack=name, fitted=float(z[w].std()), all=float(z.std()),
                region=float(w.mean()), seconds=dt, steps=len(m.history),
                psf_sigma_z=sz, psf_sigma_xy=sxy,
                radius_rel_err=float(np.median(m.particles["radius"] / true_r) - 1)), (st, m, model, z)


def picture(path, name, st, model, z):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = st.image.astype(np.float32)
    k, j = img.shape[0] // 2, img.shape[1] // 2
    lo, hi = np.percentile(img, [1, 99.5])
    fig, axes = plt.subplots(2, 3, figsize=(11, 6.5), constrained_layout=True)
    aspect = (st.voxel_size[0] / st.voxel_size[2]) if st.voxel_size else 1.0
    for row, (sl, asp, lab) in enumerate([((k,), 1.0, f"xy, z={k}"), ((slice(None), j), aspect, f"xz, y={j}")]):
        for ax, (im, title, kw) in zip(axes[row], [
                (img[sl], "data", dict(cmap="gray", vmin=lo, vmax=hi)),
                (model[sl], "model", dict(cmap="gray", vmin=lo, vmax=hi)),
                (z[sl], "(data - model) / noise sigma", dict(cmap="RdBu_r", vmin=-4, vmax=4))]):
            h = ax.imshow(im, aspect=asp, interpolation="nearest", **kw)
            ax.set_title(f"{title} ({lab})", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(h, ax=axes[row, 2], shrink=0.8)
    fig.suptitle(f"{name}: fit_shape with the true centres held")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--picture", default=None, help="PNG of data/model/residual for dev_small_dense")
    args = ap.parse_args()
    rows = []
    for name in NAMES:
        row, (st, m, model, z) = run(name)
        rows.append(row)
        print(row, flush=True)
        if args.picture and name == "dev_small_dense":
            picture(args.picture, name, st, model, z)
    df = pd.DataFrame(rows)
    print(df.round(3).to_string(index=False))


if __name__ == "__main__":
    main()
