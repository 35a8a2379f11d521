"""`python -m experiments moving_mnist`: the OpenSTL metrics against hand-computed values,
the OneCycle schedule, tiny end-to-end runs of both models (result,
picture, report), exact resume, and argument errors. Fake 8x8 digits on 16x16 frames keep it
fast and independent of MNIST."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import moving_mnist as mm
from experiments import protocols

TINY = ["image_size=16", "patch_size=4", "d_model=8", "num_heads=2", "steps=2", "batch_size=2", "test_size=5",
        "eval_rows=5", "val_rows=2", "eval_every=1", "log_every=1", "plot_sequences=1", "eval_batch_size=2"]
CONVLSTM = ["hidden=(4,)", "kernel_size=3"]


@pytest.fixture
def fake_digits(monkeypatch):
    rng = np.random.default_rng(0)
    digits = (rng.random((12, 8, 8)) * 255).astype(np.uint8)
    monkeypatch.setattr(mm, "load_digits", lambda path=None: (digits[:8], digits[8:]))
    return digits


def _args(tmp_path, model, extra=(), *flags):
    args = ["--model", model, "--out", str(tmp_path), "--cache-dir", str(tmp_path / "data"), "--quiet", *flags]
    for item in TINY + (CONVLSTM if model == "convlstm" else []) + list(extra):
        args += ["--set", item]
    return args


# ----------------------------------------------------------------------------- metrics

def test_frame_errors_are_openstl_mse_and_mae_per_frame():
    true = np.zeros((1, 2, 4, 4, 1))
    true[0, 0, :2, :2, 0] = 0.5      # frame 0: four pixels off by 0.5 -> SSE 1.0, SAE 2.0
    true[0, 1, 3, 3, 0] = 0.25       # frame 1: one pixel off by 0.25 -> SSE 0.0625, SAE 0.25
    pred = np.zeros_like(true)
    sse, sae = mm.frame_errors(pred, true)
    np.testing.assert_allclose(np.asarray(sse), [[1.0, 0.0625]])
    np.testing.assert_allclose(np.asarray(sae), [[2.0, 0.25]])
    # OpenSTL: np.mean((pred - true)**2, axis=(0, 1)).sum() over [B, T, C, H, W]
    to_btchw = lambda a: np.moveaxis(a, -1, 2)  # noqa: E731
    assert mm.openstl_mse(to_btchw(pred), to_btchw(true)) == pytest.approx((1.0 + 0.0625) / 2)
    assert float(np.mean(sse)) == pytest.approx(mm.openstl_mse(to_btchw(pred), to_btchw(true)))


def _ssim_oracle(x, y, data_range, win=7):
    """Wang et al. (2004) window by window (sample statistics), the mean over valid windows."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i in range(x.shape[0] - win + 1):
        for j in range(x.shape[1] - win + 1):
            a, b = x[i:i + win, j:j + win].ravel(), y[i:i + win, j:j + win].ravel()
            ma, mb = a.mean(), b.mean()
            va, vb = a.var(ddof=1), b.var(ddof=1)
            cov = ((a - ma) * (b - mb)).sum() / (a.size - 1)
            values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_ssim_hand_values_and_window_oracle():
    a, b = np.full((1, 8, 8, 1), 0.5), np.full((1, 8, 8, 1), 0.25)
    c1 = (0.01 * 2.0) ** 2  # data_range 2 (OpenSTL's float images); zero variances leave the luminance term
    assert float(mm.ssim_per_frame(a, b)[0]) == pytest.approx((2 * 0.5 * 0.25 + c1) / (0.25 + 0.0625 + c1))
    rng = np.random.default_rng(1)
    x, y = rng.random((9, 10)), rng.random((9, 10))
    assert float(mm.ssim_per_frame(x[None, :, :, None], x[None, :, :, None])[0]) == pytest.approx(1.0)
    for data_range in (1.0, 2.0):
        got = float(mm.ssim_per_frame(x[None, :, :, None], y[None, :, :, None], data_range=data_range)[0])
        assert got == pytest.approx(_ssim_oracle(x, y, data_range), rel=1e-9)
    with pytest.raises(ValueError, match="win_size"):
        mm.ssim_per_frame(np.zeros((1, 5, 5, 1)), np.zeros((1, 5, 5, 1)))


def test_onecycle_is_pytorchs_schedule():
    lr, beta1 = mm.onecycle(100, 1e-3)
    # warm-up ends at step pct_start * total - 1 = 29; the last step is 99
    for step, want_lr, want_b1 in ((0, 1e-3 / 25, 0.95), (29, 1e-3, 0.85), (99, 1e-3 / 25 / 1e4, 0.95)):
        assert float(lr(step)) == pytest.approx(want_lr, rel=1e-5)
        assert float(beta1(step)) == pytest.approx(want_b1, rel=1e-6)
    # half way through the warm-up (pct 1/2): the mean of the two ends (cosine annealing)
    lr2, _ = mm.onecycle(30, 1e-3)  # end1 = 8
    assert float(lr2(4)) == pytest.approx((1e-3 / 25 + 1e-3) / 2, rel=1e-5)


def test_evaluate_matches_a_direct_computation(fake_digits):
    config = mm.make_config("convlstm", "cpu", TINY + CONVLSTM)
    fns = mm.Functions(config, mm.make_optimizer(config)[0])
    videos = mm.vision.moving_mnist_batch(fake_digits, 3, np.arange(5), size=16)
    params = fns.init(jax.random.key(1), mm.to_frames(videos[:1, :10]))
    ev = mm.evaluate(fns, params, videos, batch_size=2)  # 5 rows: the last batch is padded
    frames = np.asarray(mm.to_frames(videos), np.float64)
    pred = np.asarray(fns.predict(params, mm.to_frames(videos)), np.float64)
    true = frames[:, 10:]
    assert ev["sequences"] == 5
    assert ev["mse_per_frame"] == pytest.approx(((pred - true) ** 2).sum((2, 3, 4)).mean(), rel=1e-5)
    assert ev["mae_per_frame"] == pytest.approx(np.abs(pred - true).sum((2, 3, 4)).mean(), rel=1e-5)
    assert ev["copy_last_mse"] == pytest.approx(((frames[:, 9:10] - true) ** 2).sum((2, 3, 4)).mean(), rel=1e-6)
    ssim = np.mean([_ssim_oracle(np.clip(pred[b, t, ..., 0], 0, 1), true[b, t, ..., 0], 2.0)
                    for b in range(5) for t in range(10)])
    assert ev["ssim"] == pytest.approx(ssim, rel=1e-4)
    assert np.mean(ev["mse_per_frame_by_t"]) == pytest.approx(ev["mse_per_frame"])


# ----------------------------------------------------------------------------- end to end

def test_both_models_end_to_end_and_report(tmp_path, fake_digits):
    for model in ("predformer", "convlstm"):
        assert mm.main(_args(tmp_path, model)) == 0
    dirs = sorted((tmp_path / "moving_mnist").iterdir())
    assert [d.name for d in dirs] == ["convlstm-1x4-k3-cpu", "predformer-interleaved-TSST-cpu"]
    for d in dirs:
        result = json.loads((d / "result.json").read_text())
        assert result["status"] == "done" and result["steps_done"] == 2 and result["sequences"] == 5
        for key in ("mse_per_frame", "mae_per_frame", "ssim", "copy_last_mse", "params", "train_s"):
            assert np.isfinite(result[key])
        assert len(result["mse_per_frame_by_t"]) == 10 and result["reduced_size"]
        assert (d / "predictions.png").stat().st_size > 0 and (d / "config.json").exists()
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]
        assert [r["step"] for r in rows if r["split"] == "eval"] == [1, 2]
    config = json.loads((dirs[1] / "config.json").read_text())["config"]
    assert config["blocks"] == 4 and config["d_model"] == 8 and config["attention"] == "interleaved"
    section = mm.report_section(dirs + [tmp_path / "not-a-run"], tmp_path / "figures")
    table = [line for line in section.splitlines() if line.startswith("| predformer") or line.startswith("| convlstm")]
    assert len(table) == 2
    assert "29.80 / 90.64 / 0.9288" in section and "~11.60" in section and "15.05" in section
    assert "cpu (reduced)" in table[0] and "| done |" in table[0]
    figures = list((tmp_path / "figures").glob("moving_mnist-*.png"))
    assert len(figures) == 1 and f"figures/{figures[0].name}" in section


@pytest.mark.slow  # the protocol's own loop; the generic loop's resume is in tests/train
def test_resume_continues_exactly_and_refuses_changes(tmp_path, fake_digits, capsys):
    four = ["steps=4", "eval_every=0"]  # the cut-short run checkpoints where it stops
    assert mm.main(_args(tmp_path, "convlstm", four, "--max-minutes", "1e-9")) == 0
    run_dir = tmp_path / "moving_mnist" / "convlstm-1x4-k3-cpu"
    cut = json.loads((run_dir / "result.json").read_text())
    assert cut["status"].startswith("cut short at step 1 of 4") and cut["steps_done"] == 1
    assert np.isfinite(cut["mse_per_frame"])  # a cut-short run is still tested
    section = mm.report_section([run_dir], tmp_path / "figures")
    assert "cut short at step 1 of 4" in section
    with pytest.raises(SystemExit):  # no silent restart over the checkpoints
        mm.main(_args(tmp_path, "convlstm", four))
    with pytest.raises(SystemExit):
        mm.main(_args(tmp_path, "convlstm", four + ["lr=0.01"], "--resume"))
    assert "lr" in capsys.readouterr().err
    assert mm.main(_args(tmp_path, "convlstm", four, "--resume")) == 0
    resumed = json.loads((run_dir / "result.json").read_text())
    assert resumed["status"] == "done" and resumed["steps_done"] == 4
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
    assert mm.main(_args(tmp_path, "convlstm", four, "--name", "straight")) == 0
    straight = json.loads((tmp_path / "moving_mnist" / "convlstm-1x4-k3-cpu-straight" / "result.json").read_text())
    assert straight["mse_per_frame"] == pytest.approx(resumed["mse_per_frame"], rel=1e-6)
    assert straight["ssim"] == pytest.approx(resumed["ssim"], rel=1e-6)


# ----------------------------------------------------------------------------- CLI

def test_help_presets_and_bad_options(tmp_path, capsys):
    assert protocols.load("moving_mnist") is mm
    with pytest.raises(SystemExit) as exit_:
        mm.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--set keys" in out and "spatial_mixer" in out and "--test-file" in out
    paper = mm.make_config("predformer", "paper")
    assert (paper.d_model, paper.num_heads, paper.patch_size, mm.predformer_depth(paper)) == (256, 8, 8, 6)
    assert paper.total_steps == 2000 * 10000 // 16 and paper.optimizer == "adamw" and paper.weight_decay == 1e-2
    assert mm.predformer_depth(mm.make_config("predformer", "paper", ["attention=full"])) == 24
    assert mm.predformer_depth(mm.make_config("predformer", "paper", ["attention=factorised"])) == 12
    conv = mm.make_config("convlstm", "paper")
    assert conv.hidden == (128,) * 4 and conv.total_steps == 125000 and conv.loss_frames == "all"
    for config, count in ((paper, 25_297_728), (conv, 11_675_648)):  # the counts of ssmjax.models.video's docstrings
        frames = jax.ShapeDtypeStruct((1, 10, 64, 64, 1), jnp.float32)
        shapes = jax.eval_shape(mm.build_model(config).init, jax.random.key(0), frames)
        assert mm.count_params(shapes) == count
    for attention in ("factorised", "interleaved"):  # a registered mixer in the spatial blocks
        config = mm.make_config("predformer", "cpu", TINY + [f"attention={attention}", "spatial_mixer=plstm2d"])
        frames = jax.ShapeDtypeStruct((1, 10, 16, 16, 1), jnp.float32)
        out = jax.eval_shape(lambda k, f, m=mm.build_model(config): m.apply(m.init(k, f), f), jax.random.key(0), frames)
        assert out.shape == (1, 10, 16, 16, 1) and "plstm2d" in mm.run_name(config)
    cpu = [mm.make_config(m, "cpu") for m in mm.MODELS]
    assert cpu[0].total_steps == cpu[1].total_steps and cpu[0].batch_size == cpu[1].batch_size  # equal steps
    bad = [(["--model", "unet"], "model"), (["--model", "predformer", "--set", "attention=diagonal"], "attention"),
           (["--model", "predformer", "--set", "nope=1"], "nope"), (["--model", "predformer", "--set", "blocks=3"],
                                                                    "blocks"),
           (["--model", "predformer", "--set", "loss_frames=all"], "loss_frames"),
           (["--model", "predformer", "--set", "spatial_mixer=nosuchmixer"], "spatial_mixer"),
           (["--model", "predformer", "--set", "attention=full", "--set", "spatial_mixer=plstm2d"], "spatial_mixer"),
           (["--model", "convlstm", "--set", "kernel_size=4"], "kernel_size"),
           (["--model", "convlstm", "--set", "eval_rows=20000"], "eval_rows"),
           (["--model", "predformer", "--size", "huge"], "size"),
           (["--model", "predformer", "--max-minutes", "-1"], "max-minutes")]
    for argv, word in bad:
        with pytest.raises(SystemExit) as exit_:
            mm.main(argv + ["--out", str(tmp_path)])
        assert exit_.value.code == 2
        assert word in capsys.readouterr().err, argv
