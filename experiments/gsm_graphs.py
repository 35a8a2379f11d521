"""The ``gsm_graphs`` experiment: the graph tasks of GSM++ (Behrouz, Parviz, Karami,
Sanford, Perozzi & Mirrokni, ICML 2025, "Best of Both Worlds: Advantages of Hybrid Graph
Sequence Models"): connectivity, cycle detection, shortest-path length, node and edge
counting on random graphs tokenised by a node ordering (random, BFS, DFS, degree) or a
hierarchical clustering (data: :mod:`ssmjax.data.graphs`), read by a sequence model that
predicts the answer's class token.

The GSM++ global encoder is a hybrid of Mamba and attention layers: here that is the
hybrid model pattern, ``--model "mamba,attention"`` (any registry model or pattern
runs). Departure: GSM++ first encodes each node's neighbourhood with a local (GNN-style)
encoder; that is not implemented here, the token sequence is the model's only input and
locality is carried by the tokenisation alone.

Evaluation, per node count in ``eval_nodes`` on a fixed set (stream 1): accuracy of the
class at the ANSWER position. The headline is the accuracy over the eval examples with
node counts seen in training (all of them if none is); the curve is the accuracy against
the node count. All batches share one length and vocabulary (sized for the largest of
``max_nodes`` and ``eval_nodes``), so larger test graphs are an extrapolation test.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments.configs import GsmGraphsConfig
from ssmjax.data import graphs
from ssmjax.data.synthetic import Batch

EVAL_STREAM = 1


class GsmGraphsTask:
    def __init__(self, config: GsmGraphsConfig):
        if config.task not in graphs.GRAPH_TASKS:
            raise ValueError(f"task: expected one of {graphs.GRAPH_TASKS}, got {config.task!r}")
        if config.ordering not in graphs.ORDERINGS:
            raise ValueError(f"ordering: expected one of {graphs.ORDERINGS}, got {config.ordering!r}")
        if not config.eval_nodes:
            raise ValueError("eval_nodes: expected at least one node count")
        self.config = config
        self.node_capacity = max(config.max_nodes, *config.eval_nodes)
        self.vocab_size = graphs.vocab_size(config.task, self.node_capacity, config.max_edges, config.max_dist)
        self.eval_sets = {n: [self._batch(config.eval_batch_size, n * 1000 + i, EVAL_STREAM, n, n)
                              for i in range(config.eval_batches)] for n in config.eval_nodes}

    def _batch(self, batch_size: int, step: int, stream: int, min_nodes: int, max_nodes: int) -> Batch:
        c = self.config
        return graphs.graph_tasks(c.seed, step, batch_size=batch_size, task=c.task, ordering=c.ordering,
                                  min_nodes=min_nodes, max_nodes=max_nodes, degree=c.degree or None,
                                  max_dist=c.max_dist, node_capacity=self.node_capacity, max_edges=c.max_edges,
                                  stream=stream)

    def train_batch(self, step: int) -> Batch:
        return self._batch(self.config.batch_size, step, 0, self.config.min_nodes, self.config.max_nodes)

    def evaluate(self, predict) -> dict[str, Any]:
        c = self.config
        correct = {}
        for n, batches in self.eval_sets.items():
            correct[n] = np.concatenate([(np.asarray(predict(b.inputs)) == b.targets)[b.mask] for b in batches])
        accuracy = {n: float(v.mean()) for n, v in correct.items()}
        inside = [n for n in correct if c.min_nodes <= n <= c.max_nodes] or list(correct)
        summary = {f"acc @{n} nodes": accuracy[n] for n in accuracy}
        return dict(accuracy=float(np.concatenate([correct[n] for n in inside]).mean()), summary=summary,
                    curve=dict(xlabel="test graph nodes", ylabel=f"{c.task} accuracy", x=list(accuracy),
                               y=list(accuracy.values()), vline=c.max_nodes))
