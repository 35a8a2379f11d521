"""The layer contract (docs/architecture.md), checked the same way for every registered mixer.

``check_contract(name, dtype=...)`` runs in float32 (tolerances of summation order) or in
float64 (the forms must agree to rounding: any float32 constant or cast inside the layer
shows up as a ~1e-7 error). The input is drawn in float32 and cast, and in float64 the
float32-initialised parameters are cast too, so both dtypes check the same function.

Every apply is compiled once (``jax.jit``): a layer's whole-sequence call, its two split
calls and its step each compile one program instead of dispatching op by op.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import ssmjax.layers

#: The dtypes every layer must follow; the default tolerances per dtype.
DTYPES = (jnp.float32, jnp.float64)
TOLERANCE = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.float64): 1e-10}


def cast_floats(tree, dtype):
    """Every real floating leaf of ``tree`` cast to ``dtype`` (ints and complex untouched)."""
    def cast(a):
        return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

    return jax.tree.map(cast, tree)


@functools.cache
def _float32_build(name: str, d_model: int, fields: tuple):
    layer = ssmjax.layers.get(name, d_model=d_model, **dict(fields))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, d_model), jnp.float32)
    return layer, jax.jit(layer.init)(jax.random.PRNGKey(1), x), x


def build(name: str, d_model: int = 16, dtype=jnp.float32, **fields):
    """``(layer, params, x)`` for a registered layer on a small random ``[2, 12, d_model]``
    input of ``dtype`` (parameters initialised in float32, then cast to ``dtype``).

    The float32 initialisation is cached per process (a compile of the layer's
    initialisers takes seconds): the float32 and float64 contracts of a layer share it.
    Fields must be hashable."""
    layer, params, x = _float32_build(name, d_model, tuple(sorted(fields.items())))
    return layer, cast_floats(params, dtype), x.astype(dtype)


def assert_trees_close(a, b, rtol, atol):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def assert_dtypes(name: str, tree, dtype) -> None:
    """No floating leaf of an output or state is less precise than ``dtype`` (a state may
    be wider, e.g. float32 accumulators for bf16 inputs, or complex of the same precision)."""
    for leaf in jax.tree.leaves(tree):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):  # finfo of a complex dtype: its parts
            assert jnp.finfo(leaf.dtype).bits >= jnp.finfo(dtype).bits, (
                f"{name}: a {leaf.dtype} leaf for a {jnp.dtype(dtype)} input")


def check_contract(name: str, *, dtype=jnp.float32, rtol=None, atol=None, split=6, **fields):
    """call over T == T steps; split call with carried state (from ``init_state``) == one
    call (``state=None``); the output keeps the input dtype and no state is less precise;
    jit works; grads finite (float32 only). Tolerances default to :data:`TOLERANCE` of
    ``dtype``."""
    tol = TOLERANCE[jnp.dtype(dtype)]
    rtol, atol = (tol if rtol is None else rtol), (tol if atol is None else atol)
    layer, params, x = build(name, dtype=dtype, **fields)
    call = jax.jit(lambda p, x, s: layer.apply(p, x, state=s, return_state=True))
    y, state = call(params, x, None)
    assert y.shape == x.shape, f"{name}: output {y.shape} != input {x.shape}"
    assert y.dtype == x.dtype, f"{name}: output {y.dtype} for a {x.dtype} input"
    assert_dtypes(name, state, dtype)
    y_steps, state_steps = ssmjax.layers.run_steps(layer, params, x)
    np.testing.assert_allclose(y_steps, y, rtol=rtol, atol=atol)
    assert_trees_close(state_steps, state, rtol, atol)
    # Two equal halves, the first from init_state: one compiled program serves both.
    start = layer.apply(params, x.shape[0], x.dtype, method="init_state")
    y1, mid = call(params, x[:, :split], start)
    y2, last = call(params, x[:, split:], mid)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y, rtol=rtol, atol=atol)
    assert_trees_close(last, state, rtol, atol)
    if jnp.dtype(dtype) == jnp.float32:  # the training dtype; float64 checks the forms only
        grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2)))(params)
        assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads)), f"{name}: non-finite grads"
    return layer, params, x
