"""Input validation shared by every public function of difftrack.

Each check raises an exception whose message names the offending value and
says what was expected, so that a user can fix the input without reading the
source. Checks never copy, modify or rescale the caller's data.

Axis order is always (z, y, x).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

__all__ = ["check_stack", "check_voxel_size", "check_positions"]

# Voxels examined per chunk by the finiteness check: bounds the temporary
# boolean array to ~16 MB whatever the stack size.
_FINITE_CHUNK = 1 << 24


def _shape_str(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + (",)" if len(shape) == 1 else ")")


def _count_nonfinite(arr: np.ndarray) -> tuple[int, int]:
    """Return (number of NaN voxels, number of +/-Inf voxels) of a float array."""
    flat = arr.reshape(-1)  # a view for contiguous arrays, a copy otherwise
    n_nan = n_inf = 0
    for start in range(0, flat.size, _FINITE_CHUNK):
        chunk = flat[start:start + _FINITE_CHUNK]
        n_nan += int(np.count_nonzero(np.isnan(chunk)))
        n_inf += int(np.count_nonzero(np.isinf(chunk)))
    return n_nan, n_inf


def _all_finite(arr: np.ndarray) -> bool:
    """True if every voxel of a float array is finite (chunked, low memory)."""
    if arr.ndim == 0:
        return bool(np.isfinite(arr))
    # Iterate over slabs of the first axis so that non-contiguous arrays are
    # not copied in full.
    per_slab = max(1, arr[0].size)
    step = max(1, _FINITE_CHUNK // per_slab)
    for start in range(0, arr.shape[0], step):
        if not np.isfinite(arr[start:start + step]).all():
            return False
    return True


def check_stack(image, name: str = "image") -> np.ndarray:
    """Validate a 3D image stack and return it unchanged.

    Parameters
    ----------
    image : array_like, shape (nz, ny, nx)
        Intensity stack in (z, y, x) order, any real dtype (unsigned or signed
        integer, or floating point). Intensities are in arbitrary camera units
        and are never rescaled.
    name : str, optional
        What to call the input in error messages (default ``"image"``).

    Returns
    -------
    numpy.ndarray, shape (nz, ny, nx)
        The caller's array itself when ``image`` is already an ndarray (or an
        ndarray subclass such as ``numpy.memmap``); otherwise
        ``numpy.asarray(image)``. Never a modified or rescaled copy.

    Raises
    ------
    TypeError
        If the dtype is not a real number type (bool, complex, object,
        string, datetime, structured ...).
    ValueError
        If the array is not 3D, has an axis of length 0, contains NaN or
        Inf voxels, or is constant (nothing to locate).
    """
    arr = image if isinstance(image, np.ndarray) else np.asarray(image)

    dt = arr.dtype
    if dt.kind == "b":
        raise TypeError(
            f"{name} has boolean dtype {dt}; expected a real-valued (integer or float) "
            "intensity stack, not a mask (convert it with .astype(np.uint8) if it really "
            "is an image)")
    if dt.kind == "c":
        raise TypeError(
            f"{name} has complex dtype {dt}; expected a real-valued (integer or float) stack")
    if dt.kind not in "iuf":
        raise TypeError(
            f"{name} has non-numeric dtype {dt}; expected a real-valued (integer or float) "
            "stack")

    if arr.ndim != 3:
        msg = (f"{name} must be 3D (z, y, x); got {arr.ndim}D array of shape "
               f"{_shape_str(arr.shape)}")
        if arr.ndim == 4:
            msg += (": a 4D (t, z, y, x) series must be read with read_series or passed "
                    "frame by frame (one 3D stack at a time)")
        elif arr.ndim == 2:
            msg += ": a single 2D plane cannot be tracked in 3D"
        raise ValueError(msg)

    if arr.size == 0:
        raise ValueError(f"{name} is empty: shape {_shape_str(arr.shape)} has an axis of "
                         "length 0")

    if dt.kind == "f" and not _all_finite(arr):
        n_nan, n_inf = _count_nonfinite(arr)
        parts = []
        if n_nan:
            parts.append(f"{n_nan} NaN")
        if n_inf:
            parts.append(f"{n_inf} Inf")
        raise ValueError(
            f"{name} contains non-finite voxels ({' and '.join(parts)} of {arr.size}); "
            "replace them before tracking, e.g. by the median of the rest: "
            "np.where(np.isfinite(a), a, np.nanmedian(a)) (difftrack has no mask for missing "
            "voxels)")

    lo = arr.min()
    hi = arr.max()
    if lo == hi:
        raise ValueError(
            f"{name} is constant (every voxel = {lo.item()!r}): there is nothing to locate")
    return arr


def _as_real(v, what: str) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise ValueError(f"{what} must be a real number; got {v!r}")
    return float(v)


def check_voxel_size(voxel_size) -> tuple[float, float, float] | None:
    """Validate a voxel size and return it as a (z, y, x) tuple of floats.

    Parameters
    ----------
    voxel_size : None, float or sequence of 3 floats
        Physical size of one voxel along (z, y, x) (e.g. in um). ``None``
        means unknown and is passed through. A single number means
        isotropic voxels ``(v, v, v)``.

    Returns
    -------
    tuple of 3 float or None
        ``(dz, dy, dx)``, each finite and > 0; ``None`` if ``voxel_size`` is
        ``None``.

    Raises
    ------
    ValueError
        If the value is not a number or a length-3 sequence of numbers, or
        any component is zero, negative, NaN or infinite.
    """
    if voxel_size is None:
        return None
    if isinstance(voxel_size, np.ndarray) and voxel_size.ndim == 0:
        voxel_size = voxel_size.item()
    if isinstance(voxel_size, numbers.Real) and not isinstance(voxel_size, (bool, np.bool_)):
        vals = (float(voxel_size),) * 3
    elif isinstance(voxel_size, (str, bytes)):
        raise ValueError(f"voxel_size must be a number or a (z, y, x) sequence of 3 numbers; "
                         f"got the string {voxel_size!r}")
    elif isinstance(voxel_size, (Sequence, np.ndarray)):
        seq = list(np.asarray(voxel_size, dtype=object).ravel()) \
            if isinstance(voxel_size, np.ndarray) else list(voxel_size)
        if (isinstance(voxel_size, np.ndarray) and voxel_size.ndim != 1) or len(seq) != 3:
            raise ValueError(
                "voxel_size must be a number (isotropic) or a (z, y, x) sequence of 3 "
                f"numbers; got {len(seq)} values: {voxel_size!r}")
        vals = tuple(_as_real(v, f"voxel_size component {ax}")
                     for ax, v in zip("zyx", seq))
    else:
        raise ValueError("voxel_size must be a number (isotropic) or a (z, y, x) sequence "
                         f"of 3 numbers; got {voxel_size!r}")
    for ax, v in zip("zyx", vals):
        if not math.isfinite(v) or v <= 0:
            raise ValueError(
                f"voxel_size must be finite and > 0 along every axis; got {v!r} along {ax} "
                f"(voxel_size={voxel_size!r})")
    return vals  # type: ignore[return-value]


def check_positions(positions, shape=None) -> np.ndarray:
    """Validate particle positions and return them as an (n, 3) float64 array.

    Parameters
    ----------
    positions : array_like, shape (n, 3)
        Particle centres in voxel units, columns (z, y, x); voxel centres lie
        at integer indices. ``n`` may be 0.
    shape : tuple of 3 int, optional
        Shape (nz, ny, nx) of the stack the positions refer to. If given,
        every coordinate must lie in ``[-0.5, n - 0.5]`` on its axis (inside
        the stack, edges of the outer voxels included).

    Returns
    -------
    numpy.ndarray, shape (n, 3), dtype float64
        The positions; the caller's array itself when it already is a
        float64 (n, 3) ndarray, otherwise a converted copy. Never modified.

    Raises
    ------
    ValueError
        If the array is not (n, 3), holds non-numeric, NaN or Inf values,
        or (with ``shape``) a position lies outside the stack.
    """
    try:
        pos = np.asarray(positions, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"positions must be numeric, shape (n, 3) in (z, y, x) voxels; "
                         f"could not convert: {exc}") from None
    if pos.ndim != 2 or pos.shape[1] != 3:
        hint = " (a single position must be passed as shape (1, 3))" if pos.shape == (3,) else ""
        raise ValueError(f"positions must have shape (n, 3) with columns (z, y, x); got shape "
                         f"{_shape_str(pos.shape)}{hint}")
    if not np.isfinite(pos).all():
        bad = ~np.isfinite(pos).all(axis=1)
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"positions contain NaN or Inf in {int(bad.sum())} of {len(pos)} rows; "
                         f"first is row {first}: {pos[first].tolist()}")
    if shape is not None:
        shp = tuple(int(s) for s in shape)
        if len(shp) != 3:
            raise ValueError(f"shape must be (nz, ny, nx); got {shape!r}")
        hi = np.asarray(shp, dtype=np.float64) - 0.5
        out = ((pos < -0.5) | (pos > hi)).any(axis=1)
        if out.any():
            first = int(np.flatnonzero(out)[0])
            raise ValueError(
                f"{int(out.sum())} of {len(pos)} positions lie outside the stack of shape "
                f"{_shape_str(shp)} (allowed range [-0.5, n - 0.5] on each axis); first is row "
                f"{first}: (z, y, x) = {tuple(pos[first].tolist())}")
    return pos
