"""Training and decoding speed of the ``attention`` language model beside nanoGPT in PyTorch.

    python -m experiments.lm_speed                      # both sides, interleaved, 7 rounds
    python -m experiments.lm_speed --rounds 9 --report experiments/results/lm_speed.md
    make peers                                          # the same in .peers-venv (torch installed)

Issue 16's speed requirement: training throughput of our ``attention`` model must be within
1.5x of the same-shape nanoGPT model in PyTorch on this CPU (ours >= 1/1.5 of its
tokens/s), and decoding with ``step`` must be at least as fast per token as PyTorch
re-running attention over a key/value cache. Both sides are timed in one process, in
rounds that alternate between them (so a load change on a shared machine hits both), and
each number is the median over the rounds.

Ours is ``python -m experiments lm --model attention`` at its ``cpu`` size
(``SIZES["lm"]["cpu"]``: 4 layers, d_model 128, context 64, batch 12; the 65-character
shakespeare_char vocabulary): the model from :func:`experiments.runner.build_model`, the
optimiser from :func:`ssmjax.train.loop.make_optimizer` and the jitted step from
:func:`ssmjax.train.loop.make_train_step`, called as the training loop calls it (the
loss and the finite flag read back every step). Decoding is the jitted one-token decode
of ``experiments lm-sample`` (its ``step``, greedy, batch 1, the KV cache sized to the 64
tokens and donated; 64 tokens from an empty cache, each token read back before the next
call). Our cpu model has a SwiGLU MLP of width 4d (three matrices: 1.33x the matrix work
per token of nanoGPT's GELU MLP of width 4d); one more training row uses nanoGPT's MLP
(``--set mlp=gelu``: ``W_2 gelu(W_1 x + b_1) + b_2``, width 4d).

The peer is :mod:`experiments.bench.nanogpt` (torch, 2 threads): the same timings with
nanoGPT's model, batch and optimiser, and its decode with a KV cache (plus, for
reference, re-running the whole context per token as nanoGPT's ``generate`` does). The
report (``--report``, Markdown) and JSON (``--out``) give the medians, the spread over
rounds, the load average before and after, and the ratios with their targets.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.table import Column, markdown_table, text_table, write_json
from experiments.bench.timing import environment

#: Targets of issue 16: ours / nanoGPT tokens/s must be at least this.
TARGETS = {"train": 1 / 1.5, "decode": 1.0}
VOCAB = 65  # shakespeare_char's characters (the tokens of the cpu lm run)
COLUMNS = (
    Column("what", "what", meaning="the measurement"),
    Column("side", "side", meaning="ours (JAX) or the PyTorch nanoGPT peer"),
    Column("ms", "ms", "{:.2f}", "median ms per training step (train) or per generated token (decode)"),
    Column("spread", "min-max ms", meaning="the fastest and slowest round"),
    Column("tokens_per_s", "tokens/s", "{:,.0f}", "tokens per second at the median (train: batch x context per step)"),
    Column("ratio", "ours / nanoGPT", "{:.2f}", "median over the rounds of our tokens/s over the peer's in the same "
                                                "round (> 1: ours is faster)"),
    Column("ratio_spread", "range", meaning="the lowest and highest per-round ratio"),
    Column("target", "target", "{:.2f}", "issue 16's lower bound for the ratio"),
    Column("met", "met", meaning="whether the ratio reaches the target"),
)


def tokens_per_s(ms: float, tokens: int) -> float:
    """Throughput of ``tokens`` tokens in ``ms`` milliseconds."""
    if ms <= 0 or tokens < 1:
        raise ValueError(f"ms, tokens: expected ms > 0 and tokens >= 1, got {ms}, {tokens}")
    return tokens / ms * 1e3


def summarize(rounds: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """``[{key: ms}, ...]`` (one dict per round) -> ``{key: {median, min, max, n}}``."""
    if not rounds:
        raise ValueError("rounds: expected at least one round")
    keys = sorted({k for r in rounds for k in r})
    return {k: dict(median=statistics.median(v), min=min(v), max=max(v), n=len(v))
            for k in keys for v in [[r[k] for r in rounds if k in r]]}


#: (what, side, key of the summary, tokens per timed unit, compared with (what, key) or None)
ROWS = (
    ("train step (12 x 64 tokens)", "ours", "ours_train_ms", 12 * 64, ("train", "nanogpt_train_ms")),
    ("train step (12 x 64 tokens)", "nanoGPT", "nanogpt_train_ms", 12 * 64, None),
    ("train step, GELU MLP (nanoGPT's shape)", "ours", "ours_train_same_shape_ms", 12 * 64,
     ("train", "nanogpt_train_ms")),
    ("decode, step per call", "ours", "ours_decode_ms", 1, ("decode", "nanogpt_decode_ms")),
    ("decode, KV cache per call", "nanoGPT", "nanogpt_decode_ms", 1, None),
    ("decode, re-run the context per call", "nanoGPT", "nanogpt_recompute_ms", 1, None),
)


def paired_ratios(rounds: list[dict[str, float]], ours: str, peer: str) -> list[float]:
    """``peer ms / our ms`` within each round that has both (= our tokens/s over the peer's):
    the rounds alternate the sides, so a load change between rounds cancels out."""
    return [r[peer] / r[ours] for r in rounds if ours in r and peer in r]


def comparison_rows(rounds: list[dict[str, float]]) -> list[dict]:
    """The report's rows (:data:`ROWS`) from the per-round timings: median ms, spread,
    tokens/s and, for our rows, the median per-round ratio of tokens/s to the peer's
    (:func:`paired_ratios`) with its range and issue 16's target. Rows whose key was not
    measured are left out; a ratio needs both sides."""
    summary, rows = summarize(rounds), []
    for what, side, key, tokens, versus in ROWS:
        if key not in summary:
            continue
        s = summary[key]
        row = dict(what=what, side=side, ms=s["median"], spread=f"{s['min']:.2f}-{s['max']:.2f}",
                   tokens_per_s=tokens_per_s(s["median"], tokens))
        ratios = paired_ratios(rounds, key, versus[1]) if versus else []
        if ratios:
            row["ratio"] = statistics.median(ratios)
            row["ratio_spread"] = f"{min(ratios):.2f}-{max(ratios):.2f}"
            row["target"] = TARGETS[versus[0]]
            row["met"] = "yes" if row["ratio"] >= row["target"] else "no"
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- our side
def lm_config(overrides: tuple[str, ...] = ()):
    """The ``cpu`` config of ``python -m experiments lm --model attention`` (plus ``--set`` overrides)."""
    from experiments.runner import build_config

    return build_config("lm", "attention", overrides=overrides)


def time_block(run: Callable[[], object], calls: int) -> float:
    """Wall ms per call of ``calls`` consecutive calls of ``run`` (each must wait for its result)."""
    if calls < 1:
        raise ValueError(f"calls: expected >= 1, got {calls}")
    start = time.perf_counter()
    for _ in range(calls):
        run()
    return 1e3 * (time.perf_counter() - start) / calls


class TrainStep:
    """One jitted training step of ``config``'s model, as the training loop calls it (the loss
    and the finite flag read back every step), on a fixed batch."""

    def __init__(self, config, seed: int = 0):
        from experiments.runner import build_model
        from ssmjax.train.loop import make_optimizer, make_train_step

        self.model = build_model(config, vocab_size=VOCAB)
        optimizer, _ = make_optimizer(config, getattr(self.model, "ssm_parameter_mask", None))
        tokens = np.random.default_rng(seed).integers(0, VOCAB, (config.batch_size, config.seq_len + 1), np.int32)
        self.batch = (jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:]), jnp.ones(tokens[:, 1:].shape, bool))
        init_key, self.key = jax.random.split(jax.random.PRNGKey(config.seed))
        self.params = jax.jit(self.model.init)(init_key, self.batch[0])
        self.state = dict(params=self.params, opt_state=optimizer.init(self.params), step=jnp.zeros((), jnp.int32))
        self.step = make_train_step(self.model, optimizer)

    def __call__(self) -> float:
        self.state, metrics = self.step(self.state, *self.batch, self.key)
        bool(metrics["finite"])
        return float(metrics["loss"])


class Ours:
    """Our side's workloads, compiled once (module docstring); :meth:`round` times one block
    of each (``ours_train*_ms`` per step, ``ours_decode_ms`` per token)."""

    def __init__(self, train_calls: int = 10, decode_calls: int = 2, seed: int = 0):
        from experiments.lm_sample import compiled_sampler, with_context
        from experiments.runner import build_model

        config = lm_config()
        self.context, self.train_calls, self.decode_calls = config.seq_len, train_calls, decode_calls
        self.train = TrainStep(config, seed)
        # nanoGPT's MLP shape: W_2 gelu(W_1 x + b_1) + b_2, width 4d (our default is SwiGLU)
        self.train_same_shape = TrainStep(lm_config(("mlp=gelu",)), seed)
        self.params, self.key = self.train.params, self.train.key
        # experiments lm-sample's decode (greedy): the cache sized to the context, donated
        self.decoder = build_model(with_context(config, config.seq_len), vocab_size=VOCAB)
        self.decode_step = compiled_sampler(self.decoder, temperature=0.0, top_k=None)[1]
        self.round()  # compile and warm up every workload

    def decode(self) -> None:
        state = self.decoder.apply(self.params, 1, method="init_state")
        logits = jnp.zeros((1, VOCAB))
        for _ in range(self.context):
            token, logits, state = self.decode_step(self.params, logits, state, self.key)
            int(token[0])  # a sampler needs the token before the next call

    def round(self) -> dict[str, float]:
        return dict(ours_train_ms=time_block(self.train, self.train_calls),
                    ours_train_same_shape_ms=time_block(self.train_same_shape, self.train_calls),
                    ours_decode_ms=time_block(self.decode, self.decode_calls) / self.context)


def param_count(params) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------- one sitting
def measure(rounds: int, train_calls: int, decode_calls: int, threads: int, peer: bool = True,
            progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> dict:
    """Build both sides, then ``rounds`` rounds alternating ours and the peer's (the peer
    first in odd rounds). Returns the per-round timings, their summary, the rows, the
    environment and the load average before and after. ``peer=False`` or a missing torch
    times ours only and says why under ``peer_skipped``."""
    from experiments.bench import peers

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (experiments.bench.nanogpt)
    result = dict(environment(), load_before=os.getloadavg(), rounds=[])
    ours = Ours(train_calls, decode_calls)
    result["ours_params"] = param_count(ours.params)
    nanogpt = None
    reason = "--no-peer" if not peer else peers.missing("torch")
    if reason:
        result["peer_skipped"] = reason
    else:
        from experiments.bench import nanogpt as nanogpt_module

        nanogpt = nanogpt_module.Peer(threads, train_calls, decode_calls)
        result["peer"] = nanogpt_module.describe(threads)
    for i in range(rounds):
        sides = [ours.round] + ([nanogpt.round] if nanogpt else [])
        timings: dict[str, float] = {}
        for side in (sides[::-1] if i % 2 else sides):
            timings.update(side())
        result["rounds"].append(timings)
        progress(f"  round {i + 1}/{rounds}: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    result["load_after"] = os.getloadavg()
    result["summary"] = summarize(result["rounds"])
    result["rows"] = comparison_rows(result["rounds"])
    return result


def report(result: dict, command: str) -> str:
    """The Markdown speed report of one sitting."""
    peer = result.get("peer")
    lines = [
        "# Language-model speed: ours beside nanoGPT (PyTorch) on this CPU",
        "",
        f"Generated by `{command}` ({time.strftime('%Y-%m-%d')}); issue 16's speed requirement.",
        "",
        f"jax {result['jax']} on {result['device']} ({result['cpus']} cpus)"
        + (f"; torch {peer['torch']} with {peer['threads']} threads, OMP_WAIT_POLICY="
           f"{peer.get('omp_wait_policy') or 'unset'}" if peer else f"; peer skipped: {result.get('peer_skipped')}")
        + f". {len(result['rounds'])} rounds alternating the two sides; load average (1 min) "
          f"{result['load_before'][0]:.2f} before, {result['load_after'][0]:.2f} after.",
        "",
        "Ours: `python -m experiments lm --model attention` at its cpu size (4 layers, d_model 128, "
        f"4 heads, RoPE, RMSNorm, SwiGLU MLP of width 512, untied head; {result['ours_params'] / 1e6:.2f}M "
        "parameters), "
        "the jitted training step of `ssmjax.train.loop` with its AdamW (betas 0.9/0.99, weight decay 0.1, "
        "clip 1) and the one-token `step` of `experiments lm-sample`."
        + (f" nanoGPT: {peer['params'] / 1e6:.2f}M parameters as nanoGPT counts them ({peer['params_total']:,} with "
           "the position embeddings): learned positions, LayerNorm with bias, GELU MLP of width 512, tied head, "
           "AdamW(1e-3, (0.9, 0.99), 0.1), clip 1." if peer else ""),
        "",
        markdown_table(result["rows"], COLUMNS),
        "",
        "Train: forward, cross-entropy, backward, clipping and the AdamW update on a fixed 12 x 64 batch, "
        "the loss read back every step. Decode: greedy, batch 1, 64 tokens from an empty cache, one call "
        "and one read-back per token (per-token ms).",
        "",
        "Not the same FLOPs: per token ours has 1.33x nanoGPT's matrix-multiply work (1.06M vs 0.79M "
        "multiply-adds: SwiGLU's three 128 x 512 matrices against GELU's two); the GELU-MLP row "
        "(`--set mlp=gelu`) has nanoGPT's MLP. `step` decodes as `experiments lm-sample` does (the "
        "cache sized to the prompt plus the tokens, donated).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.lm_speed", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds (median; default 7)")
    parser.add_argument("--train-calls", type=int, default=10, help="training steps per round (default 10)")
    parser.add_argument("--decode-calls", type=int, default=2, help="64-token decodes per round (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--no-peer", action="store_true", help="time ours only")
    parser.add_argument("--out", default="results/lm_speed.json", help="JSON of every round")
    parser.add_argument("--report", default=None, help="also write the Markdown report here "
                                                       "(make peers: experiments/results/lm_speed.md)")
    args = parser.parse_args(argv)
    for name in ("rounds", "train_calls", "decode_calls", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    result = measure(args.rounds, args.train_calls, args.decode_calls, args.threads, peer=not args.no_peer)
    print(f"\n{text_table(result['rows'], COLUMNS)}")
    if "peer_skipped" in result:
        print(f"\nnanoGPT peer skipped: {result['peer_skipped']}")
    print(f"load average before {result['load_before'][0]:.2f}, after {result['load_after'][0]:.2f}; "
          f"wrote {write_json(args.out, result)}")
    if args.report:
        command = "python -m experiments.lm_speed " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(report(result, command.strip()))
        print(f"wrote {args.report}")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
