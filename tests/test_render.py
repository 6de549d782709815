"""The forward model: gradients, a brute-force reference, sub-voxel shifts, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal
from jax.test_util import check_grads

from difftrack.render import Background, Geometry, Params, Particles, render, validate
from difftrack.shape import PSF, _box_spline_cdf, voxel_ball


def reference(shape, vs, pos, R, psf, ss):
    """Brute force: the ball sampled ss x finer per axis, convolved numerically with the
    PSF sampled on the same fine grid, then binned to voxels."""
    coords = [((np.arange(n * ss) + 0.5) / ss - 0.5) for n in shape]
    Z, Y, X = np.meshgrid(*[(c - p) * v for c, p, v in zip(coords, pos, vs)], indexing="ij")
    ball = ((Z**2 + Y**2 + X**2) <= R**2).astype(np.float64)
    sz = float(np.max(np.exp(np.asarray(psf.log_sigma_z)) + np.abs(np.asarray(psf.z_offset))))
    sxy = float(np.max(np.exp(np.asarray(psf.log_sigma_xy))))
    half = [int(np.ceil(5 * e / (v / ss))) for e, v in zip((sz, sxy, sxy), vs)]
    ax = [np.arange(-h, h + 1) * v / ss for h, v in zip(half, vs)]
    K = np.asarray(psf.evaluate(ax[0][:, None, None], ax[1][None, :, None], ax[2][None, None, :]),
                   np.float64)
    conv = scipy.signal.fftconvolve(ball, K / K.sum(), mode="same")
    return conv.reshape(shape[0], ss, shape[1], ss, shape[2], ss).mean(axis=(1, 3, 5))


def one_particle(shape, vs, pos, R, psf, amp=1.0, level=0.0):
    g = Geometry.make(shape, vs, max_radius=1.2 * R, psf_extent=(
        5 * float(np.max(np.exp(np.asarray(psf.log_sigma_z)))), 5 * float(np.max(np.exp(np.asarray(psf.log_sigma_xy))))))
    p = Params(Particles(jnp.asarray(np.atleast_2d(pos), jnp.float32), jnp.asarray([R], jnp.float32),
                         jnp.asarray([amp], jnp.float32)), psf, Background.constant(level, g))
    return p, g


# radius (voxels), PSF z elongation; lateral PSF std 1 voxel (a Nyquist-sampled microscope)
CASES = [(2.0, 1.0), (2.0, 3.0), (3.5, 2.0), (5.0, 1.0), (5.0, 3.0)]


@pytest.mark.parametrize("R,elong", CASES)
def test_matches_brute_force_reference(R, elong):
    vs = (1.0, 1.0, 1.0)
    shape = (int(2 * R + 8 * elong) + 6, int(2 * R) + 10, int(2 * R) + 9)  # non-cubic
    pos = np.asarray(shape) / 2 + np.asarray([0.31, -0.22, 0.13])
    psf = PSF.init(1.0, elong, 1)
    p, g = one_particle(shape, vs, pos, R, psf)
    img = np.asarray(render(p, g))
    ref = reference(shape, vs, pos, R, psf, ss=7)
    assert np.abs(img - ref).max() <= 0.01 * ref.max()
    assert img.sum() == pytest.approx(ref.sum(), rel=5e-3)


def test_matches_reference_with_non_gaussian_psf_and_anisotropic_voxels():
    # three components: core, a wide tail, a displaced axial lobe; z step twice the pixel
    vs = (2.0, 1.0, 1.0)
    psf = PSF(jnp.log(jnp.asarray([1.0, 2.0, 1.2])), jnp.log(jnp.asarray([2.5, 5.0, 2.0])),
              jnp.asarray([0.0, 1.0, -3.0]), jnp.log(jnp.asarray([0.7, 0.2, 0.1])))
    shape = (20, 22, 21)
    pos = np.asarray([10.2, 10.6, 9.9])
    p, g = one_particle(shape, vs, pos, 4.0, psf)
    img = np.asarray(render(p, g))
    ref = reference(shape, vs, pos, 4.0, psf, ss=5)
    assert np.abs(img - ref).max() <= 0.01 * ref.max()


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_sub_voxel_shift_equals_shifted_reference(axis):
    ss = 7
    vs = (1.0, 1.0, 1.0)
    shape = (22, 16, 15)
    R, psf = 3.0, PSF.init(1.0, 2.0, 1)
    pos = np.asarray([11.0, 7.6, 7.3])
    ref = reference(shape, vs, pos, R, psf, ss=ss)
    for k in (2, -3):  # shift by k/ss of a voxel
        d = np.zeros(3)
        d[axis] = k / ss
        p, g = one_particle(shape, vs, pos + d, R, psf)
        img = np.asarray(render(p, g))
        # the reference shifted by d: shift the fine grid by k samples, then bin again
        shifted = reference(shape, vs, pos + d, R, psf, ss=ss)
        assert np.abs(img - shifted).max() <= 0.01 * ref.max()
        # and it really moved: the rendering differs from the unshifted reference
        assert np.abs(img - ref).max() > 0.02 * ref.max()
        com = np.asarray([np.sum(img * np.arange(n).reshape([-1 if i == a else 1 for i in range(3)]))
                          for a, n in enumerate(shape)]) / img.sum()
        assert com[axis] == pytest.approx(pos[axis] + d[axis], abs=0.02)


def test_box_spline_derivatives():
    with jax.enable_x64(True):
        args = (jnp.array([0.1, -0.3, 0.7, 2.0]), jnp.array([0.3, 0.5, 0.9, 0.2]),
                jnp.array([0.2, 0.6, 0.4, 0.5]), jnp.array([0.8, 0.1, 0.5, 0.7]))
        check_grads(_box_spline_cdf, args, order=2, modes=["fwd", "rev"])


@pytest.fixture(scope="module")
def small_model():
    rng = np.random.default_rng(3)
    shape, vs = (14, 18, 20), (1.5, 1.0, 1.0)
    pos = np.asarray([[7.0, 9.0, 10.0],  # exactly on a voxel centre (r = 0 in the patch)
                      [6.3, 4.45, 5.5],  # on a voxel face along x
                      [8.7, 13.2, 15.1]])
    psf = PSF(jnp.log(jnp.asarray([0.9, 1.8])), jnp.log(jnp.asarray([2.0, 3.5])),
              jnp.asarray([0.0, 0.7]), jnp.log(jnp.asarray([0.8, 0.2])))
    g = Geometry.make(shape, vs, max_radius=3.0, psf_extent=(10.0, 6.0), bg_degree=(1, 1, 1),
                      illum_degree=(1, 1, 1))
    bg = Background(jnp.asarray(rng.normal(0, 0.1, (2, 2, 2)), jnp.float32).at[0, 0, 0].set(1.0),
                    jnp.asarray(rng.normal(0, 0.1, (2, 2, 2)), jnp.float32))
    p = Params(Particles(jnp.asarray(pos, jnp.float32), jnp.asarray([2.5, 2.2, 2.8], jnp.float32),
                         jnp.asarray([1.0, -0.5, 2.0], jnp.float32)), psf, bg)
    w = jnp.asarray(rng.normal(size=shape), jnp.float32)
    return p, g, w


GROUPS = {
    "positions": lambda p: p.particles.pos,
    "radii": lambda p: p.particles.radius,
    "amplitudes": lambda p: p.particles.amplitude,
    "psf": lambda p: p.psf,
    "background": lambda p: p.background,
}


def _replace(p, group, value):
    pa = p.particles
    if group == "positions":
        return Params(Particles(value, pa.radius, pa.amplitude), p.psf, p.background)
    if group == "radii":
        return Params(Particles(pa.pos, value, pa.amplitude), p.psf, p.background)
    if group == "amplitudes":
        return Params(Particles(pa.pos, pa.radius, value), p.psf, p.background)
    if group == "psf":
        return Params(pa, value, p.background)
    return Params(pa, p.psf, value)


@pytest.mark.parametrize("group", list(GROUPS))
def test_gradients_match_finite_differences(small_model, group):
    """check_grads (float32: central differences of a projection of the image)."""
    p, g, w = small_model

    def f(x):
        return jnp.sum(w * render(_replace(p, group, x), g))

    check_grads(f, (GROUPS[group](p),), order=1, modes=["rev"], eps=1e-2, atol=2e-2, rtol=2e-2)
    grads = jax.grad(f)(GROUPS[group](p))
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree_util.tree_leaves(grads))


def test_position_gradient_is_finite_at_integer_positions_and_patch_edges(small_model):
    p, g, w = small_model
    f = lambda x: jnp.sum(w * render(_replace(p, "positions", x), g))  # noqa: E731
    for delta in (0.0, 0.5, -0.5, 0.4999):
        x = p.particles.pos + delta
        gr = np.asarray(jax.grad(f)(x))
        assert np.all(np.isfinite(gr)) and np.abs(gr).max() > 0
        # one-sided finite differences agree around the rounding boundary of the patch
        e = jnp.zeros_like(x).at[1, 2].set(1e-2)
        fd = (f(x + e) - f(x - e)) / 2e-2
        assert float(fd) == pytest.approx(float(gr[1, 2]), rel=3e-2, abs=3e-2)


def test_translation_invariance_and_mass(small_model):
    p, g, _ = small_model
    one = Params(Particles(p.particles.pos[:1], p.particles.radius[:1], jnp.ones(1)), p.psf,
                 Background.constant(0.0, g))
    a = np.asarray(render(one, g))
    shifted = Params(Particles(one.particles.pos + jnp.asarray([1.0, -2.0, 3.0]),
                               one.particles.radius, one.particles.amplitude), p.psf, one.background)
    b = np.asarray(render(shifted, g))
    # b[z + 1, y - 2, x + 3] == a[z, y, x] where both are inside the stack
    np.testing.assert_allclose(b[1:, :-2, 3:], a[:-1, 2:, :-3], atol=2e-5 * a.max())
    # the light of a particle far from the faces is its volume in voxels
    vol = 4 / 3 * np.pi * 2.5**3 / np.prod(g.voxel_size)
    assert a.sum() == pytest.approx(vol, rel=5e-3)


def test_voxel_ball_volume_and_range():
    vs = (2.0, 1.0, 1.0)
    ax = [np.arange(-6, 7) * v for v in vs]
    occ = np.asarray(voxel_ball(ax[0][:, None, None] - 0.3, ax[1][None, :, None] + 0.2,
                                ax[2][None, None, :], 4.0, vs))
    assert occ.min() >= -1e-4 and occ.max() <= 1 + 1e-4  # float32 cancellation in the spline
    assert occ.sum() * np.prod(vs) == pytest.approx(4 / 3 * np.pi * 4.0**3, rel=5e-3)


@pytest.mark.parametrize("bad,match", [
    (lambda p: _replace(p, "positions", p.particles.pos.at[0, 1].set(jnp.nan)), "NaN"),
    (lambda p: _replace(p, "radii", p.particles.radius.at[0].set(0.0)), "radii must be > 0"),
    (lambda p: _replace(p, "radii", p.particles.radius.at[0].set(40.0)), "larger than the stack"),
    (lambda p: _replace(p, "radii", p.particles.radius.at[0].set(5.0)), "exceeds the layout"),
    (lambda p: _replace(p, "positions", p.particles.pos.at[2, 2].set(60.0)), "outside the stack"),
    (lambda p: _replace(p, "psf", PSF(p.psf.log_sigma_xy.at[0].set(jnp.nan), p.psf.log_sigma_z,
                                     p.psf.z_offset, p.psf.logit_weight)), "PSF"),
])
def test_validate_names_the_problem(small_model, bad, match):
    p, g, _ = small_model
    validate(p, g)  # the good parameters pass
    with pytest.raises(ValueError, match=match):
        validate(bad(p), g)


@pytest.mark.slow
@pytest.mark.parametrize("elong", [1.0, 3.0])
def test_matches_brute_force_reference_large_radius(elong):
    """Radius 8 px (the top of the 2-8 px range) against a 9x supersampled reference."""
    vs, R = (1.0, 1.0, 1.0), 8.0
    shape = (int(2 * R + 8 * elong) + 6, int(2 * R) + 10, int(2 * R) + 9)
    pos = np.asarray(shape) / 2 + np.asarray([0.3, -0.2, 0.1])
    psf = PSF.init(1.0, elong, 1)
    p, g = one_particle(shape, vs, pos, R, psf)
    img = np.asarray(render(p, g))
    ref = reference(shape, vs, pos, R, psf, ss=9)
    assert np.abs(img - ref).max() <= 0.01 * ref.max()


def test_patch_sum_scatter_equals_the_loop():
    """The GPU's patch sum (one scatter-add) adds the same patches as the CPU's loop,
    overlapping patches and patches at the scratch canvas's edges included."""
    from difftrack.render import _add_patches_loop, _add_patches_scatter

    rng = np.random.default_rng(3)
    canvas = jnp.asarray(rng.normal(size=(9, 11, 13)), jnp.float32)
    vals = jnp.asarray(rng.normal(size=(40, 3, 5, 3)), jnp.float32)
    hi = np.asarray(canvas.shape) - np.asarray(vals.shape[1:])
    corner = rng.integers(0, hi + 1, size=(40, 3))
    corner[:3] = [[0, 0, 0], hi, [0, hi[1], 0]]
    corner = jnp.asarray(corner, jnp.int32)
    a = np.asarray(_add_patches_loop(canvas, vals, corner))
    b = np.asarray(_add_patches_scatter(canvas, vals, corner))
    want = np.asarray(canvas).copy()
    for v, c in zip(np.asarray(vals), np.asarray(corner)):
        want[c[0]:c[0] + 3, c[1]:c[1] + 5, c[2]:c[2] + 3] += v
    np.testing.assert_allclose(a, want, atol=1e-5)
    np.testing.assert_allclose(b, want, atol=1e-5)


def test_ball_gradient_matches_autodiff(monkeypatch):
    """The ball's written-out gradient (CPU: chunks of particles; GPU: all at once) is
    autodiff's of ``voxel_ball``, centres on voxel centres, on patch edges and anywhere."""
    from functools import partial

    from difftrack import render as render_module
    from difftrack.render import _ball_grads, _balls_plain, patch_values

    g = Geometry.make((10, 14, 14), (0.5, 0.2, 0.2), max_radius=1.0, psf_extent=(1.0, 0.4))
    rng = np.random.default_rng(4)
    n = 70  # one full chunk of 64 and a remainder
    pos = rng.uniform(0, 9, (n, 3)).astype(np.float32)
    pos[:4] = [[3, 4, 5], [3.5, 4.5, 5.5], [3.4999, 4, 5], [3, 4.0001, 4.9999]]
    P = Particles(jnp.asarray(pos), jnp.asarray(rng.uniform(0.6, 1.0, n), jnp.float32),
                  jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32))
    G = jnp.asarray(rng.normal(size=(n, *(2 * h + 1 for h in g.patch_half))), jnp.float32)

    def auto(p):  # autodiff through voxel_ball
        return jnp.sum(G * _balls_plain(p.pos, p.radius, p.amplitude, g))

    want = jax.jit(jax.grad(auto))(P)  # jitted: eagerly, every small operation compiles apart
    got = jax.jit(jax.grad(lambda p: jnp.sum(G * patch_values(p, g)[0])))(P)
    # centres held (the shape fit), few patches: autodiff's own path, the same to the bit
    held = lambda r, a: jnp.sum(G * patch_values(Particles(P.pos, r, a), g)[0])  # noqa: E731
    auto_held = lambda r, a: auto(Particles(P.pos, r, a))  # noqa: E731
    for a, b in zip(jax.jit(jax.grad(held, (0, 1)))(P.radius, P.amplitude),
                    jax.jit(jax.grad(auto_held, (0, 1)))(P.radius, P.amplitude)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # ... many patches: the written-out path (the limit lowered to take it here)
    monkeypatch.setattr(render_module, "AUTODIFF_HELD_MAX_VOXELS", 0)
    got_held = jax.jit(jax.grad(held, (0, 1)))(P.radius, P.amplitude)
    every = jax.jit(jax.vmap(partial(_ball_grads, g)))((P.pos, P.radius, P.amplitude, G))
    # float32: the box spline's corner sums cancel, and autodiff's own gradient is off
    # float64's by up to 0.4% of an element here; the paths differ by < 0.04% of the largest
    for name, k in (("pos", 0), ("radius", 1), ("amplitude", 2)):
        w = np.asarray(getattr(want, name))
        paths = [np.asarray(getattr(got, name)), np.asarray(every[k])]
        if k:
            paths.append(np.asarray(got_held[k - 1]))
        for a in paths:
            np.testing.assert_allclose(a, w, rtol=0, atol=1e-3 * np.abs(w).max())
    # and the large path is the one taken: not autodiff's bits
    assert not all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
                   zip(got_held, jax.jit(jax.grad(auto_held, (0, 1)))(P.radius, P.amplitude)))


def test_with_kernel_cuts_the_kernel_and_keeps_the_image():
    """A kernel cut to 6 stds of a one-Gaussian PSF renders what one of 15 stds does (the
    light beyond is below 1e-8); the canvas and margins follow the kernel."""
    vs = (0.2, 0.1, 0.1)
    psf = PSF.init(0.1, 0.25, n_components=1)
    g = Geometry.make((12, 20, 20), vs, max_radius=0.5, psf_extent=(3.75, 1.5))
    short = g.with_kernel((8, 6, 6))
    assert g.kernel_half == (19, 15, 15) and short.kernel_half == short.margin == (8, 6, 6)
    assert all(c >= s + 2 * k for c, s, k in zip(short.canvas, short.shape, short.kernel_half))
    assert all(a < b for a, b in zip(short.canvas, g.canvas))
    pos = jnp.asarray([[5.3, 9.6, 10.2], [2.0, 4.0, 15.5]], jnp.float32)
    p = Params(Particles(pos, jnp.full((2,), 0.4), jnp.ones((2,))), psf, Background.constant(0.0, g))
    full, cut = np.asarray(render(p, g)), np.asarray(render(p, short))
    np.testing.assert_allclose(cut, full, atol=1e-4 * full.max())


def test_periodic_boundary_wraps_the_light_of_balls_cut_at_the_faces():
    """``Geometry.periodic``: each ball is cut at the stack's faces (its part beyond them
    holds no light) and the PSF's light wraps around, as a circular FFT convolution over
    the stack renders it (the partial-volume dev stacks' renderer)."""
    from difftrack.render import kernel_on_grid, rasterise, stack_region
    vs = (0.2, 0.1, 0.1)
    psf = PSF.init(0.1, 0.25, n_components=1)
    shape = (12, 20, 20)
    g_open = Geometry.make(shape, vs, max_radius=0.5, psf_extent=(1.0, 0.5))
    g_per = Geometry.make(shape, vs, max_radius=0.5, psf_extent=(1.0, 0.5), periodic=True)
    assert g_per.canvas == shape and g_per.margin == (0, 0, 0)
    assert g_per.kernel_half == g_open.kernel_half  # it fits in the stack
    # one near the top z face (its ball reaches 0.5 voxel past it), one at the low y face
    pos = jnp.asarray([[11.0, 9.6, 10.2], [5.0, 0.3, 15.5]], jnp.float32)
    parts = Particles(pos, jnp.full((2,), 0.4), jnp.asarray([1.0, 0.7]))
    p_open = Params(parts, psf, Background.constant(0.0, g_open))
    p_per = Params(parts, psf, Background.constant(0.0, g_per))
    # the balls: those of the open layout, cut to the stack
    balls = np.asarray(stack_region(rasterise(parts, g_open), g_open))
    np.testing.assert_allclose(np.asarray(rasterise(parts, g_per)), balls, atol=1e-6)
    # their light, convolved circularly over the stack
    k = np.asarray(kernel_on_grid(psf.kernel(vs, g_per.kernel_half), g_per.kernel_half, shape))
    ref = np.fft.irfftn(np.fft.rfftn(balls) * np.fft.rfftn(k), s=shape, axes=(0, 1, 2))
    per = np.asarray(render(p_per, g_per))
    np.testing.assert_allclose(per, ref, atol=1e-5 * ref.max())
    np.testing.assert_allclose(per.sum(), balls.sum(), rtol=1e-4)  # no light lost
    # the top particle's light reaches the first slices around; in the open stack it does not
    op = np.asarray(render(p_open, g_open))
    assert per[0, 8:12, 8:12].mean() > 0.05 * per[11, 8:12, 8:12].mean()
    assert op[0, 8:12, 8:12].mean() < 1e-6 * op[11, 8:12, 8:12].mean()
    assert per[5, -1, 14:17].mean() > 0.05 * per[5, 0, 14:17].mean()
