"""LongVQ: the quantiser (nearest code, straight-through gradient, the losses by hand), the
EMA codebook update by hand, the codebook attention's forms against the quadratic
definition, the layer against a float64 loop of its equations, the EMA option's
statistics, and the contract for its variants (the defaults: test_contract.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax.layers
from ssmjax.layers import longvq  # noqa: F401  (registers "longvq")
from ssmjax.scan import vq
from tests.layers.contract import check_contract

D = 8


def test_nearest_code_and_straight_through_estimator():
    C = jnp.array([[1.0, 1.0], [0.0, 0.0], [-1.0, -1.0]])
    x = jnp.array([[1.0, 2.0], [0.0, -0.8], [-3.0, -0.5]])
    result = vq.vector_quantize(x, C)
    brute = np.argmin(((np.asarray(x)[:, None] - np.asarray(C)[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(result.codes, brute)
    np.testing.assert_array_equal(result.codes, [0, 1, 2])
    np.testing.assert_allclose(result.quantized, C[result.codes])
    # d x_hat / d x is the identity (the straight-through estimator)
    jac = jax.jacobian(lambda x: vq.vector_quantize(x, C).quantized)(x)
    np.testing.assert_allclose(jac.reshape(6, 6), np.eye(6))


def test_losses_by_hand():
    C = jnp.array([[1.0, 1.0], [0.0, 0.0]])
    x = jnp.array([[1.0, 2.0], [0.0, -0.8]])  # codes 0, 1; squared errors 1 and 0.64
    result = vq.vector_quantize(x, C)
    assert float(result.commitment_loss) == pytest.approx((1.0 + 0.64) / 2)
    assert float(result.codebook_loss) == pytest.approx((1.0 + 0.64) / 2)
    # commitment: gradient to x only, (2 / N)(x - C_z); codebook loss: to C only
    gx = jax.grad(lambda x: vq.vector_quantize(x, C).commitment_loss)(x)
    np.testing.assert_allclose(gx, [[0.0, 1.0], [0.0, -0.8]])
    gC = jax.grad(lambda C: vq.vector_quantize(x, C).codebook_loss)(C)
    np.testing.assert_allclose(gC, [[0.0, -1.0], [0.0, 0.8]])
    assert float(jnp.abs(jax.grad(lambda C: vq.vector_quantize(x, C).commitment_loss)(C)).sum()) == 0.0


def test_ema_update_by_hand():
    stats = dict(cluster_size=jnp.array([1.0, 1.0]), embed_sum=jnp.array([[0.5], [-0.5]]))
    x = jnp.array([[1.0], [3.0], [-2.0]])
    new = vq.ema_codebook_update(stats, x, jnp.array([0, 0, 1]), decay=0.9)
    # n = [2, 1], s = [4, -2]: N = 0.9 [1, 1] + 0.1 [2, 1], M = 0.9 [.5, -.5] + 0.1 [4, -2]
    np.testing.assert_allclose(new["cluster_size"], [1.1, 1.0])
    np.testing.assert_allclose(new["embed_sum"], [[0.85], [-0.65]])
    np.testing.assert_allclose(vq.codebook_from_ema(new, eps=0.0), [[0.85 / 1.1], [-0.65]])
    eps = 0.1  # Laplace smoothing: (N + eps) / (sum N + K eps) * sum N
    smoothed = (np.array([1.1, 1.0]) + eps) / (2.1 + 2 * eps) * 2.1
    np.testing.assert_allclose(vq.codebook_from_ema(new, eps=eps)[:, 0], np.array([0.85, -0.65]) / smoothed)
    masked = vq.ema_codebook_update(stats, x, jnp.array([0, 0, 1]), decay=0.9, weights=jnp.array([1.0, 0.0, 1.0]))
    np.testing.assert_allclose(masked["embed_sum"], [[0.55], [-0.65]])


def attention_reference(q, codes, C, v, U0, L0):
    """o_t = (sum_c exp(q_t C_c) U0[c] + sum_{s<=t} exp(q_t k_s) v_s) / (same with L0, 1)."""
    q, C, v, U0, L0 = (np.asarray(a, np.float64) for a in (q, C, v, U0, L0))
    k = C[np.asarray(codes)]
    b, t, _ = q.shape
    out = np.zeros((b, t, v.shape[-1]))
    for i in range(b):
        for s in range(t):
            w_past = np.exp(q[i, s] @ C.T)
            w_here = np.exp(k[i, : s + 1] @ q[i, s])
            num = w_past @ U0[i] + w_here @ v[i, : s + 1]
            out[i, s] = num / (w_past @ L0[i] + w_here.sum())
    onehot = np.eye(C.shape[0])[np.asarray(codes)]
    return out, U0 + np.einsum("btk,btv->bkv", onehot, v), L0 + onehot.sum(1)


@pytest.mark.parametrize("method,chunk", [("sequential", 4), ("chunked", 3), ("chunked", 7), ("quadratic", 4)])
def test_codebook_attention_forms_match_the_definition(method, chunk):
    b, t, dk, dv, K = 2, 7, 3, 2, 5
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    q = jax.random.normal(keys[0], (b, t, dk), jnp.float64)
    C = jax.random.normal(keys[1], (K, dk), jnp.float64)
    codes = jax.random.randint(keys[2], (b, t), 0, K)
    v = jax.random.normal(keys[3], (b, t, dv), jnp.float64)
    U0 = jax.random.normal(keys[4], (b, K, dv), jnp.float64)
    L0 = jax.random.randint(keys[5], (b, K), 0, 3).astype(jnp.float64)
    o, state = vq.codebook_attention(q, C[codes], v, codes, C, initial_state=vq.CodebookAttentionState(U0, L0),
                                     method=method, chunk_size=chunk)
    o_ref, U_ref, L_ref = attention_reference(q, codes, C, v, U0, L0)
    np.testing.assert_allclose(o, o_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state.value_sums, U_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state.counts, L_ref, rtol=1e-12, atol=1e-12)


def test_codebook_attention_checks_shapes():
    q = jnp.zeros((1, 4, 3))
    C = jnp.zeros((5, 3))
    codes = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="codebook"):
        vq.codebook_attention(q, q, q, codes, jnp.zeros((5, 2)))
    with pytest.raises(ValueError, match="codes"):
        vq.codebook_attention(q, q, q, codes[:, :2], C)
    with pytest.raises(ValueError, match="method"):
        vq.codebook_attention(q, q, q, codes, C, method="fft")
    with pytest.raises(ValueError, match="codebook"):
        vq.vector_quantize(q, jnp.zeros((5, 2)))


def longvq_reference(p, x, chunk_free=True):
    """The layer's equations as a float64 token loop: Mega's damped EMA, the gates, VQ of
    the keys (nearest code), causal softmax over the quantised keys of all earlier tokens."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)["params"]
    x = np.asarray(x, np.float64)
    sig = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
    silu = lambda a: a * sig(a)  # noqa: E731
    lin = lambda name, a: a @ p[name]["kernel"] + p[name].get("bias", 0.0)  # noqa: E731
    alpha, delta = sig(p["ema"]["alpha"]), sig(p["ema"]["delta"])
    h = alpha.shape[-1]
    b, t, d = x.shape
    s = np.zeros((b, d, h))
    ema = np.zeros_like(x)
    for i in range(t):
        s = alpha * p["ema"]["beta"] * x[:, i, :, None] + (1 - alpha * delta) * s
        ema[:, i] = (s * p["ema"]["eta"]).sum(-1) / np.sqrt(h)
    xp = silu(ema + p["omega"] * x)
    z = silu(lin("W_z", xp))
    q = p["qk_scale"][0] * z + p["qk_bias"][0]
    k = p["qk_scale"][1] * z + p["qk_bias"][1]
    v = silu(lin("W_v", x))
    C = p["codebook"]
    codes = np.argmin(((k[..., None, :] - C) ** 2).sum(-1), -1)
    k_hat = C[codes]
    o = np.zeros((b, t, v.shape[-1]))
    for i in range(t):
        logits = np.einsum("bd,bsd->bs", q[:, i], k_hat[:, : i + 1]) / np.sqrt(z.shape[-1])
        w = np.exp(logits - logits.max(-1, keepdims=True))
        o[:, i] = np.einsum("bs,bsv->bv", w / w.sum(-1, keepdims=True), v[:, : i + 1])
    gates = lin("W_gates", xp)
    dv = v.shape[-1]
    gamma, phi = silu(gates[..., :dv]), sig(gates[..., dv:])
    hidden = silu(lin("W_h", xp) + (gamma * o) @ p["U_h"]["kernel"])
    commitment = ((k - k_hat) ** 2).sum(-1).mean()
    return phi * hidden + (1 - phi) * x, commitment


def build(**fields):
    layer = ssmjax.layers.get("longvq", d_model=D, **fields)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 10, D), jnp.float32)
    params = jax.jit(layer.init)(jax.random.PRNGKey(4), x)
    return layer, params, x


@pytest.mark.parametrize("method", ["chunked", "sequential"])
def test_layer_matches_float64_oracle(method):
    layer, params, x = build(codebook_size=6, chunk_size=4, method=method)
    p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    y, sown = jax.jit(lambda p, x: layer.apply(p, x, mutable=["intermediates"]))(p64, x.astype(jnp.float64))
    y_ref, commitment = longvq_reference(p64, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)
    inter = sown["intermediates"]
    assert float(inter["commitment_loss"][0]) == pytest.approx(commitment, rel=1e-10)
    assert float(inter["vq_loss"][0]) == pytest.approx(1.25 * commitment, rel=1e-10)  # codebook = commitment value


def test_contract_variants():  # several chunks (and a padded one) with the EMA codebook
    check_contract("longvq", codebook_update="ema", chunk_size=5, codebook_size=8)


def test_gradients_reach_keys_and_codebook():
    layer, params, x = build(codebook_size=6, chunk_size=4)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2)))(params)["params"]
    assert float(jnp.abs(grads["codebook"]).sum()) > 0  # across chunks
    assert float(jnp.abs(grads["qk_scale"][1]).sum()) > 0  # the key scale: straight-through inside a chunk


def test_ema_codebook_updates_only_when_training_and_mutable():
    layer, variables, x = build(codebook_size=6, codebook_update="ema")
    assert "codebook" not in variables["params"] and set(variables["vq_stats"]) == {"cluster_size", "embed_sum"}
    _, frozen = layer.apply(variables, x, mutable=["vq_stats"])  # deterministic=True: no update
    jax.tree.map(np.testing.assert_array_equal, frozen["vq_stats"], variables["vq_stats"])
    train = ssmjax.layers.get("longvq", d_model=D, codebook_size=6, codebook_update="ema", deterministic=False)
    _, updated = train.apply(variables, x, mutable=["vq_stats", "intermediates"])
    # the same update by the pure function, from the keys the layer quantised
    stats = variables["vq_stats"]
    C = vq.codebook_from_ema(stats)
    _, inter = layer.apply(variables, x, mutable=["intermediates"], capture_intermediates=lambda m, n: m.name == "W_z")
    z = jax.nn.silu(inter["intermediates"]["W_z"]["__call__"][0])
    k = variables["params"]["qk_scale"][1] * z + variables["params"]["qk_bias"][1]
    expected = vq.ema_codebook_update(stats, k, vq.nearest_code(k, C), 0.99)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), updated["vq_stats"], expected)
    assert not np.allclose(updated["vq_stats"]["embed_sum"], stats["embed_sum"])


def test_bad_fields():
    x = jnp.zeros((1, 3, D))
    for fields, name in [(dict(method="fft"), "method"), (dict(codebook_update="kmeans"), "codebook_update"),
                         (dict(chunk_size=0), "chunk_size")]:
        with pytest.raises(ValueError, match=name):
            ssmjax.layers.get("longvq", d_model=D, **fields).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="x"):
        layer, params, _ = build()
        layer.apply(params, jnp.zeros((1, 3, D + 1)))
