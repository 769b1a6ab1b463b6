"""Callbacks and the data checks inside ``fit`` (end to end; the callbacks'
own logic is tested on scripted histories in test_callbacks.py)."""

import numpy as np
import pytest

import fastnn as fn
from fastnn.callbacks import (Callback, EarlyStopping, LearningRateScheduler, ModelCheckpoint,
                              ReduceLROnPlateau, TerminateOnNaN)


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6))
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0)
    return x, y


def _model(lr=0.05, opt=None):
    model = fn.Sequential([fn.Dense(8, "relu"), fn.Dense(3)], input_dim=6, dtype="float64",
                          seed=0)
    model.compile("softmax_cross_entropy", opt or fn.SGD(lr))
    return model


class Recorder(Callback):
    def __init__(self):
        super().__init__()
        self.calls = []

    def on_train_begin(self, logs=None):
        self.calls.append(("train_begin",))

    def on_epoch_begin(self, epoch, logs=None):
        self.calls.append(("epoch_begin", epoch))

    def on_epoch_end(self, epoch, logs=None):
        self.calls.append(("epoch_end", epoch, sorted(logs)))

    def on_train_end(self, logs=None):
        self.calls.append(("train_end", sorted(logs)))


class BatchCounter(Callback):
    def __init__(self, stop_at=None):
        super().__init__()
        self.batches = []
        self.stop_at = stop_at

    def on_batch_end(self, batch, logs=None):
        self.batches.append((batch, logs["size"]))
        if self.stop_at is not None and len(self.batches) == self.stop_at:
            self.model.stop_training = True


def test_hooks_in_order_and_batch_hook_only_when_defined():
    x, y = _data(n=50)
    rec, count = Recorder(), BatchCounter()
    _model().fit(x, y, epochs=2, batch_size=16, validation_data=(x, y), verbose=0,
                 callbacks=[rec, count])
    keys = sorted(["loss", "accuracy", "val_loss", "val_accuracy", "samples_per_s",
                   "step_samples_per_s", "lr"])
    assert rec.calls == [("train_begin",), ("epoch_begin", 0), ("epoch_end", 0, keys),
                         ("epoch_begin", 1), ("epoch_end", 1, keys), ("train_end", keys)]
    assert count.batches == [(0, 16), (1, 16), (2, 16), (3, 2)] * 2
    assert rec.model is not None and count.model is not None


def test_stop_training_from_a_batch_hook():
    x, y = _data(n=64)
    model = _model()
    h = model.fit(x, y, epochs=5, batch_size=16, verbose=0, callbacks=[BatchCounter(stop_at=6)])
    assert len(h.epoch) == 2 and model.optimizer.iterations == 6


def test_early_stopping_restores_the_best_weights_exactly():
    """lr 0 after the first epochs: val_loss stops improving, fit ends after
    `patience` more epochs and the best epoch's weights come back bit for bit."""
    x, y = _data()
    model = _model(lr=0.1)
    saved = {}

    class Snapshot(Callback):
        def on_epoch_end(self, epoch, logs=None):
            saved[epoch] = (logs["val_loss"], model.params.copy())
            if epoch == 2:      # from now on nothing improves
                model.optimizer.lr = 0.0

    stop = EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    h = model.fit(x, y, epochs=20, batch_size=16, validation_data=(x, y), verbose=0,
                  callbacks=[Snapshot(), stop])
    best = min(saved, key=lambda e: saved[e][0])    # the first of equal values
    assert best <= 2
    assert h.epoch == list(range(best + 3))         # Keras: 2 epochs without improvement
    np.testing.assert_array_equal(model.params, saved[best][1])


def test_model_checkpoint_keeps_the_best_and_schedulers_change_the_rate(tmp_path):
    x, y = _data()
    model = _model(lr=0.1)
    path = tmp_path / "best.npz"
    rates = []

    class Rates(Callback):
        def on_epoch_begin(self, epoch, logs=None):
            rates.append(model.optimizer.lr)

    h = model.fit(x, y, epochs=4, batch_size=16, validation_data=(x, y), verbose=0,
                  callbacks=[LearningRateScheduler(lambda epoch, lr: 0.1 * 0.5 ** epoch), Rates(),
                             ModelCheckpoint(str(path), save_best_only=True)])
    assert rates == [0.1, 0.05, 0.025, 0.0125]
    assert h.history["lr"] == rates
    best = int(np.argmin(h.history["val_loss"]))
    assert fn.load_model(path).evaluate(x, y)["loss"] == pytest.approx(
        h.history["val_loss"][best], rel=1e-12)


def test_reduce_lr_on_plateau_in_fit():
    x, y = _data()
    model = _model(lr=0.0)      # nothing improves: the rate is cut after each patience
    model.optimizer.lr = 0.0
    plateau = ReduceLROnPlateau(monitor="loss", factor=0.5, patience=1, min_lr=0.0)
    model.optimizer.lr = 1e-9
    h = model.fit(x, y, epochs=5, batch_size=16, verbose=0, callbacks=[plateau])
    assert h.history["lr"][-1] < 1e-9


def test_terminate_on_nan():
    x, y = _data()
    model = _model(lr=1e300)
    h = model.fit(x, y, epochs=5, batch_size=16, verbose=0, callbacks=[TerminateOnNaN()],
                  check_finite=True)
    assert len(h.epoch) == 1
    assert not np.isfinite(h.history["loss"][0])


def test_schedule_as_lr_in_fit():
    x, y = _data()
    opt = fn.SGD(fn.schedules.StepDecay(0.1, step_size=4, gamma=0.5))
    model = _model(opt=opt)
    h = model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert opt.iterations == 8
    assert h.history["lr"] == [0.05, 0.025]


@pytest.mark.parametrize("where", ["x", "y", "validation_data[0]"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_data_is_refused_naming_the_row(where, bad):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 4))
    t = rng.standard_normal((30, 2))
    model = fn.Sequential([fn.Dense(2)], input_dim=4, dtype="float64", seed=0)
    model.compile("mse", "sgd")
    before = model.params.copy()
    xv = x.copy()
    if where == "x":
        x[17, 2] = bad
    elif where == "y":
        t[17, 1] = bad
    else:
        xv[17, 0] = bad
    with pytest.raises(ValueError, match=f"{where.replace('[', '.').replace(']', '.')} holds "
                                         f"NaN or inf, first in row 17"):
        model.fit(x, t, epochs=1, verbose=0, validation_data=(xv, t))
    np.testing.assert_array_equal(model.params, before)
    assert model.optimizer.iterations == 0
    if where != "validation_data[0]":
        model.fit(x, t, epochs=1, verbose=0, check_finite=False)   # the caller's choice
        assert not np.isfinite(model.params).all()


def test_bad_callbacks_argument():
    x, y = _data()
    model = _model()
    with pytest.raises(TypeError, match="callbacks\\[1\\]"):
        model.fit(x, y, callbacks=[Recorder(), object()], verbose=0)
    with pytest.raises(TypeError, match="callbacks"):
        model.fit(x, y, callbacks=Recorder(), verbose=0)
    assert model.optimizer.iterations == 0
