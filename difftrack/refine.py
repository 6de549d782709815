"""Refinement: fit the whole image, add particles at residual peaks, remove spurious ones,
report uncertainties.

The loop (``refine_positions``):

1. ``fit_shape`` learns S, radii, amplitudes and background with the starting centres held.
2. A noise model var(m) = a + b * m is measured on the residual (robustly: median of r^2
   per brightness bin), so photon-counting data get Poisson-aware weights and stacks of
   unknown gain (8-bit) are calibrated from themselves.
3. Rounds of: addition at the peaks of the residual's matched-filter gain map above the
   penalty; a shape fit (PSF, radii, amplitudes, background; centres held; PSF components
   the softmax has starved put back first, ``_revive_components``); a joint
   weighted least-squares fit of positions, radii, amplitudes and background (L-BFGS,
   PSF held; a hard-sphere overlap penalty keeps particles from merging); removal of
   particles whose light does not pay (chi^2 gain below the penalty), that overlap a
   neighbour beyond what hard spheres allow, or whose amplitude is implausible. From the
   second round, split moves: a particle that may be several merged into one (a residual
   peak too close to it, light it does not explain, a radius too large) is replaced by
   two or more, kept only if that pays against the same round without it
   (``judge_splits``). Until a round neither adds nor removes.
4. Per-particle sigma_z, sigma_y, sigma_x from the Fisher information of the fitted model
   (each particle's position, amplitude and radius, with those of its most strongly
   coupled neighbours free too: ``fisher.coupled_covariance``), and a fit quality (local
   residual over noise).

Model selection penalty: a particle is kept only if it lowers chi^2 by more than
``penalty`` = 5 ln(n_voxels) (BIC for its five parameters): pure noise never pays that.
A particle centred outside the stack (never listed; it explains the light shed in at a
face) pays ``OUTSIDE_PENALTY`` = half of it.

Particles live in a fixed-capacity buffer with a mask, so adding or removing does not
change array shapes (no recompilation) until the buffer grows.
"""

from __future__ import annotations

import dataclasses
import math
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.fft
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.stats import trim_mean

from ._checks import check_positions, check_stack, check_voxel_size
from .detect import _ellipsoid
from .fisher import at_voxels, coupled_covariance, own_blocks
from .metrics import _interior
from .model import (GRID_PRIOR, BorderError, Model, _normalise, check_psf_depth, fit_parameters, fit_shape,
                    radius_spread_penalty, to_image_units, to_normalised_units, with_psf_freedoms)
from .optimize import minimize
from .render import (Params, Particles, background_field, correlate, gather_patches,
                     illumination_field, kernel_on_grid, patch_values, render, render_parts,
                     stack_region, to_canvas)
from .shape import voxel_ball


@dataclasses.dataclass(frozen=True)
class NoiseModel:
    """Per-voxel noise variance var = a + b * max(m - m0, 0) (image units), m the model."""

    a: float
    b: float
    m0: float

    def variance(self, model):
        return self.a + self.b * np.maximum(np.asarray(model, np.float64) - self.m0, 0.0)


def estimate_noise(image, model, weight=None, bins=16) -> NoiseModel:
    """Fit var = a + b (m - m0) to the residual, robustly (median of r^2 / 0.4549 per
    quantile bin of the model, so unexplained particles do not inflate it)."""
    r = np.asarray(image, np.float64) - np.asarray(model, np.float64)
    m = np.asarray(model, np.float64)
    if weight is not None:
        keep = np.asarray(weight) > 0
        r, m = r[keep], m[keep]
    r, m = r.ravel(), m.ravel()
    m0 = float(np.min(m))
    edges = np.unique(np.quantile(m, np.linspace(0, 1, bins + 1)))
    idx = np.clip(np.searchsorted(edges, m, side="right") - 1, 0, len(edges) - 2)
    xs, vs = [], []
    for k in range(len(edges) - 1):
        sel = idx == k
        if sel.sum() >= 50:
            xs.append(np.mean(m[sel]) - m0)
            vs.append(np.median(r[sel] ** 2) / 0.45494)  # median of chi^2_1
    xs, vs = np.asarray(xs), np.asarray(vs)
    if len(xs) >= 2 and np.ptp(xs) > 0:
        b, a = np.polyfit(xs, vs, 1)
    else:
        b, a = 0.0, float(np.mean(vs)) if len(vs) else float(np.var(r))
    if b < 0:
        b, a = 0.0, float(np.median(vs))
    a = max(float(a), 1e-6 * float(np.var(r)) + 1e-12)
    return NoiseModel(a=a, b=float(b), m0=m0)


@dataclasses.dataclass(frozen=True)
class RefineResult:
    """What ``refine_positions`` returns.

    particles: DataFrame z, y, x (voxels), sigma_z, sigma_y, sigma_x (voxels), amplitude
        (image units), radius (unit of voxel_size), quality (local RMS of residual / noise;
        ~1 for a good fit), and z_um, y_um, x_um when the voxel size is known. Only centres
        inside the stack (-0.5 .. n-0.5 on each axis) are listed.
    model: the fitted ``Model`` (``model.model_image()``; all particles, also those whose
        centres lie just outside).
    noise: the ``NoiseModel``.
    stats: dict with rounds, added, removed, steps (of all joint fits), joint_fits, final
        chi^2 per voxel, seconds,
        seconds_by_phase (shape fit, joint fit, add, remove), fits (every fit in order:
        kind, L-BFGS steps, seconds with compiles), gauge_shift (the common z
        shift taken out at the end, voxels; absent when none was), gauge_radius (the gauge
        counts the starts this far from every face; the unit of voxel_size), splits_tried
        and splits_kept (split moves, ``split``), split_log (each judged split:
        z, y, x of the particle split, its penalised gain in -2 log likelihood over its box,
        its rivals, the particles it was split into, kept), ...
    """

    particles: pd.DataFrame
    model: Model
    noise: NoiseModel
    stats: dict


# ----------------------------------------------------------------------------------------
# the joint fit


def _joint_loss(free, psf, data, w, mask, pairs, pair_mask, rbounds, *, static):
    """chi^2 per voxel of the model (positions, radii, amplitudes, background, PSF), plus
    a hard-sphere overlap penalty: the objective of every fit in ``refine_positions``.

    Those fits never free the positions and the PSF together: a common z shift of every
    particle and the opposite shift of an asymmetric PSF give the same image, so fitting
    both at once lets the positions drift along that direction (measured: 0.3-0.5 voxel
    in z on PERI stacks). The PSF is learned with the positions held and the positions
    with the PSF held, in alternation.
    """
    geom, (plo, phi), overlap = static
    # traced (static would recompile for every radius): lowest and highest radius, the
    # curvature of the radius-spread prior (chi^2 units; model.radius_spread_penalty) and
    # (used by _whitened_loss only) the trust region's radius
    rlo, rhi = rbounds[0], rbounds[1]
    pos_free, radius, amplitude, background = free
    pos = jnp.clip(pos_free, jnp.asarray(plo), jnp.asarray(phi))
    R = jnp.clip(radius, rlo, rhi)
    # soft walls beyond the clips: a parameter past its bound must still feel the loss,
    # or a quasi-Newton step carries it off along the flat direction
    wall = jnp.sum((pos_free - pos) ** 2, axis=1) + ((radius - R) / rlo) ** 2
    params = Params(Particles(pos, R, amplitude * mask), psf, background)
    r = data - render(params, geom)
    chi2 = jnp.sum(w * r * r)
    vs = jnp.asarray(geom.voxel_size)
    i, j = pairs[:, 0], pairs[:, 1]
    d = jnp.sqrt(jnp.sum(((pos[i] - pos[j]) * vs) ** 2, axis=1) + 1e-12)
    ov = jnp.maximum(overlap * (R[i] + R[j]) - d, 0.0) / (0.5 * (R[i] + R[j]))
    pen = 1e4 * (jnp.sum(pair_mask * mask[i] * mask[j] * ov * ov) + jnp.sum(mask * wall))
    return (chi2 + pen + radius_spread_penalty(R, mask, rbounds[2])) / data.size


def _from_whitened(u, base, M, s_off):
    """The joint fit's parameters at whitened coordinates ``u`` = (per particle (n, 5),
    background offset coefficients), ``base`` = (positions, radii, amplitudes,
    background) being u = 0: particle i's (z, y, x, amplitude, radius) is
    base_i + M_i u_i, every offset coefficient base + s u; the illumination is held."""
    up, uoff = u
    pos, rad, amp, bg = base
    th = jnp.einsum("nij,nj->ni", M, up)
    return (pos + th[:, :3], rad + th[:, 4], amp + th[:, 3],
            dataclasses.replace(bg, offset=bg.offset + s_off * uoff))


def _whitened_loss(u, base, M, s_off, anchor, psf, data, w, mask, pairs, pair_mask, rbounds, *,
                   static):
    """``_joint_loss`` at whitened coordinates (``_from_whitened``), plus the trust region:
    a soft wall beyond ``rbounds[3]`` (physical distance) from each particle's ``anchor``,
    where it entered the loop. With M_i M_i^T the
    inverse of particle i's own Fisher block and s the inverse square root of each offset
    coefficient's curvature, the curvature is about the identity for every particle, its
    amplitude-radius and position-radius correlations included: L-BFGS, whose few-vector
    memory cannot learn thousands of separate 5x5 curvatures, is left with the
    neighbours' coupling only, and a step of 1 is one standard deviation.

    Returned as chi^2 / 2 (not per voxel), whose curvature in u is then about the
    identity: L-BFGS's first step, the plain negative gradient, is already about a
    Newton step for each particle. Per voxel, its first steps were ~1e-5 of that, and
    L-BFGS spent its first 5-10 steps finding the scale (the fit's ``xtol`` stop could
    take that crawl for convergence: measured on a blurred dense stack, where it
    stopped after 5 steps 7,800 chi^2 short of the minimum)."""
    free = _from_whitened(u, base, M, s_off)
    vs = jnp.asarray(static[0].voxel_size)
    dist = jnp.sqrt(jnp.sum(((free[0] - anchor) * vs) ** 2, axis=1) + 1e-12)
    excess = jnp.maximum(dist - rbounds[3], 0.0) / rbounds[3]
    chi2 = data.size * _joint_loss(free, psf, data, w, mask, pairs, pair_mask, rbounds,
                                   static=static)
    return 0.5 * (chi2 + 1e4 * jnp.sum(mask * excess * excess))


# refine's PSF kernel reaches this many stds of the learned PSF's strongest component
# (PSF.core_half), at most as far as fit_shape's. 7 was 1.6x faster than fit_shape's on the
# 4,558-particle speed stack but cost accuracy there (z 1.63 -> 1.78x the CRLB) and on
# dev_small_dense (3-13%); 10 gave back 1.68 and better than before on dev_small_dense
# (docs/refine.md, sixteenth session)
KERNEL_REACH = 10.0
# the fraction of the starts' z displacements cut at each end for the z gauge's mean
GAUGE_TRIM = 0.1

DEAD_WEIGHT = 0.01
REVIVED_WEIGHT = 0.05


def _as_tails(psf, reset, weights):
    """``psf`` with the components in the boolean mask ``reset`` put back as wider tails of
    the strongest one (``PSF.init``'s 2x, 4x, ... its widths at its axial offset; with
    depth, widening with depth as it does) and the mixture weights set to ``weights``."""
    k0 = int(np.argmax(np.asarray(psf.weights)))
    lxy, lz, off = (np.asarray(a, np.float64).copy() for a in (psf.log_sigma_xy, psf.log_sigma_z,
                                                                psf.z_offset))
    for j, k in enumerate(np.flatnonzero(reset)):
        lxy[k], lz[k], off[k] = lxy[k0] + (j + 1) * np.log(2.0), lz[k0] + (j + 1) * np.log(2.0), off[k0]
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    out = dataclasses.replace(psf, log_sigma_xy=f32(lxy), log_sigma_z=f32(lz), z_offset=f32(off),
                              logit_weight=f32(np.log(weights)))
    for name in ("depth_log_sigma_xy", "depth_log_sigma_z", "depth_z_offset", "log_aspect"):
        if getattr(psf, name) is not None:
            d = np.asarray(getattr(psf, name), np.float64).copy()
            d[reset] = d[k0]
            out = dataclasses.replace(out, **{name: f32(d)})
    return out


def _revive_components(psf):
    """A PSF whose components of weight below ``DEAD_WEIGHT`` (a mixture component that
    softmax has starved: its gradient vanishes with its weight, so the fit never brings it
    back) are put back at ``REVIVED_WEIGHT`` each, as wider tails of the strongest one
    (``_as_tails``), the others' weights scaled to make room."""
    w = np.asarray(psf.weights, np.float64)
    dead = w < DEAD_WEIGHT
    if not dead.any() or dead.all():
        return psf
    return _as_tails(psf, dead, np.where(dead, REVIVED_WEIGHT,
                                         w * (1 - REVIVED_WEIGHT * dead.sum()) / w[~dead].sum()))


def _fresh_tails(psf):
    """``psf`` with only its strongest component kept (its widths, axial offset and
    free-form grid) and every other one put back as ``PSF.init``'s tails (``_as_tails``),
    weights 0.85 for it and 0.15 shared by the tails. A shape fit from rough centres puts
    their errors and the light of missing particles into the tails (a haze offset by many
    voxels along z, a thin sheet), and the later fits from better centres do not leave
    that basin (docs/refine.md, eighteenth session)."""
    w = np.asarray(psf.weights, np.float64)
    if len(w) == 1:
        return psf
    k0 = int(np.argmax(w))
    rest = np.arange(len(w)) != k0
    return _as_tails(psf, rest, np.where(rest, 0.15 / (len(w) - 1), 0.85))


# the tails' starting weight (together, against 1 for the core) in the first shape fit
# (fit_shape's, from the rough starts): starved, so that it learns the core alone; the
# first round's shape fit revives them (_revive_components, REVIVED_WEIGHT each) once the
# missing particles are in the model. From fit_shape's usual 0.15 the rough centres'
# errors went into the tails: on the simulator's (0.3, 2.5 px, 1) corner, seed 1, a tail
# took 66% of the light and recall fell to 0.936 (docs/refine.md, twenty-first session)
FIRST_TAIL_WEIGHT = 0.004

# split moves (refine_positions's ``split``): a particle at least as large as the median
# whose quality lies this many robust standard deviations above the median is proposed
# for a split (along ``SPLIT_AXIS``)
SPLIT_QUALITY = 2.0
# ... and so is a particle whose radius lies this many polydispersity stds above the
# median (or against its upper bound)
SPLIT_RADIUS = 3.0
# ... unless it lies closer than this many radii to a face: there the light of the
# particles beyond it, never fitted as well as those inside, paid for false splits. At 1
# radius every split kept on dev_small_dense and dev_large (which crop a larger packing)
# lay 1.1-2.5 radii from a face, every one kept on dark PERI 2.7-6.5; the near-face ones
# cost dev_small_dense seed 0 recall (0.999, 0.998 against 1.000) in the two versions that
# allowed them, for no gain in RMSE over five runs (docs/refine.md, twenty-fourth session)
SPLIT_FACE_MARGIN = 2.5
# the line a split by quality or radius is made along: "z" or, experimental, "residual"
# (the excess of the residual's second moment, ``_split_axis``; z where it has none). On
# a toy pair diagonal in z-x "residual" finds both (tests/test_refine.py); on dark PERI
# seeds 0 / 1 / 2 it kept more splits, some of particles within 0.5-1.4 voxel of a true
# one (light the model does not explain, aimed at), and recall went 0.996 / 0.993 /
# 0.996 -> 0.993 / 0.968 / 0.996 (docs/refine.md, twenty-fifth session)
SPLIT_AXIS = "z"
# ... and so is a particle this many times the median radius (whatever the
# polydispersity): on dark PERI seed 4 a void of four missing particles at depth was held
# by two particles of radius 4.1 and 4.5 (median 3.0), sliding between their light; on
# the four dev stacks, away from the faces, no fitted radius passed 1.19x the median. Such
# a particle is split into as many whole particles as its volume holds, (R / median)^3
# rounded down, 2 to ``SPLIT_MAX`` (``split_moves``)
FAT_RADIUS = 1.3
# ... and tried down to this many (median) radii from a face if FAT_RADIUS x the median:
# seed 4's void lay 5.9-9.5 voxels (2-3 radii) from the bottom face, and with
# ``SPLIT_FACE_MARGIN`` its fat particles were never split (recall 0.975; 0.989 with 1
# radius). The false splits that set that margin on the partial-volume stacks were by
# quality, not radius; one of a particle 1.05x the median (fat by a lowered
# ``SPLIT_RADIUS``) was kept near a face of a toy stack (tests/test_refine.py)
FAT_FACE_MARGIN = 1.0
SPLIT_MAX = 4

# experimental, off: refine's shape fits (after fit_shape's) hold the radii, which every
# joint fit fits (PSF, amplitudes and background only). Their steps take half the time (no
# radius derivative of the ball): shape fits 2.2x, refine ~1.5x faster on dark PERI; bright
# PERI seeds 0 the same, but dark PERI z 7-23% worse over seeds 0-2 (docs/refine.md,
# twenty-fifth session)
SHAPE_HOLDS_RADII = False

# experimental, off: the first round's shape fit (the first with the missing particles
# added) also runs from fresh tails (``_fresh_tails``) and keeps the lower final loss.
# Where fresh tails won, by 0.007-0.25% of the loss, in 4 of 5 runs by less than the fit
# from the PSF as it was still gained over its last 50 steps; dev_large z RMSE over seeds
# 0-2 went 3.62 -> 3.05, 5.96 -> 5.99, 5.27 -> 5.85 CRLB: a choice between unfinished
# fits, within the spread between starts (docs/refine.md, nineteenth and twentieth sessions)
TAIL_RESTART = False


def _split_axis(resid, box, centre, v, R, sign=1.0):
    """The line along which the light in ``box`` is spread more than the model's: the top
    eigenvector of the residual's second moment about ``centre`` (physical units; the
    residual times ``sign``, the particles' sign, so that missing light is positive),
    over the voxels within 3 radii of it. A pair fitted as one between them leaves light
    missing at both ends of its axis and too much in the middle: the excess lies along the
    pair's axis, whatever the PSF (which blurs the model and the data alike). None if no
    axis has an excess. (Within 2 radii the window cut the z-elongated light and tilted a
    diagonal pair's axis 10-11 degrees towards x; within 3, 1.8 at most:
    tests/test_refine.py.)"""
    idx = np.meshgrid(*[np.arange(b.start, b.stop) for b in box], indexing="ij")
    d = np.stack([(i - c) * vv for i, c, vv in zip(idx, centre, v)], axis=-1)
    near = np.sum(d * d, axis=-1) <= (3.0 * R) ** 2
    d, r = d[near], sign * np.asarray(resid[box])[near]
    M = (d * r[:, None]).T @ d
    val, vec = np.linalg.eigh(M)
    return vec[:, -1] if val[-1] > 0 else None


def _light_centres(light, box, centre, v, reach, k, restarts=8, seed=0):
    """``k`` centres (voxels) of the light in ``box`` within ``reach`` (physical) of
    ``centre``: a k-means of the voxels weighted by ``light`` (clipped at 0: a particle's
    own light plus the residual, sign-corrected, is the light its neighbours leave
    unexplained), the best of ``restarts`` k-means++ starts (a fixed seed: the same light
    gives the same centres). None if there is no light."""
    idx = np.meshgrid(*[np.arange(b.start, b.stop) for b in box], indexing="ij")
    X = np.stack([i.ravel() for i in idx], axis=-1).astype(np.float64)
    w = np.clip(np.asarray(light[box], np.float64).ravel(), 0, None)
    d = (X - np.asarray(centre, np.float64)) * np.asarray(v, np.float64)
    near = (np.sum(d * d, axis=1) <= reach * reach) & (w > 0)
    X, w = X[near] * np.asarray(v, np.float64), w[near]  # physical units
    if len(w) < k:
        return None
    def sqd(c):  # squared distance of every voxel to every centre
        return ((X[:, None] - c[None]) ** 2).sum(-1)

    rng = np.random.default_rng(seed)
    best, best_cost = None, np.inf
    for _ in range(restarts):
        c = X[[rng.choice(len(X), p=w / w.sum())]]
        while len(c) < k:  # k-means++: the next start where the light lies far from them
            d2 = np.min(sqd(c), axis=1) * w
            if d2.sum() <= 0:
                return None
            c = np.vstack([c, X[rng.choice(len(X), p=d2 / d2.sum())]])
        for _ in range(50):
            lab = np.argmin(sqd(c), axis=1)
            new = np.stack([(w[lab == i] @ X[lab == i]) / w[lab == i].sum()
                            if w[lab == i].sum() > 0 else c[i] for i in range(k)])
            if np.allclose(new, c, atol=1e-4):
                break
            c = new
        cost = float(np.sum(w * ((X - c[lab]) ** 2).sum(-1)))
        if cost < best_cost:
            best, best_cost = c, cost
    return best / np.asarray(v, np.float64)


@partial(jax.jit, static_argnames=("geom",))
def _offset_scales(params: Params, w, geom):
    """1 / sqrt(sum_v w (d model / d c)^2) for every coefficient c of the background
    offset (the Gauss-Newton diagonal), in the shape of ``params.background.offset``.
    The model depends on the offset only through the additive background field."""
    bg = params.background

    def column(e):
        f = lambda o: background_field(dataclasses.replace(bg, offset=o), geom)  # noqa: E731
        return jnp.sum(w * jax.jvp(f, (bg.offset,), (e.reshape(bg.offset.shape),))[1] ** 2)

    c = jax.lax.map(column, jnp.eye(bg.offset.size, dtype=bg.offset.dtype)).reshape(bg.offset.shape)
    return jnp.where(c > 0, 1.0 / jnp.sqrt(jnp.where(c > 0, c, 1.0)), 0.0)


def _clamp(params: Params, mask, static, rbounds) -> Params:
    geom, (plo, phi), _ = static
    rlo, rhi = rbounds[0], rbounds[1]
    p = params.particles
    return Params(Particles(jnp.clip(p.pos, jnp.asarray(plo), jnp.asarray(phi)),
                            jnp.clip(p.radius, rlo, rhi), p.amplitude * mask),
                  params.psf, params.background)


def _learned_kernel(geom, psf):
    """``geom`` with its PSF kernel cut to ``KERNEL_REACH`` stds of ``psf``'s strongest
    component (``PSF.core_half``), never longer than it was."""
    return geom.with_kernel(psf.core_half(geom.voxel_size, geom.kernel_half, reach=KERNEL_REACH))


def _outside_reach(geom):
    """Voxels (z, y, x) a centre may lie outside the stack: as far as its light can reach
    it, the PSF kernel plus the patch (``rasterise`` cuts a patch that sticks out of the
    canvas). Not the canvas margin alone: with the kernel cut to the learned core
    (``KERNEL_REACH``) that can be shorter than a large particle's radius plus 3 PSF stds,
    and a particle whose light still falls in would be pinned short of its place.
    With a periodic boundary (``Geometry.periodic``) light beyond a face wraps around and
    no particle outside explains it, but a ball centred up to its radius beyond a face is
    cut there and still sheds light in: the patch less its rounding."""
    if geom.periodic:
        return [max(int(h) - 2, 0) for h in geom.patch_half]
    return [int(k + h) for k, h in zip(geom.kernel_half, geom.patch_half)]


def _pairs(pos, mask, reach, capacity):
    """Index pairs of active particles closer than ``reach`` (physical), padded to a
    capacity that grows in steps of 1024 (so the jitted step rarely recompiles)."""
    act = np.flatnonzero(mask > 0)
    if len(act) > 1:
        pr = cKDTree(pos[act]).query_pairs(reach, output_type="ndarray")
        pr = act[pr]
    else:
        pr = np.zeros((0, 2), int)
    cap = max(capacity, int(math.ceil(max(len(pr), 1) / 1024) * 1024))
    out = np.zeros((cap, 2), np.int32)
    out[: len(pr)] = pr
    pm = np.zeros(cap, np.float32)
    pm[: len(pr)] = 1
    return jnp.asarray(out), jnp.asarray(pm), cap


# ----------------------------------------------------------------------------------------
# per-particle quantities (numpy side, between fits)


def _removal_gain(params: Params, resid_w, w, geom):
    """chi^2 increase if each particle were removed (its neighbours held), exactly:
    sum_v w m_i^2 + 2 <m_i, w r>, m_i = PSF * (L a_i ball_i) particle i's light."""
    energy, cross = _gain_terms(params, jnp.asarray(resid_w, jnp.float32),
                                jnp.asarray(w, jnp.float32), geom)
    return np.asarray(energy, np.float64) + 2.0 * np.asarray(cross, np.float64)


@partial(jax.jit, static_argnames=("geom", "batch"))
def _gain_terms(params: Params, resid_w, w, geom, batch=32):
    """(sum_v w m_i^2, <m_i, w r>) for every particle, on each particle's own patch.

    The cross term correlates the weighted residual with the PSF once (FFT) and gathers
    it on the patch. The own energy convolves the patch (times the illumination) with the
    PSF kernel by one small FFT of the patch + kernel window, weighted by w there (w is zero
    outside the stack, so light falling outside does not count): the same light as
    ``render`` gives, without a whole-stack render per particle (with widths that change
    with depth, ``PSF.has_depth``, the middle's kernel: an approximation away from it, as
    in ``_gain_fields`` and ``fisher``).
    """
    vals, corner = patch_values(params.particles, geom)  # a_i ball_i
    L = illumination_field(params.background, geom)
    vals = vals * gather_patches(L, corner, geom)
    kernel = params.psf.kernel(geom.voxel_size, geom.kernel_half)
    cross = jnp.sum(vals * gather_patches(correlate(resid_w, kernel, geom), corner, geom),
                    axis=(1, 2, 3))
    full = tuple(p + k - 1 for p, k in zip(vals.shape[1:], kernel.shape))  # linear convolution
    fshape = tuple(scipy.fft.next_fast_len(f, real=True) for f in full)
    kf = jnp.fft.rfftn(kernel, s=fshape)
    # window i covers stack voxels corner_i - kernel_half + [0, full): cut from the canvas
    # (zero outside the stack) padded by a window (and a patch past the high faces, where
    # a centre may lie a whole margin out), so that no window start is ever clamped
    wpad = jnp.pad(to_canvas(w, geom), [(f, f + 2 * h + 1) for f, h in zip(full, geom.patch_half)])
    start = (corner + jnp.asarray(geom.margin, jnp.int32) - jnp.asarray(geom.kernel_half, jnp.int32)
             + jnp.asarray(full, jnp.int32))

    def energy(x):
        v, s = x
        light = jnp.fft.irfftn(jnp.fft.rfftn(v, s=fshape) * kf, s=fshape)
        light = light[: full[0], : full[1], : full[2]]
        return jnp.sum(jax.lax.dynamic_slice(wpad, (s[0], s[1], s[2]), full) * light * light)

    return jax.lax.map(energy, (vals, start), batch_size=batch), cross


def _quality(params: Params, z2, geom):
    """Local RMS of (residual / noise) over each particle's own voxels (ball > 0.5)."""
    return np.sqrt(np.asarray(_quality_mean(params, jnp.asarray(z2, jnp.float32), geom)))


@partial(jax.jit, static_argnames="geom")
def _quality_mean(params: Params, z2, geom):
    unit = Particles(params.particles.pos, params.particles.radius,
                     jnp.ones_like(params.particles.amplitude))
    vals, corner = patch_values(unit, geom)
    g = gather_patches(to_canvas(z2, geom), corner, geom)
    inside = (vals > 0.5).astype(jnp.float32)
    # voxels of the patch inside the stack only
    ones = gather_patches(to_canvas(jnp.ones(geom.shape, jnp.float32), geom), corner, geom)
    n = jnp.sum(inside * ones, axis=(1, 2, 3))
    return jnp.sum(inside * g, axis=(1, 2, 3)) / jnp.maximum(n, 1.0)


# The addition's candidates outside the stack: at least this fraction of a whole
# particle's light energy (sum w t^2) must fall inside it. A particle centred 2 z voxels
# beyond a face of a stack like dev_small_dense (R 2 z voxels, PSF 3.3x longer along z)
# puts 3% there, 3 voxels 0.6%; its light is concentrated in the outermost slices, and
# without it the particles just inside were pulled towards the face (0.14-0.18 voxel on
# our own simulator, with 0.1 here: docs/refine.md, ninth session). 0.005 was worse on
# dev_large (candidates with so little light inside are poorly placed: recall 0.993);
# the penalty still decides what is added.
MIN_LIGHT_INSIDE = 0.02

# A particle centred outside the stack is never listed: it is in the model only so that
# the light it sheds in is not explained by pulling the particles inside towards the face.
# It pays half the penalty to be added or kept. Pure noise never pays even that: the
# largest gain of pure noise beyond the faces of a 32x64x64 stack like dev_small_dense was
# 13-14 over six draws (the penalty there is 59; tests/test_refine.py checks a smaller
# stack). With the full penalty, half of the particles centred 1-2 z voxels beyond a face
# were missing from the model (docs/refine.md, tenth session).
OUTSIDE_PENALTY = 0.5


def _penalty_at(pos, shape, penalty, outside=OUTSIDE_PENALTY):
    """The chi^2 a particle centred at ``pos`` (..., 3) must explain to be added or kept:
    ``penalty`` inside the stack (-0.5 .. n - 0.5 on every axis), ``outside * penalty``
    beyond its faces."""
    return np.where(_interior(np.asarray(pos), np.asarray(shape), 0.0), penalty, outside * penalty)


def _gain_map(resid_w, w, params: Params, geom, R, sign, reach, min_inside=MIN_LIGHT_INSIDE):
    """chi^2 gain of adding a particle of radius R centred at each voxel of the stack
    extended by ``reach`` voxels (z, y, x) past every face, with its best amplitude:
    (sum w r t)^2 / sum w t^2 (t the unit particle's light; only the stack's voxels count,
    so a particle just outside is found by the light it sheds in). Zero where the best
    amplitude has the wrong sign, and where less than ``min_inside`` of a whole particle's
    light energy (sum w t^2) falls in the stack. Returns (gain, amplitude), on that
    extended grid.
    """
    vs = geom.voxel_size
    h = [int(np.ceil(R / v)) + 2 + k for v, k in zip(vs, geom.kernel_half)]  # template reach
    pad = tuple(int(r) + hh for r, hh in zip(reach, h))  # no wrap-around into the stack
    num, den = _gain_fields(jnp.asarray(resid_w, jnp.float32), jnp.asarray(w, jnp.float32),
                            params.psf, jnp.float32(R), geom=geom, pad=pad,
                            reach=tuple(int(r) for r in reach))
    num, den = np.asarray(num), np.asarray(den)
    # a candidate needs ``min_inside`` of a whole particle's light energy inside the stack
    ok = den > min_inside * np.percentile(den, 99)
    den = np.where(ok, den, 1.0)
    amp = np.where(ok, num / den, 0.0)
    gain = np.where(ok & (np.sign(amp) == sign), num * num / den, 0.0)
    return gain, amp


@partial(jax.jit, static_argnames=("geom", "pad", "reach"))
def _gain_fields(resid_w, w, psf, R, *, geom, pad, reach):
    """``_gain_map``'s correlations on the stack extended by ``reach`` voxels: (sum w r t,
    sum w t^2) for the unit particle's light t centred at each voxel, the stack padded by
    ``pad`` voxels on every side (no wrap-around). Jitted: run eagerly, its ~15 operations
    were compiled one by one for every new layout (a third of refine's compiles on a
    16x40x40 stack, docs/refine.md, twelfth session)."""
    vs = geom.voxel_size
    shp = tuple(scipy.fft.next_fast_len(s + 2 * p, real=True) for s, p in zip(geom.shape, pad))
    ax = []
    for n, v in zip(shp, vs):
        i = np.arange(n)
        ax.append(np.where(i <= n // 2, i, i - n).astype(np.float32) * v)
    ball = voxel_ball(jnp.asarray(ax[0])[:, None, None], jnp.asarray(ax[1])[None, :, None],
                      jnp.asarray(ax[2])[None, None, :], R, vs)
    kernel = psf.kernel(vs, geom.kernel_half)
    tf = jnp.fft.rfftn(ball) * jnp.fft.rfftn(kernel_on_grid(kernel, geom.kernel_half, shp))
    t2f = jnp.fft.rfftn(jnp.fft.irfftn(tf, s=shp) ** 2)

    def place(f):
        return jnp.pad(f, [(p, n - s - p) for p, n, s in zip(pad, shp, geom.shape)])

    num = jnp.fft.irfftn(jnp.fft.rfftn(place(resid_w)) * jnp.conj(tf), s=shp)
    den = jnp.fft.irfftn(jnp.fft.rfftn(place(w)) * jnp.conj(t2f), s=shp)
    sl = tuple(slice(p - r, p + s + r) for p, s, r in zip(pad, geom.shape, reach))
    return num[sl], den[sl]


# ----------------------------------------------------------------------------------------
# the driver


def refine_positions(image, positions, *, voxel_size=None, radius=None, invert="auto",
                     max_rounds=6, steps=150, shape_steps=150, xtol=0.02, penalty=None, overlap=0.7,
                     noise=None, polish=2, min_amplitude=0.4, polydispersity=0.1, add_passes=3,
                     max_move=1.0, gauge=True, neighbours=12, progress=False, verbose=False,
                     psf=None, psf_grid=True, psf_depth=False, psf_aspect=True,
                     outside_penalty=OUTSIDE_PENALTY, split=True, boundary="open") -> RefineResult:
    """Refine rough centres to the best positions the light allows, add the missed
    particles, remove the spurious ones, and give per-particle uncertainties.

    Parameters
    ----------
    image : (z, y, x) array, any real dtype; not modified.
    positions : (n, 3) starting centres, voxels (z, y, x), off by up to ~1 voxel.
    voxel_size : (z, y, x) physical voxel size or None (voxels).
    radius : particle radius (unit of voxel_size); None estimates it from the positions.
    invert : "auto", True (dark particles) or False.
    max_rounds : rounds of fit / remove / add.
    steps : most L-BFGS steps per joint fit; shape_steps: per shape fit (the first one
        and those of every round and polish pass).
    xtol : a joint fit stops when no parameter has moved more than this many of its own
        standard deviations in the last 5 steps.
    penalty : chi^2 a particle must explain to be kept or added; default 5 ln(n_voxels).
    outside_penalty : the fraction of ``penalty`` a particle centred outside the stack
        must explain (it is never listed; it is there so that the light it sheds in at a
        face does not pull the particles inside towards it).
    overlap : centres closer than overlap * (R_i + R_j) are an overlap (hard spheres touch
        at 1); the weaker of such a pair is removed, and the fit is penalised below it.
    noise : a ``NoiseModel`` in image units, or None to measure it from the data.
    polish : passes of (learn the shape with the centres held, refit the centres) at the end.
    min_amplitude : a particle fainter than this fraction of the median particle is
        implausible (removed, never added).
    polydispersity : std of the radii relative to their mean, as a Gaussian prior on
        each radius's distance from the common one (``model.radius_spread_penalty``);
        None: no prior. Where the light defines a radius well the prior hardly matters;
        in blurred, dense stacks it keeps radii (and so amplitudes) from trading light
        with the neighbours.
    add_passes : most passes of the addition per round; each looks at the residual with
        the particles of the passes before it in the model.
    max_move : no centre moves farther than this many radii (the starting median) from
        where it entered the loop (its start, where the addition put it, or where the
        fit that judged its split kept it): a soft wall
        in every joint fit. A particle the light would carry farther is another particle;
        the removal and the addition deal with it. None: no limit.
    gauge : a common z shift of every centre and the opposite shift of the PSF give the
        same image, and the alternating fits drift along it; with ``gauge`` the centres
        are reported in their start's gauge: the interior starts' mean z displacement
        (10% trimmed at each end) is 0 (the PSF shifted to match, the image unchanged). Off when ``psf`` is given.
    neighbours : each particle's uncertainties count this many of its most strongly
        coupled neighbours' parameters as free too (``fisher.coupled_covariance``); 0
        ignores the neighbours (optimistic in dense packings).
    psf : a ``shape.PSF`` learned before (``result.model.psf``, e.g. from an earlier frame)
        to hold fixed instead of learning it; None learns it.
    psf_grid : learn a free-form correction of the PSF on its voxel grid as well
        (``PSF.log_grid`` on the core, as ``fit_shape``'s ``psf_grid``, from refine's first
        shape fit on; ignored when ``psf`` is given). On by default: on
        PERI's exact confocal PSF it lowered the error on every axis of every start tried,
        on stacks whose PSF is a sum of Gaussians it changed little (docs/refine.md,
        fourteenth session). It costs time: 20-40% in the ninth session's runs, which
        also fitted it in a second stage of ``fit_shape``; not measured since.
    psf_depth : let the PSF change with depth (``fit_shape``'s ``psf_depth``: True its
        widths and asymmetry, ``"asymmetry"`` the asymmetry alone; ignored when ``psf``
        is given).
    psf_aspect : let each PSF component's lateral widths differ between y and x
        (``fit_shape``'s ``psf_aspect``, up to ``shape.MAX_ASPECT``; ignored when ``psf``
        is given). On by default since the twenty-ninth session: a line-scan confocal's
        PSF is elliptic (PERI's exact model 1.6-1.9x wider along x), and learned from round
        1 it lowered y and x by 7-12% on each of three starts of bright PERI and by 2-5%
        on average over seven of dark PERI, the recall unchanged; two real stacks fit 3-5%
        closer to their noise; on the round-PSF dev stacks it costs 0-9% on some axes
        (docs/refine.md, twenty-ninth session). ``False`` keeps the PSF round.
    split : split moves, from the second round on: a particle that may be two merged
        into one (z neighbours under an elongated PSF; a residual peak too close to it for
        the addition, light it does not explain, or a radius implausibly large), at least
        ``SPLIT_FACE_MARGIN`` radii from the faces and fitted at least once, is replaced by
        two touching ones, and the pair is kept only if it beats, by the penalty, the same
        round without the split (docs/refine.md, twenty-third and twenty-fourth sessions).
        Costs a joint fit per round with splits.
    boundary : "open" (default: a microscope's stack) or "periodic" (``fit_shape``'s
        ``boundary``): the stack's light wraps around its faces and balls are cut at them,
        as a simulator that convolves by FFT without padding renders it. Then a centre
        may lie up to about a radius beyond a face (its ball cut there), not as far as
        its blurred light reaches, and the Fisher sigma counts all of a cluster's light
        (none is lost beyond a face). The addition proposes with the open template (a
        candidate's light neither cut nor wrapped); the fits judge with the periodic
        model. Experimental: on dev_small_dense z 14-29% lower over two starts, on
        dev_large worse on two of three and from the truth. Never for a microscope's data
        (docs/refine.md, thirty-first session).

    Returns
    -------
    RefineResult
    """
    t0 = time.perf_counter()
    image = check_stack(image)
    vs = check_voxel_size(voxel_size)
    pos0 = check_positions(positions, shape=image.shape)
    if max_move is not None and not (np.isfinite(max_move) and max_move > 0):
        raise ValueError(f"max_move must be a positive number of radii or None; got {max_move}")
    if int(neighbours) != neighbours or neighbours < 0:
        raise ValueError(f"neighbours must be a whole number >= 0; got {neighbours}")
    if not (np.isfinite(outside_penalty) and 0 < outside_penalty <= 1):
        raise ValueError(f"outside_penalty must be a fraction in (0, 1]; got {outside_penalty}")
    if int(add_passes) != add_passes or add_passes < 1:
        raise ValueError(f"add_passes must be a whole number >= 1; got {add_passes}")
    check_psf_depth(psf_depth)
    if len(pos0) == 0:
        raise ValueError("positions is empty: refine needs at least one starting particle "
                         "(run a detector first)")
    try:
        t_first = time.perf_counter()
        shape_model = fit_shape(image, pos0, voxel_size=vs, radius=radius, invert=invert,
                                steps=shape_steps, psf=psf, tail_weight=FIRST_TAIL_WEIGHT,
                                boundary=boundary)
        t_first = time.perf_counter() - t_first
    except BorderError as e:  # the same error, with advice that refine can take
        raise BorderError(e.n, e.border, "Give at least one starting position farther "
                          "inside the stack (the border follows from the radius and the PSF)") from None
    hold_psf = psf is not None
    # fit_shape learned the PSF on a kernel sized from its starting guess (its widest tail,
    # PSF.init's 4x, to 3.5 stds: 14 stds of the guessed core); the fits below use a
    # kernel sized from what it learned: KERNEL_REACH stds of the learned PSF's strongest
    # component. A dense packing's far light is nearly uniform, which the background
    # takes up; the shorter kernel makes every FFT of the fits, the removal's windows and
    # the addition's maps smaller (docs/refine.md, sixteenth session)
    geom = _learned_kernel(shape_model.geometry, shape_model.params.psf)
    vs_eff = geom.voxel_size
    centre, scale = _normalise(image)
    data_n = jnp.asarray((image.astype(np.float32) - np.float32(centre)) / np.float32(scale))
    params = to_normalised_units(shape_model.params, centre, scale)
    if not hold_psf:
        # the PSF's further freedoms are learned from the first of refine's own shape fits
        # on. The grid, not by a second stage of fit_shape's: that was one more compiled
        # fit and its steps, for figures within the spread between starts (docs/refine.md,
        # fourteenth session). Depth and aspect, not from the rough starts: with the
        # missing particles' light still in the data they took that up (dark PERI: from
        # the truth psf_depth is 2.82 2.06 2.04x the bound against 3.10 2.12 1.94 without;
        # from rough starts 3.82 2.29 2.09 against 3.27 2.25 2.00; twenty-eighth session)
        psf_free = params.psf
        if psf_grid:
            psf_free = psf_free.with_grid(psf_free.core_half(geom.voxel_size, geom.kernel_half))
        params = dataclasses.replace(params, psf=with_psf_freedoms(psf_free, psf_depth, psf_aspect))
    # no illumination field (L = 1): every particle's amplitude is free, which takes up
    # the slow changes of brightness; all L could add is a gradient across a particle,
    # which moves its light as a common shift of the positions would (a near-degenerate
    # direction no fit converges along), and extrapolated to the faces it can near zero
    # (then a particle added there gets an absurd amplitude)
    bg = params.background
    params = dataclasses.replace(params, background=dataclasses.replace(bg, illum=jnp.zeros_like(bg.illum)))
    a0 = np.asarray(params.particles.amplitude)
    sign = 1.0 if np.median(a0) >= 0 else -1.0
    R0 = float(np.median(np.asarray(params.particles.radius)))
    measure_noise = noise is None
    if noise is None:
        noise = estimate_noise(image, shape_model.model_image(), shape_model.weight)
    noise_n = NoiseModel(noise.a / scale**2, noise.b / scale, (noise.m0 - centre) / scale)
    penalty = 5.0 * math.log(image.size) if penalty is None else float(penalty)

    def penalty_at(p):
        return _penalty_at(p, image.shape, penalty, outside_penalty)

    rhi = min((h - 1.5) * v for h, v in zip(geom.patch_half, geom.voxel_size))
    rlo = 0.3 * R0  # as model._radius_bounds, so the shape and joint fits agree
    out = _outside_reach(geom)
    plo = tuple(-0.5 - o for o in out)
    phi = tuple(s - 0.5 + o for s, o in zip(image.shape, out))
    static = (geom, (plo, phi), overlap)  # hashable: the jitted loss's static argument
    kappa = 0.0 if polydispersity is None else 1.0 / (float(polydispersity) * R0) ** 2
    reach_move = 1e6 * R0 if max_move is None else float(max_move) * R0
    # traced: no recompile per radius
    rbounds = jnp.asarray([rlo, rhi, kappa, reach_move], jnp.float32)

    # fixed-capacity buffer
    n = len(pos0)
    cap = int(math.ceil(1.25 * n / 256) * 256)
    park = np.asarray(image.shape, np.float32) / 2 - 0.5

    # where each particle entered the loop (its start, or where the addition put it): the
    # centre of its trust region
    anchor = np.asarray(params.particles.pos, np.float32)
    from_start = np.ones(len(anchor), bool)  # the particle in the slot is a start's

    def grow(params, mask, cap_new):
        nonlocal anchor, from_start
        k = cap_new - params.particles.pos.shape[0]
        p = params.particles
        anchor = np.concatenate([anchor, np.broadcast_to(park, (k, 3))]).astype(np.float32)
        from_start = np.concatenate([from_start, np.zeros(k, bool)])
        pos = jnp.concatenate([p.pos, jnp.broadcast_to(jnp.asarray(park), (k, 3))])
        rad = jnp.concatenate([p.radius, jnp.full((k,), R0, jnp.float32)])
        amp = jnp.concatenate([p.amplitude, jnp.zeros((k,), jnp.float32)])
        return Params(Particles(pos, rad, amp), params.psf, params.background), \
            np.concatenate([mask, np.zeros(k, np.float32)])

    mask = np.ones(n, np.float32)
    params, mask = grow(params, mask, cap)
    splits = []  # this round's split moves, judged after its joint fit (judge_splits)
    no_split = set()  # slots whose split did not pay: not split again
    fresh = set()  # slots the addition filled in this round's passes: not yet fitted
    pair_cap = 1024
    stats = dict(rounds=0, added=0, removed=0, removed_overlap=0, removed_gain=0,
                 removed_implausible=0, splits_tried=0, splits_kept=0, steps=0, joint_fits=0, penalty=penalty,
                 # every fit in order: (kind, L-BFGS steps, seconds incl. compiles)
                 fits=[("first shape fit", len(shape_model.history), round(t_first, 2))])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_rounds, desc="refine", leave=False)

    seconds = {}  # wall time per phase of the loop, for stats

    def timed(phase, fit=False):
        """Add each call's wall time to ``seconds[phase]``; with ``fit`` (a function that
        returns (params, history)), also log the call in ``stats["fits"]``."""
        def deco(fn):
            def run(*args, **kwargs):
                t = time.perf_counter()
                out = fn(*args, **kwargs)
                dt = time.perf_counter() - t
                seconds[phase] = seconds.get(phase, 0.0) + dt
                if fit:
                    stats["fits"].append((phase, len(out[1]), round(dt, 2)))
                return out
            return run
        return deco

    def weights(params):
        m = np.asarray(render(_clamp(params, jnp.asarray(mask), static, rbounds), geom))
        return m, (1.0 / noise_n.variance(m)).astype(np.float32)

    @timed("joint fit", fit=True)
    def joint_fit(params, w):
        """L-BFGS on positions, radii, amplitudes and background offset (PSF and
        illumination held) at whitened coordinates (``_whitened_loss``); stops when no
        parameter moved more than ``xtol`` of its standard deviation in 5 steps."""
        act = np.flatnonzero(mask > 0)
        M = np.broadcast_to(np.eye(5), (mask.size, 5, 5)).copy()  # empty slots
        if len(act):
            med = float(np.median(np.abs(np.asarray(params.particles.amplitude)[act])))
            F = own_blocks(params, act, w, geom, amplitude_floor=0.3 * med, radius_prior=kappa)
            d = np.diagonal(F, axis1=1, axis2=2)
            F = F + np.eye(5)[None] * (1e-6 * d[:, None, :] + 1e-30)
            M[act] = np.swapaxes(np.linalg.inv(np.linalg.cholesky(F)), 1, 2)  # L^-T
        M = jnp.asarray(M, jnp.float32)
        s_off = _offset_scales(params, jnp.asarray(w), geom)
        p = params.particles
        base = (p.pos, p.radius, p.amplitude, params.background)
        reach = 2.2 * float(np.max(np.asarray(p.radius)[act])) if len(act) else 1.0
        nonlocal pair_cap
        pairs, pair_mask, pair_cap = _pairs(np.asarray(p.pos) * np.asarray(vs_eff), mask,
                                            reach, pair_cap)
        u = (jnp.zeros((mask.size, 5), jnp.float32), jnp.zeros_like(s_off))
        u, hist = minimize(_whitened_loss, u, (base, M, s_off, jnp.asarray(anchor), params.psf,
                                               data_n,
                                               jnp.asarray(w), jnp.asarray(mask), pairs,
                                               pair_mask, rbounds),
                           static=static, steps=steps, xtol=xtol, what="joint fit")
        hist = [h / (0.5 * data_n.size) for h in hist]  # chi^2 per voxel, as the history keeps
        stats["steps"] += len(hist)
        stats["joint_fits"] += 1
        pos, rad, amp, bg = _from_whitened(u, base, M, s_off)
        return _clamp(Params(Particles(pos, rad, amp), params.psf, bg), jnp.asarray(mask),
                      static, rbounds), hist

    @timed("remove")
    def remove_step(params, use_gain=True, stuck=True):
        """Remove implausible, overlapping and (after a fit) low-gain particles; with
        ``stuck``, also those pressed against their trust region (only where an addition
        follows that can put them back where the light wants them)."""
        nonlocal mask
        if not mask.any():
            return params, 0, 0.0, dict(implausible=0, overlap=0, gain=0)
        m, w = weights(params)
        r = np.asarray(data_n) - m
        act = mask > 0
        R = np.asarray(params.particles.radius)
        reach = 2.2 * float(np.max(R[act]))
        gain = _removal_gain(params, jnp.asarray(w * r), w, geom)
        a = np.asarray(params.particles.amplitude)
        med_a = float(np.median(np.abs(a[act])))
        # implausible: the wrong sign, too faint, a radius pressed against its lower bound
        # (0.3 of the starting median: the fit wants no particle there), or a centre
        # pressed against its trust region's wall (max_move)
        implausible = act & ((np.sign(a) != sign) | (np.abs(a) < min_amplitude * med_a)
                             | (R <= 1.001 * rlo))
        pos = np.asarray(params.particles.pos)
        # pressed against its trust region's wall: the light wants it elsewhere, where the
        # addition will put a particle if one is there
        moved = np.linalg.norm((pos - anchor) * np.asarray(vs_eff), axis=1)
        implausible |= act & (moved >= 0.98 * reach_move) & stuck
        ov = np.zeros_like(act)
        ai = np.flatnonzero(act)
        if len(ai) > 1:
            pr = cKDTree(pos[ai] * np.asarray(vs_eff)).query_pairs(reach, output_type="ndarray")
            if len(pr):
                i, j = ai[pr[:, 0]], ai[pr[:, 1]]
                d = np.linalg.norm((pos[i] - pos[j]) * np.asarray(vs_eff), axis=1)
                bad = d < overlap * (R[i] + R[j])
                ov[np.where(gain[i] < gain[j], i, j)[bad]] = True
        ov &= ~implausible
        drop = implausible | ov
        # low gain: remove only those with no low-gain neighbour removed in this pass, so
        # two particles sharing one particle's light are not both removed
        low = act & (gain < penalty_at(pos)) & ~drop & use_gain
        if low.any():
            cand = np.flatnonzero(low)
            order = cand[np.argsort(gain[cand])]
            tree = cKDTree(pos[order] * np.asarray(vs_eff))
            taken = np.zeros(len(mask), bool)
            for idx in order:
                nb = tree.query_ball_point(pos[idx] * np.asarray(vs_eff), reach)
                if not taken[order[nb]].any():
                    taken[idx] = True
            drop |= taken
        counts = dict(implausible=int(implausible.sum()), overlap=int(ov.sum()),
                      gain=int((drop & ~ov & ~implausible).sum()))
        stats["removed_implausible"] += counts["implausible"]
        stats["removed_overlap"] += counts["overlap"]
        stats["removed_gain"] += counts["gain"]
        stats["removed"] += int(drop.sum())
        mask = np.where(drop, 0.0, mask).astype(np.float32)
        no_split.difference_update(np.flatnonzero(drop).tolist())  # the slot may be reused
        amp = jnp.where(jnp.asarray(drop), 0.0, params.particles.amplitude)
        params = Params(Particles(params.particles.pos, params.particles.radius, amp),
                        params.psf, params.background)
        return params, int(drop.sum()), med_a, counts

    @timed("add")
    def add_step(params, med_a, split=False):
        """Add particles at the peaks of the residual's gain map, then look again with
        the added ones in the model (their light taken out of the residual), up to
        ``add_passes`` times: two missing neighbours whose light merges into one peak
        (z neighbours under an elongated PSF) are added one per pass, before the
        position fit can slide a neighbour into the hole left. Returns (params, added)."""
        added = 0
        fresh.clear()
        for _ in range(add_passes):
            params, n_new = add_pass(params, med_a, split)
            added += n_new
            if n_new == 0:
                break
        return params, added

    def add_pass(params, med_a, split=False):
        """One pass of ``add_step``: candidates at the gain map's peaks; with ``split``,
        candidates too close to a particle split it (``split_moves``)."""
        nonlocal mask
        m, w = weights(params)
        r = np.asarray(data_n) - m
        act = mask > 0
        Rm = float(np.median(np.asarray(params.particles.radius)[act])) if act.any() else R0
        if not act.any():
            med_a = float(np.median(np.abs(a0)))
        reach = [int(o) for o in out]
        gmap, amap = _gain_map(jnp.asarray(w * r), jnp.asarray(w), params, geom, Rm, sign, reach)
        foot = _ellipsoid(0.9 * Rm / np.asarray(vs_eff))
        peaks = (gmap == ndimage.maximum_filter(gmap, footprint=foot, mode="constant")) \
            & (gmap > outside_penalty * penalty)  # the lower of the two penalties
        cand = np.argwhere(peaks)
        g_c, amp_c = gmap[tuple(cand.T)], amap[tuple(cand.T)]
        cand = cand - np.asarray(reach, np.float64)  # extended grid -> stack voxels
        pays = g_c > penalty_at(cand)  # the full penalty inside the stack
        cand, amp_c, g_c = cand[pays], amp_c[pays], g_c[pays]
        if len(cand) == 0 and not (split and act.any()):  # (splits also come from quality)
            return params, 0
        d = np.full(len(cand), np.inf)
        if act.any():
            tree = cKDTree(np.asarray(params.particles.pos)[act] * np.asarray(vs_eff))
            if len(cand):
                d, _ = tree.query(cand * np.asarray(vs_eff))
        far = d > overlap * 2.0 * Rm  # closer would be removed as an overlap
        close, g_close = cand[~far], g_c[~far]
        cand, amp_c = cand[far], amp_c[far]
        Lf = np.asarray(stack_region(illumination_field(params.background, geom), geom))
        amp0 = amp_c / np.maximum(at_voxels(Lf, cand), 1e-3) if len(cand) else amp_c
        ok = np.abs(amp0) >= min_amplitude * med_a  # as bright as a particle can be
        cand, amp0 = cand[ok], amp0[ok]
        n_split = 0
        if split and act.any():
            jj, centres, margins = split_proposals(params, close, g_close, tree,
                                                   np.flatnonzero(act), w * r * r, r, Rm)
            params, n_split, claimed = split_moves(params, jj, centres, margins,
                                                   np.flatnonzero(act), Rm, cand, amp0, r)
            cand, amp0 = cand[~claimed], amp0[~claimed]
        if len(cand) == 0:
            return params, n_split
        params, slots = free_slots(params, len(cand))
        p = params.particles
        params = Params(Particles(p.pos.at[slots].set(jnp.asarray(cand, jnp.float32)),
                                  p.radius.at[slots].set(Rm),
                                  p.amplitude.at[slots].set(jnp.asarray(amp0, jnp.float32))),
                        params.psf, params.background)
        mask[slots] = 1.0
        stats["added"] += len(slots)
        fresh.update(slots.tolist())
        anchor[slots] = cand
        from_start[slots] = False
        return params, len(slots) + n_split

    def free_slots(params, k):
        """(params, the first ``k`` empty slots), the buffer grown if it has fewer."""
        nonlocal mask
        free = np.flatnonzero(mask == 0)
        if len(free) < k:
            params, mask = grow(params, mask, int(math.ceil((mask.size + k) * 1.25 / 256) * 256))
            free = np.flatnonzero(mask == 0)
        return params, free[:k]

    def split_box(p, Rm):
        h = np.ceil(2.0 * Rm / np.asarray(vs_eff)) + 2
        lo = np.clip(np.floor(p - h), 0, None).astype(int)
        hi = np.minimum(np.ceil(p + h).astype(int) + 1, image.shape)
        return tuple(slice(a, b) for a, b in zip(lo, hi))

    def pair(p, u, Rm):
        """Two touching particles (voxels) a radius ``Rm`` either side of ``p`` along ``u``
        (physical units)."""
        step = Rm * u / np.linalg.norm(u) / np.asarray(vs_eff)
        return np.stack([p - step, p + step])

    def split_proposals(params, close, g_close, tree, act_idx, z2, resid, Rm):
        """Particles that may be several merged into one, strongest sign first, with the
        centres (voxels) of the particles to split each into: (a) those with a residual
        peak whose gain pays the penalty too close to them to be added beside it (0.4 to
        ``overlap`` x 2 radii away): two, along the line to the peak; (b) those whose
        light is not explained (quality more than ``SPLIT_QUALITY`` robust stds above the
        median) and whose radius is at least the median (two touching particles a radius
        above and below, the dark PERI stack's miss): two, along z, where the PSF is
        longest and neighbours merge, or with ``SPLIT_AXIS`` = "residual" along the
        residual's own axis (``_split_axis``; experimental); (c) those whose radius is
        implausibly large (``FAT_RADIUS``, ``SPLIT_RADIUS``, or its upper bound): as many
        as their volume holds (2 to ``SPLIT_MAX``) at the centres of a k-means of the
        light their neighbours leave unexplained (``_light_centres``; along z if it finds
        none). Every pair is two touching particles a median radius either side of the
        particle's centre. A particle ``FAT_RADIUS`` x the median is tried down to
        ``FAT_FACE_MARGIN`` radii from a face, every other one ``SPLIT_FACE_MARGIN``.
        Returns (slots, centres: for a fat particle, how many; face margins)."""
        v = np.asarray(vs_eff)
        pos = np.asarray(params.particles.pos)
        out_j, out_c, out_m = [], [], []
        if len(close):
            d, k = tree.query(close * v)
            for i in np.argsort(-g_close):
                if d[i] >= 0.4 * Rm:
                    j = int(act_idx[k[i]])
                    out_j.append(j)
                    out_c.append(pair(pos[j], (close[i] - pos[j]) * v, Rm))
                    out_m.append(SPLIT_FACE_MARGIN)
        q = _quality(params, z2, geom)[act_idx]
        med = np.median(q)
        spread = 1.4826 * np.median(np.abs(q - med))
        rad = np.asarray(params.particles.radius)[act_idx]
        rmed = np.median(rad)
        # (c) a radius pressed against its upper bound, FAT_RADIUS times the median or
        # more than SPLIT_RADIUS prior stds above it: the light of several particles
        # taken by one (dark PERI seed 1: three touching particles fitted as one of radius
        # 1.5 R; seed 4: a void of four held by two)
        very = rad >= FAT_RADIUS * rmed
        fat = (rad >= 0.98 * rhi) | very
        if polydispersity is not None:
            fat |= rad > rmed * (1.0 + SPLIT_RADIUS * float(polydispersity))
        sel = np.flatnonzero(((q > med + SPLIT_QUALITY * spread) & (rad >= rmed)) | fat)
        # the largest first (a box takes one split: on dark PERI seed 4 a pair split by
        # quality shut out the fat particle beside it), then by quality
        for i in sel[np.lexsort((-q[sel], -np.where(fat[sel], rad[sel], 0.0)))]:
            j = int(act_idx[i])
            if fat[i]:  # how many; where is for split_moves, which knows the rivals
                c = int(np.clip(math.floor((rad[i] / Rm) ** 3), 2, SPLIT_MAX))
            else:
                u = _split_axis(resid, split_box(pos[j], Rm), pos[j], v, Rm, sign) \
                    if SPLIT_AXIS == "residual" else None
                c = pair(pos[j], np.asarray([1.0, 0.0, 0.0]) if u is None else u, Rm)
            out_j.append(j)
            out_c.append(c)
            # a radius FAT_RADIUS x the median is not light from beyond a face (fat by the
            # prior or against its bound, a near-face split was kept on a toy stack)
            out_m.append(FAT_FACE_MARGIN if very[i] else SPLIT_FACE_MARGIN)
        return out_j, out_c, out_m

    def fat_centres(params, j, k, resid, Rm):
        """Where to put the ``k`` particles a fat particle ``j`` is split into: a k-means
        of the light its neighbours leave unexplained (its own plus the residual) within
        its radius and half the median of its centre (``_light_centres``); two along z if
        there is none."""
        p = params.particles
        one = Params(Particles(p.pos[j][None], p.radius[j][None], p.amplitude[j][None]),
                     params.psf, params.background)
        own = np.asarray(render_parts(one, geom)[1])
        pj = np.asarray(p.pos[j])
        v = np.asarray(vs_eff)
        c = _light_centres(sign * (np.asarray(resid) + own), split_box(pj, Rm), pj, v,
                           float(p.radius[j]) + 0.5 * Rm, k)
        return pair(pj, np.asarray([1.0, 0.0, 0.0]), Rm) if c is None else c

    def split_moves(params, jj, centres, margins, act_idx, Rm, cand, amp0, resid):
        """Split moves: each proposed particle (``split_proposals``) is replaced by the
        particles at its proposal's centres (radius Rm, the median amplitude each); a fat
        one by as many as its proposal says plus the rivals in its box (below), where its
        light says (``fat_centres``: the rivals' light is in the residual the k-means
        sees; the state without the split gets the fat particle and its rivals, so the
        split pays only for the particles its own volume holds). One split per particle
        and per box, none of a particle whose split did not pay before, none less than
        its proposal's margin (radii) from a face (there the light of the particles
        beyond it, poorly fitted, paid for false splits), none whose box holds another split's
        particle (boxes may overlap at their edges: with disjoint boxes, dark PERI seed
        1's merged pair was not tried), none whose box holds more than one of the
        addition's candidates (``cand``, ``amp0``: particles are missing there, and the
        addition goes first; a split that competed with four took the place of three
        missing particles for a round). A candidate in a split's box is claimed by it:
        the split competes with it (``judge_splits``), so that it cannot take the credit
        for a missing particle the addition would have put there. Returns (params, splits
        made, the candidates claimed)."""
        v = np.asarray(vs_eff)
        pos = np.asarray(params.particles.pos)
        a = np.asarray(params.particles.amplitude)
        # not a particle the addition put in this round: unfitted, its misfit says
        # nothing of whether it is two (on dark PERI seed 1 one such was split, the split
        # judged even, and the particle, fitted, stayed between two true ones for good)
        busy = {s["j"] for s in splits} | {k for s in splits for k in s["ks"]} | no_split | fresh

        def in_box(pts, box):
            pts = np.asarray(pts, np.float64).reshape(-1, 3)
            return np.all([(pts[:, ax] >= box[ax].start) & (pts[:, ax] < box[ax].stop)
                           for ax in range(3)], axis=0)

        # a candidate in the box of a split of this round's earlier passes is left out:
        # it is that split's rival or a particle of its pair, not yet fitted
        claimed = np.zeros(len(cand), bool)
        for sp in splits:
            claimed |= in_box(cand, sp["box"])
        made = 0
        for j, c, margin in zip(jj, centres, margins):
            if j in busy or not _interior(pos[j][None], np.asarray(image.shape),
                                          margin * Rm / v)[0]:
                continue  # near a face, light from beyond it can pay for a false split
            box = split_box(pos[j], Rm)
            if any(in_box(sp["old"][0], box)[0] for sp in splits):
                continue  # another split in the box would count towards this one's gain
            mine = in_box(cand, box) & ~claimed
            if mine.sum() > 1:
                continue  # particles are missing here: the addition goes first
            claimed |= mine
            busy.add(j)
            if np.isscalar(c):
                c = fat_centres(params, j, int(c) + int(mine.sum()), resid, Rm)
            params, ks = free_slots(params, len(c) - 1)
            ks = [int(k) for k in ks]
            busy.update(ks)
            old = (pos[j].copy(), float(params.particles.radius[j]), float(a[j]), anchor[j].copy())
            c = np.clip(np.asarray(c, np.float32), plo, phi)
            idx = jnp.asarray([j] + ks)
            p = params.particles
            amp = np.sign(a[j]) * float(np.median(np.abs(a[act_idx])))
            params = Params(Particles(p.pos.at[idx].set(jnp.asarray(c)), p.radius.at[idx].set(Rm),
                                      p.amplitude.at[idx].set(amp)),
                            params.psf, params.background)
            mask[ks] = 1.0
            anchor[[j] + ks] = c
            from_start[ks] = False
            splits.append(dict(j=j, ks=ks, old=old, box=box, rival=(cand[mine], amp0[mine], Rm)))
            stats["splits_tried"] += 1
            made += 1
        return params, made, claimed

    def judge_splits(params):
        """Judge this round's splits against what the round would have done without
        them: each split particle put back as it was, its partners gone, and the
        addition's candidates it claimed (its rivals) added; that state gets the same joint
        fit as the state with the splits had. A split is kept only if the chi^2 in its
        box, plus the penalty for each particle there, is lower with it (for a split into
        two with no rival: lower by more than the penalty, the addition's rule; "chi^2" here is
        -2 log likelihood, the log of each state's own noise variance included). A
        particle whose split did not pay, or that came from a kept split, is never split
        again."""
        if not splits:
            return params
        # -2 log likelihood per voxel, each state with its own noise variance (chi^2 with
        # each state's weights leaves out the log-variance term; with the same weights
        # for both, the comparison moved by ~90 in a box of the dark PERI stack)
        m, w = weights(params)
        z2_split = w * (np.asarray(data_n) - m) ** 2 - np.log(w)
        rev = params
        for s in splits:  # the rivals, as the addition would have put them in (placed while
            rc, ra, Rm = s["rival"]  # the partners still hold their slots)
            s["slots"] = []
            for c, a in zip(rc, ra):
                rev, (slot,) = free_slots(rev, 1)
                q = rev.particles
                rev = Params(Particles(q.pos.at[slot].set(jnp.asarray(c, jnp.float32)),
                                       q.radius.at[slot].set(Rm), q.amplitude.at[slot].set(float(a))),
                             rev.psf, rev.background)
                mask[slot], anchor[slot], from_start[slot] = 1.0, c, False
                s["slots"].append(slot)
        q = rev.particles
        pos, rad, amp = q.pos, q.radius, q.amplitude
        for s in splits:
            pj, rj, aj, anc = s["old"]
            pos = pos.at[s["j"]].set(jnp.asarray(pj, jnp.float32))
            rad = rad.at[s["j"]].set(rj)
            amp = amp.at[s["j"]].set(aj).at[jnp.asarray(s["ks"])].set(0.0)
            anchor[s["j"]] = anc
            mask[s["ks"]] = 0.0
        rev = Params(Particles(pos, rad, amp), rev.psf, rev.background)
        rev, hist = joint_fit(rev, weights(rev)[1])
        history.extend(hist)
        m, w = weights(rev)
        z2_rev = w * (np.asarray(data_n) - m) ** 2 - np.log(w)
        keep = []
        for s in splits:
            pen = float(penalty_at(s["old"][0][None])[0])
            gain = float(np.sum(z2_rev[s["box"]]) - np.sum(z2_split[s["box"]])) \
                + pen * (len(s["slots"]) - len(s["ks"]))
            ok = gain > 0
            keep.append(ok)
            # where, the box's penalised chi^2 gain, rivals, particles split into, kept
            stats.setdefault("split_log", []).append(
                (*np.round(s["old"][0], 2).tolist(), round(gain, 1), len(s["slots"]),
                 1 + len(s["ks"]), bool(ok)))
            if not ok:
                no_split.add(s["j"])
                stats["added"] += len(s["slots"])
        kept = [s for s, ok in zip(splits, keep) if ok]
        stats["splits_kept"] += len(kept)
        # a kept pair is not split again: on dark PERI seed 1 the same place was split
        # twice, light the model does not explain paying for more particles there
        no_split.update(i for s in kept for i in [s["j"]] + s["ks"])
        splits.clear()
        if not kept:
            return rev
        # the fitted state without the splits, with the kept pairs as the fit with them
        # left them and their rivals gone
        idx = np.asarray([i for s in kept for i in [s["j"]] + s["ks"]])
        gone = np.asarray([i for s in kept for i in s["slots"]], int)
        assert not set(idx.tolist()) & set(gone.tolist())
        mask[idx] = 1.0
        mask[gone] = 0.0
        # a kept pair enters the loop where the judged fit left it: its split put it a
        # guessed radius either side along a line, and a trust region around that guess
        # removed as stuck a pair the judge had kept, its particle pressed 0.5 voxel
        # short of the true one (dark PERI seed 1: the merged pair then came back as one)
        q, p = rev.particles, params.particles
        anchor[idx] = np.asarray(p.pos)[idx]
        from_start[idx] = False  # where it is now says nothing of its start's error (gauge)
        ji = jnp.asarray(idx)
        return Params(Particles(q.pos.at[ji].set(p.pos[ji]), q.radius.at[ji].set(p.radius[ji]),
                                q.amplitude.at[ji].set(p.amplitude[ji]).at[jnp.asarray(gone)].set(0.0)),
                      rev.psf, rev.background)

    history = []
    # spurious starts that sit on a particle: remove before they push it away (gains mean
    # nothing before the positions are fitted)
    params, n0, _, counts = remove_step(params, use_gain=False)
    if verbose:
        print(f"start: active {int(mask.sum())}, removed {n0} {counts}")
    @timed("shape fit", fit=True)
    def shape_fit(params, revive=False, restart=False):
        """Radii, amplitudes, PSF and background offset with the centres held; ``revive``
        (the rounds' fits, not the first or the polish's): starved PSF components first
        put back (``_revive_components``); ``restart``: also fit from fresh tails
        (``_fresh_tails``) and keep the fit with the lower loss."""
        m, w = weights(params)
        if revive and not hold_psf:
            params = dataclasses.replace(params, psf=_revive_components(params.psf))

        def fit(p):
            return fit_parameters(p, data_n, geom, radius=R0, weight=jnp.asarray(w),
                                  steps=shape_steps, amplitude_mask=jnp.asarray(mask),
                                  hold_psf=hold_psf, hold_illum=True, radius_prior=kappa,
                                  grid_prior=GRID_PRIOR, hold_radius=SHAPE_HOLDS_RADII)

        shape_p, hist = fit(params)
        if restart and not hold_psf:
            p2, h2 = fit(dataclasses.replace(params, psf=_fresh_tails(params.psf)))
            k = min(50, len(hist) - 1)  # how much the fit from as-is still gained at its end
            stats.setdefault("tail_restarts", []).append((float(hist[-1]), float(h2[-1]),
                                                          float(hist[-1 - k] - hist[-1])))
            if h2[-1] < hist[-1]:
                shape_p, hist = p2, h2
        if verbose:
            print(f"shape fit: {len(hist)} steps, loss {hist[0]:.6g} -> {hist[-1]:.6g}")
        return _clamp(shape_p, jnp.asarray(mask), static, rbounds), hist

    # fit_shape left the faces out; fit the background and shape to every voxel (centres
    # held) so that the first residual shows missing particles, not a background error
    params, hist = shape_fit(params)
    history += hist
    if measure_noise:
        noise_n = estimate_noise(np.asarray(data_n), np.asarray(render(params, geom)))
    for rnd in range(max_rounds):
        # add first: a particle missing from the start leaves a hole its neighbours would
        # otherwise slide into during the position fit
        act = mask > 0
        med_a = float(np.median(np.abs(np.asarray(params.particles.amplitude)[act]))) if act.any() \
            else float(np.median(np.abs(a0)))
        # (a split tried counts as an addition, kept or not: the state it leaves was fitted
        # again, and on dark PERI seed 1 the round that followed a rejected split found
        # the merged pair that gave it its recall 0.996; stopping there gave 0.989)
        params, added = add_step(params, med_a, split=split and rnd > 0)
        # relearn the shape (centres held) before the position fit, every round: the shape
        # learned from rough starts is blurred by their errors, and before the addition it
        # took the light of the missing particles into its tail; fitting positions with it
        # moved 87 of 523 particles on a simulated stack more than half a voxel (34 when the
        # shape was relearned first), the start of neighbours sliding into holes
        params, hist = shape_fit(params, revive=True, restart=TAIL_RESTART and rnd == 0)
        history += hist
        m, w = weights(params)
        params, hist = joint_fit(params, w)
        history += hist
        params = judge_splits(params)
        stats["rounds"] = rnd + 1
        if bar is not None:
            bar.update(1)
        if measure_noise:  # re-measure the noise on the better model
            noise_n = estimate_noise(np.asarray(data_n), np.asarray(render(params, geom)))
        params, n_removed, med_a, counts = remove_step(params)
        if verbose:
            print(f"round {rnd + 1}: active {int(mask.sum())}, added {added}, removed {n_removed} "
                  f"{counts}, steps {len(hist)}")
        if not mask.any():  # nothing in the stack pays for itself: no particle at all
            break
        if added == 0 and n_removed == 0 and (rnd > 0 or not split):
            break  # (the split moves need a round after the first joint fit)
    if bar is not None:
        bar.close()

    # ---- polish: learn the shape on the refined centres (held), refit the centres, and
    # remove what no longer pays
    for k in range(polish if mask.any() else 0):
        params, hist = shape_fit(params)
        history += hist
        m, w = weights(params)
        params, hist = joint_fit(params, w)
        history += hist
        params, n_removed, _, counts = remove_step(params, stuck=False)  # no addition follows
        if verbose:
            print(f"polish {k + 1}: active {int(mask.sum())}, removed {n_removed} {counts}")
        if n_removed:
            m, w = weights(params)
            params, hist = joint_fit(params, w)
            history += hist

    # ---- the z gauge: a common z shift of the centres and the opposite shift of the PSF
    # give the same image (exactly for whole voxels; to the PSF's sampling, well below the
    # noise, for less; with widths that change with depth, ``psf_depth``, to the change of
    # each emitter's depth weight by the shift), and the alternating shape and position
    # fits drift along it.
    # Report the centres in their start's gauge: the mean z displacement of the starts
    # still held is 0, counting only those one radius from every face, where all their
    # light is seen (near a face the fit compresses the centres towards the middle,
    # docs/refine.md). The PSF is shifted to match. The mean is trimmed by 10% at each
    # end (a start that slid to another particle's light does not count); it is the
    # gauge's own error that matters: the start errors' mean over n starts is uncertain
    # by their std / sqrt(n), the median's by 1.2-1.7x that (Gaussian to uniform errors),
    # and on a stack of ~100 interior particles that is already a CRLB in z
    # (docs/refine.md, eighteenth session).
    st = np.flatnonzero((mask > 0) & from_start
                        & _interior(anchor, np.asarray(image.shape), R0 / np.asarray(vs_eff)))
    stats["gauge_radius"] = R0  # that radius (the first shape fit's median; voxel_size's unit)
    if gauge and not hold_psf and len(st) >= 10:
        pos = params.particles.pos
        dz = float(trim_mean(np.asarray(pos)[st, 0] - anchor[st, 0], GAUGE_TRIM))
        stats["gauge_shift"] = dz
        params = Params(Particles(pos.at[:, 0].add(-dz), params.particles.radius,
                                  params.particles.amplitude),
                        params.psf.shifted_z(dz * vs_eff[0], vs_eff[0]),
                        params.background)

    # ---- uncertainties and quality
    m, w = weights(params)
    r = np.asarray(data_n) - m
    act = np.flatnonzero(mask > 0)
    if len(act) == 0:
        return _empty_result(params, geom, vs, noise_n, centre, scale, history, stats, image,
                             time.perf_counter() - t0, w, r)
    R = np.asarray(params.particles.radius)[act]
    a = np.asarray(params.particles.amplitude)[act]
    pos = np.asarray(params.particles.pos)[act]
    unc = {}
    cov = timed("uncertainties")(coupled_covariance)(params, act, w, geom, radius_prior=kappa,
                                                     neighbours=neighbours, stats=unc)
    stats["sigma_fallbacks"] = unc.get("fallbacks", 0)  # clusters left at the own block
    sig = np.sqrt(np.clip(np.diagonal(cov, axis1=1, axis2=2)[:, :3], 0, None))
    final = Params(Particles(jnp.asarray(pos), jnp.asarray(R), jnp.asarray(a)), params.psf,
                   params.background)
    q = _quality(final, (r * r * w), geom)

    img_params = to_image_units(final, centre, scale)
    # loss: mean squared residual of the returned model, image units; history: the
    # objectives of the successive fits (weighted chi^2 per voxel and shape-fit losses)
    model = Model(params=img_params, geometry=geom, voxel_size=vs,
                  loss=float(np.mean(r * r)) * scale**2, history=tuple(history), weight=None)
    amp_img = np.asarray(img_params.particles.amplitude, np.float64)
    df = pd.DataFrame({"z": pos[:, 0], "y": pos[:, 1], "x": pos[:, 2],
                       "sigma_z": sig[:, 0], "sigma_y": sig[:, 1], "sigma_x": sig[:, 2],
                       "amplitude": amp_img, "radius": R.astype(np.float64), "quality": q})
    inside = _interior(pos, np.asarray(image.shape), 0.0)
    df = df[inside].reset_index(drop=True)
    if vs is not None:
        for k, c in enumerate("zyx"):
            df[f"{c}_um"] = df[c] * vs[k]
    stats.update(n=int(len(df)), n_with_outside=int(len(act)), chi2_per_voxel=float(np.mean(w * r * r)),
                 seconds=time.perf_counter() - t0, capacity=int(mask.size),
                 seconds_by_phase={k: round(v, 2) for k, v in seconds.items()})
    noise = NoiseModel(noise_n.a * scale**2, noise_n.b * scale, noise_n.m0 * scale + centre)
    return RefineResult(particles=df, model=model, noise=noise, stats=stats)


def _empty_result(params, geom, vs, noise_n, centre, scale, history, stats, image, seconds, w, r):
    """No particle pays for its light: an empty table (documented fallback, no error)."""
    cols = ["z", "y", "x", "sigma_z", "sigma_y", "sigma_x", "amplitude", "radius", "quality"]
    if vs is not None:
        cols += ["z_um", "y_um", "x_um"]
    empty = Params(Particles(jnp.zeros((0, 3)), jnp.zeros((0,)), jnp.zeros((0,))), params.psf,
                   params.background)
    model = Model(params=to_image_units(empty, centre, scale), geometry=geom, voxel_size=vs,
                  loss=float(history[-1]) * scale**2 if history else float("nan"),
                  history=tuple(h * scale**2 for h in history), weight=None)
    noise = NoiseModel(noise_n.a * scale**2, noise_n.b * scale, noise_n.m0 * scale + centre)
    stats.update(n=0, n_with_outside=0, chi2_per_voxel=float(np.mean(w * r * r)), seconds=seconds,
                 capacity=0)
    return RefineResult(particles=pd.DataFrame({c: np.zeros(0) for c in cols}), model=model,
                        noise=noise, stats=stats)
