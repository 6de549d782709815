"""Tests for difftrack.simulate (synthetic confocal stacks with known truth).

Stacks are tiny and deliberately non-cubic (z, y, x) = (16, 24, 32) so that a mix-up of
axes changes shapes; every stack is made once per module (JAX compiles are slow).
"""

import numpy as np
import pandas as pd
import pytest

from difftrack.packing import volume_fraction as packing_volume_fraction
from difftrack.simulate import SimulatedStack, particle_volume_fraction, simulate

SHAPE = (16, 24, 32)
VS = (0.2, 0.1, 0.1)
RADIUS = 0.4
OFFSET = 100.0


def _sim(**kw):
    args = dict(voxel_size=VS, radius=RADIUS)
    args.update(kw)
    return simulate(SHAPE, **args)


@pytest.fixture(scope="module")
def default_stack():
    return _sim(seed=0)


@pytest.fixture(scope="module")
def default_stack_again():
    return _sim(seed=0)


@pytest.fixture(scope="module")
def other_seed_stack():
    return _sim(seed=1)


def _interior_centre_values(sim):
    """Image values at the voxels holding the centres of particles inside the stack."""
    t = sim.truth[["z", "y", "x"]].to_numpy()
    shape = np.asarray(sim.image.shape)
    inside = np.all((t >= -0.5) & (t < shape - 0.5), axis=1)
    idx = np.clip(np.rint(t[inside]).astype(int), 0, shape - 1)
    return sim.image[tuple(idx.T)].astype(float)


# --------------------------------------------------------------------------- #
# reproducibility
# --------------------------------------------------------------------------- #
def test_same_seed_gives_identical_stack(default_stack, default_stack_again):
    a, b = default_stack, default_stack_again
    assert a is not b
    np.testing.assert_array_equal(a.image, b.image)
    pd.testing.assert_frame_equal(a.truth, b.truth)
    np.testing.assert_array_equal(a.expected, b.expected)


def test_different_seed_gives_different_stack(default_stack, other_seed_stack):
    assert not np.array_equal(default_stack.image, other_seed_stack.image)
    # a different packing, not only different noise
    assert not np.allclose(default_stack.truth[["z", "y", "x"]].to_numpy()[:10],
                           other_seed_stack.truth[["z", "y", "x"]].to_numpy()[:10])


# --------------------------------------------------------------------------- #
# output format and noise model
# --------------------------------------------------------------------------- #
def test_image_dtype_shape_and_truth_columns(default_stack):
    s = default_stack
    assert isinstance(s, SimulatedStack)
    assert s.image.dtype == np.uint16
    assert s.image.shape == SHAPE
    assert s.expected.shape == SHAPE and s.noise_variance.shape == SHAPE
    assert s.voxel_size == VS
    assert list(s.truth.columns) == ["z", "y", "x", "radius", "amplitude"]
    assert len(s.truth) > 50
    assert np.all(np.isfinite(s.truth.to_numpy()))
    # bright particles by default; radii near the requested mean
    assert np.all(s.truth["amplitude"] > 0)
    assert s.truth["radius"].mean() == pytest.approx(RADIUS, rel=0.05)
    # the image is not trivial: well above the camera offset somewhere, never saturated
    assert s.image.max() > OFFSET + 50 and s.image.max() < 65535


def test_noise_has_zero_mean_and_the_reported_variance(default_stack):
    s = default_stack
    d = s.image.astype(np.float64) - s.expected.astype(np.float64)
    var = s.noise_variance.astype(np.float64)
    n = d.size
    assert n > 1e4
    # mean of n independent deviations: std sqrt(mean var / n)
    assert abs(d.mean()) < 4.0 * np.sqrt(var.mean() / n)
    ratio = np.mean(d**2) / var.mean()
    assert ratio == pytest.approx(1.0, abs=0.1)
    # the variance map is not a constant: brighter voxels are noisier (Poisson)
    bright = s.expected > np.percentile(s.expected, 90)
    dim = s.expected < np.percentile(s.expected, 10)
    assert np.mean(d[bright] ** 2) > 1.5 * np.mean(d[dim] ** 2)


# --------------------------------------------------------------------------- #
# particle truth
# --------------------------------------------------------------------------- #
def test_truth_particles_do_not_overlap(default_stack):
    s = default_stack
    c = s.truth[["z", "y", "x"]].to_numpy() * np.asarray(VS)  # physical units
    r = s.truth["radius"].to_numpy()
    d = np.sqrt(np.sum((c[:, None, :] - c[None, :, :]) ** 2, axis=-1))
    need = r[:, None] + r[None, :]
    iu = np.triu_indices(len(r), k=1)
    gap = d[iu] - need[iu]
    assert gap.min() >= -1e-4 * r.mean()
    # dense: some neighbours nearly touch
    assert gap.min() < 0.1 * r.mean()


def test_truth_centres_lie_in_the_stack_plus_its_margin(default_stack):
    s = default_stack
    t = s.truth[["z", "y", "x"]].to_numpy()
    m = np.asarray(s.geometry.margin, float)
    assert np.all(t >= -0.5 - m - 1e-9)
    assert np.all(t <= np.asarray(SHAPE) - 0.5 + m + 1e-9)
    # and the stack itself is populated along every axis
    inside = np.all((t >= -0.5) & (t < np.asarray(SHAPE) - 0.5), axis=1)
    assert inside.sum() >= 10
    for k in range(3):
        assert np.ptp(t[inside, k]) > 0.5 * SHAPE[k]


def test_volume_fraction_of_the_packing(default_stack):
    s = default_stack
    # the rendered packing fills the stack plus its margin at exactly the requested fraction
    box = (np.asarray(SHAPE) + 2 * np.asarray(s.geometry.margin, float)) * np.asarray(VS)
    assert packing_volume_fraction(s.truth["radius"], box) == pytest.approx(0.5, rel=1e-6)
    # and the particles centred in the stack fill it at about that fraction
    phi = particle_volume_fraction(s.truth, SHAPE, VS)
    assert phi == pytest.approx(0.5, abs=0.1)


# --------------------------------------------------------------------------- #
# contrast and illumination
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dark", [False, True])
def test_particle_contrast_sign(dark):
    s = _sim(volume_fraction=0.3, photons=200.0, dark=dark, seed=0)
    centres = _interior_centre_values(s)
    assert len(centres) >= 5
    med = float(np.median(s.image))
    if dark:
        assert np.all(s.truth["amplitude"] < 0)
        assert centres.mean() < med - 30
    else:
        assert np.all(s.truth["amplitude"] > 0)
        assert centres.mean() > med + 30


def test_attenuation_dims_the_bottom():
    att = _sim(attenuation=0.5, illumination_tilt=0.0, seed=0)
    flat = _sim(attenuation=0.0, illumination_tilt=0.0, seed=0)
    # same packing: only the illumination differs
    pd.testing.assert_frame_equal(att.truth, flat.truth)

    def top_over_bottom(s):
        im = s.image.astype(np.float64) - OFFSET
        return im[:4].mean() / im[-4:].mean()

    r_att, r_flat = top_over_bottom(att), top_over_bottom(flat)
    assert r_att > 1.0  # top slices brighter than the bottom ones
    # a linear loss of 50 % over the depth: ~1.5x between the top and bottom slabs
    assert r_att / r_flat > 1.25


# --------------------------------------------------------------------------- #
# bad input
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "shape, kw, match",
    [
        ((16, 24), {}, "shape"),
        ((16, 0, 32), {}, "shape"),
        ((0, 24, 32), {}, "shape"),
        (SHAPE, {"voxel_size": 0.0}, "voxel_size"),
        (SHAPE, {"voxel_size": (0.2, -0.1, 0.1)}, "voxel_size"),
        (SHAPE, {"voxel_size": (0.2, 0.1, 0.0)}, "voxel_size"),
        (SHAPE, {"voxel_size": None}, "voxel_size"),
        (SHAPE, {"radius": 0.0}, "radius"),
        (SHAPE, {"radius": -0.4}, "radius"),
        (SHAPE, {"volume_fraction": 0.0}, "volume_fraction"),
        (SHAPE, {"volume_fraction": 0.7}, "volume_fraction"),
    ],
)
def test_bad_input_raises_value_error_naming_it(shape, kw, match):
    args = dict(voxel_size=VS, radius=RADIUS, seed=0)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        simulate(shape, **args)
