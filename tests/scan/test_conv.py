"""Causal depthwise conv and the FFT convolution against direct sums (float64); the conv
on CPU both as the C++ kernels (where they build) and in XLA."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssmjax.scan import _ffi
from ssmjax.scan.conv import causal_conv1d, causal_conv1d_step, fft_causal_convolution
from tests.scan.compiled import compiled

conv, conv_step = compiled(causal_conv1d), compiled(causal_conv1d_step)  # the value tests' calls, under jit


def direct_conv(x, w, history, bias=None, doc=None):
    x, w, history = map(np.asarray, (x, w, history))
    k, (b, t, c) = w.shape[0], x.shape
    padded = np.concatenate([history, x], 1)
    docs = np.concatenate([np.zeros((b, k - 1), int), doc if doc is not None else np.zeros((b, t), int)], 1)
    y = np.zeros_like(x)
    for i in range(t):
        for j in range(k):
            src = i + j  # index into padded of x_{i - k + 1 + j}
            y[:, i] += np.where((docs[:, src] == docs[:, i + k - 1])[:, None], padded[:, src], 0) * w[j]
    return y + (0 if bias is None else np.asarray(bias))


@pytest.fixture(params=[True, False], ids=["kernels", "xla"])
def evaluation(request):
    """The CPU kernels on (where built) or off for the test's calls."""
    with _ffi.cpu_kernels(request.param):
        yield request.param


@pytest.fixture
def inputs():
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    return (jax.random.normal(ks[0], (2, 11, 3)), jax.random.normal(ks[1], (4, 3)),
            jax.random.normal(ks[2], (3,)), jax.random.normal(ks[3], (2, 3, 3)))


def test_conv_matches_direct_sum_and_steps(inputs, evaluation):
    x, w, bias, history = inputs
    y, state = conv(x, w, bias, initial_state=history)
    np.testing.assert_allclose(y, direct_conv(x, w, history, bias), rtol=1e-12)
    s = history
    for t in range(x.shape[1]):
        y_t, s = conv_step(x[:, t], s, w, bias)
        np.testing.assert_allclose(y_t, y[:, t], rtol=1e-12)
    np.testing.assert_allclose(s, state, rtol=1e-12)
    y1, mid = conv(x[:, :2], w, bias, initial_state=history)  # shorter than k - 1
    y2, last = conv(x[:, 2:], w, bias, initial_state=mid)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y, rtol=1e-12)
    np.testing.assert_allclose(last, state, rtol=1e-12)


def test_conv_packed_documents_do_not_mix(inputs, evaluation):
    x, w, bias, history = inputs
    seg = jnp.array([[0] * 4 + [1] * 2 + [2] * 5, [7] * 11])
    y, state = conv(x, w, initial_state=history, segment_ids=seg)
    doc = np.cumsum(np.concatenate([np.zeros((2, 1), int), np.asarray(seg[:, 1:] != seg[:, :-1])], 1), 1)
    np.testing.assert_allclose(y, direct_conv(x, w, history, doc=doc), rtol=1e-12)
    np.testing.assert_allclose(y[0, 6:], conv(x[:1, 6:], w)[0][0], rtol=1e-12)
    np.testing.assert_allclose(state[0], x[0, -3:], rtol=1e-12)  # last doc has >= k - 1 tokens


@pytest.mark.parametrize("complex_", [False, True])
def test_fft_convolution_matches_direct_sum(complex_):
    ks = jax.random.split(jax.random.PRNGKey(1), 2)
    u = jax.random.normal(ks[0], (2, 13, 3))
    kernel = jax.random.normal(ks[1], (13, 3)) * (1 + 1j if complex_ else 1)
    y = fft_causal_convolution(u, kernel)
    ref = np.stack([sum(np.asarray(kernel)[t - s] * np.asarray(u)[:, s] for s in range(t + 1)) for t in range(13)], 1)
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-10)


def test_bad_input():
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(jnp.ones((2, 5, 3)), jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d(jnp.ones((2, 5, 3)), jnp.ones((4, 3)), initial_state=jnp.ones((2, 4, 3)))
    with pytest.raises(ValueError, match="kernel"):
        fft_causal_convolution(jnp.ones((2, 5, 3)), jnp.ones((5, 2)))


@pytest.mark.skipif(shutil.which("c++") is None or jax.default_backend() != "cpu",
                    reason="no C++ compiler or not on CPU")
def test_cpu_kernels_lower_and_match_xla_in_float32_and_under_vmap():
    """On a CPU host with a compiler the conv (and its backward) lower to the kernels'
    custom calls; float32 values and gradients equal the XLA evaluation's (several time
    blocks per row); under vmap the kernels run once per mapped element."""
    ks = jax.random.split(jax.random.PRNGKey(2), 3)
    x, w = jax.random.normal(ks[0], (2, 700, 40), jnp.float32), jax.random.normal(ks[1], (4, 40), jnp.float32)
    ct = jax.random.normal(ks[2], x.shape, jnp.float32)
    seg = jnp.repeat(jnp.arange(7)[None], 100, axis=1).reshape(1, 700).repeat(2, 0)

    def value_and_grads(x, w):
        y, vjp = jax.vjp(lambda x, w: causal_conv1d(x, w, segment_ids=seg)[0], x, w)
        return (y,) + vjp(ct)

    assert "ssmjax_causal_conv_backward" in jax.jit(value_and_grads).lower(x, w).as_text()
    got = jax.jit(value_and_grads)(x, w)
    with _ffi.cpu_kernels(False):
        assert "ssmjax_causal_conv" not in jax.jit(value_and_grads).lower(x, w).as_text()
        want = jax.jit(value_and_grads)(x, w)
    for g, v in zip(got, want):
        np.testing.assert_allclose(g, v, rtol=1e-5, atol=1e-4)
    mapped = jax.jit(jax.vmap(value_and_grads, in_axes=(0, None)))(jnp.stack([x, -x]), w)
    for g, v in zip(mapped, got):
        np.testing.assert_allclose(g[0], v, rtol=1e-6, atol=1e-6)
