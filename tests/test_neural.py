"""Neural detector: network shapes, canonical frame, tiling, weights, a tiny overfit."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from difftrack import neural, training
from difftrack.metrics import score
from difftrack.network import CANONICAL_RADIUS, UNet, count_params, new_unet


@pytest.fixture(scope="module")
def small_model():
    return new_unet((4, 8), seed=1)


def test_network_shapes_and_dtypes(small_model):
    x = jnp.zeros((2, 8, 12, 16, 1), jnp.float32)
    out = small_model(x)
    assert out.shape == (2, 8, 12, 16, 4) and out.dtype == jnp.float32
    assert small_model(jnp.zeros((4, 4, 4))).shape == (4, 4, 4, 4)
    assert small_model.multiple == 2
    big = nnx.eval_shape(lambda: UNet(rngs=nnx.Rngs(0)))
    assert 50_000 <= count_params(big) <= 150_000


def test_reach_bounds_the_receptive_field(small_model):
    """An input change farther than ``reach`` from a voxel does not change its output."""
    n = 40
    x = np.zeros((1, n, n, n, 1), np.float32)
    c = 20

    def out_at(x):
        return small_model(jnp.asarray(x))[0, c, c, c]

    g = jax.grad(lambda x: out_at(x)[0])(jnp.asarray(x))[0, ..., 0]
    nz = np.argwhere(np.abs(np.asarray(g)) > 0)
    assert np.abs(nz - c).max() <= small_model.reach


def test_canonical_frame_round_trip():
    shape, cshape = (10, 37, 50), (15, 28, 21)
    p = np.array([[0.0, 0.0, 0.0], [-0.5, -0.5, -0.5], [9.5, 36.5, 49.5], [3.3, 17.1, 22.8]])
    c = neural.to_canonical(p, shape, cshape)
    np.testing.assert_allclose(c[1], [-0.5, -0.5, -0.5])  # faces map to faces
    np.testing.assert_allclose(c[2], np.asarray(cshape) - 0.5)
    np.testing.assert_allclose(neural.to_original(c, shape, cshape), p, atol=1e-12)
    assert neural.canonical_shape((10, 40, 40), (1.5, 4.0, 8.0)) == (20, 30, 15)


def _blobs(shape, centres, sigma):
    grids = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    img = np.zeros(shape)
    for c in centres:
        img += np.exp(-sum(((g - ck) / s) ** 2 for g, ck, s in zip(grids, c, sigma)) / 2)
    return img


def test_preprocess_keeps_the_voxel_frame():
    """Blobs at known sub-voxel positions in an anisotropic stack: peaks of the canonical
    image, mapped back, land on them (the resampling's pixel-area convention)."""
    rng = np.random.default_rng(0)
    shape = (14, 40, 44)
    r_vox = (1.5, 4.5, 4.5)  # z voxels 3x the lateral ones; canonical factor (2, 2/3, 2/3)
    centres = np.array([[3.3, 8.2, 9.7], [7.6, 20.4, 30.9], [10.2, 31.3, 14.45]])
    sigma = np.asarray(r_vox) * 0.6
    img = 100 + 1000 * _blobs(shape, centres, sigma) + rng.normal(0, 1, shape)
    canon, cshape = neural.preprocess(img.astype(np.float32), r_vox)
    assert cshape == canon.shape == (28, 27, 29)
    assert abs(float(np.median(canon))) < 1e-3
    pc, _ = neural.extract_peaks(canon, None, threshold=0.5, separation=2.0)
    found = neural.to_original(pc, shape, cshape)
    assert len(found) == 3
    order = [int(np.argmin(np.linalg.norm(found - c, axis=1))) for c in centres]
    err = found[order] - centres
    assert np.abs(err).max() < 0.12, err
    # dark particles: invert
    canon_d, _ = neural.preprocess((5000 - img).astype(np.float32), r_vox, invert=True)
    np.testing.assert_allclose(canon_d, canon, atol=1e-4)


def test_extract_peaks_offsets_and_separation():
    prob = np.zeros((12, 12, 12), np.float32)
    prob[3, 4, 5] = 0.9
    prob[3, 5, 5] = 0.8  # too close: suppressed
    prob[9, 9, 2] = 0.6
    prob[6, 6, 6] = 0.2  # below the threshold
    off = np.zeros((12, 12, 12, 3), np.float32)
    off[3, 4, 5] = (0.3, -0.2, 2.0)  # clipped to one voxel
    pos, sc = neural.extract_peaks(prob, off, threshold=0.4, separation=2.0)
    np.testing.assert_allclose(pos, [[3.3, 3.8, 6.0], [9, 9, 2]], atol=1e-6)
    np.testing.assert_allclose(sc, [0.9, 0.6])


def test_tiled_equals_untiled(small_model):
    rng = np.random.default_rng(3)
    canon = rng.normal(size=(20, 26, 23)).astype(np.float32)
    p0, o0 = neural.predict(small_model, canon, tile=None)
    p1, o1 = neural.predict(small_model, canon, tile=40)
    assert p0.shape == canon.shape and o0.shape == canon.shape + (3,)
    np.testing.assert_allclose(p1, p0, atol=2e-5)
    np.testing.assert_allclose(o1, o0, atol=2e-5)


def test_weights_round_trip(tmp_path, small_model):
    path = tmp_path / "w.npz"
    assert not neural.available(path)
    neural.save_weights(small_model, path, threshold=0.33, note="test")
    assert neural.available(path)
    model, header = neural.load_weights(path)
    assert header["threshold"] == 0.33 and tuple(header["features"]) == (4, 8)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, 8, 8, 1)), jnp.float32)
    np.testing.assert_allclose(model(x), small_model(x), atol=1e-6)
    with pytest.raises(FileNotFoundError):
        neural.load_weights(tmp_path / "missing.npz")


def test_shipped_weights_load_offline():
    assert neural.available()
    model, header = neural.load_weights()
    assert 0 < header["threshold"] < 1
    assert 50_000 <= count_params(model) <= 150_000
    assert header["canonical_radius"] == CANONICAL_RADIUS


def test_targets():
    pos = np.array([[2.0, 3.0, 4.25], [7.0, 7.0, 7.0]])
    heat, off = training.targets(pos, (10, 10, 10))
    assert heat[2, 3, 4] == pytest.approx(math.exp(-0.5 * 0.25**2))
    np.testing.assert_allclose(off[2, 3, 4], [0, 0, 0.25])
    np.testing.assert_allclose(off[6, 8, 7], [1, -1, 0])
    assert heat[7, 7, 7] == pytest.approx(1.0)


def test_augment_keeps_offsets_consistent():
    rng = np.random.default_rng(0)
    pos = np.array([[5.3, 6.1, 9.6], [12.0, 3.2, 4.4]])
    heat, off = training.targets(pos, (16, 16, 16))
    v = dict(x=heat.copy(), heat=heat, mask=np.ones_like(heat), offset=off)
    for _ in range(8):
        x, h, m, o = training.augment(v, 12, rng)
        assert np.array_equal(x, h) and m.shape == h.shape and o.shape == h.shape + (3,)
        i = np.unravel_index(np.argmax(h), h.shape)
        centre = np.asarray(i) + o[i]
        # the offset at the hottest voxel points to where the heat is centred
        grids = np.meshgrid(*[np.arange(12)] * 3, indexing="ij")
        near = h > 0.3
        lab = (np.linalg.norm(np.stack(grids, -1) - np.asarray(i), axis=-1) < 2.5) & near
        cm = np.array([np.sum(g[lab] * h[lab]) / np.sum(h[lab]) for g in grids])
        assert np.linalg.norm(centre - cm) < 0.35


@pytest.fixture(scope="module")
def tiny_stack():
    from difftrack.simulate import simulate

    sim = simulate((24, 24, 24), voxel_size=(0.1, 0.1, 0.1), radius=0.3, volume_fraction=0.3,
                   photons=300.0, elongation=1.5, seed=0)
    return sim


def test_overfit_one_tiny_stack(tiny_stack):
    """The network learns one tiny stack: the loss drops a lot, the peaks find the centres."""
    sim = tiny_stack
    r_vox = (3.0, 3.0, 3.0)
    canon, cshape = neural.preprocess(sim.image, r_vox)
    assert cshape == sim.image.shape
    truth = sim.truth[["z", "y", "x"]].to_numpy()
    heat, off = training.targets(neural.to_canonical(truth, sim.image.shape, cshape), cshape)
    model = new_unet((8, 16), seed=0)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = training.make_optimizer()
    opt_state = tx.init(params)
    step = training.make_step(graphdef, tx)
    batch = [jnp.asarray(a)[None] for a in (canon, heat, np.ones_like(heat), off)]
    losses = []
    for i in range(80):
        lr = training.lr_at(i, 80, 1e-2, 10)
        params, opt_state, loss, _ = step(params, opt_state, *batch, jnp.float32(lr))
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) / 5, (losses[:3], losses[-5:])
    nnx.update(model, params)
    found = neural.detect(sim.image, r_vox, weights=model, threshold=0.4)
    s = score(found[["z", "y", "x"]].to_numpy(), truth, radius=0.3, voxel_size=(0.1,) * 3,
              shape=sim.image.shape)
    assert s.recall >= 0.9 and s.precision >= 0.9, s
    assert np.all(s.rmse < 0.5)


TINY = dict(batch=1, crop=16, vol=24, features=(4, 8), calibrate=0, log=None, buffer=2)


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("w") / "tiny.npz"
    model, header = training.train(steps=2, seed=3, out=out, **TINY)
    return out, model, header


def test_train_is_reproducible_and_saves(tiny_trained):
    out, model, header = tiny_trained
    assert neural.available(out) and header["steps"] == 2 and header["seed"] == 3
    model2, _ = training.train(steps=2, seed=3, **TINY)
    a = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    b = jax.tree_util.tree_leaves(nnx.state(model2, nnx.Param))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    loaded, _h = neural.load_weights(out)
    x = jnp.ones((1, 8, 8, 8, 1))
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)


def test_fine_tune_on_a_learned_psf(tiny_trained):
    from difftrack.shape import PSF

    out, _, _header0 = tiny_trained
    psf = PSF.init(0.09, 0.25, n_components=2)
    model, header = training.train(steps=1, seed=4, init=out, shape=psf, radius=0.35,
                                   voxel_size=(0.15, 0.1, 0.1), **TINY)
    assert header["fine_tuned_on_shape"]["radius"] == 0.35
    assert header["init"]["steps"] == 2 and tuple(model.features) == (4, 8)
    with pytest.raises(ValueError):
        training.train(steps=1, init=out, shape=psf, **TINY)  # no voxel size, radius


def test_fine_tuning_jitters_the_learned_psf_and_mixes_in_general_stacks():
    from difftrack.shape import PSF

    psf = PSF.init(0.1, 0.3, n_components=2)
    vs = (0.15, 0.1, 0.1)
    spec = training.shape_spec_from(psf, voxel_size=vs, radius=0.3, jitter=0.4, mix=0.25)
    rng = np.random.default_rng(0)
    ss = [training.random_settings(rng, spec) for _ in range(400)]
    pinned = [s for s in ss if s["voxel_size"] == vs and abs(s["radius"] / 0.3 - 1) <= 0.05]
    general = len(ss) - len(pinned)
    assert 0.18 < general / len(ss) < 0.32  # mix = 0.25 (a general draw rarely hits vs)
    f_xy = np.array([np.exp(np.asarray(s["psf"].log_sigma_xy - psf.log_sigma_xy)) for s in pinned])
    f_z = np.array([np.exp(np.asarray(s["psf"].log_sigma_z - psf.log_sigma_z)) for s in pinned])
    # one factor per axis for all components, within exp(+-0.4), spread over the range
    assert np.allclose(f_xy[:, 0], f_xy[:, 1], rtol=1e-5) and np.allclose(f_z[:, 0], f_z[:, 1], rtol=1e-5)
    for f in (f_xy[:, 0], f_z[:, 0]):
        assert np.exp(-0.4) - 1e-5 <= f.min() < 0.75 and 1.4 < f.max() <= np.exp(0.4) + 1e-5
    assert np.corrcoef(np.log(f_xy[:, 0]), np.log(f_z[:, 0]))[0, 1] < 0.2  # drawn apart
    # off: the learned PSF itself, every time
    spec0 = training.shape_spec_from(psf, voxel_size=vs, radius=0.3)
    s0 = training.random_settings(np.random.default_rng(1), spec0)
    assert s0["psf"] is psf
    with pytest.raises(ValueError, match="jitter"):
        training.shape_spec_from(psf, voxel_size=vs, radius=0.3, mix=1.0)


def test_random_settings_cover_the_ranges():
    rng = np.random.default_rng(0)
    ss = [training.random_settings(rng) for _ in range(300)]
    phi = [s["volume_fraction"] for s in ss]
    r_xy = [s["radius"] / s["voxel_size"][1] for s in ss]
    cnr = [s["cnr"] for s in ss]
    assert 0.1 <= min(phi) < 0.2 and 0.55 < max(phi) <= 0.6
    assert 2.5 <= min(r_xy) < 3 and 6.5 < max(r_xy) <= 7
    assert min(cnr) < 1.3 and max(cnr) > 9
    assert 0.2 < np.mean([s["dark"] for s in ss]) < 0.6
    assert training.photons_for_cnr(3.0, 10.0, 2.0) / math.sqrt(
        training.photons_for_cnr(3.0, 10.0, 2.0) + 14.0) == pytest.approx(3.0)


def test_cli_arguments():
    import argparse

    p = training.add_arguments(argparse.ArgumentParser())
    a = p.parse_args(["--steps", "5", "-o", "w.npz", "--from-shape", "s.tif", "--radius", "0.4"])
    assert a.steps == 5 and a.out == "w.npz" and a.from_shape == "s.tif" and a.radius == 0.4
    assert training.output_path(a) == "w.npz"
    assert training.output_path(p.parse_args([])) == str(neural.DEFAULT_WEIGHTS)
    tuned = p.parse_args(["--from-shape", "data/s.tif", "--radius", "0.4"])
    assert training.output_path(tuned) == "s_detector.npz"  # never the shipped weights
    with pytest.raises(SystemExit):
        training.main(["--help"])
    assert training.main(["--from-shape", "/nonexistent.tif", "--no-progress"]) == 2


def test_central_block_for_learning_the_shape():
    img = np.arange(40 * 300 * 200).reshape(40, 300, 200)
    assert training.central_block(img, img.size) is img
    b = training.central_block(img, 40 * 100 * 100)
    assert b.shape == (40, 100, 100) and b.size <= 40 * 100 * 100
    assert b[0, 0, 0] == img[0, 100, 50]  # centred on the cut axes, whole along z
    b = training.central_block(img, 1000)
    assert b.shape == (10, 10, 10)


def test_learn_shape_from_a_stack_file(tmp_path):
    from difftrack import simulate, write_stack

    sim = simulate((16, 28, 32), voxel_size=(0.2, 0.1, 0.1), radius=0.4, volume_fraction=0.4,
                   photons=100.0, seed=3)
    path = tmp_path / "s.tif"
    write_stack(path, sim.image, voxel_size=sim.voxel_size)
    lines = []
    model, cnr = training.learn_shape(path, radius=0.4, log=lines.append,
                                      max_voxels=16 * 24 * 24)
    assert model.geometry.shape == (16, 24, 24)  # the central block
    assert cnr > 1 and np.isfinite(cnr)
    sz, sxy = (float(v) for v in model.psf.moments())
    assert sz > sxy > 0  # z-elongated, as simulated
    assert "fit_shape" in lines[0]
    with pytest.raises(ValueError, match="how"):
        training.learn_shape(path, radius=0.4, how="guess")
