"""The examples run (on tiny data), so they cannot rot."""

import importlib.util
from pathlib import Path


def test_quickstart_example_runs():
    path = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
    spec = importlib.util.spec_from_file_location("quickstart", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    score, resid = mod.main(shape=(16, 32, 32))
    assert score.recall > 0.5 and score.precision > 0.8
    assert resid < 1.15
