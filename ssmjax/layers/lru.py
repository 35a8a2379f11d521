"""Linear Recurrent Unit (``"lru"``) and the Hawk / Griffin recurrent block with the
Real-Gated LRU (``"rglru"``).

LRU (Orvieto, Smith, Gu, Fernando, Gulcehre, Pascanu and De, 2023, "Resurrecting
Recurrent Neural Networks for Long Sequences"): a complex diagonal linear recurrence with
an exponential parameterisation, per state channel ``n``::

    lambda_n = exp(-exp(nu_log_n) + i exp(theta_log_n))          |lambda_n| < 1
    h_t      = lambda * h_{t-1} + (exp(gamma_log) * (B_re + i B_im)) x_t     h in C^N
    y_t      = Re((C_re + i C_im) h_t) + D * x_t                              y in R^H

initialised uniformly on the ring ``r_min <= |lambda| <= r_max``, ``0 <= arg lambda <=
max_phase`` (``nu_log = log(-log(u1 (r_max^2 - r_min^2) + r_min^2) / 2)``,
``theta_log = log(max_phase u2)``) with the normalisation ``gamma = sqrt(1 - |lambda|^2)``,
``B ~ N(0, 1 / (2H))``, ``C ~ N(0, 1 / N)``, ``D ~ N(0, 1)``. ``bidirectional=True``
adds a second recurrence (own ``nu, theta, gamma, B, C``) run backwards in time whose
output ``Re(C' h'_t)`` is added (non-causal, for classification).

RG-LRU and the recurrent block (De et al., 2024, "Griffin: Mixing Gated Linear
Recurrences with Local Attention for Efficient Language Models"), with the equations of
google-deepmind/recurrentgemma. With ``w = lru_width`` and ``x`` the block input::

    y_branch = gelu_tanh(W_y x + b_y)
    u        = conv1d_4(W_x x + b_x)                  (depthwise, causal, with bias)
    r_t      = sigmoid(BlockDiag_a(u_t)),   i_t = sigmoid(BlockDiag_x(u_t))
    log a_t  = -c * r_t * softplus(a_param)           (c = 8; a = sigmoid(-a_param))
    h_t      = a_t * h_{t-1} + m_t * (i_t * u_t),     m_t = sqrt(1 - a_t^2), or 1 at a
                                                      document start (where h_{t-1} is cut)
    out      = W_out (h * y_branch) + b_out

``BlockDiag`` is a block-diagonal linear map with one ``[w/heads, w/heads]`` block (and
bias) per head. ``a_param`` is initialised so that ``a = exp(-softplus(a_param))`` is
uniform (in area) on the ring ``[0.9, 0.999]``; the derivative of the ``sqrt`` is bounded
by 1000 as in recurrentgemma. The first token of a call without a state is a document
start (recurrentgemma's ``segment_pos == 0``); the step state therefore carries a
per-row ``start`` flag besides the conv and RG-LRU states.

Parameter counts (``d = d_model``, ``N = d_state``, ``w = lru_width``, ``k = conv_width``,
``H = num_heads``; ``dirs = 2`` if bidirectional else 1)::

    lru:    dirs * (3 N + 4 N d) + d
    rglru:  3 d w + 2 w + (k + 1) w + w + 2 (w^2 / H + w) + d

The LRU's recurrence is :func:`ssmjax.scan.linear.complex_lti_scan`: real and imaginary
parts side by side (``[batch, time, 2, N]``), so its projections are one real product in
(``x [b t, d] @ [gamma B_re; gamma B_im]^T``) and one out (``[Re h, Im h] @ [C_re, -C_im]^T``),
on ``[batch * time, features]`` rows, and on CPU the scan is a loop over strided time slices
with ``lambda`` a loop constant: no complex products, no batch/time swaps, no broadcast
decays, no flips. The RG-LRU's is :func:`ssmjax.scan.linear_scan`; the convolution is
:func:`ssmjax.scan.conv.causal_conv1d`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike
from jaxtyping import Bool, Float, Inexact

from ssmjax.checks import carry_cut_mask
from ssmjax.layers.common import StepByCall, check_layer_input, no_state_when_bidirectional
from ssmjax.layers.registry import register
from ssmjax.scan.conv import causal_conv1d
from ssmjax.scan.linear import complex_lti_scan, linear_scan


# ----------------------------------------------------------------------------------- LRU
def ring_init(r_min: float, r_max: float, max_phase: float):
    """``(nu_log, theta_log)`` initialisers putting ``lambda`` uniformly (in area) on the
    ring ``r_min <= |lambda| <= r_max`` with phases uniform in ``[0, max_phase]``."""

    def nu_log(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        return jnp.log(-0.5 * jnp.log(u * (r_max**2 - r_min**2) + r_min**2)).astype(dtype)

    def theta_log(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        return jnp.log(max_phase * u).astype(dtype)

    return nu_log, theta_log


def gamma_log_init(nu_log: ArrayLike) -> Array:
    """``log sqrt(1 - |lambda|^2)`` with ``|lambda| = exp(-exp(nu_log))`` (LRU's normalisation)."""
    return 0.5 * jnp.log1p(-jnp.exp(-2 * jnp.exp(jnp.asarray(nu_log, jnp.float32))))


def lru_eigenvalues(nu_log: ArrayLike, theta_log: ArrayLike) -> Array:
    """``lambda = exp(-exp(nu_log) + i exp(theta_log))``."""
    return jnp.exp(-jnp.exp(jnp.asarray(nu_log)) + 1j * jnp.exp(jnp.asarray(theta_log)))


class ComplexDiagonalRecurrence(nn.Module):
    """One direction of the LRU: ``h_t = lambda h_{t-1} + gamma B x_t``, ``y_t = Re(C h_t)``."""

    d_model: int
    d_state: int
    r_min: float
    r_max: float
    max_phase: float
    param_dtype: Any = jnp.float32

    def setup(self):
        nu_init, theta_init = ring_init(self.r_min, self.r_max, self.max_phase)
        n, d = self.d_state, self.d_model
        self.nu_log = self.param("nu_log", nu_init, (n,), self.param_dtype)
        self.theta_log = self.param("theta_log", theta_init, (n,), self.param_dtype)
        self.gamma_log = self.param(
            "gamma_log", lambda _: gamma_log_init(self.nu_log).astype(self.param_dtype)
        )
        b_init = nn.initializers.normal(1 / math.sqrt(2 * d))
        c_init = nn.initializers.normal(1 / math.sqrt(n))
        self.B_re = self.param("B_re", b_init, (n, d), self.param_dtype)
        self.B_im = self.param("B_im", b_init, (n, d), self.param_dtype)
        self.C_re = self.param("C_re", c_init, (d, n), self.param_dtype)
        self.C_im = self.param("C_im", c_init, (d, n), self.param_dtype)

    def __call__(
        self,
        x: Float[Array, "b t d"],
        h0: Inexact[Array, "b n"] | None,
        reverse: bool,
        segment_ids,
        reset,
    ) -> tuple[Float[Array, "b t d"], Inexact[Array, "b n"]]:
        """``Re(C h)``, in real arithmetic throughout (module docstring)."""
        real = x.dtype
        batch, time, d = x.shape
        n = self.d_state
        modulus = jnp.exp(-jnp.exp(self.nu_log.astype(real)))  # lambda = modulus exp(i angle)
        angle = jnp.exp(self.theta_log.astype(real))
        gamma = jnp.exp(self.gamma_log.astype(real))
        # One real product in, one out, on [batch * time, features] (a free reshape; on a
        # 3-d operand XLA transposes the cotangent for the weight gradient, slowly on CPU).
        B = jnp.concatenate([self.B_re, self.B_im]).astype(real) * jnp.tile(gamma, 2)[:, None]  # [2N, d]
        pairs = (x.reshape(batch * time, d) @ B.T).reshape(batch, time, 2, n)
        h, h_last = complex_lti_scan(
            jnp.stack([modulus * jnp.cos(angle), modulus * jnp.sin(angle)]), pairs, initial_state=h0,
            reverse=reverse, segment_ids=segment_ids, reset=reset,
        )
        C = jnp.concatenate([self.C_re, -self.C_im], axis=1).astype(real)  # Re(C h) = [C_re, -C_im] [Re h; Im h]
        y = (h.reshape(batch * time, 2 * n) @ C.T).reshape(batch, time, d)
        return y, h_last


@register("lru")
class LRU(StepByCall):
    """Linear Recurrent Unit (module docstring): ``d_model -> d_model`` through a complex
    diagonal state of size ``d_state``; parameters ``dirs (3 N + 4 N d) + d``."""

    d_model: int
    d_state: int = 64
    r_min: float = 0.0
    r_max: float = 1.0
    max_phase: float = 2 * math.pi
    bidirectional: bool = False
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    SSM_PARAMETERS: ClassVar[frozenset[str]] = frozenset({"nu_log", "theta_log", "gamma_log"})

    def setup(self):
        make = functools.partial(
            ComplexDiagonalRecurrence, self.d_model, self.d_state, self.r_min, self.r_max,
            self.max_phase, self.param_dtype,
        )
        self.forward_recurrence = make(name="forward")
        self.backward_recurrence = make(name="backward") if self.bidirectional else None
        self.D = self.param("D", nn.initializers.normal(1.0), (self.d_model,), self.param_dtype)
        self.drop = nn.Dropout(self.dropout)

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        return dict(h=jnp.zeros((batch_size, self.d_state), jnp.result_type(dtype, jnp.complex64)))

    def __call__(self, x, *, state=None, return_state=False, segment_ids=None, reset=None):
        x = jnp.asarray(x)
        check_layer_input(x, self.d_model)
        no_state_when_bidirectional("lru", self.bidirectional, state, return_state)
        out_dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        xr = x.astype(jnp.result_type(x.dtype, jnp.float32))
        h0 = None if state is None else state["h"]
        y, h_last = self.forward_recurrence(xr, h0, False, segment_ids, reset)
        if self.backward_recurrence is not None:
            y = y + self.backward_recurrence(xr, None, True, segment_ids, reset)[0]
        y = self.drop((y + self.D.astype(xr.dtype) * xr).astype(out_dtype), deterministic=self.deterministic)
        return (y, dict(h=h_last)) if return_state else y


# -------------------------------------------------------------------------------- RG-LRU
@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def sqrt_bounded_derivative(x: Array, max_gradient: float) -> Array:
    """``sqrt(x)`` whose derivative is evaluated at ``max(x, 1 / (4 max_gradient^2))``,
    i.e. bounded by ``max_gradient`` (recurrentgemma's guard against NaN in bf16)."""
    return jnp.sqrt(x)


def _sqrt_fwd(x, max_gradient):
    return jnp.sqrt(x), x


def _sqrt_bwd(max_gradient, x, g):
    return (0.5 * g / jnp.sqrt(jnp.maximum(x, 1 / (4 * max_gradient**2))),)


sqrt_bounded_derivative.defvjp(_sqrt_fwd, _sqrt_bwd)


def rglru_a_param_init(min_rad: float = 0.9, max_rad: float = 0.999, eps: float = 1e-8):
    """``a_param`` with ``a = exp(-softplus(a_param))`` uniform in area on ``[min_rad, max_rad]``."""

    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        log_a = 0.5 * jnp.log(u * (max_rad**2 - min_rad**2) + min_rad**2 + eps)
        return jnp.log(jnp.expm1(-log_a)).astype(dtype)  # inverse softplus of -log a

    return init


class BlockDiagonalLinear(nn.Module):
    """``y = x W + b`` with ``W`` block-diagonal: ``num_blocks`` blocks ``[w/n, w/n]``."""

    width: int
    num_blocks: int
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self):
        block = self.width // self.num_blocks
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
        self.w = self.param("w", init, (self.num_blocks, block, block), self.param_dtype)
        self.b = self.param("b", nn.initializers.zeros_init(), (self.num_blocks, block), self.param_dtype)

    def __call__(self, x: Float[Array, "*lead w"]) -> Float[Array, "*lead w"]:
        x, w, b = nn.dtypes.promote_dtype(x, self.w, self.b, dtype=self.dtype)
        x = x.reshape(x.shape[:-1] + (self.num_blocks, -1))
        y = jnp.einsum("...hi,hij->...hj", x, w) + b
        return y.reshape(y.shape[:-2] + (self.width,))


class RGLRU(nn.Module):
    """The Real-Gated LRU (module docstring); ``c`` is the gate sharpness (8 in Griffin)."""

    width: int
    num_heads: int
    c: float = 8.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self):
        self.a_param = self.param("a_param", rglru_a_param_init(), (self.width,), self.param_dtype)
        gate = functools.partial(
            BlockDiagonalLinear, self.width, self.num_heads, self.dtype, self.param_dtype
        )
        self.input_gate = gate(name="input_gate")
        self.a_gate = gate(name="a_gate")

    def __call__(
        self,
        x: Float[Array, "b t w"],
        doc_start: Bool[Array, "b t"],
        h0: Float[Array, "b w"] | None,
    ) -> tuple[Float[Array, "b t w"], Float[Array, "b w"]]:
        x, a_param = nn.dtypes.promote_dtype(x, self.a_param, dtype=self.dtype)
        gate_x = jax.nn.sigmoid(self.input_gate(x))
        gate_a = jax.nn.sigmoid(self.a_gate(x))
        log_a = -self.c * gate_a * jax.nn.softplus(a_param)
        multiplier = sqrt_bounded_derivative(1 - jnp.exp(2 * log_a), 1000.0)
        multiplier = jnp.where(doc_start[..., None], jnp.ones((), x.dtype), multiplier)
        return linear_scan(jnp.exp(log_a), x * gate_x * multiplier, initial_state=h0, reset=doc_start)


@register("rglru")
class RecurrentBlock(StepByCall):
    """Hawk / Griffin recurrent block (module docstring): ``d_model -> d_model`` through
    an RG-LRU of width ``lru_width`` (``d_model`` if ``None``); parameters
    ``3 d w + 2 w + (k + 1) w + w + 2 (w^2 / H + w) + d``."""

    d_model: int
    num_heads: int = 4
    lru_width: int | None = None
    conv_width: int = 4
    final_w_init_variance_scale: float = 1.0
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def width(self) -> int:
        return self.lru_width or self.d_model

    def setup(self):
        if self.width % self.num_heads:
            raise ValueError(f"num_heads: must divide lru_width = {self.width}, got {self.num_heads}")
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        fan_in = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
        self.linear_y = dense(self.width, kernel_init=fan_in, name="linear_y")
        self.linear_x = dense(self.width, kernel_init=fan_in, name="linear_x")
        out_init = nn.initializers.variance_scaling(self.final_w_init_variance_scale, "fan_in", "normal")
        self.linear_out = dense(self.d_model, kernel_init=out_init, name="linear_out")
        self.conv_w = self.param(
            "conv_w", nn.initializers.variance_scaling(0.01, "fan_in", "normal"),
            (self.conv_width, self.width), self.param_dtype,
        )
        self.conv_b = self.param("conv_b", nn.initializers.zeros_init(), (self.width,), self.param_dtype)
        self.rg_lru = RGLRU(self.width, self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype)
        self.drop = nn.Dropout(self.dropout)

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        return dict(
            conv=jnp.zeros((batch_size, self.conv_width - 1, self.width), dtype),
            h=jnp.zeros((batch_size, self.width), jnp.result_type(dtype, jnp.float32)),
            start=jnp.ones((batch_size,), bool),
        )

    def __call__(self, x, *, state=None, return_state=False, segment_ids=None, reset=None):
        """``segment_ids`` / ``reset`` ``[b, t]`` mark packed documents; each document start
        cuts the conv taps and the RG-LRU state and skips the ``sqrt(1 - a^2)`` factor."""
        x = jnp.asarray(x)
        check_layer_input(x, self.d_model)
        batch, time, _ = x.shape
        if state is None:
            state = self.init_state(batch, x.dtype)
        cut = carry_cut_mask(segment_ids, reset, batch, time, reverse=False)
        first = jnp.arange(time)[None, :] == 0
        doc_start = state["start"][:, None] & first
        doc_start = doc_start if cut is None else doc_start | cut

        y_branch = jax.nn.gelu(self.linear_y(x))
        u = self.linear_x(x)
        u, conv_state = causal_conv1d(u, self.conv_w.astype(u.dtype), self.conv_b.astype(u.dtype),
                                      initial_state=state["conv"], reset=doc_start)
        h, h_last = self.rg_lru(u, doc_start, state["h"])
        y = self.drop(self.linear_out(h.astype(u.dtype) * y_branch), deterministic=self.deterministic)
        if not return_state:
            return y
        start = state["start"] & (time == 0)
        return y, dict(conv=conv_state.astype(state["conv"].dtype), h=h_last, start=start)
