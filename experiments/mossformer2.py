"""Two-source separation with MossFormer2 against MossFormer without its recurrent (FSMN)
module, scored by SI-SNR improvement on a fixed test set.

    python -m experiments mossformer2 [--model fsmn] [--set key=value ...]

The claim under test (Zhao, Ma, Ni, Zhang, Wang, Nguyen, Zhou, Yip, Ng & Ma, 2024,
"MossFormer2: Combining Transformer and RNN-Free Recurrent Network for Enhanced Time-Domain
Monaural Speech Separation", ICASSP 2024, arXiv:2312.11825): MossFormer's attention models
long-range, coarse-scale dependencies but misses finer-scale recurrent patterns; adding an
FSMN-based "RNN-free" recurrent module (gated convolutional units around a dilated FSMN
with dense connections) after each MossFormer block improves separation. Model:
:class:`ssmjax.models.speech.MossFormer2Separator` (encoder conv, MossFormer blocks each
followed by the recurrent module, masks for the sources, transposed-conv decoder); the
recurrent module is the registered ``fsmn`` layer (:mod:`ssmjax.layers.fsmn`).

Protocol (CPU size): generated two-source mixtures (:func:`ssmjax.data.speech.separation_set`:
two speech-like harmonic sources at a relative level uniform in ``+-level_db``),
``clip_seconds`` at ``sample_rate`` Hz, disjoint seeded ``train_clips`` / ``val_clips`` /
``test_clips``. Each variant (``mossformer2``: with the recurrent module ``--model``, by
default ``fsmn``; ``mossformer``: without; otherwise identical, same seed) trains ``steps``
updates of ``batch_size`` clips by utterance-level PIT on SI-SNR with Adam, a per-epoch
cosine learning rate and global-norm clipping (:func:`ssmjax.train.fit.fit`), keeping the
epoch with the best validation SI-SNRi. Score: test SI-SNRi (dB, PIT) over the mixture.

With ``data_dir`` set, WSJ0-2mix is read instead (:func:`ssmjax.data.speech.load_wsj0_2mix`,
``data_dir`` = e.g. ``wsj0-2mix/wav8k/min``): ``tr`` / ``cv`` / ``tt`` cut into
``clip_seconds`` clips.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import ssmjax.layers
from experiments import regression
from ssmjax.checks import check_choice
from ssmjax.data import speech
from ssmjax.models.speech import MossFormer2Separator, compare_variants, paired_difference, pit_loss
from ssmjax.train.fit import FitConfig

EXPERIMENT = "mossformer2"
DEFAULT_MODEL = "fsmn"
DESCRIPTION = ("two-source separation of generated speech-like mixtures: MossFormer2 (MossFormer blocks + FSMN "
               "recurrent module) vs MossFormer without it, test SI-SNRi (Zhao et al. 2024)")
PAPER_FINDING = (
    "Zhao et al. (ICASSP 2024): adding the FSMN-based recurrent module after each MossFormer block improves "
    "time-domain separation over MossFormer: WSJ0-2mix SI-SDRi 24.1 dB for MossFormer2 against 22.8 dB for "
    "MossFormer, and the best results on WSJ0-3mix, Libri2Mix and WHAM!/WHAMR! at the time.")
VARIANTS = ("mossformer2", "mossformer")


@dataclasses.dataclass(frozen=True)
class MossFormer2Config:
    """One run: every variant trained and scored on the same data (module docstring)."""

    model: str = DEFAULT_MODEL
    variants: tuple = VARIANTS
    sample_rate: int = 8000
    clip_seconds: float = 0.5
    train_clips: int = 600
    val_clips: int = 64
    test_clips: int = 256
    level_db: float = 5.0
    enc_channels: int = 64
    enc_kernel: int = 16
    d_model: int = 64
    n_blocks: int = 2
    qk_dim: int = 32
    group_size: int = 64
    conv_size: int = 17
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    grad_clip: float = 5.0
    seed: int = 0
    data_seed: int = 0
    data_dir: str = ""


SIZES = {
    # 300 updates of 8 half-second mixtures per variant (4 epochs of 600): ~3-5 min per variant on 2 busy cores.
    "cpu": MossFormer2Config(),
    # approx. the paper's model (encoder 512 filters of 16 samples, 24 MossFormer2 blocks of width 512, attention
    # groups of 256, query/key 128) on 4 s WSJ0-2mix segments (pass data_dir) or generated ones.
    "paper": MossFormer2Config(clip_seconds=4.0, train_clips=20_000, val_clips=500, test_clips=3000,
                               enc_channels=512, d_model=512, n_blocks=24, qk_dim=128, group_size=256,
                               steps=200_000, batch_size=1, lr=1.5e-4),
}


def check_config(config: MossFormer2Config) -> None:
    check_choice("model", config.model, ssmjax.layers.names())
    if not config.variants:
        raise ValueError("variants: expected a non-empty tuple")
    for variant in config.variants:
        check_choice("variants", variant, VARIANTS)
    if clip_samples(config) < config.enc_kernel:
        raise ValueError(f"clip_seconds: expected at least enc_kernel = {config.enc_kernel} samples, "
                         f"got {config.clip_seconds}")
    if config.d_model % 2 or config.qk_dim % 2:
        raise ValueError(f"d_model, qk_dim: expected even sizes, got {config.d_model}, {config.qk_dim}")


def clip_samples(config: MossFormer2Config) -> int:
    return int(round(config.clip_seconds * config.sample_rate))


def make_data(config: MossFormer2Config) -> dict[str, speech.SpeechPairs]:
    """``train`` / ``val`` / ``test`` mixtures with their two sources (module docstring)."""
    samples = clip_samples(config)
    if config.data_dir:
        return {split: speech.cut_clips(speech.load_wsj0_2mix(config.data_dir, folder), samples, config.sample_rate)
                for split, folder in zip(speech.SPLITS, speech.WSJ0_2MIX_SPLITS)}
    sizes = dict(train=config.train_clips, val=config.val_clips, test=config.test_clips)
    return {split: speech.separation_set(n, samples, sample_rate=config.sample_rate, seed=config.data_seed,
                                         split=split, level_db=config.level_db) for split, n in sizes.items()}


def build_model(config: MossFormer2Config, variant: str) -> MossFormer2Separator:
    return MossFormer2Separator(n_sources=2, enc_channels=config.enc_channels, enc_kernel=config.enc_kernel,
                                d_model=config.d_model, n_blocks=config.n_blocks,
                                recurrent=config.model if variant == "mossformer2" else None, qk_dim=config.qk_dim,
                                group_size=config.group_size, conv_size=config.conv_size)


def run(config: MossFormer2Config, run_dir: Path, verbose: bool = True) -> Path:
    """Every variant on the same data; writes ``result.json`` (``models``: one row per
    variant after ``mixture``) and returns ``run_dir``."""
    check_config(config)
    start = time.perf_counter()
    data = make_data(config)
    epochs, used = regression.epoch_plan(config.steps, len(data["train"].mixture), config.batch_size)
    data["train"] = speech.SpeechPairs(*(a[:used] for a in data["train"]))
    fit = FitConfig(epochs=epochs, batch_size=config.batch_size, lr=config.lr, lr_schedule="cosine", patience=0,
                    seed=config.seed, grad_clip=config.grad_clip)
    rows = compare_variants({v: (build_model(config, v), pit_loss) for v in config.variants}, data, fit,
                            baseline="mixture", verbose=verbose)
    regression.write_json(run_dir / "result.json", dict(
        experiment=EXPERIMENT, model=config.model, status="done", models=rows,
        clips={k: len(v.mixture) for k, v in data.items()}, wall_s=time.perf_counter() - start, reduced_size=True))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    return regression.main(EXPERIMENT, DESCRIPTION, SIZES, run, argv, default_model=DEFAULT_MODEL)


def report_section(run_dirs: list[Path], figures_dir: Path) -> str:
    """Per run, one row per variant: test SI-SNRi / SI-SNR (PIT), parameters."""
    runs = regression.read_runs(run_dirs, EXPERIMENT)
    if not runs:
        return ""
    lines = ["## MossFormer2: an FSMN recurrent module in MossFormer for separation (Zhao et al. 2024)", "",
             f"**Paper finding.** {PAPER_FINDING}", "",
             "Generated two-source speech-like mixtures (8 kHz, CPU size; the paper's numbers are WSJ0-2mix SI-SDRi at "
             "full size: 24.1 dB MossFormer2, 22.8 dB MossFormer). Test SI-SNRi (dB, PIT) over the mixture. See "
             "`experiments/notes/mossformer2.md`.", "",
             "| run | variant | SI-SNRi (dB) | SI-SNR (dB) | params | updates | train s |",
             "|---|---|---|---|---|---|---|"]
    notes = []
    for d, config, result in runs:
        if result is None:
            lines.append(f"| `{d.name}` | incomplete | | | | | |")
            continue
        trained = [m for m in result["models"] if "si_snri_per_clip" in m]
        for m in result["models"]:
            lines.append(f"| `{d.name}` | {m['variant']} | {m['si_snri']:.2f} | {m['si_snr']:.2f} | {m['params']:,} | "
                         f"{m.get('updates', 0)} | {m.get('train_s', 0):.0f} |")
        if len(trained) >= 2:
            mean, sem = paired_difference(trained[0]["si_snri_per_clip"], trained[1]["si_snri_per_clip"])
            clips = len(trained[0]["si_snri_per_clip"])
            notes.append(f"`{d.name}`: {trained[0]['variant']} - {trained[1]['variant']} = {mean:+.2f} +- {sem:.2f} dB "
                         f"SI-SNRi (mean +- standard error over {clips} paired test clips)")
    return "\n".join(lines + [""] + [f"{n}." for n in notes] + [""])


if __name__ == "__main__":
    raise SystemExit(main())
