"""Fisher information of particle parameters, from the derivatives of one unit particle.

A particle's light is amplitude x (PSF * ball of radius R at its centre). Its derivatives
in (z, y, x), amplitude and R are computed once, for a unit particle on a small grid
(``unit_light``, forward-mode JAX derivatives of the renderer's own ball and PSF).
From them:

- ``own_blocks``: each particle's own 5x5 block (z, y, x in voxels, amplitude, radius),
  from a table over radius, scaled by its amplitude and the local weight (1 / variance);
- ``coupled_covariance``: each particle's 5x5 covariance with its touching neighbours'
  parameters free too. The cross block of two particles is the cross-correlation of the
  unit derivatives at their displacement (``coupling_table``, one FFT correlation per
  pair of columns, interpolated at the sub-voxel displacement); each particle's cluster
  (itself and its most strongly coupled neighbours, with the neighbours' couplings among
  themselves) is inverted and its own block read off.

``own_blocks`` treats the weight as constant over a particle's light and counts light
that falls outside the stack: optimistic at the faces. ``coupled_covariance`` does so for
clusters away from the faces only; a cluster with a member whose light crosses a face
(``FACE_LIGHT``) is built from the unit derivatives placed at each member's centre (a
Fourier shift of the sub-voxel offset) and summed over the stack's voxels only
(``_stack_blocks``; the weight as the table's, the local mean at each particle): only the
light inside counts, and a particle centred outside the stack is as uncertain as its
light inside makes it. The cluster leaves out
the neighbours' other neighbours; against the whole-stack Fisher matrix of a dense
simulated stack its sigma is within about 10-20% (tests/test_fisher.py), where the own
block alone is 15-30% low.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage, signal
from scipy.spatial import cKDTree

from .render import Geometry, Params, illumination_field, kernel_on_grid, stack_region
from .shape import voxel_ball


@partial(jax.jit, static_argnames="geom")
def unit_light(R, psf, geom: Geometry, offset=(0.0, 0.0, 0.0)):
    """Light of one unit-amplitude particle of radius R (PSF-blurred partial-volume sphere)
    on a small grid around it, and its derivatives in (z, y, x) voxels and R: (5, ...)
    columns dz, dy, dx, da (the light itself), dR. The grid is wrapped: the centre (plus
    ``offset``) sits at index 0 (``np.fft.fftshift`` centres it). Jitted: run eagerly,
    each call traced its ~100 operations one by one (0.66 s a call, 4% of a refine of a
    32x80x80 stack, where every joint fit and the uncertainties call it)."""
    h = tuple(p + k for p, k in zip(geom.patch_half, geom.kernel_half))
    vs = geom.voxel_size
    kernel = psf.kernel(vs, geom.kernel_half)
    kf = jnp.fft.rfftn(kernel_on_grid(kernel, geom.kernel_half, tuple(2 * hh + 1 for hh in h)))
    ax = [jnp.arange(-hh, hh + 1, dtype=jnp.float32) for hh in h]

    def light(theta):
        c = theta[:3]
        ball = voxel_ball((ax[0][:, None, None] - c[0]) * vs[0], (ax[1][None, :, None] - c[1]) * vs[1],
                          (ax[2][None, None, :] - c[2]) * vs[2], theta[3], vs)
        return jnp.fft.irfftn(jnp.fft.rfftn(jnp.fft.ifftshift(ball)) * kf, s=ball.shape)

    theta = jnp.asarray([*offset, R], jnp.float32)
    L = light(theta)
    J = jax.jacfwd(light)(theta)  # (..., 4)
    J = jnp.moveaxis(J, -1, 0)
    return jnp.stack([J[0], J[1], J[2], L, J[3]])


def fisher_tables(radii_grid, psf, geom):
    """Unit-amplitude, unit-weight Fisher blocks G(R) (5x5), one per radius of the grid."""
    Gs = []
    for R in radii_grid:
        cols = np.asarray(unit_light(float(R), psf, geom, offset=(0.1, 0.2, 0.3)), np.float64)
        cols = cols.reshape(5, -1)
        Gs.append(cols @ cols.T)
    return np.asarray(Gs)


def interp_tables(R, radii_grid, Gs):
    """The Fisher blocks at radii R, linearly interpolated in the table: (n, 5, 5)."""
    if len(radii_grid) == 1:
        return np.broadcast_to(Gs[0], (len(R), 5, 5)).copy()
    t = np.clip(np.interp(R, radii_grid, np.arange(len(radii_grid))), 0, len(radii_grid) - 1)
    k = np.clip(np.floor(t).astype(int), 0, len(radii_grid) - 2)
    f = (t - k)[:, None, None]
    return Gs[k] * (1 - f) + Gs[k + 1] * f


def _scales(params: Params, idx, w, geom, amplitude_floor):
    """Per particle: the derivative scales (a, a, a, 1, a) and sqrt(local weight) x L."""
    R = np.asarray(params.particles.radius)[idx]
    a = np.asarray(params.particles.amplitude)[idx]
    a = np.where(a < 0, -1.0, 1.0) * np.maximum(np.abs(a), amplitude_floor)
    pos = np.asarray(params.particles.pos)[idx]
    Lf = np.asarray(stack_region(illumination_field(params.background, geom), geom))
    wc = local_mean(np.asarray(w), pos, np.median(R) / np.asarray(geom.voxel_size))
    D = np.stack([a, a, a, np.ones_like(a), a], axis=1)
    return D, np.sqrt(np.maximum(wc, 0.0)) * at_voxels(Lf, pos)  # a box mean can round below 0


def _scaled(G, D, s, radius_prior):
    """Unit blocks G (n or 1, 5, 5) scaled to particles (``_scales``), plus the prior."""
    F = G * (D[:, :, None] * D[:, None, :]) * (s * s)[:, None, None]
    F[:, 4, 4] += radius_prior
    return F


def _own_scaled(params: Params, idx, D, s, geom, radius_prior):
    R = np.asarray(params.particles.radius)[idx]
    radii_grid = np.unique(np.quantile(R, [0.0, 0.5, 1.0]))
    G = interp_tables(R, radii_grid, fisher_tables(radii_grid, params.psf, geom))
    return _scaled(G, D, s, radius_prior)


def own_blocks(params: Params, idx, w, geom, amplitude_floor=0.0, radius_prior=0.0):
    """Each particle's own Fisher block (5x5: z, y, x in voxels, amplitude, radius) for
    the particles ``idx``: the unit table at its radius times its amplitude, the
    illumination and the mean weight around it (neighbours ignored), plus the information
    ``radius_prior`` of the radius-spread prior (its curvature, chi^2 units) on the
    radius. Amplitudes are taken at least ``amplitude_floor`` in magnitude."""
    D, s = _scales(params, idx, w, geom, amplitude_floor)
    return _own_scaled(params, idx, D, s, geom, radius_prior)


def _invertible(F, seen):
    """Blocks of the particles ``seen`` with a tiny ridge (1e-9 of the trace); the
    identity for the others."""
    tr = np.trace(F, axis1=1, axis2=2)
    return np.where(seen[:, None, None], F + np.eye(5)[None] * 1e-9 * tr[:, None, None],
                    np.eye(5)[None])


# a particle whose unit light has more than this fraction of its derivatives' energy
# outside the stack (along any axis) makes its clusters face clusters (``_stack_blocks``).
# Near a face the table's clusters were 0.68 / 0.70 / 0.67 of the whole-stack sigma, now
# 1.08 / 1.09 / 1.11 (median, 29 particles within a radius of a face; tests/test_fisher.py);
# on the partial-volume dev stacks the z errors within 1.5 radii of a z face were 4.6-7.4x
# the table's sigma, against 1.0 deep inside (docs/refine.md, thirtieth session)
FACE_LIGHT = 1e-3
# face clusters handled at a time; the placed fields of one chunk's members are kept
# (a field is 5 windows of the unit light: ~0.4 MB for a 29x27x27 window in float32)
FACE_CHUNK = 256


def _outside_fraction(J, corner, shape):
    """Per particle, the largest fraction over the axes of the energy of the unit
    derivatives ``J`` (5, ...) placed with its first voxel at ``corner`` (n, 3) that falls
    outside the stack (per axis, from the energy's marginal along it)."""
    E = np.sum(J * J, axis=0)
    out = np.zeros(len(corner))
    for a in range(3):
        m = E.sum(axis=tuple(b for b in range(3) if b != a))
        m = m / m.sum()
        idx = corner[:, a, None] + np.arange(len(m))[None, :]
        outside = (idx < 0) | (idx >= shape[a])
        out = np.maximum(out, (outside * m[None, :]).sum(axis=1))
    return out


def _stack_blocks(fields, corner, shape, pairs):
    """Fisher blocks sum_u J_i(u) J_j(u)^T (unit amplitude and weight) of the particle
    pairs ``pairs`` (m, 2), J_i = ``fields(i)`` (5, ...) the unit derivatives of particle i
    on a window whose first voxel is ``corner[i]`` (n, 3), summed over the voxels of a
    stack of ``shape`` only. (m, 5, 5)."""
    shape = np.asarray(shape)
    out = np.zeros((len(pairs), 5, 5))
    for k, (i, j) in enumerate(pairs):
        Ji, Jj = fields(i), fields(j)
        size = np.asarray(Ji.shape[1:])
        lo = np.maximum(np.maximum(corner[i], corner[j]), 0)
        hi = np.minimum(np.minimum(corner[i], corner[j]) + size, shape)
        if np.any(hi <= lo):
            continue
        si = (slice(None),) + tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, corner[i]))
        sj = (slice(None),) + tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, corner[j]))
        out[k] = Ji[si].reshape(5, -1) @ Jj[sj].reshape(5, -1).T
    return out


def _placed_fields(J, pos, cache):
    """``fields(i)``: the unit derivatives ``J`` (5, ...; centred) moved by particle i's
    sub-voxel offset pos_i - rint(pos_i) (a Fourier shift), so that on the window from
    rint(pos_i) - half they sit at pos_i; computed once per particle asked for and kept
    in the dict ``cache`` (which the caller may prune)."""
    Jf = np.fft.rfftn(J, axes=(1, 2, 3))
    k = [np.fft.fftfreq(n) for n in J.shape[1:3]] + [np.fft.rfftfreq(J.shape[3])]

    def fields(i):
        if i not in cache:
            f = np.asarray(pos[i], np.float64) - np.rint(pos[i])
            ph = (np.exp(-2j * np.pi * f[0] * k[0])[:, None, None]
                  * np.exp(-2j * np.pi * f[1] * k[1])[None, :, None]
                  * np.exp(-2j * np.pi * f[2] * k[2])[None, None, :])
            cache[i] = np.fft.irfftn(Jf * ph, s=J.shape[1:], axes=(1, 2, 3)).astype(np.float32)
        return cache[i]

    return fields


def coupling_table(R, psf, geom):
    """C[a, b] (d) = sum_u J_a(u) J_b(u - d): the Fisher cross block of two unit particles
    of radius R whose centres are d voxels apart (d on the integer grid; index d + n - 1,
    n the grid's size per axis). Shape (5, 5, 2n_z - 1, 2n_y - 1, 2n_x - 1)."""
    # unit_light's fields are wrapped (centre at index 0): centre them for a linear correlation
    J = np.fft.fftshift(np.asarray(unit_light(float(R), psf, geom), np.float64), axes=(1, 2, 3))
    flipped = J[:, ::-1, ::-1, ::-1]
    return np.stack([np.stack([signal.fftconvolve(J[a], flipped[b], mode="full")
                               for b in range(5)]) for a in range(5)])


def _cross_blocks(C, d):
    """Cross blocks (m, 5, 5) at displacements d (m, 3) voxels: trilinear interpolation of
    the table, zero beyond its reach."""
    n = (np.asarray(C.shape[2:]) + 1) // 2
    coords = (np.asarray(d, np.float64) + (n - 1)).T
    out = np.empty((len(d), 5, 5))
    for a in range(5):
        for b in range(5):
            out[:, a, b] = ndimage.map_coordinates(C[a, b], coords, order=1, mode="constant", cval=0.0)
    return out


def coupled_covariance(params: Params, idx, w, geom, radius_prior=0.0, neighbours=12,
                       min_coupling=0.02, batch=2048, stats=None):
    """Each particle's 5x5 covariance (z, y, x voxels, amplitude, radius) with the
    parameters of its most strongly coupled neighbours free too.

    For particle i, the cluster is i and up to ``neighbours`` others whose position
    cross-correlation with i (|F_ij| / sqrt(F_ii F_jj) on some axis) is at least
    ``min_coupling``; its Fisher matrix is inverted and i's block read off. Every block of
    the cluster comes from one table (``coupling_table`` at the median radius, own blocks
    at displacement 0), so that the matrix is a Gram matrix like the true one (own blocks
    at each particle's radius beside cross blocks at the median made 7% of the clusters
    of a stack with a 5% radius spread indefinite); the result is then rescaled, per
    parameter, by the ratio of the own-block variances at the particle's radius and at
    the median. The radius-spread prior's curvature ``radius_prior`` is added to each
    radius. A cluster whose matrix is still not positive definite falls back to i's own
    block (counted in ``stats["fallbacks"]`` when a dict is given; ``stats["face_clusters"]``:
    whose cluster was built from the stack's voxels, ``FACE_LIGHT``); a particle whose light
    falls only where ``w`` is 0 gets an infinite variance (with ``radius_prior`` > 0, a
    huge one: its radius alone is known). ``batch``: particles handled at a time (memory).
    """
    idx = np.asarray(idx)
    n = len(idx)
    D, s = _scales(params, idx, w, geom, 0.0)
    F_own = _own_scaled(params, idx, D, s, geom, radius_prior)
    seen = np.trace(F_own, axis1=1, axis2=2) > 0  # weight 0 everywhere: no information
    cov_own = np.linalg.inv(_invertible(F_own, seen))
    cov_own[~seen] = np.diag(np.full(5, np.inf))
    if n < 2 or neighbours < 1:
        return cov_own
    R = np.asarray(params.particles.radius)[idx]
    C = coupling_table(float(np.median(R)), params.psf, geom)
    pos = np.asarray(params.particles.pos, np.float64)[idx]
    # own blocks from the same table (displacement 0), for a consistent cluster matrix
    c0 = (np.asarray(C.shape[2:]) - 1) // 2
    F_med = _scaled(C[:, :, c0[0], c0[1], c0[2]][None], D, s, radius_prior)
    F_med = _invertible(F_med, seen & (np.trace(F_med, axis1=1, axis2=2) > 0))
    var_med = np.diagonal(np.linalg.inv(F_med), axis1=1, axis2=2)
    # per-parameter rescaling from the median radius to each particle's own
    rescale = np.sqrt(np.diagonal(cov_own, axis1=1, axis2=2) / var_med)

    def cross(i, j):  # (m,) x (m,) -> (m, 5, 5) blocks F_ij
        G = _cross_blocks(C, pos[j] - pos[i])
        return G * (D[i][:, :, None] * D[j][:, None, :]) * (s[i] * s[j])[:, None, None]

    # candidates: the nearest particles within the table's reach, in physical distance
    reach = (np.asarray(C.shape[2:]) - 1) // 2
    vs = np.asarray(geom.voxel_size)
    k = min(n, 3 * neighbours + 1)
    dist, cand = cKDTree(pos * vs).query(pos * vs, k=k)
    # the particle itself is not its own neighbour (with a twin at the same place it need
    # not come first)
    cand = np.where(np.isfinite(dist) & (cand != np.arange(n)[:, None]), cand, n)
    dg = np.diagonal(F_med, axis1=1, axis2=2)[:, :3]
    strength = np.zeros(cand.shape)
    for start in range(0, n, batch):  # in batches: the candidate blocks are ~7 KB each
        rows = np.arange(start, min(n, start + batch))
        ii = np.repeat(rows, cand.shape[1])
        jj = cand[rows].ravel()
        ok = jj < n
        ok[ok] &= np.all(np.abs(pos[jj[ok]] - pos[ii[ok]]) < reach, axis=1) & seen[ii[ok]] & seen[jj[ok]]
        st = np.zeros(len(ii))
        Fij = cross(ii[ok], jj[ok])
        st[ok] = np.max(np.abs(np.diagonal(Fij, axis1=1, axis2=2)[:, :3])
                        / np.sqrt(dg[ii[ok]] * dg[jj[ok]]), axis=1)
        strength[rows] = st.reshape(len(rows), -1)
    order = np.argsort(-strength, axis=1)[:, :neighbours]
    nb = np.take_along_axis(cand, order, axis=1)
    nb = np.where(np.take_along_axis(strength, order, axis=1) >= min_coupling, nb, -1)

    # clusters with a member whose light crosses a face: their blocks summed over the
    # stack's own voxels (``_stack_blocks``), the unit light at the median radius placed at
    # each member's centre (``_placed_fields``; at the nearest voxel instead, the blocks of
    # touching neighbours were off by up to a voxel's displacement: sigma 0.95-1.21x the
    # table's where nothing is clipped, against 1.00-1.10x placed). The weight stays the
    # table's (the local mean at each particle, ``_scales``): per voxel (exact for the
    # noise model) the sigma of bright particles under Poisson noise came out 10-20%
    # smaller everywhere (their light's gradient lies where the stack is dimmer), a change
    # of its own that would have made a step at the first cluster without light beyond a
    # face
    J = np.fft.fftshift(np.asarray(unit_light(float(np.median(R)), params.psf, geom), np.float64),
                        axes=(1, 2, 3))
    half = (np.asarray(J.shape[1:]) - 1) // 2
    corner = np.rint(pos).astype(int) - half
    # with a periodic boundary no light is lost beyond a face (it wraps around): no face
    # clusters, and no need to measure the light outside
    face = (np.zeros(len(pos), bool) if geom.periodic
            else _outside_fraction(J, corner, np.asarray(geom.shape)) > FACE_LIGHT)
    placed = {}  # the placed fields of the current chunk's members (``FACE_CHUNK``)
    fields = _placed_fields(J, pos, placed)

    def stack_cross(i, j, stack_cache):  # (m,) x (m,) -> (m, 5, 5): F_ij, the stack's
        key = [(a, b) if a <= b else (b, a) for a, b in zip(i.tolist(), j.tolist())]
        todo = sorted(set(k for k in key if k not in stack_cache))
        if todo:
            for k, blk in zip(todo, _stack_blocks(fields, corner, geom.shape, todo)):
                stack_cache[k] = blk
        G = np.stack([stack_cache[k] if a <= b else stack_cache[k].T
                      for k, a, b in zip(key, i, j)]) if key else np.zeros((0, 5, 5))
        F = G * (D[i][:, :, None] * D[j][:, None, :]) * (s[i] * s[j])[:, None, None]
        if len(i):
            F[i == j, 4, 4] += radius_prior
        return F

    cov = cov_own.copy()
    fallbacks = 0
    face_cluster = np.zeros(n, bool)
    m = nb.shape[1] + 1
    # the batches in space order (blocks of 4 windows' extent), so that consecutive chunks
    # of face clusters share their members' placed fields (``_placed_fields``)
    cell = np.floor(pos / np.maximum(4 * half, 1)).astype(np.int64)
    order = np.lexsort((cell[:, 2], cell[:, 1], cell[:, 0]))
    for start in range(0, n, batch):
        rows = np.sort(order[start:start + batch])
        rows = rows[seen[rows]]
        if len(rows) == 0:
            continue
        nodes = np.concatenate([rows[:, None], nb[rows]], axis=1)  # (b, m); -1: empty
        b = len(rows)
        H = np.zeros((b, m, m, 5, 5))
        real = nodes >= 0
        safe = np.where(real, nodes, 0)
        near = np.any(real & face[safe], axis=1)
        face_cluster[rows] = near
        for p in range(m):
            H[:, p, p] = np.where(real[:, p, None, None], F_med[safe[:, p]], np.eye(5))
            for q in range(p + 1, m):
                both = real[:, p] & real[:, q] & ~near  # face clusters: below
                if not both.any():
                    continue
                blk = np.zeros((b, 5, 5))
                blk[both] = cross(safe[both, p], safe[both, q])
                H[:, p, q] = blk
                H[:, q, p] = np.swapaxes(blk, 1, 2)
        # face clusters: every block from the stack's voxels, FACE_CHUNK clusters at a
        # time, keeping the placed fields of one chunk's members only (memory: a field is
        # 5 windows)
        near_rows = np.flatnonzero(near)
        stack_cache = {}  # the pairs' blocks (5x5 each) for the whole batch
        for c0 in range(0, len(near_rows), FACE_CHUNK):
            ch = near_rows[c0:c0 + FACE_CHUNK]
            rn, sn = real[ch], safe[ch]
            members = set(sn[rn].tolist())
            for i in [i for i in placed if i not in members]:
                del placed[i]
            Hn = np.zeros((len(ch), m, m, 5, 5))
            for p in range(m):
                for q in range(p, m):
                    both = rn[:, p] & rn[:, q]
                    blk = np.zeros((len(sn), 5, 5))
                    if both.any():
                        blk[both] = stack_cross(sn[both, p], sn[both, q], stack_cache)
                    if p == q:
                        Hn[:, p, p] = _invertible(blk, both)
                    else:
                        Hn[:, p, q] = blk
                        Hn[:, q, p] = np.swapaxes(blk, 1, 2)
            H[ch] = Hn
        H = H.transpose(0, 1, 3, 2, 4).reshape(b, 5 * m, 5 * m)
        good = _positive_definite(H)
        fallbacks += int((~good).sum())
        if good.any():
            e = np.zeros((int(good.sum()), 5 * m, 5))
            e[:, :5, :] = np.eye(5)
            x = np.linalg.solve(H[good], e)[:, :5, :]
            qq = rescale[rows[good]]
            cov[rows[good]] = x * qq[:, :, None] * qq[:, None, :]
    if stats is not None:
        stats["fallbacks"] = fallbacks
        stats["face_clusters"] = face_cluster
    return cov


def _positive_definite(H):
    """Whether each matrix of the stack H has a Cholesky factor."""
    try:
        np.linalg.cholesky(H)
        return np.ones(len(H), bool)
    except np.linalg.LinAlgError:
        ok = np.ones(len(H), bool)
        for i in range(len(H)):
            try:
                np.linalg.cholesky(H[i])
            except np.linalg.LinAlgError:
                ok[i] = False
        return ok


def at_voxels(field, pos):
    """Values of a stack field at the voxels nearest to ``pos`` (clipped into the stack)."""
    idx = np.clip(np.rint(pos).astype(int), 0, np.asarray(field.shape) - 1)
    return np.asarray(field)[idx[:, 0], idx[:, 1], idx[:, 2]]


def local_mean(field, pos, rad_vox):
    """Mean of a stack field in a small box (half-width ~ half the radius per axis, in
    voxels of each axis) at each centre."""
    size = [2 * max(int(round(0.5 * float(r))), 0) + 1 for r in np.broadcast_to(rad_vox, (3,))]
    f = ndimage.uniform_filter(np.asarray(field, np.float64), size=size, mode="nearest")
    return at_voxels(f, pos)
