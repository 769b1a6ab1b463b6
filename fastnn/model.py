"""``Sequential``: a stack of Dense layers trained on NumPy arrays.

Design (see DESIGN.md, "Rules the code keeps"):

* All parameters live in one flat buffer (each layer's ``w`` and ``b`` are
  views into it), all gradients in another of the same layout, and the
  optimizer's state in flat buffers: the update is one kernel call.
* The training step calls the current backend's contract kernels directly:
  ``dense_forward`` per layer, the loss kernel (which writes the gradient of
  the logits straight into the top delta), then ``dense_backward`` and
  ``backprop_delta`` per layer, then the optimizer kernel. Everything those
  kernels touch is checked by ``fastnn._validate`` once, at the start of
  ``fit``, not per step.
* Buffers are sized for the batch once; a short last batch uses views of
  their first rows (still C-contiguous). After the first batch a step
  allocates no arrays.
* Buffers are made through the backend's array hooks (``empty``, ``zeros``,
  ``from_host``, ``to_host``, ``count_correct``), so a device backend keeps
  them on the device.
"""

import json
import math
import os
import sys
import tempfile
import time
import weakref
import zipfile

import numpy as np

from . import _backend, _validate
from . import losses as _losses
from . import optim as _optim
from .kernels.reference import Z_ACTIVATIONS
from .layers import Dense

__all__ = ["Sequential", "History", "load_model"]

_FORMAT = "fastnn.Sequential"
_FORMAT_VERSION = 1
_DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}
_EVAL_BATCH = 1024
_HOST_SPACE = tuple(_backend._HOST_HOOKS[k] for k in ("empty", "zeros", "from_host", "to_host"))


def _space(be):
    """What identifies where a backend keeps arrays (its array hooks)."""
    return (be.empty, be.zeros, be.from_host, be.to_host)


class History:
    """What ``fit`` returns.

    Attributes
    ----------
    history : dict
        ``{"loss": [...], "val_loss": [...]}`` per epoch, plus ``accuracy``
        and ``val_accuracy`` for the classification losses (``val_*`` empty
        without validation data); ``samples_per_s`` (training only).
    epoch : list of int
    params : dict
        ``epochs``, ``batch_size``, ``samples``, ``backend``.
    """

    def __init__(self, keys, params):
        self.history = {k: [] for k in keys}
        self.epoch = []
        self.params = params

    def __repr__(self):
        return f"History(epochs={len(self.epoch)}, keys={list(self.history)})"


class _Plan:
    """Work buffers for one batch size (views of a larger plan's for a short batch)."""

    def __init__(self, batch, ys, zs, deltas):
        self.batch = batch
        self.ys, self.zs, self.deltas = ys, zs, deltas
        self.logits = ys[-1]
        self.step = None
        self.step_state = None
        self.short = {}

    def view(self, n):
        """A plan for ``n <= batch`` rows: views of the first ``n`` rows."""
        plan = self.short.get(n)
        if plan is None:
            cut = lambda bufs: [None if a is None else a[:n] for a in bufs]  # noqa: E731
            plan = _Plan(n, cut(self.ys), cut(self.zs), cut(self.deltas))
            self.short[n] = plan
        return plan


class Sequential:
    """A stack of ``Dense`` layers with one flat parameter buffer.

    Parameters
    ----------
    layers : list of Dense, optional
        More can be added with ``add`` until the model is built.
    input_dim : int, optional
        Width of the input; the model is built (weights initialised) at once.
        Without it the model is built by the first ``fit``/``predict``.
    dtype : {"float32", "float64"}
        Of every parameter and buffer; inputs are converted to it once.
    seed : int, numpy.random.Generator or None
        Seeds one ``numpy.random.Generator`` that initialises the weights (He
        normal for ReLU-like layers, Glorot uniform otherwise, biases zero)
        and, unless ``fit(seed=...)`` is given, shuffles the data. The same
        seed gives the same numbers.

    Examples
    --------
    >>> import numpy as np, fastnn as fn
    >>> model = fn.Sequential([fn.Dense(8, "relu"), fn.Dense(3)], input_dim=4, seed=0)
    >>> model.compile("softmax_cross_entropy", fn.Adam(lr=1e-2))
    >>> x = np.random.default_rng(0).random((30, 4)); y = np.arange(30) % 3
    >>> h = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    >>> sorted(h.history)
    ['accuracy', 'loss', 'samples_per_s', 'val_accuracy', 'val_loss']
    >>> model.predict(x[:2]).shape
    (2, 3)
    """

    def __init__(self, layers=None, input_dim=None, dtype="float32", seed=None):
        if layers is None:
            layers = []
        if not isinstance(layers, (list, tuple)):
            raise TypeError(f"layers must be a list of Dense layers, got {type(layers).__name__}")
        for i, layer in enumerate(layers):
            self._check_layer(layer, f"layers[{i}]")
        if len({id(layer) for layer in layers}) != len(layers):
            raise ValueError("the same layer object appears twice in layers")
        if input_dim is not None:
            input_dim = _validate.integer("input_dim", input_dim, low=1)
        self.dtype = _dtype(dtype)
        if isinstance(seed, np.random.Generator):
            rng = seed
        elif seed is None or (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool)
                              and seed >= 0):
            rng = np.random.default_rng(seed)
        else:
            raise TypeError(f"seed must be None, a non-negative int or a numpy.random.Generator, "
                            f"got {seed!r}")
        self._rng = rng
        self.layers = list(layers)
        for layer in self.layers:
            layer._model = weakref.ref(self)
        self.input_dim = None
        self.loss = None
        self.optimizer = None
        self.metrics = []
        self._params = None
        self._grads = None
        self._space = None
        self._views = None       # [(w, b)] into _params
        self._grad_views = None  # [(dw, db)] into _grads
        self._plans = {}
        if input_dim is not None:
            if not self.layers:
                raise ValueError("give the layers with input_dim (or add them and fit)")
            self._build(input_dim)

    # ------------------------------------------------------------ structure
    def _check_layer(self, layer, name):
        if not isinstance(layer, Dense):
            raise TypeError(f"{name} must be a fastnn.Dense, got {type(layer).__name__}")
        owner = layer._model() if layer._model is not None else None
        if owner is not None and owner is not self:
            raise ValueError(f"{name} already belongs to another model; create a new layer")

    def add(self, layer):
        """Append a layer (before the model is built)."""
        self._check_layer(layer, "layer")
        if self.built:
            raise ValueError("the model is built (its weights exist): layers can no longer be "
                             "added")
        if any(layer is other for other in self.layers):
            raise ValueError("this layer is already in the model")
        layer._model = weakref.ref(self)
        self.layers.append(layer)

    @property
    def built(self):
        """Whether the weights exist."""
        return self._params is not None

    @property
    def param_count(self):
        """Number of parameters (weights and biases)."""
        if self.input_dim is None:
            raise ValueError("the model is not built yet (give input_dim or fit)")
        return sum(layer.param_count(d) for layer, d in zip(self.layers, self._dims()[:-1]))

    def _dims(self):
        return [self.input_dim] + [layer.units for layer in self.layers]

    def _build(self, input_dim):
        """Allocate the flat parameter buffer and initialise it from the model's rng."""
        self.input_dim = input_dim
        params = np.empty(self.param_count, self.dtype)
        for layer, (w, b) in zip(self.layers, self._slice(params)):
            layer.init_weights(self._rng, w, b)
        self._params = params
        self._space = _HOST_SPACE
        self._grads = np.zeros_like(params)
        self._make_views()

    def _slice(self, flat):
        """``[(w, b)]`` views of a flat buffer in the model's layout."""
        views, offset = [], 0
        for n_in, layer in zip(self._dims()[:-1], self.layers):
            n_w = n_in * layer.units
            w = flat[offset:offset + n_w].reshape(n_in, layer.units)
            b = flat[offset + n_w:offset + n_w + layer.units]
            views.append((w, b))
            offset += n_w + layer.units
        return views

    def _make_views(self):
        self._views = self._slice(self._params)
        self._grad_views = self._slice(self._grads)
        for layer, (w, b), n_in in zip(self.layers, self._views, self._dims()):
            layer.w, layer.b, layer.input_dim = w, b, n_in
        self._plans = {}

    def _bind(self, be):
        """Put the buffers where backend ``be`` keeps arrays (a no-op between
        CPU backends, which share host memory)."""
        space = _space(be)
        if space == self._space:
            return
        to_host = self._space[3]
        self._params = be.from_host(np.array(to_host(self._params)))
        self._grads = be.zeros(self._params.shape[0], self.dtype)
        opt = self.optimizer
        if opt is not None and opt._states:
            opt._states = [{k: be.from_host(np.array(to_host(a))) for k, a in s.items()}
                           for s in opt._states]
        self._space = space
        self._make_views()

    def get_weights(self):
        """Copies of the parameters as host arrays: ``[w0, b0, w1, b1, ...]``."""
        self._require_built()
        to_host = self._space[3]
        return [np.array(to_host(a)) for wb in self._views for a in wb]

    def set_weights(self, weights):
        """Set the parameters from ``[w0, b0, w1, b1, ...]`` (shapes as ``get_weights``;
        real arrays, converted to the model's dtype). Checks all before writing."""
        self._require_built()
        targets = [a for wb in self._views for a in wb]
        if not isinstance(weights, (list, tuple)) or len(weights) != len(targets):
            raise ValueError(f"weights must be a list of {len(targets)} arrays [w0, b0, ...]")
        host = np.array(self._space[3](self._params))
        flat_views = [a for wb in self._slice(host) for a in wb]
        for i, (new, view) in enumerate(zip(weights, flat_views)):
            new = np.asarray(new)
            if new.dtype.kind not in "biuf":
                raise TypeError(f"weights[{i}] must be real, got dtype {new.dtype}")
            if new.shape != view.shape:
                raise ValueError(f"weights[{i}] must have shape {view.shape}, got {new.shape}")
            view[...] = new
        self._load_params(host)

    def _load_params(self, host):
        """Copy a host flat array into the parameter buffer (wherever it lives)."""
        if self._space == _HOST_SPACE:
            self._params[...] = host
        else:
            self._params = self._space[2](np.ascontiguousarray(host))
            self._make_views()

    def _require_built(self):
        if not self.built:
            raise ValueError("the model is not built yet: give input_dim, or call fit or predict")

    # ------------------------------------------------------------ compile
    def compile(self, loss, optimizer="adam", metrics=None):
        """Choose the loss and the optimizer.

        Parameters
        ----------
        loss : str or fastnn.losses.Loss
            ``"softmax_cross_entropy"`` (integer labels, last ``Dense(k>=2)``),
            ``"sigmoid_binary_cross_entropy"`` (last ``Dense(1)``) or ``"mse"``.
        optimizer : str or fastnn optimizer
            ``"sgd"``, ``"adam"``, ``"adamw"``, ``"rmsprop"`` (defaults) or an
            instance such as ``fn.Adam(lr=1e-3)``; it then belongs to this
            model (its state is the model's).
        metrics : None or list of str
            ``["accuracy"]`` is accepted (accuracy is always reported for the
            classification losses).
        """
        if not self.layers:
            raise ValueError("the model has no layers")
        loss = _losses.get(loss)
        loss.check_units(self.layers[-1].units)
        optimizer = _optim.get(optimizer)
        if metrics is None:
            metrics = []
        if isinstance(metrics, str) or not isinstance(metrics, (list, tuple)):
            raise TypeError(f"metrics must be a list of names, got {type(metrics).__name__}")
        for m in metrics:
            if m not in ("accuracy", "acc"):
                raise ValueError(f"unknown metric {m!r}: only 'accuracy' is available")
            if not loss.classification:
                raise ValueError(f"accuracy needs a classification loss, not {loss.name}")
        owner = optimizer._owner() if optimizer._owner is not None else None
        if owner is not None and owner is not self:
            raise ValueError("this optimizer belongs to another model; create a new one")
        if owner is None and optimizer._states is not None:
            raise ValueError("this optimizer has state from updating arrays directly; create a "
                             "new one (or call its reset())")
        if optimizer is not self.optimizer:
            optimizer.reset()
        if self.optimizer is not None and self.optimizer is not optimizer:
            self.optimizer._owner = None
            self.optimizer.reset()
        optimizer._owner = weakref.ref(self)
        self.loss, self.optimizer = loss, optimizer
        self.metrics = ["accuracy"] if loss.classification else []
        self._plans = {}

    def _require_compiled(self, what):
        if self.loss is None:
            raise RuntimeError(f"compile the model (loss and optimizer) before {what}")

    # ------------------------------------------------------------ inputs
    def _input(self, x, name="x"):
        try:
            arr = np.asarray(x)
        except Exception as exc:
            raise TypeError(f"{name} must be array-like, got {type(x).__name__} ({exc})") from None
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be a real array, got dtype {arr.dtype}")
        if arr.ndim != 2:
            raise ValueError(f"{name} must be 2-D (samples, features), got shape {arr.shape}")
        if arr.shape[0] == 0:
            raise ValueError(f"{name} has no samples")
        if self.input_dim is not None and arr.shape[1] != self.input_dim:
            raise ValueError(f"{name} must have {self.input_dim} features per sample (the "
                             f"model's input_dim), got shape {arr.shape}")
        if arr.shape[1] == 0:
            raise ValueError(f"{name} has no features")
        return np.ascontiguousarray(arr, dtype=self.dtype)

    def _xy(self, x, y, xname="x", yname="y"):
        x = self._input(x, xname)
        y = self.loss.targets(y, x.shape[0], self.layers[-1].units, self.dtype, yname)
        return x, y

    # ------------------------------------------------------------ buffers
    def _train_plan(self, be, batch):
        key = ("train", batch)
        plan = self._plans.get(key)
        if plan is None:
            dt = self.dtype
            ys = [be.empty((batch, layer.units), dt) for layer in self.layers]
            zs = [be.empty((batch, layer.units), dt) if layer.activation in Z_ACTIVATIONS
                  else None for layer in self.layers]
            deltas = [be.empty((batch, layer.units), dt) for layer in self.layers]
            plan = _Plan(batch, ys, zs, deltas)
            self._plans[key] = plan
        return plan

    def _eval_plan(self, be, batch):
        key = ("eval", batch)
        plan = self._plans.get(key)
        if plan is None:
            dt = self.dtype
            ys = [be.empty((batch, layer.units), dt) for layer in self.layers]
            out = be.empty((batch, self.layers[-1].units), dt)  # loss gradient / predictions
            plan = _Plan(batch, ys, [None] * len(ys), [out])
            self._plans[key] = plan
        return plan

    def _check_plan(self, plan, xb, yb, optimizer=True):
        """Run the kernel gates once on every buffer the training step touches."""
        a = xb
        layers = self.layers
        for i, layer in enumerate(layers):
            w, b = self._views[i]
            dw, db = self._grad_views[i]
            _validate.dense_forward(a, w, b, layer.activation, plan.ys[i], plan.zs[i])
            _validate.dense_backward(a, plan.deltas[i], dw, db)
            if i > 0:
                below = layers[i - 1].activation
                _validate.backprop_delta(plan.deltas[i], w, plan.zs[i - 1], plan.ys[i - 1],
                                         below, plan.deltas[i - 1])
            a = plan.ys[i]
        getattr(_validate, self.loss.kernel)(plan.logits, yb, plan.deltas[-1])
        top = layers[-1].activation
        if top != "identity":
            _validate.activation_backward(top, plan.deltas[-1], plan.zs[-1], plan.ys[-1],
                                          plan.deltas[-1])
        if optimizer:
            self.optimizer._check_flat(self._params, self._grads)

    def _step_for(self, be, plan):
        """The plan's training step, made once per plan and optimizer state (a
        step closes over the state buffers, which ``reset`` or ``load`` replace)."""
        state = self.optimizer._states[0]
        if plan.step is None or plan.step_state is not state:
            plan.step = self._make_step(be, plan, self.optimizer._make_flat_step(
                be, self._params, self._grads))
            plan.step_state = state
        return plan.step

    def _make_step(self, be, plan, opt_step):
        """The training step on ``plan``'s buffers: a closure over the kernels."""
        fwd = [(w, b, layer.activation, y, z)
               for (w, b), layer, y, z in zip(self._views, self.layers, plan.ys, plan.zs)]
        bwd = []
        for i in range(len(self.layers) - 1, 0, -1):
            dw, db = self._grad_views[i]
            bwd.append((plan.ys[i - 1], plan.deltas[i], dw, db, self._views[i][0],
                        plan.zs[i - 1], self.layers[i - 1].activation, plan.deltas[i - 1]))
        dw0, db0 = self._grad_views[0]
        delta0 = plan.deltas[0]
        top_delta = plan.deltas[-1]
        top_act = self.layers[-1].activation
        top_z, logits = plan.zs[-1], plan.logits
        dense_forward, dense_backward = be.dense_forward, be.dense_backward
        backprop_delta, activation_backward = be.backprop_delta, be.activation_backward
        loss_kernel = getattr(be, self.loss.kernel)

        def step(xb, yb):
            a = xb
            for w, b, act, y, z in fwd:
                dense_forward(a, w, b, act, y, z)
                a = y
            loss = loss_kernel(logits, yb, top_delta)
            if top_act != "identity":
                activation_backward(top_act, top_delta, top_z, logits, top_delta)
            for x_in, delta, dw, db, w, z, act, delta_below in bwd:
                dense_backward(x_in, delta, dw, db)
                backprop_delta(delta, w, z, x_in, act, delta_below)
            dense_backward(xb, delta0, dw0, db0)
            if opt_step is not None:
                opt_step()
            return loss

        return step

    def _loss_and_grad(self, x, y):
        """Forward and backward on one batch (all of ``x``) with the model's own
        buffers and kernels, without an update: returns the loss and leaves the
        gradient in the flat gradient buffer (for tests and tools)."""
        self._require_compiled("computing gradients")
        x, y = self._xy(x, y)
        be = _backend.current()
        if not self.built:
            self._build(x.shape[1])
        self._bind(be)
        plan = self._train_plan(be, x.shape[0])
        xd, yd = be.from_host(x), be.from_host(y)
        self._check_plan(plan, xd, yd, optimizer=False)
        step = self._make_step(be, plan, None)
        return step(xd, yd)

    @property
    def params(self):
        """The flat parameter buffer (every layer's ``w`` and ``b`` are views into it)."""
        return self._params

    @property
    def grads(self):
        """The flat gradient buffer, in the layout of ``params``."""
        return self._grads

    # ------------------------------------------------------------ fit
    def fit(self, x, y, epochs=1, batch_size=32, validation_data=None, validation_split=0.0,
            shuffle=True, seed=None, verbose=1):
        """Train with mini-batches.

        Parameters
        ----------
        x : array-like (n, input_dim)
            Any real dtype, converted once to the model's dtype.
        y : array-like
            Integer labels ``(n,)`` (softmax cross-entropy), targets in [0, 1]
            ``(n,)`` or ``(n, 1)`` (sigmoid BCE), or ``(n, units)`` (MSE).
        epochs : int >= 1
        batch_size : int >= 1
            Buffers are sized for ``min(batch_size, n)``; the last batch of an
            epoch may be shorter.
        validation_data : (x_val, y_val), optional
            Evaluated after each epoch (``val_loss``, ``val_accuracy``).
        validation_split : float in [0, 1)
            Without ``validation_data``: hold out this fraction of the samples,
            taken from the end of ``x`` before any shuffling.
        shuffle : bool
            Shuffle the training samples before each epoch.
        seed : int, optional
            Seed of the shuffling for this call; by default the model's
            generator (``Sequential(seed=...)``) is used.
        verbose : {0, 1, 2}
            0 silent, 1 a tqdm progress bar per epoch, 2 one line per epoch.

        Returns
        -------
        History

        Raises
        ------
        RuntimeError
            Before ``compile``.
        TypeError, ValueError
            For a bad argument; the model is then left exactly as it was.
        """
        self._require_compiled("fit")
        epochs = _validate.integer("epochs", epochs, low=1)
        batch_size = _validate.integer("batch_size", batch_size, low=1)
        validation_split = _validate.real("validation_split", validation_split, low=0, high=1)
        shuffle = _validate.boolean("shuffle", shuffle)
        if seed is not None:
            seed = _validate.integer("seed", seed, low=0)
        verbose = _verbosity(verbose)
        x, y = self._xy(x, y)
        val = None
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise TypeError("validation_data must be a pair (x_val, y_val)")
            val = self._xy(*validation_data, xname="validation_data[0]",
                           yname="validation_data[1]")
        elif validation_split > 0:
            n_val = int(math.floor(x.shape[0] * validation_split))
            if n_val < 1 or n_val >= x.shape[0]:
                raise ValueError(f"validation_split={validation_split} of {x.shape[0]} samples "
                                 f"leaves {n_val} for validation and {x.shape[0] - n_val} for "
                                 f"training: both need at least one")
            val = (x[-n_val:], y[-n_val:])
            x, y = x[:-n_val], y[:-n_val]
        be = _backend.current()
        # every check has passed: from here on the model changes
        if not self.built:
            self._build(x.shape[1])
        self._bind(be)
        opt = self.optimizer
        if not opt._states:
            opt._init_flat(be, self._params.shape[0], self.dtype)
        n = x.shape[0]
        batch = min(batch_size, n)
        plan = self._train_plan(be, batch)
        self._check_plan(plan, x[:batch], y[:batch])
        full_step = self._step_for(be, plan)
        rng = np.random.default_rng(seed) if seed is not None else self._rng
        classification = self.loss.classification
        count_correct = be.count_correct
        keys = (["loss", "accuracy", "val_loss", "val_accuracy"] if classification
                else ["loss", "val_loss"]) + ["samples_per_s"]
        history = History(keys, {"epochs": epochs, "batch_size": batch, "samples": n,
                                 "backend": be.name})
        if shuffle:
            xs, ys = np.empty_like(x), np.empty_like(y)
        else:
            xd, yd = be.from_host(x), be.from_host(y)
        bar_cls = _tqdm() if verbose == 1 else None
        for epoch in range(epochs):
            if shuffle:
                order = rng.permutation(n)
                np.take(x, order, axis=0, out=xs)
                np.take(y, order, axis=0, out=ys)
                xd, yd = be.from_host(xs), be.from_host(ys)
            bar = None
            if bar_cls is not None:
                bar = bar_cls(total=n, desc=f"epoch {epoch + 1}/{epochs}", unit=" samples",
                              leave=True, dynamic_ncols=True, mininterval=0.2)
            total_loss, correct = 0.0, 0
            t0 = time.perf_counter()
            last_post = t0
            try:
                for start in range(0, n, batch):
                    stop = start + batch
                    if stop <= n:
                        step, p = full_step, plan
                    else:
                        stop = n
                        p = plan.view(n - start)
                        step = self._step_for(be, p)
                    yb = yd[start:stop]
                    nb = stop - start
                    total_loss += step(xd[start:stop], yb) * nb
                    if classification:
                        correct += count_correct(p.logits, yb)
                    if bar is not None:
                        bar.update(nb)
                        now = time.perf_counter()
                        if now - last_post > 0.5:
                            last_post = now
                            post = {"loss": f"{total_loss / stop:.4f}"}
                            if classification:
                                post["accuracy"] = f"{correct / stop:.4f}"
                            bar.set_postfix(post, refresh=False)
                seconds = time.perf_counter() - t0
                record = {"loss": total_loss / n, "samples_per_s": n / seconds}
                if classification:
                    record["accuracy"] = correct / n
                if val is not None:
                    ev = self._evaluate(be, *val, _EVAL_BATCH)
                    record.update({"val_" + k: v for k, v in ev.items()})
                for k in keys:
                    if k in record:
                        history.history[k].append(record[k])
                history.epoch.append(epoch)
                if bar is not None:
                    bar.set_postfix_str(_format_record(record, seconds, with_speed=True),
                                        refresh=False)
                elif verbose == 2:
                    print(f"epoch {epoch + 1}/{epochs} - "
                          f"{_format_record(record, seconds, with_speed=True)}", flush=True)
            finally:
                if bar is not None:
                    bar.close()
        return history

    # ------------------------------------------------------------ evaluate / predict
    def evaluate(self, x, y, batch_size=None, verbose=0):
        """Mean loss (and accuracy) over ``(x, y)``.

        Parameters
        ----------
        x, y : array-like
            As in ``fit``.
        batch_size : int, optional
            Rows per forward pass (default 1024).
        verbose : {0, 1, 2}
            Non-zero prints the result.

        Returns
        -------
        dict
            ``{"loss": float}`` plus ``"accuracy"`` for the classification losses.
        """
        self._require_compiled("evaluate")
        batch_size = _EVAL_BATCH if batch_size is None else \
            _validate.integer("batch_size", batch_size, low=1)
        verbose = _verbosity(verbose)
        self._require_built()
        x, y = self._xy(x, y)
        be = _backend.current()
        self._bind(be)
        result = self._evaluate(be, x, y, batch_size)
        if verbose:
            print(" - ".join(f"{k}: {v:.4f}" for k, v in result.items()))
        return result

    def _evaluate(self, be, x, y, batch_size):
        n = x.shape[0]
        plan = self._eval_plan(be, min(batch_size, n))
        loss_kernel = getattr(be, self.loss.kernel)
        self._check_forward(plan, x[:plan.batch])
        getattr(_validate, self.loss.kernel)(plan.logits, y[:plan.batch], plan.deltas[0])
        xd, yd = be.from_host(x), be.from_host(y)
        total, correct = 0.0, 0
        for start in range(0, n, plan.batch):
            stop = min(start + plan.batch, n)
            p = plan if stop - start == plan.batch else plan.view(stop - start)
            self._forward(be, p, xd[start:stop])
            yb = yd[start:stop]
            total += loss_kernel(p.logits, yb, p.deltas[0]) * (stop - start)
            if self.loss.classification:
                correct += be.count_correct(p.logits, yb)
        result = {"loss": total / n}
        if self.loss.classification:
            result["accuracy"] = correct / n
        return result

    def _check_forward(self, plan, xb):
        a = xb
        for (w, b), layer, out in zip(self._views, self.layers, plan.ys):
            _validate.dense_forward(a, w, b, layer.activation, out)
            a = out

    def _forward(self, be, plan, xb):
        a = xb
        for (w, b), layer, y in zip(self._views, self.layers, plan.ys):
            be.dense_forward(a, w, b, layer.activation, y)
            a = y
        return a

    def predict(self, x, batch_size=None):
        """Outputs for ``x``: probabilities for the classification losses
        (softmax rows, or the sigmoid as ``(n, 1)``), the last layer's values
        otherwise (also before ``compile``).

        Parameters
        ----------
        x : array-like (n, input_dim)
        batch_size : int, optional
            Rows per forward pass (default 1024).

        Returns
        -------
        ndarray (n, units) of the model's dtype
        """
        batch_size = _EVAL_BATCH if batch_size is None else \
            _validate.integer("batch_size", batch_size, low=1)
        x = self._input(x)
        be = _backend.current()
        if not self.built:
            self._build(x.shape[1])
        self._bind(be)
        n = x.shape[0]
        plan = self._eval_plan(be, min(batch_size, n))
        out = np.empty((n, self.layers[-1].units), self.dtype)
        self._check_forward(plan, x[:plan.batch])
        xd = be.from_host(x)
        for start in range(0, n, plan.batch):
            stop = min(start + plan.batch, n)
            p = plan if stop - start == plan.batch else plan.view(stop - start)
            logits = self._forward(be, p, xd[start:stop])
            if self.loss is None:
                res = logits
            else:
                res = p.deltas[0]
                self.loss.output(be, logits, res)
            out[start:stop] = be.to_host(res)
        return out

    # ------------------------------------------------------------ summary
    def summary(self, print_fn=print):
        """Print (and return) a table of the layers, shapes and parameter counts."""
        rows = [("layer", "output", "activation", "params", "init")]
        dims = self._dims() if self.input_dim is not None else [None] * (len(self.layers) + 1)
        for i, (layer, n_in) in enumerate(zip(self.layers, dims[:-1])):
            count = f"{layer.param_count(n_in):,}" if n_in is not None else "?"
            rows.append((layer.name or f"dense_{i} (Dense)", f"(batch, {layer.units})",
                         layer.activation, count, layer.initializer))
        widths = [max(len(r[c]) for r in rows) for c in range(5)]
        line = lambda r: "  ".join(s.ljust(w) for s, w in zip(r, widths)).rstrip()  # noqa: E731
        rule = "-" * len(line(rows[0]))
        text = [f"Sequential: input_dim={self.input_dim}, dtype={self.dtype.name}", rule,
                line(rows[0]), rule] + [line(r) for r in rows[1:]] + [rule]
        if self.input_dim is not None:
            n = self.param_count
            text.append(f"parameters: {n:,} ({n * self.dtype.itemsize / 1e6:.2f} MB, one flat "
                        f"buffer)")
        if self.loss is not None:
            text.append(f"loss: {self.loss.name}; optimizer: {self.optimizer!r}")
        out = "\n".join(text)
        if print_fn is not None:
            print_fn(out)
        return out

    # ------------------------------------------------------------ save / load
    def get_config(self):
        """The architecture, compile settings and generator state as JSON-able data."""
        config = {
            "format": _FORMAT, "version": _FORMAT_VERSION,
            "dtype": self.dtype.name, "input_dim": self.input_dim,
            "layers": [layer.get_config() for layer in self.layers],
            "rng": _rng_state(self._rng),
            "compile": None,
        }
        if self.loss is not None:
            opt = self.optimizer
            config["compile"] = {
                "loss": self.loss.name, "metrics": list(self.metrics),
                "optimizer": {"class_name": type(opt).__name__, "config": opt.get_config()},
                "optimizer_step": opt.iterations,
                "optimizer_state": sorted(opt._state_arrays()),
            }
        return config

    def save(self, path):
        """Write the model to one ``.npz`` file: the architecture as JSON, the
        weights and the optimizer state (so ``fit`` resumes exactly).

        The file is written to a temporary file in the same folder and then
        renamed over ``path``, so a failed save leaves an existing file intact.
        ``path`` is used as given (no suffix is added).
        """
        self._require_built()
        path = os.fspath(path)
        to_host = self._space[3]
        arrays = {"config": np.array(json.dumps(self.get_config())),
                  "params": np.array(to_host(self._params))}
        if self.optimizer is not None:
            for k, a in self.optimizer._state_arrays().items():
                arrays["opt_" + k] = np.array(to_host(a))
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".",
                                   suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                _write_npz(f, arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


def _write_npz(fileobj, arrays):
    """The writer ``save`` uses (a seam for tests that make writing fail)."""
    np.savez(fileobj, **arrays)


def load_model(path):
    """Read a model written by ``Sequential.save`` (with ``allow_pickle=False``).

    Returns
    -------
    Sequential
        With its weights, compile settings, optimizer state and generator
        state: ``fit`` continues exactly as the saved model would have.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        A corrupt, truncated or foreign file (the message says what is wrong).
    """
    path = os.fspath(path)
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive")
        with f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ValueError(f"{path} is not a readable fastnn model file ({exc})") from None
    try:
        return _from_arrays(arrays)
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a valid fastnn model file: {exc}") from None


def _from_arrays(arrays):
    if "config" not in arrays or "params" not in arrays:
        raise ValueError("the arrays 'config' and 'params' are missing")
    cfg_arr = arrays["config"]
    if cfg_arr.dtype.kind != "U" or cfg_arr.ndim != 0:
        raise ValueError("'config' is not a JSON string")
    config = json.loads(str(cfg_arr[()]))
    if not isinstance(config, dict) or config.get("format") != _FORMAT:
        raise ValueError("no fastnn.Sequential configuration inside")
    if config.get("version") != _FORMAT_VERSION:
        raise ValueError(f"format version {config.get('version')!r} is not supported "
                         f"(this fastnn reads version {_FORMAT_VERSION})")
    layers = []
    for lc in config["layers"]:
        if lc.get("class_name") != "Dense":
            raise ValueError(f"unknown layer {lc.get('class_name')!r}")
        layers.append(Dense.from_config(lc))
    model = Sequential(layers, input_dim=config["input_dim"], dtype=config["dtype"])
    params = arrays["params"]
    if params.dtype != model.dtype or params.shape != model._params.shape:
        raise ValueError(f"'params' has shape {params.shape} and dtype {params.dtype}; the "
                         f"architecture needs {model._params.shape} {model.dtype}")
    model._params[...] = params
    model._rng = _rng_from_state(config["rng"])
    comp = config.get("compile")
    if comp is not None:
        opt_cfg = comp["optimizer"]
        opt = _optim.from_config(opt_cfg["class_name"], opt_cfg["config"])
        model.compile(comp["loss"], opt, comp.get("metrics") or None)
        names = comp.get("optimizer_state", [])
        step = _validate.integer("optimizer_step", comp["optimizer_step"], low=0)
        if names or step:
            if sorted(names) != sorted(opt.state_names()):
                raise ValueError(f"optimizer state {names} does not match "
                                 f"{type(opt).__name__}'s {list(opt.state_names())}")
            state = {}
            for k in names:
                a = arrays.get("opt_" + k)
                if a is None or a.dtype != model.dtype or a.shape != params.shape:
                    raise ValueError(f"optimizer state 'opt_{k}' is missing or has the wrong "
                                     f"shape or dtype")
                state[k] = a.copy()
            opt._states = [state]
            opt._t = step
    return model


def _rng_state(rng):
    state = rng.bit_generator.state
    return json.loads(json.dumps(state, default=_json_default))


def _json_default(o):
    if isinstance(o, np.ndarray):
        return {"__ndarray__": o.tolist(), "dtype": o.dtype.name}
    if isinstance(o, np.integer):
        return int(o)
    raise TypeError(f"cannot store {type(o).__name__} in JSON")


def _rng_from_state(state):
    name = state["bit_generator"]
    bitgen_cls = getattr(np.random, name, None)
    if bitgen_cls is None or not isinstance(bitgen_cls, type) or \
            not issubclass(bitgen_cls, np.random.BitGenerator):
        raise ValueError(f"unknown bit generator {name!r}")

    def restore(o):
        if isinstance(o, dict):
            if "__ndarray__" in o:
                return np.array(o["__ndarray__"], dtype=o["dtype"])
            return {k: restore(v) for k, v in o.items()}
        return o

    bitgen = bitgen_cls()
    bitgen.state = restore(state)
    return np.random.Generator(bitgen)


def _dtype(dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be 'float32' or 'float64', got {dtype!r}") from None
    if dt not in _DTYPES.values():
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dt.name}")
    return dt


def _verbosity(verbose):
    if isinstance(verbose, bool) or verbose not in (0, 1, 2):
        raise ValueError(f"verbose must be 0, 1 or 2, got {verbose!r}")
    return int(verbose)


def _tqdm():
    from tqdm.auto import tqdm

    return tqdm


def _format_record(record, seconds, with_speed):
    parts = [f"loss {record['loss']:.4f}"]
    if "accuracy" in record:
        parts.append(f"accuracy {record['accuracy']:.4f}")
    if "val_loss" in record:
        parts.append(f"val_loss {record['val_loss']:.4f}")
    if "val_accuracy" in record:
        parts.append(f"val_accuracy {record['val_accuracy']:.4f}")
    if with_speed:
        parts.append(f"{record['samples_per_s']:,.0f} samples/s")
        parts.append(f"{seconds:.2f} s")
    return ", ".join(parts)
