"""Position-sensitive synthetic tasks that attention with only relative positions cannot
fit (Luo et al., 2022, "Your Transformer May Not be as Powerful as You Expect", URPE).

The paper's argument: RPE attention ``softmax(QK^T/sqrt(d) + B)`` is row-stochastic, so
a sequence whose tokens are all the same is mapped to a sequence of identical outputs
whatever the relative bias ``B``; residual blocks and position-wise MLPs keep that, so
an RPE-only Transformer (no absolute positions) cannot compute a function whose value at
a position depends on the position itself. URPE multiplies the probabilities by a
learned Toeplitz matrix ``C`` after the softmax (``(A ⊙ C) V``), whose rows need not sum
to one, which removes the limit. The tasks here ask for exactly such functions:

* ``task="position"`` (position identification): random tokens from ``num_tokens``
  symbols; the target at position ``i`` is ``i`` itself (``seq_len`` classes).
* ``task="parity"``: the same inputs; the target is ``i mod 2``.

A fraction ``constant_fraction`` of the rows (training and evaluation) repeat one token:
on those an RPE-only model provably predicts the same class at every position (accuracy
at most ``1 / seq_len`` for ``position``, ``1/2`` for ``parity``), while on random rows a
causal RPE model can still read positions off the content (the softmax over a growing
random prefix is not position-blind), so random rows alone do not separate the two.
Inputs carry no absolute position (the backbone has no position embedding), so only the
mixer can supply it. The comparison is ``--model urpe_attention`` (``C`` learned) against
the same model with ``--set 'mixer_fields={"urpe_attention": {"urpe": False}}'`` (``C = 1``,
RPE only). The headline accuracy is over the mixture; the summary splits it into random
and constant rows.

The task is built from the paper's argument (a position-dependent target that no
row-stochastic relative attention can produce on a constant sequence); the paper's own
synthetic protocol was not available to restate here, so sizes and task details are ours.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import ssmjax.layers.urpe_attention  # noqa: F401  (registers the layer this experiment compares)
from experiments.configs import URPEConfig
from ssmjax.data.synthetic import Batch, batch_rng

TASKS = ("position", "parity")
EVAL_STREAM = 1


def position_targets(task: str, batch_size: int, seq_len: int) -> np.ndarray:
    """``[b, t]`` int32 targets: ``i`` (``position``) or ``i mod 2`` (``parity``)."""
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len))
    return positions % 2 if task == "parity" else positions.copy()


def position_batch(config: URPEConfig, step: int, batch_size: int, stream: int = 0,
                   constant_fraction: float | None = None) -> Batch:
    """Random tokens, each row repeating its first token with probability ``constant_fraction``
    (``None``: the config's), and the position targets."""
    fraction = config.constant_fraction if constant_fraction is None else constant_fraction
    rng = batch_rng(config.seed, step, stream)
    tokens = rng.integers(0, config.num_tokens, (batch_size, config.seq_len), dtype=np.int32)
    constant = rng.random(batch_size) < fraction
    inputs = np.where(constant[:, None], tokens[:, :1], tokens).astype(np.int32)
    return Batch(inputs, position_targets(config.task, batch_size, config.seq_len),
                 np.ones((batch_size, config.seq_len), bool))


class URPETask:
    """Train on batches mixing random and constant rows; evaluate token accuracy on held-out
    random rows and constant rows (the headline: their mixture at ``constant_fraction``),
    and per position on random rows (the curve)."""

    def __init__(self, config: URPEConfig):
        if config.task not in TASKS:
            raise ValueError(f"task: expected one of {TASKS}, got {config.task!r}")
        if config.num_tokens < 1 or config.seq_len < 2:
            raise ValueError(f"num_tokens, seq_len: expected >= 1 and >= 2, got {config.num_tokens}, {config.seq_len}")
        if not 0.0 <= config.constant_fraction <= 1.0:
            raise ValueError(f"constant_fraction: expected a value in [0, 1], got {config.constant_fraction}")
        self.config = config
        self.vocab_size = max(config.num_tokens, config.seq_len)  # the LM head also scores the targets
        self.random_set = [position_batch(config, i, config.eval_batch_size, EVAL_STREAM, 0.0)
                           for i in range(config.eval_batches)]
        self.constant_set = [position_batch(config, i, config.eval_batch_size, EVAL_STREAM + 1, 1.0)
                             for i in range(config.eval_batches)]

    def train_batch(self, step: int) -> Batch:
        return position_batch(self.config, step, self.config.batch_size)

    def evaluate(self, predict) -> dict[str, Any]:
        random = np.concatenate([np.asarray(predict(b.inputs)) == b.targets for b in self.random_set])  # [n, t]
        constant = np.concatenate([np.asarray(predict(b.inputs)) == b.targets for b in self.constant_set])
        fraction = self.config.constant_fraction
        mixture = (1 - fraction) * float(random.mean()) + fraction * float(constant.mean())
        return dict(
            accuracy=mixture,
            summary={"acc": mixture, "acc (random rows)": float(random.mean()),
                     "acc (constant rows)": float(constant.mean())},
            curve=dict(xlabel="position", ylabel="accuracy (random rows)", x=list(range(random.shape[1])),
                       y=random.mean(0).tolist()),
        )
