"""Synthetic confocal stacks of dense colloids with known truth.

A hard-sphere packing (``packing.pack_spheres``) is rendered through difftrack's own
forward model (``render``) with a z-elongated, non-Gaussian PSF, per-particle brightness
spread, a smooth illumination field, attenuation with depth and a background, then
photon (Poisson) noise, Gaussian read noise, a camera offset and integer output are
applied. Everything is seeded and reproducible.

Axis order (z, y, x); positions in voxels (voxel centres at integer indices); lengths in
the unit of ``voxel_size``.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pandas as pd

from ._checks import check_voxel_size
from .packing import pack_spheres
from .render import Background, Geometry, Params, Particles, render, validate
from .shape import PSF


@dataclasses.dataclass(frozen=True)
class SimulatedStack:
    """A synthetic stack and its truth.

    image: (z, y, x) camera counts (uint16).
    truth: DataFrame with z, y, x (voxels), radius (physical), amplitude (photons of a
        voxel wholly inside the particle, before the PSF and the illumination field);
        every rendered particle, including those whose centre lies outside the stack
        (score an interior region).
    voxel_size: (z, y, x) physical size.
    expected: the noiseless expected image in camera units (offset included), float32.
    noise_variance: per-voxel variance of the noise in camera units (Poisson + read +
        rounding), float32; ``image - expected`` has this variance.
    params, geometry: the forward model's parameters and layout (to re-render).
    settings: the keyword arguments the stack was made with.
    """

    image: np.ndarray
    truth: pd.DataFrame
    voxel_size: tuple
    expected: np.ndarray
    noise_variance: np.ndarray
    params: Params
    geometry: Geometry
    settings: dict


def default_psf(voxel_size, radius, *, sigma_xy=None, elongation=2.5):
    """A confocal-like PSF: a Gaussian core of lateral std ``sigma_xy`` (default a quarter
    of the radius, at least 0.8 lateral voxel) elongated ``elongation`` times along z, plus a
    weak wide tail displaced below focus (an axial side lobe / aberration asymmetry)."""
    if sigma_xy is None:
        sigma_xy = max(0.25 * radius, 0.8 * min(voxel_size[1], voxel_size[2]))
    sz = elongation * sigma_xy
    return PSF(
        log_sigma_xy=jnp.log(jnp.asarray([sigma_xy, 1.8 * sigma_xy], jnp.float32)),
        log_sigma_z=jnp.log(jnp.asarray([sz, 2.0 * sz], jnp.float32)),
        z_offset=jnp.asarray([0.0, 0.8 * sz], jnp.float32),
        logit_weight=jnp.log(jnp.asarray([0.85, 0.15], jnp.float32)),
    )


def psf_extent(psf: PSF, nsigma=4.0):
    """(z, xy) physical distance beyond which ``psf`` holds no appreciable light."""
    sz = np.exp(np.asarray(psf.log_sigma_z))
    sxy = np.exp(np.asarray(psf.log_sigma_xy))
    off = np.abs(np.asarray(psf.z_offset))
    return float(np.max(nsigma * sz + off)), float(np.max(nsigma * sxy))


def simulate(
    shape=(32, 64, 64),
    *,
    voxel_size=(0.2, 0.1, 0.1),
    radius=0.4,
    volume_fraction=0.5,
    polydispersity=0.05,
    psf=None,
    elongation=2.5,
    photons=100.0,
    brightness_spread=0.1,
    bg_photons=10.0,
    illumination_tilt=0.1,
    attenuation=0.2,
    read_noise=2.0,
    offset=100.0,
    dark=False,
    seed=0,
) -> SimulatedStack:
    """Simulate a confocal stack of a dense hard-sphere packing.

    Parameters
    ----------
    shape : (z, y, x) stack shape in voxels.
    voxel_size : (z, y, x) physical voxel size (default um).
    radius : mean particle radius, physical units.
    volume_fraction : of the hard-sphere packing, 0 < phi <= 0.62 (checked to 0.58).
    polydispersity : relative std of the radii.
    psf : a ``shape.PSF``; default ``default_psf(voxel_size, radius, elongation=...)``.
    photons : mean photon count at a particle's centre (the particle contrast).
    brightness_spread : relative std of the particles' brightness.
    bg_photons : background photons per voxel (for dark particles: the dyed fluid's level
        is ``photons + bg_photons`` and the particles remove ``photons``).
    illumination_tilt : relative change of illumination across y and x.
    attenuation : relative loss of signal from the top (z = 0) to the bottom of the stack.
    read_noise : Gaussian read noise std, camera counts.
    offset : camera offset, counts.
    dark : dye-excluding (dark) particles on a bright fluid.
    seed : int or numpy Generator.

    Returns
    -------
    SimulatedStack
    """
    vs = check_voxel_size(voxel_size)
    if vs is None:
        raise ValueError("voxel_size is required to simulate a stack")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive integers (z, y, x); got {shape}")
    for name, val in (("radius", radius), ("photons", photons), ("elongation", elongation)):
        if not (np.isfinite(val) and val > 0):
            raise ValueError(f"{name} must be positive and finite; got {val}")
    for name, val in (("bg_photons", bg_photons), ("read_noise", read_noise),
                      ("brightness_spread", brightness_spread)):
        if not (np.isfinite(val) and val >= 0):
            raise ValueError(f"{name} must be >= 0 and finite; got {val}")
    rng = np.random.default_rng(seed)
    if psf is None:
        psf = default_psf(vs, radius, elongation=elongation)
    max_r = radius * (1 + 4 * polydispersity)
    geom = Geometry.make(shape, vs, max_radius=max_r, psf_extent=psf_extent(psf),
                         bg_degree=(1, 1, 1), illum_degree=(1, 1, 1))

    # pack a box that holds the stack and the margin whose light reaches it
    margin_vox = np.asarray(geom.margin, float)
    box = (np.asarray(shape) + 2 * margin_vox) * np.asarray(vs)
    centres, radii = pack_spheres(tuple(box), volume_fraction, radius,
                                  polydispersity=polydispersity, seed=rng)
    pos = centres / np.asarray(vs) - margin_vox - 0.5  # voxel coordinates of the stack

    n = len(pos)
    bright = photons * np.clip(1.0 + brightness_spread * rng.standard_normal(n), 0.2, None)
    amp = -bright if dark else bright
    level = bg_photons + (photons if dark else 0.0)

    bg = Background.constant(level, geom)
    illum = np.zeros(bg.illum.shape, np.float32)
    # linear in depth, bottom / top = 1 - attenuation: L = 1 + c at the top, 1 - c below
    illum[1, 0, 0] = -attenuation / (2.0 - attenuation)
    illum[0, 1, 0] = illumination_tilt / 2
    illum[0, 0, 1] = -illumination_tilt / 2
    bg = Background(bg.offset, jnp.asarray(illum))
    params = Params(
        Particles(jnp.asarray(pos, jnp.float32), jnp.asarray(radii, jnp.float32),
                  jnp.asarray(amp, jnp.float32)),
        psf, bg)
    validate(params, geom)
    lam = np.asarray(render(params, geom), np.float64)
    lam = np.clip(lam, 0.0, None)  # photon counts (a dark particle can't go below zero)
    counts = rng.poisson(lam) + read_noise * rng.standard_normal(lam.shape) + offset
    image = np.clip(np.rint(counts), 0, 65535).astype(np.uint16)

    truth = pd.DataFrame({"z": pos[:, 0], "y": pos[:, 1], "x": pos[:, 2],
                          "radius": radii, "amplitude": amp})
    settings = dict(shape=shape, voxel_size=vs, radius=radius, volume_fraction=volume_fraction,
                    polydispersity=polydispersity, elongation=elongation, photons=photons,
                    brightness_spread=brightness_spread, bg_photons=bg_photons,
                    illumination_tilt=illumination_tilt, attenuation=attenuation,
                    read_noise=read_noise, offset=offset, dark=dark,
                    seed=seed if isinstance(seed, (int, np.integer)) else None)
    return SimulatedStack(
        image=image,
        truth=truth,
        voxel_size=vs,
        expected=(lam + offset).astype(np.float32),
        noise_variance=(lam + read_noise**2 + 1.0 / 12.0).astype(np.float32),
        params=params,
        geometry=geom,
        settings=settings,
    )


def particle_volume_fraction(truth, shape, voxel_size):
    """Volume fraction of the particles whose centres lie in the stack (a quick check)."""
    inside = np.all((truth[["z", "y", "x"]].to_numpy() >= -0.5)
                    & (truth[["z", "y", "x"]].to_numpy() < np.asarray(shape) - 0.5), axis=1)
    vol = np.prod(np.asarray(shape) * np.asarray(voxel_size))
    return float(np.sum(4.0 / 3.0 * math.pi * truth["radius"].to_numpy()[inside] ** 3) / vol)
