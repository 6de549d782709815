"""Tests for the command line (difftrack.cli): ``demo``, ``simulate`` and the help of
``locate`` (its runs are in tests/test_api.py, the user's path)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from difftrack.cli import main
from difftrack.io import read_stack
from difftrack.simulate import simulate

REPO = Path(__file__).resolve().parents[1]


def _all_files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*"))


def test_demo_writes_outputs_and_prints_score(tmp_path, capsys):
    out = tmp_path / "d"
    rc = main(["demo", "--out", str(out), "--shape", "16", "32", "32"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "recall" in text and "precision" in text

    found = pd.read_csv(out / "particles.csv")
    assert list(found.columns[:3]) == ["z", "y", "x"]
    assert {"score", "z_um", "y_um", "x_um"} <= set(found.columns)
    assert len(found) > 0
    np.testing.assert_allclose(found["z_um"], found["z"] * 0.2, rtol=1e-9)
    np.testing.assert_allclose(found["x_um"], found["x"] * 0.1, rtol=1e-9)
    # positions are inside the requested (z, y, x) = (16, 32, 32) stack
    assert found["z"].between(-0.5, 15.5).all()
    assert found["y"].between(-0.5, 31.5).all() and found["x"].between(-0.5, 31.5).all()

    truth = pd.read_csv(out / "truth.csv")
    assert list(truth.columns) == ["z", "y", "x", "radius", "amplitude"]
    assert len(truth) > 0

    st = read_stack(out / "stack.tif")
    assert st.image.shape == (16, 32, 32)
    assert st.image.dtype == np.uint16
    assert st.voxel_size == pytest.approx((0.2, 0.1, 0.1), rel=1e-4)


def test_simulate_writes_stack_and_truth(tmp_path, capsys):
    path = tmp_path / "s.tif"
    rc = main(["simulate", str(path), "--shape", "12", "20", "24"])
    assert rc == 0
    assert str(path) in capsys.readouterr().out
    assert _all_files(tmp_path) == ["s.tif", "s_truth.csv"]

    st = read_stack(path)
    assert st.image.shape == (12, 20, 24)
    assert st.voxel_size == pytest.approx((0.2, 0.1, 0.1), rel=1e-4)
    truth = pd.read_csv(tmp_path / "s_truth.csv")
    assert list(truth.columns) == ["z", "y", "x", "radius", "amplitude"]

    # the CLI's defaults are the API's defaults (seed 0)
    ref = simulate((12, 20, 24), voxel_size=(0.2, 0.1, 0.1), radius=0.4, seed=0)
    np.testing.assert_array_equal(st.image, ref.image)
    np.testing.assert_allclose(truth.to_numpy(), ref.truth.to_numpy(), rtol=1e-9, atol=1e-12)


def test_simulate_options_reach_the_simulation(tmp_path):
    path = tmp_path / "dark.tif"
    rc = main(["simulate", str(path), "--shape", "12", "20", "24", "--dark", "--seed", "3",
               "--voxel-size", "0.25", "0.1", "0.12"])
    assert rc == 0
    st = read_stack(path)
    assert st.voxel_size == pytest.approx((0.25, 0.1, 0.12), rel=1e-4)
    truth = pd.read_csv(tmp_path / "dark_truth.csv")
    assert (truth["amplitude"] < 0).all()


def test_simulate_into_missing_folder_fails_cleanly(tmp_path, capsys):
    rc = main(["simulate", str(tmp_path / "nodir" / "s.tif")])
    assert rc != 0
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("difftrack: error: ")
    assert "nodir" in lines[0]
    assert _all_files(tmp_path) == []


def test_simulate_bad_radius_fails_naming_radius(tmp_path, capsys):
    rc = main(["simulate", str(tmp_path / "s.tif"), "--shape", "12", "20", "24",
               "--radius", "0"])
    assert rc != 0
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("difftrack: error: ")
    assert "radius" in lines[0]
    # nothing written, no probe file left behind
    assert _all_files(tmp_path) == []


def test_help_runs_as_a_module():
    res = subprocess.run([sys.executable, "-m", "difftrack.cli", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "demo" in res.stdout and "simulate" in res.stdout and "locate" in res.stdout
    assert "train" in res.stdout


@pytest.mark.parametrize("command", ["demo", "simulate", "locate", "train"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: difftrack " + command in capsys.readouterr().out


def test_locate_help_names_its_options(capsys):
    with pytest.raises(SystemExit):
        main(["locate", "--help"])
    text = capsys.readouterr().out
    for opt in ("-o OUTPUT", "--radius", "--voxel-size Z Y X", "--invert", "--detector",
                "{auto,classical,unet}", "--weights", "--no-refine", ".parquet"):
        assert opt in text


def test_locate_without_output_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["locate", str(tmp_path / "s.tif")])
    assert e.value.code == 2
    assert "-o/--output" in capsys.readouterr().err
    assert _all_files(tmp_path) == []


def test_locate_invert_and_bright_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["locate", str(tmp_path / "s.tif"), "-o", str(tmp_path / "o.csv"), "--invert",
              "--bright"])
    assert e.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


def test_train_from_shape_needs_a_radius_and_writes_nothing(tmp_path, capsys):
    from difftrack import simulate, write_stack

    sim = simulate((12, 24, 24), voxel_size=(0.2, 0.1, 0.1), radius=0.4, seed=0)
    stack = tmp_path / "s.tif"
    write_stack(stack, sim.image, voxel_size=sim.voxel_size)
    out = tmp_path / "w.npz"
    assert main(["train", "--from-shape", str(stack), "-o", str(out), "--steps", "1",
                 "--no-progress"]) == 2
    assert "radius" in capsys.readouterr().err
    assert not out.exists()
