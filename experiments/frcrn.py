"""Speech enhancement with FRCRN against the CRN without frequency recurrence and against
no processing, scored by SI-SNR improvement on a fixed test set.

    python -m experiments frcrn [--model deep_fsmn] [--set key=value ...]

The claim under test (Zhao, Ma, Watcharasupat & Gan, 2022, "FRCRN: Boosting Feature
Representation using Frequency Recurrence for Monaural Speech Enhancement", ICASSP 2022,
arXiv:2206.07293): running an FSMN along the frequency axis after every convolution of a
complex convolutional recurrent encoder-decoder (frequency recurrence) catches long-range
correlations across frequency that the convolutions' small receptive fields miss, and
improves enhancement over the same network without it. Model and loss:
:class:`ssmjax.models.speech.FRCRN`, :func:`ssmjax.models.speech.frcrn_loss`.

Protocol (CPU size): generated speech-like clips (:func:`ssmjax.data.speech.enhancement_set`:
harmonic sources with moving formants in coloured, modulated noise at an input SNR uniform
in ``snr_db``), ``clip_seconds`` at ``sample_rate`` Hz; ``train_clips`` / ``val_clips`` /
``test_clips`` disjoint seeded sets (``data_seed``). Each variant (``frcrn``: frequency
recurrence on; ``crn``: off; otherwise identical, same seed) trains ``steps`` updates of
``batch_size`` clips with Adam, a per-epoch cosine learning rate and global-norm clipping
(:func:`ssmjax.train.fit.fit`); the epoch with the best validation SI-SNRi is kept. Scores
on the test clips: SI-SNR and SI-SNRi (dB; ``noisy``, no processing, has SI-SNRi 0 by
definition), and PESQ / STOI when the ``pesq`` / ``pystoi`` packages are importable
(:func:`perceptual_metrics`; reported ``None`` otherwise). ``--model`` names the two layers
along time between encoder and decoder: ``deep_fsmn`` (the paper's two stacked FSMN layers)
or any registered mixer (e.g. ``lstm``, the classic CRN's recurrent layer).

With ``data_dir`` set, VoiceBank-DEMAND is read instead (:func:`ssmjax.data.speech.
load_voicebank_demand`, at ``sample_rate``): its training pairs cut into ``clip_seconds``
clips (the last tenth, by file name, held out for validation) and its test pairs likewise.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

import ssmjax.layers
from experiments import regression
from ssmjax.checks import check_choice
from ssmjax.data import speech
from ssmjax.models.speech import FRCRN, compare_variants, frcrn_loss, paired_difference
from ssmjax.train.fit import FitConfig

EXPERIMENT = "frcrn"
DEFAULT_MODEL = "deep_fsmn"
DESCRIPTION = ("speech enhancement on generated speech-like clips: FRCRN (frequency-recurrent complex CRN) vs the "
               "CRN without frequency recurrence vs no processing, test SI-SNRi (Zhao et al. 2022)")
PAPER_FINDING = (
    "Zhao et al. (ICASSP 2022): frequency recurrence (an FSMN along the frequency axis after every convolution of a "
    "complex convolutional recurrent encoder-decoder predicting a cIRM) boosts the feature representation over the "
    "plain CRN; FRCRN reports PESQ 3.21 on VoiceBank-DEMAND and 2nd place (MOS, WAcc) in the ICASSP 2022 DNS "
    "challenge real-time full-band track.")
#: variant -> frequency recurrence on/off
VARIANTS = {"frcrn": True, "crn": False}


@dataclasses.dataclass(frozen=True)
class FRCRNConfig:
    """One run: every variant trained and scored on the same data (module docstring)."""

    model: str = DEFAULT_MODEL
    variants: tuple = ("frcrn", "crn")
    sample_rate: int = 8000
    clip_seconds: float = 0.5
    train_clips: int = 800
    val_clips: int = 64
    test_clips: int = 256
    snr_db: tuple = (-5.0, 10.0)
    n_fft: int = 128
    hop: int = 64
    channels: int = 16
    n_layers: int = 3
    frequency_memory: int = 8
    temporal_memory: int = 10
    fsmn_hidden: int = 64
    mask_weight: float = 1.0
    steps: int = 400
    batch_size: int = 8
    lr: float = 2e-3
    grad_clip: float = 5.0
    seed: int = 0
    data_seed: int = 0
    data_dir: str = ""


SIZES = {
    # 400 updates of 8 half-second clips per variant (4 epochs of 800 clips): ~4 min per variant on 2 busy cores.
    "cpu": FRCRNConfig(),
    # approx.: the released 16 kHz model (40 ms frames, 20 ms hop, 7 encoder levels of 128 channels, FSMN memory
    # 20); 4 s clips of VoiceBank-DEMAND (pass data_dir) or generated ones.
    "paper": FRCRNConfig(sample_rate=16000, clip_seconds=4.0, train_clips=11_572, val_clips=256, test_clips=824,
                         n_fft=640, hop=320, channels=128, n_layers=7, frequency_memory=20, temporal_memory=20,
                         fsmn_hidden=128, steps=100_000, batch_size=16, lr=1e-3),
}


def check_config(config: FRCRNConfig) -> None:
    if config.model != DEFAULT_MODEL and config.model not in ssmjax.layers.names():
        raise ValueError(f"model: expected {DEFAULT_MODEL!r} or a registered mixer {ssmjax.layers.names()}, "
                         f"got {config.model!r}")
    if not config.variants:
        raise ValueError("variants: expected a non-empty tuple")
    for variant in config.variants:
        check_choice("variants", variant, tuple(VARIANTS))
    if clip_samples(config) < config.n_fft:
        raise ValueError(f"clip_seconds: expected at least one frame ({config.n_fft} samples), "
                         f"got {config.clip_seconds}")


def clip_samples(config: FRCRNConfig) -> int:
    return int(round(config.clip_seconds * config.sample_rate))


def make_data(config: FRCRNConfig) -> dict[str, speech.SpeechPairs]:
    """``train`` / ``val`` / ``test`` noisy-clean pairs (module docstring)."""
    samples = clip_samples(config)
    if config.data_dir:
        train = speech.cut_clips(speech.load_voicebank_demand(config.data_dir, "train"), samples, config.sample_rate)
        held = max(1, len(train.mixture) // 10)
        test = speech.cut_clips(speech.load_voicebank_demand(config.data_dir, "test"), samples, config.sample_rate)
        return dict(train=speech.SpeechPairs(*(a[:-held] for a in train)),
                    val=speech.SpeechPairs(*(a[-held:] for a in train)), test=test)
    sizes = dict(train=config.train_clips, val=config.val_clips, test=config.test_clips)
    return {split: speech.enhancement_set(n, samples, sample_rate=config.sample_rate, seed=config.data_seed,
                                          split=split, snr_db=tuple(config.snr_db)) for split, n in sizes.items()}


def build_model(config: FRCRNConfig, variant: str) -> FRCRN:
    return FRCRN(n_fft=config.n_fft, hop=config.hop, channels=config.channels, n_layers=config.n_layers,
                 frequency_recurrence=VARIANTS[variant], frequency_memory=config.frequency_memory,
                 temporal=config.model, temporal_memory=config.temporal_memory, fsmn_hidden=config.fsmn_hidden)


def perceptual_metrics(estimates: np.ndarray, data: speech.SpeechPairs, sample_rate: int) -> dict[str, Any]:
    """Mean PESQ (ITU-T P.862 via ``pesq``: narrow-band at 8 kHz, wide-band otherwise) and
    STOI (via ``pystoi``) of ``estimates [n, 1, T]`` against the clean sources; ``None``
    for a package that is not importable (never installed by this code)."""
    out: dict[str, Any] = dict(pesq=None, stoi=None)
    clean, enhanced = data.sources[:, 0].astype(np.float64), estimates[:, 0].astype(np.float64)
    if importlib.util.find_spec("pesq") is not None:
        from pesq import pesq
        mode = "nb" if sample_rate == 8000 else "wb"
        out["pesq"] = float(np.mean([pesq(sample_rate, c, e, mode) for c, e in zip(clean, enhanced)]))
    if importlib.util.find_spec("pystoi") is not None:
        from pystoi import stoi
        out["stoi"] = float(np.mean([stoi(c, e, sample_rate) for c, e in zip(clean, enhanced)]))
    return out


def run(config: FRCRNConfig, run_dir: Path, verbose: bool = True) -> Path:
    """Every variant on the same data; writes ``result.json`` (``models``: one row per
    variant after ``noisy``) and returns ``run_dir``."""
    check_config(config)
    start = time.perf_counter()
    data = make_data(config)
    epochs, used = regression.epoch_plan(config.steps, len(data["train"].mixture), config.batch_size)
    data["train"] = speech.SpeechPairs(*(a[:used] for a in data["train"]))
    fit = FitConfig(epochs=epochs, batch_size=config.batch_size, lr=config.lr, lr_schedule="cosine", patience=0,
                    seed=config.seed, grad_clip=config.grad_clip)
    loss = partial(frcrn_loss, mask_weight=config.mask_weight)
    rows = compare_variants({v: (build_model(config, v), loss) for v in config.variants}, data, fit, baseline="noisy",
                            extra_metrics=partial(perceptual_metrics, sample_rate=config.sample_rate), verbose=verbose)
    regression.write_json(run_dir / "result.json", dict(
        experiment=EXPERIMENT, model=config.model, status="done", models=rows,
        clips={k: len(v.mixture) for k, v in data.items()}, wall_s=time.perf_counter() - start, reduced_size=True))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    return regression.main(EXPERIMENT, DESCRIPTION, SIZES, run, argv, default_model=DEFAULT_MODEL)


def _fmt(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def report_section(run_dirs: list[Path], figures_dir: Path) -> str:
    """Per run, one row per variant: test SI-SNRi / SI-SNR, PESQ, STOI, parameters."""
    runs = regression.read_runs(run_dirs, EXPERIMENT)
    if not runs:
        return ""
    lines = ["## FRCRN: frequency recurrence for speech enhancement (Zhao et al. 2022)", "",
             f"**Paper finding.** {PAPER_FINDING}", "",
             "Generated speech-like clips in coloured noise (8 kHz, CPU size; no paper number exists for this data). "
             "Test SI-SNRi (dB) over the noisy input; PESQ/STOI only where `pesq`/`pystoi` are installed. See "
             "`experiments/notes/frcrn.md`.", "",
             "| run | variant | SI-SNRi (dB) | SI-SNR (dB) | PESQ | STOI | params | updates | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for d, config, result in runs:
        if result is None:
            lines.append(f"| `{d.name}` | incomplete | | | | | | | |")
            continue
        trained = [m for m in result["models"] if "si_snri_per_clip" in m]
        for m in result["models"]:
            lines.append(f"| `{d.name}` | {m['variant']} | {m['si_snri']:.2f} | {m['si_snr']:.2f} | "
                         f"{_fmt(m.get('pesq'))} | {_fmt(m.get('stoi'), '.3f')} | {m['params']:,} | "
                         f"{m.get('updates', 0)} | {m.get('train_s', 0):.0f} |")
        if len(trained) >= 2:
            mean, sem = paired_difference(trained[0]["si_snri_per_clip"], trained[1]["si_snri_per_clip"])
            clips = len(trained[0]["si_snri_per_clip"])
            notes.append(f"`{d.name}`: {trained[0]['variant']} - {trained[1]['variant']} = {mean:+.2f} +- {sem:.2f} dB "
                         f"SI-SNRi (mean +- standard error over {clips} paired test clips)")
    return "\n".join(lines + [""] + [f"{n}." for n in notes] + [""])


if __name__ == "__main__":
    raise SystemExit(main())
