"""Fine-tune the shipped detector on learned shapes, several variants in a row (GPU).

    PYTHONPATH=. python benchmarks/finetune_gpu.py --specs out/ft --out OUT_DIR \
        s1:learned:0:0 s1:learned:0.3:0.25 s1:true:0:0 ...

Each variant is NAME:WHICH:JITTER:MIX: the shape saved in SPECS/NAME.npz by
``benchmarks/finetune.py --save-spec`` (the learned PSF and radius, or, with WHICH = true,
the simulator's own: the control), the PSF-width jitter and the fraction of general
volumes (``training.shape_spec_from``). Every variant trains for ``--time-limit`` seconds
(batch 16 crops of 48^3 from 64^3 volumes, as ``train_gpu.sh``) and writes
OUT_DIR/NAME_WHICH_JITTER_MIX.npz; score them with ``benchmarks/finetune.py --score``.
"""

import argparse
import os
from pathlib import Path

from finetune import load_spec

from difftrack import neural, training


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--specs", default="out/ft")
    ap.add_argument("--out", default=os.environ.get("OUT", "out/ft"))
    ap.add_argument("--time-limit", type=float, default=80.0)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 3) - 2))
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for v in args.variants:
        name, which, jitter, mix = v.split(":")
        spec = load_spec(Path(args.specs) / f"{name}.npz", which)
        out = Path(args.out) / f"{name}_{which}_{jitter}_{mix}.npz"
        logf = open(Path(args.out) / (out.stem + ".log"), "w")

        def log(s, logf=logf):
            print(f"[{out.stem}] {s}", flush=True)
            logf.write(s + "\n")
            logf.flush()

        training.train(args.steps, batch=16, seed=0, out=out, init=neural.DEFAULT_WEIGHTS,
                       shape=spec["psf"], voxel_size=spec["voxel_size"], radius=spec["radius"],
                       cnr=spec["cnr"], dark=spec["dark"], jitter=float(jitter), mix=float(mix),
                       crop=48, vol=64,
                       fresh=0.25, buffer=256, workers=args.workers, time_limit=args.time_limit,
                       calibrate=4, log=log)
        logf.close()


if __name__ == "__main__":
    main()
