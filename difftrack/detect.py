"""Classical detector: local maxima of a matched filter.

The stack is band-passed (a Gaussian matched to the particle's size, in voxels of each
axis, minus a wide Gaussian for the slow background), local maxima at least ~one radius
apart and above a noise-calibrated threshold become candidates, and each is refined to
sub-voxel precision by a parabola through its neighbours along each axis.

This is the baseline and the fallback of ``track``; positions in voxels, (z, y, x),
voxel centres at integer indices.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

from ._checks import check_stack


def _ellipsoid(radii):
    r = [max(int(np.floor(x)), 0) for x in radii]
    zz, yy, xx = np.ogrid[-r[0]:r[0] + 1, -r[1]:r[1] + 1, -r[2]:r[2] + 1]
    q = sum((a / max(b, 1e-9)) ** 2 for a, b in zip((zz, yy, xx), radii))
    return q <= 1.0


SMALL = 0.25  # std of the smoothing Gaussian, in radii (tuned on the dev stacks)


def matched_filter(image, radius_vox, *, invert=False):
    """Band-passed image: Gaussian of std radius/4 (per axis, voxels) minus one of std
    2 x radius. Float32; bright particles give positive peaks (``invert`` flips)."""
    img = np.asarray(image, np.float32)
    if invert:
        img = -img
    r = np.asarray(radius_vox, float)
    small = ndimage.gaussian_filter(img, sigma=SMALL * r, mode="nearest")
    large = ndimage.gaussian_filter(img, sigma=2.0 * r, mode="nearest")
    return small - large


def noise_sigma(image):
    """Robust std of the pixel noise: MAD of differences of neighbours along x, / sqrt 2
    (insensitive to structure larger than a voxel)."""
    d = np.diff(np.asarray(image[:, :, :], np.float32), axis=2)
    return 1.4826 * float(np.median(np.abs(d - np.median(d)))) / np.sqrt(2.0)


def filtered_noise(image, radius_vox):
    """Std of white noise after ``matched_filter``'s smoothing Gaussian."""
    s = np.maximum(SMALL * np.asarray(radius_vox, float), 0.5)
    gain = 1.0 / np.sqrt(np.prod(2.0 * np.sqrt(np.pi) * s))
    return noise_sigma(image) * gain


def find_peaks(image, radius_vox, *, invert=False, threshold=None, separation=0.8):
    """Particle candidates as local maxima of ``matched_filter``.

    Parameters
    ----------
    image : (z, y, x) array.
    radius_vox : particle radius in voxels, per axis (z, y, x) or a scalar.
    invert : dark particles on a bright background.
    threshold : minimum filtered value; default 5 standard deviations of the filtered
        noise (the pixel noise measured on differences of neighbouring voxels, so the
        particles' own contrast does not inflate it).
    separation : minimum distance between maxima, in radii.

    Returns
    -------
    DataFrame with z, y, x (voxels) and ``mass`` (filtered value at the peak), brightest
    first.
    """
    image = check_stack(image)
    r = np.broadcast_to(np.asarray(radius_vox, float), (3,))
    if not np.all(np.isfinite(r)) or np.any(r <= 0):
        raise ValueError(f"radius_vox must be positive; got {tuple(r)}")
    f = matched_filter(image, r, invert=invert)
    foot = _ellipsoid(separation * r)
    mx = ndimage.maximum_filter(f, footprint=foot, mode="nearest")
    if threshold is None:
        threshold = 5.0 * filtered_noise(image, r)
    is_max = (f == mx) & (f > threshold)
    # a flat-topped maximum (ties) is one peak: keep one voxel per connected plateau
    labels, n = ndimage.label(is_max, structure=np.ones((3, 3, 3)))
    if n:
        first = ndimage.minimum_position(np.zeros(f.shape), labels, index=np.arange(1, n + 1))
        peaks = np.asarray(first, int).reshape(-1, 3)
    else:
        peaks = np.zeros((0, 3), int)
    if len(peaks) == 0:
        return pd.DataFrame({"z": [], "y": [], "x": [], "mass": []})
    pos = peaks.astype(float)
    shape = np.asarray(f.shape)
    for k in range(3):
        lo = peaks.copy()
        hi = peaks.copy()
        lo[:, k] = np.clip(lo[:, k] - 1, 0, shape[k] - 1)
        hi[:, k] = np.clip(hi[:, k] + 1, 0, shape[k] - 1)
        fm = f[tuple(lo.T)]
        f0 = f[tuple(peaks.T)]
        fp = f[tuple(hi.T)]
        den = fm - 2 * f0 + fp
        ok = (den < 0) & (lo[:, k] != peaks[:, k]) & (hi[:, k] != peaks[:, k])
        delta = np.where(ok, 0.5 * (fm - fp) / np.where(ok, den, 1.0), 0.0)
        pos[:, k] += np.clip(delta, -0.5, 0.5)
    mass = f[tuple(peaks.T)]
    order = np.argsort(-mass)
    return pd.DataFrame({"z": pos[order, 0], "y": pos[order, 1], "x": pos[order, 2],
                         "mass": mass[order]})
