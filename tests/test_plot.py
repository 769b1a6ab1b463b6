"""fastnn.plot: the PNG of a training run, and the confusion matrix.

The drawing tests need matplotlib (the ``plot`` extra) and are skipped, with
that reason, without it; every branch of fastnn/plot.py is run by some test
here.
"""

import importlib.util
import os
import struct
import sys
import zlib

import numpy as np
import pytest

import fastnn as fn
from fastnn import _files
from fastnn.plot import ANNOTATE_MAX_CLASSES, confusion_matrix, plot_history

needs_mpl = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                               reason="matplotlib is not installed (pip install \"fastnn[plot]\")")
PANEL_WIDTH, HEIGHT = 520, 440     # figsize (5.2 per panel, 4.4) at 100 dpi


def png_size(path):
    """(width, height) of a PNG after checking its signature, the IHDR chunk and
    its CRC, and that it ends with IEND; the pixels are read back too."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16:16 + 13]
    (crc,) = struct.unpack(">I", data[29:33])
    assert crc == zlib.crc32(b"IHDR" + body), "IHDR CRC mismatch"
    width, height, depth, color = struct.unpack(">IIBB", body[:10])
    assert depth == 8 and color in (2, 6)                  # 8-bit RGB(A)
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"
    from matplotlib.image import imread

    pixels = imread(path)
    assert pixels.shape[:2] == (height, width) and pixels.std() > 0.05   # not blank
    return width, height


def _classification(epochs=4, val=True):
    h = {"loss": list(np.linspace(1.2, 0.3, epochs)),
         "accuracy": list(np.linspace(0.6, 0.95, epochs)),
         "val_loss": list(np.linspace(1.3, 0.4, epochs)) if val else [],
         "val_accuracy": list(np.linspace(0.55, 0.9, epochs)) if val else [],
         "samples_per_s": [1000.0] * epochs}
    return h


def _digits_confusion(k=10, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, 500)
    pred = np.where(rng.random(500) < 0.85, y, rng.integers(0, k, 500))
    return confusion_matrix(y, pred, k)


# ------------------------------------------------------------ drawing

@needs_mpl
def test_full_figure(tmp_path):
    path = tmp_path / "curves.png"
    assert plot_history(_classification(), path, confusion=_digits_confusion(),
                        title="MLP on MNIST") == str(path)
    w, h = png_size(path)
    assert (w, h) == (3 * PANEL_WIDTH, HEIGHT) and w >= 400 and h >= 300
    assert os.listdir(tmp_path) == ["curves.png"]


@needs_mpl
@pytest.mark.parametrize("history,confusion,panels", [
    (_classification(val=False), None, 2),                          # no validation data
    (_classification(epochs=1), _digits_confusion(3), 3),            # one epoch
    ({"loss": [3.0, 2.0, 1.5], "val_loss": [3.1, 2.5, 2.4]}, None, 1),   # MSE: no accuracy
    ({"loss": [3.0, 2.0], "val_loss": [], "lr": [0.1, 0.01]}, None, 2),  # a rate, log scale
    ({"loss": [3.0, 2.0], "lr": [0.1, 0.1]}, None, 1),                # a constant one: no panel
    ({"loss": [3.0, 2.0, 1.0], "learning_rate": [0.1, 0.05, 0.0]}, None, 2),   # linear
    (_classification(), _digits_confusion(ANNOTATE_MAX_CLASSES + 5), 3),  # too many to number
    (_classification(), np.zeros((4, 4)), 3),                        # an empty matrix
])
def test_variants(tmp_path, history, confusion, panels):
    path = tmp_path / "p.png"
    plot_history(history, path, confusion=confusion)
    assert png_size(path) == (panels * PANEL_WIDTH, HEIGHT)


@needs_mpl
def test_history_of_a_real_fit(tmp_path):
    (x, y), (xt, yt) = fn.datasets.load_mnist_small()
    model = fn.Sequential([fn.Dense(32, "relu"), fn.Dense(10)], input_dim=784, seed=0)
    model.compile("softmax_cross_entropy", fn.Adam(1e-3))
    history = model.fit(x[:600], y[:600], epochs=3, batch_size=64,
                        validation_data=(xt[:200], yt[:200]), verbose=0)
    m = confusion_matrix(yt[:200], model.predict(xt[:200]).argmax(1), 10)
    assert m.sum() == 200
    assert np.trace(m) / 200 == pytest.approx(model.evaluate(xt[:200], yt[:200])["accuracy"])
    plot_history(history, tmp_path / "fit.png", confusion=m)
    assert png_size(tmp_path / "fit.png") == (3 * PANEL_WIDTH, HEIGHT)   # constant lr: no panel
    model.optimizer.lr = fn.schedules.ExponentialDecay(1e-3, 10, 0.5)
    history = model.fit(x[:600], y[:600], epochs=2, batch_size=64, verbose=0)
    plot_history(history, tmp_path / "fit.png")
    assert png_size(tmp_path / "fit.png") == (3 * PANEL_WIDTH, HEIGHT)   # loss, accuracy, lr


@needs_mpl
def test_a_failed_write_leaves_the_previous_png(tmp_path, monkeypatch):
    path = tmp_path / "p.png"
    plot_history({"loss": [1.0, 0.5]}, path)
    before = path.read_bytes()
    real = _files.write_atomic

    def failing(target, write):
        def partial(f):
            f.write(b"\x89PNG partial")
            raise OSError(28, "No space left on device")
        real(target, partial)
    monkeypatch.setattr(_files, "write_atomic", failing)
    with pytest.raises(OSError, match="No space"):
        plot_history(_classification(), path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["p.png"]


# ------------------------------------------------------------ refused before drawing

@pytest.mark.parametrize("history,kw,exc,match", [
    ([1.0, 0.5], {}, TypeError, "History"),
    ({"loss": []}, {}, ValueError, "no 'loss'"),
    ({"accuracy": [0.5]}, {}, ValueError, "no 'loss'"),
    ({"loss": [1.0]}, {"confusion": np.ones((2, 3))}, ValueError, "square"),
    ({"loss": [1.0]}, {"confusion": np.ones(3)}, ValueError, "square"),
    ({"loss": [1.0]}, {"confusion": -np.ones((2, 2))}, ValueError, "counts"),
    ({"loss": [1.0]}, {"confusion": np.full((2, 2), np.nan)}, ValueError, "counts"),
    ({"loss": [1.0]}, {"confusion": np.array([["a", "b"], ["c", "d"]])}, ValueError, "counts"),
    ({"loss": [1.0]}, {"title": 3}, TypeError, "title"),
])
def test_bad_arguments(tmp_path, history, kw, exc, match):
    with pytest.raises(exc, match=match):
        plot_history(history, tmp_path / "p.png", **kw)
    assert os.listdir(tmp_path) == []


def test_path_checked_first_and_missing_matplotlib(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="does not exist"):
        plot_history({"loss": []}, tmp_path / "none" / "p.png")     # before the history
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)     # as if not installed
    with pytest.raises(ImportError, match=r'pip install "fastnn\[plot\]"'):
        plot_history({"loss": [1.0]}, tmp_path / "p.png")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------ confusion_matrix

def test_confusion_matrix_counts():
    rng = np.random.default_rng(1)
    t, p = rng.integers(0, 7, 1000), rng.integers(0, 7, 1000)
    m = confusion_matrix(t, p, 7)
    want = np.zeros((7, 7), int)
    for a, b in zip(t.tolist(), p.tolist()):
        want[a, b] += 1
    np.testing.assert_array_equal(m, want)
    assert m.dtype == np.int64 and m.sum() == 1000
    np.testing.assert_array_equal(m.sum(1), np.bincount(t, minlength=7))
    np.testing.assert_array_equal(confusion_matrix(np.array([], int), np.array([], int), 2),
                                  np.zeros((2, 2)))
    np.testing.assert_array_equal(confusion_matrix(np.uint8([1, 1]), [1, 0], 3),
                                  [[0, 0, 0], [1, 1, 0], [0, 0, 0]])


@pytest.mark.parametrize("args,exc,match", [
    (([0], [0], 0), ValueError, "classes"),
    (([0], [0], True), ValueError, "classes"),
    (([0], [0], 2.0), ValueError, "classes"),
    (([0.0], [0], 2), TypeError, "y_true"),
    (([0], [[0]], 2), ValueError, "y_pred must be 1-D"),
    (([0, 2], [0, 1], 2), ValueError, r"y_true must hold class indices in \[0, 2\)"),
    (([0], [-1], 2), ValueError, "y_pred"),
    (([0, 1], [0], 2), ValueError, "same length"),
])
def test_confusion_matrix_bad_arguments(args, exc, match):
    with pytest.raises(exc, match=match):
        confusion_matrix(*args)
