"""A minimal S4D sequence classifier in PyTorch, the CPU peer of ``python -m experiments smnist --model s4d``.

    python -m experiments.bench.s4d_torch [--reps 5] [--threads 2] [--json FILE]

The S4D layer is written from Gu, Gupta, Goel and Re, 2022, "On the Parameterization and
Initialization of Diagonal State Space Models": per channel ``h`` (``H = d_model``) a
diagonal SSM with ``N/2`` complex modes (the other half are their conjugates), S4D-Lin
initialisation ``A_n = -1/2 + i pi n``, ``B = 1``, ``C ~ N(0, 1/2)`` complex, ``log dt``
uniform in ``[log 1e-3, log 1e-1]``; zero-order hold ``dtA = dt A``,
``Bbar = (exp(dtA) - 1) / A B``; the Vandermonde kernel
``K_k = 2 Re(sum_n C_n Bbar_n exp(k dtA_n))``; the causal convolution ``y = K * u`` by FFT
(``rfft`` of length ``2L``); then the S4 block ``GLU(W GELU(y + D u) + b)``
(``W [2H, H]``). The model has the layer structure of ours at the sMNIST cpu size: a
linear input projection of the pixel, ``n_layers`` pre-norm residual blocks
``x + S4D(LayerNorm(x))`` (no MLP), a final LayerNorm, mean pooling over time and a linear
classifier.

:func:`train_step_fn` is one training step as ``ssmjax.train`` takes it with the sMNIST
recipe: forward, mean cross-entropy, backward, AdamW at lr 0.01 (betas 0.9, 0.98) with weight
decay 0.01 on the matrices, the SSM parameters (``log_A_real, A_imag, B, log_dt``) in their
own group at lr 0.001 without weight decay, ``zero_grad``. Threads wait passively
(``OMP_WAIT_POLICY=PASSIVE`` unless set; see :mod:`experiments.bench`). This module
imports no JAX; it needs torch (``pip install -e '.[peers]'``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from experiments.bench.clock import median_of_calls
from experiments.bench.table import write_json

#: The sMNIST cpu size of ``experiments.configs`` (batch 50 x 784 pixels, d 64, 4 layers, S4D state 64).
SMNIST = dict(batch=50, length=784, features=1, classes=10, d_model=64, n_layers=4, d_state=64)
#: The sMNIST recipe's optimiser (experiments.configs: lr 1e-2, ssm_lr 1e-3, weight decay 0.01; betas of ssmjax.train).
OPTIMIZER = dict(lr=1e-2, ssm_lr=1e-3, betas=(0.9, 0.98), weight_decay=0.01)
SSM_PARAMETERS = ("log_A_real", "A_imag", "B", "log_dt")


class S4D(nn.Module):
    """The S4D block (module docstring) on ``[batch, length, H]``."""

    def __init__(self, d_model: int, d_state: int = 64, dt_min: float = 1e-3, dt_max: float = 1e-1):
        super().__init__()
        h, n = d_model, d_state // 2
        self.log_A_real = nn.Parameter(torch.full((h, n), math.log(0.5)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(n, dtype=torch.float32).repeat(h, 1))
        self.B = nn.Parameter(torch.view_as_real(torch.ones(h, n, dtype=torch.cfloat)).clone())
        self.C = nn.Parameter(torch.randn(h, n, 2) * math.sqrt(0.5))
        self.log_dt = nn.Parameter(torch.rand(h) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.D = nn.Parameter(torch.randn(h))
        self.output_linear = nn.Linear(h, 2 * h)

    def kernel(self, length: int) -> torch.Tensor:
        """``K [H, L]``: ZOH-discretised Vandermonde kernel."""
        A = torch.complex(-torch.exp(self.log_A_real), self.A_imag)  # [H, N/2]
        dtA = A * torch.exp(self.log_dt)[:, None]
        coeffs = torch.view_as_complex(self.C) * torch.view_as_complex(self.B) * torch.expm1(dtA) / A
        powers = torch.exp(dtA[..., None] * torch.arange(length, dtype=torch.float32))  # [H, N/2, L]
        return 2 * torch.einsum("hn,hnl->hl", coeffs, powers).real

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        length = u.shape[1]
        x = u.transpose(1, 2)  # [B, H, L]: the FFT runs over the last, contiguous axis
        k_f = torch.fft.rfft(self.kernel(length), n=2 * length)
        y = torch.fft.irfft(torch.fft.rfft(x, n=2 * length) * k_f, n=2 * length)[..., :length]
        y = F.gelu(y + self.D[:, None] * x).transpose(1, 2)
        return F.glu(self.output_linear(y), dim=-1)


class Classifier(nn.Module):
    """Input projection, pre-norm residual S4D blocks, final LayerNorm, mean pooling, head."""

    def __init__(self, features: int, classes: int, d_model: int, n_layers: int, d_state: int):
        super().__init__()
        self.input_proj = nn.Linear(features, d_model)
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_layers))
        self.layers = nn.ModuleList(S4D(d_model, d_state) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input_proj(x)
        for norm, layer in zip(self.norms, self.layers):
            h = h + layer(norm(h))
        return self.head(self.final_norm(h).mean(1))


def build(seed: int = 0, **shape) -> Classifier:
    """A :class:`Classifier` at :data:`SMNIST` (fields overridden by ``shape``)."""
    s = dict(SMNIST, **shape)
    torch.manual_seed(seed)
    return Classifier(s["features"], s["classes"], s["d_model"], s["n_layers"], s["d_state"])


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_optimizer(model: nn.Module) -> torch.optim.AdamW:
    """AdamW with the sMNIST recipe's groups (module docstring)."""
    ssm, matrices, rest = [], [], []
    for name, p in model.named_parameters():
        (ssm if name.rsplit(".", 1)[-1] in SSM_PARAMETERS else matrices if p.dim() >= 2 else rest).append(p)
    o = OPTIMIZER
    return torch.optim.AdamW([dict(params=ssm, lr=o["ssm_lr"], weight_decay=0.0),
                              dict(params=matrices, weight_decay=o["weight_decay"]),
                              dict(params=rest, weight_decay=0.0)], lr=o["lr"], betas=o["betas"])


def train_step_fn(model: Classifier, seed: int = 0, **shape) -> Callable[[], float]:
    """``() -> loss`` running one training step (module docstring) on a fixed random batch."""
    s = dict(SMNIST, **shape)
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(s["batch"], s["length"], s["features"], generator=gen)
    targets = torch.randint(s["classes"], (s["batch"],), generator=gen)
    opt = make_optimizer(model)

    def step() -> float:
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def train_step_ms(reps: int = 5, threads: int | None = None, **shape) -> tuple[float, int]:
    """``(median ms of one training step after a warm-up step, parameter count)``."""
    if threads:
        torch.set_num_threads(threads)
    model = build(**shape)
    return median_of_calls(train_step_fn(model, **shape), reps), param_count(model)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench.s4d_torch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="timed steps (median; default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.threads < 1:
        parser.error(f"--reps, --threads: expected >= 1, got {args.reps}, {args.threads}")
    ms, params = train_step_ms(args.reps, args.threads)
    result = dict(torch=torch.__version__, threads=args.threads, shape=SMNIST, optimizer=OPTIMIZER, params=params,
                  train_step_ms=ms)
    print(f"S4D classifier (torch {result['torch']}, {args.threads} threads, {params:,} parameters): "
          f"{ms:.1f} ms per training step", file=sys.stderr)
    if args.json:
        write_json(args.json, result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
