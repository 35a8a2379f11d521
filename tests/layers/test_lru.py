"""LRU and the Hawk / RG-LRU recurrent block: contract, parameter counts, the LRU ring
initialisation, and float64 loops written from the papers' (and recurrentgemma's)
equations compared with the layers on their own parameters."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import ssmjax.layers
import ssmjax.layers.lru  # noqa: F401  (registers "lru", "rglru")

D = 16


def n_params(params):
    return sum(a.size for a in jax.tree.leaves(params))


def count(name, **fields):
    """Parameter count from shapes only (``eval_shape``: nothing is compiled)."""
    layer = ssmjax.layers.get(name, d_model=D, **fields)
    return n_params(jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.ones((1, 3, D))))


def as64(params):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)


def init(name, x, **fields):
    layer = ssmjax.layers.get(name, d_model=x.shape[-1], **fields)
    return layer, jax.jit(layer.init)(jax.random.PRNGKey(1), x)


def rand(shape, seed=0, dtype=jnp.float64):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


# The default-config contract (float32 and float64) is tests/layers/test_contract.py.


@pytest.mark.parametrize("bidirectional", [False, True])
def test_lru_parameter_count(bidirectional):
    n = 8
    dirs = 2 if bidirectional else 1
    assert count("lru", d_state=n, bidirectional=bidirectional) == dirs * (3 * n + 4 * n * D) + D
    assert count("lru") == 3 * 64 + 4 * 64 * D + D  # builds from d_model alone


def test_rglru_parameter_count():
    w, heads, k = 24, 3, 4
    assert count("rglru", lru_width=w, num_heads=heads) == 3 * D * w + 2 * w + (k + 1) * w + w + 2 * (
        w * w // heads + w) + D
    assert count("rglru") == 3 * D * D + 2 * D + 5 * D + D + 2 * (D * D // 4 + D) + D


def test_lru_ring_initialisation():
    r_min, r_max, max_phase = 0.4, 0.8, math.pi / 3
    _, params = init("lru", rand((1, 3, D)), d_state=512, r_min=r_min, r_max=r_max, max_phase=max_phase)
    p = params["params"]["forward"]
    lam = np.asarray(ssmjax.layers.lru.lru_eigenvalues(p["nu_log"], p["theta_log"]))
    assert np.all((np.abs(lam) >= r_min - 1e-6) & (np.abs(lam) <= r_max + 1e-6))
    assert np.all((np.angle(lam) >= 0) & (np.angle(lam) <= max_phase + 1e-6))
    # uniform in area: |lambda|^2 ~ U(r_min^2, r_max^2), so its mean is the midpoint
    assert abs(np.mean(np.abs(lam) ** 2) - (r_min**2 + r_max**2) / 2) < 0.03
    np.testing.assert_allclose(np.exp(p["gamma_log"]), np.sqrt(1 - np.abs(lam) ** 2), rtol=1e-5)


def lru_reference(p, x, bidirectional):
    """Per-token loop of h_t = lambda h_{t-1} + gamma B x_t, y = Re(C h) + D x (float64)."""
    x = np.asarray(x, np.float64)

    def direction(q, xs):
        lam = np.exp(-np.exp(q["nu_log"]) + 1j * np.exp(q["theta_log"]))
        B = (q["B_re"] + 1j * q["B_im"]) * np.exp(q["gamma_log"])[:, None]
        C = q["C_re"] + 1j * q["C_im"]
        h = np.zeros((xs.shape[0], lam.shape[0]), complex)
        ys = []
        for t in range(xs.shape[1]):
            h = lam * h + xs[:, t] @ B.T
            ys.append((h @ C.T).real)
        return np.stack(ys, 1), h

    p = jax.tree.map(np.asarray, p)
    y, h = direction(p["forward"], x)
    if bidirectional:
        y = y + direction(p["backward"], x[:, ::-1])[0][:, ::-1]
    return y + p["D"] * x, h


@pytest.mark.parametrize("bidirectional", [False, True])
def test_lru_matches_loop(bidirectional):
    x = rand((2, 11, D))
    layer, params = init("lru", x, d_state=8, bidirectional=bidirectional, r_min=0.5)
    params = as64(params)
    y_ref, h_ref = lru_reference(params["params"], x, bidirectional)
    np.testing.assert_allclose(jax.jit(layer.apply)(params, x), y_ref, rtol=1e-10, atol=1e-10)
    if not bidirectional:
        _, state = jax.jit(lambda p, x: layer.apply(p, x, return_state=True))(params, x)
        np.testing.assert_allclose(state["h"], h_ref, rtol=1e-10, atol=1e-10)
    else:
        with pytest.raises(ValueError, match="state"):
            layer.apply(params, x, return_state=True)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_lru_packed_documents_match_separate_loops(bidirectional):
    """``reset`` (and the equivalent ``segment_ids``): each document, in both directions,
    equals the float64 loop run on that document alone."""
    x = rand((2, 11, D), 4)
    layer, params = init("lru", x, d_state=8, bidirectional=bidirectional, r_min=0.5)
    params = as64(params)
    starts = [[0, 4, 9], [0, 6]]
    reset = np.zeros((2, 11), bool)
    for row, row_starts in enumerate(starts):
        reset[row, row_starts] = True
    segment_ids = np.cumsum(reset, axis=1)
    y = jax.jit(lambda p, x, r: layer.apply(p, x, reset=r))(params, x, jnp.asarray(reset))
    y_ids = jax.jit(lambda p, x, s: layer.apply(p, x, segment_ids=s))(params, x, jnp.asarray(segment_ids))
    for row, row_starts in enumerate(starts):
        for start, end in zip(row_starts, row_starts[1:] + [11]):
            want = lru_reference(params["params"], x[row:row + 1, start:end], bidirectional)[0]
            np.testing.assert_allclose(y[row:row + 1, start:end], want, rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(y_ids[row:row + 1, start:end], want, rtol=1e-10, atol=1e-10)


def test_lru_gradients_match_finite_differences():
    """Complex scan custom VJP through the layer: params and the carried state."""
    x = rand((1, 5, 4))
    layer, params = init("lru", x, d_state=3, r_min=0.5)
    params = as64(params)
    h0 = (rand((1, 3), 2) + 1j * rand((1, 3), 3)).astype(jnp.complex128)

    def loss(p, h_re):
        return jnp.sum(jnp.sin(layer.apply(p, x, state=dict(h=h_re + 1j * h0.imag))))

    check_grads(jax.jit(loss), (params, h0.real), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------ RG-LRU
def rglru_reference(p, x, segment_pos, c=8.0):
    """recurrentgemma's RecurrentBlock, written out in float64 numpy: document resets at
    ``segment_pos == 0`` (conv taps masked, state cut, no sqrt(1 - a^2) factor)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x = np.asarray(x, np.float64)
    b, t, _ = x.shape
    reset = segment_pos == 0

    def dense(q, v):
        return v @ q["kernel"] + q["bias"]

    def gelu(v):
        return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))

    def sigmoid(v):
        return 1 / (1 + np.exp(-v))

    def block_diag(q, v):
        h = q["w"].shape[0]
        vb = v.reshape(v.shape[:-1] + (h, -1))
        return (np.einsum("...hi,hij->...hj", vb, q["w"]) + q["b"]).reshape(v.shape)

    y_branch = gelu(dense(p["linear_y"], x))
    u = dense(p["linear_x"], x)
    k = p["conv_w"].shape[0]
    conv = np.zeros_like(u) + p["conv_b"]
    for i in range(t):
        for shift in range(min(k, i + 1)):
            # tap i - shift is visible if no document starts in (i - shift, i]
            visible = ~reset[:, i - shift + 1 : i + 1].any(axis=1)
            conv[:, i] += visible[:, None] * u[:, i - shift] * p["conv_w"][k - 1 - shift]
    q = p["rg_lru"]
    h = np.zeros((b, u.shape[-1]))
    hs = []
    for i in range(t):
        gate_x = sigmoid(block_diag(q["input_gate"], conv[:, i]))
        gate_a = sigmoid(block_diag(q["a_gate"], conv[:, i]))
        log_a = -c * gate_a * np.log1p(np.exp(q["a_param"]))
        a = np.exp(log_a)
        mult = np.where(reset[:, i, None], 1.0, np.sqrt(1 - a**2))
        h = np.where(reset[:, i, None], 0.0, a * h) + mult * gate_x * conv[:, i]
        hs.append(h)
    return dense(p["linear_out"], np.stack(hs, 1) * y_branch)


def segment_positions(segment_ids):
    ids = np.asarray(segment_ids)
    pos = np.zeros_like(ids)
    for i in range(1, ids.shape[1]):
        pos[:, i] = np.where(ids[:, i] == ids[:, i - 1], pos[:, i - 1] + 1, 0)
    return pos


def test_rglru_matches_recurrentgemma_equations():
    x = rand((2, 13, D))
    layer, params = init("rglru", x, lru_width=24, num_heads=3)
    params = as64(params)
    apply = jax.jit(layer.apply)  # keyword arrays (segment_ids=, reset=) are traced too
    y = apply(params, x)
    fresh = segment_positions(np.zeros((2, 13), int))
    np.testing.assert_allclose(y, rglru_reference(params["params"], x, fresh), rtol=1e-10, atol=1e-10)
    segment_ids = jnp.array([[0] * 4 + [1] * 6 + [2] * 3, [5] * 13])
    y_packed = apply(params, x, segment_ids=segment_ids)
    np.testing.assert_allclose(y_packed, rglru_reference(params["params"], x, segment_positions(segment_ids)),
                               rtol=1e-10, atol=1e-10)
    # packed == each document on its own (state and conv taps never cross)
    np.testing.assert_allclose(y_packed[0, 4:10], apply(params, x[:1, 4:10])[0], rtol=1e-10, atol=1e-10)
    # reset= marks the same starts
    reset = jnp.asarray(segment_positions(segment_ids) == 0)
    np.testing.assert_allclose(apply(params, x, reset=reset), y_packed, rtol=1e-12, atol=1e-12)


def test_rglru_first_token_is_a_document_start():
    """No sqrt(1 - a^2) at the first token of a fresh state; a carried state continues."""
    x = rand((1, 6, D))
    layer, params = init("rglru", x)
    state = layer.apply(params, 1, jnp.float64, method="init_state")
    assert bool(state["start"][0])
    call = jax.jit(lambda p, x, s: layer.apply(p, x, state=s, return_state=True))
    _, after = call(params, x[:, :3], None)
    assert not bool(after["start"][0])
    full = rglru_reference(params["params"], x, np.arange(6)[None])
    y_rest, _ = call(params, x[:, 3:], after)
    np.testing.assert_allclose(y_rest, full[:, 3:], rtol=1e-10, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lru", "rglru"])
def test_bf16_activations_keep_fp32_state(name):
    x = rand((2, 7, D), dtype=jnp.float32)
    layer, params = init(name, x, dtype=jnp.bfloat16)
    y, state = layer.apply(params, x.astype(jnp.bfloat16), return_state=True)
    assert y.dtype == jnp.bfloat16
    assert state["h"].dtype in (jnp.float32, jnp.complex64)
    y32 = ssmjax.layers.get(name, d_model=D).apply(params, x)
    err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - y32)) / jnp.max(jnp.abs(y32)))
    assert err < 0.03, err  # bf16 roundings (2^-8) of O(1) activations; measured 2.6e-3 lru, 1.0e-2 rglru


def test_bad_input_and_options():
    layer, params = init("lru", rand((1, 3, D)))
    with pytest.raises(ValueError, match="x"):
        layer.apply(params, jnp.ones((1, 3, D + 1)))
    with pytest.raises(ValueError, match="num_heads"):
        init("rglru", rand((1, 3, 10)), num_heads=4)
    layer, params = init("lru", rand((1, 3, D)), bidirectional=True)
    state = dict(h=jnp.zeros((1, 64), jnp.complex128))
    with pytest.raises(ValueError, match="bidirectional"):
        layer.apply(params, jnp.ones((1, D)), state, method="step")


@pytest.mark.parametrize("name", ["lru", "rglru"])
def test_float32_error_vs_float64_loop(name):
    """float32 layer vs the float64 loop over 64 tokens: |a| < 1 everywhere, so the error
    stays at a few float32 roundings of O(1) activations (measured 5e-7 lru, 2.4e-7 rglru)."""
    x = rand((2, 64, D))
    layer = ssmjax.layers.get(name, d_model=D)
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x[:, :2].astype(jnp.float32))
    y32 = jax.jit(layer.apply)(params, x.astype(jnp.float32))
    if name == "lru":
        y_ref = lru_reference(params["params"], x, False)[0]
    else:
        y_ref = rglru_reference(params["params"], x, np.broadcast_to(np.arange(64), (2, 64)))
    err = np.max(np.abs(np.asarray(y32, np.float64) - y_ref)) / np.max(np.abs(y_ref))
    assert y32.dtype == jnp.float32 and err < 1e-5, err
