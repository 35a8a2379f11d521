"""A nanoGPT-shaped GPT in PyTorch, the CPU peer of the ``attention`` language model.

    python -m experiments.bench.nanogpt [--rounds 5] [--threads 2] [--json FILE]

The model is written here from the published description of GPT-2 as nanoGPT configures
it (Radford et al., 2019; Karpathy's nanoGPT): learned absolute position embeddings,
pre-norm blocks ``x + attn(ln(x))``, ``x + mlp(ln(x))`` with LayerNorm (with bias),
causal multi-head self-attention through ``torch.nn.functional.scaled_dot_product_attention``,
a GELU MLP of width ``4 n_embd``, a final LayerNorm and the language-model head tied to
the token embedding; every linear layer has a bias, there is no dropout. :data:`BABY_GPT`
is nanoGPT's CPU "baby GPT" on shakespeare_char (4 layers, 4 heads, n_embd 128, block 64,
batch 12, vocabulary 65: 0.80M parameters as nanoGPT counts them, without the position
embeddings).

Two timings (median over rounds, each round a block of consecutive calls):

* ``train_ms``: one training step at ``batch x block`` tokens: forward, mean cross-entropy,
  backward, ``clip_grad_norm_(1.0)``, ``AdamW(lr 1e-3, betas (0.9, 0.99), weight decay 0.1)``
  on the parameters with ``ndim >= 2`` (nanoGPT's groups) and ``zero_grad``;
* ``decode_ms``: one greedy token at batch 1 with a key/value cache (one token per call,
  the context growing from 1 to ``block`` tokens), under ``torch.inference_mode``;
  ``recompute_ms``: the same re-running the whole context per token (nanoGPT's ``generate``).

Threads wait passively (``OMP_WAIT_POLICY=PASSIVE``, see :mod:`experiments.bench`). This
module imports no JAX; it needs torch (``pip install -e '.[peers]'``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from experiments.bench.table import write_json  # noqa: E402

#: nanoGPT's CPU "baby GPT" (README, shakespeare_char): the shape both sides are timed at.
BABY_GPT = dict(vocab_size=65, n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12)
#: nanoGPT's optimiser for it (config/train_shakespeare_char.py).
OPTIMIZER = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, grad_clip=1.0)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with one fused q/k/v projection; ``cache`` (a dict
    with preallocated ``k``, ``v`` of shape ``[b, heads, block, head_dim]``) makes it
    attend from the new tokens to everything cached so far."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_head: must divide n_embd = {n_embd}, got {n_head}")
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor, cache: dict | None = None, pos: int = 0) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in self.qkv(x).split(c, dim=2))
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            cache["k"][:, :, pos:pos + t] = k
            cache["v"][:, :, pos:pos + t] = v
            k, v = cache["k"][:, :, :pos + t], cache["v"][:, :, :pos + t]
            # one new token sees every cached one; a longer chunk needs the causal offset mask
            mask = None if t == 1 else torch.ones(t, pos + t, dtype=torch.bool).tril(pos)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(n_embd), SelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: torch.Tensor, cache: dict | None = None, pos: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """The nanoGPT-shaped decoder (module docstring). ``forward(idx)`` gives logits
    ``[b, t, vocab]``; with ``caches`` (from :meth:`new_caches`) and ``pos`` it continues a
    cached prefix."""

    def __init__(self, vocab_size: int, n_layer: int, n_head: int, n_embd: int, block_size: int):
        super().__init__()
        self.block_size, self.n_head, self.n_embd = block_size, n_head, n_embd
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, caches: list[dict] | None = None, pos: int = 0) -> torch.Tensor:
        t = idx.shape[1]
        if pos + t > self.block_size:
            raise ValueError(f"idx: {pos} cached + {t} new tokens exceed block_size = {self.block_size}")
        x = self.wte(idx) + self.wpe(torch.arange(pos, pos + t))
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i], pos)
        return F.linear(self.ln_f(x), self.wte.weight)  # tied head

    def new_caches(self, batch: int) -> list[dict]:
        shape = (batch, self.n_head, self.block_size, self.n_embd // self.n_head)
        return [dict(k=torch.zeros(shape), v=torch.zeros(shape)) for _ in self.blocks]


def param_count(model: GPT, non_embedding: bool = True) -> int:
    """Parameters; ``non_embedding`` leaves out the position embeddings, as nanoGPT's
    ``get_num_params`` does (the token embedding counts: it is the tied head)."""
    total = sum(p.numel() for p in model.parameters())
    return total - model.wpe.weight.numel() if non_embedding else total


def build(seed: int = 0, **shape) -> GPT:
    """A :class:`GPT` at :data:`BABY_GPT` (fields overridden by ``shape``)."""
    fields = {k: v for k, v in dict(BABY_GPT, **shape).items() if k != "batch_size"}
    torch.manual_seed(seed)
    return GPT(**fields)


def make_optimizer(model: GPT, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on the parameters with ``ndim >= 2`` only (nanoGPT's groups)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def train_step_fn(model: GPT, batch_size: int, seed: int = 0) -> Callable[[], float]:
    """``() -> loss`` running one training step (module docstring) on a fixed random batch."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.wte.weight.shape[0]
    tokens = torch.randint(vocab, (batch_size, model.block_size + 1), generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    opt = make_optimizer(model, OPTIMIZER["lr"], OPTIMIZER["betas"], OPTIMIZER["weight_decay"])

    def step() -> float:
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIMIZER["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def decode_fn(model: GPT) -> Callable[[], torch.Tensor]:
    """``() -> tokens [1, block]``: greedy decoding of ``block`` tokens at batch 1 with a
    fresh key/value cache, one token per forward call."""
    @torch.inference_mode()
    def decode() -> torch.Tensor:
        caches = model.new_caches(1)
        token = torch.zeros(1, 1, dtype=torch.long)
        out = []
        for pos in range(model.block_size):
            token = model(token, caches, pos)[:, -1:].argmax(-1)
            out.append(token)
        return torch.cat(out, 1)

    return decode


def recompute_fn(model: GPT) -> Callable[[], torch.Tensor]:
    """Like :func:`decode_fn` without a cache: every token re-runs the whole context so far
    (nanoGPT's own ``generate``)."""
    @torch.inference_mode()
    def decode() -> torch.Tensor:
        idx = torch.zeros(1, 1, dtype=torch.long)
        for _ in range(model.block_size - 1):
            idx = torch.cat([idx, model(idx)[:, -1:].argmax(-1)], 1)
        return idx

    return decode


def time_block(run: Callable[[], object], calls: int) -> float:
    """Wall ms per call of ``calls`` consecutive calls of ``run``."""
    start = time.perf_counter()
    for _ in range(calls):
        run()
    return 1e3 * (time.perf_counter() - start) / calls


class Peer:
    """The timed workloads, built once; :meth:`round` times one block of each
    (``nanogpt_train_ms``: per step; ``nanogpt_decode_ms`` with the KV cache and
    ``nanogpt_recompute_ms`` without: per token), so a caller can interleave rounds with
    its own measurements."""

    def __init__(self, threads: int = 2, train_calls: int = 10, decode_calls: int = 2):
        torch.set_num_threads(threads)
        self.model = build()
        self.train = train_step_fn(self.model, BABY_GPT["batch_size"])
        self.decode, self.recompute = decode_fn(self.model), recompute_fn(self.model)
        self.train_calls, self.decode_calls = train_calls, decode_calls
        self.train(), self.decode(), self.recompute()  # warm-up: first-call allocations

    def round(self) -> dict[str, float]:
        block = self.model.block_size
        return dict(nanogpt_train_ms=time_block(self.train, self.train_calls),
                    nanogpt_decode_ms=time_block(self.decode, self.decode_calls) / block,
                    nanogpt_recompute_ms=time_block(self.recompute, self.decode_calls) / (block - 1))


def describe(threads: int) -> dict:
    """The peer's identity for the report: torch version, threads, shape, parameter counts."""
    model = build()
    return dict(torch=torch.__version__, threads=threads, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                shape=BABY_GPT, optimizer=OPTIMIZER,
                params=param_count(model), params_total=param_count(model, non_embedding=False))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench.nanogpt", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median; default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.threads < 1:
        parser.error(f"--rounds, --threads: expected >= 1, got {args.rounds}, {args.threads}")
    peer = Peer(args.threads)
    rounds = [peer.round() for _ in range(args.rounds)]
    medians = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    result = dict(describe(args.threads), rounds=rounds, **medians)
    print(f"nanoGPT (torch {result['torch']}, {args.threads} threads): train {result['nanogpt_train_ms']:.2f} ms/step, "
          f"decode {result['nanogpt_decode_ms']:.3f} ms/token with the KV cache, "
          f"{result['nanogpt_recompute_ms']:.3f} without", file=sys.stderr)
    if args.json:
        write_json(args.json, result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
