"""Learning-rate schedules: objects an optimizer takes for ``lr``.

A schedule maps the optimizer's step count to a learning rate. ``step`` is
the number of updates made before the current one (0 for the first update,
as Keras' ``optimizer.iterations``), so the update numbered ``t`` (1-based,
``optimizer.iterations`` after it) uses ``schedule(t - 1)``. The optimizer
computes the rate per step from its step count: nothing is rebuilt or
recompiled, and ``optimizer.lr`` reads the rate the next update will use.

>>> import fastnn as fn
>>> sched = fn.schedules.StepDecay(0.1, step_size=100, gamma=0.5)
>>> [sched(0), sched(99), sched(100), sched(250)]
[0.1, 0.1, 0.05, 0.025]
>>> opt = fn.SGD(lr=sched)
>>> opt.lr
0.1

A schedule is described by JSON-able ``get_config()``; ``serialize`` and
``deserialize`` add and read its class name (what ``Sequential.save``
stores, so a loaded model resumes on its schedule at its step). Subclass
``LearningRateSchedule`` (``__call__`` or ``_at``, and ``get_config``) for another one;
``deserialize`` knows only the classes of this module.
"""

import math
import numbers

from . import _validate

__all__ = ["LearningRateSchedule", "StepDecay", "ExponentialDecay", "CosineDecay",
           "serialize", "deserialize", "get"]


def _step(step):
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an integer, got {type(step).__name__}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return int(step)


class LearningRateSchedule:
    """Base class: ``schedule(step) -> float``, a rate >= 0 for the update
    made after ``step`` updates (0-based)."""

    def __call__(self, step):
        return self._at(_step(step))

    def _at(self, step):
        """The rate at ``step``, an int >= 0 (the optimizer calls this per update,
        without ``__call__``'s check). A subclass defines ``_at`` or ``__call__``."""
        if type(self).__call__ is LearningRateSchedule.__call__:
            raise NotImplementedError(f"{type(self).__name__} defines neither __call__ nor _at")
        return self(step)

    def get_config(self):
        """The constructor's arguments, JSON-able (``type(self)(**config)`` rebuilds it)."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self).__name__, tuple(sorted(self.get_config().items()))))


class StepDecay(LearningRateSchedule):
    """The rate multiplied by ``gamma`` every ``step_size`` steps (PyTorch's ``StepLR``).

    ``lr(step) = initial_learning_rate * gamma ** (step // step_size)``

    Parameters
    ----------
    initial_learning_rate : float >= 0
    step_size : int >= 1
        Updates between two decays.
    gamma : float in [0, 1], default 0.1
    """

    def __init__(self, initial_learning_rate, step_size, gamma=0.1):
        self.initial_learning_rate = _validate.real("initial_learning_rate",
                                                    initial_learning_rate, low=0)
        self.step_size = _validate.integer("step_size", step_size, low=1)
        self.gamma = _validate.real("gamma", gamma, low=0, high=1, high_open=False)

    def _at(self, step):
        return self.initial_learning_rate * self.gamma ** (step // self.step_size)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate,
                "step_size": self.step_size, "gamma": self.gamma}


class ExponentialDecay(LearningRateSchedule):
    """Exponential decay (Keras' ``ExponentialDecay``).

    ``lr(step) = initial_learning_rate * decay_rate ** (step / decay_steps)``,
    with ``floor(step / decay_steps)`` as the exponent when ``staircase``
    (PyTorch's ``ExponentialLR(gamma)`` per step is ``decay_steps=1``).

    Parameters
    ----------
    initial_learning_rate : float >= 0
    decay_steps : int >= 1
    decay_rate : float in [0, 1]
    staircase : bool, default False
    """

    def __init__(self, initial_learning_rate, decay_steps, decay_rate, staircase=False):
        self.initial_learning_rate = _validate.real("initial_learning_rate",
                                                    initial_learning_rate, low=0)
        self.decay_steps = _validate.integer("decay_steps", decay_steps, low=1)
        self.decay_rate = _validate.real("decay_rate", decay_rate, low=0, high=1,
                                         high_open=False)
        self.staircase = _validate.boolean("staircase", staircase)

    def _at(self, step):
        p = step // self.decay_steps if self.staircase else step / self.decay_steps
        return self.initial_learning_rate * self.decay_rate ** p

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate,
                "decay_steps": self.decay_steps, "decay_rate": self.decay_rate,
                "staircase": self.staircase}


class CosineDecay(LearningRateSchedule):
    """Cosine decay with an optional linear warm-up (Keras 3's ``CosineDecay``).

    Without ``warmup_target`` the peak is ``initial_learning_rate`` and there
    is no warm-up. With it, the rate rises linearly from
    ``initial_learning_rate`` to ``warmup_target`` over ``warmup_steps``:

    ``lr(step) = initial_learning_rate + (warmup_target - initial_learning_rate)
    * step / warmup_steps`` for ``step < warmup_steps``;

    then, with ``peak`` the warm-up target (or the initial rate) and
    ``s = min(step - warmup_steps, decay_steps)``:

    ``lr(step) = peak * ((1 - alpha) * 0.5 * (1 + cos(pi * s / decay_steps)) + alpha)``

    so it ends at ``alpha * peak`` and stays there (PyTorch's
    ``CosineAnnealingLR`` with ``eta_min = alpha * peak``, after a
    ``LinearLR`` warm-up).

    Parameters
    ----------
    initial_learning_rate : float >= 0
    decay_steps : int >= 1
    alpha : float in [0, 1], default 0
        The final rate as a fraction of the peak.
    warmup_target : float >= 0 or None, default None
    warmup_steps : int >= 0, default 0
        Needs ``warmup_target`` when > 0.
    """

    def __init__(self, initial_learning_rate, decay_steps, alpha=0.0, warmup_target=None,
                 warmup_steps=0):
        self.initial_learning_rate = _validate.real("initial_learning_rate",
                                                    initial_learning_rate, low=0)
        self.decay_steps = _validate.integer("decay_steps", decay_steps, low=1)
        self.alpha = _validate.real("alpha", alpha, low=0, high=1, high_open=False)
        if warmup_target is not None:
            warmup_target = _validate.real("warmup_target", warmup_target, low=0)
        self.warmup_target = warmup_target
        self.warmup_steps = _validate.integer("warmup_steps", warmup_steps, low=0)
        if self.warmup_steps > 0 and warmup_target is None:
            raise ValueError("warmup_steps > 0 needs warmup_target (the rate the warm-up "
                             "reaches)")

    def _at(self, step):
        w = self.warmup_steps
        if step < w:
            lr0 = self.initial_learning_rate
            return lr0 + (self.warmup_target - lr0) * (step / w)
        peak = self.initial_learning_rate if self.warmup_target is None else self.warmup_target
        s = min(step - w, self.decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * s / self.decay_steps))
        return peak * ((1.0 - self.alpha) * cosine + self.alpha)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate,
                "decay_steps": self.decay_steps, "alpha": self.alpha,
                "warmup_target": self.warmup_target, "warmup_steps": self.warmup_steps}


_CLASSES = {cls.__name__: cls for cls in (StepDecay, ExponentialDecay, CosineDecay)}


def serialize(schedule):
    """``{"class_name": ..., "config": ...}`` (JSON-able) for one of this module's schedules."""
    if type(schedule) not in _CLASSES.values():
        raise TypeError(f"only fastnn's schedules ({', '.join(_CLASSES)}) can be serialized, "
                        f"got {type(schedule).__name__}")
    return {"class_name": type(schedule).__name__, "config": schedule.get_config()}


def deserialize(config):
    """The schedule ``serialize`` described.

    Raises
    ------
    ValueError
        Not such a description, or an unknown class (the message names it).
    """
    if not isinstance(config, dict) or not isinstance(config.get("class_name"), str) \
            or not isinstance(config.get("config"), dict):
        raise ValueError(f"a schedule is described by {{'class_name': ..., 'config': {{...}}}}, "
                         f"got {config!r}")
    cls = _CLASSES.get(config["class_name"])
    if cls is None:
        raise ValueError(f"unknown learning-rate schedule {config['class_name']!r}; fastnn "
                         f"has {', '.join(_CLASSES)}")
    try:
        return cls.from_config(config["config"])
    except TypeError as exc:
        raise ValueError(f"{config['class_name']}: {exc}") from None


def get(lr):
    """``lr`` checked: a real number >= 0 (as a float) or a ``LearningRateSchedule``."""
    if isinstance(lr, LearningRateSchedule):
        return lr
    if callable(lr) and not isinstance(lr, numbers.Real):
        raise TypeError(f"lr must be a number or a fastnn.schedules.LearningRateSchedule, got "
                        f"{type(lr).__name__} (a function of the epoch belongs in "
                        f"callbacks.LearningRateScheduler)")
    return _validate.real("lr", lr, low=0)
