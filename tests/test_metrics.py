"""Hand-made cases with known answers for difftrack.metrics (match / score)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from difftrack.metrics import Score, match, score

# Non-cubic stack with anisotropic voxels: physical extent (8.0, 6.4, 8.0).
SHAPE = (40, 64, 80)
VS = (0.2, 0.1, 0.1)
RADIUS = 0.5  # -> margin (2.5, 5, 5) voxels; interior z in [2, 37], y in [4.5, 58.5], x in [4.5, 74.5]


def lattice_truth() -> np.ndarray:
    """180 interior centres on a 1.2-unit lattice (6 vox along z, 12 along y, x)."""
    z = np.arange(5, 36, 6.0)  # 6 planes, 5..35
    y = np.arange(8, 57, 12.0)  # 5 rows, 8..56
    x = np.arange(8, 69, 12.0)  # 6 columns, 8..68
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    return np.stack([zz.ravel(), yy.ravel(), xx.ravel()], axis=1)


TRUTH = lattice_truth()
N = len(TRUTH)


def test_lattice_is_interior_and_sparse():
    assert N == 180
    s = score(TRUTH[:0], TRUTH, radius=RADIUS, voxel_size=VS, shape=SHAPE)
    assert s.n_true == N  # all lattice points are interior
    assert s.fn == N and s.tp == 0
    s = score(TRUTH, TRUTH[:0], radius=RADIUS, voxel_size=VS, shape=SHAPE)
    assert s.n_found == N and s.fp == N and s.n_true == 0
    # nearest-neighbour distance (1.2 units) is well above 2 * cutoff
    d = np.linalg.norm((TRUTH[:, None] - TRUTH[None]) * np.array(VS), axis=-1)
    assert d[~np.eye(N, dtype=bool)].min() == pytest.approx(1.2)


def test_perfect():
    rng = np.random.default_rng(1)
    found = TRUTH[rng.permutation(N)]
    s = score(found, TRUTH, radius=RADIUS, voxel_size=VS, shape=SHAPE)
    assert (s.n_true, s.n_found, s.tp, s.fp, s.fn) == (N, N, N, 0, 0)
    assert s.recall == 1.0 and s.precision == 1.0 and s.f1 == 1.0
    np.testing.assert_array_equal(s.rmse, np.zeros(3))
    np.testing.assert_array_equal(s.bias, np.zeros(3))
    np.testing.assert_array_equal(s.rmse_phys, np.zeros(3))


def test_perfect_match_indices_with_zero_distance():
    # zero-distance pairs must be kept (a sparse matrix would drop them)
    perm = np.random.default_rng(2).permutation(N)
    i_f, i_t = match(TRUTH[perm], TRUTH, cutoff=0.3, voxel_size=VS)
    assert len(i_f) == N
    np.testing.assert_array_equal(i_f, np.arange(N))
    np.testing.assert_array_equal(i_t, perm)


def test_shifted():
    shift = np.array([0.1, -0.2, 0.05])  # voxels
    s = score(TRUTH + shift, TRUTH, radius=RADIUS, voxel_size=VS, shape=SHAPE)
    assert s.recall == 1.0 and s.precision == 1.0 and s.tp == N
    np.testing.assert_allclose(s.rmse, np.abs(shift), rtol=0, atol=1e-12)
    np.testing.assert_allclose(s.bias, shift, rtol=0, atol=1e-12)
    np.testing.assert_allclose(s.rmse_phys, np.abs(shift) * np.array(VS), rtol=0, atol=1e-12)


def test_missing():
    k = 7
    rng = np.random.default_rng(3)
    keep = np.sort(rng.choice(N, N - k, replace=False))
    s = score(TRUTH[keep], TRUTH, radius=RADIUS, voxel_size=VS, shape=SHAPE)
    assert (s.tp, s.fn, s.fp) == (N - k, k, 0)
    assert s.recall == pytest.approx((N - k) / N, abs=1e-15)
    assert s.precision == 1.0
    assert s.f1 == pytest.approx(2 * (N - k) / (2 * (N - k) + k), abs=1e-15)


def test_spurious():
    k = 5
    # midpoints of lattice cells: >= 1.04 units from every truth (cutoff 0.5), interior
    extra = TRUTH[:k] + np.array([3.0, 6.0, 6.0])
    s = score(np.vstack([TRUTH, extra]), TRUTH, radius=RADIUS, voxel_size=VS, shape=SHAPE)
    assert (s.n_found, s.tp, s.fp, s.fn) == (N + k, N, k, 0)
    assert s.precision == pytest.approx(N / (N + k), abs=1e-15)
    assert s.recall == 1.0


def test_anisotropy_matters():
    truth = np.array([[10.0, 20.0, 20.0]])
    along_z = np.array([[14.0, 20.0, 20.0]])  # 4 vox * 0.2 = 0.8 > 0.5
    along_x = np.array([[10.0, 20.0, 24.0]])  # 4 vox * 0.1 = 0.4 <= 0.5
    i_f, _ = match(along_z, truth, cutoff=0.5, voxel_size=VS)
    assert len(i_f) == 0
    i_f, i_t = match(along_x, truth, cutoff=0.5, voxel_size=VS)
    assert i_f.tolist() == [0] and i_t.tolist() == [0]
    # with isotropic voxels the z offset (0.4 units) would match
    assert len(match(along_z, truth, cutoff=0.5, voxel_size=(0.1, 0.1, 0.1))[0]) == 1

    sz = score(along_z, truth, radius=0.5, voxel_size=VS, shape=SHAPE)
    sx = score(along_x, truth, radius=0.5, voxel_size=VS, shape=SHAPE)
    assert (sz.tp, sz.fp, sz.fn) == (0, 1, 1)
    assert (sx.tp, sx.fp, sx.fn) == (1, 0, 0)
    np.testing.assert_allclose(sx.rmse, [0.0, 0.0, 4.0], atol=1e-12)
    np.testing.assert_allclose(sx.rmse_phys, [0.0, 0.0, 0.4], atol=1e-12)


def test_cutoff_defaults_to_radius_and_is_inclusive_of_closer_pairs():
    truth = np.array([[20.0, 30.0, 30.0]])
    near = truth + [0.0, 0.0, 4.9]  # 0.49 units
    far = truth + [0.0, 0.0, 5.1]  # 0.51 units
    kw = dict(radius=0.5, voxel_size=VS, shape=SHAPE)
    assert score(near, truth, **kw).tp == 1
    assert score(far, truth, **kw).tp == 0
    assert score(far, truth, cutoff=0.6, **kw).tp == 1


def _greedy(found, truth, cutoff):
    """Greedy closest-pair-first matching (the thing Hungarian must beat)."""
    d = np.linalg.norm(found[:, None] - truth[None], axis=-1)
    pairs = sorted((d[i, j], i, j) for i in range(len(found)) for j in range(len(truth)) if d[i, j] <= cutoff)
    used_f, used_t, out = set(), set(), []
    for _, i, j in pairs:
        if i not in used_f and j not in used_t:
            used_f.add(i), used_t.add(j), out.append((i, j))
    return out


def test_hungarian_beats_greedy():
    found = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.1]])
    truth = np.array([[0.0, 0.0, 0.6], [0.0, 0.0, 1.7]])
    assert len(_greedy(found, truth, 0.7)) == 1  # greedy takes the 0.5 pair and strands the rest
    i_f, i_t = match(found, truth, cutoff=0.7)
    assert len(i_f) == 2
    assert list(zip(i_f.tolist(), i_t.tolist())) == [(0, 0), (1, 1)]


def test_maximises_matches_before_distance():
    # one pair at distance 0 vs two pairs at 0.9 each (cutoff 1): two matches win
    found = np.array([[0, 0, 1.0], [0, 0, 1.9]])
    truth = np.array([[0, 0, 0.1], [0, 0, 1.0]])
    i_f, i_t = match(found, truth, cutoff=1.0)
    assert list(zip(i_f.tolist(), i_t.tolist())) == [(0, 0), (1, 1)]


def test_agrees_with_dense_bruteforce():
    rng = np.random.default_rng(4)
    vs = np.array([0.4, 0.2, 0.25])
    checked = 0
    for _ in range(200):
        n, m = rng.integers(1, 12, size=2)
        f = rng.uniform(0, 12, (n, 3))
        t = rng.uniform(0, 12, (m, 3))
        cutoff = rng.uniform(0.5, 2.5)
        i_f, i_t = match(f, t, cutoff=cutoff, voxel_size=vs)
        assert len(np.unique(i_f)) == len(i_f) and len(np.unique(i_t)) == len(i_t)
        d_all = np.linalg.norm((f[:, None] - t[None]) * vs, axis=-1)
        assert np.all(d_all[i_f, i_t] <= cutoff)
        # reference: dense Hungarian, lexicographic (count first, then distance)
        big = 1e6
        cost = np.where(d_all <= cutoff, d_all - big, 10 * big)
        r, c = linear_sum_assignment(cost)
        ok = d_all[r, c] <= cutoff
        assert len(i_f) == ok.sum()
        assert d_all[i_f, i_t].sum() == pytest.approx(d_all[r[ok], c[ok]].sum(), abs=1e-9)
        checked += ok.sum() > 0
    assert checked > 50  # the random cases were not all trivial


def test_border():
    # interior bounds for SHAPE/VS/RADIUS: z in [2, 37], y in [4.5, 58.5], x in [4.5, 74.5]
    truth = np.array(
        [
            [20.0, 30.0, 30.0],  # 0 interior, matched by found 0           -> TP
            [1.8, 30.0, 40.0],  # 1 exterior (z < 2), matched by interior found 1 -> not counted
            [2.1, 30.0, 50.0],  # 2 interior, matched by exterior found 2   -> TP
            [1.0, 10.0, 10.0],  # 3 exterior, unmatched                      -> not FN
            [20.0, 58.5, 60.0],  # 4 interior exactly on the upper y bound, unmatched -> FN
        ]
    )
    found = np.array(
        [
            [20.0, 30.0, 30.0],  # 0 interior
            [2.1, 30.0, 40.0],  # 1 interior, partner truth 1 is exterior -> neither TP nor FP
            [1.9, 30.0, 50.0],  # 2 exterior, partner truth 2 interior
            [20.0, 2.0, 70.0],  # 3 exterior (y < 4.5), unmatched -> not FP
            [30.0, 30.0, 74.5],  # 4 interior exactly on the upper x bound, unmatched -> FP
        ]
    )
    s = score(found, truth, radius=RADIUS, voxel_size=VS, shape=SHAPE)
    assert s.n_true == 3  # truths 0, 2, 4
    assert s.n_found == 3  # found 0, 1, 4
    assert (s.tp, s.fp, s.fn) == (2, 1, 1)
    assert s.recall == pytest.approx(2 / 3) and s.precision == pytest.approx(2 / 3)
    # TP pairs are (0,0) and (2,2): z errors 0 and -0.2
    np.testing.assert_allclose(s.bias, [-0.1, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(s.rmse, [math.sqrt(0.02), 0.0, 0.0], atol=1e-12)

    # margin=0: the whole stack is interior (faces at -0.5 and shape-0.5)
    s0 = score(found, truth, radius=RADIUS, voxel_size=VS, shape=SHAPE, margin=0.0)
    assert (s0.n_true, s0.n_found, s0.tp, s0.fp, s0.fn) == (5, 5, 3, 2, 2)

    # a particle outside the stack entirely is never interior
    s1 = score(np.array([[-0.6, 5, 5]]), np.array([[40.0, 5, 5]]), radius=RADIUS, voxel_size=VS, shape=SHAPE, margin=0)
    assert (s1.n_true, s1.n_found) == (0, 0)


def test_random_20000_shuffled_with_noise():
    rng = np.random.default_rng(5)
    shape = (120, 400, 400)
    vs = (0.2, 0.1, 0.1)
    # lattice sites 1.0 unit apart (5 vox in z, 10 in y/x); take 20,000 of 38,400
    z, y, x = np.meshgrid(np.arange(2.0, 120, 5), np.arange(5.0, 400, 10), np.arange(5.0, 400, 10), indexing="ij")
    sites = np.stack([z.ravel(), y.ravel(), x.ravel()], axis=1)
    n = 20_000
    truth = sites[rng.choice(len(sites), n, replace=False)]
    sigma = 0.05  # voxels, per axis
    perm = rng.permutation(n)
    found = truth[perm] + rng.normal(0.0, sigma, (n, 3))

    i_f, i_t = match(found, truth, cutoff=0.4, voxel_size=vs)
    assert len(i_f) == n
    np.testing.assert_array_equal(i_t, perm[i_f])

    s = score(found, truth, radius=0.4, voxel_size=vs, shape=shape)
    assert s.recall == 1.0 and s.precision == 1.0
    assert s.tp == s.n_true > 15_000
    np.testing.assert_allclose(s.rmse, sigma, rtol=0.05)
    assert np.all(np.abs(s.bias) < 5 * sigma / math.sqrt(s.tp))


def test_empty_inputs():
    none = np.zeros((0, 3))
    i_f, i_t = match(none, TRUTH, cutoff=0.5)
    assert i_f.shape == (0,) and i_t.shape == (0,) and np.issubdtype(i_f.dtype, np.integer)
    assert len(match(TRUTH, np.array([]), cutoff=0.5)[0]) == 0

    s = score([], TRUTH, radius=RADIUS, voxel_size=VS, shape=SHAPE)
    assert (s.n_true, s.n_found, s.tp, s.fp, s.fn) == (N, 0, 0, 0, N)
    assert s.recall == 0.0 and s.f1 == 0.0 and math.isnan(s.precision)
    assert np.all(np.isnan(s.rmse)) and np.all(np.isnan(s.bias)) and np.all(np.isnan(s.rmse_phys))

    s = score(np.zeros((0,)), np.zeros((0, 3)), radius=RADIUS, voxel_size=VS, shape=SHAPE)
    assert (s.n_true, s.n_found, s.tp, s.fp, s.fn) == (0, 0, 0, 0, 0)
    assert math.isnan(s.recall) and math.isnan(s.precision) and math.isnan(s.f1)


def test_score_object():
    shift = np.array([0.1, -0.2, 0.05])
    s = score(TRUTH + shift, TRUTH, radius=RADIUS, voxel_size=VS, shape=SHAPE)
    assert isinstance(s, Score)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.tp = 0  # type: ignore[misc]
    with pytest.raises(ValueError):
        s.rmse[0] = 1.0  # arrays are read-only
    assert str(s) == (
        f"recall 1.000  precision 1.000  F1 1.000  RMSE (z,y,x) 0.100 0.200 0.050 vox  [n_true {N}, found {N}]"
    )
    d = s.as_dict()
    assert d["tp"] == N and isinstance(d["tp"], int)
    assert d["rmse"] == pytest.approx([0.1, 0.2, 0.05])
    assert d["bias"] == pytest.approx(list(shift))
    flat = s.as_dict(flat=True)
    assert "rmse" not in flat
    assert flat["rmse_z"] == pytest.approx(0.1) and flat["bias_y"] == pytest.approx(-0.2)
    assert flat["rmse_phys_x"] == pytest.approx(0.005)


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(found=np.zeros((4, 2))), "found must have shape"),
        (dict(found=np.zeros(3)), "found must have shape"),
        (dict(truth=np.zeros((2, 3, 1))), "truth must have shape"),
        (dict(truth=np.array([[1.0, np.nan, 2.0]])), "truth contains non-finite"),
        (dict(found=np.array([[1.0, np.inf, 2.0]])), "found contains non-finite"),
        (dict(found=[["a", "b", "c"]]), "found must be a numeric"),
        (dict(voxel_size=(0.2, 0.0, 0.1)), "voxel_size must be finite and positive"),
        (dict(voxel_size=(0.2, -0.1, 0.1)), "voxel_size must be finite and positive"),
        (dict(voxel_size=(0.1, 0.1)), "voxel_size must have 3 entries"),
        (dict(radius=0.0), "radius must be finite and positive"),
        (dict(radius=-1.0), "radius must be finite and positive"),
        (dict(radius=float("nan")), "radius must be finite and positive"),
        (dict(cutoff=0.0), "cutoff must be finite and positive"),
        (dict(margin=-0.1), "margin must be finite and non-negative"),
        (dict(shape=(10, 10)), "shape must have 3 entries"),
        (dict(shape=(10, 10.5, 10)), "shape must be 3 positive integers"),
        (dict(shape=(10, 0, 10)), "shape must be 3 positive integers"),
    ],
)
def test_score_validation(kwargs, msg):
    args = dict(found=TRUTH[:3], truth=TRUTH[:3], radius=RADIUS, voxel_size=VS, shape=SHAPE)
    args.update(kwargs)
    found, truth = args.pop("found"), args.pop("truth")
    with pytest.raises(ValueError, match=msg):
        score(found, truth, **args)


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(cutoff=-1.0), "cutoff must be finite and positive"),
        (dict(cutoff=[0.5, 0.5]), "cutoff must be a scalar"),
        (dict(voxel_size=(1.0, 1.0, float("inf"))), "voxel_size must be finite and positive"),
    ],
)
def test_match_validation(kwargs, msg):
    args = dict(cutoff=0.5, voxel_size=VS)
    args.update(kwargs)
    with pytest.raises(ValueError, match=msg):
        match(TRUTH[:3], TRUTH[:3], **args)
