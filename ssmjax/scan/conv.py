"""Convolutions over time: the short causal conv of Mamba / H3 / DeltaNet / Hawk, and the
long FFT convolution that evaluates LTI state-space models (S4, S4D, DSS, H3, LMU) in
parallel.

Both follow the scan conventions: batch-first ``[batch, time, channels]``, packed
sequences through ``segment_ids``/``reset`` (no tap reaches into another document).

Lowered for CPU (float32 / float64), the short conv and its backward run as C++ kernels
through XLA's FFI (``_conv_cpu.cc``, built on first use by :mod:`ssmjax.scan._ffi`; the
XLA evaluation where no compiler is found or under ``ssmjax.scan._ffi.cpu_kernels(False)``):
one pass over the sequence each way. In XLA the weight gradient (``k`` reductions over
batch and time of ``g`` times a shifted slice of the input) ran 5-10x slower than an
aligned reduction, making forward+backward 3-10x the forward; the kernel accumulates it
in the same pass as the input gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike
from jaxtyping import Float

from ssmjax.scan import _dispatch, _ffi
from ssmjax.scan._checks import carry_cut_mask, check_floating, check_ndim, check_shape


def document_index(cut: Array | None, batch: int, time: int) -> Array:
    """Running document number ``[batch, time]`` (0 where no cuts are given)."""
    if cut is None:
        return jnp.zeros((batch, time), jnp.int32)
    return jnp.cumsum(cut.astype(jnp.int32), axis=1)


def _taps(
    padded: Float[Array, "batch span d"],
    doc_padded: Array,
    doc: Array,
    k: int,
    length: int,
) -> list[Array]:
    """Tap ``j`` of every output position, zeroed where it reaches into another document:
    ``padded[:, p + j]`` for output ``p`` in ``[0, length)``."""
    taps = []
    for j in range(k):  # k is a small static int
        tap = jax.lax.slice_in_dim(padded, j, j + length, axis=1)
        same_doc = jax.lax.slice_in_dim(doc_padded, j, j + length, axis=1) == doc
        taps.append(jnp.where(same_doc[..., None], tap, 0))
    return taps


def _pad_doc(doc: Array, before: int, after: int = 0, fill: int = 0) -> Array:
    batch = doc.shape[0]
    return jnp.concatenate([jnp.full((batch, before), fill, doc.dtype), doc,
                            jnp.full((batch, after), fill, doc.dtype)], axis=1)


@jax.custom_vjp
def _causal_conv(
    x: Float[Array, "batch time d"],
    weight: Float[Array, "k d"],
    history: Float[Array, "batch k1 d"],
    doc: Array,
) -> Float[Array, "batch time d"]:
    """``y_t = sum_j weight[j] * x_{t-k+1+j}`` over ``[history, x]`` within a document.

    Custom VJP: the transpose of a causal convolution is an anti-causal one with the same
    taps, so the backward is k shifted multiply-adds like the forward (autodiff would
    build k padded scatters of the full sequence):

        d[history, x]_p = sum_j weight[j] * g_{p-j}    (same document, 0 <= p - j < T)
        d weight[j]     = sum_{b,t} g_t * x_{t-k+1+j}   (same document)
    """
    k, time = weight.shape[0], x.shape[1]
    padded = jnp.concatenate([history, x], axis=1)  # [b, k-1+t, d]
    taps = _taps(padded, _pad_doc(doc, k - 1), doc, k, time)
    return sum(tap * weight[j] for j, tap in enumerate(taps))


def _causal_conv_fwd(x, weight, history, doc):
    return _causal_conv(x, weight, history, doc), (x, weight, history, doc)


def _causal_conv_bwd(residuals, g):
    x, weight, history, doc = residuals
    k, time = weight.shape[0], x.shape[1]
    padded = jnp.concatenate([history, x], axis=1)
    doc_padded = _pad_doc(doc, k - 1)
    taps = _taps(padded, doc_padded, doc, k, time)
    d_weight = jnp.stack([jnp.sum(g * tap, axis=(0, 1)) for tap in taps])
    # Input position p receives g_{p-j} * weight[j]: tap (k-1-j) of g padded by k-1 on each side.
    zeros = jnp.zeros((g.shape[0], k - 1, g.shape[2]), g.dtype)
    g_padded = jnp.concatenate([zeros, g, zeros], axis=1)
    g_doc = _pad_doc(doc, k - 1, k - 1, fill=-1)  # padding never matches a document
    g_taps = _taps(g_padded, g_doc, doc_padded, k, time + k - 1)
    d_padded = sum(g_tap * weight[k - 1 - j] for j, g_tap in enumerate(g_taps))
    return d_padded[:, k - 1:], d_weight, d_padded[:, : k - 1], None


_causal_conv.defvjp(_causal_conv_fwd, _causal_conv_bwd)

#: The C++ CPU kernels (``_conv_cpu.cc``): FFI target names and their symbols.
_CPU_KERNELS = (
    ("ssmjax_causal_conv_forward", "SsmjaxCausalConvForward"),
    ("ssmjax_causal_conv_backward", "SsmjaxCausalConvBackward"),
)


@jax.custom_vjp
def _cpu_causal_conv(x, weight, history, doc):
    """:func:`_causal_conv` lowered for CPU: the C++ kernels (same math, same VJP)."""
    call = jax.ffi.ffi_call(_CPU_KERNELS[0][0], jax.ShapeDtypeStruct(x.shape, x.dtype), vmap_method="sequential")
    return call(x, weight, history, doc)


def _cpu_causal_conv_fwd(x, weight, history, doc):
    return _cpu_causal_conv(x, weight, history, doc), (x, weight, history, doc)


def _cpu_causal_conv_bwd(residuals, g):
    x, weight, history, doc = residuals
    types = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, weight, history))
    call = jax.ffi.ffi_call(_CPU_KERNELS[1][0], types, vmap_method="sequential")
    dx, d_weight, d_history = call(x, weight, history, doc, g.astype(x.dtype))
    return dx, d_weight, d_history, None


_cpu_causal_conv.defvjp(_cpu_causal_conv_fwd, _cpu_causal_conv_bwd)


def _conv(x, weight, history, doc):
    """:func:`_causal_conv`, as the C++ kernels when lowered for CPU (float32 / float64)."""
    if x.dtype not in (np.float32, np.float64) or not (_ffi.enabled() and _ffi.load("conv_cpu", _CPU_KERNELS)):
        return _causal_conv(x, weight, history, doc)
    return _ffi.cpu_or(_cpu_causal_conv, _causal_conv, x, weight, history, doc.astype(jnp.int32))


@_dispatch.sequence_parallel_route("causal_conv1d")
def causal_conv1d(
    x: ArrayLike,
    weight: ArrayLike,
    bias: ArrayLike | None = None,
    *,
    initial_state: ArrayLike | None = None,
    segment_ids: ArrayLike | None = None,
    reset: ArrayLike | None = None,
) -> tuple[Array, Array]:
    """Depthwise causal convolution ``y_t[c] = bias[c] + sum_j weight[j, c] x_{t-k+1+j}[c]``.

    Args:
      x: ``[batch, time, channels]``.
      weight: ``[k, channels]``; ``weight[-1]`` multiplies the current token.
      bias: ``[channels]`` or ``None``.
      initial_state: the ``k - 1`` inputs before ``x`` ``[batch, k - 1, channels]``
        (zeros if ``None``); it belongs to the first document of each row.
      segment_ids, reset: packed documents; taps never cross a document boundary.

    Returns:
      ``(y [batch, time, channels], final_state [batch, k - 1, channels])``: the state is
      the last ``k - 1`` inputs (zeroed where they belong to an earlier document than the
      last token), so chunked calls and :func:`causal_conv1d_step` continue exactly.

    Under :func:`ssmjax.distributed.sequence_parallel`, runs
    :func:`ssmjax.distributed.sequence.causal_conv1d_sp` (each shard takes the ``k - 1``
    inputs before it from the previous device) when ``time`` divides over the ``seq`` axis
    with at least ``k - 1 >= 1`` tokens per device; unchanged otherwise.
    """
    x, weight = jnp.asarray(x), jnp.asarray(weight)
    check_floating("x", x)
    check_ndim("x", x, 3, "[batch, time, channels]")
    batch, time, channels = x.shape
    check_ndim("weight", weight, 2, "[k, channels]")
    check_shape("weight", weight, (weight.shape[0], channels), "[k, channels]")
    k = weight.shape[0]
    if initial_state is None:
        history = jnp.zeros((batch, k - 1, channels), x.dtype)
    else:
        history = jnp.asarray(initial_state)
        check_shape("initial_state", history, (batch, k - 1, channels), "[batch, k - 1, channels]")
    cut = carry_cut_mask(segment_ids, reset, batch, time, reverse=False)
    doc = document_index(cut, batch, time)
    y = _conv(x, weight.astype(x.dtype), history.astype(x.dtype), doc)
    if bias is not None:
        bias = jnp.asarray(bias)
        check_shape("bias", bias, (channels,), "[channels]")
        y = y + bias.astype(x.dtype)
    return y, last_inputs(x, history.astype(x.dtype), doc)


def last_inputs(x: Float[Array, "batch time d"], history: Float[Array, "batch k1 d"], doc: Array
                ) -> Float[Array, "batch k1 d"]:
    """The state after ``x``: the last ``k - 1`` inputs of ``[history, x]``, zeroed where they
    belong to an earlier document than the last token (``doc``: :func:`document_index`)."""
    batch, time = doc.shape
    tail = jnp.concatenate([history, x], axis=1)[:, time:]
    doc_tail = jnp.concatenate([jnp.zeros((batch, history.shape[1]), doc.dtype), doc], axis=1)[:, time:]
    return jnp.where((doc_tail == doc[:, -1:])[..., None], tail, 0)


def causal_conv1d_step(
    x_t: Float[Array, "batch channels"],
    state: Float[Array, "batch k1 channels"],
    weight: Float[Array, "k channels"],
    bias: Float[Array, " channels"] | None = None,
) -> tuple[Float[Array, "batch channels"], Float[Array, "batch k1 channels"]]:
    """One token of :func:`causal_conv1d`: ``(y_t, new_state)``."""
    window = jnp.concatenate([state, x_t[:, None]], axis=1)  # [b, k, c]
    y = jnp.einsum("bkc,kc->bc", window, weight)
    if bias is not None:
        y = y + bias
    return y, window[:, 1:]


def fft_causal_convolution(u: ArrayLike, kernel: ArrayLike) -> Array:
    """``y_t = sum_{s <= t} kernel[t - s] u_s`` per channel, via a zero-padded FFT
    (``O(T log T)``); ``u`` ``[batch, time, channels]``, ``kernel`` ``[length, channels]``
    (truncated to, or zero-extended to, ``time`` taps). Real or complex."""
    u, kernel = jnp.asarray(u), jnp.asarray(kernel)
    check_floating("u", u)
    check_floating("kernel", kernel)
    check_ndim("u", u, 3, "[batch, time, channels]")
    check_ndim("kernel", kernel, 2, "[length, channels]")
    check_shape("kernel", kernel, (kernel.shape[0], u.shape[2]), "[length, channels]")
    time = u.shape[1]
    kernel = kernel[:time]
    n = 2 * time
    if jnp.iscomplexobj(u) or jnp.iscomplexobj(kernel):
        y = jnp.fft.ifft(jnp.fft.fft(u, n, axis=1) * jnp.fft.fft(kernel, n, axis=0), axis=1)
    else:
        y = jnp.fft.irfft(jnp.fft.rfft(u, n, axis=1) * jnp.fft.rfft(kernel, n, axis=0), n, axis=1)
    return y[:, :time]
