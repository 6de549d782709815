"""Neural detector: a small 3D U-Net (``network.UNet``) proposes particle centres.

Pipeline of ``detect``:

1. ``preprocess``: invert dark particles, resample the stack so that a particle's radius
   is ``CANONICAL_RADIUS`` (3) voxels along every axis (this also removes the voxel
   anisotropy; anti-aliasing Gaussian before any down-sampling, linear interpolation,
   pixel-area convention) and normalise it robustly (median, 1-99 percentile range).
2. ``predict``: run the network over the canonical stack, in overlapping tiles for large
   stacks (the network has no normalisation layer and each tile keeps ``reach`` voxels of
   context on every side, so tiles add up to exactly the whole-stack result).
3. ``extract_peaks``: local maxima of the centre likelihood above a threshold, at least
   ``separation`` canonical voxels apart, each moved by the predicted sub-voxel offset.
4. ``to_original``: canonical -> original voxel coordinates. With n voxels along an
   axis resampled to m, canonical voxel c covers original [(c) n/m, (c+1) n/m) in edge
   coordinates, so ``original = (c + 0.5) * n / m - 0.5`` (voxel centres at integers).

Weights are a ``.npz`` (``save_weights``/``load_weights``): the parameters, keyed by
their path in the model, and a small JSON header (features, default threshold, training
settings). The package ships ``weights/detector.npz``, loaded offline.

Positions in voxels (z, y, x) of the original stack, voxel centres at integer indices.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx
from scipy import ndimage

from ._checks import check_stack
from .network import CANONICAL_RADIUS, UNet

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "detector.npz"
DEFAULT_THRESHOLD = 0.4
DEFAULT_TILE = None  # window edge of tiled inference (None: automatic)
MAX_WINDOW_VOXELS = 1 << 24  # automatic tiling: largest window (~3 GB of activations)
OUTER_PAD = 8  # canonical voxels of reflection padding around the stack


# --------------------------------------------------------------------------- #
# canonical frame
# --------------------------------------------------------------------------- #
def _radius3(radius_vox):
    try:
        r = np.broadcast_to(np.asarray(radius_vox, float), (3,)).copy()
    except (TypeError, ValueError):
        raise ValueError(f"radius_vox must be a number or 3 numbers (z, y, x); got "
                         f"{radius_vox!r}") from None
    if not np.all(np.isfinite(r)) or np.any(r <= 0):
        raise ValueError(f"radius_vox must be positive and finite; got {tuple(r)}")
    return r


def canonical_shape(shape, radius_vox):
    """Shape of the canonical stack: each axis scaled by CANONICAL_RADIUS / radius (at
    least 1 voxel)."""
    r = _radius3(radius_vox)
    return tuple(max(1, int(round(n * CANONICAL_RADIUS / rk))) for n, rk in zip(shape, r))


def to_original(pos, shape, canon_shape):
    """Canonical voxel coordinates (n, 3) -> original voxel coordinates."""
    ratio = np.asarray(shape, float) / np.asarray(canon_shape, float)
    return (np.asarray(pos, float) + 0.5) * ratio - 0.5


def to_canonical(pos, shape, canon_shape):
    """Original voxel coordinates (n, 3) -> canonical voxel coordinates."""
    ratio = np.asarray(canon_shape, float) / np.asarray(shape, float)
    return (np.asarray(pos, float) + 0.5) * ratio - 0.5


def normalise(canon):
    """(canon - median) / (99th - 1st percentile), float32 (on a subsample for speed)."""
    flat = canon.reshape(-1)
    step = max(1, flat.size // 500_000)
    sample = flat[::step]
    lo, med, hi = np.percentile(sample, [1.0, 50.0, 99.0])
    scale = float(hi - lo)
    if not scale > 0:
        scale = float(np.std(sample)) or 1.0
    return ((canon - np.float32(med)) / np.float32(scale)).astype(np.float32)


def preprocess(image, radius_vox, *, invert=False):
    """The network's input: the stack inverted (dark particles), resampled to the canonical
    scale (radius CANONICAL_RADIUS voxels per axis) and normalised.

    Returns (canonical float32 array, canonical shape).
    """
    img = np.asarray(image, np.float32)
    if invert:
        img = -img
    cshape = canonical_shape(img.shape, radius_vox)
    f = np.asarray(cshape, float) / np.asarray(img.shape, float)
    # anti-aliasing before down-sampling (none along axes that are up-sampled)
    sigma = np.where(f < 1.0, 0.5 * (1.0 / f - 1.0), 0.0)
    if np.any(sigma > 0):
        img = ndimage.gaussian_filter(img, sigma=sigma, mode="nearest")
    if cshape != img.shape:
        img = ndimage.zoom(img, f, order=1, grid_mode=True, mode="nearest")
        if img.shape != cshape:  # zoom rounds the output shape itself; keep ours
            raise RuntimeError(f"resampling gave {img.shape}, expected {cshape}")
    return normalise(img), cshape


# --------------------------------------------------------------------------- #
# weights
# --------------------------------------------------------------------------- #
def _to_pure(state):
    return nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


def save_weights(model: UNet, path, **meta):
    """Write the model's parameters and a JSON header (``features`` plus ``meta``) to an
    .npz, atomically."""
    path = Path(path)
    state = nnx.state(model, nnx.Param)
    flat = jax.tree_util.tree_flatten_with_path(_to_pure(state))[0]
    arrays = {}
    for keypath, leaf in flat:
        key = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keypath)
        arrays["param/" + key] = np.asarray(leaf, np.float32)
    header = dict(meta, features=list(model.features))
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def _set(tree, keys, value):
    for k in keys[:-1]:
        tree = tree[k]
    tree[keys[-1]] = value


def load_weights(path=None):
    """(model, header) from an .npz written by ``save_weights`` (default: the shipped
    weights). Raises FileNotFoundError if there are none."""
    path = Path(DEFAULT_WEIGHTS if path is None else path)
    if not path.is_file():
        raise FileNotFoundError(f"no detector weights at {path} (train them with "
                                "`difftrack train` or pass weights=)")
    with np.load(path) as z:
        if "header" not in z.files:
            raise ValueError(f"{path} holds no detector weights (no header; expected a file "
                             "written by difftrack.neural.save_weights)")
        header = json.loads(bytes(z["header"]).decode())
        params = {k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")}
    features = tuple(header["features"])
    model = nnx.eval_shape(lambda: UNet(features, rngs=nnx.Rngs(0)))  # no random init
    state = nnx.state(model, nnx.Param)
    pure = _to_pure(state)
    expected = {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp): leaf
                for kp, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]}
    if set(expected) != set(params):
        raise ValueError(f"{path}: the weights do not fit a UNet{features} (missing "
                         f"{sorted(set(expected) - set(params))[:3]}, unexpected "
                         f"{sorted(set(params) - set(expected))[:3]})")
    for key, value in params.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"{path}: {key} has shape {value.shape}, expected "
                             f"{tuple(expected[key].shape)}")
        parts = [int(p) if p.isdigit() else p for p in key.split("/")]
        _set(pure, parts, jnp.asarray(value, jnp.float32))
    if hasattr(nnx, "replace_by_pure_dict"):
        nnx.replace_by_pure_dict(state, pure)
    else:  # older flax
        state.replace_by_pure_dict(pure)
    nnx.update(model, state)
    return model, header


@functools.lru_cache(maxsize=4)
def _cached(path_str, mtime):
    return load_weights(path_str)


def get_model(weights=None):
    """(model, header): ``weights`` may be a path, a (model, header) pair, a UNet, or
    None for the shipped weights (cached)."""
    if isinstance(weights, tuple) and len(weights) == 2 and isinstance(weights[0], UNet):
        return weights
    if isinstance(weights, UNet):
        return weights, {"features": list(weights.features)}
    path = Path(DEFAULT_WEIGHTS if weights is None else weights).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no detector weights at {path} (train them with "
                                "`difftrack train` or pass weights=)")
    return _cached(str(path), path.stat().st_mtime)


def available(weights=None) -> bool:
    """True when detector weights exist (default: the ones shipped in the package)."""
    return Path(DEFAULT_WEIGHTS if weights is None else weights).is_file()


# --------------------------------------------------------------------------- #
# inference
# --------------------------------------------------------------------------- #
@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x):
    model = nnx.merge(graphdef, state)
    out = model(x)
    return jax.nn.sigmoid(out[..., 0]), out[..., 1:]


def pad_reflect(a, margin):
    """``a`` padded by ``margin`` voxels on every side by reflection (repeated as needed;
    an axis of length 1 is repeated)."""
    for ax in range(a.ndim):
        width = [(0, 0)] * a.ndim
        width[ax] = (margin, margin)
        a = np.pad(a, width, mode="reflect" if a.shape[ax] > 1 else "edge")
    return a


def _round_up(n, m):
    return int(math.ceil(n / m) * m)


def _plan(full, mult, margin, tile):
    """Window and core sizes per axis: ``tile`` (window edge) or, for None, the fewest
    cores that keep a window within MAX_WINDOW_VOXELS (cores as equal as possible)."""
    if tile is not None:
        w = max(_round_up(int(tile), mult), 2 * margin + mult)
        win = [min(w, f) for f in full]
        return win, [f if wk == f else wk - 2 * margin for wk, f in zip(win, full)]
    n = [1, 1, 1]

    def sizes(n):
        core = [_round_up(math.ceil(f / k), mult) for f, k in zip(full, n)]
        win = [c + 2 * margin if k > 1 else f for c, k, f in zip(core, n, full)]
        # a window as large as the stack is the stack: one core
        return ([min(f, w) for w, f in zip(win, full)],
                [f if w >= f else c for w, c, f in zip(win, core, full)])

    win, core = sizes(n)
    while math.prod(win) > MAX_WINDOW_VOXELS:
        k = int(np.argmax([w if w > 2 * margin + mult else 0 for w in win]))
        if win[k] <= 2 * margin + mult:
            break
        n[k] += 1
        win, core = sizes(n)
    return win, core


def predict(model: UNet, canon, *, tile=DEFAULT_TILE):
    """Centre likelihood (z, y, x) and offsets (z, y, x, 3) on a canonical stack.

    The stack is padded by ``OUTER_PAD`` voxels (reflection), up to a multiple of
    ``model.multiple``, and covered by windows of ``tile`` voxels per axis (None: one
    window holding everything up to MAX_WINDOW_VOXELS, else the fewest equal windows).
    Each window's core (the voxels it reports) keeps ``model.reach`` voxels of context
    on every side, or reaches the padded stack's face
    where the window starts or ends exactly there; windows start on the pooling grid.
    The result therefore equals the one-window result, and all windows share one shape
    (one compilation).
    """
    canon = np.asarray(canon, np.float32)
    mult = model.multiple
    margin = _round_up(model.reach, mult)
    n = np.asarray(canon.shape)
    padded = pad_reflect(canon, OUTER_PAD)
    full = [_round_up(p, mult) for p in padded.shape]
    padded = np.pad(padded, [(0, f - p) for f, p in zip(full, padded.shape)], mode="edge")
    win, core = _plan(full, mult, margin, tile)
    starts = [list(range(0, f, c)) for f, c in zip(full, core)]
    graphdef, state = nnx.split(model)
    prob = np.zeros(full, np.float32)
    offs = np.zeros(tuple(full) + (3,), np.float32)
    for a in itertools.product(*starts):
        b = [min(ak + ck, fk) for ak, ck, fk in zip(a, core, full)]
        w0 = [max(0, min(ak - margin, fk - wk)) for ak, fk, wk in zip(a, full, win)]
        x = padded[tuple(slice(s, s + wk) for s, wk in zip(w0, win))]
        p, o = _apply(graphdef, state, jnp.asarray(x)[None, ..., None])
        cut = tuple(slice(ak - s, bk - s) for ak, bk, s in zip(a, b, w0))
        dst = tuple(slice(ak, bk) for ak, bk in zip(a, b))
        prob[dst] = np.asarray(p[0])[cut]
        offs[dst] = np.asarray(o[0])[cut]
    region = tuple(slice(OUTER_PAD, OUTER_PAD + k) for k in n)
    return prob[region], offs[region]


def _ball(radius):
    r = int(math.floor(radius))
    zz, yy, xx = np.ogrid[-r:r + 1, -r:r + 1, -r:r + 1]
    return zz * zz + yy * yy + xx * xx <= radius * radius


def extract_peaks(prob, offsets=None, *, threshold=DEFAULT_THRESHOLD, separation=2.0):
    """Local maxima of ``prob`` above ``threshold`` (at least ``separation`` voxels apart),
    moved by ``offsets`` at the peak (clipped to one voxel), or by a parabola through the
    neighbours along each axis when ``offsets`` is None.

    Returns (positions (n, 3) float, scores (n,)), in ``prob``'s voxel frame, best first.
    """
    prob = np.asarray(prob, np.float32)
    mx = ndimage.maximum_filter(prob, footprint=_ball(separation), mode="nearest")
    is_max = (prob == mx) & (prob > threshold)
    labels, n = ndimage.label(is_max, structure=np.ones((3, 3, 3)))
    if n == 0:
        return np.zeros((0, 3)), np.zeros(0, np.float32)
    first = ndimage.minimum_position(np.zeros(prob.shape), labels, index=np.arange(1, n + 1))
    peaks = np.asarray(first, int).reshape(-1, 3)
    score = prob[tuple(peaks.T)]
    pos = peaks.astype(float)
    if offsets is not None:
        pos += np.clip(np.asarray(offsets)[tuple(peaks.T)], -1.0, 1.0)
    else:
        shape = np.asarray(prob.shape)
        for k in range(3):
            lo, hi = peaks.copy(), peaks.copy()
            lo[:, k] = np.clip(lo[:, k] - 1, 0, shape[k] - 1)
            hi[:, k] = np.clip(hi[:, k] + 1, 0, shape[k] - 1)
            fm, f0, fp = prob[tuple(lo.T)], score, prob[tuple(hi.T)]
            den = fm - 2 * f0 + fp
            ok = (den < 0) & (lo[:, k] != peaks[:, k]) & (hi[:, k] != peaks[:, k])
            pos[:, k] += np.clip(np.where(ok, 0.5 * (fm - fp) / np.where(ok, den, 1.0), 0.0),
                                 -0.5, 0.5)
    order = np.argsort(-score, kind="stable")
    return pos[order], score[order]


def detect(image, radius_vox, *, invert=False, weights=None, threshold=None,
           separation=0.7, tile=DEFAULT_TILE, subvoxel="offset"):
    """Particle centres proposed by the U-Net.

    Parameters
    ----------
    image : (z, y, x) array, any real dtype (not modified).
    radius_vox : particle radius in voxels, per axis (z, y, x) or a scalar.
    invert : dark particles on a bright background.
    weights : path of an .npz, a loaded (model, header), or None for the shipped weights.
    threshold : minimum centre likelihood (0-1); default the one stored with the weights.
    separation : minimum distance between two centres, in radii.
    tile : window edge of tiled inference, canonical voxels (None: the whole stack at
        once up to MAX_WINDOW_VOXELS, else the fewest equal windows); each window
        reports all but ``reach`` (24) voxels on each side. The result does not depend
        on it.
    subvoxel : "offset" (the network's offset field) or "quadratic" (parabola through
        the likelihood's neighbours).

    Returns
    -------
    DataFrame with z, y, x (voxels of ``image``) and ``score`` (the likelihood at the
    peak), best first; only centres inside the stack (-0.5 ... n - 0.5 per axis).
    """
    image = check_stack(image)
    r = _radius3(radius_vox)
    model, header = get_model(weights)
    if threshold is None:
        threshold = float(header.get("threshold", DEFAULT_THRESHOLD))
    if subvoxel not in ("offset", "quadratic"):
        raise ValueError(f"subvoxel must be 'offset' or 'quadratic'; got {subvoxel!r}")
    canon, cshape = preprocess(image, r, invert=invert)
    prob, offs = predict(model, canon, tile=tile)
    pos_c, score = extract_peaks(prob, offs if subvoxel == "offset" else None,
                                 threshold=threshold, separation=separation * CANONICAL_RADIUS)
    pos = to_original(pos_c, image.shape, cshape)
    inside = np.all((pos >= -0.5) & (pos <= np.asarray(image.shape) - 0.5), axis=1)
    pos, score = pos[inside], score[inside]
    return pd.DataFrame({"z": pos[:, 0], "y": pos[:, 1], "x": pos[:, 2], "score": score})
