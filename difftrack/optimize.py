"""One L-BFGS driver (optax) shared by every fit: a jitted step, a plain Python loop.

The step is compiled once per (loss, static layout, argument shapes): repeated fits of
the same stack, and later rounds of ``refine``, reuse the compiled step.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

_LBFGS = optax.lbfgs()


@partial(jax.jit, static_argnames=("loss", "static"))
def _step(free, state, args, *, loss, static):
    fn = lambda f: loss(f, *args, static=static)  # noqa: E731
    value, grad = optax.value_and_grad_from_state(fn)(free, state=state)
    updates, state = _LBFGS.update(grad, state, free, value=value, grad=grad, value_fn=fn)
    return optax.apply_updates(free, updates), state, value


def _max_change(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def minimize(loss, free, args, *, static, steps=200, tol=1e-7, xtol=None, window=5,
             progress=None, what="fit"):
    """Minimise ``loss(free, *args, static=static)`` over the pytree ``free``.

    ``loss`` must be a module-level function (it is a static argument of the jitted step)
    and ``static`` hashable. Stops after ``steps``, when the relative change of the loss
    falls below ``tol``, or (``xtol`` given) when no element of ``free`` has changed by
    more than ``xtol`` over the last ``window`` steps (meaningful where ``free`` is in
    units of its own uncertainty). Returns (free, history). Raises FloatingPointError
    when the loss becomes NaN/Inf, naming ``what``.
    """
    # optax's init leaves some scalars of the line search's info weakly typed and the
    # first step returns them strongly typed: cast once, or every fit compiles its step
    # twice (jax_explain_cache_misses).
    state = jax.tree.map(lambda x: x.astype(x.dtype), _LBFGS.init(free))
    history = []
    prev = np.inf
    mark = free
    for i in range(steps):
        new, state, value = _step(free, state, args, loss=loss, static=static)
        v = float(value)
        if not np.isfinite(v):
            raise FloatingPointError(f"the {what} diverged at step {i} (loss {v})")
        free = new
        history.append(v)
        if progress is not None:
            progress(i, v)
        if abs(prev - v) <= tol * max(abs(v), 1e-12) and i > 10:
            break
        prev = v
        if xtol is not None and (i + 1) % window == 0:
            if _max_change(free, mark) <= xtol:
                break
            mark = free
    return free, history
