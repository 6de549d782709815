"""Tests for difftrack._checks: every check names the problem it found."""

import math

import numpy as np
import pytest

from difftrack._checks import check_positions, check_stack, check_voxel_size

SHAPE = (5, 7, 9)  # deliberately non-cubic


def _stack(dtype=np.float32):
    rng = np.random.default_rng(0)
    return (rng.random(SHAPE) * 200).astype(dtype)


# ---------------------------------------------------------------- check_stack

@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.float64])
def test_valid_dtypes_accepted_and_returned_uncopied(dtype):
    img = _stack(dtype)
    before = img.copy()
    out = check_stack(img)
    assert out is img
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(img, before)


def test_memmap_subclass_returned_as_is(tmp_path):
    mm = np.memmap(tmp_path / "m.dat", dtype=np.uint16, mode="w+", shape=SHAPE)
    mm[:] = np.arange(mm.size, dtype=np.uint16).reshape(SHAPE)
    assert check_stack(mm) is mm


def test_array_like_converted():
    nested = _stack(np.float64).tolist()
    out = check_stack(nested)
    assert isinstance(out, np.ndarray) and out.shape == SHAPE


def test_2d_rejected():
    with pytest.raises(ValueError, match=r"image must be 3D \(z, y, x\); got 2D array of shape \(64, 64\)"):
        check_stack(np.random.default_rng(0).random((64, 64)))


def test_4d_points_to_read_series():
    with pytest.raises(ValueError, match=r"got 4D array.*read_series"):
        check_stack(np.random.default_rng(0).random((2,) + SHAPE))


def test_5d_rejected():
    with pytest.raises(ValueError, match=r"must be 3D.*got 5D array of shape \(1, 2, 5, 7, 9\)"):
        check_stack(np.random.default_rng(0).random((1, 2) + SHAPE))


def test_name_used_in_message():
    with pytest.raises(ValueError, match=r"^residual must be 3D"):
        check_stack(np.ones((3, 3)), name="residual")


def test_nan_rejected_with_count():
    img = _stack()
    img[0, 0, 0] = np.nan
    img[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match=r"2 NaN of 315"):
        check_stack(img)


def test_inf_rejected_with_count():
    img = _stack(np.float64)
    img[4, 6, 8] = -np.inf
    with pytest.raises(ValueError, match=r"non-finite.*1 Inf"):
        check_stack(img)


def test_nonfinite_detected_in_noncontiguous_view():
    img = _stack(np.float64)
    img[3, 5, 7] = np.nan
    view = img[:, :, ::-1].transpose(0, 2, 1)
    with pytest.raises(ValueError, match="1 NaN"):
        check_stack(view)


@pytest.mark.parametrize("shape", [(0, 7, 9), (5, 0, 9), (5, 7, 0)])
def test_empty_rejected(shape):
    with pytest.raises(ValueError, match=r"empty.*length 0"):
        check_stack(np.zeros(shape, np.float32))


def test_constant_float_rejected():
    with pytest.raises(ValueError, match=r"image is constant \(every voxel = 3\.0\): there is nothing to locate"):
        check_stack(np.full(SHAPE, 3.0, np.float32))


def test_constant_int_rejected():
    with pytest.raises(ValueError, match=r"constant \(every voxel = 7\)"):
        check_stack(np.full(SHAPE, 7, np.uint16))


def test_complex_rejected():
    with pytest.raises(TypeError, match=r"image has complex dtype complex64; expected a real-valued \(integer or float\) stack"):
        check_stack(_stack().astype(np.complex64))


def test_bool_rejected():
    with pytest.raises(TypeError, match=r"boolean dtype bool"):
        check_stack(_stack() > 100)


def test_object_rejected():
    with pytest.raises(TypeError, match=r"non-numeric dtype object"):
        check_stack(_stack().astype(object))


def test_string_rejected():
    with pytest.raises(TypeError, match=r"non-numeric dtype <U"):
        check_stack(np.full(SHAPE, "a"))


def test_single_voxel_difference_is_not_constant():
    img = np.zeros(SHAPE, np.uint8)
    img[-1, -1, -1] = 1
    assert check_stack(img) is img


# ------------------------------------------------------------ check_voxel_size

def test_voxel_size_none_passes():
    assert check_voxel_size(None) is None


@pytest.mark.parametrize("v", [0.25, 1, np.float32(0.5), np.array(2.0)])
def test_voxel_size_scalar_is_isotropic(v):
    out = check_voxel_size(v)
    assert out == (float(v),) * 3
    assert all(type(c) is float for c in out)


@pytest.mark.parametrize("v", [(0.2, 0.1, 0.1), [0.2, 0.1, 0.1], np.array([0.2, 0.1, 0.1])])
def test_voxel_size_sequence(v):
    assert check_voxel_size(v) == pytest.approx((0.2, 0.1, 0.1))


@pytest.mark.parametrize("bad, pattern", [
    (0, r"> 0.*got 0\.0 along z"),
    (-0.1, r"> 0.*got -0\.1"),
    (float("nan"), r"finite.*nan"),
    (math.inf, r"finite.*inf"),
    ((0.2, 0.0, 0.1), r"got 0\.0 along y"),
    ((0.2, 0.1, -1), r"got -1\.0 along x"),
    ((0.2, float("nan"), 0.1), r"nan along y"),
    ((0.1, 0.1), r"got 2 values"),
    ((0.1, 0.1, 0.1, 0.1), r"got 4 values"),
    ("0.1", r"string '0\.1'"),
    ((0.1, "a", 0.1), r"component y must be a real number; got 'a'"),
    (True, r"got True"),
    ({"z": 1}, r"got \{'z': 1\}"),
])
def test_voxel_size_invalid(bad, pattern):
    with pytest.raises(ValueError, match=pattern):
        check_voxel_size(bad)


# ------------------------------------------------------------- check_positions

def test_positions_valid_returns_float64():
    pos = np.array([[0, 0, 0], [4, 6, 8]], dtype=np.int64)
    out = check_positions(pos, shape=SHAPE)
    assert out.dtype == np.float64 and out.shape == (2, 3)
    np.testing.assert_array_equal(out, pos)


def test_positions_float64_not_copied_or_modified():
    pos = np.array([[1.5, 2.5, 3.5]])
    before = pos.copy()
    out = check_positions(pos)
    assert out is pos
    np.testing.assert_array_equal(pos, before)


def test_positions_empty_ok():
    assert check_positions(np.zeros((0, 3)), shape=SHAPE).shape == (0, 3)


def test_positions_edges_inclusive():
    pos = [[-0.5, -0.5, -0.5], [4.5, 6.5, 8.5]]
    assert check_positions(pos, shape=SHAPE).shape == (2, 3)


@pytest.mark.parametrize("bad, pattern", [
    (np.zeros((4, 2)), r"shape \(n, 3\).*got shape \(4, 2\)"),
    (np.zeros(3), r"got shape \(3,\).*\(1, 3\)"),
    (np.zeros((2, 3, 1)), r"got shape \(2, 3, 1\)"),
    ([["a", "b", "c"]], r"must be numeric"),
])
def test_positions_wrong_shape_or_type(bad, pattern):
    with pytest.raises(ValueError, match=pattern):
        check_positions(bad)


def test_positions_nan_rejected():
    pos = np.array([[1.0, 1, 1], [2, np.nan, 2], [3, 3, np.inf]])
    with pytest.raises(ValueError, match=r"NaN or Inf in 2 of 3 rows; first is row 1"):
        check_positions(pos)


def test_positions_outside_stack():
    pos = np.array([[1.0, 1, 1], [2, 2, 8.6], [-0.6, 0, 0], [4, 6, 8]])
    with pytest.raises(ValueError, match=r"2 of 4 positions lie outside the stack of shape \(5, 7, 9\).*first is row 1: \(z, y, x\) = \(2\.0, 2\.0, 8\.6\)"):
        check_positions(pos, shape=SHAPE)


def test_positions_outside_not_checked_without_shape():
    pos = np.array([[100.0, -50, 3]])
    assert check_positions(pos) is pos
