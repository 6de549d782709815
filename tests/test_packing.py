"""Tests for difftrack.packing (periodic polydisperse hard-sphere packings)."""

import time

import numpy as np
import pytest

from difftrack.packing import max_overlap, pack_spheres, volume_fraction

# Non-cubic box (z, y, x) in um; radius 0.8 um gives ~1000 spheres at phi 0.58.
BOX = (12.0, 20.0, 16.0)
RADIUS = 0.8


def brute_max_overlap(centres, radii, box):
    """max_{i<j} r_i + r_j - |d_ij| over all pairs, minimum image, no KD-tree."""
    L = np.asarray(box, dtype=float)
    d = centres[:, None, :] - centres[None, :, :]
    d -= L * np.round(d / L)
    dist = np.sqrt(np.sum(d * d, axis=-1))
    ov = radii[:, None] + radii[None, :] - dist
    iu = np.triu_indices(len(radii), k=1)
    return float(ov[iu].max())


def expected_n(box, phi, radius, p):
    return int(round(phi * np.prod(box) / (4 / 3 * np.pi * radius**3 * (1 + 3 * p**2))))


@pytest.mark.parametrize(
    "box, phi, radius",
    [
        (BOX, 0.55, RADIUS),
        (BOX, 0.58, RADIUS),
        # Thin slab: neighbour cutoff + skin exceeds half the z side, which
        # exercises the per-step minimum-image path.
        ((4.0, 30.0, 30.0), 0.58, 0.8),
    ],
)
def test_dense_polydisperse_packing_has_no_overlap_and_exact_phi(box, phi, radius):
    centres, radii = pack_spheres(box, phi, radius, polydispersity=0.05, seed=7)
    n = expected_n(box, phi, radius, 0.05)
    assert n > 500
    assert centres.shape == (n, 3) and radii.shape == (n,)
    assert centres.dtype == np.float64 and radii.dtype == np.float64

    # Independent brute-force overlap over all pairs (minimum image).
    worst = brute_max_overlap(centres, radii, box)
    assert worst <= 1e-6 * radius
    # Dense: nearest neighbours almost touch (not a dilute gas).
    assert worst > -0.05 * radius
    assert max_overlap(centres, radii, box) == pytest.approx(worst, abs=1e-12)

    # Volume fraction exact, and the radii really are polydisperse and of the
    # requested mean size (common rescale factor is close to 1).
    phi_meas = 4 / 3 * np.pi * np.sum(radii**3) / np.prod(box)
    assert phi_meas == pytest.approx(phi, rel=1e-9)
    assert volume_fraction(radii, box) == pytest.approx(phi, rel=1e-9)
    assert radii.mean() == pytest.approx(radius, rel=0.02)

    L = np.asarray(box)
    assert np.all(centres >= 0.0) and np.all(centres < L)
    # Centres fill the whole box on every axis (box axes not mixed up).
    assert np.all(centres.max(axis=0) > 0.9 * L)


def test_same_seed_identical_different_seed_differs():
    a = pack_spheres(BOX, 0.55, RADIUS, polydispersity=0.05, seed=3)
    b = pack_spheres(BOX, 0.55, RADIUS, polydispersity=0.05, seed=3)
    c = pack_spheres(BOX, 0.55, RADIUS, polydispersity=0.05, seed=4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    assert not np.array_equal(a[1], c[1])
    assert not np.array_equal(a[0][: len(c[0])], c[0][: len(a[0])])


def test_generator_seed_is_reproducible_and_consumed():
    a = pack_spheres(BOX, 0.3, RADIUS, polydispersity=0.05, seed=np.random.default_rng(11))
    b = pack_spheres(BOX, 0.3, RADIUS, polydispersity=0.05, seed=np.random.default_rng(11))
    np.testing.assert_array_equal(a[0], b[0])
    rng = np.random.default_rng(11)
    c1 = pack_spheres(BOX, 0.3, RADIUS, polydispersity=0.05, seed=rng)
    c2 = pack_spheres(BOX, 0.3, RADIUS, polydispersity=0.05, seed=rng)
    np.testing.assert_array_equal(c1[0], a[0])
    assert not np.array_equal(c2[1], c1[1])


def test_dilute_packing():
    centres, radii = pack_spheres(BOX, 0.05, RADIUS, polydispersity=0.05, seed=1)
    assert len(radii) == expected_n(BOX, 0.05, RADIUS, 0.05) > 50
    assert brute_max_overlap(centres, radii, BOX) <= 1e-6 * RADIUS
    assert volume_fraction(radii, BOX) == pytest.approx(0.05, rel=1e-9)
    assert np.all(centres >= 0.0) and np.all(centres < np.asarray(BOX))


def test_monodisperse_radii_are_equal():
    centres, radii = pack_spheres(BOX, 0.5, RADIUS, seed=2)
    assert np.all(radii == radii[0])
    # The common rescale leaves the requested radius up to rounding of n.
    assert radii[0] == pytest.approx(RADIUS, rel=0.01)
    assert brute_max_overlap(centres, radii, BOX) <= 1e-6 * RADIUS


@pytest.mark.parametrize("p", [0.03, 0.10])
def test_radius_distribution_matches_polydispersity(p):
    _, radii = pack_spheres(BOX, 0.4, RADIUS, polydispersity=p, seed=5)
    assert len(radii) > 600
    rel_std = radii.std() / radii.mean()
    assert rel_std == pytest.approx(p, rel=0.15)
    # Truncated at +-3 sigma.
    assert radii.max() / radii.min() <= (1 + 3 * p) / (1 - 3 * p) + 1e-12
    # Gaussian-like: about 68% within one sigma.
    z = (radii / radii.mean() - 1) / p
    assert 0.6 < np.mean(np.abs(z) < 1) < 0.76


def test_physical_units_are_respected():
    # Same geometry in nm instead of um: scale-free algorithm, same guarantees.
    box_nm = tuple(1000 * b for b in BOX)
    centres, radii = pack_spheres(box_nm, 0.55, 1000 * RADIUS, polydispersity=0.05, seed=9)
    assert len(radii) == expected_n(BOX, 0.55, RADIUS, 0.05)
    assert radii.mean() == pytest.approx(800.0, rel=0.02)
    assert brute_max_overlap(centres, radii, box_nm) <= 1e-6 * 800.0
    assert np.all(centres < np.asarray(box_nm))


def test_tolerance_and_speed_for_1000_spheres():
    t0 = time.perf_counter()
    centres, radii = pack_spheres(BOX, 0.58, RADIUS, polydispersity=0.05, seed=0, tol=1e-9)
    elapsed = time.perf_counter() - t0
    assert brute_max_overlap(centres, radii, BOX) <= 1e-9 * radii.mean()
    assert elapsed < 5.0  # ~0.1 s in practice; generous for loaded CI machines


def test_not_converging_raises_runtime_error():
    with pytest.raises(RuntimeError, match="did not converge within max_steps=3"):
        pack_spheres(BOX, 0.58, RADIUS, polydispersity=0.05, seed=0, max_steps=3)


def test_max_overlap_periodic_images_and_gaps():
    box = (10.0, 8.0, 6.0)
    # Touching through the x face: separation 1.0 via the periodic image.
    c = np.array([[5.0, 4.0, 0.25], [5.0, 4.0, 5.25]])
    assert max_overlap(c, np.array([0.75, 0.75]), box) == pytest.approx(0.5)
    assert max_overlap(c, np.array([0.25, 0.25]), box) == pytest.approx(-0.5)
    # Far apart (no pair within 2 r_max): returns minus the smallest gap.
    c = np.array([[1.0, 1.0, 1.0], [6.0, 5.0, 4.0], [1.0, 1.0, 3.0]])
    r = np.array([0.1, 0.1, 0.2])
    assert max_overlap(c, r, box) == pytest.approx(brute_max_overlap(c, r, box))
    assert max_overlap(c, r, box) == pytest.approx(0.3 - 2.0)
    # Coordinates outside the box are wrapped.
    assert max_overlap(c + np.array([10.0, -8.0, 12.0]), r, box) == pytest.approx(0.3 - 2.0)
    assert max_overlap(c[:1], r[:1], box) == -np.inf


def test_max_overlap_matches_brute_force_on_random_spheres():
    rng = np.random.default_rng(0)
    box = (7.0, 9.0, 5.0)
    c = rng.random((300, 3)) * np.asarray(box)
    r = rng.uniform(0.2, 0.4, 300)
    assert max_overlap(c, r, box) == pytest.approx(brute_max_overlap(c, r, box), abs=1e-12)


def test_volume_fraction_value():
    r = np.array([1.0, 2.0])
    assert volume_fraction(r, (10.0, 20.0, 30.0)) == pytest.approx(4 / 3 * np.pi * 9.0 / 6000.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(box=(10.0, 10.0)), "box"),
        (dict(box=(10.0, -1.0, 10.0)), "box"),
        (dict(box=(10.0, np.nan, 10.0)), "box"),
        (dict(box=(10.0, np.inf, 10.0)), "box"),
        (dict(volume_fraction=0.0), "volume_fraction"),
        (dict(volume_fraction=-0.1), "volume_fraction"),
        (dict(volume_fraction=0.63), "volume_fraction"),
        (dict(volume_fraction=np.nan), "volume_fraction"),
        (dict(radius=0.0), "radius"),
        (dict(radius=-1.0), "radius"),
        (dict(radius=np.inf), "radius"),
        (dict(radius=4.0), "radius .*too large"),  # diameter > half the 12 um side
        (dict(radius=1.5, volume_fraction=0.001), "fewer than one particle"),
        (dict(polydispersity=-0.01), "polydispersity"),
        (dict(polydispersity=0.31), "polydispersity"),
        (dict(tol=-1e-6), "tol"),
        (dict(max_steps=0), "max_steps"),
        (dict(seed="abc"), "seed"),
    ],
)
def test_invalid_inputs_raise_value_error(kwargs, match):
    args = dict(box=BOX, volume_fraction=0.5, radius=RADIUS, polydispersity=0.05, seed=0)
    args.update(kwargs)
    box, phi, radius = args.pop("box"), args.pop("volume_fraction"), args.pop("radius")
    with pytest.raises(ValueError, match=match):
        pack_spheres(box, phi, radius, **args)
