"""Sample text from a trained ``lm`` run, streaming each character as it is decoded.

    python -m experiments lm-sample --run runs/lm/attention --prompt "ROMEO:" --tokens 500 \\
        --temperature 0.8 --top-k 40 [--seed 0] [--window N]

The run's ``config.json`` gives the model and its sizes; the tokenizer is rebuilt from
the run's data file exactly as the ``lm`` task builds it (vocabulary of the training
split); the newest checkpoint in ``<run>/checkpoints`` is restored. The prompt is run in
the parallel form with ``return_state=True``, then every new token is one call of the
model's ``step`` (the recurrent / KV-cache form), sampled as in nanoGPT's ``sample.py``:

    p(x_t) = softmax(top_k(logits_t) / temperature)      (greedy when temperature == 0)

with the key of token ``i`` equal to ``fold_in(key(seed), i)``, so a fixed ``--seed``
gives the same text. Attention layers see at most ``--window`` past tokens (default: the
run's training context ``seq_len``, as nanoGPT crops its context to ``block_size``; 0:
the whole cache), so RoPE never meets a distance it was not trained on. The KV cache is
sized to the prompt plus ``--tokens`` and updated in place (a donated decode state).
"""

from __future__ import annotations

import argparse
import codecs
import functools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DESCRIPTION = "stream text sampled from a trained lm run (--run DIR --prompt TEXT --tokens N)"


def load_run(run_dir: str | Path, window: int | None = None) -> tuple[Any, Any, Any, Any]:
    """``(config, tokenizer, model, params)`` of an ``lm`` run directory, restored from its
    newest checkpoint. ``window``: attention's sampling window (``None``: the run's
    ``seq_len``; 0: unlimited)."""
    from experiments.configs import config_from_dict, replace
    from experiments.runner import build_model
    from experiments.tasks import lm_corpus
    from ssmjax.train.loop import make_optimizer

    run_dir = Path(run_dir)
    saved_path = run_dir / "config.json"
    if not saved_path.is_file():
        raise ValueError(f"--run: {run_dir} is not a run directory (no config.json); give a folder written by "
                         "'python -m experiments lm', e.g. runs/lm/attention")
    saved = json.loads(saved_path.read_text())
    if saved.get("experiment") != "lm":
        raise ValueError(f"--run: {run_dir} is a {saved.get('experiment')!r} run, not an 'lm' run")
    checkpoints = run_dir / "checkpoints"
    steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.is_dir() else []
    if not steps:
        raise ValueError(f"--run: {run_dir} has no checkpoint in {checkpoints}; train it first (or --resume it)")
    config = config_from_dict("lm", saved["config"])
    tokenizer = lm_corpus(config).tokenizer
    params = _restore(config, build_model(config, tokenizer.vocab_size), checkpoints, make_optimizer)
    window = config.seq_len if window is None else window
    if window:
        fields = {k: dict(v) for k, v in config.mixer_fields.items()}
        fields.setdefault("attention", {})["window"] = window
        config = replace(config, mixer_fields=fields)
    return config, tokenizer, build_model(config, tokenizer.vocab_size), params


def _restore(config, model, directory: Path, make_optimizer) -> Any:
    from ssmjax.train.checkpoint import Checkpointer

    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    optimizer, _ = make_optimizer(config, model.ssm_parameter_mask)  # the state's structure, as train() made it
    like = dict(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))
    checkpointer = Checkpointer(directory, keep=config.keep_checkpoints)
    try:
        return checkpointer.restore(like)["params"]
    finally:
        checkpointer.close()


_COMPILED: dict[tuple, tuple] = {}


def compiled_sampler(model, temperature: float, top_k: int | None) -> tuple:
    """The jitted prefill and one-token decode of ``model`` (cached by the model's fields,
    so sampling the same run twice in one process compiles once)."""
    from ssmjax.models.backbone import sample_logits

    cache_key = (repr(model), temperature, top_k)
    if cache_key not in _COMPILED:
        @jax.jit
        def prefill(params, prompt):
            logits, state = model.apply(params, prompt[None], return_state=True)
            return logits[:, -1], state

        @functools.partial(jax.jit, donate_argnums=2)  # the cache is updated in place, not copied per token
        def decode(params, logits, state, key):
            token = sample_logits(logits, key, temperature, top_k)
            next_logits, state = model.apply(params, token, state, method="step")
            return token, next_logits, state

        _COMPILED[cache_key] = prefill, decode
    return _COMPILED[cache_key]


def sample_stream(model, params, prompt: np.ndarray, tokens: int, key: jax.Array, temperature: float = 1.0,
                  top_k: int | None = None) -> Iterator[int]:
    """Yield ``tokens`` sampled ids one at a time: the prompt ``[t]`` in parallel form,
    then one ``step`` per token (module docstring)."""
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: expected >= 1, got {top_k}")
    vocab = model.vocab_size
    top_k = None if top_k is None or top_k >= vocab else top_k

    prefill, decode = compiled_sampler(model, float(temperature), top_k)
    logits, state = prefill(params, jnp.asarray(prompt, jnp.int32))
    for i in range(tokens):
        token, logits, state = decode(params, logits, state, jax.random.fold_in(key, i))
        yield int(token[0])


def with_context(config, context: int):
    """``config`` with attention's KV cache sized to ``context`` slots (a decode of ``context``
    tokens needs no more; the layer's default is 2048, and every token attends over, and
    rewrites, every slot)."""
    from experiments.configs import replace

    fields = {k: dict(v) for k, v in config.mixer_fields.items()}
    fields.setdefault("attention", {})["max_len"] = context
    return replace(config, mixer_fields=fields)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments lm-sample", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="an lm run directory (runs/lm/<run>)")
    parser.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    parser.add_argument("--tokens", type=int, default=500, help="characters to generate (default 500)")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 is greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=40, help="sample from the k likeliest (default 40; 0: all)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    parser.add_argument("--window", type=int, default=None,
                        help="attention layers see at most this many past tokens (default: the run's seq_len; 0: all)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from experiments.runner import build_model

    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.tokens < 1:
            raise ValueError(f"--tokens: expected >= 1, got {args.tokens}")
        if args.window is not None and args.window < 0:
            raise ValueError(f"--window: expected >= 0, got {args.window}")
        if not args.prompt:
            raise ValueError("--prompt: expected at least one character")
        config, tokenizer, model, params = load_run(args.run, args.window)
        unknown = sorted(set(args.prompt) - set(getattr(tokenizer, "chars", args.prompt)))  # bytes: none
        if unknown:
            raise ValueError(f"--prompt: {len(unknown)} character(s) outside the run's vocabulary of "
                             f"{tokenizer.vocab_size}: {''.join(unknown)!r}; the vocabulary is "
                             f"{getattr(tokenizer, 'chars', '')!r}")
        prompt = tokenizer.encode(args.prompt)
        model = build_model(with_context(config, len(prompt) + args.tokens), tokenizer.vocab_size)
        stream = sample_stream(model, params, prompt, args.tokens, jax.random.key(args.seed), args.temperature,
                               args.top_k or None)
    except ValueError as error:
        parser.error(str(error))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace") if not hasattr(tokenizer, "chars") else None
    sys.stdout.write(args.prompt)
    for token in stream:
        text = decoder.decode(bytes([token])) if decoder else tokenizer.decode([token])
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
