"""Tests for difftrack.detect.find_peaks (classical matched-filter detector).

Axis order (z, y, x), positions in voxels; grids are deliberately non-cubic.
"""

import numpy as np
import pytest

from difftrack.detect import filtered_noise, find_peaks
from difftrack.metrics import score
from difftrack.simulate import simulate

# 20 x 40 x 48 voxels holds ~45 interior particles at volume fraction 0.3 (enough for a
# recall/precision that means something) and simulates in well under a second.
SHAPE = (20, 40, 48)
VS = (0.2, 0.1, 0.1)
RADIUS = 0.4
RADIUS_VOX = RADIUS / np.asarray(VS)  # (2, 4, 4) voxels


def _score(found, sim):
    return score(found[["z", "y", "x"]].to_numpy(), sim.truth[["z", "y", "x"]].to_numpy(),
                 radius=RADIUS, voxel_size=VS, shape=sim.image.shape)


@pytest.fixture(scope="module")
def bright_stack():
    return simulate(SHAPE, voxel_size=VS, radius=RADIUS, volume_fraction=0.3, photons=200.0,
                    seed=0)


@pytest.fixture(scope="module")
def dark_stack():
    return simulate(SHAPE, voxel_size=VS, radius=RADIUS, volume_fraction=0.3, photons=200.0,
                    dark=True, seed=0)


def _blob(shape, centre, sigma, amplitude=100.0, background=10.0):
    z, y, x = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    q = sum(((a - c) / s) ** 2 for a, c, s in zip((z, y, x), centre, sigma))
    return background + amplitude * np.exp(-0.5 * q)


# --------------------------------------------------------------------------- #
# simulated stacks
# --------------------------------------------------------------------------- #
def test_finds_bright_particles(bright_stack):
    found = find_peaks(bright_stack.image, RADIUS_VOX)
    assert list(found.columns) == ["z", "y", "x", "mass"]
    # brightest first
    assert np.all(np.diff(found["mass"].to_numpy()) <= 0)
    s = _score(found, bright_stack)
    assert s.n_true >= 30
    # measured (seed 0): recall 0.980, precision 1.000, RMSE ~0.35/0.31/0.34 vox
    assert s.recall >= 0.9
    assert s.precision >= 0.95
    assert np.all(s.rmse < 0.6)
    # no systematic shift along any axis (a swapped or off-by-half axis would show here)
    assert np.all(np.abs(s.bias) < 0.25)


def test_invert_finds_dark_particles(dark_stack):
    s_inv = _score(find_peaks(dark_stack.image, RADIUS_VOX, invert=True), dark_stack)
    s_raw = _score(find_peaks(dark_stack.image, RADIUS_VOX, invert=False), dark_stack)
    # measured (seed 0): invert=True recall 0.939 precision 1.0; invert=False recall 0.0
    assert s_inv.recall >= 0.7
    assert s_inv.precision >= 0.9
    assert s_raw.recall <= 0.2
    assert s_raw.tp <= 0.2 * s_inv.tp


def test_per_axis_radius_matters(bright_stack):
    """The radius is per axis (z, y, x): passing it reversed must not do as well."""
    good = _score(find_peaks(bright_stack.image, RADIUS_VOX), bright_stack)
    reversed_ = _score(find_peaks(bright_stack.image, RADIUS_VOX[::-1]), bright_stack)
    # measured (seed 0): F1 0.990 with (2, 4, 4), 0.844 with (4, 4, 2)
    assert good.f1 > reversed_.f1 + 0.05


# --------------------------------------------------------------------------- #
# pure noise
# --------------------------------------------------------------------------- #
def _noise(seed=0):
    return np.random.default_rng(seed).normal(100.0, 5.0, (16, 24, 32))


def test_pure_noise_gives_few_peaks_with_a_strict_threshold():
    im = _noise()
    thr = 5.0 * filtered_noise(im, RADIUS_VOX)
    assert len(find_peaks(im, RADIUS_VOX, threshold=thr)) <= 2
    assert len(find_peaks(im, RADIUS_VOX, threshold=thr, invert=True)) <= 2


def test_pure_noise_gives_few_peaks_with_the_default_threshold():
    im = _noise()
    assert len(find_peaks(im, RADIUS_VOX)) <= 2


# --------------------------------------------------------------------------- #
# a single blob: axis order and sub-voxel refinement
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("centre", [(8.3, 11.6, 15.2), (7.7, 12.35, 16.65)])
@pytest.mark.parametrize("sigma", [(1.0, 1.0, 1.0), (2.0, 1.5, 2.5)])
def test_single_blob_subvoxel_position(centre, sigma):
    shape = (16, 24, 32)
    im = _blob(shape, centre, sigma)
    found = find_peaks(im, RADIUS_VOX)
    assert len(found) == 1
    err = found[["z", "y", "x"]].to_numpy()[0] - np.asarray(centre)
    # measured: |error| <= 0.042 voxel; the nearest voxel alone would be off by up to 0.4,
    # so 0.15 checks the parabolic refinement on every axis
    assert np.all(np.abs(err) < 0.15), err


def test_single_blob_in_uint16_stack():
    im = np.rint(_blob((16, 24, 32), (8.3, 11.6, 15.2), (1.5, 2.0, 2.0))).astype(np.uint16)
    found = find_peaks(im, RADIUS_VOX)
    assert len(found) == 1
    np.testing.assert_allclose(found[["z", "y", "x"]].to_numpy()[0], (8.3, 11.6, 15.2),
                               atol=0.15)


def test_blob_between_voxels_is_found_once():
    found = find_peaks(_blob((16, 24, 32), (8.5, 11.5, 15.5), (1.0, 1.0, 1.0)), RADIUS_VOX)
    assert len(found) == 1


def test_explicit_threshold_above_the_peak_finds_nothing():
    im = _blob((16, 24, 32), (8.3, 11.6, 15.2), (1.0, 1.0, 1.0))
    found = find_peaks(im, RADIUS_VOX)
    assert len(found) == 1
    none = find_peaks(im, RADIUS_VOX, threshold=float(found["mass"].iloc[0]) + 1.0)
    assert len(none) == 0
    assert list(none.columns) == ["z", "y", "x", "mass"]


# --------------------------------------------------------------------------- #
# bad input
# --------------------------------------------------------------------------- #
def test_2d_image_raises():
    with pytest.raises(ValueError, match="3D"):
        find_peaks(_noise()[0], RADIUS_VOX)


def test_nan_image_raises():
    im = _noise()
    im[3, 4, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        find_peaks(im, RADIUS_VOX)


@pytest.mark.parametrize("radius", [0.0, (2.0, 0.0, 4.0), -1.0, np.nan])
def test_non_positive_radius_raises(radius):
    with pytest.raises(ValueError, match="radius"):
        find_peaks(_noise(), radius)


def test_bool_image_raises_type_error():
    with pytest.raises(TypeError):
        find_peaks(_noise() > 100, RADIUS_VOX)
