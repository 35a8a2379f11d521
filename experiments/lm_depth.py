"""Recurrent-depth sampling of a trained looped-transformer ``lm`` run (issue 16, item 5):
fixed iterations per token, a per-token adaptive exit, and the diffusion-forcing parallel
sampler, compared on quality and speed.

    python -m experiments lm-depth --run runs/lm_depth/lm/universal_transformer \\
        [--prompts 8 --prompt-len 32 --tokens 32 --temperatures 0 0.8 --thresholds 5e-4 5e-3 5e-2 --seed 0]

The run must be a one-layer ``universal_transformer`` LM (``--model universal_transformer
--set n_layers=1``), e.g. trained with ``halting="sampled"`` (the recurrent-depth recipe of
Geiping et al., 2025). ``--prompts`` windows of ``--prompt-len`` characters are taken from
the validation split at evenly spaced offsets; each mode of
:func:`ssmjax.models.depth_sampling.depth_generate` continues every prompt by ``--tokens``
characters at each ``--temperatures`` value (0: greedy; the token at position ``i`` is drawn
with ``fold_in(key(seed), i)`` in every mode, so sampled texts are comparable). Modes: fixed
``r`` iterations for ``r`` in ``max_steps``, ``max_steps / 2``, ``max_steps / 4`` (the first
is the reference: the model's own test-time forward); adaptive with each KL ``--thresholds``
value (and ACT's halting for a ``halting="act"`` model); parallel with the budget
``max_steps`` (exact), with that budget and the middle threshold as an early commit, and with
the budget ``max_steps / 2``. A run whose layer has ``think_at_hard_tokens=True``
(Think-at-Hard) is sampled in its own mode only, ``think`` (its decider picks each token's
iterations; the reference, exactly the model's forward): the other modes do not apply to it.

Per mode: ``agreement`` (fraction of generated tokens equal to the reference's at the same
position), ``prefix`` (mean length of the agreeing prefix, as a fraction of ``--tokens``),
``nll`` (mean negative log-likelihood, nats per token, of the generated characters rescored
teacher-forced by the model at ``max_steps`` iterations: the reference's own text is its
floor at temperature 0), ``depth`` (mean iterations of the position that predicted each
token), ``iters/tok`` (block applications per generated position, restarted work
included), ``passes/tok`` (model calls per generated position after the prefill) and
``tok/s`` (generated tokens per second of wall time, prefill included, after one untimed
warm-up call per mode; one sequence at a time on this machine). Writes
``<run>/depth_sampling.json`` and ``<run>/depth_sampling.md`` (the table).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

DESCRIPTION = ("fixed / adaptive / parallel (or think-at-hard) recurrent-depth sampling of a "
               "looped-transformer lm run (--run DIR)")


def modes(layer, thresholds: list[float]) -> list[tuple[str, dict]]:
    """``(name, depth_generate options)`` of every mode compared (module docstring); the first
    is the reference. A think_at_hard_tokens layer has the one mode ``think``."""
    if layer.think_at_hard_tokens:
        return [("think", dict(mode="think"))]
    R = layer.max_steps
    depths = sorted({R, max(1, R // 2), max(1, R // 4)}, reverse=True)
    out = [(f"fixed r={r}", dict(mode="fixed", iterations_per_token=r)) for r in depths]
    out += [(f"adaptive kl<{t:g}", dict(mode="adaptive", threshold=t)) for t in thresholds]
    if layer.halting == "act":
        out.append(("adaptive act", dict(mode="adaptive", criterion="act")))
    out.append((f"parallel r={R}", dict(mode="parallel")))
    if thresholds:
        middle = sorted(thresholds)[len(thresholds) // 2]
        out.append((f"parallel r={R} kl<{middle:g}", dict(mode="parallel", threshold=middle)))
    if R // 2 >= 1 and R // 2 != R:
        out.append((f"parallel r={R // 2}", dict(mode="parallel", iterations_per_token=R // 2)))
    return out


def prompts_from(valid: np.ndarray, count: int, length: int) -> np.ndarray:
    """``count`` windows of ``length`` tokens at evenly spaced offsets of the validation split."""
    if valid.size < length + 1:
        raise ValueError(f"--prompt-len: the validation split has {valid.size} tokens, fewer than {length + 1}")
    offsets = np.linspace(0, valid.size - length - 1, count).astype(int)
    return np.stack([valid[o:o + length] for o in offsets])


def rescore(model, params, prompts: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """Teacher-forced NLL ``[n, G]`` of ``generated`` after ``prompts`` under the model's own
    (max_steps) forward pass."""
    full = jnp.asarray(np.concatenate([prompts, generated], 1), jnp.int32)
    logits = jax.jit(model.apply)(params, full)[:, prompts.shape[1] - 1:-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    return -np.asarray(jnp.take_along_axis(logp, jnp.asarray(generated)[..., None], -1)[..., 0])


def evaluate(model, params, prompts: np.ndarray, tokens: int, temperature: float, top_k: int | None,
             thresholds: list[float], seed: int, log=print) -> list[dict]:
    """One row per mode (module docstring) at one temperature."""
    from ssmjax.models.depth_sampling import depth_generate, depth_layer

    layer = depth_layer(model)
    key = jax.random.key(seed)
    rows, reference = [], None
    for name, options in modes(layer, thresholds):
        run = dict(options, temperature=temperature, top_k=top_k)
        depth_generate(model, params, prompts[0], tokens, key, **run)  # compile (untimed)
        samples = [depth_generate(model, params, p, tokens, key, **run) for p in prompts]
        generated = np.stack([s.tokens for s in samples])
        if reference is None:
            reference = generated
        same = generated == reference
        prefix = np.argmin(np.concatenate([same, np.zeros((len(same), 1), bool)], 1), 1)
        decoded = max(tokens - 1, 1) * len(samples)
        seconds = sum(s.seconds for s in samples)
        row = dict(mode=name, options=options, temperature=temperature, agreement=float(same.mean()),
                   prefix=float(prefix.mean() / tokens), nll=float(rescore(model, params, prompts, generated).mean()),
                   depth=float(np.mean([s.depths.mean() for s in samples])),
                   iterations_per_token=sum(s.iterations for s in samples) / decoded,
                   passes_per_token=sum(s.passes for s in samples) / decoded,
                   restarts=int(sum(s.restarts for s in samples)), tokens_per_s=generated.size / seconds,
                   seconds=seconds)
        rows.append(row)
        log(f"T={temperature:g} {name:<22} agree {row['agreement']:.3f} nll {row['nll']:.3f} depth "
            f"{row['depth']:.2f} iters/tok {row['iterations_per_token']:.2f} passes/tok "
            f"{row['passes_per_token']:.2f} tok/s {row['tokens_per_s']:.0f}")
    return rows


def table(rows: list[dict]) -> str:
    """The markdown table of :func:`evaluate`'s rows."""
    lines = ["| T | mode | agreement | prefix | NLL (nats/char) | depth | iters/tok | passes/tok | restarts | tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['temperature']:g} | {r['mode']} | {r['agreement']:.3f} | {r['prefix']:.3f} | "
                     f"{r['nll']:.3f} | {r['depth']:.2f} | {r['iterations_per_token']:.2f} | "
                     f"{r['passes_per_token']:.2f} | {r['restarts']} | {r['tokens_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _check_run(run_dir: Path) -> None:
    """A clear error for a run that is not a one-layer universal_transformer LM, before restoring it."""
    from experiments.configs import config_from_dict
    from experiments.runner import build_model
    from ssmjax.models.depth_sampling import depth_layer

    saved_path = run_dir / "config.json"
    if not saved_path.is_file():
        return  # load_run names the problem
    saved = json.loads(saved_path.read_text())
    if saved.get("experiment") != "lm":
        return
    try:
        depth_layer(build_model(config_from_dict("lm", saved["config"]), vocab_size=2))
    except ValueError as error:
        raise ValueError(f"--run: {run_dir} is not a looped-transformer run ({error})") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments lm-depth", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="an lm run of --model universal_transformer --set n_layers=1")
    parser.add_argument("--prompts", type=int, default=8, help="validation prompts (default 8)")
    parser.add_argument("--prompt-len", type=int, default=32, help="characters per prompt (default 32)")
    parser.add_argument("--tokens", type=int, default=32, help="characters generated per prompt (default 32)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.8],
                        help="sampling temperatures, 0 greedy (default 0 0.8)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (default 0: all)")
    parser.add_argument("--thresholds", type=float, nargs="*", default=[5e-4, 5e-3, 5e-2],
                        help="KL exit thresholds of the adaptive mode (default 5e-4 5e-3 5e-2)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from experiments.lm_sample import load_run

    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        for name in ("prompts", "prompt_len", "tokens"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
        if any(t < 0 for t in args.temperatures):
            raise ValueError(f"--temperatures: expected values >= 0, got {args.temperatures}")
        if any(not t > 0 for t in args.thresholds):
            raise ValueError(f"--thresholds: expected KL thresholds > 0, got {args.thresholds}")
        run_dir = Path(args.run)
        _check_run(run_dir)
        config, tokenizer, model, params = load_run(run_dir, window=0)
        from experiments.tasks import lm_corpus

        prompts = prompts_from(np.asarray(lm_corpus(config).valid), args.prompts, args.prompt_len)
    except ValueError as error:
        parser.error(str(error))
    top_k = args.top_k or None
    rows = []
    for temperature in args.temperatures:
        rows += evaluate(model, params, prompts, args.tokens, temperature, top_k, list(args.thresholds), args.seed)
    layer_fields = dict(config.mixer_fields.get("universal_transformer", {}))
    result = dict(run=str(run_dir), layer=layer_fields, prompts=args.prompts, prompt_len=args.prompt_len,
                  tokens=args.tokens, top_k=top_k, seed=args.seed, seq_len=config.seq_len,
                  device=jax.devices()[0].device_kind, rows=rows)
    (run_dir / "depth_sampling.json").write_text(json.dumps(result, indent=2))
    markdown = table(rows)
    (run_dir / "depth_sampling.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
