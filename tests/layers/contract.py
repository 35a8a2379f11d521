"""The layer contract of DESIGN.md, checked the same way for every registered mixer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import ssmjax.layers


def build(name: str, d_model: int = 16, **fields):
    """``(layer, params, x)`` for a registered layer on a small random float32 input."""
    layer = ssmjax.layers.get(name, d_model=d_model, **fields)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, d_model), jnp.float32)
    params = layer.init(jax.random.PRNGKey(1), x)
    return layer, params, x


def run_steps(layer, params, x):
    """``T`` calls of ``step`` from ``init_state``: outputs ``[b, t, d]`` and the last state."""
    state = layer.apply(params, x.shape[0], x.dtype, method="init_state")
    step = jax.jit(lambda p, x_t, s: layer.apply(p, x_t, s, method="step"))  # compiled once, not op by op
    ys = []
    for t in range(x.shape[1]):
        y, state = step(params, x[:, t], state)
        ys.append(y)
    return jnp.stack(ys, 1), state


def assert_trees_close(a, b, rtol, atol):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def check_contract(name: str, *, rtol=2e-5, atol=2e-5, split=5, **fields):
    """call over T == T steps; split call with carried state == one call; grads finite;
    jit works. float32 tolerances: the forms differ only in summation order."""
    layer, params, x = build(name, **fields)
    y, state = layer.apply(params, x, return_state=True)
    assert y.shape == x.shape, f"{name}: output {y.shape} != input {x.shape}"
    y_steps, state_steps = run_steps(layer, params, x)
    np.testing.assert_allclose(y_steps, y, rtol=rtol, atol=atol)
    assert_trees_close(state_steps, state, rtol, atol)
    y1, mid = layer.apply(params, x[:, :split], return_state=True)
    y2, last = layer.apply(params, x[:, split:], state=mid, return_state=True)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y, rtol=rtol, atol=atol)
    assert_trees_close(last, state, rtol, atol)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2)))(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads)), f"{name}: non-finite grads"
    return layer, params, x
