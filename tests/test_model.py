"""Sequential, Dense and the losses: gradients, training, save/load, bad arguments."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastnn as fn
from fastnn import _backend
from fastnn import model as model_mod
from fastnn.kernels import reference as ref
from conftest import BACKENDS

CPU = ("numpy", "cython", "numba")
CPU_BACKENDS = [p for p in BACKENDS if p.values[0] in CPU]
LOSSES = ("softmax_cross_entropy", "sigmoid_binary_cross_entropy", "mse")
UNITS = {"softmax_cross_entropy": 3, "sigmoid_binary_cross_entropy": 1, "mse": 2}


def _targets(loss, n, rng):
    if loss == "softmax_cross_entropy":
        return rng.integers(0, 3, n)
    if loss == "sigmoid_binary_cross_entropy":
        return rng.random(n)   # soft targets in [0, 1] exercise the formula fully
    return rng.standard_normal((n, 2))


def _small_model(act, loss, dtype="float64", top="identity", seed=0):
    model = fn.Sequential([fn.Dense(5, act), fn.Dense(4, act), fn.Dense(UNITS[loss], top)],
                          input_dim=3, dtype=dtype, seed=seed)
    model.compile(loss, fn.SGD(0.1))
    return model


def _snapshot(model):
    opt = model.optimizer
    return (np.array(model.params), model._rng.bit_generator.state,
            None if opt is None else opt.iterations,
            None if opt is None or not opt._states else
            {k: np.array(v) for k, v in opt._state_arrays().items()})


def _assert_unchanged(model, snap):
    params, rng_state, t, state = _snapshot(model)
    np.testing.assert_array_equal(params, snap[0])
    assert rng_state == snap[1]
    assert t == snap[2]
    if snap[3] is not None:
        for k in snap[3]:
            np.testing.assert_array_equal(state[k], snap[3][k])


# ---------------------------------------------------------------- gradients

def _finite_difference_check(model, x, y, h=1e-6):
    analytic_loss = model._loss_and_grad(x, y)
    analytic = np.array(model.grads)
    p = model.params
    numeric = np.empty_like(analytic)
    for i in range(p.size):
        old = p[i]
        p[i] = old + h
        up = model._loss_and_grad(x, y)
        p[i] = old - h
        down = model._loss_and_grad(x, y)
        p[i] = old
        numeric[i] = (up - down) / (2 * h)
    assert np.isfinite(analytic_loss)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", ref.ACTIVATIONS)
def test_gradient_finite_difference(backend, act, loss):
    """The model's backward pass on its flat buffers, against central differences
    of its own forward pass (float64), for every hidden activation and loss."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 3))
    y = _targets(loss, 6, rng)
    with fn.use_backend(backend):
        model = _small_model(act, loss)
        _finite_difference_check(model, x, y)


@pytest.mark.parametrize("top", ref.ACTIVATIONS)
def test_gradient_finite_difference_top_activation(top):
    """A last layer with an activation: the loss gradient goes through it."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 3))
    y = _targets("mse", 5, rng)
    _finite_difference_check(_small_model("tanh", "mse", top=top), x, y)


def _numpy_sgd_training(weights, x, y, lr, batch):
    """An independent NumPy implementation: relu MLP, softmax CE, plain SGD, no shuffling."""
    w1, b1, w2, b2 = [a.copy() for a in weights]
    n = len(x)
    for s in range(0, n, batch):
        xb, yb = x[s:s + batch], y[s:s + batch]
        nb = len(xb)
        z1 = xb @ w1 + b1
        a1 = np.maximum(z1, 0)
        z2 = a1 @ w2 + b2
        p = np.exp(z2 - z2.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(nb), yb] -= 1
        g = p / nb
        d1 = (g @ w2.T) * (z1 > 0)
        w2 -= lr * (a1.T @ g)
        b2 -= lr * g.sum(0)
        w1 -= lr * (xb.T @ d1)
        b1 -= lr * d1.sum(0)
    return [w1, b1, w2, b2]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_training_matches_independent_numpy_implementation(backend):
    """10 samples in batches of 4, 4, 2: the short last batch included."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((10, 6))
    y = rng.integers(0, 4, 10)
    with fn.use_backend(backend):
        model = fn.Sequential([fn.Dense(5, "relu"), fn.Dense(4)], input_dim=6, dtype="float64",
                              seed=3)
        model.compile("softmax_cross_entropy", fn.SGD(0.5))
        expected = _numpy_sgd_training(model.get_weights(), x, y, 0.5, 4)
        model.fit(x, y, epochs=1, batch_size=4, shuffle=False, verbose=0)
    for got, want in zip(model.get_weights(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------- training

def _blobs(n=200, d=8, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, d)) * 3
    y = rng.integers(0, classes, n)
    x = centers[y] + rng.standard_normal((n, d))
    return x, y


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw", "rmsprop"])
def test_training_decreases_the_loss(backend, dtype, opt):
    x, y = _blobs()
    with fn.use_backend(backend):
        model = fn.Sequential([fn.Dense(16, "relu"), fn.Dense(3)], input_dim=8, dtype=dtype,
                              seed=0)
        model.compile("softmax_cross_entropy", fn.optim.get(opt, lr=0.05 if opt == "sgd"
                                                            else 1e-2))
        before = model.evaluate(x, y)["loss"]
        history = model.fit(x, y, epochs=5, batch_size=16, verbose=0)
        after = model.evaluate(x, y)
    assert after["loss"] < 0.5 * before
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert after["accuracy"] > 0.9
    assert model.params.dtype == np.dtype(dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bundled_mnist_reaches_90_percent(backend, dtype):
    """The default network on the bundled data (2 epochs; the CLI runs 10)."""
    (x, y), (xt, yt) = fn.datasets.load_mnist_small()
    with fn.use_backend(backend):
        model = fn.Sequential([fn.Dense(256, "relu"), fn.Dense(128, "relu"), fn.Dense(10)],
                              input_dim=784, dtype=dtype, seed=0)
        model.compile("softmax_cross_entropy", fn.Adam(1e-3))
        model.fit(x, y, epochs=2, batch_size=32, verbose=0)
        assert model.evaluate(xt, yt)["accuracy"] >= 0.90


def test_binary_targets_as_vector_or_column_train_identically():
    x, y = _blobs(classes=2)
    results = []
    for target in (y, y.reshape(-1, 1), y.astype(np.float32)):
        model = fn.Sequential([fn.Dense(8, "tanh"), fn.Dense(1)], input_dim=8, seed=1)
        model.compile("sigmoid_binary_cross_entropy", "adam")
        h = model.fit(x, target, epochs=2, batch_size=32, verbose=0)
        results.append((model.params.copy(), h.history["accuracy"]))
    for params, acc in results[1:]:
        np.testing.assert_array_equal(params, results[0][0])
        assert acc == results[0][1]
    proba = model.predict(x)
    assert proba.shape == (len(x), 1) and np.all((proba > 0) & (proba < 1))


def test_linear_regression_recovers_the_weights():
    rng = np.random.default_rng(0)
    w_true = rng.standard_normal((4, 2))
    b_true = np.array([0.5, -1.0])
    x = rng.standard_normal((400, 4))
    y = x @ w_true + b_true
    model = fn.Sequential([fn.Dense(2)], input_dim=4, dtype="float64", seed=0)
    model.compile("mse", fn.SGD(0.1))
    h = model.fit(x, y, epochs=30, batch_size=20, verbose=0)
    w, b = model.get_weights()
    np.testing.assert_allclose(w, w_true, atol=1e-6)
    np.testing.assert_allclose(b, b_true, atol=1e-6)
    assert set(h.history) == {"loss", "val_loss", "samples_per_s", "step_samples_per_s", "lr"}
    np.testing.assert_allclose(model.predict(x), y, atol=1e-5)


def test_same_seed_same_numbers_and_fit_seed():
    x, y = _blobs()

    def run(model_seed, fit_seed=None):
        model = fn.Sequential([fn.Dense(8, "relu"), fn.Dense(3)], input_dim=8, seed=model_seed)
        model.compile("softmax_cross_entropy", "adam")
        h = model.fit(x, y, epochs=2, batch_size=16, seed=fit_seed, verbose=0)
        return model.params.copy(), h.history["loss"]

    a, b, c = run(5), run(5), run(6)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]
    assert not np.array_equal(a[0], c[0])
    # fit(seed=...) fixes the shuffling whatever the model's generator did before
    d = run(5, fit_seed=9)
    model = fn.Sequential([fn.Dense(8, "relu"), fn.Dense(3)], input_dim=8, seed=5)
    model.compile("softmax_cross_entropy", "adam")
    state = model._rng.bit_generator.state
    model._rng.random(100)  # consumed after the weights were drawn: must not matter
    model.fit(x, y, epochs=2, batch_size=16, seed=9, verbose=0)
    np.testing.assert_array_equal(d[0], model.params)
    model._rng.bit_generator.state = state
    model._rng.random(100)


def test_initialisation_he_and_glorot():
    model = fn.Sequential([fn.Dense(400, "relu"), fn.Dense(300, "tanh"), fn.Dense(10)],
                          input_dim=500, seed=0, dtype="float64")
    (w1, b1), (w2, b2), (w3, b3) = [(layer.w, layer.b) for layer in model.layers]
    assert abs(w1.std() - np.sqrt(2 / 500)) < 0.02 * np.sqrt(2 / 500)
    limit = np.sqrt(6 / (400 + 300))
    assert np.abs(w2).max() <= limit and np.abs(w2).max() > 0.99 * limit
    assert abs(w2.mean()) < 0.01 * limit
    assert np.abs(w3).max() <= np.sqrt(6 / (300 + 10))
    for b in (b1, b2, b3):
        assert not b.any()


def test_weights_are_views_of_one_flat_buffer():
    model = fn.Sequential([fn.Dense(7, "relu"), fn.Dense(3)], input_dim=5, seed=0)
    assert model.params.ndim == 1 and model.params.size == 5 * 7 + 7 + 7 * 3 + 3
    assert model.param_count == model.params.size
    for layer in model.layers:
        assert np.shares_memory(layer.w, model.params)
        assert np.shares_memory(layer.b, model.params)
    model.params[:] = 0
    assert not model.layers[1].w.any()
    assert model.grads.shape == model.params.shape


def _count_hooks(monkeypatch, be):
    calls = {"empty": 0, "zeros": 0}
    for name in calls:
        original = getattr(be, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(be, name, counting)
    return calls


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_allocation_after_the_first_batch(monkeypatch, backend):
    """Buffers are made once per batch size: the number of allocations does not
    grow with the number of steps, and a second fit makes none."""
    x, y = _blobs(n=100)
    be = _backend.load(backend)
    calls = _count_hooks(monkeypatch, be)
    with fn.use_backend(backend):
        model = fn.Sequential([fn.Dense(6, "gelu"), fn.Dense(3)], input_dim=8, seed=0)
        model.compile("softmax_cross_entropy", "adam")
        model.fit(x, y, epochs=1, batch_size=10, verbose=0)
        first = dict(calls)
        model.fit(x, y, epochs=3, batch_size=10, verbose=0)
        assert calls == first
        model.fit(x[:97], y[:97], epochs=2, batch_size=10, verbose=0)  # short last batch
        assert calls == first
    assert sum(first.values()) > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_optimizer_step_is_one_kernel_call(monkeypatch, backend):
    x, y = _blobs(n=50)
    be = _backend.load(backend)
    calls = []
    original = be.adam_step
    monkeypatch.setattr(be, "adam_step", lambda *a: calls.append(a[0].shape) or original(*a))
    with fn.use_backend(backend):
        model = fn.Sequential([fn.Dense(6, "relu"), fn.Dense(3)], input_dim=8, seed=0)
        model.compile("softmax_cross_entropy", "adam")
        model.fit(x, y, epochs=1, batch_size=10, verbose=0)
    assert calls == [model.params.shape] * 5


def test_preactivation_kept_only_where_needed():
    model = fn.Sequential([fn.Dense(4, a) for a in ref.ACTIVATIONS] + [fn.Dense(2)],
                          input_dim=3, seed=0)
    model.compile("softmax_cross_entropy", "adam")
    plan = model._plan(_backend.current(), 8, True)
    for layer, bufs in zip(model.layers, plan.bufs):
        assert ("z" in bufs) == (layer.activation in ref.Z_ACTIVATIONS)


def test_history_validation_and_progress(capsys):
    x, y = _blobs(n=120)
    model = fn.Sequential([fn.Dense(8, "relu"), fn.Dense(3)], input_dim=8, seed=0)
    model.compile("softmax_cross_entropy", fn.Adam(1e-2), metrics=["accuracy"])
    h = model.fit(x, y, epochs=2, batch_size=32, validation_split=0.25, verbose=0)
    assert capsys.readouterr() == ("", "")
    assert h.epoch == [0, 1]
    assert len(h.history["val_loss"]) == 2 and len(h.history["val_accuracy"]) == 2
    assert h.params["samples"] == 90
    # validation_split holds out the last quarter
    ev = model.evaluate(x[90:], y[90:])
    assert ev["loss"] == pytest.approx(h.history["val_loss"][-1], rel=1e-6)
    h = model.fit(x, y, epochs=1, batch_size=32, validation_data=(x[:10], y[:10]), verbose=1)
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "samples/s" in err
    model.fit(x, y, epochs=1, batch_size=32, verbose=2)
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "accuracy" in out and "samples/s" in out


def test_evaluate_and_predict_match_a_manual_forward():
    x, y = _blobs(n=70)
    model = fn.Sequential([fn.Dense(5, "silu"), fn.Dense(3)], input_dim=8, dtype="float64",
                          seed=0)
    logits_before_compile = model.predict(x)
    w1, b1, w2, b2 = model.get_weights()
    z = x @ w1 + b1
    logits = (z / (1 + np.exp(-z))) @ w2 + b2
    np.testing.assert_allclose(logits_before_compile, logits, rtol=1e-12)
    model.compile("softmax_cross_entropy", "adam")
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(model.predict(x, batch_size=16), p, rtol=1e-12)
    ev = model.evaluate(x, y, batch_size=32)
    assert ev["loss"] == pytest.approx(-np.log(p[np.arange(70), y]).mean(), rel=1e-12)
    assert ev["accuracy"] == pytest.approx(np.mean(p.argmax(1) == y))


def test_lazy_build_and_add():
    x, y = _blobs(n=40)
    model = fn.Sequential(seed=0)
    model.add(fn.Dense(4, "relu"))
    model.add(fn.Dense(3))
    assert not model.built
    model.compile("softmax_cross_entropy", "sgd")
    model.fit(x, y, epochs=1, verbose=0)
    assert model.built and model.input_dim == 8
    with pytest.raises(ValueError, match="built"):
        model.add(fn.Dense(2))
    text = model.summary(print_fn=None)
    assert "dense_1 (Dense)" in text and f"{model.param_count:,}" in text


def test_accepts_any_real_input_and_integer_labels():
    x, y = _blobs(n=30)
    model = fn.Sequential([fn.Dense(4, "relu"), fn.Dense(3)], input_dim=8, seed=0)
    model.compile("softmax_cross_entropy", "adam")
    model.fit((x * 10).astype(np.int16), y.astype(np.uint8), epochs=1, verbose=0)
    model.fit(x.tolist(), y.astype(np.int32).tolist(), epochs=1, verbose=0)
    assert model.params.dtype == np.float32


def test_import_fastnn_stays_light():
    code = ("import sys, fastnn; fastnn.Sequential; "
            "print(sorted(m for m in ('numba', 'tqdm', 'urllib.request', 'fastnn.kernels.numba_cpu')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- save / load

def _trained(opt, loss="softmax_cross_entropy", dtype="float32"):
    x, y = _blobs(n=64)
    if loss == "sigmoid_binary_cross_entropy":
        y = (y == 0).astype(float)
    model = fn.Sequential([fn.Dense(6, "leaky_relu"), fn.Dense(UNITS[loss] if loss != "mse"
                                                                 else 3)],
                          input_dim=8, dtype=dtype, seed=4)
    model.compile(loss, opt)
    if loss == "mse":
        y = np.eye(3)[y]
    model.fit(x, y, epochs=2, batch_size=10, verbose=0)
    return model, x, y


OPTIMIZERS = [
    lambda: fn.SGD(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, l1=1e-4),
    lambda: fn.Adam(1e-2, amsgrad=True, weight_decay=1e-3),
    lambda: fn.AdamW(1e-2),
    lambda: fn.RMSprop(1e-3, momentum=0.5, centered=True, l1=1e-4),
    lambda: fn.SGD(0.1),
]


@pytest.mark.parametrize("make_opt", OPTIMIZERS, ids=["sgd", "adam", "adamw", "rmsprop", "sgd0"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_save_load_round_trip_and_resume(tmp_path, make_opt, dtype):
    model, x, y = _trained(make_opt(), dtype=dtype)
    path = tmp_path / "model.npz"
    model.save(path)
    loaded = fn.load_model(path)
    np.testing.assert_array_equal(loaded.params, model.params)
    assert loaded.params.dtype == model.params.dtype
    assert loaded.get_config() == model.get_config()
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    # training resumes identically: optimizer state, step count and shuffling generator
    h1 = model.fit(x, y, epochs=2, batch_size=10, verbose=0)
    h2 = loaded.fit(x, y, epochs=2, batch_size=10, verbose=0)
    np.testing.assert_array_equal(loaded.params, model.params)
    assert h1.history["loss"] == h2.history["loss"]


@pytest.mark.parametrize("loss", LOSSES)
def test_save_load_each_loss(tmp_path, loss):
    model, x, y = _trained("adam", loss=loss)
    model.save(tmp_path / "m.npz")
    loaded = fn.load_model(tmp_path / "m.npz")
    assert loaded.loss == model.loss
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))


def test_save_uncompiled_model(tmp_path):
    model = fn.Sequential([fn.Dense(3, "sigmoid")], input_dim=2, seed=0)
    model.save(tmp_path / "m.npz")
    loaded = fn.load_model(tmp_path / "m.npz")
    assert loaded.loss is None
    np.testing.assert_array_equal(loaded.params, model.params)
    with pytest.raises(ValueError, match="not built"):
        fn.Sequential([fn.Dense(3)]).save(tmp_path / "x.npz")


def test_failed_save_leaves_the_old_file_intact(tmp_path, monkeypatch):
    model, x, y = _trained("adam")
    path = tmp_path / "model.npz"
    model.save(path)
    before = path.read_bytes()
    model.fit(x, y, epochs=1, verbose=0)

    def failing_writer(f, arrays):
        f.write(b"PK\x03\x04 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(model_mod, "_write_npz", failing_writer)
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.npz"]  # no temporary file left behind
    monkeypatch.undo()
    model.save(path)
    assert path.read_bytes() != before


def _valid_arrays(model, folder):
    path = folder / "valid.npz"
    model.save(path)
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def test_corrupt_truncated_and_foreign_files(tmp_path):
    model, _, _ = _trained("adam")
    good = tmp_path / "good.npz"
    model.save(good)
    data = good.read_bytes()
    cases = {
        "random.npz": os.urandom(2000),
        "empty.npz": b"",
        "truncated.npz": data[: len(data) // 2],
        "text.npz": b"hello, I am not a model\n",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    np.savez(tmp_path / "foreign.npz", a=np.arange(3))
    np.save(tmp_path / "plain.npy", np.arange(3))
    arrays = _valid_arrays(model, tmp_path)
    bad_json = dict(arrays, config=np.array("{not json"))
    np.savez(tmp_path / "badjson.npz", **bad_json)
    other = dict(arrays, config=np.array(json.dumps({"format": "something else"})))
    np.savez(tmp_path / "otherformat.npz", **other)
    shape = dict(arrays, params=arrays["params"][:-1])
    np.savez(tmp_path / "shape.npz", **shape)
    dtype = dict(arrays, params=arrays["params"].astype(np.float64))
    np.savez(tmp_path / "dtype.npz", **dtype)
    nostate = {k: v for k, v in arrays.items() if k != "opt_m"}
    np.savez(tmp_path / "nostate.npz", **nostate)
    objects = dict(arrays, params=np.array([object()], dtype=object))
    np.savez(tmp_path / "pickled.npz", **objects)
    for name in [*cases, "foreign.npz", "plain.npy", "badjson.npz", "otherformat.npz",
                 "shape.npz", "dtype.npz", "nostate.npz", "pickled.npz"]:
        with pytest.raises(ValueError, match="fastnn model file"):
            fn.load_model(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        fn.load_model(tmp_path / "missing.npz")


# ---------------------------------------------------------------- bad arguments

def _compiled(loss="softmax_cross_entropy"):
    model = fn.Sequential([fn.Dense(5, "relu"), fn.Dense(UNITS[loss])], input_dim=4, seed=0)
    model.compile(loss, "adam")
    x = np.random.default_rng(0).random((20, 4))
    y = _targets(loss, 20, np.random.default_rng(0))
    model.fit(x, y if loss != "sigmoid_binary_cross_entropy" else (y > 0.5), epochs=1,
              verbose=0)
    return model, x, y


X = np.random.default_rng(0).random((20, 4))
Y = np.arange(20) % 3
BAD_FIT = [
    (dict(x=X[:, :3]), ValueError, "4 features"),
    (dict(x=X[:, 0]), ValueError, "2-D"),
    (dict(x=X.astype(complex)), TypeError, "real"),
    (dict(x=np.array([["a"] * 4] * 20)), TypeError, "real"),
    (dict(x=X[:0]), ValueError, "no samples"),
    (dict(y=Y.astype(float)), TypeError, "integer"),
    (dict(y=np.where(Y == 2, 3, Y)), ValueError, r"\[0, 3\)"),
    (dict(y=Y - 1), ValueError, r"\[0, 3\)"),
    (dict(y=Y[:-1]), ValueError, "20 rows"),
    (dict(y=Y.reshape(-1, 1)), ValueError, "1-D"),
    (dict(epochs=0), ValueError, "epochs"),
    (dict(epochs=1.5), TypeError, "epochs"),
    (dict(epochs=True), TypeError, "epochs"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(batch_size="32"), TypeError, "batch_size"),
    (dict(validation_split=1.0), ValueError, "validation_split"),
    (dict(validation_split=-0.1), ValueError, "validation_split"),
    (dict(validation_split=0.01), ValueError, "validation_split"),
    (dict(validation_data=(X, Y + 5)), ValueError, "validation_data"),
    (dict(validation_data=(X[:, :2], Y)), ValueError, "validation_data"),
    (dict(validation_data=X), TypeError, "pair"),
    (dict(shuffle="yes"), TypeError, "shuffle"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(verbose=3), ValueError, "verbose"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_FIT)
def test_bad_fit_arguments_change_nothing(kwargs, exc, match):
    model, _, _ = _compiled()
    snap = _snapshot(model)
    args = dict(x=X, y=Y, epochs=1, verbose=0)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        model.fit(**args)
    _assert_unchanged(model, snap)
    model.fit(X, Y, epochs=1, verbose=0)  # still trains


@pytest.mark.parametrize("loss,y,match", [
    ("sigmoid_binary_cross_entropy", np.full(20, 2.0), r"\[0, 1\]"),
    ("sigmoid_binary_cross_entropy", np.full(20, np.nan), r"\[0, 1\]"),
    ("sigmoid_binary_cross_entropy", np.zeros((20, 2)), "shape"),
    ("mse", np.zeros((20, 3)), "shape"),
    ("mse", np.zeros(20, dtype=complex), "real"),
])
def test_bad_targets_change_nothing(loss, y, match):
    model, x, _ = _compiled(loss)
    snap = _snapshot(model)
    with pytest.raises((TypeError, ValueError), match=match):
        model.fit(x, y, epochs=1, verbose=0)
    with pytest.raises((TypeError, ValueError), match=match):
        model.evaluate(x, y)
    _assert_unchanged(model, snap)


def test_fit_and_evaluate_before_compile():
    model = fn.Sequential([fn.Dense(3)], input_dim=4, seed=0)
    snap = _snapshot(model)
    with pytest.raises(RuntimeError, match="compile"):
        model.fit(X, Y)
    with pytest.raises(RuntimeError, match="compile"):
        model.evaluate(X, Y)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("call,exc,match", [
    (lambda m: m.predict(X[:, :3]), ValueError, "4 features"),
    (lambda m: m.predict(X, batch_size=0), ValueError, "batch_size"),
    (lambda m: m.evaluate(X, Y, batch_size=-1), ValueError, "batch_size"),
    (lambda m: m.evaluate(X, Y + 1), ValueError, r"\[0, 3\)"),
    (lambda m: m.set_weights([np.zeros((4, 5))]), ValueError, "list of 4"),
    (lambda m: m.set_weights([np.zeros((4, 5)), np.zeros(5), np.zeros((5, 2)), np.zeros(3)]),
     ValueError, "shape"),
    (lambda m: m.compile("hinge"), ValueError, "unknown loss"),
    (lambda m: m.compile(3), TypeError, "loss"),
    (lambda m: m.compile("mse", "adagrad"), ValueError, "unknown optimizer"),
    (lambda m: m.compile("sigmoid_binary_cross_entropy"), ValueError, "Dense\\(1\\)"),
    (lambda m: m.compile("softmax_cross_entropy", metrics=["f1"]), ValueError, "metric"),
    (lambda m: m.compile("mse", metrics=["accuracy"]), ValueError, "classification"),
    (lambda m: m.compile("mse", metrics="accuracy"), TypeError, "metrics"),
])
def test_bad_calls_change_nothing(call, exc, match):
    model, _, _ = _compiled()
    snap = _snapshot(model)
    loss, opt = model.loss, model.optimizer
    with pytest.raises(exc, match=match):
        call(model)
    _assert_unchanged(model, snap)
    assert model.loss is loss and model.optimizer is opt


@pytest.mark.parametrize("make,exc,match", [
    (lambda: fn.Dense(0), ValueError, "units"),
    (lambda: fn.Dense(2.5), TypeError, "units"),
    (lambda: fn.Dense(3, "swish"), ValueError, "unknown activation"),
    (lambda: fn.Dense(3, 1), TypeError, "activation"),
    (lambda: fn.Sequential([fn.Dense(3), "dense"]), TypeError, "layers\\[1\\]"),
    (lambda: fn.Sequential(fn.Dense(3)), TypeError, "list"),
    (lambda: fn.Sequential([fn.Dense(3)], dtype="float16"), ValueError, "dtype"),
    (lambda: fn.Sequential([fn.Dense(3)], dtype="int32"), ValueError, "dtype"),
    (lambda: fn.Sequential([fn.Dense(3)], dtype="nonsense"), TypeError, "dtype"),
    (lambda: fn.Sequential([fn.Dense(3)], input_dim=0), ValueError, "input_dim"),
    (lambda: fn.Sequential([fn.Dense(3)], seed=-2), TypeError, "seed"),
    (lambda: fn.Sequential([fn.Dense(3)], seed="a"), TypeError, "seed"),
    (lambda: fn.Sequential([], input_dim=3), ValueError, "layers"),
    (lambda: fn.Sequential([fn.Dense(3)]).compile("mse", "sgd") or
     fn.Sequential([fn.Dense(3)]).predict(np.zeros((2, 0))), ValueError, "features"),
])
def test_bad_construction(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_layer_and_optimizer_belong_to_one_model():
    layer = fn.Dense(3)
    m1 = fn.Sequential([layer], input_dim=2)
    with pytest.raises(ValueError, match="another model"):
        fn.Sequential([layer], input_dim=2)
    with pytest.raises(ValueError, match="twice"):
        fn.Sequential([fn.Dense(2)] * 2)
    opt = fn.Adam()
    m1.compile("softmax_cross_entropy", opt)
    m2 = fn.Sequential([fn.Dense(3)], input_dim=2)
    with pytest.raises(ValueError, match="another model"):
        m2.compile("softmax_cross_entropy", opt)
    assert m2.loss is None
    with pytest.raises(ValueError, match="belongs to a model"):
        opt.step([np.zeros(3)], [np.zeros(3)])
    m1.compile("softmax_cross_entropy", fn.Adam())  # the old optimizer is released
    m2.compile("softmax_cross_entropy", opt)


def test_losses_by_name_and_object():
    assert fn.losses.get("binary_crossentropy") == fn.losses.SigmoidBinaryCrossEntropy()
    assert isinstance(fn.losses.get(fn.losses.MeanSquaredError()), fn.losses.MeanSquaredError)
    assert fn.losses.get(fn.losses.SoftmaxCrossEntropy).name == "softmax_cross_entropy"
    model = fn.Sequential([fn.Dense(2)], input_dim=3)
    model.compile(fn.losses.SoftmaxCrossEntropy(), fn.SGD(0.1))
    assert model.loss.name == "softmax_cross_entropy"


def test_optimizer_reset_between_fits():
    """A step closes over the optimizer's state buffers: after ``reset`` it must
    use the new ones."""
    x, y = _blobs(n=40)
    model = fn.Sequential([fn.Dense(4, "relu"), fn.Dense(3)], input_dim=8, seed=0)
    model.compile("softmax_cross_entropy", "adam")
    model.fit(x, y, epochs=1, batch_size=10, verbose=0)
    model.optimizer.reset()
    model.fit(x, y, epochs=1, batch_size=10, verbose=0)
    assert model.optimizer.iterations == 4
    assert np.any(model.optimizer._state_arrays()["m"] != 0)
