"""The particle shape S: a partial-volume sphere blurred by a learnable PSF.

S(r - r_i; R_i, theta) = [ball(R_i) * box_voxel * PSF_theta](r - r_i)

* ``voxel_ball`` is the sphere of radius R integrated over each voxel (partial volume),
  smooth and differentiable in the centre and the radius.
* ``PSF`` is a sum of K anisotropic Gaussian components, each with its own lateral width,
  axial width, axial offset and weight.  One component is a Gaussian PSF; several give the
  non-Gaussian tails, axial side lobes and the above/below-focus asymmetry of real
  confocal PSFs, while staying positive and smooth (a physical prior by construction).

All lengths here are physical (the unit of ``voxel_size``), axis order (z, y, x).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

_SQRT2PI = math.sqrt(2.0 * math.pi)


_SIGNS = [(e0, e1, e2) for e0 in (-1.0, 1.0) for e1 in (-1.0, 1.0) for e2 in (-1.0, 1.0)]


@jax.custom_jvp
def _box_spline_cdf(s, w0, w1, w2):
    """P(u0 + u1 + u2 < s) for independent u_k uniform on [-w_k/2, w_k/2] (w_k > 0).

    Closed form: sum over the 8 corners of +-(s + e.w/2)_+^3 / (6 w0 w1 w2). Its
    derivatives are written out (custom_jvp) so that they share one pass over the corners:
    autodiff of the sum is an order of magnitude slower on CPU.
    """
    acc = 0.0
    for e0, e1, e2 in _SIGNS:
        t = jnp.maximum(s + 0.5 * (e0 * w0 + e1 * w1 + e2 * w2), 0.0)
        acc = acc + (e0 * e1 * e2) * t * t * t
    return acc / (6.0 * w0 * w1 * w2)


def _corner_sums(s, w0, w1, w2):
    """The box spline's sums over its 8 corners: (sum e t^3, sum e t^2, [sum e e_k t^2]),
    t = (s + e.w/2)_+ and e the corner's sign product."""
    c3 = 0.0
    c2 = 0.0
    c2w = [0.0, 0.0, 0.0]
    for e0, e1, e2 in _SIGNS:
        t = jnp.maximum(s + 0.5 * (e0 * w0 + e1 * w1 + e2 * w2), 0.0)
        sgn = e0 * e1 * e2
        t2 = sgn * t * t
        c3 = c3 + t2 * t
        c2 = c2 + t2
        c2w[0] = c2w[0] + e0 * t2
        c2w[1] = c2w[1] + e1 * t2
        c2w[2] = c2w[2] + e2 * t2
    return c3, c2, c2w


@_box_spline_cdf.defjvp
def _box_spline_cdf_jvp(primals, tangents):
    s, w0, w1, w2 = primals
    ds, dw0, dw1, dw2 = tangents
    c3, c2, c2w = _corner_sums(s, w0, w1, w2)
    W6 = 6.0 * w0 * w1 * w2
    F = c3 / W6
    dF_ds = 3.0 * c2 / W6
    dF_dw = [1.5 * c2w[k] / W6 - F / w for k, w in enumerate((w0, w1, w2))]
    tangent = dF_ds * ds + dF_dw[0] * dw0 + dF_dw[1] * dw1 + dF_dw[2] * dw2
    return F, tangent


def voxel_ball(dz, dy, dx, R, voxel_size):
    """Fraction of each voxel inside a ball of radius ``R`` (partial-volume sphere).

    ``dz, dy, dx``: physical offsets of voxel centres from the ball's centre (arrays that
    broadcast); ``R``: radius; ``voxel_size``: (z, y, x). The boundary is treated as locally
    planar: the voxel box projected onto the surface normal is a sum of three uniforms
    (a box spline), whose CDF at the signed distance gives the covered fraction, exactly
    for a plane. The radius is shifted by -sigma_n^2 / R (sigma_n^2 the box's variance
    along the normal) so that the ball's volume is right to second order in voxel/R.
    Smooth (C2) in the centre and the radius.
    """
    r, _, w, var_n, floor = _normal_box(dz, dy, dx, voxel_size)
    return _box_spline_cdf(R - var_n / R - r, *w)


def _normal_box(dz, dy, dx, voxel_size):
    """The voxel box seen along the surface normal: (r, a, w, var_n, floor), r the distance
    from the centre, a_k = |d_k| v_k / r the box's width along the normal per axis, w_k
    that width held above ``floor`` (which keeps the box spline well conditioned along
    the axes), var_n the box's variance along the normal."""
    vmin = min(voxel_size)
    r = jnp.sqrt(dz * dz + dy * dy + dx * dx + (1e-3 * vmin) ** 2)
    floor = 0.1 * vmin
    a = [jnp.abs(d) * v / r for d, v in zip((dz, dy, dx), voxel_size)]
    w = [jnp.maximum(ak, floor) for ak in a]
    var_n = (w[0] * w[0] + w[1] * w[1] + w[2] * w[2]) / 12.0
    return r, a, w, var_n, floor


def voxel_ball_derivatives(dz, dy, dx, R, voxel_size):
    """``voxel_ball`` and its derivatives in closed form: (value, d/dR, [d/d dz, d/d dy,
    d/d dx]), arrays of the broadcast shape. One pass over the box spline's corners; what
    autodiff of ``voxel_ball`` gives (to float32 rounding), at a fraction of its cost on
    CPU."""
    d = (dz, dy, dx)
    r, a, w, var_n, floor = _normal_box(dz, dy, dx, voxel_size)
    c3, c2, c2w = _corner_sums(R - var_n / R - r, *w)
    W6 = 6.0 * w[0] * w[1] * w[2]
    F = c3 / W6
    Cs = 3.0 * c2 / W6  # dF/ds, s = R - var_n / R - r
    # dF/dw_k through the box and through var_n, where w_k follows a_k (above the floor)
    q = [jnp.where(a[k] > floor, 1.5 * c2w[k] / W6 - F / w[k] - Cs * w[k] / (6.0 * R), 0.0)
         for k in range(3)]
    common = (q[0] * a[0] + q[1] * a[1] + q[2] * a[2]) / (r * r) + Cs / r
    dR = Cs * (1.0 + var_n / (R * R))
    dd = [q[j] * voxel_size[j] * jnp.sign(d[j]) / r - d[j] * common for j in range(3)]
    return F, dR, dd


# PSF.init's tails, together, against 1 for the core
TAIL_WEIGHT = 0.15

# The most a PSF component's lateral ellipse may differ between x and y (``PSF.log_aspect``,
# taken there smoothly by a tanh). PERI's exact line-scan model gives 1.6-1.9; on the real
# katherine.tiff an unbounded fit turned a tail into a 25:1 streak (line noise, not light
# through a lens; twenty-eighth session).
MAX_ASPECT = 3.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PSF:
    """A sum of K anisotropic Gaussians (physical units).

    Attributes (each shape (K,)):
      log_sigma_xy: log of the lateral std of each component.
      log_sigma_z: log of the axial std of each component.
      z_offset: axial offset of each component's centre (asymmetry, side lobes).
      logit_weight: softmax logits of the component weights (the PSF integrates to 1).
      log_grid: None, or a free-form correction on the kernel's voxel grid (any odd
        shape, centred; cropped or zero-padded to the kernel's; ``fit_shape`` puts it on
        the core, ``core_half``): the sampled kernel is multiplied by exp(log_grid), averaged
        over the y and x mirror images (so it cannot shift the light sideways). It lets
        the data shape what three Gaussians cannot (a real confocal PSF's rings, lobes and
        flat top); a prior (``model.fit_parameters``' ``grid_prior``) holds it near 0
        where the light does not define it. ``with_grid`` adds one.
      depth_log_sigma_xy, depth_log_sigma_z: None, or (K,) each: how each component's log
        widths change with the emitter's depth, per unit of the normalised depth t (-1 at
        the stack's first z slice, +1 at its last): the PSF of a real confocal widens
        with depth (spherical aberration of the index mismatch). The PSF at depth t is
        the kernels at the two faces (t = -1, +1) mixed linearly, ``kernel``'s
        ``depth``; the renderer applies it so (``render.blur``). ``with_depth`` adds them.
      depth_z_offset: None, or (K,): how each component's axial offset changes with depth
        (per unit of t), less the mixture's mean change: the shape's asymmetry changes
        with depth (a confocal PSF's spherical aberration grows with depth), its centroid
        does not (a change of the light's centre with depth would be a z scaling of the
        centres, which no fit of the light can tell from it). ``with_depth`` adds it.
      log_aspect: None, or (K,): each component's lateral widths are sigma_xy exp(-a)
        along y and sigma_xy exp(+a) along x (a laterally elliptic PSF, e.g. a line-scan
        confocal's: on PERI's exact line-scan model the light is 1.6-1.9x wider along x
        than along y; docs/refine.md, twenty-eighth session). ``with_aspect`` adds it.
    """

    log_sigma_xy: jax.Array
    log_sigma_z: jax.Array
    z_offset: jax.Array
    logit_weight: jax.Array
    log_grid: jax.Array | None = None
    depth_log_sigma_xy: jax.Array | None = None
    depth_log_sigma_z: jax.Array | None = None
    depth_z_offset: jax.Array | None = None
    log_aspect: jax.Array | None = None

    @staticmethod
    def init(sigma_xy, sigma_z, n_components=3, tail_weight=None):
        """A PSF whose first component has std (sigma_z, sigma_xy, sigma_xy) and whose
        further components are wider tails (2x, 4x, ...) sharing ``tail_weight`` of the
        light (against 1 for the core, before normalising)."""
        tail_weight = TAIL_WEIGHT if tail_weight is None else tail_weight
        k = np.arange(n_components)
        widen = 2.0 ** k
        weights = np.where(k == 0, 1.0, tail_weight / max(n_components - 1, 1))
        weights = weights / weights.sum()
        return PSF(
            log_sigma_xy=jnp.asarray(np.log(sigma_xy * widen), jnp.float32),
            log_sigma_z=jnp.asarray(np.log(sigma_z * widen), jnp.float32),
            z_offset=jnp.zeros(n_components, jnp.float32),
            logit_weight=jnp.asarray(np.log(weights), jnp.float32),
        )

    @property
    def weights(self):
        return jax.nn.softmax(self.logit_weight)

    def evaluate(self, dz, dy, dx):
        """PSF density at physical offsets (arrays broadcast); integrates to 1."""
        w = self.weights
        sy, sx = self.lateral_sigmas()
        sz = jnp.exp(self.log_sigma_z)
        out = 0.0
        for k in range(w.shape[0]):
            gz = jnp.exp(-0.5 * ((dz - self.z_offset[k]) / sz[k]) ** 2) / (_SQRT2PI * sz[k])
            if self.log_aspect is None:  # round: as before log_aspect, to the last bit
                gxy = jnp.exp(-0.5 * (dy * dy + dx * dx) / sy[k] ** 2) / (2 * math.pi * sy[k] ** 2)
            else:
                gxy = (jnp.exp(-0.5 * (dy * dy / sy[k] ** 2 + dx * dx / sx[k] ** 2))
                       / (2 * math.pi * sy[k] * sx[k]))
            out = out + w[k] * gz * gxy
        return out

    def lateral_sigmas(self):
        """Each component's std along y and along x, (K,) each (``log_aspect``, taken
        smoothly to at most ``MAX_ASPECT`` in ratio)."""
        sxy = jnp.exp(self.log_sigma_xy)
        if self.log_aspect is None:
            return sxy, sxy
        cap = 0.5 * math.log(MAX_ASPECT)
        a = cap * jnp.tanh(self.log_aspect / cap)
        return sxy * jnp.exp(-a), sxy * jnp.exp(a)

    def widest_lateral_sigmas(self):
        """Each component's larger lateral std, (K,) NumPy (``lateral_sigmas``); without
        ``log_aspect`` exactly exp(log_sigma_xy)."""
        w = np.exp(np.asarray(self.log_sigma_xy))
        if self.log_aspect is None:
            return w
        sy, sx = (np.asarray(q, np.float64) for q in self.lateral_sigmas())
        return w * np.sqrt(np.maximum(sx / sy, sy / sx))

    def with_aspect(self):
        """This PSF with lateral widths that may differ between y and x (round to start)."""
        return dataclasses.replace(self, log_aspect=jnp.zeros_like(self.log_sigma_xy))

    @property
    def has_depth(self):
        """Whether the PSF changes with depth (its widths, its asymmetry or both)."""
        return self.depth_log_sigma_xy is not None or self.depth_z_offset is not None

    def with_depth(self, widths=True, asymmetry=True):
        """This PSF with widths (``widths``) and an asymmetry (``asymmetry``) that may change
        with depth (zero change to start); the part not asked for stays None, fixed."""
        z = jnp.zeros_like(self.log_sigma_xy)
        return dataclasses.replace(self, depth_log_sigma_xy=z if widths else None,
                                   depth_log_sigma_z=z if widths else None,
                                   depth_z_offset=z if asymmetry else None)

    def at_face(self, t):
        """The depth-free PSF of the face at normalised depth ``t`` (-1 or +1)."""
        lxy, lz, z_offset = self.log_sigma_xy, self.log_sigma_z, self.z_offset
        if self.depth_log_sigma_xy is not None:
            lxy, lz = lxy + t * self.depth_log_sigma_xy, lz + t * self.depth_log_sigma_z
        if self.depth_z_offset is not None:  # the shape's asymmetry, its centroid held
            d = self.depth_z_offset
            z_offset = z_offset + t * (d - jnp.sum(self.weights * d))
        return dataclasses.replace(
            self, log_sigma_xy=lxy, log_sigma_z=lz, z_offset=z_offset,
            depth_log_sigma_xy=None, depth_log_sigma_z=None, depth_z_offset=None)

    def kernel(self, voxel_size, halfwidth, depth=0.0):
        """The PSF sampled on a voxel grid of half-widths ``halfwidth`` (z, y, x), normalised
        to sum 1. Shape (2*hz+1, 2*hy+1, 2*hx+1). With widths that change with depth
        (``has_depth``): the PSF of an emitter at normalised depth ``depth`` (-1 .. 1;
        default the stack's middle), the two faces' kernels mixed linearly."""
        if self.has_depth:
            s = 0.5 * (1.0 + depth)
            return ((1.0 - s) * self.at_face(-1.0).kernel(voxel_size, halfwidth)
                    + s * self.at_face(1.0).kernel(voxel_size, halfwidth))
        axes = [jnp.arange(-h, h + 1, dtype=jnp.float32) * v for h, v in zip(halfwidth, voxel_size)]
        k = self.evaluate(axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])
        if self.log_grid is not None:
            k = k * jnp.exp(_fit_grid(self.symmetric_grid(), k.shape))
        return k / jnp.sum(k)

    def symmetric_grid(self):
        """``log_grid`` averaged over its y and x mirror images."""
        g = self.log_grid
        return 0.25 * (g + g[:, ::-1] + g[:, :, ::-1] + g[:, ::-1, ::-1])

    def with_grid(self, halfwidth):
        """This PSF with a zero free-form correction on ``halfwidth`` (z, y, x) voxels about
        its centre (at most the render's ``Geometry.kernel_half``; ``core_half`` gives the
        PSF's core)."""
        shape = tuple(2 * int(h) + 1 for h in halfwidth)
        return dataclasses.replace(self, log_grid=jnp.zeros(shape, jnp.float32))

    def core_half(self, voxel_size, kernel_half, reach=3.0):
        """Half-widths (z, y, x voxels) of the PSF's core: ``reach`` stds of its strongest
        component (plus that component's axial offset), at most ``kernel_half``. The
        free-form grid lives there: beyond it the light is too faint to define ~a parameter
        per voxel. With widths that change with depth (``has_depth``): the widths at the
        face where that component is widest, so that no depth's core is cut."""
        k = int(np.argmax(np.asarray(self.weights)))
        lz, lxy = float(np.asarray(self.log_sigma_z)[k]), float(np.asarray(self.log_sigma_xy)[k])
        if self.depth_log_sigma_xy is not None:  # log widths change by +-depth_log_sigma
            lz += abs(float(np.asarray(self.depth_log_sigma_z)[k]))
            lxy += abs(float(np.asarray(self.depth_log_sigma_xy)[k]))
        sy_, sx_ = (np.asarray(q, np.float64) for q in self.lateral_sigmas())
        a = 0.5 * math.log(sx_[k] / sy_[k])
        sz = math.exp(lz) * reach + abs(float(np.asarray(self.z_offset)[k]))
        sy, sx = math.exp(lxy - a) * reach, math.exp(lxy + a) * reach
        return tuple(min(int(h), max(1, int(math.ceil(e / v))))
                     for h, e, v in zip(kernel_half, (sz, sy, sx), voxel_size))

    def shifted_z(self, dz, vz):
        """The PSF moved by ``dz`` (physical) along z; ``vz`` is the z voxel size. Exact for
        the Gaussians; the grid correction (0 outside its window) is moved by linear
        interpolation, its window grown by the shift so that no plane is lost. On the host
        (NumPy): not for use inside ``jax.jit``."""
        out = dataclasses.replace(self, z_offset=self.z_offset + jnp.float32(dz))
        if self.log_grid is not None:
            out = dataclasses.replace(out, log_grid=warp_grid(self.log_grid, shift_z=dz / vz))
        return out

    def moments(self):
        """(sigma_z, sigma_xy) of the whole PSF: the std of the mixture along z and in y."""
        w = self.weights
        sz = jnp.exp(self.log_sigma_z)
        sxy = jnp.exp(self.log_sigma_xy)
        mz = jnp.sum(w * self.z_offset)
        var_z = jnp.sum(w * (sz**2 + self.z_offset**2)) - mz**2
        var_xy = jnp.sum(w * sxy**2)
        return jnp.sqrt(var_z), jnp.sqrt(var_xy)


def warp_grid(grid, scale=(1.0, 1.0, 1.0), shift_z=0.0):
    """A free-form PSF grid (``PSF.log_grid``, 0 outside its window) stretched by ``scale``
    (z, y, x) about its centre and moved by ``shift_z`` voxels along z, by linear
    interpolation; a shift grows the window by as many z planes, so that none is lost. On
    the host (NumPy)."""
    import scipy.ndimage

    k = int(math.ceil(abs(shift_z)))
    g = np.pad(np.asarray(grid, np.float64), [(k, k), (0, 0), (0, 0)])
    c = [(n - 1) / 2 for n in g.shape]
    idx = np.meshgrid(*[(np.arange(n) - ck - (shift_z if a == 0 else 0.0)) / f + ck
                        for a, (n, ck, f) in enumerate(zip(g.shape, c, scale))], indexing="ij")
    return jnp.asarray(scipy.ndimage.map_coordinates(g, idx, order=1, mode="constant", cval=0.0),
                       jnp.float32)


def _fit_grid(g, shape):
    """``g`` cropped or zero-padded about its centre to ``shape`` (odd sizes)."""
    for k, n in enumerate(shape):
        m = g.shape[k]
        if m > n:
            g = jax.lax.slice_in_dim(g, (m - n) // 2, (m - n) // 2 + n, axis=k)
        elif m < n:
            pad = [(0, 0)] * 3
            pad[k] = ((n - m) // 2, (n - m) // 2)
            g = jnp.pad(g, pad)
    return g


def default_psf_sigmas(voxel_size, elongation=2.5):
    """A starting PSF when nothing is known: lateral std one lateral voxel, axial std
    ``elongation`` times that."""
    sxy = float(min(voxel_size[1], voxel_size[2]))
    return sxy, elongation * sxy
