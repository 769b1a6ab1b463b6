"""``python -m fastnn train`` on tiny configurations."""

import os
import subprocess
import sys

import numpy as np
import pytest

import fastnn as fn
from fastnn.__main__ import main
from test_datasets import _fake_mnist

# the numpy backend starts at once; test_module_entry_point runs the default backend
TINY = ["train", "--epochs", "1", "--hidden", "16", "--batch-size", "64", "--backend", "numpy"]


@pytest.fixture(autouse=True)
def _restore_threads():
    """``--threads`` sets the process-wide thread count: undo it."""
    previous = fn._threads._num_threads
    yield
    fn.set_num_threads(previous)


def test_train_defaults_tiny(capsys):
    assert main(TINY) == 0
    out = capsys.readouterr().out
    assert "784-16-10 relu MLP" in out
    assert "epoch 1/1" in out
    assert "test accuracy" in out and "samples/s" in out and "wall time" in out
    accuracy = float(out.split("test accuracy ")[1].split()[0])
    assert accuracy > 0.7


@pytest.mark.parametrize("extra", [
    ["--binary"],
    ["--optimizer", "sgd", "--lr", "0.1", "--activation", "tanh"],
    ["--optimizer", "rmsprop", "--dtype", "float64", "--hidden", ""],
    ["--optimizer", "adamw", "--threads", "1", "--quiet"],
])
def test_train_options(capsys, extra):
    assert main(TINY + extra) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out
    if "--binary" in extra:
        assert "784-16-1" in out and "digit 0 vs the rest" in out
    if "--quiet" in extra:
        assert "epoch 1/1" not in out


def test_train_save_and_load(tmp_path, capsys):
    path = tmp_path / "m.npz"
    assert main(TINY + ["--save", str(path), "--seed", "3"]) == 0
    assert "saved to" in capsys.readouterr().out
    model = fn.load_model(path)
    assert [layer.units for layer in model.layers] == [16, 10]
    (_, _), (xt, yt) = fn.datasets.load_mnist_small()
    assert model.evaluate(xt, yt)["accuracy"] > 0.7


def test_train_from_a_folder(tmp_path, capsys):
    _fake_mnist(tmp_path, n_train=50, n_test=20)
    assert main(TINY + ["--data", str(tmp_path)]) == 0
    assert f"MNIST from {tmp_path}" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--data", "/no/such/folder"], "--data"),
    (["--backend", "tpu"], "unknown backend"),
    (["--optimizer", "adam", "--momentum", "0.9"], "momentum"),
])
def test_bad_options_exit_2(capsys, args, message):
    assert main(TINY + args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--hidden", "a,b"], ["--epochs", "0"], ["--lr", "-1"],
                                  ["--optimizer", "adagrad"], ["--dtype", "float16"]])
def test_argparse_rejects(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(TINY + args)
    assert exc.value.code == 2


def test_module_entry_point():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
    out = subprocess.run([sys.executable, "-m", "fastnn", "train", "--epochs", "1",
                          "--hidden", "8", "--batch-size", "128"],
                         capture_output=True, text=True, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "test accuracy" in out.stdout


@pytest.mark.parametrize("model,extra,expect", [
    ("cnn", ["--filters", "8"], "Conv2D(8, 3, relu)-Flatten-Dense(10) CNN"),
    ("convnet", ["--filters", "4,8", "--dropout", "0.25"],
     "convnet Conv2D(4)-MaxPool-Conv2D(8)-MaxPool-Flatten-Dropout(0.25)-Dense(10)"),
    ("convnet", ["--filters", "8,16", "--binary", "--dropout", "0", "--lr", "0.003"],
     "Dense(1)"),
])
def test_train_convnets_tiny(capsys, model, extra, expect):
    """The seed's network and Keras' convnet from the command line (one short
    epoch at small width: the full runs' accuracies are in the README)."""
    assert main(["train", "--model", model, "--epochs", "1", "--batch-size", "64",
                 "--backend", "numpy"] + extra) == 0
    out = capsys.readouterr().out
    assert expect in out
    accuracy = float(out.split("test accuracy ")[1].split()[0])
    # one epoch of 63 steps at a quarter of the width: well above chance (0.1, or 0.9 for
    # the binary task's majority) is what this checks
    assert accuracy > (0.5 if "--binary" not in extra else 0.92)


@pytest.mark.parametrize("argv,parse_error", [
    (["--model", "cnn", "--filters", "8,16"], False),
    (["--model", "convnet", "--filters", "8"], False),
    (["--model", "resnet"], True),
    (["--dropout", "1.0"], True),
])
def test_train_bad_model_options(capsys, argv, parse_error):
    if parse_error:
        with pytest.raises(SystemExit) as info:
            main(["train", "--epochs", "1", "--backend", "numpy"] + argv)
        assert info.value.code == 2
    else:
        assert main(["train", "--epochs", "1", "--backend", "numpy"] + argv) == 2
        assert "--filters" in capsys.readouterr().err
