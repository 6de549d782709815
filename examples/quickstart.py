"""Simulate a small dense stack, detect its particles, score them, learn the shape S.

    python examples/quickstart.py
"""

import numpy as np

import difftrack as dt


def main(shape=(24, 48, 48)):
    sim = dt.simulate(shape, voxel_size=(0.2, 0.1, 0.1), radius=0.4, volume_fraction=0.5, seed=1)
    found = dt.find_peaks(sim.image, radius_vox=(2, 4, 4))
    truth = sim.truth[["z", "y", "x"]].to_numpy()
    s = dt.score(found[["z", "y", "x"]].to_numpy(), truth, radius=0.4, voxel_size=sim.voxel_size,
                 shape=sim.image.shape)
    print("classical detector:", s)
    # the truth also lists particles just outside the stack (their light enters it)
    inside = np.all((truth >= -0.5) & (truth <= np.asarray(shape) - 0.5), axis=1)
    model = dt.fit_shape(sim.image, truth[inside], voxel_size=sim.voxel_size, radius=0.4,
                         steps=60)
    z = (sim.image - model.model_image()) / np.sqrt(sim.noise_variance)
    print(f"fit_shape: residual / noise = {z[model.weight > 0].std():.3f} (1.00 is perfect)")
    return s, z[model.weight > 0].std()


if __name__ == "__main__":
    main()
