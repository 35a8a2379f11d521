"""Pieces shared by the linear-attention family of mixers (``linear_attention``,
``retnet``, ``gla``, ``hgrn``, ``hgrn2``, ``deltanet``, ``gated_deltanet``, ``mlstm``,
``aaren``, ``lightnet``): the ``__call__`` / ``step`` plumbing of the layer contract,
head reshapes, per-head normalisations, the short causal convolution and the
"ones column" trick that makes a linear-attention scan carry its own normaliser.

No recurrence lives here: the layers call :mod:`ssmjax.scan`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike
from jaxtyping import Float

from ssmjax.scan._checks import check_ndim, check_shape
from ssmjax.scan.conv import causal_conv1d
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


class RecurrentMixer(nn.Module):
    """Contract plumbing for a causal mixer with a recurrent state.

    Subclasses are dataclasses with ``d_model``, ``dropout`` and ``deterministic``
    fields and define ``init_state(batch_size, dtype)`` and
    ``mix(x, state) -> (y, new_state)``; ``__call__`` checks the input, starts from
    ``init_state`` when no state is given and applies output dropout; ``step`` is
    ``__call__`` on one token (every mix is the scan op evaluated with ``T = 1``).
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

    def step(self, x_t, state):
        """One token: ``x_t [batch, d_model]`` -> ``(y_t [batch, d_model], new_state)``."""
        y, state = self(jnp.asarray(x_t)[:, None], state=state, return_state=True)
        return y[:, 0], state


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


def state_float(dtype) -> jnp.dtype:
    """The dtype a recurrent state accumulates in: at least float32."""
    return jnp.result_type(dtype, jnp.float32)


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


def conv_weight(module: nn.Module, width: int, channels: int, name: str = "conv_w"):
    """Depthwise causal conv kernel ``[width, channels]``, ``U(-width^-1/2, width^-1/2)``
    (PyTorch's ``Conv1d`` default with fan-in ``width``); no bias."""
    return module.param(name, uniform_init(1.0 / math.sqrt(width)), (width, channels), module.param_dtype)


def short_conv_silu(
    x: Float[Array, "batch time channels"], weight: ArrayLike, state: Float[Array, "batch k1 channels"]
) -> tuple[Float[Array, "batch time channels"], Float[Array, "batch k1 channels"]]:
    """``silu(causal_conv1d(x))`` (bias-free short convolution) and the new conv state, in
    the dtype of ``state``."""
    y, new_state = causal_conv1d(x, jnp.asarray(weight, x.dtype), initial_state=state.astype(x.dtype))
    return jax.nn.silu(y), new_state.astype(state.dtype)


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
