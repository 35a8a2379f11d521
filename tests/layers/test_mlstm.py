"""mLSTM (xLSTM) layer: the parameter count, the block against a float64 per-token loop of
the paper's equations on the layer's own parameters, and huge input gates in float32. The
memory (ssmjax.scan.mlstm) is tested in tests/scan/test_mlstm.py."""


import jax
import jax.numpy as jnp
import numpy as np

import ssmjax.layers
import ssmjax.layers.linear_attention  # noqa: F401  (registers "mlstm")
from tests.layers.reference import causal_conv, dense, heads, layer_in_f64, layer_norm, param_count, silu, softplus

D, H = 16, 2


def mlstm_memory_oracle(q, k, v, i_pre, log_f, stabilised):
    """xLSTM's mLSTM memory per token: C_t = f C + i v k^T, n_t = f n + i k, keys scaled by
    dk^-1/2, h = C q / max(|n^T q|, 1); stabilised with m_t = max(log f_t + m_{t-1}, i~_t)."""
    b, T, nh, dk = q.shape
    C, n, m = np.zeros((b, nh, v.shape[-1], dk)), np.zeros((b, nh, dk)), np.zeros((b, nh))
    out = np.zeros(v.shape)
    for t in range(T):
        if stabilised:
            m_new = np.maximum(log_f[:, t] + m, i_pre[:, t])
            i_gate, f_gate, floor = np.exp(i_pre[:, t] - m_new), np.exp(log_f[:, t] + m - m_new), np.exp(-m_new)
            m = m_new
        else:
            i_gate, f_gate, floor = np.exp(i_pre[:, t]), np.exp(log_f[:, t]), 1.0
        k_t = k[:, t] * dk ** -0.5
        C = f_gate[..., None, None] * C + i_gate[..., None, None] * v[:, t, :, :, None] * k_t[:, :, None, :]
        n = f_gate[..., None] * n + i_gate[..., None] * k_t
        denominator = np.maximum(np.abs(np.sum(n * q[:, t], -1)), floor)
        out[:, t] = np.einsum("bhvk,bhk->bhv", C, q[:, t]) / denominator[..., None]
    return out


def mlstm_oracle(p, x, nh=H, stabilised=True, blocksize=4):
    up = dense(x, p["up_proj"]["kernel"])
    x_m, z = np.split(up, 2, axis=-1)
    x_c = silu(causal_conv(x_m, p["conv_w"], p["conv_b"]))

    def block_diagonal(u, w):
        return np.einsum("btnj,nji->btni", u.reshape(u.shape[:2] + (-1, blocksize)), w).reshape(u.shape)

    q, k, v = block_diagonal(x_c, p["q_blocks"]), block_diagonal(x_c, p["k_blocks"]), block_diagonal(x_m, p["v_blocks"])
    gates_in = np.concatenate([q, k, v], -1)
    i_pre = dense(gates_in, p["igate"]["kernel"], p["igate"]["bias"])
    log_f = -softplus(-dense(gates_in, p["fgate"]["kernel"], p["fgate"]["bias"]))
    h = mlstm_memory_oracle(heads(q, nh), heads(k, nh), heads(v, nh), i_pre, log_f, stabilised)
    h = layer_norm(h, heads(p["norm_weight"], nh)).reshape(x_c.shape) + p["skip"] * x_c
    return dense(h * silu(z), p["down_proj"]["kernel"])


# The default-config contract (float32 and float64) is tests/layers/test_contract.py.


def test_builds_with_d_model_alone_and_parameter_counts():
    layer = ssmjax.layers.get("mlstm", d_model=32)
    x = jnp.ones((1, 3, 32))
    assert jax.jit(layer.apply)(jax.jit(layer.init)(jax.random.PRNGKey(0), x), x).shape == x.shape
    d = D
    for expand, nh, k, bs in ((2, 2, 4, 4), (1, 4, 3, 2), (3, 1, 2, 8)):
        E = expand * d
        layer = ssmjax.layers.get("mlstm", d_model=d, num_heads=nh, expand=expand, conv_size=k, qkv_blocksize=bs)
        shapes = jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.ones((1, 3, d)))
        assert param_count(shapes) == 3 * d * E + (k + 1) * E + 3 * E * bs + 2 * E + 2 * nh * (3 * E + 1)


def test_initialisation():
    """xLSTM's gate init: zero gate weights, forget biases linspace(3, 6), input biases N(0, 0.1)."""
    layer = ssmjax.layers.get("mlstm", d_model=D, num_heads=4)
    p = jax.jit(layer.init)(jax.random.PRNGKey(0), jnp.ones((1, 2, D)))["params"]
    np.testing.assert_allclose(p["fgate"]["bias"], np.linspace(3.0, 6.0, 4), rtol=1e-6)
    assert not np.any(p["fgate"]["kernel"]) and not np.any(p["igate"]["kernel"])
    assert 0 < np.abs(p["igate"]["bias"]).max() < 0.5


def test_matches_float64_oracle():
    """Chunk 5 over 12 tokens == the paper's stabilised per-token loop == the unstabilised one."""
    _, params, x, y = layer_in_f64("mlstm", num_heads=H, chunk_size=5)
    np.testing.assert_allclose(y, mlstm_oracle(params["params"], x), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(y, mlstm_oracle(params["params"], x, stabilised=False), rtol=1e-9, atol=1e-10)


def test_float32_error_and_bfloat16():
    """float32 vs float64 on the same parameters (40 tokens, chunk 8): measured max relative
    error ~3e-7. bf16 activations keep a float32 memory."""
    layer = ssmjax.layers.get("mlstm", d_model=D, num_heads=H, chunk_size=8)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 40, D), jnp.float32)
    params = jax.jit(layer.init)(jax.random.PRNGKey(4), x)
    apply = jax.jit(layer.apply)
    y32, y64 = apply(params, x), apply(jax.tree.map(lambda a: a.astype(jnp.float64), params), x.astype(jnp.float64))
    assert float(jnp.max(jnp.abs(y32 - y64)) / jnp.max(jnp.abs(y64))) < 5e-6
    bf16 = ssmjax.layers.get("mlstm", d_model=D, num_heads=H, dtype=jnp.bfloat16)
    y, state = jax.jit(lambda p, x: bf16.apply(p, x, return_state=True))(params, x[:, :6].astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and bool(jnp.isfinite(y.astype(jnp.float32)).all())
    assert state["cell"].C.dtype == state["cell"].m.dtype == jnp.float32


# ----------------------------------------------------------------------------- stabiliser
def random_mlstm_inputs(seed, b=2, T=13, nh=2, dk=4, dv=3, i_scale=4.0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    q, k = (jax.random.normal(kk, (b, T, nh, dk), jnp.float64) for kk in keys[:2])
    v = jax.random.normal(keys[2], (b, T, nh, dv), jnp.float64)
    i_pre = i_scale * jax.random.normal(keys[3], (b, T, nh), jnp.float64)
    log_f = jax.nn.log_sigmoid(2.0 + 2.0 * jax.random.normal(keys[4], (b, T, nh), jnp.float64))
    return q, k, v, i_pre, log_f


# The memory itself (stabilised == unstabilised, split state, oracle): tests/scan/test_mlstm.py.


def test_mlstm_layer_survives_huge_input_gates_in_float32():
    """Input-gate pre-activations ~ +-100: exp overflows float32 (the unstabilised float32
    loop gives inf/nan), the stabilised float32 layer matches the float64 unstabilised
    equations and its gradients stay finite."""
    layer = ssmjax.layers.get("mlstm", d_model=D, num_heads=H, chunk_size=4)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, D), jnp.float32)
    params = jax.device_get(jax.jit(layer.init)(jax.random.PRNGKey(1), x))
    igate = params["params"]["igate"]
    igate["bias"] = igate["bias"] + 100.0
    igate["kernel"] = 2.0 * np.asarray(jax.random.normal(jax.random.PRNGKey(2), igate["kernel"].shape))
    with np.errstate(over="ignore", invalid="ignore"):
        q, k, v, i_pre, log_f = (np.asarray(a, np.float32) for a in random_mlstm_inputs(3, i_scale=100.0))
        assert not np.isfinite(mlstm_memory_oracle(q, k, v, i_pre, log_f, stabilised=False)).all()
    params = jax.tree.map(jnp.asarray, params)
    y = jax.jit(layer.apply)(params, x)
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    reference = mlstm_oracle(p64, np.asarray(x, np.float64), stabilised=False)
    assert np.isfinite(reference).all() and np.abs(dense(np.asarray(x, np.float64), p64["up_proj"]["kernel"])).max() > 0
    np.testing.assert_allclose(y, reference, rtol=2e-4, atol=2e-5 * np.abs(reference).max())
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2)))(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
