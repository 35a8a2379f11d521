"""The ``sequential_functions`` experiment (issue 20): in-context learning of sequential
functions, Mealy machines and linear recurrences mod p (data:
:mod:`ssmjax.data.sequential_functions`; in the spirit of Garg et al., 2022, with the
functions made string-to-string).

Evaluation, per function class on its own fixed set (stream 1): the token accuracy of
every example's output after ``i`` in-context examples, ``i = 0 .. num_examples`` (the
last, ``i = num_examples``, is the query). The headline is the query accuracy averaged
over the classes; the curve is that class-average against ``i``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments.configs import SequentialFunctionsConfig
from ssmjax.data import sequential_functions as data
from ssmjax.data.synthetic import Batch

EVAL_STREAM = 1


def accuracy_by_examples(correct: np.ndarray, num_examples: int, example_len: int) -> np.ndarray:
    """``[num_examples + 1]``: mean of ``correct`` ``[b, T]`` over each example's output
    positions (index ``i``: the outputs seen after ``i`` in-context examples)."""
    index = data.example_index(num_examples, example_len)
    return np.array([correct[:, index == i].mean() for i in range(num_examples + 1)])


class SequentialFunctionsTask:
    def __init__(self, config: SequentialFunctionsConfig):
        classes = (config.classes,) if isinstance(config.classes, str) else tuple(config.classes)
        if not classes or any(c not in data.FUNCTION_CLASSES for c in classes):
            raise ValueError(f"classes: expected names from {data.FUNCTION_CLASSES}, got {config.classes!r}")
        self.config, self.classes = config, classes
        self.vocab_size = data.vocab_size(config.num_symbols, config.num_outputs, config.modulus)
        self.eval_sets = {c: [self._batch(config.eval_batch_size, i, EVAL_STREAM, c) for i in range(config.eval_batches)]
                          for c in classes}

    def _batch(self, batch_size: int, step: int, stream: int, classes) -> Batch:
        c = self.config
        return data.sequential_functions(c.seed, step, batch_size=batch_size, classes=classes,
                                         num_examples=c.num_examples, example_len=c.example_len,
                                         num_states=c.num_states, num_symbols=c.num_symbols,
                                         num_outputs=c.num_outputs, modulus=c.modulus, stream=stream)

    def train_batch(self, step: int) -> Batch:
        return self._batch(self.config.batch_size, step, 0, self.classes)

    def evaluate(self, predict) -> dict[str, Any]:
        c = self.config
        curves = {}
        for name, batches in self.eval_sets.items():
            correct = np.concatenate([np.asarray(predict(b.inputs)) == b.targets for b in batches])
            curves[name] = accuracy_by_examples(correct, c.num_examples, c.example_len)
        shown = sorted({i for i in (0, 1, 2, 4, 8, 16, 32) if i < c.num_examples} | {c.num_examples})
        summary = {}
        for name, curve in curves.items():
            summary[f"{name} query"] = float(curve[-1])
            summary.update({f"{name} @{i}": float(curve[i]) for i in shown[:-1]})
        mean = np.mean(list(curves.values()), axis=0)
        return dict(accuracy=float(mean[-1]), summary=summary,
                    curve=dict(xlabel="in-context examples before the output", ylabel="output token accuracy",
                               x=list(range(c.num_examples + 1)), y=mean.tolist()))
