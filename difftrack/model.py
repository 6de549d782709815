"""Learning the particle shape S from a stack: ``fit_shape`` and the fitted ``Model``.

With the particle centres given and held, fit the PSF (theta), the radii, the amplitudes
and the background/illumination by minimising the image residual with optax's L-BFGS.
This is the seed's "measurement -> S"; ``refine`` later also moves the positions.

Internally the image is centred and scaled (by its median and a robust spread) so that
every parameter group is of order one; the fitted ``Model`` holds its parameters in the
units of the input image, and ``Model.model_image()`` renders in those units. The caller's
array is never modified.
"""

from __future__ import annotations

import dataclasses
import math
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from ._checks import check_positions, check_stack, check_voxel_size
from .optimize import minimize
from .render import Background, Geometry, Params, Particles, render, validate
from .shape import PSF, default_psf_sigmas


@dataclasses.dataclass(frozen=True)
class Model:
    """A fitted forward model of a stack (parameters in the input image's units).

    params: ``render.Params`` (positions in voxels, radii in the unit of voxel_size).
    geometry: ``render.Geometry`` (static layout).
    voxel_size: (z, y, x) or None (then lengths are in voxels).
    loss: final mean squared residual (image units squared) over the fitted voxels.
    history: loss after each optimiser step.
    weight: per-voxel weight the fit used (0 in the border left out), or None.
    """

    params: Params
    geometry: Geometry
    voxel_size: tuple | None
    loss: float
    history: tuple
    weight: np.ndarray | None = None

    def model_image(self) -> np.ndarray:
        """The model image (z, y, x), float32, in the units of the input image."""
        return np.asarray(render(self.params, self.geometry))

    def residual(self, image) -> np.ndarray:
        """image - model, float32."""
        return np.asarray(image, np.float32) - self.model_image()

    @property
    def psf(self) -> PSF:
        return self.params.psf

    @property
    def particles(self) -> pd.DataFrame:
        """z, y, x (voxels), radius (unit of voxel_size), amplitude (image units)."""
        p = self.params.particles
        pos = np.asarray(p.pos, np.float64)
        return pd.DataFrame({"z": pos[:, 0], "y": pos[:, 1], "x": pos[:, 2],
                             "radius": np.asarray(p.radius, np.float64),
                             "amplitude": np.asarray(p.amplitude, np.float64)})


def estimate_radius_from_positions(positions, voxel_size):
    """Half the median nearest-neighbour distance (physical units): in a dense packing
    touching neighbours sit one diameter apart."""
    pts = np.asarray(positions) * np.asarray(voxel_size)
    if len(pts) < 2:
        raise ValueError("radius=None needs at least two positions to estimate the radius")
    d, _ = cKDTree(pts).query(pts, k=2)
    return 0.5 * float(np.median(d[:, 1]))


def _decide_sign(image, positions, invert):
    """+1 for bright particles, -1 for dark ones (invert=True forces dark)."""
    if invert is True:
        return -1.0
    if invert is False:
        return 1.0
    if invert != "auto":
        raise ValueError(f"invert must be True, False or 'auto'; got {invert!r}")
    idx = np.clip(np.rint(positions).astype(int), 0, np.asarray(image.shape) - 1)
    at = image[idx[:, 0], idx[:, 1], idx[:, 2]].astype(np.float64)
    return 1.0 if np.median(at) >= np.median(image) else -1.0


def _normalise(image):
    """(centre, scale) with image = centre + scale * normalised (float64 scalars)."""
    sample = image[:: max(1, image.shape[0] // 16)].astype(np.float64)
    centre = float(np.median(sample))
    scale = float(np.std(sample))
    if not scale > 0:
        scale = float(np.std(image.astype(np.float64))) or 1.0
    return centre, scale


def to_image_units(params: Params, centre, scale) -> Params:
    """Parameters of the normalised image -> parameters of image = centre + scale * it."""
    off = params.background.offset * scale
    off = off.at[0, 0, 0].add(centre)
    return Params(
        Particles(params.particles.pos, params.particles.radius, params.particles.amplitude * scale),
        params.psf, Background(off, params.background.illum))


def to_normalised_units(params: Params, centre, scale) -> Params:
    off = params.background.offset.at[0, 0, 0].add(-centre) / scale
    return Params(
        Particles(params.particles.pos, params.particles.radius, params.particles.amplitude / scale),
        params.psf, Background(off, params.background.illum))


class BorderError(ValueError):
    """All ``n`` positions lie too near a face for the shape fit to see their light (the
    fit leaves out ``border`` = (z, y, x) voxels at each face); ``advice`` ends the
    message (callers reword it: ``refine_positions`` has no ``border``)."""

    def __init__(self, n, border, advice):
        super().__init__(
            f"all {n} positions lie within the border (z, y, x) = {border} voxels of a face, "
            "too far from the region the fit uses for their light to reach it (light of "
            "particles outside the stack falls there): the shape cannot be learned from "
            f"them. {advice}")
        self.n, self.border = n, border


# the prior on the PSF's free-form grid (PSF.log_grid): GRID_PRIOR * sum(g^2) in chi^2
# units, g its mirror average (PSF.symmetric_grid). Where the light defines the kernel it
# hardly matters (1 and 10 gave the same positions on dev_peri_r4_phi48_bright); where it
# does not, it holds the grid at 0.
GRID_PRIOR = 10.0


def check_psf_depth(psf_depth):
    """ValueError unless ``psf_depth`` is one of ``fit_shape``'s values."""
    if psf_depth not in (False, True, "asymmetry"):
        raise ValueError(f"psf_depth must be False, True or 'asymmetry'; got {psf_depth!r}")


def with_psf_freedoms(psf: PSF, psf_depth=False, psf_aspect=False) -> PSF:
    """``psf`` with the freedoms ``fit_shape``'s ``psf_depth`` and ``psf_aspect`` ask for
    (zero to start: the same image)."""
    check_psf_depth(psf_depth)
    if psf_depth:
        psf = psf.with_depth(widths=psf_depth is True)
    return psf.with_aspect() if psf_aspect else psf


def check_boundary(boundary):
    """``boundary`` must be "open" (a microscope's stack) or "periodic" (light wrapping
    around, as a circular FFT convolution over the stack renders it)."""
    if boundary not in ("open", "periodic"):
        raise ValueError(f"boundary must be 'open' or 'periodic'; got {boundary!r}")
    return boundary == "periodic"


def make_geometry(shape, voxel_size, radius, psf: PSF, *, bg_degree=(2, 2, 2),
                  illum_degree=(2, 2, 2), periodic=False):
    """Layout with room for radii up to 1.35 R and PSF components up to 3.5 of their
    initial std (``periodic``: ``Geometry.periodic``)."""
    sz = float(np.max(np.exp(np.asarray(psf.log_sigma_z)) + np.abs(np.asarray(psf.z_offset))))
    sxy = float(np.max(psf.widest_lateral_sigmas()))
    return Geometry.make(shape, voxel_size, max_radius=1.35 * radius,
                         psf_extent=(3.5 * sz, 3.5 * sxy),
                         bg_degree=bg_degree, illum_degree=illum_degree, periodic=periodic)


def _radius_bounds(geom: Geometry, radius):
    hi = min((h - 1.5) * v for h, v in zip(geom.patch_half, geom.voxel_size))
    return 0.3 * radius, hi


def radius_spread_penalty(R, mask, kappa):
    """kappa * sum_i mask_i (R_i - mean R)^2, the mean over the particles of ``mask``: a
    Gaussian prior on how far each radius lies from the common one. It leaves the common
    radius free (zero gradient along a shift of every radius) and holds a radius the light
    does not define: in a blurred, dense stack a particle's radius, its amplitude and its
    neighbours' trade light almost freely, and without the prior some radii run to the
    lower bound (their particles then look implausible and are removed) while their
    neighbours swell."""
    mean = jnp.sum(mask * R) / jnp.maximum(jnp.sum(mask), 1.0)
    return kappa * jnp.sum(mask * (R - mean) ** 2)


def _loss(free, pos, data, weight, amplitude_mask, bounds, *, static):
    """Weighted mean squared residual of the normalised image, plus weak priors.
    ``bounds``: (lowest radius, highest radius, curvature of the radius-spread prior in
    the units of sum(weight r^2): ``radius_spread_penalty``, curvature of the prior on
    the PSF's free-form grid in the same units: ``grid_prior`` * sum(g^2), g the grid's
    mirror average ``PSF.symmetric_grid``)."""
    geom, hold_psf, hold_illum, hold_radius = static
    lo, hi = bounds[0], bounds[1]  # traced: a new radius does not recompile the step
    radius, amplitude, psf, background = free
    if hold_psf:  # zero gradient: L-BFGS leaves the PSF exactly where it is
        psf = jax.lax.stop_gradient(psf)
    if hold_radius:  # (and the renderer skips the ball's radius derivative: faster steps)
        radius = jax.lax.stop_gradient(radius)
    if hold_illum:
        background = dataclasses.replace(background, illum=jax.lax.stop_gradient(background.illum))
    R = jnp.clip(radius, lo, hi)
    params = Params(Particles(pos, R, amplitude * amplitude_mask), psf, background)
    r = data - render(params, geom)
    spread = radius_spread_penalty(R, amplitude_mask, bounds[2])
    if psf.log_grid is not None:
        spread = spread + bounds[3] * jnp.sum(psf.symmetric_grid() ** 2)
    prior = 1e-4 * jnp.sum(background.illum**2)
    return (jnp.sum(weight * r * r) + spread) / jnp.sum(weight) + prior


def effective_border(shape, border):
    """``border`` (z, y, x voxels) as ``border_weight`` applies it: at least 0, at most a
    third of each axis."""
    return np.asarray([min(max(int(b), 0), n // 3) for b, n in zip(border, shape)])


def border_weight(shape, border):
    """1 inside, 0 within ``border`` = (z, y, x) voxels of a face (float32 (z, y, x)).

    Particles whose centres lie outside the stack are unknown to a fit, but their light
    reaches about a radius plus the PSF's reach into it; fitting those voxels would
    bend the shape and background to explain light that belongs to missing particles.
    A border too wide for the stack is shrunk so that at least a third of each axis stays.
    """
    w = np.ones(shape, np.float32)
    for k, (n, b) in enumerate(zip(shape, effective_border(shape, border))):
        if b:
            sl = [slice(None)] * 3
            sl[k] = slice(0, b)
            w[tuple(sl)] = 0
            sl[k] = slice(n - b, n)
            w[tuple(sl)] = 0
    return w


def fit_parameters(params: Params, data_n, geom: Geometry, *, radius, weight=None, steps=200,
                   tol=1e-7, progress=None, amplitude_mask=None, hold_psf=False,
                   hold_illum=False, radius_prior=0.0, grid_prior=0.0, hold_radius=False):
    """L-BFGS on radii, amplitudes, PSF and background with positions held.

    ``data_n``: the normalised image (float32 jax array); ``weight``: per-voxel weight of
    the residual (default 1); ``amplitude_mask``: 1 for particles that exist, 0 for empty
    slots of a fixed-capacity buffer (default all 1); ``hold_psf``: keep the PSF as given
    (fit only radii, amplitudes and background); ``hold_illum``: keep the illumination
    field as given; ``hold_radius``: keep the radii as given; ``radius_prior``: curvature
    of the radius-spread prior (``radius_spread_penalty``) in the units of sum(weight r^2)
    (0: none); ``grid_prior``: curvature of the prior on the PSF's free-form grid
    (``PSF.log_grid``) in the same units; returns (params, history).
    """
    weight = jnp.ones(geom.shape, jnp.float32) if weight is None else jnp.asarray(weight)
    n = params.particles.amplitude.shape[0]
    amask = jnp.ones((n,), jnp.float32) if amplitude_mask is None else jnp.asarray(amplitude_mask)
    bounds = _radius_bounds(geom, radius)
    free = (params.particles.radius, params.particles.amplitude, params.psf, params.background)
    pos = params.particles.pos
    bounds3 = jnp.asarray([*bounds, radius_prior, grid_prior], jnp.float32)
    free, history = minimize(_loss, free, (pos, data_n, weight, amask, bounds3),
                             static=(geom, bool(hold_psf), bool(hold_illum), bool(hold_radius)),
                             steps=steps, tol=tol, progress=progress, what="shape fit")
    radius_, amplitude, psf, background = free
    params = Params(Particles(pos, jnp.clip(radius_, *bounds), amplitude * amask), psf, background)
    return params, history


def initial_params(data_n, pos, geom: Geometry, *, radius, sign, psf: PSF, weight=None) -> Params:
    """Starting point: equal radii and brightness, B and the common amplitude from a
    two-parameter linear least-squares fit of B + alpha * render(unit amplitudes)."""
    n = pos.shape[0]
    unit = Params(Particles(pos, jnp.full((n,), radius, jnp.float32), jnp.full((n,), sign, jnp.float32)),
                  psf, Background.constant(0.0, geom))
    u = np.asarray(render(unit, geom), np.float64).ravel()
    d = np.asarray(data_n, np.float64).ravel()
    if weight is not None:
        keep = np.asarray(weight).ravel() > 0
        u, d = u[keep], d[keep]
    A = np.stack([np.ones_like(u), u], axis=1)
    (b0, alpha), *_ = np.linalg.lstsq(A, d, rcond=None)
    alpha = max(float(alpha), 1e-3)
    return Params(Particles(pos, unit.particles.radius, unit.particles.amplitude * alpha), psf,
                  Background.constant(float(b0), geom))


def fit_shape(image, positions, *, voxel_size=None, radius=None, invert="auto", steps=300,
              n_components=3, elongation=2.5, border="auto", progress=False, psf=None,
              psf_grid=False, psf_depth=False, psf_aspect=False, tail_weight=None,
              boundary="open") -> Model:
    """Learn the particle shape S, radii, amplitudes and background with positions held.

    Parameters
    ----------
    image : array (z, y, x), any real dtype; not modified.
    positions : array (n, 3), voxels (z, y, x), voxel centres at integer indices; each
        within the stack (a voxel's half-width beyond a face at most... see below).
    voxel_size : (z, y, x) physical voxel size, or a scalar; None means voxels.
    radius : particle radius in the unit of voxel_size; None estimates it from the
        positions (half the median nearest-neighbour distance, right for dense packings).
    invert : "auto" (decide from the light at the positions), True (dark particles on a
        bright background), False (bright particles).
    steps : maximum L-BFGS iterations.
    n_components : Gaussian components of the PSF.
    elongation : starting guess of the PSF's z/xy elongation.
    border : voxels (z, y, x) next to each face left out of the fit, where light from
        particles outside the stack (absent from ``positions``) may fall; "auto" is the
        radius plus two starting PSF widths; 0 fits every voxel. At least one particle
        must reach past it (else ValueError: nothing to learn the shape from).
    psf : a ``shape.PSF`` learned before (e.g. ``model.psf`` of an earlier frame of the
        same microscope) to hold fixed; None learns it (``n_components``, ``elongation``).
    psf_grid : also learn a free-form correction of the PSF on its voxel grid
        (``PSF.log_grid``, held near 0 by a prior of ``GRID_PRIOR`` chi^2 per unit of
        log_grid^2): a second fit after the Gaussians' one; ignored when ``psf`` is
        given.
    psf_depth : let the PSF change linearly with depth (``PSF.with_depth``): True its
        widths and its asymmetry, ``"asymmetry"`` the asymmetry alone (each component's
        axial offset, the centroid held), False neither; ignored when ``psf`` is given.
    psf_aspect : let each PSF component's lateral widths differ between y and x
        (``PSF.with_aspect``; a line-scan confocal's PSF is elliptic); ignored when
        ``psf`` is given.
    tail_weight : the starting weight of the PSF's tails together, against 1 for its
        core (``PSF.init``; None: ``shape.TAIL_WEIGHT``, 0.15); ignored when ``psf`` is
        given. Below ~1% the tails are starved (softmax: their gradient vanishes
        with their weight) and the fit learns the core alone.
    boundary : "open" (default: a microscope's stack; light of particles beyond a face
        falls in, none wraps around) or "periodic": the stack's light wraps around its
        faces and each ball is cut at them, as a simulator that convolves the stack by
        FFT without padding renders it (the partial-volume dev stacks are made so). Never
        for data from a microscope.

    Returns
    -------
    Model, with ``.model_image()`` in the units of ``image``.
    """
    check_psf_depth(psf_depth)
    periodic = check_boundary(boundary)
    image = check_stack(image)
    vs = check_voxel_size(voxel_size)
    vs_eff = vs if vs is not None else (1.0, 1.0, 1.0)
    pos = check_positions(positions, shape=image.shape)
    if len(pos) == 0:
        raise ValueError("positions is empty: fit_shape needs at least one particle")
    if radius is None:
        radius = estimate_radius_from_positions(pos, vs_eff)
    radius = float(radius)
    if not (np.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be positive and finite; got {radius}")
    extent = np.asarray(image.shape) * np.asarray(vs_eff)
    if radius > 0.5 * float(extent.max()):
        raise ValueError(f"radius {radius} is larger than the stack (extent {tuple(extent)})")
    sign = _decide_sign(image, pos, invert)
    centre, scale = _normalise(image)
    data_n = jnp.asarray((image.astype(np.float32) - np.float32(centre)) / np.float32(scale))

    hold_psf = psf is not None
    if hold_psf:
        if not isinstance(psf, PSF):
            raise TypeError(f"psf must be a difftrack.shape.PSF (e.g. model.psf); got {type(psf).__name__}")
        sxy = float(np.max(psf.widest_lateral_sigmas()))
        elongation = float(np.max(np.exp(np.asarray(psf.log_sigma_z)))) / sxy
    else:
        sxy, sz = default_psf_sigmas(vs_eff, elongation)
        sxy = max(sxy, 0.2 * radius)
        psf = with_psf_freedoms(PSF.init(sxy, elongation * sxy, n_components, tail_weight),
                                psf_depth, psf_aspect)
    geom = make_geometry(image.shape, vs_eff, radius, psf, periodic=periodic)
    pos_j = jnp.asarray(pos, jnp.float32)
    if isinstance(border, str):
        if border != "auto":
            raise ValueError(f"border must be 'auto' or voxels (z, y, x); got {border!r}")
        reach = (radius + 2 * elongation * sxy, radius + 2 * sxy, radius + 2 * sxy)
        border = [int(math.ceil(r / v)) for r, v in zip(reach, vs_eff)]
    border = np.broadcast_to(np.asarray(border, int), (3,))
    weight = border_weight(image.shape, border)
    # the shape is learned from the light inside the border: some particle's light (its
    # ball, blurred by about one starting PSF width, half a voxel for the rounding) must
    # reach it
    b_eff = effective_border(image.shape, border)
    r_vox = (radius + np.asarray([elongation * sxy, sxy, sxy])) / np.asarray(vs_eff) + 0.5
    lit = np.all((pos >= b_eff - r_vox) & (pos <= np.asarray(image.shape) - 1 - b_eff + r_vox), axis=1)
    if not lit.any():
        raise BorderError(len(pos), tuple(b_eff.tolist()),
                          "Give at least one position farther inside the stack, or a smaller "
                          "border (``border``)")
    p0 = initial_params(data_n, pos_j, geom, radius=radius, sign=sign, psf=psf, weight=weight)
    validate(p0, geom)
    cb = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="fit_shape", leave=False)
        cb = lambda i, v: (bar.update(1), bar.set_postfix(loss=f"{v:.4g}"))  # noqa: E731
    params, history = fit_parameters(p0, data_n, geom, radius=radius, weight=weight, steps=steps,
                                     progress=cb, hold_psf=hold_psf)
    if psf_grid and not hold_psf:
        # the loss is a mean weighted squared residual, about the noise variance at the
        # optimum (plus the Gaussians' misfit, so the prior is a little stronger where the
        # grid is most needed): the prior in chi^2 units is GRID_PRIOR times that
        s2 = float(history[-1])
        core = params.psf.core_half(geom.voxel_size, geom.kernel_half)
        params = dataclasses.replace(params, psf=params.psf.with_grid(core))
        params, more = fit_parameters(params, data_n, geom, radius=radius, weight=weight,
                                      steps=steps, progress=cb, grid_prior=GRID_PRIOR * s2)
        history = tuple(history) + tuple(more)
    if progress:
        bar.close()
    params = to_image_units(params, centre, scale)
    return Model(params=params, geometry=geom, voxel_size=vs, loss=float(history[-1]) * scale**2,
                 history=tuple(h * scale**2 for h in history), weight=weight)
