"""Helpers every mixer may use: the one public helper module of :mod:`ssmjax.layers`.

Layers never import each other; what two layers share lives here:

* contract plumbing: :func:`check_layer_input`, :class:`StepByCall` (the one ``step``
  mechanism), :class:`RecurrentMixer` (``__call__`` around a ``mix``),
  :func:`output_dropout`, :func:`state_float` (the dtype a state accumulates in);
* initialisers: :func:`uniform_init`, :func:`constant`, :func:`uniform_log_init`,
  :func:`log_uniform_init`, :func:`dt_bias_init`, and :func:`as_complex` /
  :func:`complex_pairs` for complex parameters stored as real pairs;
* projections, head reshapes and per-head normalisations;
* gates: :func:`lower_bounded_log_forget`;
* positions: :func:`rotary_embedding`;
* convolutions: the one short convolution (:func:`short_conv_params`, :func:`short_conv`)
  and the one dilated causal convolution (:func:`dilated_causal_conv`);
* the "ones column" trick that makes a linear-attention scan carry its own normaliser.

No recurrence lives here: the layers call :mod:`ssmjax.scan`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike
from jaxtyping import Float

from ssmjax.checks import check_ndim, check_shape
from ssmjax.scan.conv import causal_conv1d, fft_causal_convolution
from ssmjax.scan.delta import delta_rule
from ssmjax.scan.gla import gated_linear_attention
from ssmjax.scan.linear import linear_scan
from ssmjax.scan.softmax_attention import prefix_softmax_attention


def check_layer_input(x: Array, d_model: int) -> None:
    """``x`` must be ``[batch, time, d_model]`` (``ValueError`` naming ``x`` otherwise)."""
    check_ndim("x", x, 3, "[batch, time, d_model]")
    check_shape("x", x, (x.shape[0], x.shape[1], d_model), "[batch, time, d_model]")


def no_state_when_bidirectional(name: str, bidirectional: bool, state, return_state: bool) -> None:
    if bidirectional and (state is not None or return_state):
        raise ValueError(f"state: {name} with bidirectional=True is non-causal and has no recurrent state")


def uniform_init(bound: float):
    """``U(-bound, bound)`` (PyTorch's default for ``Conv1d`` with ``bound = fan_in^-1/2``)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def dt_bias_init(dt_min: float, dt_max: float, dt_init_floor: float):
    """Inverse softplus of ``dt = max(exp(U(log dt_min, log dt_max)), dt_init_floor)``."""

    def init(key, shape, dtype=jnp.float32):
        log_dt = jax.random.uniform(key, shape, jnp.float32, math.log(dt_min), math.log(dt_max))
        dt = jnp.maximum(jnp.exp(log_dt), dt_init_floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def log_uniform_init(lo: float, hi: float):
    """``log(A)`` with ``A ~ U(lo, hi)`` (Mamba-2's per-head decay rates)."""

    def init(key, shape, dtype=jnp.float32):
        return jnp.log(jax.random.uniform(key, shape, jnp.float32, lo, hi)).astype(dtype)

    return init


def uniform_log_init(low: float, high: float):
    """``log x`` with ``x`` log-uniform in ``[low, high]``, i.e. ``U(log low, log high)``
    (the S4 / S5 ``dt`` initialisation)."""

    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        return (math.log(low) + u * (math.log(high) - math.log(low))).astype(dtype)

    return init


def constant(value):
    """An initialiser returning a fixed array (cast to the parameter dtype)."""

    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.broadcast_to(jnp.asarray(value, dtype), shape)

    return init


def as_complex(p: Float[Array, "*lead 2"]) -> Array:
    """``[..., 2]`` real pairs -> complex ``[...]`` (complex parameters are stored as pairs)."""
    return jax.lax.complex(p[..., 0], p[..., 1])


def complex_pairs(z) -> np.ndarray:
    """complex ``[...]`` -> ``[..., 2]`` real pairs (float64 numpy, for initialisers)."""
    z = np.asarray(z)
    return np.stack([z.real, z.imag], axis=-1)


def lower_bounded_log_forget(logits: Array, lower_bound: float) -> Array:
    """``log(lb + (1 - lb) sigmoid(logits))`` without forming ``log(0)`` (HGRN's forget
    gate with the layer's lower bound ``0 <= lb < 1``; Qin et al., 2023, "Hierarchically
    Gated Recurrent Neural Network for Sequence Modeling")."""
    if not 0.0 <= lower_bound < 1.0:
        raise ValueError(f"lower_bound: expected a value in [0, 1), got {lower_bound}")
    log_mu = jax.nn.log_sigmoid(logits)
    if lower_bound == 0.0:
        return log_mu
    return jnp.logaddexp(math.log(lower_bound), math.log1p(-lower_bound) + log_mu)


def rotary_embedding(x: Float[Array, "b t h d"], positions: Array, base: float) -> Float[Array, "b t h d"]:
    """Rotary position embedding (Su et al., 2021, "RoFormer"): rotate the channel pairs
    ``(x[..., i], x[..., i + d/2])`` by ``position * base^(-2i/d)``; ``positions`` is
    ``[t]`` or ``[b, t]``. Computed in at least float32, returned in ``x``'s dtype."""
    half = x.shape[-1] // 2
    dtype = jnp.result_type(x.dtype, jnp.float32)  # at least float32; float64 stays float64
    freqs = base ** (-jnp.arange(half, dtype=dtype) / half)
    angles = positions[..., None].astype(dtype) * freqs  # [b?, t, half]
    cos, sin = jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]
    x1, x2 = x[..., :half].astype(dtype), x[..., half:].astype(dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(x.dtype)


class StepByCall(nn.Module):
    """The one ``step`` of the layer contract: ``__call__`` on one token.

    A mixer whose ``__call__(x, *, state=None, return_state=False, ...)`` evaluates a
    one-token input with its step form (a scan op with ``T = 1``, a cache update) inherits
    ``step`` from here instead of writing it. A bidirectional layer needs no guard of its
    own: its ``__call__`` already rejects ``return_state=True``. Layers whose step is a
    different computation (e.g. S4's recurrence instead of its FFT convolution) define
    their own and say why.
    """

    def step(self, x_t, state):
        """One token: ``x_t [batch, d_model]`` -> ``(y_t [batch, d_model], new_state)``."""
        y, state = self(jnp.asarray(x_t)[:, None], state=state, return_state=True)
        return y[:, 0], state


class RecurrentMixer(StepByCall):
    """Contract plumbing for a causal mixer with a recurrent state.

    Subclasses are dataclasses with ``d_model``, ``dropout`` and ``deterministic``
    fields and define ``init_state(batch_size, dtype)`` and
    ``mix(x, state) -> (y, new_state)``; ``__call__`` checks the input, starts from
    ``init_state`` when no state is given and applies output dropout; ``step`` is
    :class:`StepByCall`'s (every mix is the scan op evaluated with ``T = 1``).
    """

    def __call__(self, x, *, state=None, return_state: bool = False):
        """``x [batch, time, d_model]`` -> ``y [batch, time, d_model]`` (and the state)."""
        x = jnp.asarray(x)
        check_layer_input(x, self.d_model)
        if state is None:
            state = self.init_state(x.shape[0], x.dtype)
        y, new_state = self.mix(x, state)
        y = output_dropout(self, y)
        return (y, new_state) if return_state else y


def alternating_sign_init(std: float = 0.02):
    """``N(s_i, std)`` with ``s_i = +1, -1, +1, ...`` along the last axis (Mega's ``beta``)."""

    def init(key, shape, dtype=jnp.float32):
        signs = jnp.where(jnp.arange(shape[-1]) % 2 == 0, 1.0, -1.0)
        return (signs + std * jax.random.normal(key, shape)).astype(dtype)

    return init


class DampedEMA(nn.Module):
    """One direction of Mega's multi-dimensional damped EMA (Ma et al., 2023; the equations
    are in :mod:`ssmjax.layers.mega_ema`), ``x [b, t, d] -> ema [b, t, d]``, by a linear scan or
    an FFT convolution; shared by ``mega_ema`` and ``longvq``."""

    d_model: int
    ndim: int
    param_dtype: Any = jnp.float32

    def setup(self):
        shape = (self.d_model, self.ndim)
        logits = nn.initializers.normal(0.2)
        self.alpha = self.param("alpha", logits, shape, self.param_dtype)
        self.delta = self.param("delta", logits, shape, self.param_dtype)
        self.beta = self.param("beta", alternating_sign_init(), shape, self.param_dtype)
        self.eta = self.param("eta", nn.initializers.normal(1.0), shape, self.param_dtype)

    def coefficients(self, dtype) -> tuple[Array, Array]:
        """``(alpha beta, log q)`` ``[d, h]`` with ``q = 1 - alpha delta`` the decay."""
        alpha = jax.nn.sigmoid(self.alpha.astype(dtype))
        delta = jax.nn.sigmoid(self.delta.astype(dtype))
        return alpha * self.beta.astype(dtype), jnp.log1p(-alpha * delta)

    def output_weights(self, dtype) -> Array:
        """``sqrt(1/h) eta`` ``[d, h]``."""
        return self.eta.astype(dtype) * self.ndim**-0.5

    def project(self, s: Float[Array, "*lead d h"]) -> Float[Array, "*lead d"]:
        """``sqrt(1/h) eta . s`` over the expansion axis."""
        return jnp.einsum("...dh,dh->...d", s, self.output_weights(s.dtype))

    def by_scan(
        self,
        x: Float[Array, "b t d"],
        s0: Float[Array, "b d h"] | None,
        reverse: bool,
        segment_ids,
        reset,
    ) -> tuple[Float[Array, "b t d"], Float[Array, "b d h"]]:
        gain, log_q = self.coefficients(x.dtype)
        s, s_last = linear_scan(
            jnp.exp(log_q), gain * x[..., None], initial_state=s0, reverse=reverse,
            segment_ids=segment_ids, reset=reset,
        )
        return self.project(s), s_last

    def by_fft(
        self, x: Float[Array, "b t d"], s0: Float[Array, "b d h"] | None, reverse: bool
    ) -> tuple[Float[Array, "b t d"], Float[Array, "b d h"]]:
        time = x.shape[1]
        gain, log_q = self.coefficients(x.dtype)
        steps = jnp.arange(time, dtype=x.dtype)[:, None, None]
        powers = jnp.exp(steps * log_q)  # q^t [t, d, h], exponents <= 0
        if reverse:
            x = jnp.flip(x, axis=1)
        ema = fft_causal_convolution(x, self.project(gain * powers))
        # s_{T-1} = sum_t q^(T-1-t) gain x_t (+ q^T s0)
        s_last = jnp.einsum("btd,tdh->bdh", x, jnp.flip(powers, axis=0)) * gain
        if s0 is not None:
            # sqrt(1/h) sum_h eta q^(t+1) s0, contracted over h without forming [b, t, d, h]
            weights = jnp.exp(log_q) * self.output_weights(x.dtype)
            ema = ema + jnp.einsum("tdh,bdh->btd", powers * weights, s0)
            s_last = s_last + jnp.exp(time * log_q) * s0
        return (jnp.flip(ema, axis=1) if reverse else ema), s_last

    def __call__(
        self,
        x: Float[Array, "b t d"],
        s0: Float[Array, "b d h"] | None,
        reverse: bool,
        segment_ids,
        reset,
        method: str,
    ) -> tuple[Float[Array, "b t d"], Float[Array, "b d h"]]:
        if method == "scan" or segment_ids is not None or reset is not None or x.shape[1] <= 1:
            return self.by_scan(x, s0, reverse, segment_ids, reset)
        return self.by_fft(x, s0, reverse)


def compiled(op, *static_argnames: str):
    """``op`` under ``jax.jit`` with the given static keyword arguments. Inside an outer
    ``jit`` this is inlined (no cost); called eagerly (``layer.apply`` outside ``jit``, token
    by token decoding in a Python loop) it compiles the scan op once per shape instead of
    dispatching and compiling its many primitives one by one."""
    return jax.jit(op, static_argnames=static_argnames)


#: The scan ops the layers call, compiled per shape (:func:`compiled`).
gla_op = compiled(gated_linear_attention, "chunk_size", "method")
delta_rule_op = compiled(delta_rule, "chunk_size", "method")
linear_scan_op = compiled(linear_scan, "reverse", "method", "chunk_size")
prefix_softmax_op = compiled(prefix_softmax_attention, "method")


def output_dropout(module: nn.Module, y: Array) -> Array:
    """Inverted dropout with ``module.dropout`` unless ``module.deterministic`` (draws
    from the ``'dropout'`` rng stream)."""
    if module.deterministic or module.dropout == 0.0:
        return y
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - module.dropout, y.shape)
    return jnp.where(keep, y / (1.0 - module.dropout), 0.0).astype(y.dtype)


def check_heads(name: str, total: int, heads: int) -> int:
    """``total // heads``; ``ValueError`` naming ``name`` when ``heads`` does not divide it."""
    if heads < 1 or total % heads:
        raise ValueError(f"{name}: must divide {total}, got {heads}")
    return total // heads


def state_float(*dtypes) -> jnp.dtype:
    """The dtype a recurrent state accumulates in: at least float32 (complex64 if any of
    ``dtypes`` is complex; float64 stays float64)."""
    return jnp.result_type(jnp.float32, *dtypes)


def scan_method(method: str, time: int) -> str:
    """A single token (decoding) runs the sequential form of a scan op: the one-token
    specialisation, without chunk padding; longer inputs use ``method``."""
    return "sequential" if time == 1 else method


def dense(features, module: nn.Module, name: str, use_bias: bool = False, axis=-1) -> nn.Module:
    """A bias-free (by default) ``DenseGeneral`` following the module's dtype policy."""
    return nn.DenseGeneral(features, axis=axis, use_bias=use_bias, dtype=module.dtype,
                           param_dtype=module.param_dtype, name=name)


def split_heads(x: Float[Array, "*lead features"], heads: int) -> Float[Array, "*lead heads dim"]:
    """``[..., heads * dim]`` -> ``[..., heads, dim]``."""
    return x.reshape(x.shape[:-1] + (heads, x.shape[-1] // heads))


def merge_heads(x: Float[Array, "*lead heads dim"]) -> Float[Array, "*lead features"]:
    """``[..., heads, dim]`` -> ``[..., heads * dim]``."""
    return x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))


def l2_normalize(x: Float[Array, "*lead dim"], eps: float = 1e-6) -> Float[Array, "*lead dim"]:
    """``x / sqrt(|x|^2 + eps)`` over the last axis (DeltaNet's query / key normalisation)."""
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


def rms_norm(x: Float[Array, "*lead dim"], weight: ArrayLike | None, eps: float) -> Float[Array, "*lead dim"]:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis (per head when ``x`` is
    ``[..., heads, dim]``); ``weight=None`` for no affine."""
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    return y if weight is None else y * jnp.asarray(weight)


def layer_norm(x: Float[Array, "*lead dim"], weight: ArrayLike | None, eps: float) -> Float[Array, "*lead dim"]:
    """Mean-centred :func:`rms_norm` (LayerNorm without bias) over the last axis; over
    ``[..., heads, dim]`` it is GroupNorm with one group per head."""
    return rms_norm(x - jnp.mean(x, axis=-1, keepdims=True), weight, eps)


def gated_rms_norm(
    x: Float[Array, "*lead dim"], gate: Float[Array, "*lead dim"], weight: ArrayLike | None, eps: float
) -> Float[Array, "*lead dim"]:
    """``rms_norm(x) * weight * silu(gate)`` (the output gate + norm of GLA, HGRN, Gated
    DeltaNet, LightNet)."""
    return rms_norm(x, weight, eps) * jax.nn.silu(gate)


def ones_param(module: nn.Module, name: str, size: int):
    return module.param(name, nn.initializers.ones_init(), (size,), module.param_dtype)


def short_conv_params(module: nn.Module, width: int, channels: int, *, bias: bool):
    """The depthwise causal conv kernel ``conv_w [width, channels]`` (and ``conv_b
    [channels]`` when ``bias``), both ``U(-width^-1/2, width^-1/2)`` (PyTorch's ``Conv1d``
    default with fan-in ``width``). Returns ``(weight, bias or None)``."""
    init = uniform_init(1.0 / math.sqrt(width))
    weight = module.param("conv_w", init, (width, channels), module.param_dtype)
    return weight, (module.param("conv_b", init, (channels,), module.param_dtype) if bias else None)


def short_conv(
    x: Float[Array, "batch time channels"],
    weight: ArrayLike,
    bias: ArrayLike | None,
    state: Float[Array, "batch k1 channels"],
    segment_ids: Array | None = None,
    reset: Array | None = None,
) -> tuple[Float[Array, "batch time channels"], Float[Array, "batch k1 channels"]]:
    """The short convolution of Mamba, GLA-family, mLSTM and sLSTM blocks:
    ``silu(causal_conv1d(x))`` (depthwise, ``y_t = b + sum_j w_j x_{t-K+1+j}``) and the new
    conv state in the dtype of ``state``; ``segment_ids`` / ``reset`` keep the taps inside
    packed documents."""
    y, new_state = causal_conv1d(
        x, jnp.asarray(weight, x.dtype), None if bias is None else jnp.asarray(bias, x.dtype),
        initial_state=state.astype(x.dtype), segment_ids=segment_ids, reset=reset,
    )
    return jax.nn.silu(y), new_state.astype(state.dtype)


def _dilated_conv_phases(
    seq: Float[Array, "batch length channels"], weight: Float[Array, "taps channels"], dilation: int
) -> Float[Array, "batch length channels"]:
    """``out_s = sum_j weight[taps - 1 - j] seq_{s - j dilation}`` (zeros before the start).

    The frames of one residue class modulo ``dilation`` only see each other, so the
    sequence is split into ``dilation`` phases (folded into the batch) and each phase runs
    the undilated ``taps``-tap :func:`~ssmjax.scan.conv.causal_conv1d`: ``taps`` products
    per frame instead of the ``(taps - 1) dilation + 1`` of a zero-stuffed filter.
    """
    batch, length, channels = seq.shape
    front = -length % dilation
    seq = jnp.pad(seq, [(0, 0), (front, 0), (0, 0)])
    phases = seq.reshape(batch, -1, dilation, channels).swapaxes(1, 2).reshape(batch * dilation, -1, channels)
    out, _ = causal_conv1d(phases, weight)
    out = out.reshape(batch, dilation, -1, channels).swapaxes(1, 2).reshape(batch, -1, channels)
    return out[:, front:]


def _dilated_causal_conv(
    x: Float[Array, "batch time channels"],
    weight: Float[Array, "taps channels"],
    dilation: int,
    history: Float[Array, "batch width1 channels"] | None = None,
    lookahead: int = 0,
) -> tuple[Float[Array, "batch time channels"], Float[Array, "batch width1 channels"] | None]:
    """``y_t = sum_s weight[s] x_{t + lookahead - (taps - 1 - s) dilation}`` per channel.

    Causal (``lookahead = 0``): ``history`` holds the last ``(taps - 1) dilation`` inputs
    (zeros if ``None``) and the new history is returned (the state of a step form).
    ``lookahead > 0`` (a centred filter): zeros before the start and after the end, no
    history (``None`` returned).
    """
    taps = weight.shape[0]
    span = (taps - 1) * dilation
    if history is None:
        history = jnp.zeros((x.shape[0], span - lookahead, x.shape[2]), x.dtype)
    seq = jnp.concatenate([history.astype(x.dtype), x, jnp.zeros((x.shape[0], lookahead, x.shape[2]), x.dtype)], 1)
    out = _dilated_conv_phases(seq, weight.astype(x.dtype), dilation)
    y = out[:, history.shape[1] + lookahead:]
    return y, (None if lookahead else seq[:, seq.shape[1] - span:])


#: The one dilated causal convolution (:func:`_dilated_causal_conv`), compiled per shape.
dilated_causal_conv = compiled(_dilated_causal_conv, "dilation", "lookahead")


def with_ones_column(v: Float[Array, "batch time heads dv"]) -> Float[Array, "batch time heads dv1"]:
    """Append a constant ``1`` to every value: a linear-attention state ``sum_j w_j k_j
    [v_j, 1]^T`` then carries the normaliser ``sum_j w_j k_j`` as its last column."""
    return jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)


def split_normaliser(
    o: Float[Array, "batch time heads dv1"],
) -> tuple[Float[Array, "batch time heads dv"], Float[Array, "batch time heads 1"]]:
    """Undo :func:`with_ones_column` on a scan output: ``(q^T sum_j w_j k_j v_j^T,
    q^T sum_j w_j k_j)``."""
    return o[..., :-1], o[..., -1:]
