"""Detection metrics: match found particle centres to ground truth and score them.

Conventions
-----------
* Axis order is ``(z, y, x)`` everywhere.
* Positions are in **voxels**, with voxel centres at integer indices; a stack of
  shape ``(Z, Y, X)`` therefore spans ``-0.5 .. Z - 0.5`` along z (etc.).
* Physical sizes (``radius``, ``cutoff``, ``margin``) are in the unit of
  ``voxel_size`` (e.g. micrometres), which is given per axis ``(z, y, x)``.
  Distances between particles are always computed in physical units, so an
  offset along z counts by the z voxel size.

Matching objective
------------------
:func:`match` computes a one-to-one assignment between found and true centres
in which only pairs at physical distance ``<= cutoff`` may be matched. Among all
such assignments it returns one that

1. **maximises the number of matched pairs**, and, among those,
2. **minimises the sum of the matched (physical) distances**.

This lexicographic objective is solved exactly on the sparse candidate graph
(pairs within ``cutoff``, from :class:`scipy.spatial.cKDTree`) with
:func:`scipy.sparse.csgraph.min_weight_full_bipartite_matching`. Each found and
found and each true particle gets a dummy partner so that "unmatched" is always
feasible; leaving a particle unmatched costs ``U_c``, chosen per connected
component ``c`` of the candidate graph large enough (``U_c = cutoff * (k_c + 1)
/ 2`` with ``k_c`` the largest possible number of matches in the component)
that one extra match (which saves ``2 U_c``) always outweighs any change in the
summed distance.
The simpler objective "sum of distances + cutoff/2 per unmatched particle" is
*not* used because it trades matches for distance (e.g. found at x = 0, 1.1 and
truth at x = 0.6, 1.7 with cutoff 0.7: one pair at 0.5 ties with two pairs at
0.6 each), whereas the objective above always returns the two pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import connected_components, min_weight_full_bipartite_matching
from scipy.spatial import cKDTree

__all__ = ["match", "score", "Score"]

_AXES = ("z", "y", "x")


# --------------------------------------------------------------------------- #
# input validation
# --------------------------------------------------------------------------- #
def _as_positions(p: Any, name: str) -> np.ndarray:
    """Return ``p`` as a float64 array of shape (n, 3); accept empty (0,) / (0, 3)."""
    try:
        arr = np.asarray(p, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array of shape (n, 3): {exc}") from None
    if arr.size == 0 and arr.ndim <= 2 and (arr.ndim < 2 or arr.shape[-1] in (0, 3)):
        return np.zeros((0, 3), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"{name} must have shape (n, 3) in (z, y, x) voxels, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    return arr


def _as_voxel_size(voxel_size: Any) -> np.ndarray:
    try:
        vs = np.asarray(voxel_size, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"voxel_size must be 3 positive numbers (z, y, x): {exc}") from None
    if vs.shape != (3,):
        raise ValueError(f"voxel_size must have 3 entries (z, y, x), got shape {vs.shape}")
    if not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        raise ValueError(f"voxel_size must be finite and positive, got {tuple(vs.tolist())}")
    return vs


def _as_scalar(x: Any, name: str, *, allow_zero: bool = False) -> float:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {x!r}") from None
    if arr.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {arr.shape}")
    val = float(arr)
    if not np.isfinite(val) or val < 0 or (val == 0 and not allow_zero):
        need = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be finite and {need}, got {x!r}")
    return val


def _as_shape(shape: Any) -> np.ndarray:
    try:
        sh = np.asarray(shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be 3 positive integers (z, y, x), got {shape!r}") from None
    if sh.shape != (3,):
        raise ValueError(f"shape must have 3 entries (z, y, x), got {shape!r}")
    if not (np.issubdtype(sh.dtype, np.integer) or np.issubdtype(sh.dtype, np.floating)):
        raise ValueError(f"shape must be 3 positive integers (z, y, x), got {shape!r}")
    if not np.all(np.isfinite(sh)) or np.any(sh != np.round(sh)) or np.any(sh <= 0):
        raise ValueError(f"shape must be 3 positive integers (z, y, x), got {shape!r}")
    return sh.astype(np.int64)


# --------------------------------------------------------------------------- #
# matching
# --------------------------------------------------------------------------- #
def match(found, truth, *, cutoff, voxel_size=(1.0, 1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of found to true particle centres.

    Only pairs whose physical distance is ``<= cutoff`` can be matched. The
    assignment maximises the number of matched pairs first and, among those,
    minimises the sum of matched physical distances (see the module docstring).
    It is exact (Hungarian / Jonker-Volgenant on the sparse candidate graph)
    and scales to ~1e5 particles.

    Parameters
    ----------
    found : array_like, shape (n, 3)
        Found centres in voxels, axis order (z, y, x). ``n`` may be 0 (an
        empty array of shape (0, 3) or (0,)).
    truth : array_like, shape (m, 3)
        True centres in voxels, axis order (z, y, x). ``m`` may be 0.
    cutoff : float
        Largest matchable centre-to-centre distance, in physical units (the
        unit of ``voxel_size``). Must be > 0.
    voxel_size : sequence of 3 floats, optional
        Voxel size (z, y, x) in physical units; positions are multiplied by it
        before distances are computed. Default (1, 1, 1).

    Returns
    -------
    i_found, i_true : ndarray of int, shape (k,)
        Indices into ``found`` and ``truth`` of the ``k`` matched pairs, sorted
        by ``i_found``.

    Notes
    -----
    Run time is dominated by the size of the connected components of the
    candidate graph. With ``cutoff`` of about a particle radius and particles
    at least a diameter apart, components have a few particles and 1e5
    particles match in well under a second. If ``cutoff`` is comparable to
    the particle spacing *and* positions are noisy, the candidate graph can
    percolate into one giant component and the exact solve may take tens of
    seconds for 1e5 particles.

    Raises
    ------
    ValueError
        If positions are not (n, 3) finite arrays, ``voxel_size`` is not 3
        positive numbers, or ``cutoff`` is not a positive finite number.
    """
    f = _as_positions(found, "found")
    t = _as_positions(truth, "truth")
    vs = _as_voxel_size(voxel_size)
    cutoff = _as_scalar(cutoff, "cutoff")
    return _match(f, t, cutoff, vs)


def _match(f: np.ndarray, t: np.ndarray, cutoff: float, vs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    empty = (np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp))
    if len(f) == 0 or len(t) == 0:
        return empty

    pairs = cKDTree(f * vs).sparse_distance_matrix(cKDTree(t * vs), cutoff, output_type="ndarray")
    pairs = pairs[pairs["v"] <= cutoff]
    if len(pairs) == 0:
        return empty

    # Keep only particles that have at least one candidate; relabel compactly.
    uf, ii = np.unique(pairs["i"], return_inverse=True)
    ut, jj = np.unique(pairs["j"], return_inverse=True)
    ii = ii.astype(np.intp).ravel()
    jj = jj.astype(np.intp).ravel()
    dd = pairs["v"].astype(np.float64)
    a, b = len(uf), len(ut)
    e = len(dd)

    # Connected components of the candidate graph (found nodes 0..a-1, true a..a+b-1).
    graph = coo_matrix((np.ones(e), (ii, a + jj)), shape=(a + b, a + b))
    n_comp, labels = connected_components(graph, directed=False)
    n_f_c = np.bincount(labels[:a], minlength=n_comp)
    n_t_c = np.bincount(labels[a:], minlength=n_comp)
    # Cost of leaving one particle unmatched, per component c: 2 * U_c exceeds
    # the largest possible summed distance of any matching in that component
    # (<= k_c * cutoff), so one more match always wins (lexicographic objective).
    u_c = cutoff * (np.minimum(n_f_c, n_t_c) + 1.0) / 2.0
    u_f = u_c[labels[:a]]
    u_t = u_c[labels[a:]]

    # Square augmented biadjacency: rows = [found (a), dummy-of-true (b)],
    # cols = [true (b), dummy-of-found (a)]. found i -> dummy-of-found i means
    # "i unmatched" (cost U), dummy-of-true j -> true j means "j unmatched"
    # (cost U); for every candidate pair (i, j) the two dummies may pair up at
    # cost 0 when i and j are matched to each other. (The square form is much
    # faster in LAPJVsp than the rectangular one, whose padding is costly.)
    # Every perfect matching has a + b edges, so the constant `offset`
    # (keeping weights non-zero, as the solver requires) changes nothing.
    offset = cutoff
    ar_a = np.arange(a, dtype=np.intp)
    ar_b = np.arange(b, dtype=np.intp)
    rows = np.concatenate([ii, ar_a, a + ar_b, a + jj])
    cols = np.concatenate([jj, b + ar_a, ar_b, b + ii])
    vals = np.concatenate([dd, u_f, u_t, np.zeros(e)]) + offset
    big = csr_matrix((vals, (rows, cols)), shape=(a + b, a + b))
    row_ind, col_ind = min_weight_full_bipartite_matching(big)

    sel = (row_ind < a) & (col_ind < b)
    i_found = uf[row_ind[sel]].astype(np.intp)
    i_true = ut[col_ind[sel]].astype(np.intp)
    order = np.argsort(i_found, kind="stable")
    return i_found[order], i_true[order]


# --------------------------------------------------------------------------- #
# scoring
# --------------------------------------------------------------------------- #
def _ratio(num: int, den: int) -> float:
    return float(num) / den if den > 0 else float("nan")


def _readonly(a: Any) -> np.ndarray:
    arr = np.array(a, dtype=np.float64).reshape(3)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class Score:
    """Detection score of found vs true particle centres (see :func:`score`).

    Attributes
    ----------
    n_true : int
        Number of interior true particles.
    n_found : int
        Number of interior found particles.
    tp : int
        Matched pairs whose true particle is interior.
    fp : int
        Interior found particles that are unmatched.
    fn : int
        Interior true particles that are unmatched.
    recall : float
        ``tp / (tp + fn)``; nan when the denominator is 0.
    precision : float
        ``tp / (tp + fp)``; nan when the denominator is 0.
    f1 : float
        ``2 tp / (2 tp + fp + fn)``; nan when the denominator is 0.
    rmse : ndarray, shape (3,)
        Root-mean-square error of found - true per axis (z, y, x) over the TP
        pairs, in voxels of that axis; nan when there are no TP pairs.
    bias : ndarray, shape (3,)
        Mean of found - true per axis (z, y, x) over the TP pairs, in voxels;
        nan when there are no TP pairs.
    rmse_phys : ndarray, shape (3,)
        ``rmse * voxel_size``, in physical units.

    Notes
    -----
    Equality is identity (``eq=False``) because the fields hold arrays.
    """

    n_true: int
    n_found: int
    tp: int
    fp: int
    fn: int
    recall: float
    precision: float
    f1: float
    rmse: np.ndarray = field(repr=True)
    bias: np.ndarray = field(repr=True)
    rmse_phys: np.ndarray = field(repr=True)

    def __str__(self) -> str:
        r = " ".join(f"{v:.3f}" for v in self.rmse)
        return (
            f"recall {self.recall:.3f}  precision {self.precision:.3f}  F1 {self.f1:.3f}  "
            f"RMSE (z,y,x) {r} vox  [n_true {self.n_true}, found {self.n_found}]"
        )

    def as_dict(self, flat: bool = False) -> dict[str, Any]:
        """Return the score as a dict of plain Python values.

        Parameters
        ----------
        flat : bool, optional
            If False (default) the per-axis fields ``rmse``, ``bias`` and
            ``rmse_phys`` are lists ``[z, y, x]``. If True they are expanded to
            scalar keys ``rmse_z, rmse_y, rmse_x, bias_z, ...`` (handy for a
            row of a :class:`pandas.DataFrame`).

        Returns
        -------
        dict
            Counts as ``int``, ratios as ``float``.
        """
        d: dict[str, Any] = {
            "n_true": int(self.n_true),
            "n_found": int(self.n_found),
            "tp": int(self.tp),
            "fp": int(self.fp),
            "fn": int(self.fn),
            "recall": float(self.recall),
            "precision": float(self.precision),
            "f1": float(self.f1),
        }
        for name in ("rmse", "bias", "rmse_phys"):
            vals = [float(v) for v in getattr(self, name)]
            if flat:
                for ax, v in zip(_AXES, vals):
                    d[f"{name}_{ax}"] = v
            else:
                d[name] = vals
        return d


def _interior(p: np.ndarray, shape: np.ndarray, margin_vox: np.ndarray) -> np.ndarray:
    lo = margin_vox - 0.5
    hi = shape - 0.5 - margin_vox
    return np.all((p >= lo) & (p <= hi), axis=-1)


def score(found, truth, *, radius, voxel_size=(1.0, 1.0, 1.0), shape, cutoff=None, margin=None) -> Score:
    """Score found particle centres against the ground truth.

    Matching (:func:`match`) is done on *all* particles; the counts are then
    restricted to the interior of the stack, i.e. centres at least ``margin``
    (physical units) from every face: ``margin / voxel_size[k] - 0.5 <= p[k]
    <= shape[k] - 0.5 - margin / voxel_size[k]`` for each axis ``k`` (faces at
    ``-0.5`` and ``shape[k] - 0.5`` voxels).

    * TP: matched pairs whose true particle is interior (the found partner may
      be outside).
    * FN: interior true particles that are unmatched.
    * FP: interior found particles that are unmatched. An interior found
      particle matched to an exterior true one is neither TP nor FP.

    Parameters
    ----------
    found : array_like, shape (n, 3)
        Found centres in voxels (z, y, x); may be empty.
    truth : array_like, shape (m, 3)
        True centres in voxels (z, y, x); may be empty.
    radius : float
        Particle radius in physical units (> 0).
    voxel_size : sequence of 3 floats, optional
        Voxel size (z, y, x) in physical units. Default (1, 1, 1).
    shape : sequence of 3 ints
        Stack shape (z, y, x) in voxels.
    cutoff : float, optional
        Largest matchable distance in physical units; default ``radius``.
    margin : float, optional
        Distance from the stack faces, physical units, that a centre must keep
        to count as interior; default ``radius``. ``0`` uses the whole stack.

    Returns
    -------
    Score
        Counts, recall/precision/F1 (0/0 gives nan) and per-axis RMSE / bias
        over the TP pairs (nan without TP pairs).

    Raises
    ------
    ValueError
        On malformed positions, non-positive ``voxel_size``/``radius``/
        ``cutoff``, negative ``margin`` or a bad ``shape``.
    """
    f = _as_positions(found, "found")
    t = _as_positions(truth, "truth")
    vs = _as_voxel_size(voxel_size)
    radius = _as_scalar(radius, "radius")
    sh = _as_shape(shape)
    cutoff = radius if cutoff is None else _as_scalar(cutoff, "cutoff")
    margin = radius if margin is None else _as_scalar(margin, "margin", allow_zero=True)

    margin_vox = margin / vs
    f_in = _interior(f, sh, margin_vox)
    t_in = _interior(t, sh, margin_vox)

    i_f, i_t = _match(f, t, cutoff, vs)
    f_matched = np.zeros(len(f), dtype=bool)
    f_matched[i_f] = True
    t_matched = np.zeros(len(t), dtype=bool)
    t_matched[i_t] = True

    tp_sel = t_in[i_t]
    tp = int(np.count_nonzero(tp_sel))
    fn = int(np.count_nonzero(t_in & ~t_matched))
    fp = int(np.count_nonzero(f_in & ~f_matched))

    if tp > 0:
        diff = f[i_f[tp_sel]] - t[i_t[tp_sel]]
        rmse = np.sqrt(np.mean(diff**2, axis=0))
        bias = np.mean(diff, axis=0)
    else:
        rmse = np.full(3, np.nan)
        bias = np.full(3, np.nan)

    return Score(
        n_true=int(np.count_nonzero(t_in)),
        n_found=int(np.count_nonzero(f_in)),
        tp=tp,
        fp=fp,
        fn=fn,
        recall=_ratio(tp, tp + fn),
        precision=_ratio(tp, tp + fp),
        f1=_ratio(2 * tp, 2 * tp + fp + fn),
        rmse=_readonly(rmse),
        bias=_readonly(bias),
        rmse_phys=_readonly(rmse * vs),
    )
