"""S5: the layer contract, parameter count, the HiPPO-N initialisation (blocks, conjugate
symmetry, V^-1 B and C V), and a float64 per-token loop of the paper's equations compared
with the layer on its own parameters (ZOH / bilinear, activations, bidirectional)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax.layers
import ssmjax.layers.s5  # noqa: F401  (registers "s5")
from ssmjax.layers import hippo
from tests.layers.contract import check_contract

D, P = 16, 8


def count(**fields):
    layer = ssmjax.layers.get("s5", d_model=D, **fields)
    params = jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.ones((1, 3, D)))
    return sum(a.size for a in jax.tree.leaves(params))


def rand(shape, seed=0, dtype=jnp.float64):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


def cplx(p):
    p = np.asarray(p, np.float64)
    return p[..., 0] + 1j * p[..., 1]


# The default-config contract (float32 and float64) is tests/layers/test_contract.py.


def test_contract_bilinear_blocks_full_glu():
    check_contract("s5", d_state=P, blocks=2, discretization="bilinear", activation="full_glu")


def test_builds_from_d_model_alone():
    layer = ssmjax.layers.get("s5", d_model=D)
    x = rand((2, 5, D), dtype=jnp.float32)
    y = jax.jit(lambda x: layer.apply(layer.init(jax.random.PRNGKey(0), x), x))(x)
    assert y.shape == x.shape and y.dtype == jnp.float32 and bool(jnp.isfinite(y).all())


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize(("activation", "extra"), [("gelu", 0), ("half_glu1", 1), ("half_glu2", 1), ("full_glu", 2)])
def test_parameter_count(bidirectional, activation, extra):
    c = 2 if bidirectional else 1
    expected = 3 * P // 2 + (1 + c) * P * D + D + extra * (D * D + D)
    assert count(d_state=P, bidirectional=bidirectional, activation=activation) == expected
    assert count() == 3 * 64 // 2 + 2 * 64 * D + D + D * D + D  # defaults: P = 64, half_glu1


def test_eigenvalues_from_hippo_n():
    """Lambda = the Im > 0 eigenvalues of HiPPO-N of each block (blocks = 2), and B = V^-1 B0
    for a real LeCun-normal B0 [P, H] (recovered as 2 Re(V B) since V's columns and their
    conjugates form a unitary basis)."""
    x = rand((1, 3, D))
    layer = ssmjax.layers.get("s5", d_model=D, d_state=P, blocks=2, param_dtype=jnp.float64)
    p = jax.jit(layer.init)(jax.random.PRNGKey(0), x)["params"]
    Lambda = np.asarray(p["Lambda_re"]) + 1j * np.asarray(p["Lambda_im"])
    eig = np.linalg.eigvals(hippo.hippo_n(P // 2))
    block = np.sort(eig.imag[eig.imag > 0])
    assert Lambda.shape == (P // 2,)
    np.testing.assert_allclose(np.sort(Lambda.imag), np.sort(np.tile(block, 2)), atol=1e-10)
    np.testing.assert_allclose(Lambda.real, -0.5, atol=1e-12)
    _, V, _ = hippo.s5_hippo_n_init(P, 2)
    B0 = 2 * (V @ cplx(p["B"])).real
    assert np.std(B0) == pytest.approx(1 / math.sqrt(P), rel=0.3)  # LeCun normal, fan_in = P
    assert np.abs(B0).max() <= 2 / math.sqrt(P) / 0.87962566 + 1e-9  # truncated at 2 std


def s5_reference(p, x, discretization, activation, bidirectional):
    """x_t = Lambdabar x_{t-1} + Bbar u_t, y_t = 2 Re(C x_t) + D u_t, then the activation."""
    x = np.asarray(x, np.float64)
    Lambda = np.asarray(p["Lambda_re"]) + 1j * np.asarray(p["Lambda_im"])
    B, C = cplx(p["B"]), cplx(p["C"])
    step = np.exp(np.asarray(p["log_step"]))
    if discretization == "zoh":
        A_bar = np.exp(step * Lambda)
        B_bar = ((A_bar - 1) / Lambda)[:, None] * B
    else:
        A_bar = (1 + step * Lambda / 2) / (1 - step * Lambda / 2)
        B_bar = (step / (1 - step * Lambda / 2))[:, None] * B
    b, t, h = x.shape
    y = np.zeros_like(x)
    state = np.zeros((b, len(Lambda)), complex)
    for s in range(t):
        state = A_bar * state + x[:, s] @ B_bar.T
        y[:, s] = 2 * (state @ C[0].T).real
    if bidirectional:
        state = np.zeros((b, len(Lambda)), complex)
        for s in reversed(range(t)):
            state = A_bar * state + x[:, s] @ B_bar.T
            y[:, s] += 2 * (state @ C[1].T).real
    y = y + np.asarray(p["D"]) * x

    def gelu(v):  # flax / jax default: the tanh approximation
        return 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))

    def dense(name, v):
        return v @ np.asarray(p[name]["kernel"]) + np.asarray(p[name]["bias"])

    def sigmoid(v):
        return 1 / (1 + np.exp(-v))

    g = gelu(y)
    if activation == "half_glu1":
        return g * sigmoid(dense("out2", g))
    if activation == "half_glu2":
        return y * sigmoid(dense("out2", g))
    if activation == "full_glu":
        return dense("out1", g) * sigmoid(dense("out2", g))
    return g


@pytest.mark.parametrize(
    ("discretization", "activation", "bidirectional", "blocks"),
    [("zoh", "half_glu1", False, 1), ("bilinear", "half_glu2", True, 2), ("zoh", "full_glu", True, 1),
     ("zoh", "gelu", False, 2)],
)
def test_matches_float64_recurrence(discretization, activation, bidirectional, blocks):
    x = rand((2, 13, D))
    layer = ssmjax.layers.get("s5", d_model=D, d_state=P, blocks=blocks, discretization=discretization,
                              activation=activation, bidirectional=bidirectional, param_dtype=jnp.float64)
    params = jax.jit(layer.init)(jax.random.PRNGKey(2), x)
    expected = s5_reference(params["params"], x, discretization, activation, bidirectional)
    np.testing.assert_allclose(jax.jit(layer.apply)(params, x), expected, rtol=1e-10, atol=1e-11)


def test_bidirectional_sees_the_future_and_causal_does_not():
    x = rand((1, 10, D), dtype=jnp.float32)
    x_changed = x.at[:, -1].add(1.0)
    for bidirectional in (False, True):
        layer = ssmjax.layers.get("s5", d_model=D, d_state=P, bidirectional=bidirectional)
        params = jax.jit(layer.init)(jax.random.PRNGKey(0), x)
        apply = jax.jit(layer.apply)
        delta = np.abs(apply(params, x_changed)[:, :-1] - apply(params, x)[:, :-1]).max()
        assert (delta > 1e-3) if bidirectional else (delta == 0.0)
    with pytest.raises(ValueError, match="state"):
        layer.apply(params, x, return_state=True)
    with pytest.raises(ValueError, match="state"):
        layer.apply(params, x[:, 0], layer.init_state(1), method="step")


def test_jit_vmap_grad_and_bad_input():
    x = rand((2, 9, D), dtype=jnp.float32)
    layer = ssmjax.layers.get("s5", d_model=D, d_state=P)
    params = jax.jit(layer.init)(jax.random.PRNGKey(0), x)
    xs = jnp.stack([x, -x])
    ys = jax.jit(jax.vmap(lambda v: layer.apply(params, v)))(xs)
    np.testing.assert_allclose(ys[1], jax.jit(layer.apply)(params, -x), rtol=1e-5, atol=1e-6)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2)))(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    with pytest.raises(ValueError, match="x"):
        layer.apply(params, x[..., :3])
    with pytest.raises(ValueError, match="^activation: expected one of"):
        ssmjax.layers.get("s5", d_model=D, activation="relu").init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="^discretization: expected one of"):
        ssmjax.layers.get("s5", d_model=D, discretization="euler").init(jax.random.PRNGKey(0), x)
