"""Callbacks (fastnn.callbacks) against scripted histories, called directly on a
stub model that has get_weights/set_weights/save/optimizer.lr. (fit's own
calls are tested end to end with the model.)"""

import os

import numpy as np
import pytest
from hypothesis import given, strategies as st

import fastnn as fn
from fastnn import _files
from fastnn import callbacks as C
from fastnn import model as model_module


class StubOptimizer:
    def __init__(self, lr=0.1, lr_schedule=None):
        self.lr = lr
        self.lr_schedule = lr_schedule


class StubModel:
    """Weights that mark the epoch that produced them; ``save`` writes them
    atomically (as Sequential.save), with a writer a test can break."""

    def __init__(self, lr=0.1):
        self.weights = [np.zeros((2, 3)), np.zeros(3)]
        self.stop_training = False
        self.optimizer = StubOptimizer(lr)
        self.saved = []
        self.fail_save = False

    def get_weights(self):
        return [w.copy() for w in self.weights]

    def set_weights(self, weights):
        self.weights = [np.array(w) for w in weights]

    def train_epoch(self, epoch):
        # weights no float formula would reproduce by accident
        self.weights = [np.full((2, 3), epoch + 0.1234567891), np.full(3, -epoch / 7)]

    def save(self, path):
        def write(f):
            np.savez(f, w=self.weights[0], b=self.weights[1])
            if self.fail_save:
                raise OSError(28, "No space left on device")
        _files.write_atomic(path, write)
        self.saved.append(path)


def _marker(epoch):
    m = StubModel()
    m.train_epoch(epoch)
    return m.weights


def run(callbacks, history, model=None, key="val_loss", batches=()):
    """Play a history through the callbacks as fit does; returns (model, epochs run)."""
    model = model or StubModel()
    for cb in callbacks:
        cb.set_model(model)
    for cb in callbacks:
        cb.on_train_begin({})
    epochs = 0
    logs = {}
    for epoch, value in enumerate(history):
        for cb in callbacks:
            cb.on_epoch_begin(epoch, {})
        model.train_epoch(epoch)
        for i, loss in enumerate(batches):
            for cb in callbacks:
                if model_module._overrides(cb, "on_batch_end"):
                    cb.on_batch_end(i, {"batch": i, "size": 8, "loss": loss})
            if model.stop_training:
                break
        logs = {"loss": 1.0 / (epoch + 1), key: value}
        for cb in callbacks:
            cb.on_epoch_end(epoch, logs)
        epochs += 1
        if model.stop_training:
            break
    for cb in callbacks:
        cb.on_train_end(logs)
    return model, epochs


def _assert_weights(model, epoch):
    for got, want in zip(model.weights, _marker(epoch)):
        np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------ base

def test_base_callback_does_nothing_and_batches_cost_nothing():
    cb = C.Callback()
    model, epochs = run([cb], [3.0, 2.0, 1.0], batches=[1.0])
    assert cb.model is model and epochs == 3
    # fit calls on_batch_end only on classes that define it
    overrides = {cls.__name__: model_module._overrides(cls.__new__(cls), "on_batch_end")
                 for cls in (C.Callback, C.EarlyStopping, C.ModelCheckpoint,
                             C.LearningRateScheduler, C.ReduceLROnPlateau, C.TerminateOnNaN)}
    assert overrides == {"Callback": False, "EarlyStopping": False, "ModelCheckpoint": False,
                         "LearningRateScheduler": False, "ReduceLROnPlateau": False,
                         "TerminateOnNaN": True}


# ------------------------------------------------------------ EarlyStopping

@pytest.mark.parametrize("restore", [True, False])
def test_early_stopping_stops_at_the_right_epoch_and_restores_the_best(restore):
    es = C.EarlyStopping(patience=2, restore_best_weights=restore)
    model, epochs = run([es], [1.0, 0.8, 0.85, 0.9, 0.7, 0.6])
    # best at epoch 1; epochs 2 and 3 do not improve: stop after epoch 3
    assert epochs == 4 and es.stopped_epoch == 3 and model.stop_training
    assert es.best == 0.8 and es.best_epoch == 1
    _assert_weights(model, 1 if restore else 3)


def test_early_stopping_patience_zero_min_delta_and_max_mode():
    es = C.EarlyStopping()                                  # patience 0
    _, epochs = run([es], [1.0, 0.9, 0.9, 0.5])
    assert epochs == 3 and es.stopped_epoch == 2           # 0.9 is not below 0.9
    es = C.EarlyStopping(min_delta=0.05, patience=1)
    _, epochs = run([es], [1.0, 0.95, 0.5])
    assert epochs == 2                                      # 0.95 is not below 1.0 - 0.05
    es = C.EarlyStopping(min_delta=0.05, patience=1)
    _, epochs = run([es], [1.0, 0.9499, 0.94])
    assert epochs == 3 and es.best == 0.9499                # 0.9499 is; 0.94 is not
    es = C.EarlyStopping(monitor="val_accuracy", patience=2, restore_best_weights=True)
    assert es.mode == "max"                                 # auto: "acc" in the name
    model, epochs = run([es], [0.5, 0.6, 0.6, 0.55, 0.9], key="val_accuracy")
    assert epochs == 4
    _assert_weights(model, 1)
    es = C.EarlyStopping(monitor="loss_like", mode="max", patience=1)
    _, epochs = run([es], [1.0, 2.0, 1.5], key="loss_like")
    assert epochs == 3 and es.best == 2.0


def test_early_stopping_that_never_triggers_keeps_the_last_weights():
    es = C.EarlyStopping(patience=2, restore_best_weights=True)
    model, epochs = run([es], [1.0, 0.9, 0.95, 0.8, 0.85])
    assert epochs == 5 and es.stopped_epoch == 0 and not model.stop_training
    assert es.best_epoch == 3
    _assert_weights(model, 4)                               # Keras: restores only when it stops


def test_early_stopping_nan_is_no_improvement_and_reuse_resets():
    es = C.EarlyStopping(patience=1)
    _, epochs = run([es], [1.0, float("nan"), 0.5])
    assert epochs == 2 and es.best == 1.0
    _, epochs = run([es], [5.0, 4.0, 3.0])                  # a second fit starts over
    assert epochs == 3 and es.best == 3.0 and es.stopped_epoch == 0


def test_missing_monitor_is_a_clear_error():
    for cb in (C.EarlyStopping(), C.ModelCheckpoint("/tmp/x.npz", save_best_only=True),
               C.ReduceLROnPlateau()):
        with pytest.raises(ValueError, match=r"'val_loss' is not in the epoch's logs \(val_\* "
                                             r"needs validation_data.*have: loss, val_lss"):
            run([cb], [1.0], key="val_lss")


# ------------------------------------------------------------ ModelCheckpoint

def _saved(path):
    with np.load(path) as f:
        return [f["w"], f["b"]]


def test_checkpoint_keeps_the_best_file(tmp_path):
    path = tmp_path / "best.npz"
    cp = C.ModelCheckpoint(path, save_best_only=True)
    model, _ = run([cp], [1.0, 0.8, 0.9, 0.7, 0.75])
    assert model.saved == [str(path)] * 3                   # epochs 0, 1, 3
    for got, want in zip(_saved(path), _marker(3)):
        np.testing.assert_array_equal(got, want)
    assert cp.best == 0.7 and cp.last_saved == str(path)


def test_checkpoint_every_epoch_with_format_fields(tmp_path):
    cp = C.ModelCheckpoint(str(tmp_path / "ckpt-{epoch:02d}-{val_loss:.2f}.npz"))
    run([cp], [1.0, 0.5])
    assert sorted(os.listdir(tmp_path)) == ["ckpt-01-1.00.npz", "ckpt-02-0.50.npz"]
    cp = C.ModelCheckpoint(str(tmp_path / "{val_acc}.npz"))
    with pytest.raises(ValueError, match="cannot fill in filepath"):
        run([cp], [1.0])
    cp = C.ModelCheckpoint(tmp_path / "acc.npz", monitor="val_accuracy", save_best_only=True)
    model, _ = run([cp], [0.5, 0.4, 0.7], key="val_accuracy")
    assert len(model.saved) == 2 and cp.best == 0.7


def test_a_failed_checkpoint_leaves_the_previous_one(tmp_path):
    path = tmp_path / "best.npz"
    cp = C.ModelCheckpoint(path, save_best_only=True)
    model = StubModel()
    cp.set_model(model)
    cp.on_train_begin({})
    for epoch, value in enumerate([1.0, 0.8]):
        model.train_epoch(epoch)
        cp.on_epoch_end(epoch, {"val_loss": value})
    model.train_epoch(2)
    model.fail_save = True
    with pytest.raises(OSError, match="No space"):
        cp.on_epoch_end(2, {"val_loss": 0.5})
    for got, want in zip(_saved(path), _marker(1)):
        np.testing.assert_array_equal(got, want)
    assert cp.best == 0.8                      # still the file's value: the next best retries
    assert os.listdir(tmp_path) == ["best.npz"]
    model.fail_save = False
    cp.on_epoch_end(3, {"val_loss": 0.6})      # 0.6 < 0.8: written now
    for got, want in zip(_saved(path), _marker(2)):
        np.testing.assert_array_equal(got, want)


def test_a_failed_checkpoint_of_a_real_model_leaves_the_previous_one(tmp_path, monkeypatch):
    model = fn.Sequential([fn.Dense(3)], input_dim=2, seed=0)
    model.compile("mse", fn.SGD(0.1))
    path = tmp_path / "m.npz"
    cp = C.ModelCheckpoint(path, monitor="loss", save_best_only=True)
    cp.set_model(model)
    cp.on_train_begin({})
    cp.on_epoch_end(0, {"loss": 1.0})
    first = model.get_weights()
    model.set_weights([w + 1 for w in first])

    def broken(fileobj, arrays):
        fileobj.write(b"PK\x03\x04 partial")
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(model_module, "_write_npz", broken)
    with pytest.raises(OSError, match="Input/output"):
        cp.on_epoch_end(1, {"loss": 0.5})
    for got, want in zip(fn.load_model(path).get_weights(), first):
        np.testing.assert_array_equal(got, want)
    assert os.listdir(tmp_path) == ["m.npz"]


def test_checkpoint_checks_its_folder_when_training_begins(tmp_path, monkeypatch):
    cp = C.ModelCheckpoint(tmp_path / "missing" / "m.npz")
    cp.set_model(StubModel())
    with pytest.raises(ValueError, match="ModelCheckpoint filepath.*does not exist"):
        cp.on_train_begin({})
    cp = C.ModelCheckpoint(tmp_path / "m.npz")
    cp.set_model(StubModel())

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(_files.tempfile, "mkstemp", denied)
    with pytest.raises(ValueError, match="cannot write in the folder.*Permission denied"):
        cp.on_train_begin({})


# ------------------------------------------------------------ learning rate

def test_learning_rate_scheduler_sets_the_rate_each_epoch():
    seen = []

    class Recorder(C.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(self.model.optimizer.lr)
    lrs = C.LearningRateScheduler(lambda epoch, lr: lr * 0.5 if epoch else lr)
    run([lrs, Recorder()], [1.0, 1.0, 1.0, 1.0])
    assert seen == [0.1, 0.05, 0.025, 0.0125]
    seen.clear()
    run([C.LearningRateScheduler(lambda epoch: 0.3 / (1 + epoch)), Recorder()], [1.0] * 3)
    assert seen == [0.3 / 1, 0.3 / 2, 0.3 / 3]
    # a real optimizer: lr is read and set through its property
    model = StubModel()
    model.optimizer = fn.Adam(0.01)
    run([C.LearningRateScheduler(lambda epoch, lr: lr / 10)], [1.0, 1.0], model=model)
    assert model.optimizer.lr == pytest.approx(1e-4, rel=1e-15)


@pytest.mark.parametrize("fn_,exc,match", [
    (lambda epoch, lr: -1.0, ValueError, "lr=-1.0"),
    (lambda epoch, lr: float("nan"), ValueError, "lr=nan"),
    (lambda epoch, lr: "0.1", TypeError, "must return a number"),
])
def test_learning_rate_scheduler_bad_values(fn_, exc, match):
    with pytest.raises(exc, match=match):
        run([C.LearningRateScheduler(fn_)], [1.0])


def test_rate_setters_refuse_a_scheduled_optimizer():
    model = StubModel()
    model.optimizer.lr_schedule = fn.schedules.StepDecay(0.1, 10)
    for cb in (C.LearningRateScheduler(lambda e, lr: lr), C.ReduceLROnPlateau()):
        with pytest.raises(ValueError, match="follows the schedule StepDecay"):
            run([cb], [1.0], model=model)


def _lrs_seen(cb, history, lr=0.1, key="val_loss"):
    seen = []

    class Recorder(C.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(self.model.optimizer.lr)
    run([cb, Recorder()], history, model=StubModel(lr), key=key)
    return seen


def test_reduce_lr_on_plateau_after_patience_never_below_min_lr():
    cb = C.ReduceLROnPlateau(factor=0.5, patience=2, min_lr=0.02)
    seen = _lrs_seen(cb, [1.0] * 7 + [0.5, 0.5, 0.5, 0.5])
    assert seen == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.02,
                                  0.02, 0.02, 0.02, 0.02], rel=1e-15)
    # improvements by less than min_delta (1e-4) do not count
    cb = C.ReduceLROnPlateau(patience=1)
    assert _lrs_seen(cb, [1.0, 0.99995, 0.9]) == pytest.approx([0.1, 0.01, 0.01])
    # real improvements reset the count
    cb = C.ReduceLROnPlateau(factor=0.5, patience=2)
    assert _lrs_seen(cb, [1.0, 1.0, 0.9, 0.9, 0.8, 0.8, 0.8]) == \
        pytest.approx([0.1] * 6 + [0.05])


def test_reduce_lr_on_plateau_cooldown_and_max_mode():
    cb = C.ReduceLROnPlateau(factor=0.1, patience=1, cooldown=2)
    # as Keras: reduce at epoch 1 (cooldown 2); epoch 2 decrements it to 1 and does not
    # count; epoch 3 decrements it to 0 and counts: reduce again; and so on
    assert _lrs_seen(cb, [1.0] * 6) == pytest.approx([0.1, 0.01, 0.01, 0.001, 0.001, 1e-4])
    cb = C.ReduceLROnPlateau(factor=0.1, patience=1, cooldown=3)
    assert _lrs_seen(cb, [1.0] * 6) == pytest.approx([0.1, 0.01, 0.01, 0.01, 0.001, 0.001])
    cb = C.ReduceLROnPlateau(monitor="val_accuracy", factor=0.5, patience=1)
    assert cb.mode == "max"
    assert _lrs_seen(cb, [0.5, 0.6, 0.6, 0.7], key="val_accuracy") == \
        pytest.approx([0.1, 0.1, 0.05, 0.05])


@given(st.lists(st.floats(0, 2, allow_nan=False), min_size=1, max_size=40),
       st.integers(0, 4), st.sampled_from([0.0, 0.5, 0.9]), st.integers(0, 2))
def test_reduce_lr_on_plateau_invariants(history, patience, factor, cooldown):
    min_lr = 0.003
    cb = C.ReduceLROnPlateau(factor=factor, patience=patience, min_lr=min_lr,
                             cooldown=cooldown, min_delta=0)
    seen = _lrs_seen(cb, history)
    prev, best, since = 0.1, float("inf"), 0   # since: epochs since an improvement or a change
    for lr, value in zip(seen, history):
        improved = value < best
        best = min(best, value)
        since = 0 if improved else since + 1
        assert lr >= min_lr or lr == prev == 0.1 and min_lr > prev
        if lr != prev:
            assert not improved and since >= max(patience, 1)
            assert lr == max(prev * factor, min_lr)
            since = 0
        prev = lr


# ------------------------------------------------------------ TerminateOnNaN

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_terminate_on_nan(bad):
    cb = C.TerminateOnNaN()
    model, epochs = run([cb], [1.0, 1.0], batches=[1.0, 0.5, bad, 0.1])
    assert model.stop_training and epochs == 1 and cb.stopped == (0, 2)
    cb = C.TerminateOnNaN()
    model, epochs = run([cb], [1.0, 1.0], batches=[1.0, 0.5])
    assert not model.stop_training and epochs == 2 and cb.stopped is None


# ------------------------------------------------------------ arguments

@pytest.mark.parametrize("make,exc,match", [
    (lambda: C.EarlyStopping(patience=-1), ValueError, "patience"),
    (lambda: C.EarlyStopping(patience=1.5), TypeError, "patience"),
    (lambda: C.EarlyStopping(min_delta=-0.1), ValueError, "min_delta"),
    (lambda: C.EarlyStopping(mode="lowest"), ValueError, "mode"),
    (lambda: C.EarlyStopping(monitor=3), TypeError, "monitor"),
    (lambda: C.EarlyStopping(restore_best_weights=1), TypeError, "restore_best_weights"),
    (lambda: C.ModelCheckpoint(3), TypeError, "filepath"),
    (lambda: C.ModelCheckpoint(""), ValueError, "filepath"),
    (lambda: C.ModelCheckpoint("/tmp/{epoch}/m.npz"), ValueError, "file name only"),
    (lambda: C.ModelCheckpoint("m.npz", save_best_only="yes"), TypeError, "save_best_only"),
    (lambda: C.LearningRateScheduler(0.1), TypeError, "callable"),
    (lambda: C.ReduceLROnPlateau(factor=1.0), ValueError, "factor"),
    (lambda: C.ReduceLROnPlateau(min_lr=-1), ValueError, "min_lr"),
    (lambda: C.ReduceLROnPlateau(cooldown=-1), ValueError, "cooldown"),
])
def test_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_callbacks_in_a_real_fit(tmp_path):
    """The classes work with fit's calls (the end-to-end tests are the model's)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4))
    y = (x[:, 0] > 0).astype(int)
    model = fn.Sequential([fn.Dense(8, "relu"), fn.Dense(2)], input_dim=4, seed=0)
    model.compile("softmax_cross_entropy", fn.SGD(0.05))
    es = C.EarlyStopping(monitor="val_loss", patience=1, restore_best_weights=True)
    cp = C.ModelCheckpoint(tmp_path / "best.npz", save_best_only=True)
    rl = C.ReduceLROnPlateau(monitor="loss", patience=1, factor=0.5)
    nan = C.TerminateOnNaN()
    h = model.fit(x, y, epochs=30, batch_size=16, validation_data=(x[:16], y[:16]),
                  verbose=0, callbacks=[es, cp, rl, nan])
    assert len(h.epoch) <= 30 and nan.stopped is None
    best = int(np.argmin(h.history["val_loss"]))
    assert cp.best == h.history["val_loss"][best] == es.best
    if es.stopped_epoch:
        # restored weights are the checkpoint's: both are the best epoch's
        for got, want in zip(model.get_weights(), fn.load_model(cp.last_saved).get_weights()):
            np.testing.assert_array_equal(got, want)
