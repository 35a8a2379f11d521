"""The PyTorch CPU peers the scan benchmarks compare against, timed in this sitting.

    pip install -e '.[peers]'          # torch (CPU), mambapy, flash-linear-attention, pararnn-torch
    python -m experiments.bench.peers [--reps 5] [--threads 2] [--json FILE]

Median forward+backward ms (``sum(outputs).backward()``, one warm-up call) of

* mambapy's parallel selective scan (``mambapy.pscan.pscan``, Heinsen-style Blelloch
  scan; Gu & Dao 2023's S6 recurrence ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t``,
  ``y_t = C_t h_t + u_t``) at ``(b, t, d, n) = SHAPES["selective_scan"]``;
* flash-linear-attention's ``naive_chunk_simple_gla`` (chunk 64; Yang et al. 2024, GLA with
  a scalar decay per head) at ``(b, t, h, d) = SHAPES["gla"]``;

the shapes of ``experiments.speed``'s comparison rows, so the ratios are read side by
side; the nanoGPT-shaped GPT of :mod:`experiments.bench.nanogpt` (nanoGPT's CPU baby
GPT, the peer of ``python -m experiments.lm_speed``): median ms of one training step at
batch 12 x 64 and of one KV-cache decoding token at batch 1; and the S4D classifier of
:mod:`experiments.bench.s4d_torch` (the peer of ``python -m experiments.step_speed``): median
ms of one training step at the sMNIST shape (batch 50 x 784, d 64, 4 layers).
``--only KEYS`` (or the environment variable ``BENCH_PEERS``, which a caller running this
module in another interpreter sets, e.g. ``experiments.step_speed``) times only those
entries of :data:`PEERS`. Without torch (or a peer
package) each entry is skipped with the reason, printed and kept in the JSON under
``skipped``; the exit status is 0 either way. This module
imports no JAX, so it also runs in a torch-only environment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from experiments.bench.clock import median_of_calls
from experiments.bench.table import write_json

#: The shapes the peers are timed at (and ``experiments.speed``'s comparison rows).
SHAPES = {"selective_scan": dict(b=2, t=1024, d=256, n=16), "gla": dict(b=2, t=2048, h=4, d=64),
          # experiments.bench.nanogpt.BABY_GPT (written out: that module needs torch)
          "nanogpt": dict(vocab_size=65, n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12),
          # experiments.bench.s4d_torch.SMNIST (written out: that module needs torch)
          "s4d_smnist": dict(batch=50, length=784, features=1, classes=10, d_model=64, n_layers=4, d_state=64)}
INSTALL_HINT = "pip install -e '.[peers]'"
#: The environment variable naming the :data:`PEERS` keys to time (comma-separated; unset: all).
ONLY_ENV = "BENCH_PEERS"


def missing(module: str) -> str | None:
    """``None`` if ``module`` imports, else the reason it does not (with the install hint)."""
    try:
        __import__(module)
    except ImportError as error:
        return f"{module} not importable ({error}); {INSTALL_HINT}"
    return None


def mambapy_selective_scan(reps: int, b: int, t: int, d: int, n: int) -> float:
    """fwd+bwd ms of mambapy's ``pscan`` selective scan (gradients w.r.t. u, dt, B, C)."""
    import torch
    from mambapy.pscan import pscan

    u, dt = torch.randn(b, t, d), torch.rand(b, t, d) * 0.1
    A = -torch.rand(d, n) - 0.5
    B, C = torch.randn(b, t, n), torch.randn(b, t, n)
    for x in (u, dt, B, C):
        x.requires_grad_(True)

    def fwd_bwd():
        dA = torch.exp(dt.unsqueeze(-1) * A)
        bx = dt.unsqueeze(-1) * B.unsqueeze(2) * u.unsqueeze(-1)
        y = (pscan(dA, bx) @ C.unsqueeze(-1)).squeeze(3) + u
        y.sum().backward()

    return median_of_calls(fwd_bwd, reps)


def fla_naive_chunk_simple_gla(reps: int, b: int, t: int, h: int, d: int) -> float:
    """fwd+bwd ms of fla's ``naive_chunk_simple_gla`` (gradients w.r.t. q, k, v, g)."""
    import torch
    from fla.ops.simple_gla.naive import naive_chunk_simple_gla

    q, k, v = (torch.randn(b, t, h, d, requires_grad=True) for _ in range(3))
    g = (-torch.rand(b, t, h) * 0.1).requires_grad_(True)

    def fwd_bwd():
        out, _ = naive_chunk_simple_gla(q, k, v, g, chunk_size=64)
        out.sum().backward()

    return median_of_calls(fwd_bwd, reps)


def nanogpt_train_step(reps: int, **shape) -> float:
    """ms of one nanoGPT training step (:mod:`experiments.bench.nanogpt`, its ``BABY_GPT``)."""
    from experiments.bench import nanogpt

    model = nanogpt.build()
    return median_of_calls(nanogpt.train_step_fn(model, shape["batch_size"]), reps)


def nanogpt_decode_token(reps: int, **shape) -> float:
    """ms per token of nanoGPT's greedy KV-cache decoding at batch 1 (64 tokens a call)."""
    from experiments.bench import nanogpt

    model = nanogpt.build()
    return median_of_calls(nanogpt.decode_fn(model), reps) / shape["block_size"]


def s4d_train_step(reps: int, **shape) -> float:
    """ms of one training step of the S4D classifier (:mod:`experiments.bench.s4d_torch`)."""
    from experiments.bench import s4d_torch

    return s4d_torch.train_step_ms(reps, **shape)[0]


#: result key -> (module the peer needs, timing function, shape name)
PEERS: dict[str, tuple[str, Callable[..., float], str]] = {
    "mambapy_selective_scan_fb_ms": ("mambapy", mambapy_selective_scan, "selective_scan"),
    "fla_naive_chunk_simple_gla_fb_ms": ("fla", fla_naive_chunk_simple_gla, "gla"),
    "nanogpt_train_step_ms": ("torch", nanogpt_train_step, "nanogpt"),
    "nanogpt_decode_token_ms": ("torch", nanogpt_decode_token, "nanogpt"),
    "s4d_torch_train_step_ms": ("torch", s4d_train_step, "s4d_smnist"),
}


def selected(only: str | None = None) -> list[str]:
    """The :data:`PEERS` keys named in ``only`` (comma-separated; ``None``: the environment
    variable :data:`ONLY_ENV`, unset or empty: all); ``ValueError`` naming an unknown key."""
    only = os.environ.get(ONLY_ENV, "") if only is None else only
    keys = [k for k in only.split(",") if k]
    unknown = sorted(set(keys) - set(PEERS))
    if unknown:
        raise ValueError(f"only: unknown peers {unknown}; choose from {sorted(PEERS)}")
    return keys or list(PEERS)


def peer_timings(reps: int = 5, threads: int = 2, only: str | None = None) -> dict:
    """``{key: ms, ..., "shapes": SHAPES, "skipped": {key: reason}}`` for every peer in
    :data:`PEERS` named by ``only`` (:func:`selected`; a peer whose package is missing is
    skipped, not an error)."""
    keys = selected(only)
    result: dict = {"shapes": SHAPES, "skipped": {}}
    reason = missing("torch")
    if reason is None:
        import torch

        torch.manual_seed(0)
        torch.set_num_threads(threads)
        result["torch"] = torch.__version__
    for key in keys:
        module, timing, shape = PEERS[key]
        why = reason or missing(module)
        if why:
            result["skipped"][key] = why
        else:
            result[key] = timing(reps, **SHAPES[shape])
    return result


def rnn_peer_timings(cell: str, t: int, batch: int, heads: int, dh: int) -> dict:
    """fwd+bwd ms of the PyTorch CPU peers at the same (b, t, d = heads * dh), if importable:

    * ``pararnn_{newton,sequential}``: pip pararnn-torch's ``ParaRNN(ParaLSTM | ParaGRU)``
      (ParaRNN-style cells with *diagonal* recurrent weights, so its exact Newton is
      cheaper per iteration than ours with dense head blocks) with its default Newton
      schedule (``NewtonConfig(max_iters=None)``), and its sequential loop;
    * ``flashrnn_vanilla``: flashrnn's pure-PyTorch backend on our layout
      (``Wx [b, t, gates, heads, dh]``, ``R [gates, heads, dh, dh]``), float32.

    Neither is a dependency: a missing package just leaves its entries out. They live in
    the ``peers`` extra (``pip install -e '.[peers]'``; flashrnn is not in it), so one
    sitting with both is ``python -m experiments.speed --ops rnn_lstm,rnn_gru`` in an
    environment with the extra. Timed without a warm-up call (eager PyTorch has no
    compilation).
    """
    try:
        import torch
    except ImportError:
        return {}
    torch.manual_seed(0)
    torch.set_num_threads(2)
    d, out = heads * dh, {}
    reps = 3 if t <= 1024 else 1  # one call at T = 4096 takes ~5-45 s
    try:
        from pararnn import NewtonConfig, ParaGRU, ParaLSTM, ParaRNN

        para_cell = {"lstm": ParaLSTM, "gru": ParaGRU}[cell](d, d)
        x = torch.randn(batch, t, d, requires_grad=True)
        for solver in ("newton", "sequential"):
            model = ParaRNN(para_cell, config=NewtonConfig(max_iters=None), solver=solver)
            out[f"pararnn_{solver}"] = median_of_calls(lambda m=model: m(x).sum().backward(), reps, warmup=0)
            if solver == "newton" and model.last_stats:
                out["pararnn_newton_iters"] = int(model.last_stats[0].iters)
    except ImportError:
        pass
    try:
        from flashrnn import flashrnn

        # flashrnn's GRU takes 3 input gates (r, z, n), 3 recurrent ones (n, r, z), 4 biases
        gates, rgates, biases = {"lstm": (4, 4, 4), "gru": (3, 3, 4)}[cell]
        wx = torch.randn(batch, t, gates, heads, dh, requires_grad=True)
        R = (torch.randn(rgates, heads, dh, dh) / dh**0.5).requires_grad_(True)
        b = torch.zeros(biases, heads, dh, requires_grad=True)

        def flash_fwd_bwd():
            h, _ = flashrnn(wx, R, b, function=cell, backend="vanilla", dtype="float32")
            h[0].sum().backward()

        out["flashrnn_vanilla"] = median_of_calls(flash_fwd_bwd, reps, warmup=0)
    except ImportError:
        pass
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench.peers", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="timed calls per peer (median; default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    parser.add_argument("--only", default=None, help=f"comma-separated peers to time (default: ${ONLY_ENV}, else all)")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.threads < 1:
        parser.error(f"--reps, --threads: expected >= 1, got {args.reps}, {args.threads}")
    try:
        keys = selected(args.only)
    except ValueError as error:
        parser.error(f"--only: {error}")
    result = peer_timings(args.reps, args.threads, ",".join(keys))
    for key in keys:
        shape = PEERS[key][2]
        dims = ",".join(f"{k}={v}" for k, v in SHAPES[shape].items())
        value = f"{result[key]:.1f} ms" if key in result else f"skipped: {result['skipped'][key]}"
        print(f"{key:<34} {dims:<24} {value}", file=sys.stderr)
    if args.json:
        write_json(args.json, result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
