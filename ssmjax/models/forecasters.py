"""Long-term forecasters: ``x [b, L, C] -> y [b, H, C]`` (look-back ``L``, horizon ``H``,
``C`` variates).

LTSF-Linear (Zeng et al., 2023, "Are Transformers Effective for Time Series
Forecasting?", AAAI) -- one linear map along time, shared by the channels (or one per
channel with ``individual=True``):

* ``Linear``:  ``y[:, :, c] = W x[:, :, c] + b``,  ``W [H, L]``.
* ``NLinear``: subtract the last value, map, add it back:
  ``y = Linear(x - x[:, L-1]) + x[:, L-1]``.
* ``DLinear``: decompose ``x = trend + seasonal`` with ``trend = AvgPool_k(pad(x))``, a
  moving average of kernel ``k = 25`` (stride 1) over ``x`` padded by replicating its first
  and last rows ``(k - 1) // 2`` times, and ``y = Linear_s(seasonal) + Linear_t(trend)``.

The linear maps are initialised as PyTorch's ``nn.Linear`` (weight and bias
``U(-1/sqrt(L), 1/sqrt(L))``), as the reference code does; the paper's numbers depend on it.

iTransformer (Liu et al., 2024, "iTransformer: Inverted Transformers Are Effective for Time
Series Forecasting", ICLR) -- each variate's whole look-back is one token:

* instance normalisation (``use_norm``): ``x' = (x - mu) / sigma`` per series over the
  look-back (``sigma = sqrt(var + 1e-5)``, population variance), undone on the output;
* tokens ``e_c = W_e x'[:, :, c] + b_e`` (``Linear(L -> d_model)``), plus one token per
  time feature (``marks [b, L, F]``, the calendar features of the look-back), then dropout;
* ``n_layers`` post-norm encoder layers: ``h = LN(h + Drop(MHA(h)))``,
  ``h = LN(h + Drop(W_2 Drop(gelu(W_1 h))))`` (``d_ff`` hidden, non-causal attention across
  variate tokens, dropout on the attention weights too), a final LayerNorm;
* ``y_c = W_p h_c`` (``Linear(d_model -> H)``); the first ``C`` tokens are kept.

Our backbones as forecasters (:class:`ChannelIndependent`, :class:`Inverted`) use
:class:`ssmjax.models.SequenceModel` with any registered mixer pattern:
channel-independent (each variate an instance-normalised univariate series over time, the
backbone's last state mapped to ``H``) or inverted (the mixers run over variate tokens as in
iTransformer; a causal mixer then sees the variates in file order).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import Float

from ssmjax.checks import check_ndim, check_positive_int
from ssmjax.models.backbone import SequenceModel

# The public modules take ``x: Array [batch, seq_len, channels]`` and raise their own
# ValueError on a bad shape; the inner pieces carry dimension-named annotations.


def torch_uniform(fan_in: int):
    """PyTorch's default ``nn.Linear``/``nn.Conv1d`` initialiser for weight and bias:
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (kaiming_uniform with a = sqrt(5) for the weight)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class TorchDense(nn.Module):
    """``y = x W + b`` over the last axis with PyTorch's default initialisation."""

    features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        fan_in = x.shape[-1]
        init = torch_uniform(fan_in)
        kernel = self.param("kernel", init, (fan_in, self.features))
        bias = self.param("bias", init, (self.features,))
        return x @ kernel.astype(x.dtype) + bias.astype(x.dtype)


def _check_input(x: Array) -> None:
    check_ndim("x", x, 3, "[batch, seq_len, channels]")


class TimeLinear(nn.Module):
    """``[b, L, C] -> [b, H, C]``: one ``Linear(L -> H)`` along time, shared by the channels
    or, with ``individual``, one per channel."""

    horizon: int
    individual: bool = False

    @nn.compact
    def __call__(self, x: Float[Array, "b l c"]) -> Float[Array, "b h c"]:
        seq_len, channels = x.shape[1], x.shape[2]
        if not self.individual:
            return jnp.swapaxes(TorchDense(self.horizon, name="linear")(jnp.swapaxes(x, 1, 2)), 1, 2)
        init = torch_uniform(seq_len)
        kernel = self.param("kernel", init, (channels, seq_len, self.horizon))
        bias = self.param("bias", init, (channels, self.horizon))
        return jnp.einsum("blc,clh->bhc", x, kernel.astype(x.dtype)) + bias.T.astype(x.dtype)


class Linear(nn.Module):
    """LTSF-Linear's ``Linear``: ``y = W x + b`` along time (module docstring)."""

    horizon: int
    individual: bool = False

    @nn.compact
    def __call__(self, x: Array, marks: Array | None = None, *, deterministic: bool = True) -> Array:
        _check_input(x)
        return TimeLinear(check_positive_int("horizon", self.horizon), self.individual, name="time_linear")(x)


class NLinear(nn.Module):
    """LTSF-Linear's ``NLinear``: ``y = Linear(x - x_last) + x_last`` (module docstring)."""

    horizon: int
    individual: bool = False

    @nn.compact
    def __call__(self, x: Array, marks: Array | None = None, *, deterministic: bool = True) -> Array:
        _check_input(x)
        last = jax.lax.stop_gradient(x[:, -1:, :])  # .detach() in the reference code; no effect on gradients of W
        linear = TimeLinear(check_positive_int("horizon", self.horizon), self.individual, name="time_linear")
        return linear(x - last) + last


def moving_average(x: Float[Array, "b l c"], kernel_size: int = 25) -> Float[Array, "b l2 c"]:
    """DLinear's trend: the mean over a sliding window of ``kernel_size`` (stride 1) of ``x``
    padded with ``(kernel_size - 1) // 2`` copies of its first and of its last row; the
    length is kept for odd ``kernel_size``."""
    check_positive_int("kernel_size", kernel_size)
    pad = (kernel_size - 1) // 2
    padded = jnp.concatenate([jnp.repeat(x[:, :1], pad, 1), x, jnp.repeat(x[:, -1:], pad, 1)], axis=1)
    total = jax.lax.reduce_window(padded, jnp.zeros((), x.dtype), jax.lax.add, (1, kernel_size, 1), (1, 1, 1), "VALID")
    return total / kernel_size


def series_decomposition(x: Float[Array, "b l c"], kernel_size: int = 25):
    """``(seasonal, trend)`` with ``trend = moving_average(x)`` and ``seasonal = x - trend``."""
    trend = moving_average(x, kernel_size)
    return x - trend, trend


class DLinear(nn.Module):
    """LTSF-Linear's ``DLinear``: ``y = Linear_s(x - trend) + Linear_t(trend)`` (module docstring)."""

    horizon: int
    individual: bool = False
    kernel_size: int = 25

    @nn.compact
    def __call__(self, x: Array, marks: Array | None = None, *, deterministic: bool = True) -> Array:
        _check_input(x)
        check_positive_int("horizon", self.horizon)
        seasonal, trend = series_decomposition(x, self.kernel_size)
        return (TimeLinear(self.horizon, self.individual, name="seasonal")(seasonal)
                + TimeLinear(self.horizon, self.individual, name="trend")(trend))


def instance_norm(x: Float[Array, "b l c"], eps: float = 1e-5):
    """``((x - mu) / sigma, mu, sigma)`` per series over time, ``sigma = sqrt(var + eps)``
    (population variance; iTransformer's ``use_norm`` / non-affine RevIN)."""
    mu = jax.lax.stop_gradient(x.mean(1, keepdims=True))
    sigma = jnp.sqrt(jax.lax.stop_gradient(x.var(1, keepdims=True)) + eps)
    return (x - mu) / sigma, mu, sigma


def _layer_norm(name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, name=name)  # PyTorch's eps


class TokenAttention(nn.Module):
    """Non-causal multi-head softmax attention over tokens ``[b, n, d]`` (no mask),
    ``softmax(Q K^T / sqrt(d_head))`` with dropout on the weights, PyTorch-initialised
    projections (iTransformer's ``AttentionLayer(FullAttention)``)."""

    d_model: int
    n_heads: int = 8
    dropout: float = 0.1

    @nn.compact
    def __call__(self, h: Float[Array, "b n d"], *, deterministic: bool = True) -> Float[Array, "b n d"]:
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads: {self.n_heads} does not divide d_model = {self.d_model}")
        b, n, _ = h.shape
        d_head = self.d_model // self.n_heads
        q, k, v = (TorchDense(self.d_model, name=f"{p}_proj")(h).reshape(b, n, self.n_heads, d_head) for p in "qkv")
        weights = jax.nn.softmax(jnp.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(d_head), axis=-1)
        weights = nn.Dropout(self.dropout)(weights, deterministic=deterministic)
        out = jnp.einsum("bhnm,bmhd->bnhd", weights, v).reshape(b, n, self.d_model)
        return TorchDense(self.d_model, name="out_proj")(out)


class EncoderLayer(nn.Module):
    """iTransformer's post-norm encoder layer (module docstring)."""

    d_model: int
    n_heads: int = 8
    d_ff: int = 256
    dropout: float = 0.1

    @nn.compact
    def __call__(self, h, *, deterministic: bool = True):
        drop = nn.Dropout(self.dropout)
        a = TokenAttention(self.d_model, self.n_heads, self.dropout, name="attention")(h, deterministic=deterministic)
        h = _layer_norm("norm1")(h + drop(a, deterministic=deterministic))
        y = drop(nn.gelu(TorchDense(self.d_ff, name="conv1")(h), approximate=False), deterministic=deterministic)
        y = drop(TorchDense(self.d_model, name="conv2")(y), deterministic=deterministic)
        return _layer_norm("norm2")(h + y)


class ITransformer(nn.Module):
    """iTransformer (Liu et al., 2024; module docstring). ``marks [b, L, F]`` (time
    features of the look-back) become ``F`` extra tokens; ``None`` for none. Dropout needs
    a ``"dropout"`` rng when ``deterministic=False``."""

    horizon: int
    d_model: int = 512
    n_layers: int = 2
    n_heads: int = 8
    d_ff: int = 2048
    dropout: float = 0.1
    use_norm: bool = True

    @nn.compact
    def __call__(self, x: Array, marks: Array | None = None, *, deterministic: bool = True) -> Array:
        _check_input(x)
        check_positive_int("horizon", self.horizon)
        channels = x.shape[2]
        if self.use_norm:
            x, mu, sigma = instance_norm(x)
        tokens = jnp.swapaxes(x, 1, 2)  # [b, C, L]
        if marks is not None:
            check_ndim("marks", marks, 3, "[batch, seq_len, time_features]")
            tokens = jnp.concatenate([tokens, jnp.swapaxes(marks.astype(x.dtype), 1, 2)], axis=1)
        h = nn.Dropout(self.dropout)(TorchDense(self.d_model, name="embedding")(tokens), deterministic=deterministic)
        for i in range(self.n_layers):
            h = EncoderLayer(self.d_model, self.n_heads, self.d_ff, self.dropout, name=f"layer_{i}")(
                h, deterministic=deterministic)
        h = _layer_norm("final_norm")(h)
        y = jnp.swapaxes(TorchDense(self.horizon, name="projection")(h)[:, :channels], 1, 2)  # [b, H, C]
        return y * sigma + mu if self.use_norm else y


class ChannelIndependent(nn.Module):
    """Each variate an instance-normalised univariate series through
    ``SequenceModel(mixers, vocab_size=None)`` over time; the last position's final state
    is mapped to the horizon (``head="classify"`` with ``pooling="last"``, ``num_classes=H``):
    ``y_c = sigma_c * W h_L(x'_c) + mu_c``."""

    horizon: int
    mixers: str = "s4d"
    d_model: int = 64
    n_layers: int | None = None
    mlp: str = "gated"
    use_norm: bool = True

    @nn.compact
    def __call__(self, x: Array, marks: Array | None = None, *, deterministic: bool = True) -> Array:
        _check_input(x)
        check_positive_int("horizon", self.horizon)
        b, seq_len, channels = x.shape
        if self.use_norm:
            x, mu, sigma = instance_norm(x)
        series = jnp.swapaxes(x, 1, 2).reshape(b * channels, seq_len, 1)
        y = SequenceModel(d_model=self.d_model, n_layers=self.n_layers, mixers=self.mixers, mlp=self.mlp,
                          vocab_size=None, head="classify", num_classes=self.horizon, pooling="last",
                          name="backbone")(series)
        y = jnp.swapaxes(y.reshape(b, channels, self.horizon), 1, 2)
        return y * sigma + mu if self.use_norm else y


class Inverted(nn.Module):
    """Our mixer stack over variate tokens, as iTransformer: instance norm, each variate's
    look-back (and each time feature) embedded by ``Linear(L -> d_model)`` (the backbone's
    input projection), ``SequenceModel(mixers)`` across tokens, ``Linear(d_model -> H)`` per
    token (``head="regress"``), the first ``C`` tokens kept."""

    horizon: int
    mixers: str = "mamba"
    d_model: int = 64
    n_layers: int | None = None
    mlp: str = "gated"
    use_norm: bool = True

    @nn.compact
    def __call__(self, x: Array, marks: Array | None = None, *, deterministic: bool = True) -> Array:
        _check_input(x)
        check_positive_int("horizon", self.horizon)
        channels = x.shape[2]
        if self.use_norm:
            x, mu, sigma = instance_norm(x)
        tokens = jnp.swapaxes(x, 1, 2)
        if marks is not None:
            check_ndim("marks", marks, 3, "[batch, seq_len, time_features]")
            tokens = jnp.concatenate([tokens, jnp.swapaxes(marks.astype(x.dtype), 1, 2)], axis=1)
        y = SequenceModel(d_model=self.d_model, n_layers=self.n_layers, mixers=self.mixers, mlp=self.mlp,
                          vocab_size=None, head="regress", output_dim=self.horizon, name="backbone")(tokens)
        y = jnp.swapaxes(y[:, :channels], 1, 2)
        return y * sigma + mu if self.use_norm else y


FORECASTERS = {"linear": Linear, "nlinear": NLinear, "dlinear": DLinear, "itransformer": ITransformer}


def build_forecaster(model: str, horizon: int, **fields) -> nn.Module:
    """``linear``, ``nlinear``, ``dlinear``, ``itransformer``, ``ci:<pattern>`` or
    ``inverted:<pattern>`` (a mixer pattern such as ``s4d`` or ``gla*3,attention``)."""
    if model.startswith("ci:"):
        return ChannelIndependent(horizon, mixers=model[3:], **fields)
    if model.startswith("inverted:"):
        return Inverted(horizon, mixers=model[9:], **fields)
    if model not in FORECASTERS:
        raise ValueError(f"model: expected one of {tuple(FORECASTERS)} or 'ci:<mixers>' / 'inverted:<mixers>', "
                         f"got {model!r}")
    return FORECASTERS[model](horizon, **fields)
