"""``model.export_onnx``: ONNX Runtime on the exported file gives ``predict``'s outputs.

The tests that build or run a graph need ``onnx`` and ``onnxruntime`` (the
``onnx`` extra, which CI installs) and are skipped, with that reason, without
them; the checks made before onnx is imported (the path, the model) run always.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import fastnn as fn
from fastnn import _files, onnx_export
from fastnn.kernels.reference import ACTIVATIONS
from conftest import DTYPES, assert_close

HAVE_ONNX = importlib.util.find_spec("onnx") is not None
HAVE_ORT = importlib.util.find_spec("onnxruntime") is not None
needs_onnx = pytest.mark.skipif(
    not (HAVE_ONNX and HAVE_ORT),
    reason="onnx and onnxruntime are not installed (pip install \"fastnn[onnx]\")")


def _run(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]
    assert [o.name for o in sess.get_outputs()] == ["output"]
    return sess.run(None, {"input": x})[0]


def _graph(path):
    import onnx

    model = onnx.load(os.fspath(path))
    onnx.checker.check_model(model, full_check=True)
    return model


def _ops(path):
    return [n.op_type for n in _graph(path).graph.node]


def _mnist(n, image):
    (x, y), _ = fn.datasets.load_mnist_small()
    x, y = x[:n], y[:n]
    return (x.reshape(-1, 28, 28, 1) if image else x), y


def mlp(dtype):
    return fn.Sequential([fn.Dense(64, "relu"), fn.Dense(32, "tanh"), fn.Dense(10)],
                         input_dim=784, dtype=dtype, seed=0), "softmax_cross_entropy", False


def seed_003(dtype):
    return fn.Sequential([fn.Conv2D(32, (3, 3), activation="relu", input_shape=(28, 28, 1)),
                          fn.Flatten(), fn.Dense(10, "softmax")], dtype=dtype, seed=0), \
        "sparse_categorical_crossentropy", True


def keras_convnet(dtype):
    return fn.Sequential([
        fn.Conv2D(32, (3, 3), activation="relu", input_shape=(28, 28, 1)),
        fn.MaxPool2D(pool_size=(2, 2)),
        fn.Conv2D(64, (3, 3), activation="relu"),
        fn.MaxPool2D(pool_size=(2, 2)),
        fn.Flatten(),
        fn.Dropout(0.5),
        fn.Dense(10),
    ], dtype=dtype, seed=0), "softmax_cross_entropy", True


# ------------------------------------------------------------ the three networks

@needs_onnx
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("make", [mlp, seed_003, keras_convnet])
def test_trained_network_matches_predict(tmp_path, make, dtype):
    model, loss, image = make(np.dtype(dtype).name)
    model.compile(loss, fn.Adam(1e-3))
    x, y = _mnist(320, image)
    model.fit(x, y, epochs=1, batch_size=64, verbose=0)
    path = tmp_path / "net.onnx"
    assert model.export_onnx(path) == os.fspath(path)
    xt = _mnist(400, image)[0][320:]          # rows it was not trained on
    want = model.predict(xt)
    got = _run(path, xt.astype(dtype))
    assert got.dtype == dtype and got.shape == want.shape == (80, 10)
    assert_close(got, want, dtype, err_msg=make.__name__)
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
    ops = _ops(path)
    assert ops[-1] == "Softmax" and "Dropout" not in ops
    if image and dtype == np.float32:
        # NHWC handled by one Transpose to NCHW and one back before Flatten
        assert ops.count("Transpose") == 2 and ops[0] == "Transpose"
        assert ops.index("Flatten") == ops.index("Transpose", 1) + 1
        assert ops.count("Conv") == sum(isinstance(la, fn.Conv2D) for la in model.layers)
    if image and dtype == np.float64:
        # no double Conv kernel in ONNX Runtime: im2col from Slice/Concat/MatMul
        assert "Conv" not in ops and "MatMul" in ops


# ------------------------------------------------------------ every activation, both layer kinds

@needs_onnx
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_every_activation(tmp_path, act, dtype):
    name = np.dtype(dtype).name
    model = fn.Sequential([fn.Conv2D(4, 2, act, input_shape=(5, 6, 2)), fn.Flatten(),
                           fn.Dense(7, act), fn.Dense(3, act)], dtype=name, seed=1)
    rng = np.random.default_rng(2)
    model.set_weights([w + 0.3 * rng.standard_normal(w.shape) * (w.ndim == 1)  # biases != 0
                       for w in model.get_weights()])
    x = rng.standard_normal((9, 5, 6, 2)) * 2
    model.export_onnx(tmp_path / "a.onnx")
    want = model.predict(x)
    got = _run(tmp_path / "a.onnx", x.astype(dtype))
    assert_close(got, want, dtype, reduction=8, err_msg=act)
    # the same activation on pre-activations spanning [-60, 60] (the tails of sigmoid,
    # gelu and softplus), exactly: w = 1, b = 0
    m2 = fn.Sequential([fn.Dense(64, act)], input_dim=1, dtype=name, seed=0)
    m2.set_weights([np.ones((1, 64)), np.zeros(64)])
    z = np.linspace(-60, 60, 4801).reshape(-1, 1)
    m2.export_onnx(tmp_path / "b.onnx")
    want = m2.predict(z)
    got = _run(tmp_path / "b.onnx", z.astype(dtype))
    # the absolute part covers the float Sigmoid's far tail (see fastnn.onnx_export)
    assert_close(got, want, dtype, err_msg=act)


@needs_onnx
def test_activation_graphs():
    """Native operators where ONNX Runtime has the kernel, compositions otherwise."""
    def ops(act, dtype):
        model = fn.Sequential([fn.Dense(2, act)], input_dim=2, dtype=dtype, seed=0)
        with tempfile.TemporaryDirectory() as d:
            model.export_onnx(os.path.join(d, "m.onnx"))
            return _ops(os.path.join(d, "m.onnx"))
    assert ops("identity", "float32") == ["Gemm"]
    assert ops("leaky_relu", "float32") == ["Gemm", "LeakyRelu"]
    assert ops("leaky_relu", "float64") == ["Gemm", "Mul", "Max"]
    assert ops("softplus", "float32") == ["Gemm", "Softplus"]
    assert "Softplus" not in ops("softplus", "float64")
    assert "Gelu" not in ops("gelu", "float32") and "Sigmoid" not in ops("gelu", "float32")
    assert ops("sigmoid", "float64") == ["Gemm", "Sigmoid"]
    assert ops("silu", "float64") == ["Gemm", "Abs", "Neg", "Exp", "Min", "Exp", "Add", "Div",
                                      "Mul"]


@needs_onnx
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("layers,loss,y,last", [
    (lambda: [fn.Dense(1, "sigmoid")], "binary_crossentropy", np.arange(12) % 2, "Sigmoid"),
    (lambda: [fn.Dense(1)], "sigmoid_binary_cross_entropy", np.arange(12) % 2, "Sigmoid"),
    (lambda: [fn.Dense(3)], "softmax_cross_entropy", np.arange(12) % 3, "Softmax"),
    (lambda: [fn.Dense(3, "softmax")], "sparse_categorical_crossentropy", np.arange(12) % 3,
     "Softmax"),
    (lambda: [fn.Dense(3, "softmax")], None, None, "Softmax"),
    (lambda: [fn.Dense(1, "sigmoid")], None, None, "Sigmoid"),
    (lambda: [fn.Dense(3)], None, None, "Gemm"),
    (lambda: [fn.Dense(2, "tanh")], "mse", np.zeros((12, 2)), "Tanh"),
], ids=["bce-keras", "bce", "softmax-ce", "scce-keras", "softmax-uncompiled",
        "sigmoid-uncompiled", "logits-uncompiled", "mse-tanh"])
def test_output_function_as_predict(tmp_path, layers, loss, y, last, dtype):
    name = np.dtype(dtype).name
    model = fn.Sequential([fn.Dense(5, "relu")] + layers(), input_dim=4, dtype=name, seed=3)
    x = np.random.default_rng(4).standard_normal((12, 4)) * 2
    if loss is not None:
        model.compile(loss, fn.SGD(0.1))
        model.fit(x, y, epochs=2, batch_size=4, verbose=0)
    model.export_onnx(tmp_path / "m.onnx")
    ops = _ops(tmp_path / "m.onnx")
    assert ops[-1] == last
    assert ops.count("Sigmoid") + ops.count("Softmax") <= 1   # never applied twice
    assert_close(_run(tmp_path / "m.onnx", x.astype(dtype)), model.predict(x), dtype)


# ------------------------------------------------------------ geometry

@needs_onnx
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_same_padding_stride_2_asymmetric_pads(tmp_path, dtype):
    conv = fn.Conv2D(5, (4, 3), "relu", strides=(2, 3), padding="same", input_shape=(7, 8, 3))
    model = fn.Sequential([conv, fn.Conv2D(2, 2, padding="same", strides=2),
                           fn.MaxPool2D((2, 1), strides=(1, 1)), fn.Flatten(), fn.Dense(4)],
                          dtype=np.dtype(dtype).name, seed=5)
    # Keras' split: total 3 rows (1 top, 2 bottom), 1 column (0 left, 1 right)
    assert conv.pads == (1, 2, 0, 1) and conv.output_shape == (4, 3, 5)
    model.set_weights([w + 0.1 for w in model.get_weights()])   # non-zero biases
    x = np.random.default_rng(6).standard_normal((5, 7, 8, 3))
    model.export_onnx(tmp_path / "m.onnx")
    assert_close(_run(tmp_path / "m.onnx", x.astype(dtype)), model.predict(x), dtype,
                 reduction=36)
    nodes = _graph(tmp_path / "m.onnx").graph.node
    if dtype == np.float32:
        attrs = {a.name: list(a.ints) for a in next(n for n in nodes if n.op_type == "Conv")
                 .attribute if a.ints}
        assert attrs["pads"] == [1, 0, 2, 1]            # ONNX: top, left, bottom, right
        assert attrs["strides"] == [2, 3] and attrs["kernel_shape"] == [4, 3]
    else:
        assert [n.op_type for n in nodes].count("Pad") == 2


@needs_onnx
def test_image_output_stays_nhwc_and_opsets(tmp_path):
    """A model ending on an image returns NHWC as predict does; opset 13 works too."""
    model = fn.Sequential([fn.Conv2D(3, 3, "tanh", input_shape=(6, 5, 2)), fn.MaxPool2D(2)],
                          seed=0)
    x = np.random.default_rng(0).standard_normal((4, 6, 5, 2)).astype(np.float32)
    for opset in (13, 17):
        model.export_onnx(tmp_path / "m.onnx", opset=opset)
        assert _graph(tmp_path / "m.onnx").opset_import[0].version == opset
        got = _run(tmp_path / "m.onnx", x)
        assert got.shape == (4, 2, 1, 3)
        assert_close(got, model.predict(x), np.float32)


@needs_onnx
def test_dropout_only_model_is_the_identity(tmp_path):
    model = fn.Sequential([fn.Dropout(0.5)], input_dim=3)
    model.export_onnx(tmp_path / "m.onnx")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert _ops(tmp_path / "m.onnx") == ["Identity"]
    np.testing.assert_array_equal(_run(tmp_path / "m.onnx", x), model.predict(x))


@needs_onnx
def test_layer_named_like_the_graph_ends(tmp_path):
    model = fn.Sequential([fn.Dense(3, "relu", name="output"), fn.Dense(2, name="input")],
                          input_dim=2, seed=0)
    model.export_onnx(tmp_path / "m.onnx")
    x = np.ones((2, 2), np.float32)
    assert_close(_run(tmp_path / "m.onnx", x), model.predict(x), np.float32)


# ------------------------------------------------------------ writing, and what is refused

def _small():
    return fn.Sequential([fn.Dense(3)], input_dim=2, seed=0)


@needs_onnx
def test_a_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    _small().export_onnx(path)
    before = path.read_bytes()

    def broken(fileobj, data):
        fileobj.write(data[:10])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(onnx_export, "_write", broken)
    other = fn.Sequential([fn.Dense(4)], input_dim=2, seed=1)
    with pytest.raises(OSError, match="No space"):
        other.export_onnx(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]          # no temporary file left


def test_missing_or_bad_folder_is_refused_before_building(tmp_path, monkeypatch):
    def never(*a, **k):
        raise AssertionError("built before the path was checked")
    monkeypatch.setattr(onnx_export, "_build", never)
    unbuilt = fn.Sequential([fn.Dense(3)])
    with pytest.raises(ValueError, match="does not exist"):
        unbuilt.export_onnx(tmp_path / "no" / "such" / "m.onnx")
    with pytest.raises(ValueError, match="is a folder"):
        _small().export_onnx(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        _small().export_onnx(tmp_path / "file" / "m.onnx")
    with pytest.raises(TypeError, match="path"):
        _small().export_onnx(3)
    # an unwritable folder, by injection (root ignores permission bits)
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(_files.tempfile, "mkstemp", denied)
    with pytest.raises(ValueError, match="cannot write in the folder .*Permission denied"):
        _small().export_onnx(tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0
                    or shutil.which("runuser") is None,
                    reason="needs root and runuser to run as the unprivileged user nobody")
def test_unwritable_folder_as_nobody():
    """``check_writable`` as an unprivileged user: a folder nobody may enter but
    not write is refused; one it may write is accepted (so the refusal is real)."""
    python = next((p for p in (os.path.realpath(sys.executable), "/usr/bin/python3")
                   if subprocess.run(["runuser", "-u", "nobody", "--", p, "-c", "pass"],
                                     capture_output=True).returncode == 0), None)
    if python is None:
        pytest.skip("no Python that the user nobody can run")
    scratch = tempfile.mkdtemp(prefix="fastnn-onnx-")
    try:
        os.chmod(scratch, 0o755)
        shutil.copy(_files.__file__, os.path.join(scratch, "_files.py"))
        os.chmod(os.path.join(scratch, "_files.py"), 0o644)
        open_dir = os.path.join(scratch, "open")
        os.mkdir(open_dir)
        os.chmod(open_dir, 0o777)
        code = ("import sys; sys.path.insert(0, sys.argv[1]); import _files\n"
                "for p in sys.argv[2:]:\n"
                "    try:\n"
                "        _files.check_writable(p, 'path'); print('ok')\n"
                "    except ValueError as e:\n"
                "        print('refused:', e)\n")
        proc = subprocess.run(["runuser", "-u", "nobody", "--", python, "-c", code, scratch,
                               os.path.join(scratch, "m.onnx"),
                               os.path.join(open_dir, "m.onnx")],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].startswith("refused:") and "cannot write in the folder" in lines[0] \
            and "Permission denied" in lines[0], lines
        assert lines[1] == "ok", lines
        assert os.listdir(open_dir) == []           # the probe file was removed
    finally:
        shutil.rmtree(scratch)


class _Scale(fn.layers.Layer):
    """A user's layer, which the exporter does not know."""

    kind = "scale"

    def forward_fn(self, be, bufs, act, training, ctx):
        return lambda x: x


def test_unsupported_layers_and_activations_are_named(tmp_path, monkeypatch):
    model = fn.Sequential([fn.Dense(3), _Scale()], input_dim=2)
    with pytest.raises(ValueError, match=r"scale \(_Scale\) has no ONNX conversion"):
        model.export_onnx(tmp_path / "m.onnx")
    if HAVE_ONNX:
        model = _small()
        model.layers[0]._act = "swish"                 # an activation without a conversion
        with pytest.raises(ValueError, match=r"activation 'swish' of dense \(Dense\)"):
            model.export_onnx(tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_other_bad_arguments(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="not built"):
        fn.Sequential([fn.Dense(3)]).export_onnx(tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="opset"):
        _small().export_onnx(tmp_path / "m.onnx", opset=12)
    with pytest.raises(TypeError, match="opset"):
        _small().export_onnx(tmp_path / "m.onnx", opset="17")
    with pytest.raises(TypeError, match="Sequential"):
        onnx_export.export_onnx([fn.Dense(3)], tmp_path / "m.onnx")
    if HAVE_ONNX:
        with pytest.raises(ValueError, match="opset must be <="):
            _small().export_onnx(tmp_path / "m.onnx", opset=999)
    monkeypatch.setitem(sys.modules, "onnx", None)     # as if it were not installed
    with pytest.raises(ImportError, match=r'pip install "fastnn\[onnx\]"'):
        _small().export_onnx(tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []
