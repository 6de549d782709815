"""The user's path (issue 6): ``preprocess`` -> ``track`` -> ``refine``, ``locate``, and the
``difftrack locate`` command, on tiny simulated stacks; bad input gives a clear message and
no output file.

Refinement is slow and JAX compiles its fits once per stack layout, so every refining test
here uses the same tiny stack (16 x 32 x 32, ~40 particles) and the same short settings:
the first pays the compilation (~1 min on 2 cores), the others reuse it.
"""

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

import difftrack as dt
from difftrack import api
from difftrack.cli import main
from difftrack.io import write_stack
from difftrack.metrics import score
from difftrack.simulate import simulate

# the module (``difftrack.refine`` is the API function of the same name)
REFINE_MODULE = importlib.import_module("difftrack.refine")
REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "real"
VS = (0.2, 0.1, 0.1)
R = 0.4
SHAPE = (16, 32, 32)
FAST = dict(max_rounds=1, steps=30, shape_steps=30, polish=0)
FAST_CLI = ["--max-rounds", "1", "--steps", "30"]
REFINED_COLUMNS = ["z", "y", "x", "sigma_z", "sigma_y", "sigma_x", "amplitude", "radius",
                   "quality", "z_um", "y_um", "x_um"]


def _files(folder):
    return sorted(p.name for p in Path(folder).iterdir())


def _truth_xyz(sim):
    return sim.truth[["z", "y", "x"]].to_numpy()


def _score(df, sim, radius=R):
    return score(df[["z", "y", "x"]].to_numpy(), _truth_xyz(sim), radius=radius,
                 voxel_size=sim.voxel_size, shape=sim.image.shape)


@pytest.fixture(scope="module")
def sim():
    return simulate(SHAPE, voxel_size=VS, radius=R, volume_fraction=0.3, seed=3)


@pytest.fixture(scope="module")
def tif(sim, tmp_path_factory):
    """A new user's file: an ImageJ TIFF whose metadata hold the voxel size."""
    path = tmp_path_factory.mktemp("user") / "stack.tif"
    write_stack(path, sim.image, voxel_size=VS)
    return path


@pytest.fixture(scope="module")
def located(tif):
    # voxel size from the file, radius and polarity estimated: what a new user gets
    return dt.locate(tif, **FAST)


# ----------------------------------------------------------------------------------------
# the user's path


def test_user_path_command_line(tif, sim, tmp_path, capsys):
    out = tmp_path / "particles.csv"
    rc = main(["locate", str(tif), "-o", str(out), *FAST_CLI])
    assert rc == 0
    text = capsys.readouterr().out
    assert "found" in text and "median uncertainty" in text and str(out) in text
    assert _files(tmp_path) == ["particles.csv"]  # no temporary file left behind
    df = pd.read_csv(out)
    assert list(df.columns) == REFINED_COLUMNS
    s = _score(df, sim)
    assert s.recall >= 0.9 and s.precision >= 0.9, s
    np.testing.assert_allclose(df["z_um"], df["z"] * 0.2, rtol=1e-5)
    np.testing.assert_allclose(df["x_um"], df["x"] * 0.1, rtol=1e-5)
    assert (df[["sigma_z", "sigma_y", "sigma_x"]] > 0).all().all()
    assert df["radius"].between(0.2, 0.6).all()  # um, true radius 0.4


def test_user_path_command_line_as_a_subprocess(tif, tmp_path):
    out = tmp_path / "found.csv"
    res = subprocess.run([sys.executable, "-m", "difftrack.cli", "locate", str(tif), "-o",
                          str(out), "--no-refine", "-q"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "found" in res.stdout
    df = pd.read_csv(out)
    assert list(df.columns[:3]) == ["z", "y", "x"]
    assert {"score", "z_um", "y_um", "x_um"} <= set(df.columns)
    assert len(df) > 10


def test_locate_gives_the_documented_result(located, sim):
    res = located
    assert isinstance(res, api.Refined)
    assert list(res.particles.columns) == REFINED_COLUMNS
    s = _score(res.particles, sim)
    assert s.recall >= 0.9 and s.precision >= 0.9, s
    assert res.data.voxel_size == pytest.approx(VS, rel=1e-4)
    assert res.data.radius == pytest.approx(R, rel=0.15)  # estimated from the image
    assert res.data.radius_estimated and res.data.invert_estimated and not res.data.invert
    m = res.model_image()
    assert m.shape == SHAPE and m.dtype == np.float32
    resid = res.residual()
    np.testing.assert_allclose(resid, sim.image.astype(np.float32) - m, atol=1e-3)
    # the fit explains the light: residual ~ the noise (Poisson + read)
    inner = (slice(3, -3), slice(5, -5), slice(5, -5))
    z = resid[inner] / np.sqrt(sim.noise_variance[inner])
    assert z.std() < 1.5
    assert res.model.psf is res.psf
    assert res.noise is not None and res.stats["detected"] > 0
    # "auto": the U-Net when its weights are shipped, else the classical detector
    assert res.stats["detector"] == ("unet" if api._neural_module() else "classical")


def test_three_calls_equal_locate(tif, located):
    data = dt.preprocess(tif)
    found = dt.track(data)
    res = dt.refine(found, **FAST)
    assert isinstance(found, api.Tracked) and found.data is data and res.data is data
    pd.testing.assert_frame_equal(res.particles, located.particles)
    assert list(found.particles.columns[:4]) == ["z", "y", "x", "score"]
    assert {"z_um", "y_um", "x_um"} <= set(found.particles.columns)
    assert ("mass" in found.particles.columns) == (found.detector == "classical")
    assert found.particles["score"].is_monotonic_decreasing
    # the API call, not the submodule of the same name, whatever was imported since
    import difftrack.refine  # noqa: F401

    assert callable(dt.refine) and dt.refine is api.refine


def test_track_and_refine_accept_a_path_or_an_array(sim):
    img = sim.image.copy()
    found = dt.track(img)  # preprocessed with defaults: voxels, radius estimated
    assert found.data.voxel_size is None
    assert "z_um" not in found.particles.columns
    assert found.data.radius == pytest.approx(R / 0.1, rel=0.15)  # lateral voxels
    np.testing.assert_array_equal(img, sim.image)


def test_caller_array_and_intensities_untouched(sim):
    img = sim.image.astype(np.float32) * 3.0 + 7.0
    before = img.copy()
    img.flags.writeable = False  # any in-place write would raise
    data = dt.preprocess(img, voxel_size=VS, radius=R)
    assert data.image is img
    found = dt.track(data, detector="classical")
    np.testing.assert_array_equal(img, before)
    # the normalised copy is separate, and maps back to the image
    assert data.normalised.dtype == np.float32 and data.normalised is not img
    np.testing.assert_allclose(data.offset + data.scale * data.normalised, before, rtol=1e-5,
                               atol=1e-3)
    # the matched-filter mass is in image units: 3x the image gives 3x the mass
    ref = dt.track(dt.preprocess(sim.image, voxel_size=VS, radius=R), detector="classical")
    np.testing.assert_allclose(found.particles["mass"].to_numpy(),
                               3.0 * ref.particles["mass"].to_numpy(), rtol=1e-3)
    assert data.noise == pytest.approx(3.0 * ref.data.noise, rel=1e-3)


# ----------------------------------------------------------------------------------------
# time series


def _two_frames(shift=1):
    big = simulate((16, 32, 32 + shift), voxel_size=VS, radius=R, volume_fraction=0.3,
                   seed=11)
    return np.stack([big.image[:, :, :32], big.image[:, :, shift:32 + shift]]), big


@pytest.mark.filterwarnings("ignore:The inplace keyword")  # inside trackpy
def test_series_tiff_gets_a_frame_column_and_links(tmp_path, capsys):
    series, big = _two_frames(shift=1)
    path = tmp_path / "series.tif"
    tifffile.imwrite(path, series, imagej=True, resolution=(10.0, 10.0),
                     metadata={"axes": "TZYX", "spacing": 0.2, "unit": "um"})
    out = tmp_path / "series.csv"
    rc = main(["locate", str(path), "-o", str(out), "--no-refine"])
    assert rc == 0, capsys.readouterr().err
    assert "2 frames" in capsys.readouterr().out
    df = pd.read_csv(out)
    assert sorted(df["frame"].unique()) == [0, 1]
    assert {"z", "y", "x", "z_um", "y_um", "x_um", "frame"} <= set(df.columns)
    n0, n1 = (df["frame"] == 0).sum(), (df["frame"] == 1).sum()
    assert abs(int(n0) - int(n1)) <= 0.2 * n0
    tp = pytest.importorskip("trackpy")
    linked = tp.link(df, search_range=2.0, pos_columns=["z", "y", "x"], memory=0)
    lengths = linked.groupby("particle").size()
    assert (lengths == 2).sum() >= 0.7 * min(n0, n1)
    # the linked displacement is the shift of the second window: x moves by -1 voxel
    both = linked[linked["particle"].isin(lengths[lengths == 2].index)]
    dx = both.sort_values("frame").groupby("particle")["x"].agg(lambda v: v.iloc[1] - v.iloc[0])
    assert float(np.median(dx)) == pytest.approx(-1.0, abs=0.15)


@pytest.mark.slow
def test_locate_series_array_refines_every_frame(sim, located):
    # two copies of the user's stack (the first frame's fits are already compiled); the
    # second holds the shape learned on the first (~1 min more on 2 cores: its fits compile)
    series = np.stack([sim.image, sim.image])
    before = series.copy()
    res = dt.locate(series, voxel_size=located.data.voxel_size, radius=located.data.radius,
                    **FAST)
    assert isinstance(res, api.SeriesResult)
    np.testing.assert_array_equal(series, before)
    df = res.particles
    assert list(df.columns) == REFINED_COLUMNS + ["frame"]
    assert sorted(df["frame"].unique()) == [0, 1]
    assert len(res.frames) == 2 and res.psf is not None
    assert res.stats["psf_held"] == api.psf_supported()
    pd.testing.assert_frame_equal(df[df["frame"] == 0].drop(columns="frame"),
                                  located.particles)
    for t in (0, 1):
        s = _score(df[df["frame"] == t], sim)
        assert s.recall >= 0.9 and s.precision >= 0.9, s


class _FakeRefine:
    """Stands in for refine_positions (instant): records what it was given."""

    def __init__(self, with_psf):
        self.calls = []
        self.with_psf = with_psf

    def result(self, image, positions, psf):
        from difftrack.refine import RefineResult

        n = len(positions)
        df = pd.DataFrame({"z": positions[:, 0], "y": positions[:, 1], "x": positions[:, 2]})
        for c in ("sigma_z", "sigma_y", "sigma_x", "amplitude", "radius", "quality"):
            df[c] = np.ones(n)
        model = type("M", (), {"psf": psf if psf is not None else object()})()
        return RefineResult(df, model, None, {"n": n})

    def make(self):
        if self.with_psf:
            def refine_positions(image, positions, *, voxel_size=None, radius=None,
                                 invert="auto", max_rounds=6, progress=False, psf=None):
                self.calls.append(dict(psf=psf, radius=radius, invert=invert))
                return self.result(image, positions, psf)
        else:
            def refine_positions(image, positions, *, voxel_size=None, radius=None,
                                 invert="auto", max_rounds=6, progress=False):
                self.calls.append(dict(psf=None, radius=radius, invert=invert))
                return self.result(image, positions, None)
        return refine_positions


@pytest.mark.parametrize("with_psf", [True, False])
def test_series_learns_the_shape_once_when_refine_can_hold_it(sim, monkeypatch, with_psf):
    fake = _FakeRefine(with_psf)
    monkeypatch.setattr(REFINE_MODULE, "refine_positions", fake.make())
    series = np.stack([sim.image] * 3)
    res = dt.locate(series, voxel_size=VS, max_rounds=1)
    assert res.stats["psf_held"] is with_psf
    assert len(fake.calls) == 3
    psfs = [c["psf"] for c in fake.calls]
    assert psfs[0] is None  # learned on the first frame
    if with_psf:  # ... and handed to the others
        assert psfs[1] is not None and psfs[1] is psfs[2] is res.frames[0].model.psf
        assert res.psf is psfs[1]
    else:
        assert psfs == [None, None, None]
    # radius and polarity settled on the first frame, reused
    assert len({c["radius"] for c in fake.calls}) == 1
    assert {c["invert"] for c in fake.calls} == {False}
    assert sorted(res.particles["frame"].unique()) == [0, 1, 2]


def test_command_line_series_says_when_the_shape_is_relearned(sim, monkeypatch, tmp_path,
                                                              capsys):
    monkeypatch.setattr(REFINE_MODULE, "refine_positions", _FakeRefine(False).make())
    path = tmp_path / "series.tif"
    tifffile.imwrite(path, np.stack([sim.image] * 2), imagej=True,
                     metadata={"axes": "TZYX"})
    assert main(["locate", str(path), "-o", str(tmp_path / "t.csv"), "--max-rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "learned again on every frame" in out
    df = pd.read_csv(tmp_path / "t.csv")
    assert sorted(df["frame"].unique()) == [0, 1] and "z_um" not in df.columns


def test_locate_without_refine_is_detection(sim):
    res = dt.locate(np.stack([sim.image, sim.image]), voxel_size=VS, refine=False)
    assert isinstance(res, api.SeriesResult)
    assert all(isinstance(f, api.Tracked) for f in res.frames)
    assert "frame" in res.particles.columns and res.psf is None


# ----------------------------------------------------------------------------------------
# radius and polarity from the image


@pytest.mark.parametrize("r_px", [2.5, 4.0, 7.0])
@pytest.mark.parametrize("dark", [False, True])
def test_radius_and_polarity_are_estimated(r_px, dark):
    n = 80 if r_px > 5 else 48
    s = simulate((24, n, n), voxel_size=VS, radius=r_px * 0.1, dark=dark, seed=4)
    data = dt.preprocess(s.image, voxel_size=VS)
    assert data.radius == pytest.approx(r_px * 0.1, rel=0.15)
    assert data.invert is dark
    assert data.radius_estimated and data.invert_estimated
    # without a voxel size: the lateral radius in voxels
    assert api.estimate_radius(s.image) == pytest.approx(r_px, rel=0.15)


def test_given_radius_and_polarity_are_kept(sim):
    data = dt.preprocess(sim.image, voxel_size=VS, radius=0.5, invert=True)
    assert data.radius == 0.5 and data.invert is True
    assert not data.radius_estimated and not data.invert_estimated
    assert data.radius_vox == pytest.approx((2.5, 5.0, 5.0))
    data = dt.preprocess(sim.image, radius=4, invert=False, name="run 3")
    assert data.radius_vox == (4.0, 4.0, 4.0) and data.meta == {"name": "run 3"}


@pytest.mark.skipif(not (REAL / "small_confocal_image.tif").exists(),
                    reason="../shared/data/real not present")
def test_real_dark_stack_is_recognised_as_dark():
    data = dt.preprocess(REAL / "small_confocal_image.tif")
    assert data.invert is True
    assert data.voxel_size is None
    assert 3.5 <= data.radius <= 8.0  # the README: radius about 5 px


@pytest.mark.skipif(not (REAL / "katherine.tiff").exists(),
                    reason="../shared/data/real not present")
def test_real_bright_stack_is_recognised_as_bright():
    data = dt.preprocess(REAL / "katherine.tiff")
    assert data.invert is False


# ----------------------------------------------------------------------------------------
# detector choice and options


def test_detector_choice(sim, monkeypatch):
    data = dt.preprocess(sim.image, voxel_size=VS, radius=R)
    assert dt.track(data, detector="classical").detector == "classical"
    with pytest.raises(ValueError, match="detector"):
        dt.track(data, detector="cnn")
    if api._neural_module() is not None:  # the shipped U-Net
        found = dt.track(data, detector="unet")
        assert found.detector == "unet"
        assert list(found.particles.columns) == ["z", "y", "x", "score", "z_um", "y_um",
                                                 "x_um"]
        s = _score(found.particles, sim)
        assert s.recall >= 0.8 and s.precision >= 0.8, s

    monkeypatch.setattr(api, "_neural_module", lambda: None)
    assert dt.track(data).detector == "classical"  # auto falls back
    with pytest.raises(RuntimeError, match="U-Net"):
        dt.track(data, detector="unet")

    class FakeNeural:
        calls = []

        @staticmethod
        def detect(image, radius_vox, *, invert=False):
            FakeNeural.calls.append((image, tuple(radius_vox), invert))
            # as many centres as the classical detector finds: no region is unsure
            return classical[["z", "y", "x", "score"]].assign(score=0.9)

    classical = dt.track(data, detector="classical").particles

    monkeypatch.setattr(api, "_neural_module", lambda: FakeNeural)
    found = dt.track(data)
    assert found.detector == "unet"
    assert FakeNeural.calls[-1][0] is data.image
    assert FakeNeural.calls[-1][1] == pytest.approx((2.0, 4.0, 4.0))
    assert list(found.particles.columns) == ["z", "y", "x", "score", "z_um", "y_um", "x_um"]
    assert dt.track(data, detector="classical").detector == "classical"


def test_auto_falls_back_to_classical_where_the_unet_is_unsure(sim, monkeypatch):
    data = dt.preprocess(sim.image, voxel_size=VS, radius=R)
    rng = np.random.default_rng(0)
    n_over = int(0.8 * np.prod(data.shape) / (4 / 3 * np.pi * np.prod(data.radius_vox))) + 1

    class Overcounting:  # more centres than spheres can fill (volume fraction 0.8)
        @staticmethod
        def detect(image, radius_vox, *, invert=False, threshold=None):
            p = rng.uniform(0, 1, (n_over, 3)) * (np.asarray(image.shape) - 1)
            return pd.DataFrame({"z": p[:, 0], "y": p[:, 1], "x": p[:, 2],
                                 "score": np.full(n_over, 0.9)})

    monkeypatch.setattr(api, "_neural_module", lambda: Overcounting)
    with pytest.warns(UserWarning, match="more than spheres can fill"):
        found = dt.track(data, threshold=0.5)  # a likelihood threshold: not for classical
    assert found.detector == "classical"
    assert len(found.particles) == len(dt.track(data, detector="classical").particles)
    forced = dt.track(data, detector="unet")  # asked for by name: no second-guessing
    assert forced.detector == "unet" and len(forced.particles) == n_over


def test_auto_falls_back_region_by_region(monkeypatch):
    # a stack four regions wide along x (region edges at x = 31.5, 63.5, 95.5): where the
    # U-Net sees nothing, or more centres than spheres can fill, the classical detector's
    # centres replace its own in those regions only
    s = simulate((16, 32, 128), voxel_size=VS, radius=R, volume_fraction=0.3, seed=7)
    data = dt.preprocess(s.image, voxel_size=VS, radius=R)
    classical = dt.track(data, detector="classical").particles
    truth = s.truth[["z", "y", "x"]].to_numpy()
    truth = truth[np.all((truth >= -0.5) & (truth <= np.asarray(s.image.shape) - 0.5), axis=1)]
    rng = np.random.default_rng(1)
    n_fill = int(0.9 * 16 * 32 * 32 / (4 / 3 * np.pi * 2 * 4 * 4))  # volume fraction 0.9
    crowd = np.column_stack([rng.uniform(0, 15, n_fill), rng.uniform(0, 31, n_fill),
                             rng.uniform(96, 127, n_fill)])
    cases = [(truth[truth[:, 2] < 63.5], np.zeros((0, 3)), 63.5),  # blind in the right half
             (truth[truth[:, 2] < 95.5], crowd, 95.5)]  # crowded in the last region
    for kept, extra, edge in cases:
        p = np.concatenate([kept, extra])

        class Unsure:
            @staticmethod
            def detect(image, radius_vox, *, invert=False, p=p):
                return pd.DataFrame({"z": p[:, 0], "y": p[:, 1], "x": p[:, 2],
                                     "score": np.full(len(p), 0.9)})

        monkeypatch.setattr(api, "_neural_module", lambda Unsure=Unsure: Unsure)
        with pytest.warns(UserWarning, match="unsure in"):
            found = dt.track(data)
        assert found.detector == "unet+classical"
        df = found.particles
        np.testing.assert_allclose(df.loc[df["detector"] == "unet", ["z", "y", "x"]], kept)
        from_classical = df[df["detector"] == "classical"]
        assert len(from_classical) == (classical["x"] > edge).sum() > 8
        assert (from_classical["x"] > edge).all()


def test_refine_rejects_unknown_options(sim):
    found = dt.track(dt.preprocess(sim.image, voxel_size=VS, radius=R))
    with pytest.raises(TypeError, match="max_round"):
        dt.refine(found, max_round=2)
    with pytest.raises(TypeError, match="radius"):
        dt.refine(found, radius=0.3)


def test_refine_with_nothing_detected_gives_an_empty_table(sim):
    found = dt.track(dt.preprocess(sim.image, voxel_size=VS, radius=R), detector="classical",
                     threshold=1e9)
    assert len(found.particles) == 0
    with pytest.warns(UserWarning, match="no particle"):
        res = dt.refine(found)
    assert list(res.particles.columns) == REFINED_COLUMNS and len(res.particles) == 0
    with pytest.raises(ValueError, match="no particle"):
        res.model_image()


# ----------------------------------------------------------------------------------------
# bad input: a clear message, nothing written


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
def test_every_real_dtype_works(sim, dtype):
    img = sim.image.astype(np.float64)
    if dtype == np.uint8:
        img = (img - img.min()) / (img.max() - img.min()) * 250
    img = img.astype(dtype)
    found = dt.track(dt.preprocess(img, voxel_size=VS, radius=R))
    assert found.data.image.dtype == dtype
    s = _score(found.particles, sim)
    assert s.recall >= 0.8 and s.precision >= 0.8, s


def _bad_arrays():
    rng = np.random.default_rng(0)
    nan = rng.normal(size=(8, 16, 16)).astype(np.float32)
    nan[2, 3, 4] = np.nan
    return {
        "2D": (rng.normal(size=(16, 16)), "2D"),
        "5D": (rng.normal(size=(2, 2, 4, 8, 8)), "5D"),
        "NaN": (nan, "NaN"),
        "all-zero": (np.zeros((8, 16, 16), np.uint16), "constant"),
        "constant": (np.full((8, 16, 16), 7.5, np.float32), "constant"),
        "bool": (np.zeros((8, 16, 16), bool), "boolean"),
    }


@pytest.mark.parametrize("case", list(_bad_arrays()))
def test_bad_arrays_raise_naming_the_problem(case):
    arr, word = _bad_arrays()[case]
    with pytest.raises((ValueError, TypeError), match=word):
        dt.preprocess(arr)
    with pytest.raises((ValueError, TypeError), match=word):
        dt.locate(arr)


def test_4d_array_to_preprocess_points_to_locate():
    with pytest.raises(ValueError, match="locate"):
        dt.preprocess(np.random.default_rng(0).normal(size=(2, 8, 16, 16)))


@pytest.mark.parametrize("radius, word", [(0, "positive"), (-1.0, "positive"),
                                           (float("nan"), "positive"),
                                           (float("inf"), "positive"),
                                           (100.0, "larger than the stack"),
                                           (0.01, "below half a voxel"),
                                           ("big", "number"), (True, "number")])
def test_absurd_radius_raises(sim, radius, word):
    with pytest.raises((ValueError, TypeError), match=word):
        dt.preprocess(sim.image, voxel_size=VS, radius=radius)


def test_bad_voxel_size_and_invert_raise(sim):
    with pytest.raises(ValueError, match="voxel_size"):
        dt.preprocess(sim.image, voxel_size=(0.2, 0, 0.1))
    with pytest.raises(ValueError, match="invert"):
        dt.preprocess(sim.image, invert="dark")
    with pytest.raises(FileNotFoundError, match="no such file"):
        dt.preprocess("/nonexistent/stack.tif")


def _write_bad(path, case):
    if case in ("2D", "5D", "NaN", "all-zero", "constant"):
        arr, _ = _bad_arrays()[case]
        tifffile.imwrite(path, arr, photometric="minisblack")
    return path


CLI_BAD = [
    # (name, input case or None, extra args, output name, word in the message)
    ("2D", "2D", [], "out.csv", "2D"),
    ("5D", "5D", [], "out.csv", "5D"),
    ("NaN", "NaN", [], "out.csv", "NaN"),
    ("all-zero", "all-zero", [], "out.csv", "constant"),
    ("constant", "constant", [], "out.csv", "constant"),
    ("missing file", None, [], "out.csv", "no such file"),
    ("missing output folder", "ok", [], "nodir/out.csv", "nodir"),
    ("output folder is a file", "ok", [], "in.tif/out.csv", "not a directory"),
    ("unknown table type", "ok", [], "out.txt", "unsupported file type"),
    ("radius 0", "ok", ["--radius", "0"], "out.csv", "radius"),
    ("radius larger than the stack", "ok", ["--radius", "500"], "out.csv", "radius"),
    ("voxel size 0", "ok", ["--voxel-size", "0", "0.1", "0.1"], "out.csv", "voxel_size"),
]


@pytest.mark.parametrize("name, case, extra, outname, word", CLI_BAD,
                         ids=[c[0] for c in CLI_BAD])
def test_command_line_bad_input_one_line_and_no_output(sim, tmp_path, capsys, name, case,
                                                       extra, outname, word):
    src = tmp_path / "in.tif"
    if case == "ok":
        write_stack(src, sim.image, voxel_size=VS)
    elif case is not None:
        _write_bad(src, case)
    before = _files(tmp_path)
    rc = main(["locate", str(src), "-o", str(tmp_path / outname), *extra])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("difftrack: error: ")
    assert word in err[0]
    assert _files(tmp_path) == before  # no output, no temporary file


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
def test_command_line_reads_every_real_dtype(sim, tmp_path, dtype):
    img = sim.image.astype(np.float64)
    if dtype == np.uint8:
        img = (img - img.min()) / (img.max() - img.min()) * 250
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, img.astype(dtype))  # plain TIFF: no voxel size in the file
    out = tmp_path / "out.csv"
    rc = main(["locate", str(src), "-o", str(out), "--no-refine", "-q", "--voxel-size",
               "0.2", "0.1", "0.1", "--radius", "0.4"])
    assert rc == 0
    df = pd.read_csv(out)
    s = _score(df, sim)
    assert s.recall >= 0.8 and s.precision >= 0.8, s


def test_command_line_writes_parquet(tif, tmp_path):
    pytest.importorskip("pyarrow")
    out = tmp_path / "out.parquet"
    assert main(["locate", str(tif), "-o", str(out), "--no-refine", "-q"]) == 0
    df = pd.read_parquet(out)
    assert list(df.columns[:3]) == ["z", "y", "x"] and len(df) > 10


@pytest.mark.skipif(not (REAL / "small_confocal_image.tif").exists(),
                    reason="../shared/data/real not present")
def test_real_stacks_example_runs_detection_only(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = REPO / "examples" / "real_stacks.py"
    spec = importlib.util.spec_from_file_location("real_stacks", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["small_confocal_image.tif", "--no-refine", "--out", str(tmp_path)]) == 0
    assert _files(tmp_path) == ["real_small_confocal_image.png"]
    assert "dark (auto: True)" in capsys.readouterr().out


def test_track_takes_detector_weights_and_refuses_them_for_classical():
    neural = pytest.importorskip("difftrack.neural")
    if not neural.available():
        pytest.skip("no shipped detector weights")
    sim = dt.simulate((16, 32, 32), voxel_size=(0.2, 0.1, 0.1), radius=0.4,
                      volume_fraction=0.4, seed=3)
    data = dt.preprocess(sim.image, voxel_size=sim.voxel_size, radius=0.4)
    a = dt.track(data, detector="unet")
    b = dt.track(data, detector="unet", weights=str(neural.DEFAULT_WEIGHTS))
    pd.testing.assert_frame_equal(a.particles, b.particles)
    with pytest.raises(ValueError, match="weights"):
        dt.track(data, detector="classical", weights="other.npz")
    with pytest.raises((OSError, ValueError)):
        dt.track(data, detector="unet", weights=str(Path("no") / "such.npz"))
