"""``python -m fastnn train`` around the training: --early-stopping, --lr-schedule,
--checkpoint, --plot, --export-onnx, and the checks made before training."""

import importlib.util
import os

import numpy as np
import pytest

import fastnn as fn
from fastnn import _cli_train, _files, onnx_export
from fastnn.__main__ import main
from test_plot import PANEL_WIDTH, HEIGHT, needs_mpl, png_size
from test_onnx import needs_onnx

TINY = ["train", "--epochs", "2", "--hidden", "16", "--batch-size", "64", "--backend", "numpy",
        "--quiet"]


@pytest.fixture(autouse=True)
def _restore_threads():
    previous = fn._threads._num_threads
    yield
    fn.set_num_threads(previous)


@pytest.fixture
def fits(monkeypatch):
    """Record the model and the callbacks of every fit the CLI makes."""
    calls = []
    original = fn.Sequential.fit

    def fit(self, *args, **kwargs):
        calls.append((self, kwargs.get("callbacks")))
        return original(self, *args, **kwargs)
    monkeypatch.setattr(fn.Sequential, "fit", fit)
    return calls


def test_callbacks_and_schedule_reach_fit(tmp_path, fits, capsys):
    path = tmp_path / "best.npz"
    assert main(TINY + ["--early-stopping", "3", "--checkpoint", str(path),
                        "--lr-schedule", "step", "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    (model, callbacks), = fits
    stop, checkpoint = callbacks
    assert isinstance(stop, fn.callbacks.EarlyStopping)
    assert (stop.monitor, stop.patience, stop.restore_best_weights) == ("val_loss", 3, True)
    assert isinstance(checkpoint, fn.callbacks.ModelCheckpoint)
    assert checkpoint.filepath == str(path) and checkpoint.save_best_only
    assert checkpoint.monitor == "val_loss"
    # 4,000 samples in batches of 64: 63 steps an epoch; step decay every epoch (3 // 3)
    assert model.optimizer.lr_schedule == fn.schedules.StepDecay(1e-3, 63, 0.5)
    assert f"checkpoint: the model of the best epoch (val_loss {checkpoint.best:.4f}) is in " \
        f"{path}" in out
    saved = fn.load_model(path)
    assert saved.optimizer.lr_schedule == model.optimizer.lr_schedule
    ran = int(out.split(" epochs")[0].rsplit("after ", 1)[1])
    assert ran == len(model.history.epoch)
    if stop.stopped_epoch:
        assert f"early stopping after epoch {stop.stopped_epoch + 1}" in out
    else:
        assert "early stopping" not in out and ran == 3


def test_no_options_no_callbacks(fits, capsys):
    assert main(TINY) == 0
    (model, callbacks), = fits
    assert callbacks == [] and model.optimizer.lr_schedule is None
    assert "checkpoint" not in capsys.readouterr().out


def test_lr_schedule_choices():
    assert _cli_train.lr_schedule("constant", 0.01, 63, 10) == 0.01
    step = _cli_train.lr_schedule("step", 0.01, 63, 10)
    assert [step(t) for t in (0, 188, 189, 378, 567)] == [0.01, 0.01, 0.005, 0.0025, 0.00125]
    cos = _cli_train.lr_schedule("cosine", 0.01, 63, 10)         # warm-up: one epoch
    assert cos(0) == 0 and cos(31) == pytest.approx(0.01 * 31 / 63, rel=1e-15)
    assert cos(63) == 0.01 and 0 < cos(629) < 1e-7 and cos(630) == 0
    short = _cli_train.lr_schedule("cosine", 0.1, 5, 1)          # 5 steps: no warm-up
    assert short.warmup_steps == 0 and short(0) == 0.1 and short(4) > 0
    mid = _cli_train.lr_schedule("cosine", 0.1, 63, 1)           # warm-up: 10 % of the steps
    assert mid.warmup_steps == 6 and mid(6) == 0.1


@needs_mpl
@pytest.mark.parametrize("extra,panels", [([], 3), (["--binary"], 3),
                                          (["--lr-schedule", "cosine"], 4)])
def test_plot(tmp_path, capsys, extra, panels):
    path = tmp_path / "curves.png"
    assert main(TINY + ["--plot", str(path)] + extra) == 0
    assert f"plot written to {path}" in capsys.readouterr().out
    # loss, accuracy, (the learning rate when it changes,) the confusion matrix
    assert png_size(path) == (panels * PANEL_WIDTH, HEIGHT)


@needs_onnx
def test_export_onnx(tmp_path, capsys):
    import onnxruntime as ort

    onnx_path, npz = tmp_path / "mnist.onnx", tmp_path / "m.npz"
    assert main(TINY + ["--export-onnx", str(onnx_path), "--save", str(npz)]) == 0
    assert f"ONNX model written to {onnx_path}" in capsys.readouterr().out
    (_, _), (xt, _) = fn.datasets.load_mnist_small()
    got = ort.InferenceSession(str(onnx_path)).run(None, {"input": xt[:50]})[0]
    want = fn.load_model(npz).predict(xt[:50])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("option", ["--save", "--checkpoint", "--plot", "--export-onnx"])
def test_output_folders_are_checked_before_training(tmp_path, option, fits, capsys):
    assert main(TINY + [option, str(tmp_path / "missing" / "f")]) == 2
    err = capsys.readouterr().err
    assert f"error: {option} " in err and "does not exist" in err
    assert fits == []                                        # nothing was trained


def test_unwritable_folder_is_refused_before_training(tmp_path, monkeypatch, fits, capsys):
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(_files.tempfile, "mkstemp", denied)
    assert main(TINY + ["--checkpoint", str(tmp_path / "c.npz")]) == 2
    assert "cannot write in the folder" in capsys.readouterr().err and fits == []


@pytest.mark.parametrize("option,module", [("--plot", "matplotlib"), ("--export-onnx", "onnx")])
def test_missing_extra_is_refused_before_training(tmp_path, monkeypatch, fits, capsys, option,
                                                   module):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == module else real(name, *a))
    assert main(TINY + [option, str(tmp_path / "out")]) == 2
    extra = "plot" if module == "matplotlib" else "onnx"
    assert f'pip install "fastnn[{extra}]"' in capsys.readouterr().err and fits == []


@needs_onnx
def test_a_failed_export_at_the_end_is_exit_1(tmp_path, monkeypatch, capsys):
    def broken(fileobj, data):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(onnx_export, "_write", broken)
    assert main(TINY + ["--export-onnx", str(tmp_path / "m.onnx")]) == 1
    assert "could not write the ONNX model" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args", [["--early-stopping", "-1"], ["--early-stopping", "x"],
                                  ["--lr-schedule", "linear"]])
def test_argparse_rejects(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(TINY + args)
    assert exc.value.code == 2


def test_early_stopping_stops_and_says_so(monkeypatch, fits, capsys):
    """A scripted val_loss (the model's evaluate) that stops improving after the
    second epoch: --early-stopping 1 ends training after the third."""
    values = iter([1.0, 0.5, 0.6, 0.7, 0.8, 0.9])
    original = fn.Sequential._evaluate

    def scripted(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        result["loss"] = next(values, result["loss"])
        return result
    monkeypatch.setattr(fn.Sequential, "_evaluate", scripted)
    assert main(TINY + ["--epochs", "6", "--early-stopping", "1"]) == 0
    out = capsys.readouterr().out
    assert "early stopping after epoch 3: val_loss best 0.5000 at epoch 2" in out
    (model, (stop,)), = fits
    assert stop.stopped_epoch == 2 and len(model.history.epoch) == 3
