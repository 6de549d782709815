"""Reading and writing image stacks and particle tables.

Axis order is always (z, y, x): images are arrays of shape (nz, ny, nx) and
voxel sizes are ``(dz, dy, dx)`` in physical units (usually um). Images are
returned with the dtype and intensities stored in the file; nothing is
rescaled. Every write is atomic: the data go to a hidden temporary file in the
target directory which then replaces the target in one step, so a failed or
interrupted write never leaves a half-written file behind and never damages a
file that was already there.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._checks import check_stack, check_voxel_size

__all__ = [
    "Stack",
    "read_stack",
    "read_series",
    "write_stack",
    "write_table",
    "read_table",
    "check_writable",
    "atomic_write",
    "TABLE_SUFFIXES",
    "TIFF_SUFFIXES",
]

TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
TIFF_SUFFIXES = (".tif", ".tiff")
# dtypes an ImageJ hyperstack can hold
_IMAGEJ_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int16),
                  np.dtype(np.float32))

# spellings of length units found in ImageJ and OME metadata -> canonical
_UNIT_ALIASES = {
    "um": "um", "µm": "um", "μm": "um", "\\u00b5m": "um", "micron": "um",
    "microns": "um", "micrometer": "um", "micrometre": "um", "micrometers": "um",
    "micrometres": "um",
    "nm": "nm", "nanometer": "nm", "nanometre": "nm", "nanometers": "nm",
    "mm": "mm", "millimeter": "mm", "millimetre": "mm",
    "cm": "cm", "centimeter": "cm", "centimetre": "cm",
    "m": "m", "meter": "m", "metre": "m",
    "pm": "pm", "å": "A", "angstrom": "A",
    "pixel": None, "pixels": None, "px": None, "": None, "reference frame": None,
}
_TO_UM = {"um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "pm": 1e-6, "A": 1e-4}


@dataclass(frozen=True, eq=False)
class Stack:
    """A 3D image stack and its physical calibration.

    Attributes
    ----------
    image : numpy.ndarray, shape (nz, ny, nx)
        Intensities in (z, y, x) order, with the dtype and values stored in
        the file (or the caller's array itself); never rescaled.
    voxel_size : tuple of 3 float or None
        ``(dz, dy, dx)``: size of one voxel along z, y and x in ``unit``;
        ``None`` when the file records no calibration and none was given.
    unit : str or None
        Length unit of ``voxel_size``, e.g. ``"um"``; ``None`` if unknown.
    path : str or None
        File the stack was read from; ``None`` for an in-memory array.
    """

    image: np.ndarray
    voxel_size: tuple[float, float, float] | None = None
    unit: str | None = None
    path: str | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape (nz, ny, nx) of the image."""
        return tuple(self.image.shape)  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (f"Stack(shape={self.shape}, dtype={self.image.dtype}, "
                f"voxel_size={self.voxel_size}, unit={self.unit!r}, path={self.path!r})")


# --------------------------------------------------------------------------
# atomic writes and output checks
# --------------------------------------------------------------------------

def _open_hidden_temp(directory: Path, name: str) -> Path:
    """Create an empty, hidden, uniquely named file in ``directory``.

    Created with ``os.open(..., O_CREAT | O_EXCL, 0o666)`` so that it gets
    the permissions of any new file (the process umask applies), unlike
    ``mkstemp``'s 0o600.
    """
    for _ in range(100):
        tmp = directory / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file in '{directory}'")


@contextlib.contextmanager
def atomic_write(path) -> Iterator[Path]:
    """Context manager for writing ``path`` atomically.

    Yields the path of a hidden temporary file in the same directory as
    ``path`` (``.NAME.<random>.tmp``). Write the whole output to it inside the
    ``with`` block. On normal exit the temporary file is flushed to disk and
    moved onto ``path`` with :func:`os.replace` (atomic on POSIX and
    Windows); if the block raises, the temporary file is deleted and the
    exception propagates, leaving any existing ``path`` untouched.

    Parameters
    ----------
    path : str or os.PathLike
        Final destination.

    Yields
    ------
    pathlib.Path
        Temporary file to write to (already created, empty).

    Examples
    --------
    >>> with atomic_write("out.csv") as tmp:          # doctest: +SKIP
    ...     df.to_csv(tmp, index=False)
    """
    path = Path(path).expanduser()
    tmp = _open_hidden_temp(path.parent, path.name)
    try:
        yield tmp
        try:  # make the data durable before the rename makes it visible
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _parquet_engine_available() -> bool:
    for mod in ("pyarrow", "fastparquet"):
        try:
            __import__(mod)
            return True
        except ImportError:
            continue
    return False


def check_writable(path, *, suffixes=TABLE_SUFFIXES) -> Path:
    """Check, before any heavy work, that ``path`` can be written.

    Checks that the suffix is supported, that the directory exists and that a
    file can be created in it (by creating and deleting a hidden probe file,
    which is reliable where :func:`os.access` is not: root, ACLs, read-only
    mounts). For Parquet it also checks that a Parquet engine is installed.

    Parameters
    ----------
    path : str or os.PathLike
        Output file.
    suffixes : sequence of str, optional
        Accepted suffixes (lower case, with the dot). Default: the table
        formats ``(".csv", ".parquet", ".pq")``; use :data:`TIFF_SUFFIXES`
        for stacks.

    Returns
    -------
    pathlib.Path
        ``path`` as a Path (user directory expanded).

    Raises
    ------
    ValueError
        Unsupported suffix.
    FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError
        The directory is missing, is not a directory, ``path`` is itself a
        directory, or the directory is not writable.
    ImportError
        Parquet requested but neither pyarrow nor fastparquet is installed.
    """
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix not in suffixes:
        raise ValueError(f"cannot write '{p}': unsupported file type {p.suffix!r}; "
                         f"supported: {', '.join(suffixes)}")
    if suffix in (".parquet", ".pq") and not _parquet_engine_available():
        raise ImportError(f"cannot write '{p}': Parquet needs pyarrow (pip install pyarrow); "
                          "or write a .csv file instead")
    d = p.parent
    if not d.exists():
        raise FileNotFoundError(f"cannot write '{p}': directory '{d}' does not exist")
    if not d.is_dir():
        raise NotADirectoryError(f"cannot write '{p}': '{d}' is not a directory")
    if p.is_dir():
        raise IsADirectoryError(f"cannot write '{p}': it is an existing directory")
    try:
        probe = _open_hidden_temp(d, p.name)
    except OSError as exc:
        raise PermissionError(f"cannot write '{p}': directory '{d}' is not writable "
                              f"({exc.strerror or exc})") from None
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return p


# --------------------------------------------------------------------------
# TIFF reading
# --------------------------------------------------------------------------

def _norm_unit(unit) -> tuple[bool, str | None]:
    """Return (known, canonical unit); known=False for unrecognised strings."""
    if unit is None:
        return True, None
    key = str(unit).strip()
    low = key.lower()
    if low in _UNIT_ALIASES:
        return True, _UNIT_ALIASES[low]
    return False, key


def _clean(v: float) -> float:
    """Round away binary noise from rational tags (0.30000000000000004 -> 0.3)."""
    return float(f"{v:.12g}")


def _rational(tag) -> float | None:
    if tag is None:
        return None
    val = tag.value
    try:
        if isinstance(val, tuple):
            num, den = val[0], val[1]
            return float(num) / float(den) if den else None
        return float(val)
    except (TypeError, ValueError, IndexError, ZeroDivisionError):
        return None


def _warn_partial(path, what: str) -> None:
    warnings.warn(f"{path}: {what}; voxel size unknown (pass voxel_size=(dz, dy, dx) to set "
                  "it)", UserWarning, stacklevel=4)


def _imagej_calibration(tif, page, path):
    """Voxel size (z, y, x) and unit from ImageJ metadata, or (None, None)."""
    ij = tif.imagej_metadata or {}
    known, unit = _norm_unit(ij.get("unit"))
    spacing = ij.get("spacing")
    xres = _rational(page.tags.get("XResolution"))
    yres = _rational(page.tags.get("YResolution"))
    trivial_res = all(r is None or r == 1.0 for r in (xres, yres))
    if unit is None and spacing is None and trivial_res:
        return None, None
    if spacing is None:
        _warn_partial(path, "ImageJ metadata give the pixel size but no z step ('spacing')")
        return None, None
    # ImageJ: a missing resolution tag means 1 pixel = 1 unit
    xres = xres if xres and xres > 0 else 1.0
    yres = yres if yres and yres > 0 else 1.0
    try:
        vs = (float(spacing), 1.0 / yres, 1.0 / xres)
    except (TypeError, ValueError):
        _warn_partial(path, f"ImageJ 'spacing' {spacing!r} is not a number")
        return None, None
    return vs, unit


def _ome_calibration(tif, path):
    """Voxel size (z, y, x) and unit from OME-XML, or (None, None)."""
    import tifffile

    try:
        meta = tifffile.xml2dict(tif.ome_metadata)
        image = meta["OME"]["Image"]
        if isinstance(image, list):
            image = image[0]
        pixels = image["Pixels"]
    except Exception:  # malformed OME-XML: treat as uncalibrated
        return None, None
    sizes, units = [], []
    for ax in "ZYX":
        v = pixels.get(f"PhysicalSize{ax}")
        sizes.append(None if v is None else float(v))
        # OME default unit is the micrometre
        units.append(_norm_unit(pixels.get(f"PhysicalSize{ax}Unit", "µm")))
    if all(s is None for s in sizes):
        return None, None
    if any(s is None for s in sizes):
        missing = ", ".join(f"PhysicalSize{a}" for a, s in zip("ZYX", sizes) if s is None)
        _warn_partial(path, f"OME metadata lack {missing}")
        return None, None
    canon = [u for _, u in units]
    if len(set(canon)) == 1 and all(k for k, _ in units):
        return tuple(sizes), canon[0]
    if all(k and u in _TO_UM for k, u in units):  # mixed length units -> um
        return tuple(s * _TO_UM[u] for s, (_, u) in zip(sizes, units)), "um"
    _warn_partial(path, f"OME physical sizes have units {[u for _, u in units]} that cannot "
                  "be combined")
    return None, None


def _read_tiff(path) -> tuple[np.ndarray, str, tuple | None, str | None, str]:
    """Read series 0 of a TIFF: (array, axes, voxel_size, unit, path str)."""
    import tifffile

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"no such file: '{p}'")
    if p.is_dir():
        raise IsADirectoryError(f"expected a TIFF file, got a directory: '{p}'")
    try:
        with tifffile.TiffFile(p) as tif:
            if not tif.series:
                raise ValueError("the file holds no image series")
            series = tif.series[0]
            axes = series.axes
            image = series.asarray()
            page = series.pages[0] if series.pages else tif.pages[0]
            vs = unit = None
            if tif.is_ome:
                vs, unit = _ome_calibration(tif, p)
            if vs is None and tif.is_imagej:
                vs, unit = _imagej_calibration(tif, page, p)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except MemoryError:
        raise
    except Exception as exc:
        raise ValueError(f"could not read TIFF {p}: {exc}") from exc
    if vs is not None:
        vs = tuple(_clean(v) for v in vs)
        if not all(np.isfinite(v) and v > 0 for v in vs):
            _warn_partial(p, f"the file's voxel size {vs} is not positive and finite")
            vs, unit = None, None
    return image, axes, vs, unit, str(p)


def _split_axes(image: np.ndarray, axes: str, path: str):
    """Classify a TIFF series by its axes.

    Returns ``("stack", image)`` for a 3D series (interpreted as (z, y, x)
    whatever its labels), or ``("series", image)`` for a 4D time series with
    the time axis moved to the front (a view, not a copy).
    """
    axes = axes.upper()
    if axes.endswith("S") and image.shape[-1] in (3, 4) and image.ndim >= 3:
        raise ValueError(f"{path} holds an RGB/multi-sample image (axes {axes!r}, shape "
                         f"{image.shape}); convert it to one grayscale (z, y, x) stack")
    if image.ndim <= 3:
        return "stack", image
    if image.ndim == 4:
        if "T" in axes:
            t = axes.index("T")
            return "series", np.moveaxis(image, t, 0)
        if "C" in axes and "Z" in axes:
            raise ValueError(f"{path} holds a multi-channel stack (axes {axes!r}, shape "
                             f"{image.shape}); difftrack tracks one channel: extract it as a "
                             "3D (z, y, x) array and pass the array")
        return "series", image  # unlabelled 4D: assume (t, z, y, x)
    raise ValueError(f"{path} holds a {image.ndim}D series (axes {axes!r}, shape "
                     f"{image.shape}); expected a 3D (z, y, x) stack or a 4D (t, z, y, x) "
                     "time series")


def _is_pathlike(obj) -> bool:
    return isinstance(obj, (str, os.PathLike))


def read_stack(path_or_array, *, voxel_size=None) -> Stack:
    """Read one 3D (z, y, x) image stack with its voxel size.

    Parameters
    ----------
    path_or_array : str, os.PathLike, array_like or Stack
        A TIFF file (plain, ImageJ or OME-TIFF), or an array of shape
        (nz, ny, nx). For a file, the first image series is read; a 3D series
        is taken as (z, y, x) whatever its axis labels (ImageJ files written
        by some tools label a z stack as channels or frames).
    voxel_size : float or sequence of 3 float, optional
        ``(dz, dy, dx)`` in physical units (um), or one number for isotropic
        voxels. Overrides the file's calibration; for an array it is the only
        source of the voxel size.

    Returns
    -------
    Stack
        ``image`` of shape (nz, ny, nx) with the file's dtype and values
        (for an array input: the caller's array itself), ``voxel_size``
        ``(dz, dy, dx)`` or ``None``, ``unit`` (``"um"`` for an override or
        for micrometres in any spelling) and ``path``.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        The file is not a readable TIFF; it holds a 4D time series (use
        :func:`read_series`) or a multi-channel / RGB image; the image
        fails :func:`difftrack._checks.check_stack`; or ``voxel_size`` is
        invalid.
    TypeError
        The image dtype is not a real number type.

    Notes
    -----
    Calibration is taken from OME-XML (``PhysicalSizeZ/Y/X`` and their
    units) or ImageJ metadata (``XResolution``/``YResolution`` tags in
    pixels per unit, ``spacing`` = z step, ``unit``). A file without such
    metadata gives ``voxel_size=None``.
    """
    vs_arg = check_voxel_size(voxel_size)
    if isinstance(path_or_array, Stack):
        src = path_or_array
        image = check_stack(src.image)
        if vs_arg is not None:
            return Stack(image, vs_arg, "um", src.path)
        return Stack(image, src.voxel_size, src.unit, src.path)
    if not _is_pathlike(path_or_array):
        image = check_stack(path_or_array)
        return Stack(image, vs_arg, "um" if vs_arg is not None else None, None)

    image, axes, vs, unit, p = _read_tiff(path_or_array)
    kind, image = _split_axes(image, axes, p)
    if kind == "series":
        raise ValueError(f"{p} holds a 4D time series (axes {axes!r}, shape {image.shape} as "
                         "(t, z, y, x)); use read_series to read it as one stack per frame")
    image = check_stack(image, name=p)
    if vs_arg is not None:
        vs, unit = vs_arg, "um"
    return Stack(image, vs, unit, p)


def read_series(path_or_array, *, voxel_size=None) -> list[Stack]:
    """Read a time series of 3D stacks, one :class:`Stack` per frame.

    Parameters
    ----------
    path_or_array : str, os.PathLike or array_like
        A TIFF file or an array of shape (nt, nz, ny, nx) in (t, z, y, x)
        order (a labelled time axis ``T`` anywhere in the file's axes is
        moved to the front). A 3D (z, y, x) input gives a list of one stack.
    voxel_size : float or sequence of 3 float, optional
        ``(dz, dy, dx)`` in physical units (um); overrides the file's.

    Returns
    -------
    list of Stack
        ``nt`` stacks whose images, of shape (nz, ny, nx), are views into
        the series (not copies); every frame is checked with
        :func:`difftrack._checks.check_stack`.

    Raises
    ------
    FileNotFoundError, ValueError, TypeError
        As for :func:`read_stack`; ValueError also for inputs that are
        neither 3D nor 4D.
    """
    vs_arg = check_voxel_size(voxel_size)
    if _is_pathlike(path_or_array):
        image, axes, vs, unit, p = _read_tiff(path_or_array)
        kind, image = _split_axes(image, axes, p)
        if vs_arg is not None:
            vs, unit = vs_arg, "um"
        name = p
    else:
        image = path_or_array if isinstance(path_or_array, np.ndarray) \
            else np.asarray(path_or_array)
        p, name = None, "image"
        vs, unit = vs_arg, ("um" if vs_arg is not None else None)
        if image.ndim == 4:
            kind = "series"
        elif image.ndim == 3:
            kind = "stack"
        else:
            raise ValueError(f"read_series expects a 4D (t, z, y, x) or 3D (z, y, x) array; "
                             f"got {image.ndim}D array of shape {image.shape}")
    if kind == "stack":
        return [Stack(check_stack(image, name=name), vs, unit, p)]
    return [Stack(check_stack(image[t], name=f"{name} frame {t}"), vs, unit, p)
            for t in range(image.shape[0])]


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------

def write_stack(path, image, *, voxel_size=None) -> None:
    """Write a 3D stack as an ImageJ hyperstack TIFF, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Output ``.tif``/``.tiff`` file; replaced atomically if it exists.
    image : array_like, shape (nz, ny, nx)
        Stack in (z, y, x) order, dtype uint8, uint16, int16 or float32 (the
        types ImageJ can hold). Written as is: never converted or rescaled.
    voxel_size : float or sequence of 3 float, optional
        ``(dz, dy, dx)`` in um. Stored as the x/y resolution (pixels per um),
        the ImageJ ``spacing`` (z step) and ``unit='um'``, so that
        :func:`read_stack` returns it. Omitted: the file is uncalibrated.

    Raises
    ------
    ValueError, TypeError
        Invalid image (see :func:`difftrack._checks.check_stack`), a dtype
        ImageJ cannot hold, a bad voxel size or suffix.
    OSError
        The directory does not exist or is not writable.
    """
    import tifffile

    image = check_stack(image)
    vs = check_voxel_size(voxel_size)
    if image.dtype.newbyteorder("=") not in _IMAGEJ_DTYPES:
        raise ValueError(
            f"ImageJ TIFF cannot hold dtype {image.dtype}; supported: uint8, uint16, int16, "
            "float32. Convert explicitly (e.g. image.astype(np.float32)) if the loss of "
            "range or precision is acceptable")
    p = check_writable(path, suffixes=TIFF_SUFFIXES)
    kwargs: dict = {"imagej": True, "metadata": {"axes": "ZYX"}}
    if vs is not None:
        dz, dy, dx = vs
        kwargs["resolution"] = (1.0 / dx, 1.0 / dy)
        kwargs["metadata"].update(spacing=dz, unit="um")
    with atomic_write(p) as tmp:
        tifffile.imwrite(tmp, image, **kwargs)


def _table_suffix(path) -> str:
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ValueError(f"unsupported table file type {p.suffix!r} for '{p}'; supported: "
                         f"{', '.join(TABLE_SUFFIXES)}")
    return suffix


def write_table(df, path) -> None:
    """Write a table as CSV or Parquet (chosen by suffix), atomically.

    Parameters
    ----------
    df : pandas.DataFrame
        The table, e.g. particle positions with columns ``z, y, x`` (voxels).
        The index is not written.
    path : str or os.PathLike
        ``.csv`` for CSV, ``.parquet`` or ``.pq`` for Parquet (needs
        pyarrow). Replaced atomically if it exists.

    Raises
    ------
    ValueError
        Unsupported suffix.
    TypeError
        ``df`` is not a DataFrame.
    OSError
        The directory does not exist or is not writable.
    """
    import pandas as pd

    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"write_table expects a pandas DataFrame; got {type(df).__name__}")
    p = check_writable(path, suffixes=TABLE_SUFFIXES)
    suffix = _table_suffix(p)
    with atomic_write(p) as tmp:
        if suffix == ".csv":
            df.to_csv(tmp, index=False)
        else:
            df.to_parquet(tmp, index=False)


def read_table(path):
    """Read a table written by :func:`write_table`.

    Parameters
    ----------
    path : str or os.PathLike
        ``.csv``, ``.parquet`` or ``.pq`` file.

    Returns
    -------
    pandas.DataFrame

    Raises
    ------
    ValueError
        Unsupported suffix.
    FileNotFoundError
        The file does not exist.
    """
    import pandas as pd

    p = Path(path).expanduser()
    suffix = _table_suffix(p)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: '{p}'")
    if suffix == ".csv":
        return pd.read_csv(p)
    return pd.read_parquet(p)
