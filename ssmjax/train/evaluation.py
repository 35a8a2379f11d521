"""Losses and the evaluation hook: what :meth:`Task.evaluate` receives.

The loss of a batch is the masked mean cross-entropy of the model's outputs
(logits ``z [..., C]``) against integer targets ``y [...]`` over the positions where
``mask`` is set:

    loss = sum_i m_i * (logsumexp(z_i) - z_i[y_i]) / max(sum_i m_i, 1)     (nats)

``perplexity = exp(loss)``; in bits, ``loss / ln 2`` (bits per character for a
character-level language model). Targets where ``mask`` is False are ignored (they may
hold any value, e.g. ``-100``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int

from ssmjax.data import Batch


@runtime_checkable
class Model(Protocol):
    """What training and evaluation need of a model: Linen's ``init(key, *inputs)`` and
    ``apply(variables, *inputs, **kwargs)`` (any ``flax.linen.Module``, or a
    :class:`ssmjax.train.finetune.FinetunedModel`)."""

    def init(self, *args: Any, **kwargs: Any) -> Any: ...

    def apply(self, *args: Any, **kwargs: Any) -> Any: ...


def masked_sums(logits: Float[Array, "*lead C"], targets: Int[Array, "*lead"],
                mask: Bool[Array, "*lead"]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(sum of cross-entropy, number correct, number of positions)`` over ``mask``
    (float32 scalars); masked-off targets are replaced by 0 before the lookup."""
    logits = logits.astype(jnp.float32)
    weights = mask.astype(jnp.float32)
    targets = jnp.where(mask, targets, 0)
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return jnp.sum(xent * weights), jnp.sum(correct * weights), jnp.sum(weights)


def masked_loss_and_accuracy(logits: Float[Array, "*lead C"], targets: Int[Array, "*lead"],
                             mask: Bool[Array, "*lead"]) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy and argmax accuracy over the positions where ``mask`` is set."""
    xent, correct, count = masked_sums(logits, targets, mask)
    count = jnp.maximum(count, 1.0)
    return xent / count, correct / count


def make_predict(model: Model) -> Callable:
    """``(params, inputs) -> argmax outputs`` (``[b, t]`` for per-position heads, ``[b]``
    for a classifier), jit-compiled."""
    return jax.jit(lambda params, inputs: jnp.argmax(model.apply(params, inputs), -1))


class Evaluator:
    """The model at the current parameters, as :meth:`Task.evaluate` receives it.

    * ``evaluator(inputs)`` (or ``.predict(inputs)``): argmax outputs, NumPy int
      ``[b, t]`` (per-position heads) or ``[b]`` (classifier);
    * ``.logits(inputs)``: the raw outputs, NumPy float32 ``[b, t, C]`` or ``[b, C]``;
    * ``.loss(batches)``: over an iterable of :class:`~ssmjax.data.Batch`, the masked
      mean cross-entropy in nats (``"loss"``), ``"perplexity"`` (``exp(loss)``),
      ``"accuracy"`` and ``"count"`` (masked positions), pooled over all positions (not
      averaged per batch). Each batch is validated like a training batch.

    Inputs are ``[b, t]`` int tokens or ``[b, t, d]`` float features, as in training.
    """

    def __init__(self, model: Model, check: Callable[[Batch, str], None] | None = None):
        self._logits = jax.jit(model.apply)
        self._argmax = make_predict(model)
        self._sums = jax.jit(lambda params, b: masked_sums(model.apply(params, b.inputs), b.targets, b.mask))
        self._check = check
        self.params: Any = None

    def at(self, params: Any) -> "Evaluator":
        """This evaluator at ``params`` (the compiled functions are shared)."""
        self.params = params
        return self

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        return self.predict(inputs)

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        return np.asarray(self._argmax(self.params, jnp.asarray(inputs)))

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        return np.asarray(self._logits(self.params, jnp.asarray(inputs)), np.float32)

    def loss(self, batches: Iterable[Batch]) -> dict[str, float]:
        xent = correct = count = 0.0
        for i, batch in enumerate(batches):
            if self._check is not None:
                self._check(batch, f"evaluation batch {i}")
            sums = self._sums(self.params, Batch(*(jnp.asarray(x) for x in (batch.inputs, batch.targets, batch.mask))))
            xent, correct, count = (a + float(b) for a, b in zip((xent, correct, count), sums))
        if count == 0:
            raise ValueError("batches: no masked position to evaluate (empty iterable or all-False masks)")
        loss = xent / count
        return dict(loss=loss, perplexity=math.exp(min(loss, 700.0)), accuracy=correct / count, count=int(count))
