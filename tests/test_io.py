"""Tests for difftrack.io: stack/series reading, calibration, atomic writes."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from difftrack.io import (
    Stack,
    atomic_write,
    check_writable,
    read_series,
    read_stack,
    read_table,
    write_stack,
    write_table,
)

SHAPE = (5, 7, 9)  # deliberately non-cubic: (z, y, x)
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _stack(dtype=np.uint16, shape=SHAPE):
    """A stack whose value encodes the voxel index, so any axis mix-up shows."""
    return np.arange(np.prod(shape), dtype=np.int64).reshape(shape).astype(dtype)


def _listing(d):
    return sorted(p.name for p in Path(d).iterdir())


# ------------------------------------------------------------------ read/write

@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
def test_write_read_roundtrip_with_voxel_size(tmp_path, dtype):
    img = _stack(dtype)
    before = img.copy()
    p = tmp_path / "s.tif"
    write_stack(p, img, voxel_size=(0.2, 0.1, 0.1))
    np.testing.assert_array_equal(img, before)  # caller's array untouched
    st = read_stack(p)
    assert isinstance(st, Stack)
    assert st.image.shape == SHAPE and st.shape == SHAPE
    assert st.image.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(st.image, img)
    assert st.voxel_size == pytest.approx((0.2, 0.1, 0.1), rel=1e-9)
    assert st.unit == "um"
    assert st.path == str(p)
    assert _listing(tmp_path) == ["s.tif"]  # no temp files left


def test_roundtrip_anisotropic_xy_and_awkward_values(tmp_path):
    p = tmp_path / "s.tiff"
    write_stack(p, _stack(), voxel_size=(0.3, 0.07, 0.11))
    assert read_stack(p).voxel_size == pytest.approx((0.3, 0.07, 0.11), rel=1e-9)


def test_roundtrip_without_voxel_size(tmp_path):
    p = tmp_path / "s.tif"
    write_stack(p, _stack())
    st = read_stack(p)
    assert st.voxel_size is None and st.unit is None
    np.testing.assert_array_equal(st.image, _stack())


def test_write_stack_rejects_unsupported_dtype_without_converting(tmp_path):
    p = tmp_path / "s.tif"
    with pytest.raises(ValueError, match=r"cannot hold dtype float64.*astype"):
        write_stack(p, _stack(np.float64))
    assert not p.exists()


def test_write_stack_rejects_bad_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"unsupported file type '\.png'.*\.tif"):
        write_stack(tmp_path / "s.png", _stack())


def test_write_stack_replaces_existing_file(tmp_path):
    p = tmp_path / "s.tif"
    write_stack(p, _stack(), voxel_size=1.0)
    write_stack(p, _stack() + 1, voxel_size=(0.2, 0.1, 0.1))
    st = read_stack(p)
    np.testing.assert_array_equal(st.image, _stack() + 1)
    assert st.voxel_size == pytest.approx((0.2, 0.1, 0.1))
    assert _listing(tmp_path) == ["s.tif"]


def test_override_voxel_size(tmp_path):
    p = tmp_path / "s.tif"
    write_stack(p, _stack(), voxel_size=(0.2, 0.1, 0.1))
    st = read_stack(p, voxel_size=(0.5, 0.25, 0.25))
    assert st.voxel_size == (0.5, 0.25, 0.25)
    assert st.unit == "um"
    assert read_stack(p, voxel_size=0.3).voxel_size == (0.3, 0.3, 0.3)


def test_invalid_override_rejected(tmp_path):
    p = tmp_path / "s.tif"
    write_stack(p, _stack())
    with pytest.raises(ValueError, match=r"voxel_size.*-0\.1"):
        read_stack(p, voxel_size=(-0.1, 0.1, 0.1))


def test_plain_tiff_has_no_voxel_size(tmp_path):
    p = tmp_path / "plain.tif"
    tifffile.imwrite(p, _stack())
    st = read_stack(p)
    assert st.voxel_size is None and st.unit is None
    np.testing.assert_array_equal(st.image, _stack())


def test_ome_tiff_voxel_size(tmp_path):
    p = tmp_path / "x.ome.tif"
    tifffile.imwrite(p, _stack(), ome=True, metadata={
        "axes": "ZYX",
        "PhysicalSizeX": 0.1, "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": 0.12, "PhysicalSizeYUnit": "µm",
        "PhysicalSizeZ": 0.2, "PhysicalSizeZUnit": "µm",
    })
    st = read_stack(p)
    assert st.voxel_size == pytest.approx((0.2, 0.12, 0.1))
    assert st.unit == "um"
    np.testing.assert_array_equal(st.image, _stack())


def test_ome_tiff_mixed_units_converted_to_um(tmp_path):
    p = tmp_path / "x.ome.tif"
    tifffile.imwrite(p, _stack(), ome=True, metadata={
        "axes": "ZYX",
        "PhysicalSizeX": 100.0, "PhysicalSizeXUnit": "nm",
        "PhysicalSizeY": 100.0, "PhysicalSizeYUnit": "nm",
        "PhysicalSizeZ": 0.2, "PhysicalSizeZUnit": "µm",
    })
    st = read_stack(p)
    assert st.voxel_size == pytest.approx((0.2, 0.1, 0.1))
    assert st.unit == "um"


def test_ome_tiff_without_z_step_warns_and_gives_none(tmp_path):
    p = tmp_path / "x.ome.tif"
    tifffile.imwrite(p, _stack(), ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 0.1, "PhysicalSizeY": 0.1})
    with pytest.warns(UserWarning, match="PhysicalSizeZ"):
        st = read_stack(p)
    assert st.voxel_size is None


@pytest.mark.parametrize("unit", ["micron", "\\u00B5m", "um", "Micron"])
def test_imagej_unit_spellings_normalised(tmp_path, unit):
    p = tmp_path / "ij.tif"
    tifffile.imwrite(p, _stack(), imagej=True, resolution=(10.0, 10.0),
                     metadata={"axes": "ZYX", "spacing": 0.2, "unit": unit})
    st = read_stack(p)
    assert st.unit == "um"
    assert st.voxel_size == pytest.approx((0.2, 0.1, 0.1))


def test_imagej_stack_labelled_as_channels_is_zyx(tmp_path):
    p = tmp_path / "ch.tif"
    img = _stack(shape=(48, 7, 9))
    tifffile.imwrite(p, img, imagej=True, resolution=(10.0, 10.0),
                     metadata={"axes": "CYX", "spacing": 0.2, "unit": "um"})
    with tifffile.TiffFile(p) as tif:  # the file really says channels
        assert tif.series[0].axes == "CYX"
    st = read_stack(p)
    assert st.image.shape == (48, 7, 9)
    np.testing.assert_array_equal(st.image, img)
    assert st.voxel_size == pytest.approx((0.2, 0.1, 0.1))


def test_imagej_without_calibration_is_none(tmp_path):
    p = tmp_path / "ij.tif"
    tifffile.imwrite(p, _stack(), imagej=True)
    assert read_stack(p).voxel_size is None


def test_4d_tzyx_file(tmp_path):
    p = tmp_path / "t.tif"
    series = np.stack([_stack() + 10 * t for t in range(3)])
    tifffile.imwrite(p, series, imagej=True, resolution=(10.0, 10.0),
                     metadata={"axes": "TZYX", "spacing": 0.2, "unit": "um"})
    stacks = read_series(p)
    assert len(stacks) == 3
    for t, st in enumerate(stacks):
        assert st.image.shape == SHAPE
        np.testing.assert_array_equal(st.image, series[t])
        assert st.voxel_size == pytest.approx((0.2, 0.1, 0.1))
        assert st.path == str(p)
    with pytest.raises(ValueError, match=r"4D time series.*read_series"):
        read_stack(p)


def test_read_series_of_3d_file_gives_one(tmp_path):
    p = tmp_path / "s.tif"
    write_stack(p, _stack(), voxel_size=(0.2, 0.1, 0.1))
    stacks = read_series(p, voxel_size=0.5)
    assert len(stacks) == 1
    assert stacks[0].shape == SHAPE and stacks[0].voxel_size == (0.5, 0.5, 0.5)


def test_read_series_array_frames_are_views():
    series = np.stack([_stack(np.float32) + t for t in range(4)])
    stacks = read_series(series, voxel_size=(0.2, 0.1, 0.1))
    assert len(stacks) == 4
    assert all(np.shares_memory(st.image, series) for st in stacks)
    np.testing.assert_array_equal(stacks[2].image, series[2])
    assert stacks[0].voxel_size == (0.2, 0.1, 0.1) and stacks[0].path is None


def test_read_series_bad_frame_named():
    series = np.stack([_stack(np.float32), np.full(SHAPE, 2.0, np.float32)])
    with pytest.raises(ValueError, match=r"frame 1 is constant"):
        read_series(series)


def test_read_series_rejects_2d():
    with pytest.raises(ValueError, match=r"got 2D array"):
        read_series(np.ones((4, 4)))


def test_multichannel_file_rejected(tmp_path):
    p = tmp_path / "zc.tif"
    tifffile.imwrite(p, np.stack([_stack(), _stack() + 1], axis=1), imagej=True,
                     metadata={"axes": "ZCYX"})
    with pytest.raises(ValueError, match=r"multi-channel"):
        read_stack(p)


def test_2d_file_rejected_naming_path(tmp_path):
    p = tmp_path / "plane.tif"
    tifffile.imwrite(p, _stack()[0])
    with pytest.raises(ValueError, match=r"plane\.tif must be 3D .*got 2D"):
        read_stack(p)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.tif"
    with pytest.raises(FileNotFoundError, match="nope.tif"):
        read_stack(p)
    with pytest.raises(FileNotFoundError, match="nope.tif"):
        read_series(str(p))


def test_corrupt_file(tmp_path):
    p = tmp_path / "x.tif"
    p.write_bytes(b"not a tiff")
    with pytest.raises(ValueError, match=r"could not read TIFF .*x\.tif: "):
        read_stack(p)


def test_array_input_is_callers_array():
    img = _stack(np.float32)
    before = img.copy()
    st = read_stack(img, voxel_size=(0.2, 0.1, 0.1))
    assert st.image is img
    np.testing.assert_array_equal(img, before)
    assert st.voxel_size == (0.2, 0.1, 0.1) and st.unit == "um" and st.path is None
    st2 = read_stack(img)
    assert st2.voxel_size is None and st2.unit is None


def test_array_input_validated():
    with pytest.raises(ValueError, match=r"4D.*read_series"):
        read_stack(np.zeros((2,) + SHAPE) + np.arange(2 * 315).reshape((2,) + SHAPE))
    with pytest.raises(TypeError, match="complex"):
        read_stack(_stack().astype(np.complex128))


def test_stack_is_frozen_and_repr_short():
    st = read_stack(_stack(np.float32))
    with pytest.raises(AttributeError):
        st.voxel_size = (1.0, 1.0, 1.0)
    r = repr(st)
    assert "shape=(5, 7, 9)" in r and "float32" in r and len(r) < 200


# --------------------------------------------------------------------- tables

def _table():
    rng = np.random.default_rng(1)
    return pd.DataFrame({"z": rng.random(6) * 5, "y": rng.random(6) * 7,
                         "x": rng.random(6) * 9, "r": np.full(6, 4.0),
                         "id": np.arange(6)})


@pytest.mark.parametrize("name", ["t.csv", "t.parquet", "t.pq", "T.CSV"])
def test_table_roundtrip(tmp_path, name):
    df = _table()
    p = tmp_path / name
    write_table(df, p)
    back = read_table(p)
    pd.testing.assert_frame_equal(back, df, check_exact=True)
    assert _listing(tmp_path) == [name]


def test_table_index_not_written(tmp_path):
    df = _table().set_index(pd.Index(list("abcdef")))
    write_table(df, tmp_path / "t.csv")
    back = read_table(tmp_path / "t.csv")
    assert list(back.columns) == ["z", "y", "x", "r", "id"]


def test_table_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"unsupported.*'\.xlsx'.*\.csv, \.parquet, \.pq"):
        write_table(_table(), tmp_path / "t.xlsx")
    with pytest.raises(ValueError, match=r"unsupported.*'\.txt'"):
        read_table(tmp_path / "t.txt")
    assert _listing(tmp_path) == []


def test_write_table_requires_dataframe(tmp_path):
    with pytest.raises(TypeError, match="DataFrame"):
        write_table({"z": [1]}, tmp_path / "t.csv")


def test_read_table_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.csv"):
        read_table(tmp_path / "gone.csv")


def test_write_table_atomic_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.csv"
    target.write_text("old content\n")

    def broken_to_csv(self, path, *args, **kwargs):
        with open(path, "w") as fh:
            fh.write("z,y,x\n1,2")  # half a table ...
        raise RuntimeError("disk full")  # ... then the failure

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken_to_csv)
    with pytest.raises(RuntimeError, match="disk full"):
        write_table(_table(), target)
    assert target.read_text() == "old content\n"
    assert _listing(tmp_path) == ["out.csv"]

    fresh = tmp_path / "new.csv"
    with pytest.raises(RuntimeError, match="disk full"):
        write_table(_table(), fresh)
    assert not fresh.exists()
    assert _listing(tmp_path) == ["out.csv"]


def test_write_stack_atomic_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "s.tif"
    write_stack(target, _stack(), voxel_size=(0.2, 0.1, 0.1))
    original = target.read_bytes()

    def broken_imwrite(path, *args, **kwargs):
        Path(path).write_bytes(b"II*\x00partial")
        raise OSError("device gone")

    monkeypatch.setattr(tifffile, "imwrite", broken_imwrite)
    with pytest.raises(OSError, match="device gone"):
        write_stack(target, _stack() + 1)
    assert target.read_bytes() == original
    assert _listing(tmp_path) == ["s.tif"]


def test_atomic_write_helper(tmp_path):
    target = tmp_path / "a.txt"
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.exists()
        tmp.write_text("hello")
        assert not target.exists()  # invisible until the block succeeds
    assert target.read_text() == "hello"
    assert _listing(tmp_path) == ["a.txt"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as tmp:
            tmp.write_text("partial")
            raise KeyboardInterrupt
    assert target.read_text() == "hello"
    assert _listing(tmp_path) == ["a.txt"]


def test_atomic_write_respects_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "p.csv") as tmp:
            tmp.write_text("a\n1\n")
    finally:
        os.umask(old)
    assert (tmp_path / "p.csv").stat().st_mode & 0o777 == 0o644


def test_nonexistent_directory(tmp_path):
    p = tmp_path / "missing" / "t.csv"
    with pytest.raises(FileNotFoundError, match=r"directory .*missing.* does not exist"):
        check_writable(p)
    with pytest.raises(FileNotFoundError, match="missing"):
        write_table(_table(), p)
    with pytest.raises(FileNotFoundError, match="missing"):
        write_stack(tmp_path / "missing" / "s.tif", _stack())


def test_parent_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        check_writable(tmp_path / "file" / "t.csv")


def test_target_is_a_directory(tmp_path):
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(IsADirectoryError, match=r"d\.csv"):
        check_writable(tmp_path / "d.csv")


def test_check_writable_ok_leaves_nothing(tmp_path):
    assert check_writable(tmp_path / "t.parquet") == tmp_path / "t.parquet"
    assert _listing(tmp_path) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root can write into read-only directories")
def test_unwritable_directory(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match=r"ro.* is not writable"):
            write_table(_table(), d / "t.csv")
    finally:
        d.chmod(0o755)


def test_unwritable_directory_probe_failure(tmp_path, monkeypatch):
    """Works under root too: simulate the OS refusing to create the probe."""
    import difftrack.io as dio

    def refuse(directory, name):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(dio, "_open_hidden_temp", refuse)
    with pytest.raises(PermissionError, match=r"is not writable \(Permission denied\)"):
        write_table(_table(), tmp_path / "t.csv")
    assert _listing(tmp_path) == []


# ------------------------------------------------------------------ real data

def test_shared_data_files():
    if not DATA.is_dir():
        pytest.skip(f"shared data folder not present: {DATA}")
    dev = read_stack(DATA / "dev" / "dev_small_dense.tif")
    assert dev.image.shape == (48, 96, 96)
    assert dev.voxel_size == pytest.approx((0.2, 0.1, 0.1))
    assert dev.unit == "um"
    real = read_stack(DATA / "real" / "small_confocal_image.tif")
    assert real.image.shape == (48, 64, 64)
    assert real.image.dtype == np.uint8
    assert real.voxel_size is None
