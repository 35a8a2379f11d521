"""Block-recurrent surrogates of a Vision Transformer (Raptor) and the layer-similarity
analysis that finds their phases.

Jacobs, Fel, Hakim, Brondetta, Ba & Keller, 2025, "Block-Recurrent Dynamics in Vision
Transformers" (arXiv:2512.19941; ICLR 2026).

**The ViT** (the teacher, depth ``L``), on ``N`` flattened image patches ``x_1..x_N``::

    a_0 = [c; W_p x_1; ...; W_p x_N]                      [b, T, d], T = N + 1 with the cls token c
    a_l = f_l(a_{l-1}),  f_l(a) = a + u_l(a),  l = 1..L   (u_l: the residual update of block l)
    logits = W_h pool(LN(a_L))                           pool: the cls token, or the mean of the tokens

``f_l`` is the backbone's pre-norm block (:class:`ssmjax.models.backbone.Block`:
``a + mixer(LN a)``, then ``+ mlp(LN .)``) with a bidirectional mixer (attention with RoPE
over the raster order of the patches). Stochastic depth (Huang et al., 2016, "Deep Networks
with Stochastic Depth"), only in training: ``a_l = a_{l-1} + m_l / (1 - p_l) u_l(a_{l-1})``,
``m_l ~ Bernoulli(1 - p_l)`` per example, ``p_l = p l / L`` (the linear decay rule).

**Block-Recurrent Hypothesis** (the paper's eps-BRH): there are ``k << L`` blocks
``B_1..B_k`` and phase lengths ``n_1 + ... + n_k = L`` such that every intermediate
representation of the ViT is recovered to within eps by

    a_hat_0 = a_0,   a_hat_l = B_{j(l)}(a_hat_{l-1}; l),   j(l) = the phase of layer l,

i.e. ``a_hat_L = B_k^{n_k} o ... o B_1^{n_1}(a_0)``: each phase is one block (shared
parameters) applied ``n_j`` times, so the surrogate costs the same as the ViT.
:class:`Raptor` is that surrogate; each block ``B_j`` is a backbone block with optional
depth conditioning (the paper's ``t_scale``)::

    B_j(a; l) = g_out(l) * (a + g_res(l) * u_j(a)),   (g_res, g_out) = 1 + MLP_j(l)

``MLP_j``: ``1 -> 16 -> 2d`` with SiLU, its last layer initialised to zero, so training
starts from the plain tied block (the paper initialises it to N(0, 1e-4) and gates the
attention and MLP updates separately).

**Training** (the paper's recipe, on the teacher's activations ``a_0..a_L``):

    L_TF = 1/L sum_l mse(B_{j(l)}(a_{l-1}; l), a_l)     teacher-forced: each block from the teacher's input
    L_AR = 1/L sum_l mse(a_hat_l, a_l)                  autoregressive: the surrogate's own rollout

where ``mse`` may weight the cls token against the patch tokens (:func:`trajectory_mse`).
The paper anneals each block from ``L_TF`` to ``L_AR`` and then trains the assembled
surrogate on ``L_AR``; :mod:`experiments.raptor` runs an ``L_TF`` stage, then an ``L_AR``
stage. The surrogate is read out by the teacher's own head on ``a_hat_L``.

**Similarity and phases.** Linear CKA (Kornblith, Norouzi, Lee & Hinton, 2019, "Similarity
of Neural Network Representations Revisited") between representations ``X [n, d1]`` and
``Y [n, d2]`` of the same ``n`` rows (here: every token of a fixed batch of images)::

    CKA(X, Y) = ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F),   X_c = X - column means

equal to ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with the linear Gram matrices
``K = X X^T``, ``L = Y Y^T`` and ``HSIC(K, L) = tr(K H L H)``, ``H = I - 11^T / n``. The
phases of a layer-by-layer similarity matrix ``S [L, L]`` are the contiguous segmentation
into ``k`` runs of layers whose block-constant approximation (each (phase, phase) block of
``S`` replaced by its mean) explains the most variance of ``S`` (:func:`block_fit`), found
by exhaustive search over the ``C(L-1, k-1)`` segmentations (:func:`find_phases`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ssmjax.checks import check_choice, check_positive_int
from ssmjax.models.backbone import Block

POOLINGS = ("cls", "mean")


# ----------------------------------------------------------------------------- similarity


def linear_cka(x: Array, y: Array) -> Array:
    """Linear CKA of two representations ``x [n, d1]``, ``y [n, d2]`` of the same ``n`` rows
    (module docstring); a scalar."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x, y: expected [n, d1] and [n, d2] with the same n, got {x.shape} and {y.shape}")
    x = x - x.mean(0)
    y = y - y.mean(0)
    cross = jnp.sum((y.T @ x) ** 2)
    return cross / (jnp.linalg.norm(x.T @ x) * jnp.linalg.norm(y.T @ y))


def similarity_matrix(reps: Float[Array, "layers n d"]) -> Float[Array, "layers layers"]:
    """``S[l, m] = CKA(reps[l], reps[m])`` for representations of one width ``d``."""
    centred = reps - reps.mean(1, keepdims=True)
    cross = jnp.einsum("lnd,mne->lmde", centred, centred)  # X_l^T X_m
    squares = jnp.sum(cross ** 2, (-2, -1))  # ||X_l^T X_m||_F^2
    norms = jnp.sqrt(jnp.diagonal(squares))
    return squares / (norms[:, None] * norms[None, :])


def segmentations(n_layers: int, k: int) -> Iterator[tuple[int, ...]]:
    """Every split of ``n_layers`` layers into ``k`` contiguous non-empty phases, as phase
    lengths, in lexicographic order of the cut points."""
    check_positive_int("n_layers", n_layers)
    check_positive_int("k", k)
    if k > n_layers:
        raise ValueError(f"k: {k} phases need at least {k} layers, got n_layers = {n_layers}")
    for cuts in itertools.combinations(range(1, n_layers), k - 1):
        edges = (0, *cuts, n_layers)
        yield tuple(b - a for a, b in zip(edges[:-1], edges[1:]))


def phase_index(lengths: tuple[int, ...]) -> np.ndarray:
    """``[sum(lengths)]`` int: the phase of every layer (0-based)."""
    return np.repeat(np.arange(len(lengths)), lengths)


def block_fit(similarity: np.ndarray, lengths: tuple[int, ...]) -> float:
    """Fraction of the variance of ``similarity [L, L]`` explained by its block-constant
    approximation under the phases ``lengths`` (each (phase, phase) block replaced by its
    mean): ``1 - SSE / SST`` in [0, 1]; 0 for one phase, 1 for a matrix constant on blocks."""
    s = np.asarray(similarity, np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or sum(lengths) != s.shape[0] or min(lengths) < 1:
        raise ValueError(f"lengths: expected positive phase lengths summing to the size of the square similarity "
                         f"matrix, got {lengths} for shape {s.shape}")
    phase = phase_index(lengths)
    k = len(lengths)
    one_hot = np.eye(k)[phase]  # [L, k]
    sums = one_hot.T @ s @ one_hot
    counts = np.outer(lengths, lengths)
    fitted = (sums / counts)[phase][:, phase]
    total = np.sum((s - s.mean()) ** 2)
    return float(1 - np.sum((s - fitted) ** 2) / total) if total > 0 else 1.0


def find_phases(similarity: np.ndarray, k: int) -> tuple[tuple[int, ...], float]:
    """``(phase lengths, block_fit)`` of the best contiguous ``k``-phase segmentation of
    ``similarity [L, L]`` (exhaustive; ties go to the first in :func:`segmentations`)."""
    best = max(segmentations(len(similarity), k), key=lambda lengths: block_fit(similarity, lengths))
    return best, block_fit(similarity, best)


# ----------------------------------------------------------------------------- models


def _block(mixer: str, d_model: int, mixer_fields: Mapping | None, mlp: str, mlp_ratio: float) -> Block:
    """A bidirectional pre-LayerNorm backbone block, named ``block``."""
    return Block(mixer, d_model, dict(mixer_fields or {}), mlp=mlp, mlp_ratio=mlp_ratio, norm="layer",
                 bidirectional=True, name="block")


class _ViTLayer(nn.Module):
    """One ViT layer with stochastic depth, the ``nn.scan`` body over depth: carry ``a_{l-1}``,
    input the layer's drop probability ``p_l``, broadcast ``stochastic`` (training with
    ``drop_path > 0``); returns ``(a_l, a_l)``."""

    mixer: str
    d_model: int
    mixer_fields: Mapping | None
    mlp: str
    mlp_ratio: float

    @nn.compact
    def __call__(self, h: Float[Array, "b t d"], rate: Float[Array, ""], stochastic: bool):
        update = _block(self.mixer, self.d_model, self.mixer_fields, self.mlp, self.mlp_ratio).forward(h) - h
        if stochastic:
            keep = jax.random.bernoulli(self.make_rng("drop_path"), 1 - rate, (h.shape[0], 1, 1))
            update = update * keep.astype(h.dtype) / (1 - rate).astype(h.dtype)
        h = h + update
        return h, h


class ViT(nn.Module):
    """Patch tokens ``[b, N, p*p]`` -> logits ``[b, num_classes]`` through ``n_layers``
    backbone blocks (module docstring); :meth:`trajectory` returns every ``a_l``. The blocks
    are one ``nn.scan`` over depth (parameters stacked ``[n_layers, ...]`` under ``layers``),
    so compile time does not grow with depth."""

    num_classes: int
    d_model: int = 64
    n_layers: int = 8
    mixer: str = "attention"
    mixer_fields: Mapping[str, Mapping] | None = None
    mlp: str = "gelu"
    mlp_ratio: float = 4.0
    pooling: str = "cls"
    drop_path: float = 0.0  # stochastic depth: the last block's drop probability (module docstring)

    def setup(self):
        check_choice("pooling", self.pooling, POOLINGS)
        check_positive_int("n_layers", self.n_layers)
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path: expected a probability in [0, 1), got {self.drop_path}")
        self.patch_embed = nn.Dense(self.d_model)
        if self.pooling == "cls":
            self.cls_token = self.param("cls_token", nn.initializers.normal(0.02), (self.d_model,))
        self.layers = nn.scan(_ViTLayer, variable_axes={"params": 0}, split_rngs={"params": True, "drop_path": True},
                              in_axes=(0, nn.broadcast), out_axes=0, length=self.n_layers)(
            self.mixer, self.d_model, self.mixer_fields, self.mlp, self.mlp_ratio)
        self.final_norm = nn.LayerNorm()
        self.head = nn.Dense(self.num_classes)

    def embed(self, patches: Float[Array, "b n p"]) -> Float[Array, "b t d"]:
        """``a_0``: the projected patches, after the cls token when ``pooling == "cls"``."""
        h = self.patch_embed(patches)
        if self.pooling == "cls":
            cls = jnp.broadcast_to(self.cls_token.astype(h.dtype), (h.shape[0], 1, self.d_model))
            h = jnp.concatenate([cls, h], 1)
        return h

    def drop_rates(self) -> np.ndarray:
        """``p_l = drop_path * l / L`` for ``l = 1..L`` (the linear decay rule)."""
        return self.drop_path * np.arange(1, self.n_layers + 1) / self.n_layers

    def trajectory(self, patches: Float[Array, "b n p"], train: bool = False) -> Float[Array, "l b t d"]:
        """``[a_0, ..., a_L]`` stacked ``[L + 1, b, T, d]``; with ``train`` and ``drop_path > 0``
        stochastic depth is applied with the ``"drop_path"`` rng."""
        h = self.embed(patches)
        _, out = self.layers(h, jnp.asarray(self.drop_rates(), h.dtype), train and self.drop_path > 0)
        return jnp.concatenate([h[None], out])

    def classify(self, h: Float[Array, "b t d"]) -> Float[Array, "b c"]:
        """The head on a last representation ``a_L`` (the ViT's or a surrogate's)."""
        h = self.final_norm(h)
        return self.head(h[:, 0] if self.pooling == "cls" else h.mean(1))

    def __call__(self, patches: Float[Array, "b n p"], train: bool = False) -> Float[Array, "b c"]:
        return self.classify(self.trajectory(patches, train)[-1])


class DepthGains(nn.Module):
    """``(g_res, g_out) = 1 + MLP(l)``, each ``[d_model]``: ``1 -> hidden -> 2 d_model``,
    SiLU, last layer zero-initialised (module docstring)."""

    d_model: int
    hidden: int = 16

    @nn.compact
    def __call__(self, depth: Float[Array, ""]) -> tuple[Float[Array, "d"], Float[Array, "d"]]:
        h = nn.silu(nn.Dense(self.hidden)(jnp.reshape(depth, (1,)).astype(jnp.float32)))
        gains = 1 + nn.Dense(2 * self.d_model, kernel_init=nn.initializers.zeros)(h)
        return gains[: self.d_model], gains[self.d_model:]


class _RaptorStep(nn.Module):
    """``B_j(h; l)``: one backbone block and its depth gains (module docstring). Used unbound,
    as the template that :class:`Raptor` applies with block ``j``'s parameters."""

    mixer: str
    d_model: int
    mixer_fields: Mapping | None
    mlp: str
    mlp_ratio: float
    depth_gains: bool

    @nn.compact
    def __call__(self, h: Float[Array, "b t d"], depth: Float[Array, ""]) -> Float[Array, "b t d"]:
        y = _block(self.mixer, self.d_model, self.mixer_fields, self.mlp, self.mlp_ratio).forward(h)
        if self.depth_gains:
            g_res, g_out = DepthGains(self.d_model, name="gains")(depth)
            y = g_out.astype(h.dtype) * (h + g_res.astype(h.dtype) * (y - h))
        return y


class Raptor(nn.Module):
    """``k = len(phase_lengths)`` tied blocks; block ``j`` is applied ``phase_lengths[j]``
    times in a row (module docstring). Maps the teacher's ``a_0`` to ``[a_hat_1..a_hat_L]``.

    The ``k`` blocks' parameters are stacked ``[k, ...]`` in one parameter ``blocks`` (a
    backbone block under ``block``, its gains under ``gains``), initialised on a one-token
    input (mixers whose parameter shapes depend on the sequence length are not supported);
    the rollout is one ``lax.scan`` over the ``L`` layers that applies block ``j(l)``, so the
    compiled program has one block whatever ``k``."""

    phase_lengths: tuple[int, ...]
    d_model: int = 64
    mixer: str = "attention"
    mixer_fields: Mapping[str, Mapping] | None = None
    mlp: str = "gelu"
    mlp_ratio: float = 4.0
    depth_gains: bool = True

    def setup(self):
        if not self.phase_lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                         for n in self.phase_lengths):
            raise ValueError(f"phase_lengths: expected a non-empty tuple of positive ints, got {self.phase_lengths}")

        def init_blocks(key):
            dummy = (jnp.zeros((1, 1, self.d_model)), jnp.ones(()))
            keys = jax.random.split(key, len(self.phase_lengths))
            return jax.vmap(lambda k: self._step().init(k, *dummy)["params"])(keys)

        self.blocks = self.param("blocks", init_blocks)

    def _step(self) -> _RaptorStep:
        return _RaptorStep(self.mixer, self.d_model, self.mixer_fields, self.mlp, self.mlp_ratio, self.depth_gains,
                           parent=None)

    def _run(self, h: Float[Array, "b t d"], forced: Float[Array, "l b t d"] | None) -> Float[Array, "l b t d"]:
        """Scan over layers ``l = 1..L``: ``out_l = B_{j(l)}(source_l; l)`` with ``source_l`` the
        previous output (rollout) or ``forced[l - 1]`` (teacher forcing)."""
        step = self._step()

        def layer(carry, inputs):
            phase, depth, source = inputs
            params = jax.tree.map(lambda a: a[phase], self.blocks)
            out = step.apply({"params": params}, carry if source is None else source, depth)
            return out, out

        n_layers = sum(self.phase_lengths)
        phases = jnp.asarray(phase_index(tuple(self.phase_lengths)))
        depths = jnp.arange(1, n_layers + 1, dtype=h.dtype)
        return jax.lax.scan(layer, h, (phases, depths, forced))[1]

    def __call__(self, a0: Float[Array, "b t d"]) -> Float[Array, "l b t d"]:
        """The autoregressive rollout ``[a_hat_1, ..., a_hat_L]``."""
        return self._run(a0, None)

    def teacher_forced(self, inputs: Float[Array, "l b t d"]) -> Float[Array, "l b t d"]:
        """One step per layer from the teacher's own inputs ``[a_0, ..., a_{L-1}]``."""
        if inputs.shape[0] != sum(self.phase_lengths):
            raise ValueError(f"inputs: expected [L = {sum(self.phase_lengths)}, b, t, d], got {inputs.shape}")
        return self._run(inputs[0], inputs)


def trajectory_mse(pred: Array, target: Array, cls_weight: float | None = None) -> Array:
    """Mean squared error of ``pred`` against ``target`` (both ``[L, b, T, d]``) over layers,
    examples, tokens and features; with ``cls_weight``,
    ``cls_weight * mse(token 0) + (1 - cls_weight) * mse(tokens 1..)`` (the paper weights its
    cls and patch tokens separately)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred, target: expected equal shapes, got {pred.shape} and {target.shape}")
    if cls_weight is None:
        return jnp.mean((pred - target) ** 2)
    if not 0.0 <= cls_weight <= 1.0:
        raise ValueError(f"cls_weight: expected a weight in [0, 1], got {cls_weight}")
    cls = jnp.mean((pred[..., 0, :] - target[..., 0, :]) ** 2)
    patches = jnp.mean((pred[..., 1:, :] - target[..., 1:, :]) ** 2)
    return cls_weight * cls + (1 - cls_weight) * patches


def r2_score(pred: np.ndarray, target: np.ndarray) -> float:
    """``1 - sum (pred - target)^2 / sum (target - mean target)^2`` over rows ``[..., d]``
    flattened to ``[rows, d]``, the mean taken per feature (the paper's R^2 of a representation)."""
    pred = np.asarray(pred, np.float64).reshape(-1, np.shape(pred)[-1])
    target = np.asarray(target, np.float64).reshape(-1, np.shape(target)[-1])
    if pred.shape != target.shape:
        raise ValueError(f"pred, target: expected equal shapes, got {pred.shape} and {target.shape}")
    return float(1 - np.sum((pred - target) ** 2) / np.sum((target - target.mean(0)) ** 2))
