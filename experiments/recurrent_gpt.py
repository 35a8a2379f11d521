"""RecurrentGPT's language-based long-short-term memory loop (Zhou et al., 2023,
arXiv:2305.13304) run around our character LM, against plain rolling generation.

    python -m experiments recurrent_gpt [--model attention] [--set pretrained=runs/lm/<run>] [--set key=value ...]

The loop itself is :mod:`ssmjax.models.recurrent_gpt` (state ``(x_t, h_t, p_t, M_t)``:
paragraph, short-term memory, plan, long-term memory of past paragraphs with hashed
character n-gram embeddings; each step retrieves the ``top_k`` memories nearest in cosine to
``h_t + p_t``, prompts, generates, parses, archives). The generator is
:func:`ssmjax.models.backbone.generate` on a character LM trained on tinyshakespeare:
``pretrained`` (an ``lm`` run directory, restored as ``lm-sample`` does) or else one
pretrained here by :func:`experiments.finetune.pretrain` (``pretrain_steps`` steps on the first
``pretrain_fraction`` of the training split, windows of ``seq_len`` characters; cached in
``<out>/finetune/<model>-pretrain-recurrent_gpt`` and reused while its settings agree).
Attention sees at most ``seq_len`` past characters while sampling (as in ``lm-sample``).

Protocol. ``stories`` stories are cut from the validation split (:func:`stories`: from a
speech start at evenly spaced offsets, whole speeches packed into paragraphs of at most
``chars`` characters); paragraph 0 is the opening. From each opening, two generators write
``steps`` paragraphs of ``chars`` sampled characters each (temperature ``temperature``,
top-``sample_top_k``; the key is ``fold_in(key(seed), crc32(prompt))``, so a prompt always
gives the same text):

* ``recurrent_gpt``: the prompt is :data:`SCRIPT_TEMPLATE`, the retrieved memories (their
  first ``memory_chars`` characters each), the short-term memory (``short_memory_chars``),
  the plan, then the last ``previous_chars`` of the previous paragraph and a blank line;
* ``recent``: the same prompt, but the memories are the ``top_k`` newest paragraphs before
  the previous one instead of the most similar (an ablation of the semantic search: a
  longer rolling window, compressed to the paragraphs' heads);
* ``rolling``: the prompt is the previous paragraph and a blank line (plain generation, the
  paper's Rolling-ChatGPT baseline). The same memory bookkeeping and retrieval run, but
  what they retrieve is never shown to the LM: it measures chance reuse.

Every prompt is cut to its last ``context`` characters (0: ``seq_len``) and left-padded with
newlines to that length (one compiled sampler). A character LM cannot write the paper's
``Output Paragraph / Updated Memory / Instruction`` sections, so every step takes the
parser's fallback: the paragraph is the whole sample, the short-term memory keeps the first
lines of recent paragraphs, the plan stays ``plan``. The checks of the mechanism:

* sampled (:func:`mechanism_stats`): speaker names (lines ``NAME:``) and words (4+ letters)
  of each new paragraph that occur in the retrieved memories' shown text but not in the
  previous paragraph, i.e. that only long-term memory could have supplied; speakers reused
  from any paragraph older than the previous one; the LM's bits/char on its own output
  (non-overlapping windows of ``seq_len``) beside its validation bits/char;
* teacher-forced (:func:`continuation_nats`): the same loop run over the real story (the
  generator returns the real next paragraph, :func:`scripted`), and the LM's bits/char on
  each real next paragraph right after each generator's prompt, over all characters and
  over the speaker-name lines, and per generator the mean over steps of its per-step
  bits/char minus ``rolling``'s on the same step, with its standard error (a paired
  comparison). If the retrieved memories carry information the LM can use,
  ``recurrent_gpt``'s prompts predict the real text better than ``rolling``'s, and better
  than ``recent``'s if semantic search beats recency.

Written per run: ``recurrent_gpt-<i>.txt`` and ``rolling-<i>.txt`` (opening and paragraphs,
blank-line separated), ``memory-<i>.json`` (the long-term memory and, per step, its size, the
retrieved items with cosines, short-term memory, plan, parsed fields, prompt) and
``result.json`` (per generator: the table of :func:`report_section`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import regression
from ssmjax.models import generate as lm_generate
from ssmjax.models.recurrent_gpt import (Generate, LoopConfig, PromptTemplate, StepRecord, head, initial_state,
                                         run_loop)

EXPERIMENT = "recurrent_gpt"
DESCRIPTION = ("RecurrentGPT's language long-short-term memory loop (retrieve, prompt, generate, parse, archive) "
               "around our char LM vs rolling generation: memory-only name / word reuse, bits/char")
PAPER_FINDING = (
    "Zhou et al. (2023, arXiv:2305.13304): with ChatGPT as the generator, the language-based long-short-term "
    "memory loop writes novels of thousands of words that human judges rated more interesting and more coherent "
    "than those of a rolling-window ChatGPT and of earlier hierarchical long-story generators; the memory lets a "
    "fixed-context model keep track of what it wrote long before.")
GENERATORS = ("recurrent_gpt", "recent", "rolling")

#: The char LM's prompt: retrieved memories, short-term memory, plan, previous paragraph; a play's
#: layout (speeches separated by blank lines), so the LM continues with the next speech.
SCRIPT_TEMPLATE = PromptTemplate(body="{memories}\n\n{short_memory}\n\n{plan}{paragraph}\n\n", memory_separator="\n\n")
#: Plain generation: the previous paragraph only.
ROLLING_TEMPLATE = PromptTemplate(body="{paragraph}\n\n")

SPEAKER = re.compile(r"^([A-Z][A-Za-z']*(?: [A-Z][A-Za-z']*){0,3}):$", re.MULTILINE)
WORD = re.compile(r"[a-z]{4,}")


@dataclasses.dataclass(frozen=True)
class RecurrentGPTConfig:
    """One run (module docstring). ``model`` .. ``pretrain_fraction``: the LM pretrained when
    ``pretrained`` is empty; ``context``: prompt characters the LM sees (0: ``seq_len``)."""

    model: str = "attention"
    pretrained: str = ""
    d_model: int = 64
    n_layers: int = 2
    seq_len: int = 256
    batch_size: int = 16
    pretrain_steps: int = 800
    pretrain_lr: float = 3e-3
    pretrain_fraction: float = 0.9
    data_dir: str = ""
    data_file: str = "tinyshakespeare.txt"
    context: int = 0
    stories: int = 4
    steps: int = 24
    chars: int = 256
    top_k: int = 2
    memory_chars: int = 56
    short_memory_chars: int = 36
    previous_chars: int = 100
    dim: int = 1024
    ngram: int = 3
    plan: str = ""
    temperature: float = 0.8
    sample_top_k: int = 40
    seed: int = 0


SIZES = {
    # 2 x 64 attention LM, 800 steps of 16 x 256 characters (3.7 CPU-minutes; 12 min wall on cores shared at load
    # 12-14), cached; then 4 stories x 24 steps x 256 characters per generator (25 CPU-seconds, ~1 min wall).
    # Smallest end-to-end run: --set pretrain_steps=20 --set steps=5 --set stories=2 (~1 min wall).
    "cpu": RecurrentGPTConfig(),
    # approx. (the paper prompts ChatGPT): nanoGPT's shakespeare_char model size, longer context and stories.
    "paper": RecurrentGPTConfig(d_model=384, n_layers=6, seq_len=512, batch_size=64, pretrain_steps=5000,
                                pretrain_lr=1e-3, stories=4, steps=40, chars=512, memory_chars=120,
                                short_memory_chars=80, previous_chars=180, top_k=2),
}


def check_config(config: RecurrentGPTConfig) -> None:
    for name in ("stories", "steps", "chars", "seq_len", "dim", "ngram", "short_memory_chars"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name}: expected >= 1, got {getattr(config, name)}")
    for name in ("context", "top_k", "memory_chars", "previous_chars", "sample_top_k"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name}: expected >= 0, got {getattr(config, name)}")
    if config.temperature < 0:
        raise ValueError(f"temperature: expected >= 0, got {config.temperature}")


def loop_configs(config: RecurrentGPTConfig) -> dict[str, LoopConfig]:
    """The :class:`~ssmjax.models.recurrent_gpt.LoopConfig` of each generator."""
    shared = dict(top_k=config.top_k, dim=config.dim, ngram=config.ngram, short_memory_chars=config.short_memory_chars,
                  memory_chars=config.memory_chars)
    script = dict(shared, template=SCRIPT_TEMPLATE, paragraph_chars=config.previous_chars)
    return dict(zip(GENERATORS, (LoopConfig(**script), LoopConfig(**script, retrieval="recent"),
                                 LoopConfig(ROLLING_TEMPLATE, **shared))))


# ----------------------------------------------------------------------------- the language model


def load_lm(config: RecurrentGPTConfig, out: Path, verbose: bool) -> dict[str, Any]:
    """``model`` (sized to sample ``context + chars`` characters), ``params``, ``tokenizer``,
    ``valid`` (validation text), ``seq_len``, ``run`` of the ``pretrained`` run, or of one
    pretrained (or reused) by :func:`experiments.finetune.pretrain`."""
    from experiments import finetune
    from experiments.configs import replace
    from experiments.lm_sample import load_run, with_context
    from experiments.runner import build_model
    from experiments.tasks import lm_corpus

    if config.pretrained:
        lm_config, tokenizer, _, params = load_run(config.pretrained)  # attention windowed to the run's seq_len
        if lm_config.model != config.model:
            raise ValueError(f"model: the pretrained run {config.pretrained} is a {lm_config.model!r} model; pass "
                             f"--model {lm_config.model!r}")
        valid, run = lm_corpus(lm_config).valid, config.pretrained
    else:
        lm_config = replace(finetune.SIZES["cpu"], model=config.model, d_model=config.d_model,
                            n_layers=config.n_layers, seq_len=config.seq_len, batch_size=config.batch_size,
                            pretrain_steps=config.pretrain_steps, pretrain_lr=config.pretrain_lr,
                            pretrain_fraction=config.pretrain_fraction, data_dir=config.data_dir,
                            data_file=config.data_file, seed=config.seed,
                            mixer_fields={"attention": {"window": config.seq_len}})
        _, params, task, info = finetune.pretrain(lm_config, out, EXPERIMENT, verbose)
        tokenizer, valid, run = task.tokenizer, task.val_tokens, info["run"]
    context = config.context or lm_config.seq_len
    model = build_model(with_context(lm_config, context + config.chars), tokenizer.vocab_size)
    return dict(model=model, params=params, tokenizer=tokenizer, valid=tokenizer.decode(valid),
                seq_len=lm_config.seq_len, context=context, run=str(run))


def prompt_ids(tokenizer, prompt: str, context: int) -> np.ndarray:
    """``[context]`` int32: the ids of the last ``context`` characters of ``prompt``, left-padded
    with newlines."""
    ids = tokenizer.encode(prompt)[-context:]
    return np.concatenate([np.full(context - len(ids), int(tokenizer.encode("\n")[0]), np.int32), ids])


def lm_generator(model, params, tokenizer, *, context: int, chars: int, key: jax.Array, temperature: float,
                 top_k: int) -> Generate:
    """``prompt -> chars`` sampled characters: :func:`prompt_ids`, then
    :func:`ssmjax.models.generate` with the key ``fold_in(key, crc32(prompt))`` (the same
    prompt gives the same text)."""
    top_k = None if top_k == 0 or top_k >= tokenizer.vocab_size else top_k
    sample = jax.jit(lambda p, ids, k: lm_generate(model, p, ids, chars, k, temperature, top_k)[0])

    def generate(prompt: str) -> str:
        prompt_key = jax.random.fold_in(key, zlib.crc32(prompt.encode("utf-8")))
        ids = jnp.asarray(prompt_ids(tokenizer, prompt, context))[None]
        return tokenizer.decode(np.asarray(sample(params, ids, prompt_key))[0])

    return generate


def scripted(paragraphs: Sequence[str]) -> Generate:
    """A generator that returns ``paragraphs[i]`` at its ``i``-th call, whatever the prompt
    (teacher forcing: the loop runs over the real text)."""
    following = iter(paragraphs)
    return lambda prompt: next(following)


def bits_per_char(model, params, tokenizer, text: str, seq_len: int) -> float:
    """The LM's bits/char on ``text``: non-overlapping windows of ``seq_len`` characters, each
    scored from its start (as the ``lm`` validation)."""
    from ssmjax.data.text import sequential_windows
    from ssmjax.train import Evaluator

    batches = sequential_windows(tokenizer.encode(text), seq_len=seq_len, batch_size=16)
    return Evaluator(model).at(params).loss(batches)["loss"] / math.log(2.0)


def continuation_nats(model, params, tokenizer, records: Sequence[StepRecord], context: int, chars: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Teacher-forced: ``nats [n, chars]``, the LM's ``-log p`` of each character of each
    step's paragraph (its first ``chars``) right after that step's prompt
    (:func:`prompt_ids`); ``real [n, chars]``: the paragraph's characters (the rest is
    padding); ``names [n, chars]``: the characters of its speaker-name lines."""
    from ssmjax.train import Evaluator

    newline = int(tokenizer.encode("\n")[0])
    tokens = np.zeros((len(records), context + chars), np.int32)
    real, names = np.zeros((len(records), chars), bool), np.zeros((len(records), chars), bool)
    for i, r in enumerate(records):
        target = r.paragraph[:chars]
        tokens[i] = np.concatenate([prompt_ids(tokenizer, r.prompt, context), tokenizer.encode(target),
                                    np.full(chars - len(target), newline, np.int32)])
        real[i, :len(target)] = True
        for match in SPEAKER.finditer(target):
            names[i, match.start():match.end()] = True
    evaluator, nats = Evaluator(model).at(params), []
    for i in range(0, len(records), 16):
        logits = evaluator.logits(tokens[i:i + 16, :-1])[:, context - 1:].astype(np.float64)  # predicts the paragraph
        top = logits.max(-1, keepdims=True)
        log_z = top[..., 0] + np.log(np.exp(logits - top).sum(-1))
        nats.append(log_z - np.take_along_axis(logits, tokens[i:i + 16, context:, None], -1)[..., 0])
    return np.concatenate(nats), real, names


def masked_bits(nats: np.ndarray, mask: np.ndarray) -> float:
    """Bits/char pooled over the ``mask``ed characters (NaN when there is none)."""
    return float((nats * mask).sum() / mask.sum() / math.log(2.0)) if mask.any() else math.nan


def paired_difference(bits: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """``(mean, standard error)`` over steps of ``bits - reference`` (per-step bits/char)."""
    d = np.asarray(bits) - np.asarray(reference)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan


# ----------------------------------------------------------------------------- openings and statistics


def stories(valid: str, count: int, paragraphs: int, chars: int) -> list[list[str]]:
    """``count`` stories of ``paragraphs`` real paragraphs from ``valid``: story ``i`` starts at
    the first speech start (after a blank line) at or after ``i * len(valid) / count``; its
    speeches (blank-line separated) are packed greedily, in order, into paragraphs of at most
    ``chars`` characters joined by blank lines (a longer speech alone is cut to ``chars``)."""
    out = []
    for i in range(count):
        offset = i * len(valid) // count
        start = valid.find("\n\n", offset)
        speeches = [b for b in valid[start + 2:].split("\n\n") if b.strip()] if start >= 0 else []
        packed: list[str] = []
        for speech in speeches:
            if packed and len(packed[-1]) + 2 + len(speech) <= chars:
                packed[-1] += "\n\n" + speech
            elif len(packed) < paragraphs:
                packed.append(speech[:chars])
            else:
                break
        if len(packed) < paragraphs:
            raise ValueError(f"stories: the validation text after character {offset} holds {len(packed)} paragraphs "
                             f"of <= {chars} characters, story {i} of {count} needs {paragraphs} (fewer stories or "
                             f"steps)")
        out.append(packed)
    return out


def speakers(text: str) -> set[str]:
    """The speaker names of ``text``: lines ``NAME:`` of at most four capitalised words."""
    return set(SPEAKER.findall(text))


def words(text: str) -> set[str]:
    """Lower-cased words of at least four letters."""
    return set(WORD.findall(text.lower()))


def mechanism_stats(opening: str, records: Sequence[StepRecord], long_memory: Sequence[str],
                    memory_chars: int) -> dict[str, Any]:
    """Per-step sums of one story. For step ``t`` (paragraph ``y``, previous paragraph ``x``,
    retrieved memories ``R`` as shown, their first ``memory_chars`` characters):
    ``name_hits``: steps with a speaker of ``y`` in ``R`` but not in ``x``; ``word_reuse``:
    the fraction of the words of ``y`` in ``R`` but not in ``x``; ``long_range``: steps with a
    speaker of ``y`` from a paragraph older than ``x`` but not in ``x``. ``long_memory``: the
    texts of the final long-term memory (item ``i`` = paragraph ``i``)."""
    previous, older = opening, set()
    out = dict(steps=0, chars=0, parsed=0, retrieval_steps=0, top1_cosine=0.0, cosine=0.0, retrieved=0, age=0,
               name_hits=0, word_reuse=0.0, long_range=0, memory_items=len(long_memory),
               memory_chars=sum(map(len, long_memory)))
    for r in records:
        shown = "\n".join(head(long_memory[i], memory_chars) for i in r.retrieved)
        new_names, prev_names = speakers(r.paragraph), speakers(previous)
        out["steps"] += 1
        out["chars"] += len(r.output)
        out["parsed"] += bool(r.parsed)
        out["long_range"] += bool((new_names & older) - prev_names)
        if r.retrieved:
            out["retrieval_steps"] += 1
            out["top1_cosine"] += r.scores[0]
            out["cosine"] += sum(r.scores)
            out["retrieved"] += len(r.retrieved)
            out["age"] += sum(r.step - 1 - i for i in r.retrieved)  # paragraph i was written at step i
            out["name_hits"] += bool((new_names & speakers(shown)) - prev_names)
            new_words = words(r.paragraph)
            out["word_reuse"] += len((new_words & words(shown)) - words(previous)) / max(1, len(new_words))
        older |= prev_names
        previous = r.paragraph
    return out


def summarize(stats: Sequence[dict[str, float]]) -> dict[str, Any]:
    """The table row of one generator from the :func:`mechanism_stats` of its stories."""
    totals = {key: sum(s[key] for s in stats) for key in stats[0]}
    n, k, hits = totals["steps"], totals["retrieved"], max(1, totals["retrieval_steps"])
    return dict(steps=n, chars=totals["chars"], format_rate=totals["parsed"] / n, memory_items=totals["memory_items"],
                memory_chars=totals["memory_chars"], retrieval_steps=totals["retrieval_steps"],
                top1_cosine=totals["top1_cosine"] / hits, mean_cosine=totals["cosine"] / max(1, k),
                mean_age=totals["age"] / max(1, k), name_hit_rate=totals["name_hits"] / hits,
                word_reuse=totals["word_reuse"] / hits, long_range_rate=totals["long_range"] / n)


def story_text(opening: str, records: Sequence[StepRecord]) -> str:
    return "\n\n".join([opening, *(r.paragraph for r in records)]) + "\n"


def memory_json(state, records: Sequence[StepRecord]) -> dict[str, Any]:
    """The long-term memory (append-only: at step ``t`` it is the first ``memory_size`` items)
    and each step's retrieval, short-term memory, plan and prompt."""
    items = [dict(index=i, step=m.step, text=m.text) for i, m in enumerate(state.long_memory)]
    steps = [dict(step=r.step, memory_size=r.memory_size, short_memory=r.short_memory, plan=r.plan,
                  parsed=list(r.parsed), retrieved=[dict(index=i, step=state.long_memory[i].step, cosine=s)
                                                    for i, s in zip(r.retrieved, r.scores)],
                  prompt=r.prompt, chars=len(r.output)) for r in records]
    return dict(long_memory=items, steps=steps)


# ----------------------------------------------------------------------------- the run


def run(config: RecurrentGPTConfig, run_dir: Path, verbose: bool = True) -> Path:
    """Both generators on every story, sampled and teacher-forced; writes the texts, memories
    and ``result.json``."""
    check_config(config)
    start = time.perf_counter()
    lm = load_lm(config, run_dir.parent.parent, verbose)
    model, params, tokenizer, context = lm["model"], lm["params"], lm["tokenizer"], lm["context"]
    try:
        tokenizer.encode(config.plan)
    except ValueError as error:
        raise ValueError(f"plan: {error}") from None
    generate = lm_generator(model, params, tokenizer, context=context, chars=config.chars,
                            key=jax.random.key(config.seed), temperature=config.temperature,
                            top_k=config.sample_top_k)
    texts = stories(lm["valid"], config.stories, config.steps + 1, config.chars)
    rows, real, per_step = {}, {}, {}
    for name, loop in loop_configs(config).items():
        stats, forced, generated = [], [], ""
        for i, text in enumerate(texts):
            state, records = run_loop(initial_state(text[0], config.plan, config=loop), generate, config.steps, loop)
            (run_dir / f"{name}-{i}.txt").write_text(story_text(text[0], records))
            if name == "recurrent_gpt":
                regression.write_json(run_dir / f"memory-{i}.json", memory_json(state, records))
            stats.append(mechanism_stats(text[0], records, [m.text for m in state.long_memory], config.memory_chars))
            generated += "\n\n".join(r.output for r in records) + "\n\n"
            state, records = run_loop(initial_state(text[0], config.plan, config=loop), scripted(text[1:]),
                                      config.steps, loop)
            forced += records
            real.setdefault(name, []).append(mechanism_stats(text[0], records, [m.text for m in state.long_memory],
                                                             config.memory_chars))
        nats, every, names = continuation_nats(model, params, tokenizer, forced, context, config.chars)
        per_step[name] = (nats * every).sum(1) / every.sum(1) / math.log(2.0)
        rows[name] = dict(summarize(stats), bits_per_char=bits_per_char(model, params, tokenizer, generated,
                                                                          lm["seq_len"]),
                          true_bits_per_char=masked_bits(nats, every), true_name_bits_per_char=masked_bits(nats, names),
                          true_name_chars=int(names.sum()))
    for name, row in rows.items():
        row["true_bits_delta"], row["true_bits_delta_se"] = paired_difference(per_step[name], per_step["rolling"])
        if verbose:
            print(f"[{run_dir.name}] {name}: {row['chars']:,} chars, memory-only names {row['name_hit_rate']:.2f}, "
                  f"words {row['word_reuse']:.3f}, long-range names {row['long_range_rate']:.2f}, own text "
                  f"{row['bits_per_char']:.3f} bits/char; real next text {row['true_bits_per_char']:.3f} bits/char "
                  f"({row['true_bits_delta']:+.3f} +- {row['true_bits_delta_se']:.3f} vs rolling; names "
                  f"{row['true_name_bits_per_char']:.3f})", flush=True)
    reference = lm["valid"][:rows["rolling"]["chars"]]  # as much validation text as each generator wrote
    regression.write_json(run_dir / "result.json", dict(
        experiment=EXPERIMENT, model=config.model, status="done", generators=rows,
        real_text_retrieval={name: summarize(real[name]) for name in ("recurrent_gpt", "recent")},
        lm=dict(run=lm["run"], seq_len=lm["seq_len"], context=context,
                valid_bits_per_char=bits_per_char(model, params, tokenizer, reference, lm["seq_len"])),
        wall_s=time.perf_counter() - start, reduced_size=True))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    return regression.main(EXPERIMENT, DESCRIPTION, SIZES, run, argv)


def report_section(run_dirs: list[Path], figures_dir: Path) -> str:
    """Per run, one row per generator: steps, characters, memory, retrieval, reuse, bits/char."""
    runs = regression.read_runs(run_dirs, EXPERIMENT)
    if not runs:
        return ""
    lines = ["## RecurrentGPT: language long-short-term memory around a char LM (Zhou et al. 2023)", "",
             f"**Paper finding.** {PAPER_FINDING}", "",
             "A char LM cannot follow the paper's instructions (format rate 0: every step takes the parser's "
             "fallback), so this checks the mechanism. Sampled stories: names / words of each new paragraph found in "
             "the retrieved memories but not in the previous paragraph (`rolling` retrieves the same way but never "
             "shows it; `recent` shows the newest memories instead of the most similar), the LM's bits/char on its "
             "own text. Teacher-forced on the real next paragraph: the LM's bits/char given each generator's prompt "
             "(all characters, with the paired per-step difference to `rolling` +- its standard error; speaker-name "
             "lines). CPU size; see "
             "`experiments/notes/recurrent_gpt.md`.", ""]
    header = ("| generator | steps | chars | format rate | memory items (chars) | top-1 cos | retrieved age | "
              "memory-only name hits | memory-only word reuse | long-range names | own text bits/char | "
              "real next text bits/char (vs rolling) | real speaker names bits/char |")
    for d, config, result in runs:
        c = config.get("config", {})
        if not result:
            lines += [f"`{d.name}`: incomplete", ""]
            continue
        lm, real = result["lm"], result["real_text_retrieval"]
        lines += [f"`{d.name}` (`{config.get('model')}` LM, context {lm['context']}, {c.get('stories')} stories x "
                  f"{c.get('steps')} steps x {c.get('chars')} chars, top-{c.get('top_k')}; LM validation "
                  f"{lm['valid_bits_per_char']:.3f} bits/char):", "", header, "|---|" + "---:|" * 12]
        for name, r in result["generators"].items():
            lines.append(f"| {name} | {r['steps']} | {r['chars']:,} | {r['format_rate']:.2f} | {r['memory_items']} "
                         f"({r['memory_chars']:,}) | {r['top1_cosine']:.3f} | {r['mean_age']:.1f} | "
                         f"{r['name_hit_rate']:.2f} | {r['word_reuse']:.3f} | {r['long_range_rate']:.2f} | "
                         f"{r['bits_per_char']:.3f} | {r['true_bits_per_char']:.3f} ({r['true_bits_delta']:+.3f} "
                         f"+- {r['true_bits_delta_se']:.3f}) | {r['true_name_bits_per_char']:.3f} |")
        found = "; ".join(f"`{name}` {r['name_hit_rate']:.2f} / {r['word_reuse']:.3f} / {r['top1_cosine']:.3f}"
                          for name, r in real.items())
        lines += ["", "Retrieval over the real text (share of steps whose next paragraph has a speaker in the shown "
                      "memories but not in the previous paragraph / memory-only word reuse / top-1 cosine, over "
                      f"{next(iter(real.values()))['retrieval_steps']} steps with memories): {found}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
