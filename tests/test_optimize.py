"""The shared L-BFGS driver: converges on a simple problem, and a fit that diverges ends
with a clear error that names it (never NaN parameters handed on)."""

import jax.numpy as jnp
import numpy as np
import pytest

from difftrack.optimize import minimize


def _bowl(free, centre, *, static):
    return jnp.sum((free - centre) ** 2)


def _cliff(free, *, static):
    # finite for x > 1, NaN below: the line search backtracks from NaN trial points
    x = free[0]
    return jnp.where(x > 1.0, x * x, jnp.nan)


def test_minimize_converges_on_a_bowl():
    free, hist = minimize(_bowl, jnp.zeros(3), (jnp.asarray([1.0, -2.0, 3.0]),), static=None,
                          steps=50)
    np.testing.assert_allclose(np.asarray(free), [1.0, -2.0, 3.0], atol=1e-4)
    assert hist[-1] < hist[0]


def test_minimize_never_hands_on_nan_parameters():
    # NaN trial points are rejected by the line search: the fit stays finite
    free, hist = minimize(_cliff, jnp.asarray([2.0]), (), static=None, steps=20)
    assert np.all(np.isfinite(np.asarray(free))) and np.isfinite(hist[-1])
    assert 1.0 <= float(free[0]) < 2.0
    # a loss that is not finite at all stops with an error naming the fit
    with pytest.raises(FloatingPointError, match="shape fit diverged"):
        minimize(_bowl, jnp.asarray([np.nan, 0.0, 0.0]), (jnp.zeros(3),), static=None,
                 steps=20, what="shape fit")


def test_minimize_stops_when_the_parameters_stop_moving():
    # a well-scaled bowl: converged to well within xtol long before the step limit
    centre = jnp.asarray([1.0, -2.0, 3.0])
    # (tol=-1 switches the loss-change rule off)
    free, hist = minimize(_bowl, jnp.zeros(3), (centre,), static=None, steps=200, tol=-1.0,
                          xtol=1e-3)
    assert len(hist) < 50
    np.testing.assert_allclose(np.asarray(free), np.asarray(centre), atol=1e-3)
    # without xtol it runs every step
    _, hist = minimize(_bowl, jnp.zeros(3), (centre,), static=None, steps=60, tol=-1.0)
    assert len(hist) == 60


def _ramp(free, centre, *, static):  # used by this test only: its step compiles afresh
    return jnp.sum((free - centre) ** 2) + 0.1 * jnp.sum(free)


def test_a_fit_compiles_its_step_once():
    # optax's initial L-BFGS state holds weakly typed scalars that the first step returns
    # strongly typed; left as they were, every fit compiled its step twice (seconds each
    # for refine's fits)
    from difftrack import optimize

    before = optimize._step._cache_size()
    minimize(_ramp, jnp.zeros(3), (jnp.ones(3),), static=None, steps=20)
    assert optimize._step._cache_size() == before + 1
    minimize(_ramp, jnp.ones(3), (jnp.zeros(3),), static=None, steps=20)  # same layout
    assert optimize._step._cache_size() == before + 1
