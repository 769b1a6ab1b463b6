"""Callbacks for ``Sequential.fit(..., callbacks=[...])``, with Keras' names and meanings.

``fit`` calls, on every callback, ``set_model(model)``, then
``on_train_begin(logs)``, per epoch ``on_epoch_begin(epoch, logs)`` and
``on_epoch_end(epoch, logs)`` (``logs``: the epoch's record, ``loss``,
``accuracy``, ``val_loss``, ``val_accuracy`` as the history has them), and
``on_train_end(logs)``. ``on_batch_end(batch, logs)`` (``logs``: ``batch``,
``size``, ``loss``) is called only on callbacks whose class defines it, so a
training step pays nothing for the others. Setting ``model.stop_training =
True`` ends training after the current batch or epoch.

A monitored quantity (``monitor``) is a key of the epoch's logs; ``mode``
``"min"`` wants it lower, ``"max"`` higher, ``"auto"`` is ``"max"`` for a
name containing ``acc`` and ``"min"`` otherwise. A value improves on the best
one when ``value < best - min_delta`` (``"min"``) or ``value > best +
min_delta`` (``"max"``). A monitored key missing from the logs (``val_loss``
without validation data) is a ``ValueError`` at the end of the first epoch,
naming the keys there are.

>>> import numpy as np, fastnn as fn
>>> model = fn.Sequential([fn.Dense(3)], input_dim=2, seed=0)
>>> model.compile("softmax_cross_entropy", fn.SGD(0.1))
>>> x, y = np.random.default_rng(0).random((40, 2)), np.arange(40) % 3
>>> stop = fn.callbacks.EarlyStopping(monitor="loss", patience=2)
>>> h = model.fit(x, y, epochs=3, verbose=0, callbacks=[stop])
"""

import math
import numbers
import os
import sys

from . import _files, _validate

__all__ = ["Callback", "EarlyStopping", "ModelCheckpoint", "LearningRateScheduler",
           "ReduceLROnPlateau", "TerminateOnNaN"]


class Callback:
    """Base class: every hook does nothing. Subclass it and define the hooks
    you need; ``self.model`` is the model being trained."""

    def __init__(self):
        self.model = None

    def set_model(self, model):
        """Called by ``fit`` before training."""
        self.model = model

    def on_train_begin(self, logs=None):
        """Before the first epoch."""

    def on_train_end(self, logs=None):
        """After the last epoch (``logs``: the last value of each history key)."""

    def on_epoch_begin(self, epoch, logs=None):
        """Before epoch ``epoch`` (0-based)."""

    def on_epoch_end(self, epoch, logs=None):
        """After epoch ``epoch`` and its validation (``logs``: its record)."""

    def on_batch_end(self, batch, logs=None):
        """After each training step (only called on classes that define it)."""


# ------------------------------------------------------------ helpers

def _monitor_args(monitor, mode, min_delta):
    if not isinstance(monitor, str) or not monitor:
        raise TypeError(f"monitor must be the name of a logged quantity (str), got {monitor!r}")
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
    if mode == "auto":
        mode = "max" if "acc" in monitor else "min"
    min_delta = _validate.real("min_delta", min_delta, low=0)
    return monitor, mode, min_delta


def _improves(mode, value, best, min_delta):
    """``value < best - min_delta`` (min) or ``value > best + min_delta`` (max);
    False for NaN."""
    if mode == "min":
        return value < best - min_delta
    return value > best + min_delta


def _value(who, monitor, logs):
    logs = logs or {}
    if monitor not in logs:
        have = ", ".join(sorted(k for k in logs if isinstance(logs[k], numbers.Real))) or \
            "none"
        hint = " (val_* needs validation_data or validation_split)" \
            if monitor.startswith("val_") else ""
        raise ValueError(f"{who}: the monitored quantity {monitor!r} is not in the epoch's "
                         f"logs{hint}; they have: {have}")
    return float(logs[monitor])


def _refuse_schedule(who, model):
    schedule = getattr(model.optimizer, "lr_schedule", None)
    if schedule is not None:
        raise ValueError(f"{who} sets the learning rate, but the optimizer follows the "
                         f"schedule {schedule!r}; use one or the other")


# ------------------------------------------------------------ EarlyStopping

class EarlyStopping(Callback):
    """Stop training when ``monitor`` has not improved for ``patience`` epochs.

    At the end of each epoch: an improvement (see the module docstring)
    records the value as the best and resets the count of epochs without
    improvement; otherwise the count grows, and when it reaches ``patience``
    (after the first epoch) training stops. With ``restore_best_weights``, the
    weights of the best epoch are then put back (as Keras: only when it
    stops training; a run that ends at ``epochs`` keeps its last weights).

    Parameters
    ----------
    monitor : str, default "val_loss"
    min_delta : float >= 0, default 0
    patience : int >= 0, default 0
    mode : {"auto", "min", "max"}
    restore_best_weights : bool, default False

    Attributes
    ----------
    best : float
    best_epoch : int
        0-based epoch of the best value.
    stopped_epoch : int
        0-based epoch after which training stopped (0: it did not stop).
    wait : int
        Epochs since the last improvement.
    """

    def __init__(self, monitor="val_loss", min_delta=0, patience=0, mode="auto",
                 restore_best_weights=False):
        super().__init__()
        self.monitor, self.mode, self.min_delta = _monitor_args(monitor, mode, min_delta)
        self.patience = _validate.integer("patience", patience, low=0)
        self.restore_best_weights = _validate.boolean("restore_best_weights",
                                                      restore_best_weights)
        self._reset()

    def _reset(self):
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch = 0
        self.best_weights = None
        self.stopped_epoch = 0
        self.wait = 0

    def on_train_begin(self, logs=None):
        self._reset()

    def on_epoch_end(self, epoch, logs=None):
        current = _value("EarlyStopping", self.monitor, logs)
        self.wait += 1
        if _improves(self.mode, current, self.best, self.min_delta):
            self.best, self.best_epoch, self.wait = current, epoch, 0
            if self.restore_best_weights:
                self.best_weights = self.model.get_weights()
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True
            if self.restore_best_weights and self.best_weights is not None:
                self.model.set_weights(self.best_weights)


# ------------------------------------------------------------ ModelCheckpoint

class ModelCheckpoint(Callback):
    """Save the model (``model.save``: atomic) after each epoch, or only when
    ``monitor`` improves.

    ``filepath`` may hold ``str.format`` fields: ``{epoch}`` (1-based) and
    the keys of the epoch's logs, e.g. ``"ckpt-{epoch:02d}-{val_loss:.3f}.npz"``;
    the folder part may not. At ``on_train_begin`` the folder is checked
    (it must exist and be writable), so a long run does not fail at its first
    save. A failed save raises, and leaves the previous file as it was (the
    best one stays the best on disk).

    Parameters
    ----------
    filepath : str or os.PathLike
    monitor : str, default "val_loss"
    save_best_only : bool, default False
        Save only when ``monitor`` improves on the best value so far.
    mode : {"auto", "min", "max"}

    Attributes
    ----------
    best : float
    last_saved : str or None
        The path of the last successful save.
    """

    def __init__(self, filepath, monitor="val_loss", save_best_only=False, mode="auto"):
        super().__init__()
        try:
            filepath = os.fspath(filepath)
        except TypeError:
            raise TypeError(f"filepath must be a str or os.PathLike, got "
                            f"{type(filepath).__name__}") from None
        if not isinstance(filepath, str) or not filepath:
            raise ValueError(f"filepath must be a non-empty path, got {filepath!r}")
        if "{" in os.path.dirname(filepath):
            raise ValueError(f"filepath {filepath!r}: format fields such as {{epoch}} are "
                             f"allowed in the file name only, not in the folder")
        self.filepath = filepath
        self.monitor, self.mode, _ = _monitor_args(monitor, mode, 0)
        self.save_best_only = _validate.boolean("save_best_only", save_best_only)
        self.best = math.inf if self.mode == "min" else -math.inf
        self.last_saved = None

    def on_train_begin(self, logs=None):
        _files.check_folder(os.path.dirname(os.path.abspath(self.filepath)),
                            f"ModelCheckpoint filepath {self.filepath!r}")

    def _path(self, epoch, logs):
        try:
            return self.filepath.format(epoch=epoch + 1, **(logs or {}))
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"ModelCheckpoint: cannot fill in filepath {self.filepath!r} "
                             f"from epoch and the logs {sorted(logs or {})}: {exc!r}") from None

    def on_epoch_end(self, epoch, logs=None):
        if self.save_best_only:
            current = _value("ModelCheckpoint", self.monitor, logs)
            if not _improves(self.mode, current, self.best, 0.0):
                return
            path = self._path(epoch, logs)
            self.model.save(path)
            self.best = current        # only once the file is written
        else:
            path = self._path(epoch, logs)
            self.model.save(path)
        self.last_saved = path


# ------------------------------------------------------------ learning rate

def _new_rate(who, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}: the schedule must return a number, got "
                        f"{type(value).__name__}")
    value = float(value)
    if not 0 <= value < math.inf:
        raise ValueError(f"{who}: the schedule returned lr={value}; a rate must be finite "
                         f"and >= 0")
    return value


class LearningRateScheduler(Callback):
    """Set the learning rate at the start of each epoch from
    ``schedule(epoch, lr)`` (epoch 0-based, ``lr`` the current rate), as Keras;
    a function of the epoch alone, ``schedule(epoch)``, is accepted too.

    Refuses (at ``on_train_begin``) an optimizer whose ``lr`` is a
    ``fastnn.schedules`` schedule: the two would fight.

    Parameters
    ----------
    schedule : callable
    verbose : int, default 0
        1: print each change.
    """

    def __init__(self, schedule, verbose=0):
        super().__init__()
        if not callable(schedule):
            raise TypeError(f"schedule must be callable (epoch, lr) -> lr, got "
                            f"{type(schedule).__name__}")
        self.schedule = schedule
        self.verbose = _validate.integer("verbose", verbose, low=0)

    def on_train_begin(self, logs=None):
        _refuse_schedule("LearningRateScheduler", self.model)

    def on_epoch_begin(self, epoch, logs=None):
        opt = self.model.optimizer
        lr = opt.lr
        try:
            new = self.schedule(epoch, lr)
        except TypeError:
            new = self.schedule(epoch)    # Keras accepts a function of the epoch alone
        new = _new_rate("LearningRateScheduler", new)
        if new != lr and self.verbose:
            print(f"epoch {epoch + 1}: LearningRateScheduler sets lr to {new:.6g}")
        opt.lr = new


class ReduceLROnPlateau(Callback):
    """Multiply the learning rate by ``factor`` when ``monitor`` has not
    improved for ``patience`` epochs, never below ``min_lr``.

    At the end of each epoch, as Keras: a running cooldown (set to
    ``cooldown`` by a reduction) is decremented first and the count of epochs
    without improvement set to 0; an improvement (by more than ``min_delta``)
    records the best value and resets the count; otherwise, unless the
    cooldown is still above 0, the count grows, and when it reaches
    ``patience`` the rate becomes ``max(lr * factor, min_lr)`` (only if
    ``lr > min_lr``), the count restarts and the cooldown is set. So
    ``cooldown=c`` leaves the ``c - 1`` epochs after a reduction uncounted.

    Parameters
    ----------
    monitor : str, default "val_loss"
    factor : float in [0, 1), default 0.1
    patience : int >= 0, default 10
    min_delta : float >= 0, default 1e-4
    min_lr : float >= 0, default 0
    mode : {"auto", "min", "max"}
    cooldown : int >= 0, default 0
    verbose : int, default 0
        1: print each reduction.
    """

    def __init__(self, monitor="val_loss", factor=0.1, patience=10, min_delta=1e-4, min_lr=0,
                 mode="auto", cooldown=0, verbose=0):
        super().__init__()
        self.monitor, self.mode, self.min_delta = _monitor_args(monitor, mode, min_delta)
        self.factor = _validate.real("factor", factor, low=0, high=1)
        self.patience = _validate.integer("patience", patience, low=0)
        self.min_lr = _validate.real("min_lr", min_lr, low=0)
        self.cooldown = _validate.integer("cooldown", cooldown, low=0)
        self.verbose = _validate.integer("verbose", verbose, low=0)
        self._reset()

    def _reset(self):
        self.best = math.inf if self.mode == "min" else -math.inf
        self.wait = 0
        self.cooldown_counter = 0

    def on_train_begin(self, logs=None):
        _refuse_schedule("ReduceLROnPlateau", self.model)
        self._reset()

    def on_epoch_end(self, epoch, logs=None):
        current = _value("ReduceLROnPlateau", self.monitor, logs)
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if _improves(self.mode, current, self.best, self.min_delta):
            self.best, self.wait = current, 0
        elif self.cooldown_counter == 0:
            self.wait += 1
            if self.wait >= self.patience:
                opt = self.model.optimizer
                lr = opt.lr
                if lr > self.min_lr:
                    new = max(lr * self.factor, self.min_lr)
                    opt.lr = new
                    if self.verbose:
                        print(f"epoch {epoch + 1}: ReduceLROnPlateau reduces lr to {new:.6g}")
                    self.cooldown_counter = self.cooldown
                    self.wait = 0


# ------------------------------------------------------------ TerminateOnNaN

class TerminateOnNaN(Callback):
    """Stop training at the first batch whose loss is NaN or infinite (the
    epoch ends there; its record covers the batches run).

    Attributes
    ----------
    stopped : (epoch, batch) or None
    """

    def __init__(self):
        super().__init__()
        self.stopped = None
        self._epoch = 0

    def on_train_begin(self, logs=None):
        self.stopped = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.stopped = (self._epoch, batch)
            self.model.stop_training = True
            print(f"epoch {self._epoch + 1}, batch {batch}: loss is {loss}; terminating "
                  f"training", file=sys.stderr)
