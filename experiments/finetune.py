"""Finetuning a pretrained character LM on a new domain with each method of
:mod:`ssmjax.train.finetune` (full, partial, LoRA, adapters): downstream validation
bits/char, trainable / total parameters and wall time per method.

    python -m experiments finetune --model M [--set method=lora|adapters|partial|full]
                                   [--set pretrained=runs/lm/attention] [--set steps=N ...]

Protocol (CPU size; the shape of "Making the Most of your Model: Methods for Finetuning
and Applying Pretrained Transformers": pretrain once, adapt to a downstream task by each
method, compare quality against trainable parameters). The tinyshakespeare training split
(nanoGPT's first 90%) is cut in two at ``pretrain_fraction``: the first part (the earlier
plays) pretrains an ``lm`` model for ``pretrain_steps`` (once per model and run name, in
``<out>/finetune/<model>-pretrain``, reused by every method), the second part (later plays:
other characters, names and vocabulary) is the downstream training data, and the downstream
metric is the validation bits/char on nanoGPT's validation split (the last 10%, later plays
still). ``zero_shot_bpc`` is the pretrained model's score before any finetuning. With
``pretrained=DIR`` (an ``lm`` run directory) that run's model and corpus are used instead
(it has then seen the downstream text in pretraining, if it trained on the whole split).

``method``: ``full``; ``partial`` trains the parameters matching ``trainable``
(comma-separated: ``head``, ``norms``, ``lastK`` = the last K blocks, or regular
expressions over parameter paths; default ``head,norms,last1``); ``lora`` (rank
``lora_rank``, ``lora_alpha``, on the mixers' Dense kernels; ``trainable`` adds pretrained
parameters, default none, as Hu et al.); ``adapters`` (bottleneck ``adapter_dim`` after
every mixer and MLP; default ``trainable`` ``norms``, as Houlsby et al.). Each finetuning
run is a normal training run in ``<out>/finetune/<model>-<method>`` (metrics, checkpoints,
``result.json`` with ``parameters`` and ``zero_shot_bpc``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from experiments.configs import LMConfig, config_to_dict, parse_overrides, replace
from ssmjax.data.text import Corpus, TextTask
from ssmjax.train import (HEAD, NORMS, Checkpointer, Evaluator, FinetunedModel, Finetuning, last_blocks,
                          make_optimizer, parameter_counts, train)

DESCRIPTION = "finetune a pretrained char LM on later plays: full / partial / LoRA / adapters, bpc vs trainable params"
DEFAULT_TRAINABLE = {"full": "", "partial": "head,norms,last1", "lora": "", "adapters": "norms"}


@dataclasses.dataclass
class FinetuneConfig(LMConfig):
    """An ``lm`` config (model, corpus, optimiser of the finetuning) plus the finetuning's
    fields (module docstring). ``steps``/``lr``/``warmup_steps`` are the finetuning's;
    ``pretrain_steps``/``pretrain_lr`` the pretraining's."""

    method: str = "lora"
    pretrained: str = ""
    pretrain_steps: int = 600
    pretrain_lr: float = 2e-3
    pretrain_fraction: float = 0.5
    trainable: str = "default"
    lora_rank: int = 4
    lora_alpha: float = 8.0
    adapter_dim: int = 8


_TRAIN = dict(batch_size=16, seq_len=64, d_model=64, n_layers=2, warmup_steps=20, weight_decay=0.0, eval_every=10**9,
              checkpoint_every=10**9, log_every=25, eval_windows=256, eval_batch_size=64)
SIZES = {
    # CPU: a 2-layer d = 64 model, 600 pretraining + 200 finetuning steps (~1-2 min per method on 2 busy cores).
    "cpu": FinetuneConfig(steps=200, lr=2e-3, pretrain_steps=600, **_TRAIN),
    # Paper-scale is not this protocol (see experiments/notes/finetune.md); "paper" is nanoGPT's
    # shakespeare_char model (6 x 384) with 5000 pretraining and 2000 finetuning steps.
    "paper": FinetuneConfig(steps=2000, lr=1e-3, pretrain_steps=5000, pretrain_lr=1e-3, batch_size=64, seq_len=256,
                            d_model=384, n_layers=6, warmup_steps=100, eval_every=500, checkpoint_every=500,
                            log_every=100, eval_windows=0, eval_batch_size=64, lora_rank=8, lora_alpha=16.0,
                            adapter_dim=32),
}


def trainable_patterns(text: str, method: str, params: Any) -> tuple[str, ...]:
    """``"head,norms,last2,<regex>"`` -> parameter-path patterns (``"default"``: the method's
    default, :data:`DEFAULT_TRAINABLE`; ``""`` or ``"none"``: none)."""
    text = DEFAULT_TRAINABLE[method] if text == "default" else text
    patterns: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        if item in ("", "none"):
            continue
        if item == "head":
            patterns.append(HEAD)
        elif item == "norms":
            patterns.append(NORMS)
        elif item.startswith("last") and item[4:].isdigit():
            patterns += last_blocks(params, int(item[4:]))
        else:
            patterns.append(item)
    return tuple(patterns)


def finetuning(config: FinetuneConfig, params: Any) -> Finetuning:
    """The :class:`ssmjax.train.Finetuning` of ``config`` for a model with ``params``."""
    return Finetuning(config.method, trainable_patterns(config.trainable, config.method, params),
                      rank=config.lora_rank, alpha=config.lora_alpha, bottleneck=config.adapter_dim)


def split_tasks(config: LMConfig, corpus: Corpus, fraction: float) -> tuple[TextTask, TextTask]:
    """``(pretraining task, downstream task)``: the training split cut at ``fraction``; both
    score the validation split."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"pretrain_fraction: expected a fraction in (0, 1), got {fraction}")
    cut = int(len(corpus.train) * fraction)
    make = lambda train: TextTask.from_corpus(  # noqa: E731
        Corpus(corpus.tokenizer, train, corpus.valid), seq_len=config.seq_len, batch_size=config.batch_size,
        seed=config.seed, eval_windows=config.eval_windows or None, eval_batch_size=config.eval_batch_size)
    return make(corpus.train[:cut]), make(corpus.train[cut:])


def restore_params(run_dir: Path, model, config: LMConfig, example: jax.Array) -> Any:
    """The parameters of the newest checkpoint of a :func:`ssmjax.train.train` run of ``model``."""
    params = jax.jit(model.init)(jax.random.key(0), example)
    optimizer, _ = make_optimizer(config, model.ssm_parameter_mask)
    like = dict(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))
    checkpoints = Checkpointer(run_dir / "checkpoints", keep=config.keep_checkpoints)
    try:
        return checkpoints.restore(like)["params"]
    finally:
        checkpoints.close()


def pretrain(config: FinetuneConfig, out: Path, name: str | None, verbose: bool):
    """``(model, params, downstream task, pretraining info)``: the ``pretrained`` lm run, or
    a pretraining run in ``<out>/finetune/<model>-pretrain`` (trained once, then reused)."""
    from experiments.runner import build_model, model_slug
    from experiments.tasks import lm_corpus

    if config.pretrained:
        from experiments.lm_sample import load_run

        lm_config, tokenizer, model, params = load_run(config.pretrained, window=0)
        corpus = lm_corpus(lm_config)
        _, downstream = split_tasks(replace(config, seq_len=lm_config.seq_len), corpus, config.pretrain_fraction)
        return model, params, downstream, dict(run=str(config.pretrained))
    corpus = lm_corpus(config)
    upstream, downstream = split_tasks(config, corpus, config.pretrain_fraction)
    model = build_model(config, corpus.tokenizer.vocab_size)
    run_dir = out / "finetune" / "-".join(filter(None, [model_slug(config.model), "pretrain", name]))
    pre = replace(config, steps=config.pretrain_steps, lr=config.pretrain_lr)
    result_path = run_dir / "result.json"
    done = result_path.exists() and json.loads(result_path.read_text()).get("status") == "done"
    saved = json.loads((run_dir / "config.json").read_text())["config"] if done else None
    if done and {k: saved.get(k) for k in _PRETRAIN_KEYS} == {k: getattr(pre, k) for k in _PRETRAIN_KEYS}:
        if verbose:
            print(f"pretrained model: reusing {run_dir}", flush=True)
        params = restore_params(run_dir, model, pre, jnp.asarray(upstream.train_batch(0).inputs))
        result = json.loads(result_path.read_text())
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        metadata = dict(experiment="finetune", role="pretrain", model=config.model, run=run_dir.name)
        run_dir.mkdir(parents=True)
        (run_dir / "config.json").write_text(json.dumps(dict(metadata, config=config_to_dict(pre)), indent=2) + "\n")
        trained = train(model, upstream, pre, run_dir, metadata=metadata, title=f"finetune[{config.model}] pretrain",
                        verbose=verbose)
        params, result = trained.params, trained.results
    return model, params, downstream, dict(run=str(run_dir), steps=config.pretrain_steps,
                                           wall_s=result.get("wall_s"))


#: Settings that make a pretraining run: a saved run is reused only when they all agree.
_PRETRAIN_KEYS = ("model", "d_model", "n_layers", "mlp", "mlp_ratio", "norm", "mixer_fields", "steps", "lr",
                  "batch_size", "seq_len", "seed", "pretrain_fraction", "data_file", "data_dir", "warmup_steps")


def run(config: FinetuneConfig, out: str | Path = "runs", name: str | None = None, verbose: bool = True
        ) -> dict[str, Any]:
    """Pretrain (or load), then finetune with ``config.method``; returns ``result.json``."""
    from experiments.runner import model_slug

    if config.method not in DEFAULT_TRAINABLE:  # before any pretraining
        raise ValueError(f"method: expected one of {tuple(DEFAULT_TRAINABLE)}, got {config.method!r}")
    out = Path(out)
    model, params, task, pretrained = pretrain(config, out, name, verbose)
    zero_shot = task.evaluate(Evaluator(model).at(params))
    finetuned = FinetunedModel(model, params, finetuning(config, params))
    run_dir = out / "finetune" / "-".join(filter(None, [model_slug(config.model), config.method, name]))
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    example = jnp.asarray(task.train_batch(0).inputs)
    counts = parameter_counts(finetuned, jax.eval_shape(finetuned.init, jax.random.key(0), example))
    metadata = dict(experiment="finetune", role="finetune", method=config.method, model=config.model, run=run_dir.name,
                    parameters=counts, pretrained=pretrained, zero_shot_bpc=zero_shot["bits_per_char"],
                    trainable_patterns=list(finetuned.finetuning.trainable))
    (run_dir / "config.json").write_text(json.dumps(dict(metadata, config=config_to_dict(config)), indent=2) + "\n")
    if verbose:
        print(f"finetune / {config.model} / {config.method}: {counts['trainable']:,} of {counts['total']:,} parameters "
              f"train ({100 * counts['fraction']:.2f}%); zero-shot {zero_shot['bits_per_char']:.3f} bits/char",
              flush=True)
    start = time.perf_counter()
    result = train(finetuned, task, config, run_dir, metadata=metadata, verbose=verbose,
                   title=f"finetune[{config.model}] {config.method}").results
    result["finetune_wall_s"] = round(time.perf_counter() - start, 2)
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments finetune", description=DESCRIPTION,
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="registered mixer name or hybrid pattern")
    parser.add_argument("--size", default="cpu", choices=tuple(SIZES))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="runs", help="output root (default: runs/)")
    parser.add_argument("--name", default=None, help="suffix of the run directories")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = replace(SIZES[args.size], model=args.model)
        config = replace(config, **parse_overrides(config, args.overrides))
        result = run(config, args.out, args.name, verbose=not args.quiet)
    except ValueError as error:
        parser.error(str(error))
    counts = result["parameters"]
    print(f"{result['status']}: {result['method']} bits/char {result['zero_shot_bpc']:.3f} -> "
          f"{result['eval']['bits_per_char']:.3f}; {counts['trainable']:,} / {counts['total']:,} parameters train")
    return 0


def report_section(run_dirs: list[Path], figures_dir: Path) -> str:
    """One table row per finetuning run: method, parameters, bits/char before and after."""
    rows = []
    for run_dir in sorted(run_dirs):
        path = run_dir / "result.json"
        result = json.loads(path.read_text()) if path.exists() else {}
        if result.get("role") != "finetune" or not result.get("eval"):
            continue
        p = result["parameters"]
        rows.append(f"| {result['model']} | {result['method']} | {p['trainable']:,} | {p['total']:,} | "
                    f"{100 * p['fraction']:.2f}% | {result['zero_shot_bpc']:.3f} | {result['eval']['bits_per_char']:.3f} | "
                    f"{result.get('finetune_wall_s', result.get('wall_s', math.nan)):.0f} |")
    header = ["## Finetuning methods (tinyshakespeare: earlier plays -> later plays)", "",
              "| model | method | trainable | total | trainable % | zero-shot bits/char | finetuned bits/char | s |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    return "\n".join(header + (rows or ["| (no finished runs) | | | | | | | |"]))
