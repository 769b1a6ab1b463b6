"""The layer protocol and the convolutional layers through the public API:
shapes, gradients of whole models, dropout, Keras' loss names, save/load
(format 2 and 1), and bad inputs (a clear error naming the layer, the model
unchanged)."""

import json

import numpy as np
import pytest

import fastnn as fn
from fastnn import _backend
from conftest import BACKENDS
from test_model import _finite_difference_check

CPU = ("numpy", "cython", "numba")
CPU_BACKENDS = [p for p in BACKENDS if p.values[0] in CPU]


def _images(n=12, shape=(7, 7, 2), classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.standard_normal((n,) + shape) + y[:, None, None, None] * 0.5
    return x, y


def _snapshot(model):
    opt = model.optimizer
    return (None if model.params is None else np.array(model.params),
            model._rng.bit_generator.state, model.built,
            None if opt is None else opt.iterations,
            None if opt is None or not opt._states else
            {k: np.array(v) for k, v in opt._state_arrays().items()})


def _assert_unchanged(model, snap):
    now = _snapshot(model)
    if snap[0] is None:
        assert now[0] is None
    else:
        np.testing.assert_array_equal(now[0], snap[0])
    assert now[1:4] == snap[1:4]
    if snap[4] is not None:
        for k in snap[4]:
            np.testing.assert_array_equal(now[4][k], snap[4][k])


def keras_convnet(dropout=0.5, **kw):
    return fn.Sequential([
        fn.Conv2D(32, (3, 3), activation="relu", input_shape=(28, 28, 1)),
        fn.MaxPool2D(pool_size=(2, 2)),
        fn.Conv2D(64, kernel_size=(3, 3), activation="relu"),
        fn.MaxPooling2D(pool_size=(2, 2)),
        fn.Flatten(),
        fn.Dropout(dropout),
        fn.Dense(10, activation="softmax"),
    ], **kw)


# ---------------------------------------------------------------- shapes

def test_keras_convnet_shapes_and_summary():
    model = keras_convnet(seed=0)
    assert model.built and model.input_shape == (28, 28, 1)
    shapes = [layer.output_shape for layer in model.layers]
    assert shapes == [(26, 26, 32), (13, 13, 32), (11, 11, 64), (5, 5, 64), (1600,), (1600,),
                      (10,)]
    # Keras' summary of the same network: 320, 18,496, 16,010 = 34,826 parameters
    assert model.param_count == 34826 == model.params.size
    text = model.summary(print_fn=None)
    for row in ("conv2d (Conv2D)", "(None, 26, 26, 32)", "320", "max_pooling2d (MaxPool2D)",
                "conv2d_1 (Conv2D)", "18,496", "flatten (Flatten)", "(None, 1600)",
                "dropout (Dropout)", "dense (Dense)", "16,010", "Total params: 34,826"):
        assert row in text, row
    w, b = model.layers[0].w, model.layers[0].b
    assert w.shape == (3, 3, 1, 32) and b.shape == (32,)
    assert np.shares_memory(w, model.params)


@pytest.mark.parametrize("size,k,stride,padding,out", [
    (28, 3, 1, "valid", 26), (28, 3, 1, "same", 28), (28, 3, 2, "same", 14),
    (7, 3, 2, "same", 4), (7, 2, 2, "valid", 3), (5, 5, 1, "valid", 1), (5, 5, 3, "same", 2),
    (4, 4, 2, "same", 2),
])
def test_conv_output_sizes_as_keras(size, k, stride, padding, out):
    layer = fn.Conv2D(2, k, strides=stride, padding=padding)
    assert layer.compute_output_shape((size, size + 1, 3))[0] == out
    model = fn.Sequential([layer], input_shape=(size, size + 1, 3), seed=0)
    assert model.output_shape[0] == out
    top, bottom, _, _ = layer.pads
    assert bottom - top in (0, 1)  # the extra pad goes to the bottom/right


def test_int_and_pair_arguments_agree():
    a = fn.Conv2D(4, 3, strides=2)
    b = fn.Conv2D(4, (3, 3), strides=(2, 2))
    assert a.get_config() == b.get_config()
    assert fn.MaxPool2D(3).strides == (3, 3) and fn.MaxPool2D(3, strides=1).strides == (1, 1)
    assert fn.MaxPooling2D is fn.MaxPool2D


def test_initialisation_fan_in_of_a_kernel():
    model = fn.Sequential([fn.Conv2D(64, 5, activation="relu"), fn.Conv2D(48, 3, "tanh")],
                          input_shape=(40, 40, 16), dtype="float64", seed=0)
    w1, w2 = model.layers[0].w, model.layers[1].w
    fan_in = 5 * 5 * 16
    assert abs(w1.std() - np.sqrt(2 / fan_in)) < 0.03 * np.sqrt(2 / fan_in)
    limit = np.sqrt(6 / (3 * 3 * 64 + 3 * 3 * 48))
    assert np.abs(w2).max() <= limit and np.abs(w2).max() > 0.98 * limit
    assert not model.layers[0].b.any()


# ---------------------------------------------------------------- gradients

def _fixed_dropout_seed(model, seed=12345):
    """Dropout seeds drawn from a constant, so central differences see one mask."""
    model._seeds = lambda: (lambda: seed)


SMALL_CONVNETS = {
    "keras-like": lambda: [fn.Conv2D(3, 3, activation="relu", padding="same"),
                           fn.MaxPool2D(2), fn.Conv2D(4, 2, activation="tanh"),
                           fn.Flatten(), fn.Dropout(0.3), fn.Dense(3)],
    "strided-gelu": lambda: [fn.Conv2D(3, (3, 2), strides=(2, 1), activation="gelu",
                                       padding="same"),
                             fn.MaxPool2D((2, 2), strides=1), fn.Flatten(),
                             fn.Dense(5, "silu"), fn.Dropout(0.2), fn.Dense(3)],
    "seed-003": lambda: [fn.Conv2D(4, 3, activation="relu"), fn.Flatten(),
                         fn.Dense(3, "softmax")],
    "pool-first": lambda: [fn.MaxPool2D(2, strides=1), fn.Conv2D(2, 2, "leaky_relu"),
                           fn.Flatten(), fn.Dense(3)],
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("net", list(SMALL_CONVNETS))
def test_convnet_gradient_finite_differences(backend, net):
    """Whole-model backward pass of small convnets (float64) against central
    differences of the model's own forward pass, through fit's buffers."""
    x, y = _images(n=5)
    loss = "sparse_categorical_crossentropy" if net == "seed-003" else "softmax_cross_entropy"
    with fn.use_backend(backend):
        model = fn.Sequential(SMALL_CONVNETS[net](), input_shape=(7, 7, 2), dtype="float64",
                              seed=1)
        model.compile(loss, fn.SGD(0.1))
        _fixed_dropout_seed(model)
        _finite_difference_check(model, x, y)


@pytest.mark.parametrize("loss,top,y", [
    ("mse", fn.Dense(2, "sigmoid"), np.random.default_rng(0).random((5, 2))),
    ("binary_crossentropy", fn.Dense(1, "sigmoid"), np.arange(5) % 2),
])
def test_convnet_gradient_other_losses(loss, top, y):
    x, _ = _images(n=5)
    model = fn.Sequential([fn.Conv2D(2, 3, "softplus"), fn.Flatten(), top],
                          input_shape=(7, 7, 2), dtype="float64", seed=2)
    model.compile(loss, "sgd")
    _finite_difference_check(model, x, y)


# ---------------------------------------------------------------- training

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_small_convnet_learns(backend, dtype):
    x, y = _images(n=96, seed=3)
    with fn.use_backend(backend):
        model = fn.Sequential([fn.Conv2D(8, 3, "relu", padding="same"), fn.MaxPool2D(2),
                               fn.Flatten(), fn.Dropout(0.25), fn.Dense(3)],
                              input_shape=(7, 7, 2), dtype=dtype, seed=0)
        model.compile("softmax_cross_entropy", fn.Adam(1e-2))
        before = model.evaluate(x, y)["loss"]
        h = model.fit(x, y, epochs=8, batch_size=16, verbose=0, validation_split=0.25)
        after = model.evaluate(x, y)
    assert after["loss"] < 0.6 * before
    assert h.history["val_accuracy"][-1] > 0.5
    assert model.params.dtype == np.dtype(dtype)


def test_fit_on_images_short_last_batch_and_every_backend_agrees():
    """One epoch of a convnet with dropout on each CPU backend, 10 rows in
    batches of 4, 4, 2: the same parameters to rounding (the same dropout masks,
    the same shuffling)."""
    x, y = _images(n=10)
    results = {}
    for name in CPU:
        if not fn.backends()[name].available:
            continue
        with fn.use_backend(name):
            model = fn.Sequential([fn.Conv2D(3, 3, "relu"), fn.MaxPool2D(2), fn.Flatten(),
                                   fn.Dropout(0.5), fn.Dense(3)], input_shape=(7, 7, 2),
                                  dtype="float64", seed=4)
            model.compile("softmax_cross_entropy", fn.SGD(0.1, momentum=0.9))
            model.fit(x, y, epochs=2, batch_size=4, verbose=0)
            results[name] = model.params.copy()
    for name, params in results.items():
        np.testing.assert_allclose(params, results["numpy"], rtol=1e-11, atol=1e-12,
                                   err_msg=name)


def test_dropout_only_in_fit():
    x, y = _images(n=20)
    model = fn.Sequential([fn.Flatten(), fn.Dense(16, "relu"), fn.Dropout(0.5), fn.Dense(3)],
                          input_shape=(7, 7, 2), dtype="float64", seed=0)
    same = fn.Sequential([fn.Flatten(), fn.Dense(16, "relu"), fn.Dense(3)],
                         input_shape=(7, 7, 2), dtype="float64", seed=0)
    same.set_weights(model.get_weights())
    np.testing.assert_array_equal(model.predict(x), same.predict(x))
    np.testing.assert_array_equal(model.predict(x), model.predict(x))
    model.compile("softmax_cross_entropy", fn.SGD(0.0))   # lr 0: the weights stay
    same.compile("softmax_cross_entropy", fn.SGD(0.0))
    assert model.evaluate(x, y) == same.evaluate(x, y)
    # in training, the dropout draws a mask: the loss differs from the plain network
    h_drop = model.fit(x, y, epochs=1, batch_size=20, shuffle=False, verbose=0)
    h_same = same.fit(x, y, epochs=1, batch_size=20, shuffle=False, verbose=0)
    assert h_drop.history["loss"][0] != h_same.history["loss"][0]
    # a new mask every step: two steps on the same batch give different losses
    l1 = model._loss_and_grad(x, y)
    l2 = model._loss_and_grad(x, y)
    assert l1 != l2


def test_dropout_gradient_uses_the_forward_mask():
    """The mask of the backward pass is the forward pass's: a dropped unit gets
    no gradient in the layer below."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5))
    model = fn.Sequential([fn.Dense(40), fn.Dropout(0.5), fn.Dense(1)], input_dim=5,
                          dtype="float64", seed=0)
    model.compile("mse", "sgd")
    _fixed_dropout_seed(model, 99)
    model._loss_and_grad(x, rng.standard_normal((6, 1)))
    dw1 = model._grad_views[0][0]
    kept = np.empty((6, 40))
    fn.ops.dropout_forward(np.ones((6, 40)), 0.5, 99, kept)
    dropped_everywhere = ~kept.astype(bool).any(axis=0)
    assert dropped_everywhere.any()
    assert not dw1[:, dropped_everywhere].any()
    assert dw1[:, ~dropped_everywhere].all()


# ---------------------------------------------------------------- Keras' loss names

def test_softmax_layer_with_keras_loss_equals_logits_with_fused_loss():
    x, y = _images(n=40)
    runs = []
    for top, loss in ((fn.Dense(3, "softmax"), "sparse_categorical_crossentropy"),
                      (fn.Dense(3), "softmax_cross_entropy")):
        model = fn.Sequential([fn.Conv2D(2, 3, "relu"), fn.Flatten(), top],
                              input_shape=(7, 7, 2), dtype="float64", seed=5)
        model.compile(loss, "adam", metrics=["accuracy"])
        h = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
        h.history.pop("samples_per_s"), h.history.pop("step_samples_per_s")
        runs.append((model.params.copy(), h.history, model.predict(x)))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    np.testing.assert_array_equal(runs[0][2], runs[1][2])
    np.testing.assert_allclose(runs[0][2].sum(1), 1, rtol=1e-12)


def test_sigmoid_layer_with_keras_loss_equals_logit_with_fused_loss():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 4))
    y = (x[:, 0] > 0).astype(int)
    runs = []
    for top, loss in ((fn.Dense(1, "sigmoid"), "binary_crossentropy"),
                      (fn.Dense(1), "sigmoid_binary_cross_entropy")):
        model = fn.Sequential([fn.Dense(6, "tanh"), top], input_dim=4, dtype="float64", seed=2)
        model.compile(loss, "adam")
        model.fit(x, y, epochs=2, batch_size=8, verbose=0)
        runs.append((model.params.copy(), model.predict(x)))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert np.all((runs[0][1] > 0) & (runs[0][1] < 1))


def test_softmax_last_layer_before_compile_predicts_probabilities():
    x, _ = _images(n=4)
    model = fn.Sequential([fn.Flatten(), fn.Dense(5, "softmax")], input_shape=(7, 7, 2),
                          dtype="float64", seed=0)
    p = model.predict(x)
    logits = x.reshape(4, -1) @ model.layers[1].w + model.layers[1].b
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(p, e / e.sum(1, keepdims=True), rtol=1e-12)


@pytest.mark.parametrize("layers,loss,match", [
    (lambda: [fn.Dense(1, "sigmoid")], "sigmoid_binary_cross_entropy", "binary_crossentropy"),
    (lambda: [fn.Dense(1, "sigmoid")], "bce", "binary_crossentropy"),
    (lambda: [fn.Dense(3, "softmax")], "softmax_cross_entropy",
     "sparse_categorical_crossentropy"),
    (lambda: [fn.Dense(3, "softmax")], "mse", "sparse_categorical_crossentropy"),
    (lambda: [fn.Dense(3, "softmax"), fn.Dense(3)], "softmax_cross_entropy", "last layer"),
])
def test_output_function_applied_twice_is_refused(layers, loss, match):
    with pytest.raises(ValueError, match=match):
        model = fn.Sequential(layers(), input_dim=4, seed=0)
        model.compile(loss, "adam")


# ---------------------------------------------------------------- bad inputs

BAD_MODELS = [
    (lambda: fn.Sequential([fn.Conv2D(4, 3)], input_shape=(784,)), "conv2d \\(Conv2D\\).*image"),
    (lambda: fn.Sequential([fn.MaxPool2D(5)], input_shape=(4, 8, 1)),
     "max_pooling2d \\(MaxPool2D\\).*larger"),
    (lambda: fn.Sequential([fn.Conv2D(4, 3), fn.Dense(3)], input_shape=(8, 8, 1)),
     "dense \\(Dense\\).*Flatten"),
    (lambda: fn.Sequential([fn.Conv2D(4, 9)], input_shape=(8, 8, 1)), "conv2d.*larger"),
    (lambda: fn.Sequential([fn.Conv2D(4, 3, input_shape=(8, 8, 1)), fn.Flatten(),
                            fn.Dense(2, input_shape=(10,))]), "dense.*input_shape"),
    (lambda: fn.Dropout(1.0), "rate"),
    (lambda: fn.Dropout(-0.1), "rate"),
    (lambda: fn.Conv2D(4, 0), "kernel_size"),
    (lambda: fn.Conv2D(4, 3, padding="full"), "padding"),
    (lambda: fn.Conv2D(0, 3), "filters"),
    (lambda: fn.MaxPool2D((2, 2, 2)), "pool_size"),
    (lambda: fn.Conv2D(4, 3, activation="softmax"), "activation"),
]


@pytest.mark.parametrize("make,match", BAD_MODELS)
def test_bad_layers_are_clear_errors(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make()


def test_layers_of_a_refused_model_stay_free():
    conv = fn.Conv2D(4, 3)
    with pytest.raises(ValueError, match="image"):
        fn.Sequential([conv], input_shape=(10,))
    fn.Sequential([conv], input_shape=(5, 5, 1))   # not owned by the refused model


def _convnet_model():
    model = fn.Sequential([fn.Conv2D(3, 3, "relu"), fn.MaxPool2D(2), fn.Flatten(),
                           fn.Dropout(0.5), fn.Dense(3)], input_shape=(7, 7, 2), seed=0)
    model.compile("softmax_cross_entropy", "adam")
    x, y = _images(n=10)
    model.fit(x, y, epochs=1, verbose=0)
    return model, x, y


@pytest.mark.parametrize("call,exc,match", [
    (lambda m, x, y: m.fit(x.reshape(10, -1), y), ValueError, r"\(n, 7, 7, 2\).*reshape"),
    (lambda m, x, y: m.fit(x[..., :1], y), ValueError, r"\(n, 7, 7, 2\)"),
    (lambda m, x, y: m.fit(x[:, :, :, 0], y), ValueError, r"\(n, 7, 7, 2\)"),
    (lambda m, x, y: m.predict(x.reshape(10, -1)), ValueError, "reshape"),
    (lambda m, x, y: m.evaluate(x[:, :6], y), ValueError, r"\(n, 7, 7, 2\)"),
    (lambda m, x, y: m.fit(x, y, validation_data=(x[:, :6], y)), ValueError,
     "validation_data"),
    (lambda m, x, y: m.fit(x, y + 3), ValueError, r"\[0, 3\)"),
])
def test_bad_inputs_to_a_convnet_change_nothing(call, exc, match):
    model, x, y = _convnet_model()
    snap = _snapshot(model)
    with pytest.raises(exc, match=match):
        call(model, x, y)
    _assert_unchanged(model, snap)


# ---------------------------------------------------------------- issue 13: model state

def test_add_after_compile_is_checked_again_by_fit():
    """Item 4: Dense(3) compiled with softmax CE, then add(Dense(1)): fit refuses
    instead of training a 1-unit softmax (loss 0, no gradient)."""
    x = np.random.default_rng(0).random((20, 4))
    y = np.arange(20) % 3
    model = fn.Sequential([fn.Dense(3)], seed=0)
    model.compile("softmax_cross_entropy", "adam")
    model.add(fn.Dense(1))
    snap = _snapshot(model)
    for call in (lambda: model.fit(x, y, verbose=0), lambda: model.predict(x)):
        with pytest.raises(ValueError, match="at least 2 units"):
            call()
        _assert_unchanged(model, snap)
    assert not model.built


def test_fit_checks_validation_data_before_training_an_unbuilt_model():
    """Item 5: validation_data one feature too narrow on a model without input_dim."""
    x = np.random.default_rng(0).random((20, 4))
    y = np.arange(20) % 3
    model = fn.Sequential([fn.Dense(5, "relu"), fn.Dense(3)], seed=0)
    model.compile("softmax_cross_entropy", "adam")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="validation_data\\[0\\].*4 features"):
        model.fit(x, y, epochs=3, validation_data=(x[:, :3], y), verbose=0)
    _assert_unchanged(model, snap)
    assert not model.built and model.optimizer.iterations == 0
    model.fit(x, y, epochs=1, validation_data=(x, y), verbose=0)


def test_predict_on_an_empty_model():
    """Item 6: a clear ValueError; layers can still be added."""
    model = fn.Sequential(seed=0)
    for call in (lambda: model.predict(np.zeros((2, 3))),
                 lambda: model.compile("mse"),
                 lambda: model.summary(print_fn=None) and model.fit(np.zeros((2, 3)),
                                                                      np.zeros((2, 1)))):
        with pytest.raises((ValueError, RuntimeError)):
            call()
    assert not model.built
    model.add(fn.Dense(2))
    assert model.predict(np.zeros((2, 3))).shape == (2, 2)


def test_model_with_no_parameters_cannot_train():
    model = fn.Sequential([fn.MaxPool2D(2)], input_shape=(4, 4, 1))
    with pytest.raises(ValueError, match="flat output"):
        model.compile("mse")
    model = fn.Sequential([fn.Flatten()], input_shape=(3, 1, 1))
    model.compile("mse")
    with pytest.raises(ValueError, match="parameters"):
        model.fit(np.zeros((4, 3, 1, 1)), np.zeros((4, 3)), verbose=0)


# ---------------------------------------------------------------- save / load

def test_save_load_every_layer_and_resume(tmp_path):
    x, y = _images(n=24)
    model = fn.Sequential([fn.Conv2D(3, (3, 2), strides=(1, 2), padding="same",
                                     activation="gelu", input_shape=(7, 7, 2)),
                           fn.MaxPooling2D(2, strides=1), fn.Flatten(), fn.Dropout(0.4),
                           fn.Dense(3, "softmax")], dtype="float64", seed=3)
    model.compile("sparse_categorical_crossentropy", fn.AdamW(1e-2))
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    path = tmp_path / "cnn.npz"
    model.save(path)
    loaded = fn.load_model(path)
    assert loaded.get_config() == model.get_config()
    assert [type(a) for a in loaded.layers] == [type(a) for a in model.layers]
    assert loaded.get_config()["version"] == 2
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    h1 = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    h2 = loaded.fit(x, y, epochs=2, batch_size=8, verbose=0)
    np.testing.assert_array_equal(loaded.params, model.params)   # same masks, same shuffle
    assert h1.history["loss"] == h2.history["loss"]
    assert h1.history["accuracy"] == h2.history["accuracy"]


def _v1_file(tmp_path, model):
    """A file as format version 1 wrote it (Dense only, input_dim)."""
    path = tmp_path / "v2.npz"
    model.save(path)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    config = json.loads(str(arrays["config"]))
    config["version"] = 1
    config["input_dim"] = config.pop("input_shape")[0]
    for layer in config["layers"]:
        layer.pop("input_shape", None)
    config["layers"] = [{"class_name": "Dense", "units": lc["units"],
                         "activation": lc["activation"], "name": None}
                        for lc in config["layers"]]
    arrays["config"] = np.array(json.dumps(config))
    out = tmp_path / "v1.npz"
    np.savez(out, **arrays)
    return out, arrays


def test_version_1_files_still_load(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 5))
    y = np.arange(12) % 3
    model = fn.Sequential([fn.Dense(4, "relu"), fn.Dense(3)], input_dim=5, seed=0)
    model.compile("softmax_cross_entropy", "adam")
    model.fit(x, y, epochs=1, verbose=0)
    path, _ = _v1_file(tmp_path, model)
    loaded = fn.load_model(path)
    assert loaded.input_shape == (5,) and loaded.input_dim == 5
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    assert loaded.optimizer.iterations == model.optimizer.iterations


@pytest.mark.parametrize("edit,version", [
    (lambda c: c.update(input_dim=None), 1),          # AttributeError before the fix
    (lambda c: c.update(layers=[5]), 1),
    (lambda c: c.update(input_dim=10 ** 12), 1),      # MemoryError (21.8 TiB) before the fix
    (lambda c: c.update(input_dim="784"), 1),
    (lambda c: c.update(input_shape=[10 ** 12]), 2),
    (lambda c: c.update(input_shape=[3, -1]), 2),
    (lambda c: c.update(input_shape="big"), 2),
    (lambda c: c["layers"][0].update(units="many"), 2),
    (lambda c: c["layers"][0].update(units=10 ** 15), 2),
    (lambda c: c["layers"][0].update(kernel=3), 2),
    (lambda c: c["layers"][0].update(class_name="Conv2D"), 2),
    (lambda c: c["layers"][1].update(class_name="Softmax"), 2),
    (lambda c: c.update(layers={"a": 1}), 2),
    (lambda c: c.update(dtype="int8"), 2),
    (lambda c: c.update(dtype=None), 2),
    (lambda c: c.update(rng=[]), 2),
    (lambda c: c.update(compile={"loss": 3}), 2),
    (lambda c: c.update(compile=[]), 2),
    (lambda c: c["compile"].update(optimizer_step=-1), 2),
    (lambda c: c["compile"].update(optimizer_state="m"), 2),
    (lambda c: c.update(version=3), 2),
])
def test_edited_files_are_value_errors(tmp_path, edit, version):
    """Item 7: every malformed file is a ValueError; sizes are compared with the
    stored arrays before anything is allocated."""
    rng = np.random.default_rng(0)
    model = fn.Sequential([fn.Dense(4, "relu"), fn.Dense(3)], input_dim=5, seed=0)
    model.compile("softmax_cross_entropy", "adam")
    model.fit(rng.standard_normal((8, 5)), np.arange(8) % 3, epochs=1, verbose=0)
    if version == 1:
        path, arrays = _v1_file(tmp_path, model)
    else:
        path = tmp_path / "m.npz"
        model.save(path)
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    config = json.loads(str(arrays["config"]))
    edit(config)
    arrays["config"] = np.array(json.dumps(config))
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="fastnn model file"):
        fn.load_model(path)


def test_saved_file_mode_follows_the_umask(tmp_path):
    """Item 9: mkstemp makes 0600 files; a saved model gets what a new file gets."""
    import os

    model = fn.Sequential([fn.Dense(2)], input_dim=3, seed=0)
    for mask in (0o022, 0o077, 0o002):
        old = os.umask(mask)
        try:
            model.save(tmp_path / "m.npz")
            np.save(tmp_path / "plain.npy", np.zeros(2))
        finally:
            os.umask(old)
        mode = (tmp_path / "m.npz").stat().st_mode & 0o777
        assert mode == (tmp_path / "plain.npy").stat().st_mode & 0o777 == 0o666 & ~mask
        (tmp_path / "m.npz").unlink()
        (tmp_path / "plain.npy").unlink()


# ---------------------------------------------------------------- issue 13: backend switches

def _count_calls(monkeypatch, backend, names=("dense_forward", "dense_backward",
                                              "softmax_cross_entropy", "adam_step")):
    be = _backend.load(backend)
    counts = {n: 0 for n in names}
    for name in names:
        original = getattr(be, name)

        def counting(*a, _n=name, _o=original, **k):
            counts[_n] += 1
            return _o(*a, **k)
        monkeypatch.setattr(be, name, counting)
    return counts


@pytest.mark.parametrize("other", [p for p in CPU_BACKENDS if p.values[0] != "numpy"])
@pytest.mark.parametrize("how", ["set_backend", "use_backend"])
def test_backend_switch_between_fits_is_followed(monkeypatch, other, how):
    """Item 2: the step built under numpy must not keep calling numpy's kernels
    after a switch (also for the short last batch and for evaluate/predict)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((22, 6))
    y = np.arange(22) % 3
    fn.set_backend("numpy")
    model = fn.Sequential([fn.Dense(5, "relu"), fn.Dense(3)], input_dim=6, seed=0)
    model.compile("softmax_cross_entropy", "adam")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    numpy_calls = _count_calls(monkeypatch, "numpy")
    other_calls = _count_calls(monkeypatch, other)
    if how == "set_backend":
        fn.set_backend(other)
        h = model.fit(x, y, epochs=3, batch_size=8, verbose=0)
        model.evaluate(x, y)
        model.predict(x)
    else:
        with fn.use_backend(other):
            h = model.fit(x, y, epochs=3, batch_size=8, verbose=0)
            model.evaluate(x, y)
            model.predict(x)
    assert h.params["backend"] == other
    assert not any(numpy_calls.values()), numpy_calls
    # 3 epochs of 3 steps (8, 8, 6 rows): every step on the new backend
    assert other_calls["adam_step"] == 9
    assert other_calls["dense_backward"] == 2 * 9
    assert other_calls["dense_forward"] >= 2 * 9 + 2 * 2


SWITCH_SCRIPT = r"""
import sys, numpy as np, fastnn as fn
other = sys.argv[1]
rng = np.random.default_rng(0)
x = rng.standard_normal((40, 6)); y = np.arange(40) % 3
def make():
    m = fn.Sequential([fn.Dense(5, "tanh"), fn.Dense(3)], input_dim=6, seed=0, dtype="float32")
    m.compile("softmax_cross_entropy", "adam")
    return m
fn.set_backend("numpy")
a, b = make(), make()
a.fit(x, y, epochs=1, batch_size=16, verbose=0)
b.fit(x, y, epochs=1, batch_size=16, verbose=0)
fn.set_backend(other)
h = a.fit(x, y, epochs=3, batch_size=16, verbose=0)
fn.set_backend("numpy")
b.fit(x, y, epochs=3, batch_size=16, verbose=0)
# a was trained on `other` for 3 epochs, b on numpy: float32 rounding differs
assert h.params["backend"] == other
print("DIFFERENT" if not np.array_equal(a.params, b.params) else "EQUAL")
"""


@pytest.mark.parametrize("other", [p for p in CPU_BACKENDS if p.values[0] != "numpy"])
def test_backend_switch_in_a_fresh_process(other):
    """Item 2 as it was found: after set_backend, the second fit's parameters
    are no longer bit for bit numpy's."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", SWITCH_SCRIPT, other], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("DIFFERENT")
