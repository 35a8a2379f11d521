"""The ``structural_recursion`` experiment (issue 20, "emulating structural recursion";
after Zhang et al., 2023, "Can Transformers Learn to Solve Problems Recursively?"):
binary successor or tree traversal (data: :mod:`ssmjax.data.recursion`), trained on
small sizes and tested on larger ones.

Evaluation, per test size (bits, or tree depth) on a fixed set (stream 1): exact match
of the whole output with its EOS (the headline, averaged over the sizes seen in
training) and token accuracy. The curve is the exact match against the size.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments.configs import StructuralRecursionConfig
from ssmjax.data import recursion
from ssmjax.data.synthetic import Batch

EVAL_STREAM = 1


class StructuralRecursionTask:
    def __init__(self, config: StructuralRecursionConfig):
        if config.task not in recursion.RECURSION_TASKS:
            raise ValueError(f"task: expected one of {recursion.RECURSION_TASKS}, got {config.task!r}")
        self.config = config
        self.vocab_size = recursion.vocab_size(config.num_labels)
        tree = config.task == "tree"
        self.train_max = config.train_max_depth if tree else config.train_max_bits
        self.train_min = 1
        sizes = config.eval_depths if tree else config.eval_bits
        self.eval_sets = {size: [self._batch(config.eval_batch_size, size * 1000 + i, EVAL_STREAM, size, size)
                                 for i in range(config.eval_batches)] for size in sizes}

    def _batch(self, batch_size: int, step: int, stream: int, min_size: int, max_size: int) -> Batch:
        c = self.config
        return recursion.structural_recursion(c.seed, step, batch_size=batch_size, task=c.task, min_size=min_size,
                                              max_size=max_size, order=c.order, traversal=c.traversal,
                                              num_labels=c.num_labels, stream=stream)

    def train_batch(self, step: int) -> Batch:
        return self._batch(self.config.batch_size, step, 0, self.train_min, self.train_max)

    def evaluate(self, predict) -> dict[str, Any]:
        token, exact = {}, {}
        for size, batches in self.eval_sets.items():
            results = [(np.asarray(predict(b.inputs)) == b.targets, b.mask) for b in batches]
            token[size] = float(sum((c & m).sum() for c, m in results) / sum(m.sum() for _, m in results))
            exact[size] = float(np.concatenate([np.all(c | ~m, axis=1) for c, m in results]).mean())
        inside = [exact[s] for s in exact if s <= self.train_max] or list(exact.values())
        summary = {}
        for size in exact:
            summary[f"exact @{size}"] = exact[size]
            summary[f"token @{size}"] = token[size]
        label = "tree depth" if self.config.task == "tree" else "input bits"
        return dict(accuracy=float(np.mean(inside)), summary=summary,
                    curve=dict(xlabel=f"test {label}", ylabel="exact match", x=list(exact), y=list(exact.values()),
                               vline=self.train_max))
