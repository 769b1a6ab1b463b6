"""Optimizers with PyTorch's semantics and defaults (``torch.optim`` 2.x).

Each holds its state in flat buffers and updates with one kernel call per
parameter array; a ``Sequential`` model passes its one flat parameter
buffer, so its whole update is one kernel call. Used alone, an optimizer
updates a list of NumPy arrays in place, as PyTorch's do:

>>> import numpy as np, fastnn as fn
>>> w = np.ones(3); g = np.full(3, 0.5)
>>> opt = fn.SGD(lr=0.1)
>>> opt.step([w], [g])
>>> w
array([0.95, 0.95, 0.95])

With ``g' = g + weight_decay*p + l1*sign(p)`` (the regularised gradient;
AdamW instead multiplies ``p`` by ``1 - lr*weight_decay``) and ``t`` the
1-based step count:

* SGD: ``buf = momentum*buf + g'``; ``d = g' + momentum*buf`` (Nesterov)
  or ``buf``, or ``g'`` without momentum; ``p -= lr*d``.
* Adam / AdamW: ``m = b1*m + (1-b1)*g'``, ``v = b2*v + (1-b2)*g'^2``
  (AMSGrad: ``vmax = max(vmax, v)`` replaces ``v``);
  ``p -= lr/(1-b1^t) * m / (sqrt(v/(1-b2^t)) + eps)``.
* RMSprop: ``sq = rho*sq + (1-rho)*g'^2``; ``den = sqrt(sq) + eps`` or,
  centered, ``sqrt(max(sq - cm^2, 0)) + eps`` with ``cm = rho*cm + (1-rho)*g'``;
  ``buf = momentum*buf + g'/den; p -= lr*buf`` or ``p -= lr*g'/den``.

``lr`` is a float or a ``fastnn.schedules`` schedule: the rate of update
``t`` is then ``schedule(t - 1)``, computed per step from the step count
(nothing is rebuilt). ``optimizer.lr`` reads the rate the next update uses
and may be set between steps to a float or a schedule.

The kernels are those of the backend in effect (``fastnn.get_backend()``).
"""

import numpy as np

from . import _backend, _validate
from . import schedules as _schedules

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "RMSprop", "get"]


class Optimizer:
    """Base class. Subclasses name their kernel, their state buffers and the
    hyper-parameters that go into a call."""

    kernel = None

    def __init__(self):
        self._states = None   # list of {name: array}, one per parameter array
        self._shapes = None   # (shape, dtype) per parameter array (the list API)
        self._t = 0
        self._owner = None    # weakref to the model that owns the state
        self._lr = 0.0        # the constant rate, or None under a schedule
        self._schedule = None

    # ---- what subclasses define
    def state_names(self):
        """Names of the state buffers this configuration uses, in kernel order."""
        raise NotImplementedError

    def _config(self):
        """The hyper-parameters, ``lr`` as given (a float or a schedule)."""
        raise NotImplementedError

    def get_config(self):
        """The hyper-parameters, JSON-able (``from_config`` rebuilds the optimizer;
        a schedule is stored as ``{"class_name": ..., "config": ...}``)."""
        config = self._config()
        if self._schedule is not None:
            config["lr"] = _schedules.serialize(self._schedule)
        return config

    def _args(self, p, g, s, t):
        """The kernel's positional arguments."""
        raise NotImplementedError

    def _gate(self, p, g, s, t):
        getattr(_validate, self.kernel)(*self._args(p, g, s, t))

    # ---- common
    @property
    def iterations(self):
        """Steps taken so far (``t`` of the last step)."""
        return self._t

    @property
    def lr(self):
        """The learning rate the next update uses: the float given, or the
        schedule's value ``schedule(iterations)``. Set it between steps to a
        float >= 0 or a ``fastnn.schedules.LearningRateSchedule`` (a float
        replaces a schedule); the next step uses it, nothing is rebuilt."""
        if self._schedule is None:
            return self._lr
        return self._rate(self._t + 1)

    @lr.setter
    def lr(self, value):
        value = _schedules.get(value)
        if isinstance(value, _schedules.LearningRateSchedule):
            self._lr, self._schedule = None, value
        else:
            self._lr, self._schedule = value, None

    @property
    def lr_schedule(self):
        """The schedule given for ``lr``, or None for a constant rate."""
        return self._schedule

    def _lr_given(self):
        return self._lr if self._schedule is None else self._schedule

    def _rate(self, t):
        """The rate of update ``t`` (1-based): ``lr``, or ``schedule(t - 1)``."""
        schedule = self._schedule
        if schedule is None:
            return self._lr
        try:
            v = float(schedule._at(t - 1))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"the learning-rate schedule {schedule!r} failed at step "
                             f"{t - 1}: {exc}") from None
        if not 0.0 <= v < float("inf"):
            raise ValueError(f"the learning-rate schedule {schedule!r} gave lr={v} at step "
                             f"{t - 1}; a rate must be finite and >= 0")
        return v

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({args})"

    def reset(self):
        """Forget the state (moments, momentum buffers, step count)."""
        self._states = None
        self._shapes = None
        self._t = 0

    def step(self, params, grads):
        """One update of ``params`` in place from ``grads``.

        Parameters
        ----------
        params : list of ndarray
            Float32 or float64 arrays, C-contiguous and writable, any shape,
            not sharing memory with each other. The first call creates the
            state (zeros like each array); later calls must pass arrays of the
            same shapes and dtypes in the same order (``reset()`` starts over).
        grads : list of ndarray
            One per parameter, same shape and dtype; never written.

        Raises
        ------
        TypeError, ValueError
            Before anything is written, for a bad list or array or a
            hyper-parameter out of range.
        """
        params, grads = self._check_lists(params, grads)
        shapes = [(p.shape, p.dtype) for p in params]
        if self._owner is not None:
            raise ValueError(f"this {type(self).__name__} belongs to a model (compile); create "
                             f"another one to update arrays directly")
        if self._shapes is not None and shapes != self._shapes:
            raise ValueError(f"the optimizer state was made for arrays "
                             f"{[(s, d.name) for s, d in self._shapes]}, got "
                             f"{[(s, d.name) for s, d in shapes]}; call reset() to start over")
        flat_p = [p.reshape(-1) for p in params]
        flat_g = [g.reshape(-1) for g in grads]
        states = self._states
        if states is None:
            states = [{name: np.zeros(p.size, p.dtype) for name in self.state_names()}
                      for p in flat_p]
        t = self._t + 1
        for p, g, s in zip(flat_p, flat_g, states):
            self._gate(p, g, s, t)
        self._states, self._shapes = states, shapes
        kernel = getattr(_backend.current(), self.kernel)
        for p, g, s in zip(flat_p, flat_g, states):
            kernel(*self._args(p, g, s, t))
        self._t = t

    @staticmethod
    def _check_lists(params, grads):
        if isinstance(params, np.ndarray):
            params = [params]
        if isinstance(grads, np.ndarray):
            grads = [grads]
        for name, seq in (("params", params), ("grads", grads)):
            if not isinstance(seq, (list, tuple)):
                raise TypeError(f"{name} must be a list of numpy arrays, got "
                                f"{type(seq).__name__}")
        if len(params) != len(grads):
            raise ValueError(f"params and grads must have the same length, got {len(params)} "
                             f"and {len(grads)}")
        if not params:
            raise ValueError("params must not be empty")
        for i, (p, g) in enumerate(zip(params, grads)):
            for name, a in ((f"params[{i}]", p), (f"grads[{i}]", g)):
                if not isinstance(a, np.ndarray):
                    raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
                if not a.flags.c_contiguous:
                    raise ValueError(f"{name} must be C-contiguous (it is updated through a "
                                     f"flat view)")
            if g.shape != p.shape:
                raise ValueError(f"grads[{i}] has shape {g.shape} but params[{i}] has {p.shape}")
        infos = [_validate.array_info(f"params[{i}]", p) for i, p in enumerate(params)]
        for i, a in enumerate(infos):
            for j in range(i):
                b = infos[j]
                if a.start < b.end and b.start < a.end and a.start != a.end:
                    raise ValueError(f"params[{i}] and params[{j}] share memory: each "
                                     f"parameter must be its own array")
        return list(params), list(grads)

    # ---- the flat API used by Sequential (validated by the model, once)
    def _init_flat(self, be, n, dtype):
        self._states = [{name: be.zeros(n, dtype) for name in self.state_names()}]
        self._shapes = None
        self._t = 0

    def _check_flat(self, params, grads):
        self._gate(params, grads, self._states[0], self._t + 1)

    def _make_flat_step(self, be, params, grads):
        """A no-argument function doing one update of the flat buffers, for the
        model's training step (no validation: the model checked once)."""
        kernel = getattr(be, self.kernel)
        state = self._states[0]
        args = self._args

        def flat_step():
            t = self._t + 1
            kernel(*args(params, grads, state, t))
            self._t = t

        return flat_step

    def _state_arrays(self):
        """``{name: array}`` of the flat state (the model's), or {}."""
        return dict(self._states[0]) if self._states else {}


def _real(name, value, **bounds):
    return _validate.real(name, value, **bounds)


class SGD(Optimizer):
    """Stochastic gradient descent, with optional (Nesterov) momentum.

    ``g' = g + weight_decay*p + l1*sign(p)``; with ``momentum > 0``:
    ``buf = momentum*buf + g'`` (``buf = g'`` at the first step) and
    ``d = g' + momentum*buf`` if ``nesterov`` else ``buf``; else ``d = g'``.
    ``p -= lr*d``. As ``torch.optim.SGD`` with ``dampening=0``.

    Parameters
    ----------
    lr : float or fastnn.schedules.LearningRateSchedule, default 1e-3
    momentum : float, default 0
    nesterov : bool, default False (needs momentum > 0)
    weight_decay : float, default 0 (L2, added to the gradient)
    l1 : float, default 0
    """

    kernel = "sgd_step"

    def __init__(self, lr=1e-3, momentum=0.0, nesterov=False, weight_decay=0.0, l1=0.0):
        lr = _schedules.get(lr)
        momentum = _real("momentum", momentum, low=0, high=None)
        nesterov = _validate.boolean("nesterov", nesterov)
        if nesterov and momentum == 0:
            raise ValueError("nesterov requires momentum > 0")
        weight_decay = _real("weight_decay", weight_decay, low=0)
        l1 = _real("l1", l1, low=0)
        super().__init__()
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self.weight_decay, self.l1 = weight_decay, l1

    def state_names(self):
        return ("buf",) if self.momentum > 0 else ()

    def _config(self):
        return {"lr": self._lr_given(), "momentum": self.momentum, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay, "l1": self.l1}

    def _args(self, p, g, s, t):
        return (p, g, s.get("buf"), self._rate(t), self.momentum, self.nesterov,
                self.weight_decay, self.l1)


class Adam(Optimizer):
    """Adam (Kingma & Ba), with optional AMSGrad; L2 ``weight_decay`` is added
    to the gradient (``torch.optim.Adam``).

    ``g' = g + weight_decay*p + l1*sign(p)``, ``m = b1*m + (1-b1)*g'``,
    ``v = b2*v + (1-b2)*g'^2`` (AMSGrad: ``vmax = max(vmax, v)`` used for
    ``v``), ``p -= lr/(1-b1^t) * m / (sqrt(v/(1-b2^t)) + eps)``.

    Parameters
    ----------
    lr : float or fastnn.schedules.LearningRateSchedule, default 1e-3
    betas : (float, float), default (0.9, 0.999), each in [0, 1)
    eps : float, default 1e-8
    weight_decay : float, default 0
    l1 : float, default 0
    amsgrad : bool, default False
    """

    kernel = "adam_step"
    _decoupled = False

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, l1=0.0,
                 amsgrad=False):
        lr = _schedules.get(lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        beta1 = _real("betas[0]", betas[0], low=0, high=1)
        beta2 = _real("betas[1]", betas[1], low=0, high=1)
        eps = _real("eps", eps, low=0, low_open=True)
        weight_decay = _real("weight_decay", weight_decay, low=0)
        l1 = _real("l1", l1, low=0)
        amsgrad = _validate.boolean("amsgrad", amsgrad)
        super().__init__()
        self.lr, self.betas, self.eps = lr, (beta1, beta2), eps
        self.weight_decay, self.l1, self.amsgrad = weight_decay, l1, amsgrad

    def state_names(self):
        return ("m", "v", "vmax") if self.amsgrad else ("m", "v")

    def _config(self):
        return {"lr": self._lr_given(), "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay, "l1": self.l1, "amsgrad": self.amsgrad}

    def _args(self, p, g, s, t):
        beta1, beta2 = self.betas
        return (p, g, s["m"], s["v"], t, self._rate(t), beta1, beta2, self.eps, self.weight_decay,
                self._decoupled, self.l1, s.get("vmax"))


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter): Adam with decoupled weight decay
    (``torch.optim.AdamW``): ``p *= 1 - lr*weight_decay`` before the Adam
    update, which then uses ``g' = g + l1*sign(p)``.

    Parameters
    ----------
    lr : float or fastnn.schedules.LearningRateSchedule, default 1e-3
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    weight_decay : float, default 1e-2
    l1 : float, default 0
    amsgrad : bool, default False
    """

    _decoupled = True

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, l1=0.0,
                 amsgrad=False):
        super().__init__(lr, betas, eps, weight_decay, l1, amsgrad)


class RMSprop(Optimizer):
    """RMSprop (Hinton), as ``torch.optim.RMSprop`` (its ``alpha`` is ``rho``).

    ``g' = g + weight_decay*p + l1*sign(p)``, ``sq = rho*sq + (1-rho)*g'^2``;
    centered: ``cm = rho*cm + (1-rho)*g'``, ``den = sqrt(max(sq - cm^2, 0)) + eps``,
    else ``den = sqrt(sq) + eps``; with momentum ``buf = momentum*buf + g'/den``,
    ``p -= lr*buf``, else ``p -= lr*g'/den``.

    Parameters
    ----------
    lr : float or fastnn.schedules.LearningRateSchedule, default 1e-2
    rho : float, default 0.99, in [0, 1)
    eps : float, default 1e-8
    momentum : float, default 0
    centered : bool, default False
    weight_decay : float, default 0
    l1 : float, default 0
    """

    kernel = "rmsprop_step"

    def __init__(self, lr=1e-2, rho=0.99, eps=1e-8, momentum=0.0, centered=False,
                 weight_decay=0.0, l1=0.0):
        lr = _schedules.get(lr)
        rho = _real("rho", rho, low=0, high=1)
        eps = _real("eps", eps, low=0, low_open=True)
        momentum = _real("momentum", momentum, low=0, high=None)
        centered = _validate.boolean("centered", centered)
        weight_decay = _real("weight_decay", weight_decay, low=0)
        l1 = _real("l1", l1, low=0)
        super().__init__()
        self.lr, self.rho, self.eps, self.momentum = lr, rho, eps, momentum
        self.centered, self.weight_decay, self.l1 = centered, weight_decay, l1

    def state_names(self):
        names = ["sq"]
        if self.momentum > 0:
            names.append("buf")
        if self.centered:
            names.append("centered_mean")
        return tuple(names)

    def _config(self):
        return {"lr": self._lr_given(), "rho": self.rho, "eps": self.eps,
                "momentum": self.momentum,
                "centered": self.centered, "weight_decay": self.weight_decay, "l1": self.l1}

    def _args(self, p, g, s, t):
        return (p, g, s["sq"], s.get("buf"), self._rate(t), self.rho, self.eps, self.momentum,
                s.get("centered_mean"), self.weight_decay, self.l1)


_CLASSES = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop}


def get(optimizer, **kwargs):
    """An optimizer from a name (``"sgd"``, ``"adam"``, ``"adamw"``,
    ``"rmsprop"``, with its defaults or ``kwargs``) or an instance (returned
    as is).

    Raises
    ------
    TypeError, ValueError
        For another type or an unknown name.
    """
    if isinstance(optimizer, Optimizer):
        if kwargs:
            raise TypeError("keyword arguments apply only to an optimizer given by name")
        return optimizer
    if not isinstance(optimizer, str):
        raise TypeError(f"optimizer must be a name (str) or a fastnn optimizer, got "
                        f"{type(optimizer).__name__}")
    cls = _CLASSES.get(optimizer.lower())
    if cls is None:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of "
                         f"{', '.join(_CLASSES)}")
    return cls(**kwargs)


def from_config(class_name, config):
    """Rebuild an optimizer saved by ``Sequential.save``."""
    cls = {c.__name__: c for c in _CLASSES.values()}.get(class_name)
    if cls is None:
        raise ValueError(f"unknown optimizer class {class_name!r}")
    config = dict(config)
    if isinstance(config.get("lr"), dict):
        config["lr"] = _schedules.deserialize(config["lr"])
    if "betas" in config:
        config["betas"] = tuple(config["betas"])
    return cls(**config)
