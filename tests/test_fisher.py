"""Uncertainties from the Fisher information: the coupled cluster covariance against the
exact whole-stack Fisher matrix (finite differences of the renderer, every parameter of
every particle), on a dense simulated stack."""

import jax
import numpy as np
import pytest

from difftrack import fisher, simulate
from difftrack.fisher import coupled_covariance, coupling_table, own_blocks, unit_light
from difftrack.render import Params, Particles, render


@pytest.fixture(scope="module")
def dense():
    return simulate((16, 28, 32), voxel_size=(0.2, 0.1, 0.1), radius=0.4, volume_fraction=0.45,
                    photons=100.0, seed=5)


def _exact_sigmas(sim):
    """sqrt(diag(F^-1)) for (z, y, x) of every particle, F = J^T W J over all 5 n
    parameters, J by central differences of the renderer."""
    p, g = sim.params, sim.geometry
    w = (1.0 / sim.noise_variance).astype(np.float64).ravel()
    rend = jax.jit(lambda q: render(q, g))
    n = p.particles.pos.shape[0]
    cols = []
    for i in range(n):
        for k in range(5):
            def moved(e):
                pos, R, a = p.particles.pos, p.particles.radius, p.particles.amplitude
                if k < 3:
                    pos = pos.at[i, k].add(e)
                elif k == 3:
                    a = a.at[i].add(e)
                else:
                    R = R.at[i].add(e)
                return Params(Particles(pos, R, a), p.psf, p.background)
            h = (0.05, 0.05, 0.05, 0.05 * abs(float(p.particles.amplitude[i])), 0.005)[k]
            d = (np.asarray(rend(moved(h)), np.float64) - np.asarray(rend(moved(-h)), np.float64))
            cols.append(d.ravel() / (2 * h))
    J = np.stack(cols, 1)
    F = J.T @ (J * w[:, None])
    F += np.eye(len(F)) * 1e-9 * np.trace(F) / len(F)
    return np.sqrt(np.diagonal(np.linalg.inv(F)).reshape(n, 5)[:, :3])


def test_coupling_table_is_the_cross_correlation_of_the_unit_derivatives(dense):
    p, g = dense.params, dense.geometry
    R = float(np.median(np.asarray(p.particles.radius)))
    J = np.fft.fftshift(np.asarray(unit_light(R, p.psf, g), np.float64), axes=(1, 2, 3))
    C = coupling_table(R, p.psf, g)
    c = (np.asarray(C.shape[2:]) - 1) // 2
    for d in [(0, 0, 0), (1, 3, -2), (0, 8, 0), (-2, 0, 5)]:
        shifted = np.roll(J, d, axis=(1, 2, 3))  # J(u - d); the fields are zero near the edges
        direct = np.einsum("azyx,bzyx->ab", J, shifted)
        np.testing.assert_allclose(C[(slice(None), slice(None)) + tuple(c + np.asarray(d))],
                                   direct, rtol=1e-6, atol=1e-9 * np.abs(direct).max())


def test_coupled_sigmas_match_the_whole_stack_fisher_matrix(dense):
    p, g = dense.params, dense.geometry
    exact = _exact_sigmas(dense)
    w = 1.0 / dense.noise_variance
    n = p.particles.pos.shape[0]
    own = np.sqrt(np.diagonal(np.linalg.inv(own_blocks(p, np.arange(n), w, g)),
                              axis1=1, axis2=2)[:, :3])
    coupled = np.sqrt(np.diagonal(coupled_covariance(p, np.arange(n), w, g),
                                  axis1=1, axis2=2)[:, :3])
    pos = np.asarray(p.particles.pos)
    shape = np.asarray(dense.image.shape)
    rv = 0.4 / np.asarray(dense.voxel_size)
    inner = np.all((pos >= rv) & (pos <= shape - 1 - rv), axis=1)
    assert inner.sum() >= 10
    r_own = np.median(own[inner] / exact[inner], axis=0)
    r_coupled = np.median(coupled[inner] / exact[inner], axis=0)
    # measured (z, y, x): own 0.71 / 0.85 / 0.84 of the exact sigma (neighbours ignored:
    # optimistic); coupled 1.07 / 1.14 / 1.13 (14 interior particles). Every cluster of
    # so small a stack has light beyond a face (``fisher.FACE_LIGHT``), summed over the
    # stack's voxels with the table's weight, the local mean at each particle, which under
    # this stack's Poisson noise is pessimistic by 10-20% (per voxel, members at their
    # nearest voxels: 0.95 / 0.93 / 1.01);
    # the table alone, counting the light beyond the faces, gave 0.97 / 1.06 / 1.09
    assert np.all(r_own < 0.92)
    assert np.all((r_coupled > 0.85) & (r_coupled < 1.3)), r_coupled
    # centred inside but within a radius of a face: only the light inside the stack counts
    # (measured 1.08 / 1.09 / 1.11, 29 particles; the table alone gave 0.68 / 0.70 / 0.67)
    near = ~inner & np.all((pos >= -0.5) & (pos <= shape - 0.5), axis=1)
    assert near.sum() >= 10
    r_near = np.median(coupled[near] / exact[near], axis=0)
    assert np.all((r_near > 0.85) & (r_near < 1.25)), r_near


def test_regions_of_zero_weight_give_no_nan(dense):
    # faces weighted 0 (as fit_shape's border does): a particle seen nowhere has infinite
    # variance, the others finite ones (the local mean of the weight can round below 0
    # there, and the cross blocks take its square root)
    p, g = dense.params, dense.geometry
    w = np.zeros(dense.image.shape)
    w[4:-4, 6:-6, 6:-6] = 1.0 / dense.noise_variance[4:-4, 6:-6, 6:-6]
    n = p.particles.pos.shape[0]
    cov = coupled_covariance(p, np.arange(n), w, g)
    inside = np.all((np.asarray(p.particles.pos) > [5, 7, 7]) &
                    (np.asarray(p.particles.pos) < np.asarray(dense.image.shape) - [6, 8, 8]), axis=1)
    assert inside.any() and np.all(np.isfinite(cov[inside]))
    assert np.all(np.diagonal(cov[inside], axis1=1, axis2=2) > 0)
    assert not np.any(np.isnan(cov))


@pytest.mark.parametrize("face_light", [None, 1.0])
def test_clusters_stay_positive_definite_with_a_radius_spread(face_light, monkeypatch):
    # own blocks at each particle's radius beside cross blocks at the median made 7% of
    # the clusters indefinite (they fell back to the optimistic own block); one table for
    # the whole cluster keeps them all, and the neighbours only ever add uncertainty.
    # Every cluster of so thin a stack has light beyond a face (``fisher.FACE_LIGHT``)
    # and counts only the light inside it; with the threshold at 1 none does (the table
    # alone, as for clusters away from the faces of a larger stack)
    if face_light is not None:
        monkeypatch.setattr(fisher, "FACE_LIGHT", face_light)
    sim = simulate((16, 40, 40), voxel_size=(0.2, 0.1, 0.1), radius=0.4, volume_fraction=0.5,
                   photons=100.0, seed=1, polydispersity=0.1)
    p, g = sim.params, sim.geometry
    n = p.particles.pos.shape[0]
    w = 1.0 / sim.noise_variance
    stats = {}
    cov = coupled_covariance(p, np.arange(n), w, g, stats=stats)
    own = np.linalg.inv(own_blocks(p, np.arange(n), w, g))
    assert stats["fallbacks"] == 0
    assert stats["face_clusters"].all() == (face_light is None)
    assert stats["face_clusters"].any() == (face_light is None)
    ratio = np.diagonal(cov, axis1=1, axis2=2)[:, :3] / np.diagonal(own, axis1=1, axis2=2)[:, :3]
    # measured at least 1.006 with the table alone, 1.39 with the faces
    assert ratio.min() > 0.99


def test_a_twin_is_not_its_own_neighbour(dense):
    # two particles at the same place: each is the other's neighbour, never its own
    p, g = dense.params, dense.geometry
    pos = np.asarray(p.particles.pos)
    k = int(np.argmin(np.linalg.norm(pos - np.asarray(dense.image.shape) / 2, axis=1)))
    twin = Params(Particles(p.particles.pos.at[k + 1].set(p.particles.pos[k]), p.particles.radius,
                            p.particles.amplitude), p.psf, p.background)
    n = pos.shape[0]
    stats = {}
    cov = coupled_covariance(twin, np.arange(n), 1.0 / dense.noise_variance, g, stats=stats)
    alone = coupled_covariance(p, np.arange(n), 1.0 / dense.noise_variance, g)
    # the twins' positions are not determined: far more uncertain than either alone
    # (measured: variance ~1e6 times; before, with the particle itself taken for its
    # neighbour, the cluster was indefinite and both fell back to their own blocks)
    assert not np.any(np.isnan(cov)) and stats["fallbacks"] == 0
    for i in (k, k + 1):
        assert np.all(np.diagonal(cov[i])[:3] > 1e3 * np.diagonal(alone[k])[:3])


def test_batches_change_nothing(dense):
    # the candidate and cluster stages run in batches of particles (memory): any batch
    # size gives the same covariances, to rounding
    p, g = dense.params, dense.geometry
    n = p.particles.pos.shape[0]
    w = 1.0 / dense.noise_variance
    whole = coupled_covariance(p, np.arange(n), w, g)
    small = coupled_covariance(p, np.arange(n), w, g, batch=7)
    np.testing.assert_allclose(small, whole, rtol=1e-10, atol=0)


@pytest.mark.parametrize("second", [(52.0, 51.0, 51.0), (52.4, 50.7, 51.0)])
def test_face_blocks_place_each_particle_at_its_sub_voxel_centre(dense, second):
    # the face clusters' blocks: the unit derivatives moved by each particle's sub-voxel
    # offset (a Fourier shift) and summed over the stack; against the renderer's own fields
    # at that offset (``unit_light``'s ``offset``), with nothing clipped by a face. Whole
    # voxels apart they agree to rounding; at a sub-voxel offset to 5.3% of the diagonal's
    # scale (measured: a shifted partial-volume ball is not the ball resampled there);
    # with the shift's sign wrong the cross block was off by far more
    p, g = dense.params, dense.geometry
    R = float(np.median(np.asarray(p.particles.radius)))
    J = np.fft.fftshift(np.asarray(unit_light(R, p.psf, g), np.float64), axes=(1, 2, 3))
    half = (np.asarray(J.shape[1:]) - 1) // 2
    pos = np.array([[50.0, 50.0, 50.0], second])
    corner = np.rint(pos).astype(int) - half
    big = tuple(int(v) for v in 2 * corner.max(axis=0) + 3 * np.asarray(J.shape[1:]))
    got = fisher._stack_blocks(fisher._placed_fields(J, pos, {}), corner, big, [(0, 1), (1, 1)])
    off = pos[1] - np.rint(pos[1])
    Jo = np.fft.fftshift(np.asarray(unit_light(R, p.psf, g, offset=tuple(off)), np.float64),
                         axes=(1, 2, 3))
    d = np.rint(pos[1]).astype(int) - np.rint(pos[0]).astype(int)
    shifted = np.roll(Jo, tuple(d), axis=(1, 2, 3))  # the fields are zero near the edges
    own = np.einsum("azyx,bzyx->ab", Jo, Jo)
    scale = np.sqrt(np.outer(np.diag(own), np.diag(own)))
    tol = 1e-4 if np.all(off == 0) else 0.06
    for blk, ref in zip(got, (np.einsum("azyx,bzyx->ab", J, shifted), own)):
        assert np.abs((blk - ref) / scale).max() < tol
