"""The forward model: particles + shape S + background -> image.

    model(r) = B(r) + [PSF * (L . sum_i a_i ball_i)](r)

* ``ball_i`` is particle i's partial-volume sphere (``shape.ball_profile``), rasterised on a
  local patch around its centre only, so the cost grows with N x patch volume;
* ``L`` is a smooth multiplicative illumination field (1 + a Legendre polynomial): slow
  illumination changes and attenuation with depth scale the particles' light;
* ``PSF`` is applied once to the whole canvas by FFT (linear convolution: the canvas
  extends past every face by the kernel half-width, so light from particles just outside
  the stack enters it and nothing wraps around);
* ``B`` is an additive background (a Legendre polynomial).

Dark (dye-excluding) particles are the same model with negative amplitudes on a bright B.
Everything is float32, jittable and differentiable in positions, radii, amplitudes, the
PSF and the background.  Axis order (z, y, x); positions in voxels (voxel centres at
integer indices); radii and PSF widths in the unit of ``voxel_size``.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import scipy.fft

from .shape import PSF, voxel_ball, voxel_ball_derivatives


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static layout of a render: everything that fixes array shapes (hashable, so it
    can be a static argument of ``jax.jit``).

    shape: stack shape (z, y, x) in voxels.
    voxel_size: (z, y, x) physical size of a voxel.
    patch_half: half-widths (voxels) of the patch each particle is rasterised on.
    kernel_half: half-widths (voxels) of the PSF kernel.
    canvas: shape of the padded canvas (stack + margins, FFT-friendly).
    margin: offset (voxels) of the stack inside the canvas.
    bg_degree / illum_degree: Legendre degrees (z, y, x) of B and L.
    periodic: the stack's light wraps around (a circular FFT convolution over the stack
        alone, balls cut at its faces), as some simulators render it; never a
        microscope's (``refine_positions``'s ``boundary="periodic"``). Then the canvas is
        the stack, with no margin, and the kernel is cut to fit in it.
    """

    shape: tuple
    voxel_size: tuple
    patch_half: tuple
    kernel_half: tuple
    canvas: tuple
    margin: tuple
    bg_degree: tuple = (2, 2, 2)
    illum_degree: tuple = (2, 2, 2)
    periodic: bool = False

    @staticmethod
    def make(shape, voxel_size=None, *, max_radius, psf_extent, bg_degree=(2, 2, 2),
             illum_degree=(2, 2, 2), periodic=False):
        """Layout for a stack of ``shape`` holding particles of radius <= ``max_radius``
        and a PSF that reaches ``psf_extent`` = (z, xy) physical distance from its centre."""
        shape = tuple(int(s) for s in shape)
        vs = (1.0, 1.0, 1.0) if voxel_size is None else tuple(float(v) for v in voxel_size)
        # a voxel farther than R + 3 sigma_box from the centre holds no light; +0.5 for
        # the rounding of the patch centre.
        patch_half = tuple(int(math.ceil(max_radius / v + 1.5)) for v in vs)
        ext = (psf_extent[0], psf_extent[1], psf_extent[1])
        kernel_half = tuple(int(math.ceil(e / v)) for e, v in zip(ext, vs))
        return Geometry(shape, vs, patch_half, (), (), (), tuple(bg_degree),
                        tuple(illum_degree), bool(periodic)).with_kernel(kernel_half)

    def with_kernel(self, kernel_half):
        """This layout with PSF kernel half-widths ``kernel_half`` (z, y, x voxels, at least
        1); the canvas and the stack's margin in it follow (FFT-friendly sizes)."""
        kernel_half = tuple(max(1, int(k)) for k in kernel_half)
        if self.periodic:
            kernel_half = tuple(max(1, min(k, (s - 1) // 2)) for k, s in zip(kernel_half, self.shape))
            return dataclasses.replace(self, kernel_half=kernel_half, canvas=tuple(self.shape),
                                       margin=(0, 0, 0))
        canvas = tuple(scipy.fft.next_fast_len(s + 2 * k, real=True)
                       for s, k in zip(self.shape, kernel_half))
        return dataclasses.replace(self, kernel_half=kernel_half, canvas=canvas, margin=kernel_half)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Particles:
    """Per-particle parameters. pos (n, 3) voxels (z, y, x); radius (n,) physical units;
    amplitude (n,) image units (negative for dark particles)."""

    pos: jax.Array
    radius: jax.Array
    amplitude: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Background:
    """Additive background B and multiplicative illumination L = 1 + poly.

    offset: Legendre coefficients of B, shape bg_degree + 1 (per axis).
    illum: Legendre coefficients of L - 1, shape illum_degree + 1 (the constant term is
    ignored: the overall brightness belongs to the amplitudes).
    """

    offset: jax.Array
    illum: jax.Array

    @staticmethod
    def constant(level, geom):
        off = np.zeros(tuple(d + 1 for d in geom.bg_degree), np.float32)
        off[0, 0, 0] = level
        ill = np.zeros(tuple(d + 1 for d in geom.illum_degree), np.float32)
        return Background(jnp.asarray(off), jnp.asarray(ill))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Params:
    """Everything the renderer differentiates: particles, PSF, background."""

    particles: Particles
    psf: PSF
    background: Background


def _legendre_basis(n, degree, start=0, length=None):
    """Legendre polynomials P_0..P_degree on indices start..start+n-1, mapped so that the
    stack's own voxels (0..length-1) span [-1, 1] (held at the end values outside).
    Shape (degree+1, n)."""
    length = n if length is None else length
    t = (np.arange(start, start + n, dtype=np.float64)) / max(length - 1, 1) * 2.0 - 1.0
    t = np.clip(t, -1.0, 1.0)  # constant beyond the faces: a polynomial must not explode there
    return jnp.asarray(np.polynomial.legendre.legvander(t, degree).T, jnp.float32)


def _poly3(coef, bz, by, bx):
    return jnp.einsum("ijk,iz,jy,kx->zyx", coef, bz, by, bx)


def background_field(bg: Background, geom: Geometry):
    """B on the stack, shape geom.shape."""
    bz, by, bx = (_legendre_basis(n, d) for n, d in zip(geom.shape, geom.bg_degree))
    return _poly3(bg.offset, bz, by, bx)


def illumination_field(bg: Background, geom: Geometry):
    """L on the canvas, shape geom.canvas (the polynomial extended past the faces)."""
    bases = [_legendre_basis(c, d, start=-m, length=n)
             for c, d, m, n in zip(geom.canvas, geom.illum_degree, geom.margin, geom.shape)]
    mask = np.ones(bg.illum.shape, np.float32)
    mask[0, 0, 0] = 0.0
    return 1.0 + _poly3(bg.illum * mask, *bases)


def _patch_offsets(pos, geom: Geometry):
    """Physical offsets (dz (n, pz, 1, 1), dy (n, 1, py, 1), dx (n, 1, 1, px)) of each
    patch's voxel centres from its particle's centre, and the patches' corners (n, 3)."""
    h = geom.patch_half
    centre = jnp.round(jax.lax.stop_gradient(pos)).astype(jnp.int32)
    corner = centre - jnp.asarray(h, jnp.int32)
    d = []
    for k in range(3):
        grid = corner[:, k, None].astype(jnp.float32) + jnp.arange(2 * h[k] + 1, dtype=jnp.float32)
        d.append((grid - pos[:, k, None]) * geom.voxel_size[k])  # (n, p_k) physical
    return (d[0][:, :, None, None], d[1][:, None, :, None], d[2][:, None, None, :]), corner


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _balls(pos, radius, amplitude, geom: Geometry):
    """Each particle's partial-volume sphere on its patch times its amplitude
    (n, pz, py, px). Its gradient is written out (``shape.voxel_ball_derivatives``) and
    summed over each patch in chunks of particles, so that the intermediates stay in
    cache: on CPU 2x faster than autodiff's (30 -> 15 ms on a 16x40x40 stack), where the
    ball's gradient was most of a fit step's time (docs/refine.md, eleventh and twelfth
    sessions)."""
    return _balls_plain(pos, radius, amplitude, geom)


def _balls_plain(pos, radius, amplitude, geom):
    d, _ = _patch_offsets(pos, geom)
    return amplitude[:, None, None, None] * voxel_ball(*d, radius[:, None, None, None],
                                                      geom.voxel_size)


def _balls_fwd(pos, radius, amplitude, geom):
    # symbolic zeros: where the centres are held (the shape fit), small layouts take
    # autodiff's gradient for the radii and amplitudes alone (``_balls_bwd``); the
    # residual's last entry says whether the centres are perturbed (static: () or None)
    out = _balls(pos.value, radius.value, amplitude.value, geom)
    return out, (pos.value, radius.value, amplitude.value, () if pos.perturbed else None)


def _ball_grads(geom, args):
    """One particle's gradient from its patch's cotangent gi: (centre (3,), radius,
    amplitude); args = (pos (3,), radius, amplitude, gi)."""
    vs = geom.voxel_size
    p, R, a, gi = args
    d = [x[0] for x in _patch_offsets(p[None], geom)[0]]
    F, dR, dd = voxel_ball_derivatives(*d, R, vs)
    ga = a * gi
    g_pos = jnp.stack([-vs[j] * jnp.sum(ga * dd[j]) for j in range(3)])
    return g_pos, jnp.sum(ga * dR), jnp.sum(gi * F)


# Where the centres are held (the shape fit), autodiff's gradient for the radii and
# amplitudes alone is faster while the patches are few (it drops every centre term), the
# written-out one in cached chunks once they are many (autodiff's whole-patch intermediates
# then stream through memory). A shape fit's loss + gradient on dev-cpu (medians; docs/
# refine.md, fifteenth session): 451 particles (1.0 M patch voxels) 19.8 against 34.4 ms,
# 1,758 (3.9 M) 128 against 147 ms, 8,701 (19 M) 1,197 against 776 ms (a GPU not measured).
AUTODIFF_HELD_MAX_VOXELS = 8_000_000


def _balls_bwd(geom, res, g):
    pos, radius, amplitude, with_pos = res
    if with_pos is None and g.size <= AUTODIFF_HELD_MAX_VOXELS:  # centres held, few patches
        _, vjp = jax.vjp(lambda r, a: _balls_plain(pos, r, a, geom), radius, amplitude)
        return (jnp.zeros_like(pos), *vjp(g))
    one = partial(_ball_grads, geom)
    # CPU: chunks of 64 particles (15 ms against 19 ms for 16 and 25 ms for 256, 16x40x40);
    # elsewhere every particle at once (a loop of chunks is a kernel launch per chunk)
    return jax.lax.platform_dependent(
        (pos, radius, amplitude, g), cpu=lambda xs: jax.lax.map(one, xs, batch_size=64),
        default=lambda xs: jax.vmap(one)(xs))


_balls.defvjp(_balls_fwd, _balls_bwd, symbolic_zeros=True)


def patch_values(particles: Particles, geom: Geometry):
    """Each particle's partial-volume sphere on its patch, times its amplitude.

    Returns (values (n, pz, py, px), corner (n, 3) int32): the patch of particle i covers
    stack voxels corner_i + [0, 2*patch_half].
    """
    _, corner = _patch_offsets(particles.pos, geom)
    return _balls(particles.pos, particles.radius, particles.amplitude, geom), corner


def _add_patches_loop(canvas, vals, corner):
    """A loop of in-place dynamic-slice updates: on CPU ~10x faster than XLA's scatter for
    thousands of small dense patches."""
    size = vals.shape[1:]

    def body(i, acc):
        c = (corner[i, 0], corner[i, 1], corner[i, 2])
        cur = jax.lax.dynamic_slice(acc, c, size)
        return jax.lax.dynamic_update_slice(acc, cur + vals[i], c)

    return jax.lax.fori_loop(0, vals.shape[0], body, canvas)


def _add_patches_scatter(canvas, vals, corner):
    """One scatter-add of every patch's voxels: on a GPU the loop above is thousands of
    sequential kernel launches, the scatter one parallel kernel."""
    size = vals.shape[1:]
    off = np.indices(size).reshape(3, -1).T  # (P, 3) offsets inside a patch
    idx = corner[:, None, :] + jnp.asarray(off, jnp.int32)[None]  # (n, P, 3)
    strides = jnp.asarray([canvas.shape[1] * canvas.shape[2], canvas.shape[2], 1], jnp.int32)
    flat = jnp.sum(idx * strides, axis=-1).ravel()
    return canvas.ravel().at[flat].add(vals.ravel()).reshape(canvas.shape)


@jax.custom_vjp
def _add_patches(canvas, vals, corner):
    """canvas + each patch vals[i] added at corner[i] (patches inside the canvas): the
    loop on CPU, the scatter elsewhere. Its adjoint is a gather of the same patches."""
    return jax.lax.platform_dependent(canvas, vals, corner, cpu=_add_patches_loop,
                                      default=_add_patches_scatter)


def _add_patches_fwd(canvas, vals, corner):
    return _add_patches(canvas, vals, corner), (corner, vals.shape[1:])


def _add_patches_bwd(res, g):
    corner, size = res
    gvals = jax.vmap(lambda c: jax.lax.dynamic_slice(g, (c[0], c[1], c[2]), size))(corner)
    return g, gvals, None


_add_patches.defvjp(_add_patches_fwd, _add_patches_bwd)


def _scratch_layout(corner, geom: Geometry):
    """Start of each patch on the scratch canvas (the canvas padded by one patch on every
    side), and the padding."""
    h = jnp.asarray(geom.patch_half, jnp.int32)
    pad = tuple(2 * k + 1 for k in geom.patch_half)
    big = tuple(c + 2 * p for c, p in zip(geom.canvas, pad))
    start = corner + jnp.asarray(geom.margin, jnp.int32) + jnp.asarray(pad, jnp.int32)
    start = jnp.clip(start, 0, jnp.asarray(big, jnp.int32) - 2 * h - 1)
    return start, pad, big


def rasterise(particles: Particles, geom: Geometry):
    """Sum of a_i ball_i on the canvas (shape geom.canvas).

    Patches are added on a scratch canvas padded by one patch on every side, so a
    particle whose patch sticks out of the canvas is cut, never shifted (dynamic slices
    clamp their start); positions must lie within a patch of the canvas.
    """
    vals, corner = patch_values(particles, geom)
    start, pad, big = _scratch_layout(corner, geom)
    scratch = _add_patches(jnp.zeros(big, jnp.float32), vals, start)
    return scratch[pad[0]:pad[0] + geom.canvas[0], pad[1]:pad[1] + geom.canvas[1],
                   pad[2]:pad[2] + geom.canvas[2]]


def gather_patches(field, corner, geom: Geometry):
    """The values of a canvas field (shape geom.canvas) on each particle's patch:
    (n, pz, py, px), zero where a patch sticks out of the canvas (the adjoint of the
    patch sum in ``rasterise``)."""
    start, pad, big = _scratch_layout(corner, geom)
    padded = jnp.pad(field, [(p, p) for p in pad])
    size = tuple(2 * k + 1 for k in geom.patch_half)
    return jax.vmap(lambda c: jax.lax.dynamic_slice(padded, (c[0], c[1], c[2]), size))(start)


def to_canvas(field, geom: Geometry):
    """A stack-shaped field placed on the canvas (zero in the margins)."""
    m = geom.margin
    return jnp.pad(field, [(mk, c - s - mk) for mk, c, s in zip(m, geom.canvas, geom.shape)])


def kernel_on_grid(kernel, half, shape):
    """A centred kernel (half-widths ``half``) placed on a periodic grid of ``shape`` with
    its centre at index 0, ready for FFT convolution."""
    full = jnp.pad(kernel, [(0, n - (2 * h + 1)) for n, h in zip(shape, half)])
    return jnp.roll(full, shift=tuple(-h for h in half), axis=(0, 1, 2))


def stack_region(field, geom: Geometry):
    """The stack's part (shape geom.shape) of a canvas-shaped field."""
    return field[tuple(slice(m, m + s) for m, s in zip(geom.margin, geom.shape))]


def convolve(field, kernel, geom: Geometry):
    """Linear convolution of a canvas field with a centred kernel; returns the stack
    region (shape geom.shape)."""
    kfull = kernel_on_grid(kernel, geom.kernel_half, geom.canvas)
    out = jnp.fft.irfftn(jnp.fft.rfftn(field) * jnp.fft.rfftn(kfull), s=geom.canvas)
    return stack_region(out, geom)


def correlate(field, kernel, geom: Geometry):
    """The adjoint of ``convolve``: a stack-shaped field correlated with the kernel, on the
    whole canvas (shape geom.canvas)."""
    kfull = kernel_on_grid(kernel, geom.kernel_half, geom.canvas)
    f = jnp.fft.rfftn(to_canvas(field, geom))
    return jnp.fft.irfftn(f * jnp.conj(jnp.fft.rfftn(kfull)), s=geom.canvas)


def depth_weights(geom: Geometry):
    """The share of the last face's kernel at each canvas z plane, (canvas_z, 1, 1): the
    normalised depth t (-1 at the stack's first slice, +1 at its last, held beyond) as
    (1 + t) / 2 (``PSF.kernel``'s ``depth``)."""
    n, m = geom.shape[0], geom.margin[0]
    t = np.clip(2.0 * (np.arange(geom.canvas[0]) - m) / max(n - 1, 1) - 1.0, -1.0, 1.0)
    return jnp.asarray(0.5 * (1.0 + t), jnp.float32)[:, None, None]


def blur(field, psf: PSF, geom: Geometry):
    """The PSF applied to a canvas field of emitters (``convolve``); where the PSF's widths
    change with depth (``PSF.has_depth``), each emitter's light is blurred by the PSF of
    its own depth: the field split between the two faces' kernels by ``depth_weights``."""
    if not psf.has_depth:
        return convolve(field, psf.kernel(geom.voxel_size, geom.kernel_half), geom)
    s = depth_weights(geom)
    kf = [jnp.fft.rfftn(kernel_on_grid(psf.at_face(t).kernel(geom.voxel_size, geom.kernel_half),
                                       geom.kernel_half, geom.canvas)) for t in (-1.0, 1.0)]
    f = jnp.fft.rfftn(field * (1.0 - s)) * kf[0] + jnp.fft.rfftn(field * s) * kf[1]
    return stack_region(jnp.fft.irfftn(f, s=geom.canvas), geom)


def render_parts(params: Params, geom: Geometry):
    """(background B, particle light) on the stack; their sum is the model image."""
    P = rasterise(params.particles, geom) * illumination_field(params.background, geom)
    return background_field(params.background, geom), blur(P, params.psf, geom)


def validate(params: Params, geom: Geometry) -> None:
    """Raise ValueError, naming the problem, for parameters the renderer cannot honour:
    non-finite values, radii <= 0 or beyond the patch (larger than the layout allows or
    than the stack), centres farther outside the stack than its margin."""
    for name, leaf in (("positions", params.particles.pos), ("radii", params.particles.radius),
                       ("amplitudes", params.particles.amplitude)):
        a = np.asarray(leaf)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contain {int(np.sum(~np.isfinite(a)))} NaN/Inf values")
    for name, leaf in (("PSF", params.psf), ("background", params.background)):
        for a in jax.tree_util.tree_leaves(leaf):
            if not np.all(np.isfinite(np.asarray(a))):
                raise ValueError(f"the {name} parameters contain NaN/Inf values")
    r = np.asarray(params.particles.radius)
    if r.size and r.min() <= 0:
        raise ValueError(f"radii must be > 0; got {r.min():g}")
    extent = np.asarray(geom.shape) * np.asarray(geom.voxel_size)
    if r.size and r.max() > 0.5 * extent.max():
        raise ValueError(f"radius {r.max():g} is larger than the stack (extent {tuple(extent)})")
    rmax = min((h - 1.5) * v for h, v in zip(geom.patch_half, geom.voxel_size))
    if r.size and r.max() > rmax + 1e-6:
        raise ValueError(f"radius {r.max():g} exceeds the layout's maximum {rmax:g}; "
                         "make the Geometry with a larger max_radius")
    pos = np.asarray(params.particles.pos)
    lo = -0.5 - np.asarray(geom.margin)
    hi = np.asarray(geom.shape) - 0.5 + np.asarray(geom.margin)
    bad = np.any((pos < lo) | (pos > hi), axis=1) if pos.size else np.zeros(0, bool)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{int(bad.sum())} particle centres lie outside the stack (shape "
                         f"{geom.shape}) by more than its margin {geom.margin} voxels; first: "
                         f"row {i}, (z, y, x) = {tuple(np.round(pos[i], 3))}")


@partial(jax.jit, static_argnames="geom")
def render(params: Params, geom: Geometry):
    """The model image, float32, shape geom.shape."""
    B, light = render_parts(params, geom)
    return B + light
