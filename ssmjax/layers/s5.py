"""S5 (``"s5"``): a multi-input multi-output diagonal SSM evaluated with a parallel scan.

Smith, Warrington and Linderman, 2023, "Simplified State Space Layers for Sequence
Modeling". One SSM with a ``P``-dimensional state mixes all ``H = d_model`` channels::

    x_t = Lambdabar * x_{t-1} + Bbar u_t          x in C^{P/2},  u in R^H
    y_t = 2 Re(C x_t) + D * u_t                   y in R^H

``Lambda`` is diagonal, initialised with the eigenvalues of HiPPO-N (the normal part of
HiPPO-LegS, block-diagonal with ``blocks`` blocks), keeping one eigenvalue of each
conjugate pair (the "conjugate-symmetry trick": ``P/2`` complex states and ``2 Re``).
``B = V^{-1} B0`` and ``C = C0 V`` with ``V`` the HiPPO-N eigenvectors and ``B0 [P, H]``,
``C0 [H, P]`` (complex) LeCun-normal. Each state has its own learned timescale
``dt_p = exp(log_step_p)`` (log-uniform in ``[dt_min, dt_max]``) and the ZOH (default) or
bilinear discretisation ``Lambdabar = exp(dt Lambda)``, ``Bbar = (Lambdabar - 1) / Lambda B``.
The recurrence is :func:`ssmjax.scan.linear_scan` (``method="auto"``) over the complex
``Bbar u``; ``step`` is the same scan with ``T = 1``.

``bidirectional=True`` runs the scan also in reverse (``x'_t = Lambdabar x'_{t+1} + Bbar u_t``)
with its own output matrix: ``y_t = 2 Re(C x_t + C' x'_t) + D u_t`` (non-causal; ``Lambda``,
``B``, ``dt`` shared, as in the reference implementation).

The layer then applies the S5 reference implementation's activation (``activation``):
``"gelu"``: ``GELU(y)``; ``"half_glu1"``: ``g = GELU(y)``, ``g * sigmoid(W2 g)``;
``"half_glu2"``: ``y * sigmoid(W2 GELU(y))``; ``"full_glu"``: ``g = GELU(y)``,
``W1 g * sigmoid(W2 g)`` (``W1, W2`` dense ``H -> H`` with bias). Dropout after the GELU and
at the end.

Parameters (``P = d_state``, ``c = 2`` if bidirectional else 1; ``a = 0`` for ``"gelu"``,
``H^2 + H`` for the half GLUs, ``2 (H^2 + H)`` for ``"full_glu"``)::

    3 P / 2 + (1 + c) P H + H + a
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssmjax.checks import check_choice
from ssmjax.layers.hippo import s5_hippo_n_init
from ssmjax.layers.common import (
    StepByCall,
    as_complex,
    check_layer_input,
    constant,
    no_state_when_bidirectional,
    state_float,
    uniform_log_init,
)
from ssmjax.layers.registry import register
from ssmjax.scan.linear import linear_scan
from ssmjax.scan.lti import DISCRETISATIONS, discretize_diagonal

S5_ACTIVATIONS = ("gelu", "half_glu1", "half_glu2", "full_glu")


def eigenvector_projected(init, matrix, side: str):
    """Initialiser: draw a real array with ``init`` and return ``matrix @ X`` (``side="left"``,
    ``X [P, H] -> [P/2, H]``) or ``X @ matrix`` (``side="right"``, ``X [..., H, P]`` complex from
    its trailing real pair ``[..., H, P, 2]``), as ``[..., 2]`` real pairs."""

    def draw(key, shape, dtype=jnp.float32):
        m = jnp.asarray(matrix)
        if side == "left":
            z = m @ init(key, (matrix.shape[1], shape[1]), jnp.float32).astype(m.real.dtype)
        else:
            pairs = init(key, shape[:-2] + (matrix.shape[0], 2), jnp.float32).astype(m.real.dtype)
            z = jax.lax.complex(pairs[..., 0], pairs[..., 1]) @ m
        return jnp.stack([z.real, z.imag], axis=-1).astype(dtype)

    return draw


@register("s5")
class S5(StepByCall):
    """S5 layer (module docstring): ``d_model -> d_model`` through a ``P = d_state``
    dimensional diagonal SSM (``P/2`` complex states); parameters
    ``3 P / 2 + (1 + c) P H + H + a``."""

    d_model: int
    d_state: int = 64
    blocks: int = 1
    discretization: str = "zoh"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    activation: str = "half_glu1"
    bidirectional: bool = False
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    SSM_PARAMETERS: ClassVar[frozenset[str]] = frozenset({"Lambda_re", "Lambda_im", "B", "log_step"})

    def setup(self):
        check_choice("discretization", self.discretization, DISCRETISATIONS)
        check_choice("activation", self.activation, S5_ACTIVATIONS)
        h, half = self.d_model, self.d_state // 2
        Lambda, V, V_inv = s5_hippo_n_init(self.d_state, self.blocks)
        c = 2 if self.bidirectional else 1
        lecun = nn.initializers.lecun_normal()
        lecun_rows = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
                                                      batch_axis=(0, 1))
        self.Lambda_re = self.param("Lambda_re", constant(Lambda.real), (half,), self.param_dtype)
        self.Lambda_im = self.param("Lambda_im", constant(Lambda.imag), (half,), self.param_dtype)
        self.B = self.param("B", eigenvector_projected(lecun, V_inv, "left"), (half, h, 2), self.param_dtype)
        self.C = self.param("C", eigenvector_projected(lecun_rows, V, "right"), (c, h, half, 2), self.param_dtype)
        self.D = self.param("D", nn.initializers.normal(1.0), (h,), self.param_dtype)
        self.log_step = self.param("log_step", uniform_log_init(self.dt_min, self.dt_max), (half,), self.param_dtype)
        dense = lambda name: nn.Dense(h, dtype=self.dtype, param_dtype=self.param_dtype, name=name)  # noqa: E731
        self.out1 = dense("out1") if self.activation == "full_glu" else None
        self.out2 = dense("out2") if self.activation != "gelu" else None
        self.drop = nn.Dropout(self.dropout)

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        return dict(x=jnp.zeros((batch_size, self.d_state // 2), jnp.result_type(dtype, jnp.complex64)))

    def discretized(self, real_dtype):
        """``(Lambdabar [P/2], Bbar [P/2, H], C [c, H, P/2])``."""
        Lambda = jax.lax.complex(self.Lambda_re.astype(real_dtype), self.Lambda_im.astype(real_dtype))
        step = jnp.exp(self.log_step.astype(real_dtype))
        log_A_bar, B_bar = discretize_diagonal(
            Lambda[:, None], as_complex(self.B.astype(real_dtype)), step[:, None], self.discretization
        )
        return jnp.exp(log_A_bar[:, 0]), B_bar, as_complex(self.C.astype(real_dtype))

    def activate(self, y, out_dtype):
        y = y.astype(out_dtype)
        g = self.drop(jax.nn.gelu(y), deterministic=self.deterministic)
        if self.activation == "half_glu1":
            g = g * jax.nn.sigmoid(self.out2(g))
        elif self.activation == "half_glu2":
            g = y * jax.nn.sigmoid(self.out2(g))
        elif self.activation == "full_glu":
            g = self.out1(g) * jax.nn.sigmoid(self.out2(g))
        return self.drop(g, deterministic=self.deterministic) if self.activation != "gelu" else g

    def __call__(self, x, *, state=None, return_state=False):
        x = jnp.asarray(x)
        check_layer_input(x, self.d_model)
        no_state_when_bidirectional("s5", self.bidirectional, state, return_state)
        out_dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        u = x.astype(state_float(x.dtype))
        A_bar, B_bar, C = self.discretized(u.dtype)
        Bu = jnp.einsum("bth,ph->btp", u, B_bar)
        xs, x_last = linear_scan(A_bar, Bu, initial_state=None if state is None else state["x"])
        y = jnp.einsum("btp,hp->bth", xs, C[0])
        if self.bidirectional:
            xs_reverse, _ = linear_scan(A_bar, Bu, reverse=True)
            y = y + jnp.einsum("btp,hp->bth", xs_reverse, C[1])
        y = self.activate(2 * y.real + self.D.astype(u.dtype) * u, out_dtype)
        return (y, dict(x=x_last)) if return_state else y
