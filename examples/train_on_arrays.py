"""Train a sequence classifier on your own NumPy arrays: x [n, time, features], y [n]."""
import argparse

import numpy as np

from ssmjax.data import Batch
from ssmjax.models import SequenceModel
from ssmjax.train import TrainConfig, train


class ArrayTask:
    def __init__(self, x, y):  # first 90% train, last 10% validation
        self.x, self.y, self.cut = x.astype(np.float32), y.astype(np.int32), int(0.9 * len(x))

    def train_batch(self, step):  # a pure function of the step: resume is exact
        rows = np.random.default_rng(step).integers(0, self.cut, size=32)  # batch size 32
        return Batch(self.x[rows], self.y[rows], np.ones(len(rows), bool))

    def evaluate(self, model):  # validation loss, perplexity and accuracy
        return model.loss([Batch(self.x[self.cut:], self.y[self.cut:], np.ones(len(self.x) - self.cut, bool))])


parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=300)
x = np.random.default_rng(0).normal(size=(1000, 32, 4))  # your data here
y = x[:, :, 0].sum(1) > 0  # label: is the sum of feature 0 positive?
model = SequenceModel(d_model=32, n_layers=2, mixers="mamba2", vocab_size=None, head="classify", num_classes=2)
run = train(model, ArrayTask(x, y), TrainConfig(steps=parser.parse_args().steps, lr=3e-3), "runs/arrays", resume=True)
print(f"step {run.step}, validation:", run.results["eval"])  # loss, perplexity, accuracy, count
