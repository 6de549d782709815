"""Refinement pieces that are finished: the noise model, the exact removal gain, the
addition gain map (never adds to pure noise), and the end-to-end loop on a tiny stack."""

import importlib.util
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from difftrack import fit_shape, simulate
from difftrack.model import make_geometry
from difftrack.refine import (OUTSIDE_PENALTY, _ellipsoid, _gain_map, _learned_kernel, _outside_reach,
                              _penalty_at, _removal_gain, estimate_noise, refine_positions)
from difftrack.render import Params, Particles, render
from difftrack.shape import PSF

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "dev"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_estimate_noise_recovers_a_poisson_like_model():
    rng = np.random.default_rng(0)
    model = rng.uniform(10, 200, (20, 30, 40))
    image = model + rng.standard_normal(model.shape) * np.sqrt(4.0 + 1.0 * (model - 10))
    nm = estimate_noise(image, model)
    assert nm.variance(np.asarray([10.0]))[0] == pytest.approx(4.0, abs=1.5)
    assert nm.variance(np.asarray([200.0]))[0] == pytest.approx(194.0, rel=0.08)


@pytest.fixture(scope="module")
def sim():
    return simulate((16, 28, 32), voxel_size=(0.2, 0.1, 0.1), radius=0.4, volume_fraction=0.45,
                    photons=100.0, seed=5)


def test_removal_gain_is_the_exact_chi2_change(sim):
    p, g = sim.params, sim.geometry
    data = sim.image.astype(np.float32) - 100.0
    w = (1.0 / sim.noise_variance).astype(np.float32)
    r = data - np.asarray(render(p, g))
    gain = _removal_gain(p, jnp.asarray(w * r), w, g)
    chi0 = float(np.sum(w * r * r))
    # interior particles and ones whose light is cut by a face (or whose centre is outside)
    pos = np.asarray(p.particles.pos)
    outside = np.flatnonzero(np.any((pos < -0.5) | (pos > np.asarray(data.shape) - 0.5), axis=1))
    assert len(outside) > 0
    for i in [0, 7, 20, 33, int(outside[0]), int(outside[-1])]:
        q = Params(Particles(p.particles.pos, p.particles.radius,
                             p.particles.amplitude.at[i].set(0.0)), p.psf, p.background)
        ri = data - np.asarray(render(q, g))
        exact = float(np.sum(w * ri * ri)) - chi0
        assert gain[i] == pytest.approx(exact, rel=1e-3, abs=1.0)


def test_gain_map_finds_a_missing_particle_and_nothing_in_noise(sim):
    p, g = sim.params, sim.geometry
    data = sim.image.astype(np.float32) - 100.0
    w = (1.0 / sim.noise_variance).astype(np.float32)
    penalty = 5 * math.log(data.size)
    # drop an interior particle: the gain map peaks at it, far above the penalty
    pos = np.asarray(p.particles.pos)
    i = int(np.argmin(np.linalg.norm(pos - np.asarray(data.shape) / 2, axis=1)))
    q = Params(Particles(p.particles.pos, p.particles.radius, p.particles.amplitude.at[i].set(0.0)),
               p.psf, p.background)
    r = data - np.asarray(render(q, g))
    gmap, amp = _gain_map(jnp.asarray(w * r), jnp.asarray(w), q, g, 0.4, 1.0, (0, 0, 0))
    peak = np.unravel_index(np.argmax(gmap), gmap.shape)
    assert gmap.max() > 10 * penalty
    assert np.all(np.abs(np.asarray(peak) - pos[i]) <= 1.0)
    # pure noise (the particles' light removed): nothing pays the penalty
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(data.shape).astype(np.float32) * np.sqrt(sim.noise_variance)
    gmap, _ = _gain_map(jnp.asarray(w * noise), jnp.asarray(w), q, g, 0.4, 1.0, (0, 0, 0))
    assert gmap.max() < penalty


def test_two_missing_z_neighbours_are_both_added(sim):
    """Two touching particles stacked along z, both missing: under the z-elongated PSF
    their light makes ONE peak of the gain map; the addition's second pass (the first
    candidate in the model) finds the other."""
    p, g = sim.params, sim.geometry
    pos = np.asarray(p.particles.pos)
    vs = np.asarray(sim.voxel_size)
    pair = [22, 118]  # 0.86 um apart, the line between them 12 degrees off z
    d = (pos[pair[1]] - pos[pair[0]]) * vs
    assert np.linalg.norm(d) < 0.9 and abs(d[0]) / np.linalg.norm(d) > 0.95
    data = sim.image.astype(np.float32) - 100.0
    w = (1.0 / sim.noise_variance).astype(np.float32)
    amp = p.particles.amplitude.at[pair[0]].set(0.0).at[pair[1]].set(0.0)
    q = Params(Particles(p.particles.pos, p.particles.radius, amp), p.psf, p.background)
    r = data - np.asarray(render(q, g))
    gmap, _ = _gain_map(jnp.asarray(w * r), jnp.asarray(w), q, g, 0.4, 1.0, (0, 0, 0))
    gmap = np.asarray(gmap)
    peaks = np.argwhere((gmap == ndimage.maximum_filter(gmap, footprint=_ellipsoid(0.9 * 0.4 / vs),
                                                        mode="constant"))
                        & (gmap > 5 * math.log(data.size)))
    near = [k for k in peaks if min(np.linalg.norm((k - pos[i]) * vs) for i in pair) < 0.5]
    assert len(near) == 1  # one merged peak for two particles
    inside = np.all((pos >= -0.5) & (pos <= np.asarray(sim.image.shape) - 0.5), axis=1)
    keep = inside.copy()
    keep[pair] = False
    res = refine_positions(sim.image, pos[keep], voxel_size=sim.voxel_size, radius=0.4,
                           psf=p.psf, max_rounds=3, steps=20, shape_steps=20, polish=0)
    f = res.particles[["z", "y", "x"]].to_numpy()
    # measured 0.018 and 0.016 um (with one pass and no trust region, one round: 0.21 and
    # 0.66, one of them not found; since the addition also takes particles with 2% of
    # their light in the stack, this tiny stack's faces take a round more: 0.09 and 0.77
    # after two rounds)
    for i in pair:
        assert np.linalg.norm((f - pos[i]) * vs, axis=1).min() < 0.5 * 0.4


def test_a_centre_pressed_against_its_trust_region_is_removed(sim):
    """A start 0.6 R from its particle: without a trust region the fit carries it home;
    with max_move=0.25 it is held a quarter radius from where it started, and a centre
    pressed against that wall is removed (the next round's addition may put a particle
    where the light wants one: here there is no next round)."""
    p = sim.params
    pos = np.asarray(p.particles.pos)
    vs = np.asarray(sim.voxel_size)
    inside = np.all((pos >= -0.5) & (pos <= np.asarray(sim.image.shape) - 0.5), axis=1)
    truth = pos[inside]
    start = truth.copy()
    k = int(np.argmin(np.linalg.norm(start - np.asarray(sim.image.shape) / 2, axis=1)))
    start[k, 2] += 0.6 * 0.4 / vs[2]
    near = {}
    for move in (None, 0.25):
        res = refine_positions(sim.image, start, voxel_size=sim.voxel_size, radius=0.4,
                               psf=p.psf, max_rounds=1, steps=60, shape_steps=20, polish=0,
                               max_move=move)
        f = res.particles[["z", "y", "x"]].to_numpy()
        near[move] = np.linalg.norm((f - truth[k]) * vs, axis=1).min()
        others = np.delete(truth, k, axis=0)
        d = np.linalg.norm((f[:, None] - others[None]) * vs, axis=2).min(axis=0)
        assert np.mean(d < 0.25 * 0.4) > 0.9  # the rest are found either way
    # measured: 0.042 um without the wall (started 0.24 um off), 0.72 with it
    assert near[None] < 0.25 * 0.4  # home, without the wall
    assert near[0.25] > 0.5 * 0.4  # held, then removed


def test_centres_are_reported_in_their_starts_z_gauge(sim):
    """A common z shift of the centres and the opposite shift of the PSF give the same
    image (L = 1, as in refine; exact for a whole voxel), so refine fixes that gauge: the
    interior starts' mean z displacement (10% trimmed at each end, ``refine.GAUGE_TRIM``)
    is 0, and the result differs from the ungauged one by that one z shift only."""
    import dataclasses

    from scipy.stats import trim_mean

    from difftrack.metrics import match
    from difftrack.refine import GAUGE_TRIM
    from difftrack.render import Background

    def gauge_of(dz):
        return trim_mean(dz, GAUGE_TRIM)

    p, g = sim.params, sim.geometry
    p = Params(p.particles, p.psf, Background(p.background.offset, jnp.zeros_like(p.background.illum)))
    q = Params(Particles(p.particles.pos.at[:, 0].add(-1.0), p.particles.radius, p.particles.amplitude),
               dataclasses.replace(p.psf, z_offset=p.psf.z_offset + sim.voxel_size[0]), p.background)
    a, b = np.asarray(render(p, g)), np.asarray(render(q, g))
    assert np.abs(a - b).max() < 1e-4 * np.ptp(a)

    t = sim.truth[["z", "y", "x"]].to_numpy()
    t = t[np.all((t >= -0.5) & (t <= np.asarray(sim.image.shape) - 0.5), axis=1)]
    out = {}
    for gauge in (True, False):
        res = refine_positions(sim.image, t, voxel_size=sim.voxel_size, radius=0.4, max_rounds=1,
                               steps=60, shape_steps=30, polish=0, gauge=gauge)
        out[gauge] = res
    f, f0 = (out[k].particles[["z", "y", "x"]].to_numpy() for k in (True, False))
    dz = out[True].stats["gauge_shift"]
    # every fitted centre, those outside the stack too (the tables list the inside ones,
    # and the shift can carry a centre within |dz| of a face across it)
    m, m0 = (np.asarray(out[k].model.params.particles.pos) for k in (True, False))
    np.testing.assert_allclose(m[:, 1:], m0[:, 1:], atol=1e-5)
    np.testing.assert_allclose(m[:, 0], m0[:, 0] - dz, atol=1e-4)
    i, j = match(f, t, cutoff=0.4, voxel_size=sim.voxel_size)

    def interior(res):  # the gauge's starts: one radius (the first shape fit's) from every face
        r_vox = res.stats["gauge_radius"] / np.asarray(sim.voxel_size)
        return np.all((t[j] >= r_vox - 0.5) & (t[j] <= np.asarray(sim.image.shape) - 0.5 - r_vox), axis=1)

    inner = interior(out[True])
    assert inner.sum() >= 10
    assert abs(gauge_of(f[i][inner, 0] - t[j][inner, 0])) < 1e-3
    # the ungauged fit drifted by the shift (measured: -0.011 voxel here)
    assert abs(gauge_of(f0[i][inner, 0] - t[j][inner, 0]) - dz) < 1e-3
    # the default learns the PSF's free-form grid, which the gauge moved too
    # (``PSF.shifted_z``: the two runs above differ by the shift only); the same gauge with
    # the Gaussians alone
    assert out[True].model.psf.log_grid is not None
    res = refine_positions(sim.image, t, voxel_size=sim.voxel_size, radius=0.4, max_rounds=1,
                           steps=60, shape_steps=30, polish=0, psf_grid=False)
    fg = res.particles[["z", "y", "x"]].to_numpy()
    i, j = match(fg, t, cutoff=0.4, voxel_size=sim.voxel_size)
    inner = interior(res)
    assert res.model.psf.log_grid is None and inner.sum() >= 10
    assert abs(gauge_of(fg[i][inner, 0] - t[j][inner, 0])) < 1e-3
    # the grid is no better with these short fits (30 shape steps for ~400 more parameters;
    # measured chi^2 per voxel 1.945 against 1.839 without it, before the grid was the
    # default), but not broken
    assert out[True].stats["chi2_per_voxel"] < 1.1 * res.stats["chi2_per_voxel"]


def test_the_gauge_shift_moves_the_psf_grid_too(sim):
    """With a free-form grid, a whole-voxel z shift of the centres and ``PSF.shifted_z`` of
    the PSF leave the image as it was; moving the Gaussians alone does not."""
    import dataclasses

    from difftrack.render import Background

    p, g = sim.params, sim.geometry
    rng = np.random.default_rng(4)
    psf = p.psf.with_grid((3, 2, 2))
    psf = dataclasses.replace(psf, log_grid=jnp.asarray(rng.normal(0, 0.5, (7, 5, 5)), jnp.float32))
    bg = Background(p.background.offset, jnp.zeros_like(p.background.illum))
    a = np.asarray(render(Params(p.particles, psf, bg), g))
    moved = Particles(p.particles.pos.at[:, 0].add(-1.0), p.particles.radius, p.particles.amplitude)
    vz = sim.voxel_size[0]
    b = np.asarray(render(Params(moved, psf.shifted_z(vz, vz), bg), g))
    c = np.asarray(render(Params(moved, dataclasses.replace(psf, z_offset=psf.z_offset + vz), bg), g))
    assert np.abs(a - b).max() < 1e-4 * np.ptp(a)
    assert np.abs(a - c).max() > 100 * np.abs(a - b).max()


def test_refine_adds_nothing_to_pure_noise():
    rng = np.random.default_rng(2)
    image = rng.poisson(20.0, (12, 24, 28)).astype(np.uint16) + 100
    res = refine_positions(image, [[6.0, 12.0, 14.0], [6.0, 5.0, 5.0]], voxel_size=(0.2, 0.1, 0.1),
                           radius=0.4, invert=False, max_rounds=2, steps=30, shape_steps=30,
                           polish=0)
    assert res.stats["added"] == 0
    assert np.all(np.isfinite(res.particles[["z", "y", "x"]].to_numpy()))


def test_refine_recovers_deleted_particles(sim, monkeypatch):
    # the experimental fresh-tails restart of the first round's shape fit (off by
    # default) is switched on here, so that its path runs too
    import importlib

    monkeypatch.setattr(importlib.import_module("difftrack.refine"), "TAIL_RESTART", True)
    t = sim.truth[["z", "y", "x"]].to_numpy()
    t = t[np.all((t >= -0.5) & (t <= np.asarray(sim.image.shape) - 0.5), axis=1)]
    rng = np.random.default_rng(0)
    start = t + rng.uniform(-0.3, 0.3, t.shape)
    start = start[rng.random(len(start)) > 0.1]
    res = refine_positions(sim.image, np.clip(start, -0.5, np.asarray(sim.image.shape) - 0.5),
                           voxel_size=sim.voxel_size, radius=0.4, max_rounds=3, steps=60,
                           shape_steps=60, polish=0)
    df = res.particles
    assert res.stats["added"] >= 1
    # every fit is logged in order: the first shape fit, then one shape fit per round
    # before its joint fit; the joint fits' steps add up to stats["steps"]
    kinds = [f[0] for f in res.stats["fits"]]
    assert kinds[0] == "first shape fit" and kinds.count("joint fit") == res.stats["joint_fits"]
    assert sum(f[1] for f in res.stats["fits"] if f[0] == "joint fit") == res.stats["steps"]
    assert all(f[1] >= 1 and f[2] >= 0 for f in res.stats["fits"])
    # the first round's shape fit also ran from fresh tails (TAIL_RESTART) and kept the
    # lower of the two final losses: that one continues the history (the third entry:
    # what the fit from the PSF as it was still gained over its last steps)
    (as_is, fresh, gained), = res.stats["tail_restarts"]
    assert np.isfinite(as_is) and np.isfinite(fresh) and np.isfinite(gained)
    assert np.isclose(np.asarray(res.model.history), min(as_is, fresh), rtol=1e-9, atol=0).any()
    # the fits' kernel reaches KERNEL_REACH stds of the learned core: past 5 stds of the
    # true one, (0.25, 0.1, 0.1) um, never longer than fit_shape's (3.5 stds of PSF.init's
    # 4x tail of its starting guess), and shorter laterally
    g = res.model.geometry
    reach = np.asarray(g.kernel_half) * np.asarray(g.voxel_size) / np.asarray([0.25, 0.1, 0.1])
    assert np.all(reach >= 5), reach
    # fit_shape's starting guess here: one lateral voxel, 2.5x that along z
    first = make_geometry(sim.image.shape, sim.voxel_size, 0.4, PSF.init(0.1, 0.25))
    assert all(a <= b for a, b in zip(g.kernel_half, first.kernel_half)), (g.kernel_half, first.kernel_half)
    assert g.kernel_half[1] < first.kernel_half[1] and g.kernel_half[2] < first.kernel_half[2]
    assert g.margin == g.kernel_half
    # by default the PSF may be elliptic (psf_aspect, from round 1); the simulator's is
    # round, and the component carrying most of the light learns it round
    psf = res.model.params.psf
    assert psf.log_aspect is not None
    sy, sx = (np.asarray(v) for v in psf.lateral_sigmas())
    main = int(np.argmax(np.asarray(psf.weights)))
    assert 1 / 1.25 < sx[main] / sy[main] < 1.25, (sx / sy, np.asarray(psf.weights))
    assert {"z", "y", "x", "sigma_z", "sigma_y", "sigma_x", "amplitude", "radius", "quality",
            "z_um", "y_um", "x_um"} <= set(df.columns)
    from difftrack import score

    s = score(df[["z", "y", "x"]].to_numpy(), t, radius=0.4, voxel_size=sim.voxel_size,
              shape=sim.image.shape)
    # measured 0.86 / 0.95 with these short settings; issue 4 targets 0.995 (not met yet)
    assert s.recall >= 0.8 and s.precision >= 0.9
    assert np.all(df[["sigma_z", "sigma_y", "sigma_x"]].to_numpy() > 0)


def test_refine_bad_input():
    with pytest.raises(ValueError, match="empty"):
        refine_positions(np.random.default_rng(0).normal(size=(6, 8, 8)), np.zeros((0, 3)))
    with pytest.raises(ValueError, match="outside_penalty"):
        refine_positions(np.random.default_rng(0).normal(size=(6, 8, 8)), [[3.0, 4.0, 4.0]],
                         outside_penalty=0.0)
    with pytest.raises(ValueError, match="outside"):
        refine_positions(np.random.default_rng(0).normal(size=(6, 8, 8)), [[30.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="max_move"):
        refine_positions(np.random.default_rng(0).normal(size=(6, 8, 8)), [[3.0, 4.0, 4.0]],
                         max_move=0.0)
    with pytest.raises(ValueError, match="add_passes"):
        refine_positions(np.random.default_rng(0).normal(size=(6, 8, 8)), [[3.0, 4.0, 4.0]],
                         add_passes=0)
    with pytest.raises(ValueError, match="psf_depth"):
        refine_positions(np.random.default_rng(0).normal(size=(6, 8, 8)), [[3.0, 4.0, 4.0]],
                         psf_depth="widths")
    # every start on a face, where the shape fit leaves the light out: nothing to learn from
    # (before the check: 43 face starts of this stack ended as 1 particle after 2,524 additions)
    image = np.random.default_rng(0).poisson(20.0, (16, 28, 32)).astype(np.uint16)
    with pytest.raises(ValueError, match="all 3 positions lie within the border") as err:
        refine_positions(image, [[-0.5, 14.0, 16.0], [15.5, 3.0, 5.0], [8.0, 0.0, 16.0]],
                         voxel_size=(0.2, 0.1, 0.1), radius=0.4, invert=False)
    # the advice names what refine's caller can change: refine has no ``border``
    assert "starting position farther inside" in str(err.value) and "``border``" not in str(err.value)
    with pytest.raises(ValueError, match=r"or a smaller border \(``border``\)"):  # fit_shape's own
        fit_shape(image, [[-0.5, 14.0, 16.0]], voxel_size=(0.2, 0.1, 0.1), radius=0.4, invert=False)


def test_whitening_makes_each_particles_own_curvature_the_identity(sim):
    # the joint and shape fits run at u with (z, y, x, amplitude, radius) = base + M u,
    # M M^T the inverse of the particle's own Fisher block (from the unit tables): the
    # exact curvature of chi^2 / 2 in u must then be close to the identity
    import jax

    from difftrack.fisher import own_blocks

    p, g = sim.params, sim.geometry
    w = jnp.asarray(1.0 / sim.noise_variance, jnp.float32)
    pos = np.asarray(p.particles.pos)
    interior = np.flatnonzero(np.all((pos > 3) & (pos < np.asarray(g.shape) - 4), axis=1))
    for i in interior[:3]:
        F = own_blocks(p, np.asarray([i]), np.asarray(w), g)[0]
        M = jnp.asarray(np.linalg.inv(np.linalg.cholesky(F)).T, jnp.float32)

        def image(u, i=i, M=M):
            th = M @ u
            q = p.particles
            parts = Particles(q.pos.at[i].add(th[:3]), q.radius.at[i].add(th[4]),
                              q.amplitude.at[i].add(th[3]))
            return render(Params(parts, p.psf, p.background), g)

        m0 = image(jnp.zeros(5, jnp.float32))
        grad = jax.jit(jax.grad(lambda u, image=image, m0=m0: jnp.sum(w * (image(u) - m0) ** 2)))
        eps = 0.05  # the noiseless residual is zero at u = 0: the Hessian is 2 J^T W J
        H = np.stack([np.asarray(grad(eps * e) - grad(-eps * e)) / (4 * eps)
                      for e in jnp.eye(5, dtype=jnp.float32)])
        ev = np.linalg.eigvalsh(0.5 * (H + H.T))
        # the tables are made at one sub-voxel offset with the mean weight around the
        # particle: within tens of percent, where the raw blocks span orders of magnitude
        assert 0.6 < ev.min() and ev.max() < 1.7, ev
        assert np.linalg.cond(F) > 100


def test_joint_fits_first_step_is_about_a_newton_step(sim):
    # the whitened loss is chi^2 / 2 with about unit curvature per particle: its plain
    # negative gradient (L-BFGS's first step) undoes one particle's displacement to within
    # tens of percent (per voxel, as it used to be, that step was ~1e-5 of it and the fit
    # could stop before it had started)
    import jax

    from difftrack.fisher import own_blocks
    from difftrack.refine import _offset_scales, _whitened_loss

    p, g = sim.params, sim.geometry
    data = render(p, g)
    w = jnp.asarray(1.0 / sim.noise_variance, jnp.float32)
    pos = np.asarray(p.particles.pos)
    n = len(pos)
    i = int(np.argmin(np.linalg.norm(pos - np.asarray(g.shape) / 2, axis=1)))
    shift = np.asarray([0.2, -0.3, 0.3], np.float32)
    base = (p.particles.pos.at[i].add(shift), p.particles.radius, p.particles.amplitude, p.background)
    F = own_blocks(p, np.arange(n), np.asarray(w), g)
    M = jnp.asarray(np.swapaxes(np.linalg.inv(np.linalg.cholesky(F)), 1, 2), jnp.float32)
    s_off = _offset_scales(p, w, g)
    static = (g, ((-50.0,) * 3, (50.0,) * 3), 0.7)
    args = (p.psf, data, w, jnp.ones(n, jnp.float32), jnp.zeros((8, 2), jnp.int32),
            jnp.zeros(8, jnp.float32), jnp.asarray([0.1, 1.0, 0.0, 1e6], jnp.float32))
    u0 = (jnp.zeros((n, 5), jnp.float32), jnp.zeros_like(s_off))
    grad = jax.grad(lambda u: _whitened_loss(u, base, M, s_off, base[0], *args, static=static))(u0)
    step = np.asarray(M[i] @ -grad[0][i])
    np.testing.assert_allclose(step[:3], -shift, atol=0.35 * np.abs(shift).max())


def test_gain_map_finds_a_missing_particle_beyond_a_face(sim):
    """A particle centred ~2 z voxels beyond the stack's first slice puts only a few % of
    its light energy inside; the addition must still see it (without it the particles
    just inside are pulled towards the face), and pure noise must still add nothing."""
    p, g = sim.params, sim.geometry
    data = sim.image.astype(np.float32) - 100.0
    w = (1.0 / sim.noise_variance).astype(np.float32)
    penalty = 5 * math.log(data.size)
    pos = np.asarray(p.particles.pos)
    shape = np.asarray(data.shape)
    beyond = -0.5 - pos[:, 0]
    lateral = np.all((pos[:, 1:] >= 4) & (pos[:, 1:] <= shape[1:] - 5), axis=1)
    cand = np.flatnonzero(lateral & (beyond > 1.3) & (beyond < 2.2))
    assert len(cand)
    i = cand[np.argmax(np.asarray(p.particles.amplitude)[cand])]
    q = Params(Particles(p.particles.pos, p.particles.radius, p.particles.amplitude.at[i].set(0.0)),
               p.psf, p.background)
    r = data - np.asarray(render(q, g))
    reach = (4, 0, 0)

    def best_z(min_inside):  # where the gain map is highest near the particle, and how high
        gmap, _ = _gain_map(jnp.asarray(w * r), jnp.asarray(w), q, g, 0.4, 1.0, reach, min_inside)
        k = np.round(pos[i]).astype(int) + np.asarray(reach)
        col = gmap[:, k[1] - 1:k[1] + 2, k[2] - 1:k[2] + 2].max(axis=(1, 2))[: k[0] + 4]
        return int(np.argmax(col)) - reach[0], float(col.max())

    z, gain = best_z(0.02)  # the default: the candidate goes where the particle is
    assert gain > penalty and abs(z - pos[i, 0]) < 1.0
    z_old, _ = best_z(0.1)  # the old threshold put it a voxel and more inside (measured
    assert abs(z_old - pos[i, 0]) > 1.0  # -1 for a particle at -2.48), next to its neighbour
    rng = np.random.default_rng(3)
    noise = rng.standard_normal(data.shape).astype(np.float32) * np.sqrt(sim.noise_variance)
    gmap, _ = _gain_map(jnp.asarray(w * noise), jnp.asarray(w), q, g, 0.4, 1.0, reach)
    assert gmap.max() < penalty
    # centres beyond the faces pay less (they are never listed), still more than noise gives
    centres = np.stack(np.meshgrid(*[np.arange(k) - o for k, o in zip(gmap.shape, reach)],
                                   indexing="ij"), axis=-1)
    beyond = _penalty_at(centres, data.shape, penalty) < penalty
    assert beyond.sum() == 2 * 4 * data.shape[1] * data.shape[2]  # the 4 slices beyond each z face
    assert gmap[beyond].max() < OUTSIDE_PENALTY * penalty


def test_starved_psf_components_are_revived():
    """A component the softmax has starved (weight < DEAD_WEIGHT) gets REVIVED_WEIGHT back,
    as a wider tail of the strongest one; the others keep their ratios; a PSF with no
    starved component is returned as it is."""
    import dataclasses

    from difftrack.refine import DEAD_WEIGHT, REVIVED_WEIGHT, _revive_components
    from difftrack.shape import PSF

    alive = PSF.init(0.1, 0.28)
    assert _revive_components(alive) is alive
    # the bright PERI stack's collapsed PSF (seed 3): weights 0.998 / 0.0015 / 0.0007
    starved = dataclasses.replace(alive, logit_weight=jnp.asarray([2.74, -3.78, -4.57]),
                                  z_offset=jnp.asarray([0.13, 2.44, 0.12]))
    assert np.sum(np.asarray(starved.weights) < DEAD_WEIGHT) == 2
    p = _revive_components(starved)
    np.testing.assert_allclose(p.weights, [1 - 2 * REVIVED_WEIGHT, REVIVED_WEIGHT, REVIVED_WEIGHT],
                               rtol=1e-5)
    np.testing.assert_allclose(np.exp(p.log_sigma_xy), [0.1, 0.2, 0.4], rtol=1e-5)
    np.testing.assert_allclose(np.exp(p.log_sigma_z), [0.28, 0.56, 1.12], rtol=1e-5)
    np.testing.assert_allclose(p.z_offset, [0.13, 0.13, 0.13], rtol=1e-5)
    # two live components keep their ratio
    two = dataclasses.replace(alive, logit_weight=jnp.log(jnp.asarray([0.6, 0.395, 0.005])))
    q = _revive_components(two)
    w = np.asarray(q.weights)
    np.testing.assert_allclose(w[2], REVIVED_WEIGHT, rtol=1e-5)
    np.testing.assert_allclose(w[0] / w[1], 0.6 / 0.395, rtol=1e-5)
    np.testing.assert_allclose(q.log_sigma_xy[:2], two.log_sigma_xy[:2])
    # widths that change with depth: the revived tail changes as the strongest component
    deep = dataclasses.replace(starved.with_depth(), depth_log_sigma_xy=jnp.asarray([0.1, -0.5, 0.7]),
                               depth_log_sigma_z=jnp.asarray([0.2, 0.9, -0.3]),
                               depth_z_offset=jnp.asarray([0.05, -0.4, 0.3]))
    d = _revive_components(deep)
    np.testing.assert_allclose(d.depth_log_sigma_xy, [0.1, 0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(d.depth_log_sigma_z, [0.2, 0.2, 0.2], rtol=1e-6)
    np.testing.assert_allclose(d.depth_z_offset, [0.05, 0.05, 0.05], rtol=1e-6)
    np.testing.assert_allclose(d.weights, p.weights, rtol=1e-6)


def test_fresh_tails_keep_only_the_strongest_component():
    """``_fresh_tails`` keeps the strongest component (widths, offset, depth change) and
    puts every other one back as PSF.init's tails of it, weights 0.85 / 0.15 shared; a
    one-component PSF is returned as it is."""
    import dataclasses

    from difftrack.refine import _fresh_tails
    from difftrack.shape import PSF

    # a jittered start's learned PSF: a starved tail far below, a thin sheet with 19%
    basin = dataclasses.replace(PSF.init(0.1, 0.28), logit_weight=jnp.log(jnp.asarray([0.19, 0.793, 0.017])),
                                log_sigma_xy=jnp.log(jnp.asarray([0.3, 0.12, 0.37])),
                                log_sigma_z=jnp.log(jnp.asarray([0.08, 0.3, 0.5])),
                                z_offset=jnp.asarray([-0.8, 0.05, -0.5]))
    p = _fresh_tails(basin)
    np.testing.assert_allclose(p.weights, [0.075, 0.85, 0.075], rtol=1e-5)
    np.testing.assert_allclose(np.exp(p.log_sigma_xy), [0.24, 0.12, 0.48], rtol=1e-5)
    np.testing.assert_allclose(np.exp(p.log_sigma_z), [0.6, 0.3, 1.2], rtol=1e-5)
    np.testing.assert_allclose(p.z_offset, [0.05, 0.05, 0.05], rtol=1e-5)
    deep = dataclasses.replace(basin.with_depth(), depth_log_sigma_xy=jnp.asarray([0.4, 0.1, -0.2]),
                               depth_log_sigma_z=jnp.asarray([0.5, 0.2, 0.0]))
    d = _fresh_tails(deep)
    np.testing.assert_allclose(d.depth_log_sigma_xy, [0.1, 0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(d.depth_log_sigma_z, [0.2, 0.2, 0.2], rtol=1e-6)
    one = PSF.init(0.1, 0.28, n_components=1)
    assert _fresh_tails(one) is one


def test_a_large_particle_may_lie_as_far_out_as_its_light_reaches():
    """With the kernel cut to KERNEL_REACH stds of a sharp PSF, a centre may still lie a
    radius plus 3 stds outside the stack (its light then just reaches in): R = 7 voxels,
    lateral std 0.8 voxel, where the kernel alone reaches less."""
    psf = PSF.init(0.08, 0.2, n_components=1)
    geom = _learned_kernel(make_geometry((20, 40, 40), (0.1, 0.1, 0.1), 0.7, psf), psf)
    assert geom.kernel_half[1] < 7 + 3 * 0.8  # the margin alone would pin it short
    assert np.all(np.asarray(_outside_reach(geom)) >= np.asarray([7 + 3 * 2.0, 7 + 3 * 0.8, 7 + 3 * 0.8]))


def _merged_pair_stack(dark=False, axis=(1.0, 0.0, 0.0)):
    """Two touching particles 0.84 um apart along ``axis`` (z by default; R 0.4 um) under a
    PSF 3x longer along z, and six lone ones, rendered with Poisson and read noise;
    ``dark``: dye-excluding particles on a bright background."""
    from difftrack.render import Background, Geometry
    from difftrack.simulate import default_psf, psf_extent

    vs, shape = (0.2, 0.1, 0.1), (20, 28, 28)
    psf = default_psf(vs, 0.4, elongation=3.0)
    geom = Geometry.make(shape, vs, max_radius=0.48, psf_extent=psf_extent(psf),
                         bg_degree=(1, 1, 1), illum_degree=(1, 1, 1))
    c = np.array([9.5, 13.5, 13.5])
    off = 0.42 * np.asarray(axis) / np.linalg.norm(axis) / np.asarray(vs)
    pos = np.array([c - off, c + off, [9.5, 5.0, 5.0], [9.5, 22.0, 6.0],
                    [9.5, 6.0, 22.0], [9.5, 22.0, 22.0], [3.0, 13.5, 4.5], [16.0, 13.5, 22.5]])
    params = Params(Particles(jnp.asarray(pos, jnp.float32), jnp.full(len(pos), 0.4, jnp.float32),
                              jnp.full(len(pos), -100.0 if dark else 100.0, jnp.float32)),
                    psf, Background.constant(150.0 if dark else 10.0, geom))
    lam = np.clip(np.asarray(render(params, geom), np.float64), 0, None)
    rng = np.random.default_rng(0)
    image = np.clip(np.rint(rng.poisson(lam) + 2.0 * rng.standard_normal(lam.shape) + 100), 0, 65535)
    return image.astype(np.uint16), pos, vs, psf, c


def _refine_merged(stack, steps=30, shape_steps=20, **kw):
    """``refine_positions`` on a ``_merged_pair_stack`` from one start between the pair and
    the lone particles' true centres (the PSF held, 3 rounds, no polish)."""
    image, pos, vs, psf, c = stack
    start = np.concatenate([c[None], pos[2:]])
    return refine_positions(image, start, voxel_size=vs, radius=0.4, psf=psf, max_rounds=3,
                            steps=steps, shape_steps=shape_steps, polish=0, **kw)


def _found(res, pos, vs):
    """(found centres, each true centre's distance to the nearest found one, physical)."""
    f = res.particles[["z", "y", "x"]].to_numpy()
    return f, [np.linalg.norm((f - p) * vs, axis=1).min() for p in pos]


def test_a_pair_merged_along_z_is_split():
    """One start between two touching z neighbours: the fit holds it there (the light is
    symmetric), and the addition cannot put a particle so close to it. The split move
    replaces it by two, which pay by far more than the penalty; without it the pair stays
    one particle."""
    stack = _merged_pair_stack()
    image, pos, vs, psf, c = stack
    res = _refine_merged(stack)
    f, d = _found(res, pos, vs)
    # measured: every particle within 0.007 um; the split's gain 3,400 (penalty 45)
    assert len(f) == len(pos) and max(d) < 0.1 * 0.4, d
    assert res.stats["splits_kept"] == 1
    (z, y, x, gain, rivals, parts, kept), = [s for s in res.stats["split_log"] if s[-1]]
    assert np.linalg.norm((np.array([z, y, x]) - c) * vs) < 0.1 and gain > 0 and parts == 2
    res = _refine_merged(stack, split=False)
    f = res.particles[["z", "y", "x"]].to_numpy()
    # measured: 7 particles, the pair's found 0.35 and 0.49 um off
    assert len(f) == len(pos) - 1
    assert min(np.linalg.norm((f - pos[0]) * vs, axis=1).min(),
               np.linalg.norm((f - pos[1]) * vs, axis=1).min()) > 0.5 * 0.4


@pytest.mark.parametrize("axis", [(1, 0, 0), (0, 0, 1), (1, 0, 1), (1, -1, 1), (0.3, 1, 0)])
def test_split_axis_is_the_pairs_axis(axis):
    """The residual of a pair fitted as one between them (the same light, spread wider)
    has its excess second moment along the pair's axis, whatever the PSF's elongation."""
    from difftrack.refine import _split_axis

    v = np.array([0.2, 0.1, 0.1])
    shape, c = (24, 40, 40), np.array([11.5, 19.5, 19.5])
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    X = np.stack([zz, yy, xx], -1) * v
    u = np.asarray(axis, float) / np.linalg.norm(axis)

    def blob(p, s):  # a Gaussian with stds s (physical), unit light
        q = np.sum(((X - p * v) / s) ** 2, -1)
        return np.exp(-0.5 * q) / np.prod(s)

    psf = np.array([0.36, 0.12, 0.12])  # 3x longer along z
    data = blob(c + 0.42 * u / v, psf) + blob(c - 0.42 * u / v, psf)
    fit = 2.0 * blob(c, np.sqrt(psf ** 2 + 0.1 ** 2))  # wider: a larger radius
    rng = np.random.default_rng(0)
    resid = data - fit + 0.02 * data.max() * rng.standard_normal(shape)
    h = np.ceil(2 * 0.4 / v) + 2  # refine's split box
    box = tuple(slice(int(a - b), int(a + b + 1)) for a, b in zip(c, h))
    got = _split_axis(resid, box, c, v, 0.4)
    # measured: within 1.8 degrees of the pair's axis (10-11 degrees off for the
    # diagonal ones with a window of 2 radii)
    assert abs(got @ u) > np.cos(np.radians(4)), (got, u)


def test_light_centres_are_the_particles_a_fat_one_holds():
    """Three touching particles (a triangle across z, as dark PERI seed 4's void) whose
    light one large particle took: a k-means of the light they leave unexplained, 3
    centres, puts one on each; the noise and the light of the box's corners around them
    do not move it far."""
    from difftrack.refine import _light_centres

    v = np.array([0.2, 0.1, 0.1])
    shape, c = (24, 40, 40), np.array([11.5, 19.5, 19.5])
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    X = np.stack([zz, yy, xx], -1) * v
    R = 0.4
    dirs = np.array([[1.0, 0.0, 0.0], [-0.5, 0.87, 0.0], [-0.5, -0.43, 0.75]])
    true = c + R * 1.15 * dirs / np.linalg.norm(dirs, axis=1, keepdims=True) / v
    psf = np.array([0.3, 0.1, 0.1])
    light = sum(np.exp(-0.5 * np.sum(((X - p * v) / np.sqrt(psf ** 2 + (R / 2) ** 2)) ** 2, -1))
                for p in true)
    rng = np.random.default_rng(1)
    light = light + 0.05 * rng.standard_normal(shape)
    h = np.ceil(2 * R / v) + 2  # refine's split box
    box = tuple(slice(int(a - b), int(a + b + 1)) for a, b in zip(c, h))
    got = _light_centres(light, box, c, v, 1.5 * R + 0.5 * R, 3)
    d = np.linalg.norm((got[:, None] - true[None]) * v, axis=2)
    # measured: each true centre has its own, 0.048-0.064 um (0.12-0.16 R) away (the
    # blurred light of each pulls the others' centres towards the middle; the fit goes on)
    assert sorted(d.argmin(axis=0).tolist()) == [0, 1, 2] and d.min(axis=0).max() < 0.25 * R, d
    assert np.array_equal(got, _light_centres(light, box, c, v, 2 * R, 3))  # deterministic
    assert _light_centres(-np.abs(light), box, c, v, 2 * R, 3) is None  # no light: none


@pytest.mark.slow
def test_a_pair_merged_across_z_is_split_along_its_axis(monkeypatch):
    """A pair diagonal in z-x fitted as one between them: split along the residual's own
    axis (``SPLIT_AXIS`` = "residual", experimental), both are found; split along z (the
    default), the split is kept but far from the true pair. (Slow: ~1 min; the option is
    off by default, docs/refine.md, twenty-fifth session.)"""
    import importlib

    R = importlib.import_module("difftrack.refine")
    monkeypatch.setattr(R, "SPLIT_AXIS", "residual")
    stack = _merged_pair_stack(axis=(1.0, 0.0, 1.0))
    image, pos, vs, psf, c = stack
    # (with 30 / 20 steps the held-PSF fits of this tiny stack do not settle and the
    # first round removes everything, split or not)
    kw = dict(steps=60, shape_steps=60)
    res = _refine_merged(stack, **kw)
    f, d = _found(res, pos, vs)
    # measured: every particle within 0.011 um; the one split tried kept (gain 5,821)
    assert len(f) == len(pos) and max(d) < 0.1 * 0.4, d
    assert res.stats["splits_kept"] == 1
    monkeypatch.setattr(R, "SPLIT_AXIS", "z")
    res = _refine_merged(stack, **kw)
    f, d = _found(res, pos[:2], vs)
    # measured: 6 particles, the pair's found 0.98 and 1.0 um off (the split kept, gain 2,512:
    # better than one particle, worse than the right pair)
    assert min(d) > 0.5 * 0.4, d


def test_a_particle_too_large_is_split(monkeypatch):
    """The radius trigger alone (the quality trigger off): dark particles merged along z
    take the pair's light partly by a larger radius (0.41 um, measured, against 0.39-0.40
    for the lone ones); with ``SPLIT_RADIUS`` lowered so that it counts as too large, the
    merged particle is split and both are found; at the default (3 prior stds) it is not
    (the dark PERI stack's case is a radius 1.5x the median: docs/refine.md)."""
    import importlib

    R = importlib.import_module("difftrack.refine")
    monkeypatch.setattr(R, "SPLIT_QUALITY", np.inf)
    stack = _merged_pair_stack(dark=True)
    image, pos, vs, psf, c = stack
    res = _refine_merged(stack)
    f = res.particles[["z", "y", "x"]].to_numpy()
    # measured: 7 particles, the merged one 0.39 and 0.45 um from the pair, radius 0.412
    assert len(f) == len(pos) - 1 and res.stats["splits_tried"] == 0
    monkeypatch.setattr(R, "SPLIT_RADIUS", 0.1)
    res = _refine_merged(stack)
    f, d = _found(res, pos, vs)
    # measured: every particle within 0.021 um; the one split tried, the pair's, kept (gain 1,033)
    assert len(f) == len(pos) and max(d) < 0.1 * 0.4, d
    kept = [s for s in res.stats["split_log"] if s[-1]]
    assert any(np.linalg.norm((np.array(s[:3]) - c) * vs) < 0.1 for s in kept)


def _dark_peri_start(seed):
    """(the dark PERI dev stack, the benchmark's own degraded start of ``seed``:
    ``benchmarks/refine_dev.py``); skips without ../shared/data/dev."""
    from difftrack import read_stack

    name = "dev_peri_r3_phi50_dark"
    if not (DEV / f"{name}.tif").is_file():
        pytest.skip("../shared/data/dev is absent")
    image = read_stack(DEV / f"{name}.tif").image
    spec = importlib.util.spec_from_file_location("refine_dev", BENCHMARKS / "refine_dev.py")
    refine_dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(refine_dev)
    start = refine_dev.degraded_start(pd.read_csv(DEV / f"{name}.csv"), image.shape,
                                      np.random.default_rng(seed))
    return image, start


@pytest.mark.slow
def test_a_kept_split_is_not_removed_for_where_it_was_guessed():
    """Dark PERI, the benchmark's degraded start of seed 1 (``benchmarks/refine_dev.py``):
    a particle fitted between two touching true ones is split along z and the pair kept;
    the split guessed one of them 3.2 voxels from where it belongs, and while its trust
    region was centred on that guess the removal after the judge took it for stuck (0.5
    voxel short of the true centre) and the merged particle came back for good. Both true
    particles are found. (Slow: ~2.5 min; needs ../shared/data/dev.)"""
    from difftrack import match

    image, start = _dark_peri_start(1)
    res = refine_positions(image, start, radius=3.0)
    f = res.particles[["z", "y", "x"]].to_numpy()
    pair = np.array([[13.80, 34.51, 19.02], [18.27, 34.49, 15.14]])  # 5.9 voxels apart
    i, j = match(f, pair, cutoff=1.0)
    # measured: both within 0.5 voxel (before: one particle 2.9 voxels from each)
    assert sorted(j.tolist()) == [0, 1], f[np.linalg.norm(f - pair.mean(0), axis=1) < 6]
    assert any(s[-1] and np.linalg.norm(np.array(s[:3]) - [14.2, 34.3, 18.1]) < 1.0
               for s in res.stats["split_log"])  # the merged one's split, kept


@pytest.mark.slow
def test_a_void_held_by_fat_particles_is_refilled():
    """Dark PERI, the benchmark's degraded start of seed 4: a void of missing particles at
    depth, 2-3 radii from the bottom face, was held by particles of radius 4.1-4.5 (the
    median 3.0) sliding between the true ones' light (recall 0.975). A particle 1.3x the
    median radius is split into as many as its volume holds, at the centres of a k-means
    of its light, down to a radius from the faces. (Slow: ~3-4 min; needs
    ../shared/data/dev.)"""
    from difftrack import match

    image, start = _dark_peri_start(4)
    res = refine_positions(image, start, radius=3.0)
    f = res.particles[["z", "y", "x"]].to_numpy()
    void = np.array([[33.22, 35.21, 31.80], [36.70, 32.74, 27.48], [40.51, 33.64, 22.74]])
    i, j = match(f, void, cutoff=2.0)
    # measured: all three, 0.7-1.5 voxel off (z at this depth); before, none nearer than
    # 3 voxels, two particles of radius 4.1 and 4.5 among them
    assert sorted(j.tolist()) == [0, 1, 2], f[np.linalg.norm(f - void.mean(0), axis=1) < 8]
    assert any(s[-1] and np.linalg.norm(np.array(s[:3]) - void.mean(0)) < 8
               for s in res.stats["split_log"]), res.stats["split_log"]  # a fat one's, kept


def test_splits_never_keep_a_particle_that_is_not_there(sim, monkeypatch):
    """From the true centres inside the stack, with every interior particle of at least
    the median radius and above the median quality proposed for a split
    (``SPLIT_QUALITY = 0``, down to a radius from the faces): every split is put back,
    every particle found is a true one (the truth includes the particles beyond the
    faces, which the addition puts in), and every true one a radius from the faces (where
    splits are tried) is found once."""
    import importlib

    R = importlib.import_module("difftrack.refine")
    monkeypatch.setattr(R, "SPLIT_QUALITY", 0.0)
    # splits tried down to a radius from the faces (the default margin leaves this tiny
    # stack's interior too small to try any): the judge alone must reject them
    monkeypatch.setattr(R, "SPLIT_FACE_MARGIN", 1.0)
    t = sim.truth[["z", "y", "x"]].to_numpy()
    vs = np.asarray(sim.voxel_size)
    inside = np.all((t >= -0.5) & (t <= np.asarray(sim.image.shape) - 0.5), axis=1)
    res = refine_positions(sim.image, t[inside], voxel_size=sim.voxel_size, radius=0.4,
                           psf=sim.params.psf, max_rounds=3, steps=30, shape_steps=20, polish=0)
    # measured: 2 tried (their boxes must not overlap: few fit in this tiny stack), 0 kept
    assert res.stats["splits_tried"] >= 2 and res.stats["splits_kept"] == 0
    f = res.particles[["z", "y", "x"]].to_numpy()
    d = np.linalg.norm((f[:, None] - t[None]) * vs, axis=2)
    assert d.min(axis=1).max() < 0.5 * 0.4 and len(set(d.argmin(axis=1))) == len(f)
    deep = np.all((t >= 0.4 / vs - 0.5) & (t <= np.asarray(sim.image.shape) - 0.5 - 0.4 / vs), axis=1)
    assert d[:, deep].min(axis=0).max() < 0.5 * 0.4


def _periodic_sim(sim):
    """``sim``'s particles centred inside the stack, rendered with a periodic boundary
    (light wrapping around, balls cut at the faces), and the same noise model."""
    import dataclasses

    p, g = sim.params, sim.geometry
    gp = dataclasses.replace(g, periodic=True).with_kernel(g.kernel_half)
    pos = np.asarray(p.particles.pos)
    keep = np.all((pos >= -0.5) & (pos <= np.asarray(g.shape) - 0.5), axis=1)
    q = Params(Particles(p.particles.pos[keep], p.particles.radius[keep],
                         p.particles.amplitude[keep]), p.psf, p.background)
    model = np.asarray(render(q, gp))
    rng = np.random.default_rng(4)
    noise = rng.standard_normal(model.shape) * np.sqrt(sim.noise_variance)
    return (model + 100.0 + noise).astype(np.float32), q, gp  # the simulator's camera offset


def test_gain_map_with_a_periodic_boundary(sim):
    """With ``Geometry.periodic`` a centre may lie up to about a radius beyond a face (its
    ball is cut there and sheds light in), not as far as its blurred light reaches; the
    addition still finds a particle missing at a face (the gain map proposes with the
    open template, the fits judge with the periodic model), and noise adds nothing."""
    image, q, gp = _periodic_sim(sim)
    out = _outside_reach(gp)
    R = 0.4 * 1.35 / np.asarray(gp.voxel_size)  # the layout's largest radius, voxels
    assert np.all(np.asarray(out) >= np.floor(R)) and np.all(np.asarray(out) <= np.ceil(R) + 1), out
    assert np.all(np.asarray(out) < np.asarray(_outside_reach(sim.geometry)))
    w = (1.0 / sim.noise_variance).astype(np.float32)
    data = image - 100.0
    penalty = 5 * math.log(data.size)
    pos = np.asarray(q.particles.pos)
    shape = np.asarray(data.shape)
    lateral = np.flatnonzero(np.all((pos[:, 1:] >= 3) & (pos[:, 1:] <= shape[1:] - 4), axis=1))
    i = lateral[np.argmax(pos[lateral, 0])]  # the highest (z 13.4 of 16)
    q0 = Params(Particles(q.particles.pos, q.particles.radius, q.particles.amplitude.at[i].set(0.0)),
                q.psf, q.background)
    light = np.asarray(render(q, gp)) - np.asarray(render(q0, gp))
    assert light[:2].sum() > 0.2 * light[-2:].sum()  # its light wraps to the first slices
    r = data - np.asarray(render(q0, gp))
    gmap, _ = _gain_map(jnp.asarray(w * r), jnp.asarray(w), q0, gp, 0.4, 1.0, out)
    assert gmap.shape == tuple(shape + 2 * np.asarray(out))
    peak = np.asarray(np.unravel_index(np.argmax(gmap), gmap.shape)) - np.asarray(out)
    assert gmap.max() > 10 * penalty and np.all(np.abs(peak - pos[i]) <= 1.0), (peak, pos[i])
    rng = np.random.default_rng(3)
    noise = rng.standard_normal(data.shape).astype(np.float32) * np.sqrt(sim.noise_variance)
    gmap, _ = _gain_map(jnp.asarray(w * noise), jnp.asarray(w), q0, gp, 0.4, 1.0, out)
    assert gmap.max() < penalty


@pytest.mark.slow  # ~47 s on dev-cpu; the render and gain-map tests cover the mechanism
def test_refine_with_a_periodic_boundary(sim):
    """``boundary="periodic"`` end to end on a periodic stack: the missing particles are
    found, no centre lies farther beyond a face than ``_outside_reach`` allows, positions
    and sigmas are finite, and the fits ran on the stack alone (no margin). A bad
    ``boundary`` is named."""
    image, q, gp = _periodic_sim(sim)
    t = np.asarray(q.particles.pos)
    rng = np.random.default_rng(0)
    start = np.clip(t + rng.uniform(-0.3, 0.3, t.shape), -0.5, np.asarray(image.shape) - 0.5)
    start = start[rng.random(len(start)) > 0.1]
    with pytest.raises(ValueError, match="boundary"):
        refine_positions(image, start, voxel_size=sim.voxel_size, radius=0.4, boundary="wrap")
    res = refine_positions(image, start, voxel_size=sim.voxel_size, radius=0.4, max_rounds=2,
                           steps=40, shape_steps=40, polish=0, boundary="periodic")
    g = res.model.geometry
    assert g.periodic and g.canvas == image.shape and g.margin == (0, 0, 0)
    df = res.particles
    xyz = df[["z", "y", "x"]].to_numpy()
    assert np.all(np.isfinite(xyz)) and np.all(df[["sigma_z", "sigma_y", "sigma_x"]].to_numpy() > 0)
    all_pos = np.asarray(res.model.params.particles.pos)
    out = np.asarray(_outside_reach(g))
    assert np.all((all_pos >= -0.5 - out - 1e-3) & (all_pos <= np.asarray(image.shape) - 0.5 + out + 1e-3))
    assert res.stats["added"] >= 1
    from difftrack import score

    s = score(xyz, t, radius=0.4, voxel_size=sim.voxel_size, shape=image.shape)
    assert s.recall >= 0.8 and s.precision >= 0.9, s
