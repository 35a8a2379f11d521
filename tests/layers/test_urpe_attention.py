"""URPE attention: the layer equals ``(softmax(QK^T/sqrt(d) + B) ⊙ C) V`` built from the
explicit matrices in float64; ``urpe=False`` is RPE attention (C = 1); the contract in its
variants; RPE maps identical tokens to identical outputs, URPE does not (the paper's point)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax.layers
import ssmjax.layers.urpe_attention  # noqa: F401  (registers "urpe_attention")
from tests.layers.contract import check_contract

D, H, MAX_LEN = 16, 4, 16


def _random_tables(params, key):
    """Replace the zero bias / unit Toeplitz initial tables by random ones (so the test sees them)."""
    p = jax.tree.map(lambda a: a, params)
    inner = dict(p["params"])
    k1, k2 = jax.random.split(key)
    inner["rel_bias"] = jax.random.normal(k1, inner["rel_bias"].shape, inner["rel_bias"].dtype)
    if "toeplitz" in inner:
        inner["toeplitz"] = 1.0 + jax.random.normal(k2, inner["toeplitz"].shape, inner["toeplitz"].dtype)
    return {"params": inner}


def reference(params, x, bidirectional):
    """Per head: ``B_ij = b_{j-i}``, ``C_ij = c_{j-i}`` written out, ``A = softmax(QK^T/sqrt(d) + B)``
    row by row over the visible keys, ``O = (A ⊙ C) V``, ``y = O W_o``. Also returns ``A`` and ``C``."""
    p = {k: np.asarray(v["kernel"] if isinstance(v, dict) else v, np.float64) for k, v in params["params"].items()}
    x = np.asarray(x, np.float64)
    b, t, _ = x.shape
    q = np.einsum("btd,dhe->bhte", x, p["q_proj"])
    k = np.einsum("btd,dhe->bhte", x, p["k_proj"])
    v = np.einsum("btd,dhe->bhte", x, p["v_proj"])
    bias = np.zeros((H, t, t))
    toeplitz = np.ones((H, t, t))
    for i in range(t):
        for j in range(t):
            bias[:, i, j] = p["rel_bias"][:, j - i + MAX_LEN - 1]
            if "toeplitz" in p:
                toeplitz[:, i, j] = p["toeplitz"][:, j - i + MAX_LEN - 1]
    logits = np.einsum("bhie,bhje->bhij", q, k) / np.sqrt(D // H) + bias
    probs = np.zeros_like(logits)
    for i in range(t):
        hi = t if bidirectional else i + 1
        w = np.exp(logits[..., i, :hi] - logits[..., i, :hi].max(-1, keepdims=True))
        probs[..., i, :hi] = w / w.sum(-1, keepdims=True)
    out = np.einsum("bhij,bhje->bihe", probs * toeplitz, v)
    return np.einsum("bthe,hed->btd", out, p["out_proj"]), probs, toeplitz


def _layer_and_params(dtype=jnp.float64, t=9, **fields):
    layer = ssmjax.layers.get("urpe_attention", d_model=D, num_heads=H, max_len=MAX_LEN, **fields)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, t, D), jnp.float32).astype(dtype)
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
    params = jax.tree.map(lambda a: a.astype(dtype), _random_tables(params, jax.random.PRNGKey(2)))
    return layer, params, x


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("urpe", [True, False])
def test_matches_explicit_matrices_float64(bidirectional, urpe):
    layer, params, x = _layer_and_params(urpe=urpe, bidirectional=bidirectional)
    y_ref, probs, toeplitz = reference(params, x, bidirectional)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-12)  # A is row-stochastic
    if not bidirectional:
        assert np.all(np.triu(probs, 1) == 0)  # causal: no weight above the diagonal
    if not urpe:
        assert "toeplitz" not in params["params"] and np.all(toeplitz == 1)
    np.testing.assert_allclose(jax.jit(layer.apply)(params, x), y_ref, rtol=1e-11, atol=1e-11)


def test_cache_path_matches_explicit_matrices_float64():
    layer, params, x = _layer_and_params()
    y_ref, _, _ = reference(params, x, False)
    y, state = jax.jit(lambda p, x: layer.apply(p, x, return_state=True))(params, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-11, atol=1e-11)
    assert int(state["pos"]) == x.shape[1]


@pytest.mark.parametrize("fields", [dict(urpe=False), dict(num_heads=2)])
def test_contract_variants(fields):
    check_contract("urpe_attention", max_len=32, **fields)


def test_contract_random_tables_float64():
    """The default contract starts from C = 1, B = 0: check the step and split forms with
    random tables too, in float64 (the forms must agree to rounding)."""
    layer, params, x = _layer_and_params(t=12)
    call = jax.jit(lambda p, x, s: layer.apply(p, x, state=s, return_state=True))
    y, state = call(params, x, None)
    y_steps, _ = ssmjax.layers.run_steps(layer, params, x)
    np.testing.assert_allclose(y_steps, y, rtol=1e-10, atol=1e-10)
    y1, mid = call(params, x[:, :5], None)
    y2, last = call(params, x[:, 5:], mid)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_rpe_cannot_tell_identical_tokens_apart_urpe_can(bidirectional):
    """Luo et al.'s argument: a row-stochastic attention maps a constant sequence to a constant
    sequence whatever the relative bias; the Toeplitz factor breaks that."""
    x = jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(3), (1, 1, D), jnp.float64), (1, 8, D))
    outputs = {}
    for urpe in (False, True):
        layer, params, _ = _layer_and_params(urpe=urpe, bidirectional=bidirectional)
        outputs[urpe] = np.asarray(layer.apply(params, x))
    np.testing.assert_allclose(outputs[False], np.broadcast_to(outputs[False][:, :1], outputs[False].shape), atol=1e-12)
    assert np.ptp(outputs[True], axis=1).max() > 1e-3


def test_errors_name_the_argument():
    layer = ssmjax.layers.get("urpe_attention", d_model=D, num_heads=H, max_len=4)
    x = jnp.zeros((1, 5, D))
    with pytest.raises(ValueError, match="x: expected at most max_len"):
        layer.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="x: "):
        layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 3, D + 1)))
    with pytest.raises(ValueError, match="num_heads"):
        ssmjax.layers.get("urpe_attention", d_model=D, num_heads=3).init(jax.random.PRNGKey(0), jnp.zeros((1, 3, D)))
    bidirectional = ssmjax.layers.get("urpe_attention", d_model=D, num_heads=H, max_len=8, bidirectional=True)
    params = bidirectional.init(jax.random.PRNGKey(0), jnp.zeros((1, 3, D)))
    with pytest.raises(ValueError, match="state"):
        bidirectional.apply(params, jnp.zeros((1, 3, D)), return_state=True)
