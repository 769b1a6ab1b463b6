"""``Sequential``: a list of layers trained on NumPy arrays.

Design (see DESIGN.md, "The layer protocol" and "Rules the code keeps"):

* All parameters live in one flat buffer (each layer's parameters are views
  into it), all gradients in another of the same layout, and the optimizer's
  state in flat buffers: the update is one kernel call.
* The model runs a list of layers and knows nothing of what each computes: per
  plan (a batch size; training or inference) every layer hands back its
  forward and backward functions over the plan's buffers (``fastnn.layers``),
  which call the current backend's contract kernels directly. The loss kernel
  writes the gradient of the logits straight into the top delta.
* Everything those kernels touch is checked by ``fastnn._validate`` once, when
  a plan is made, not per step: the plan's step is built once more on a
  "backend" whose kernels are the gates, and run on a first batch.
* Buffers are sized for the batch once; a short last batch uses views of
  their first rows (still C-contiguous). After the first batch a step
  allocates no arrays.
* Buffers are made through the backend's array hooks (``empty``, ``zeros``,
  ``from_host``, ``to_host``, ``count_correct``), so a device backend keeps
  them on the device. Plans belong to one backend: a switch (``set_backend``,
  ``use_backend``) between calls makes new ones.
"""

import json
import math
import os
import time
import weakref
import zipfile

import numpy as np

from . import _backend, _batches, _files, _validate
from . import distributed as _distributed   # light: mpi4py only once distributed training is asked for
from . import losses as _losses
from . import optim as _optim
from .kernels import reference as _reference
from .layers import LAYER_CLASSES, OUTPUT_ACTIVATIONS, Dense, Layer, Record

__all__ = ["Sequential", "History", "load_model"]

_FORMAT = "fastnn.Sequential"
_FORMAT_VERSION = 2
_READS_VERSIONS = (1, 2)
_DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}
_EVAL_BATCH = 1024
_HOST_SPACE = tuple(_backend._HOST_HOOKS[k] for k in ("empty", "zeros", "from_host", "to_host"))


def _space(be):
    """What identifies where a backend keeps arrays (its array hooks)."""
    return (be.empty, be.zeros, be.from_host, be.to_host)


class _Gates:
    """A "backend" whose kernels are ``fastnn._validate``'s gates: a step built
    on it checks every kernel call of the real step, with the same arguments."""

    name = "gate"


for _kernel in _reference.CONTRACT:
    setattr(_Gates, _kernel, staticmethod(getattr(_validate, _kernel)))


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


class _Context:
    """What a plan's layer functions share: the dropout seeds of a step."""

    def __init__(self, seeds):
        self.seeds = seeds
        self._cells = {}

    def seed_cell(self, layer):
        """A one-element list that a layer's forward fills and its backward reads."""
        return self._cells.setdefault(id(layer), [0])


class _Plan:
    """Buffers and functions for one batch size, training or inference (a
    short batch gets views of a larger plan's first rows)."""

    def __init__(self, model, be, batch, training, bufs=None):
        self.batch = batch
        self.training = training
        self.bufs = model._alloc(be, batch, training) if bufs is None else bufs
        self.records = model._records(self.bufs, training)
        self.step = None
        self.step_state = None
        self.forward = None
        self.checked = False
        self.loss_checked = False
        self.short = {}
        self._inputs = None

    def view(self, model, be, n):
        """A plan for ``n <= batch`` rows: views of the first ``n`` rows."""
        plan = self.short.get(n)
        if plan is None:
            bufs = [{k: a[:n] for k, a in d.items()} for d in self.bufs]
            plan = _Plan(model, be, n, self.training, bufs)
            if self._inputs is not None:
                plan._inputs = tuple(None if a is None else a[:n] for a in self._inputs)
            self.short[n] = plan
        return plan

    def inputs(self):
        """``(x, y, y host stage)`` buffers batches are gathered into."""
        return self._inputs


def _as_layers(layers):
    if layers is None:
        return []
    if not isinstance(layers, (list, tuple)):
        raise TypeError(f"layers must be a list of layers, got {type(layers).__name__}")
    return list(layers)


def _shape(name, value):
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        value = (value,)
    if (not isinstance(value, (tuple, list)) or not value
            or any(isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))
                   for v in value)):
        raise TypeError(f"{name} must be a tuple of ints, got {value!r}")
    if min(value) < 1:
        raise ValueError(f"{name} must hold sizes >= 1, got {tuple(value)}")
    return tuple(int(v) for v in value)


class Sequential:
    """A list of layers with one flat parameter buffer.

    Parameters
    ----------
    layers : list of layers, optional
        ``Dense``, ``Conv2D``, ``MaxPool2D``, ``Flatten``, ``Dropout``. More
        can be added with ``add`` until the model is built.
    input_dim : int, optional
        Width of a flat input: shorthand for ``input_shape=(input_dim,)``.
    dtype : {"float32", "float64"}
        Of every parameter and buffer; inputs are converted to it once.
    seed : int, numpy.random.Generator or None
        Seeds one ``numpy.random.Generator`` that initialises the weights (He
        normal for ReLU-like layers, Glorot uniform otherwise, biases zero),
        draws the dropout seeds and, unless ``fit(seed=...)`` is given,
        shuffles the data. The same seed gives the same numbers.
    input_shape : tuple of int, optional
        The shape of one sample (``(28, 28, 1)`` for MNIST images); also
        accepted on the first layer, as Keras writes it. With an input shape
        the model is built (weights initialised) at once; without one, by the
        first ``fit``/``predict``.

    Examples
    --------
    >>> import numpy as np, fastnn as fn
    >>> model = fn.Sequential([fn.Dense(8, "relu"), fn.Dense(3)], input_dim=4, seed=0)
    >>> model.compile("softmax_cross_entropy", fn.Adam(lr=1e-2))
    >>> x = np.random.default_rng(0).random((30, 4)); y = np.arange(30) % 3
    >>> h = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    >>> sorted(h.history)
    ['accuracy', 'loss', 'lr', 'samples_per_s', 'step_samples_per_s', 'val_accuracy', 'val_loss']
    >>> model.predict(x[:2]).shape
    (2, 3)
    """

    def __init__(self, layers=None, input_dim=None, dtype="float32", seed=None,
                 input_shape=None):
        layers = _as_layers(layers)
        for i, layer in enumerate(layers):
            self._check_layer(layer, f"layers[{i}]")
        if len({id(layer) for layer in layers}) != len(layers):
            raise ValueError("the same layer object appears twice in layers")
        if input_dim is not None:
            input_dim = _validate.integer("input_dim", input_dim, low=1)
            if input_shape is not None:
                raise ValueError("give input_dim or input_shape, not both")
            input_shape = (input_dim,)
        elif input_shape is not None:
            input_shape = _shape("input_shape", input_shape)
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
        self.layers = layers
        self.input_shape = None
        self.loss = None
        self.optimizer = None
        self.metrics = []
        self._params = None
        self._grads = None
        self._space = None
        self._param_views = None  # per layer: [views] into _params
        self._grad_views = None   # per layer: [views] into _grads
        self._plans = {}
        self._plans_backend = None
        if input_shape is None and layers and layers[0].input_shape_arg is not None:
            input_shape = layers[0].input_shape_arg
        if input_shape is not None:
            if not self.layers:
                raise ValueError("give the layers with input_dim/input_shape (or add them and fit)")
            self._infer(input_shape)  # every layer fits, before anything is owned
        for layer in self.layers:
            layer._model = weakref.ref(self)
        self._name_layers()
        if input_shape is not None:
            self._build(input_shape)

    # ------------------------------------------------------------ structure
    def _check_layer(self, layer, name):
        if not isinstance(layer, Layer):
            raise TypeError(f"{name} must be a fastnn layer (Dense, Conv2D, MaxPool2D, Flatten, "
                            f"Dropout), got {type(layer).__name__}")
        owner = layer._model() if layer._model is not None else None
        if owner is not None and owner is not self:
            raise ValueError(f"{name} already belongs to another model; create a new layer")

    def add(self, layer):
        """Append a layer (before the model is built). After ``compile``, the
        loss is checked again against the new last layer by ``fit``,
        ``evaluate`` and ``predict``."""
        self._check_layer(layer, "layer")
        if self.built:
            raise ValueError("the model is built (its weights exist): layers can no longer be "
                             "added")
        if any(layer is other for other in self.layers):
            raise ValueError("this layer is already in the model")
        if not self.layers and layer.input_shape_arg is not None:
            self._infer(layer.input_shape_arg, [layer])
        layer._model = weakref.ref(self)
        self.layers.append(layer)
        self._name_layers()
        self._plans = {}

    @property
    def built(self):
        """Whether the weights exist."""
        return self._params is not None

    @property
    def input_dim(self):
        """The width of a flat input (``input_shape == (input_dim,)``), else None."""
        shape = self.input_shape
        return shape[0] if shape is not None and len(shape) == 1 else None

    @property
    def output_shape(self):
        """The shape of one output (after build)."""
        return None if not self.built else self.layers[-1].output_shape

    @property
    def param_count(self):
        """Number of parameters (weights and biases)."""
        if self.input_shape is None:
            raise ValueError("the model is not built yet (give input_shape/input_dim, or fit)")
        return sum(math.prod(s) for layer in self.layers for s in layer.param_shapes())

    def _infer(self, input_shape, layers=None):
        """Output shapes layer by layer, without changing anything; a layer that
        does not fit raises ``ValueError`` naming it."""
        layers = self.layers if layers is None else layers
        shapes = [tuple(input_shape)]
        for i, layer in enumerate(layers):
            given = layer.input_shape_arg
            if given is not None and given != shapes[-1]:
                raise ValueError(f"{layer._label()} was given input_shape={given} but its input "
                                 f"is {shapes[-1]}")
            if layer.activation in OUTPUT_ACTIVATIONS and i != len(layers) - 1:
                raise ValueError(f"{layer._label()}: activation {layer.activation!r} is only "
                                 f"allowed on the last layer (it belongs to the loss)")
            shapes.append(tuple(layer.compute_output_shape(shapes[-1])))
        return shapes

    def _name_layers(self):
        """Keras' names for the layers given none: dense, dense_1, conv2d, ..."""
        taken = {layer.name for layer in self.layers if layer.name is not None}
        counts = {}
        for layer in self.layers:
            if layer.name is None:
                n = counts.get(layer.kind, 0)
                name = layer.kind if n == 0 else f"{layer.kind}_{n}"
                while name in taken:
                    n += 1
                    name = f"{layer.kind}_{n}"
                layer.name = name
                taken.add(name)
            counts[layer.kind] = counts.get(layer.kind, 0) + 1

    def _build(self, input_shape):
        """Build every layer, allocate the flat parameter buffer and initialise
        it from the model's rng."""
        self._infer(input_shape)
        shape = tuple(input_shape)
        for layer in self.layers:
            shape = layer.build(shape)
        self.input_shape = tuple(input_shape)
        params = np.empty(self.param_count, self.dtype)
        for layer, views in zip(self.layers, self._slice(params)):
            layer.init_params(self._rng, views)
        self._params = params
        self._space = _HOST_SPACE
        self._grads = np.zeros_like(params)
        self._make_views()

    def _slice(self, flat):
        """Per layer, the views of a flat buffer in the model's layout."""
        views, offset = [], 0
        for layer in self.layers:
            mine = []
            for shape in layer.param_shapes():
                size = math.prod(shape)
                mine.append(flat[offset:offset + size].reshape(shape))
                offset += size
            views.append(mine)
        return views

    def _make_views(self):
        self._param_views = self._slice(self._params)
        self._grad_views = self._slice(self._grads)
        for layer, views in zip(self.layers, self._param_views):
            layer.bind_params(views)
        self._plans = {}

    def _bind(self, be):
        """Put the buffers where backend ``be`` keeps arrays (a no-op between
        CPU backends, which share host memory), and forget plans made for
        another backend."""
        if self._plans_backend is not be:
            self._plans = {}
            self._plans_backend = be
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
        """Copies of the parameters as host arrays, layer by layer: ``[w0, b0, w1, b1, ...]``."""
        self._require_built()
        to_host = self._space[3]
        return [np.array(to_host(a)) for views in self._param_views for a in views]

    def set_weights(self, weights):
        """Set the parameters from ``[w0, b0, w1, b1, ...]`` (shapes as ``get_weights``;
        real arrays, converted to the model's dtype). Checks all before writing."""
        self._require_built()
        targets = [a for views in self._param_views for a in views]
        if not isinstance(weights, (list, tuple)) or len(weights) != len(targets):
            raise ValueError(f"weights must be a list of {len(targets)} arrays [w0, b0, ...]")
        host = np.array(self._space[3](self._params))
        flat_views = [a for views in self._slice(host) for a in views]
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
            raise ValueError("the model is not built yet: give input_shape (or input_dim), or "
                             "call fit or predict")

    def _require_layers(self):
        if not self.layers:
            raise ValueError("the model has no layers: give them to Sequential or add them")

    # ------------------------------------------------------------ compile
    def compile(self, loss, optimizer="adam", metrics=None):
        """Choose the loss and the optimizer.

        Parameters
        ----------
        loss : str or fastnn.losses.Loss
            ``"softmax_cross_entropy"`` (integer labels, a last layer of k >= 2
            outputs, the logits), ``"sigmoid_binary_cross_entropy"`` (a last
            ``Dense(1)``, the logit) or ``"mse"``. Keras' names map onto the
            same fused kernels: ``"sparse_categorical_crossentropy"`` with a
            last ``Dense(k, "softmax")`` (the softmax then belongs to the
            loss: it is computed once, fused with the cross-entropy, and
            ``predict`` returns it), ``"binary_crossentropy"`` with a last
            ``Dense(1, "sigmoid")`` (the same for the sigmoid). With the
            canonical names the last layer has no output activation: a
            softmax or sigmoid there would be applied twice, and is refused.
        optimizer : str or fastnn optimizer
            ``"sgd"``, ``"adam"``, ``"adamw"``, ``"rmsprop"`` (defaults) or an
            instance such as ``fn.Adam(lr=1e-3)``; it then belongs to this
            model (its state is the model's).
        metrics : None or list of str
            ``["accuracy"]`` is accepted (accuracy is always reported for the
            classification losses).
        """
        self._require_layers()
        loss = _losses.get(loss)
        self._check_loss(loss, self.output_shape)
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

    def _check_loss(self, loss, output_shape=None):
        """The loss fits the last layer: its output shape and activation."""
        top = self.layers[-1]
        act = top.activation
        if act == "softmax" and not (isinstance(loss, _losses.SoftmaxCrossEntropy) and
                                     loss.fuses_output):
            hint = ("use loss='sparse_categorical_crossentropy' with a softmax last layer, or "
                    "no activation on the last layer with softmax_cross_entropy"
                    if isinstance(loss, _losses.SoftmaxCrossEntropy) else
                    "a softmax last layer goes with loss='sparse_categorical_crossentropy'")
            raise ValueError(f"{top._label()}: the softmax of the last layer would be applied "
                             f"twice or to the wrong loss ({loss.name} applies it itself); "
                             f"{hint}")
        if act == "sigmoid" and isinstance(loss, _losses.SigmoidBinaryCrossEntropy) and \
                not loss.fuses_output:
            raise ValueError(f"{top._label()}: {loss.name} applies the sigmoid itself, so a "
                             f"sigmoid last layer would apply it twice; use "
                             f"loss='binary_crossentropy' with a sigmoid last layer, or no "
                             f"activation on the last layer with {loss.name}")
        if output_shape is None and isinstance(top, Dense):
            output_shape = (top.units,)
        if output_shape is not None:
            if len(output_shape) != 1:
                raise ValueError(f"the model's output has shape {output_shape} per sample; "
                                 f"{loss.name} needs a flat output (batch, units): end with "
                                 f"Flatten() and Dense(units)")
            loss.check_units(output_shape[0])

    def _top_act(self, layer):
        """The activation the last layer's kernels apply: none where the loss
        applies it (fused)."""
        act = layer.kernel_activation
        loss = self.loss
        if loss is not None and loss.fuses_output and layer.activation in ("softmax", "sigmoid"):
            return "identity"
        return act

    def _require_compiled(self, what):
        if self.loss is None:
            raise RuntimeError(f"compile the model (loss and optimizer) before {what}")

    # ------------------------------------------------------------ inputs
    def _input(self, x, name="x", shape=None):
        """``x`` checked: a C-contiguous real array (the caller's own when it is
        one: any real dtype, a memmap too; batches convert it) with samples of
        ``shape`` (the model's input shape by default; any shape when None and
        not built)."""
        if not isinstance(x, np.ndarray):
            try:
                x = np.asarray(x)
            except Exception as exc:
                raise TypeError(f"{name} must be array-like, got {type(x).__name__} "
                                f"({exc})") from None
        if x.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be a real array, got dtype {x.dtype}")
        shape = self.input_shape if shape is None else shape
        if x.ndim < 2:
            want = "(samples, features)" if shape is None or len(shape) == 1 else \
                f"(samples, {', '.join(map(str, shape))})"
            raise ValueError(f"{name} must be {1 + (len(shape) if shape else 1)}-D {want}, got "
                             f"shape {x.shape}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} has no samples")
        if shape is not None and x.shape[1:] != shape:
            if len(shape) == 1 and x.ndim == 2:
                raise ValueError(f"{name} must have {shape[0]} features per sample (the "
                                 f"model's input shape {shape}), got shape {x.shape}")
            hint = ""
            if math.prod(x.shape[1:]) == math.prod(shape):
                hint = (f"; reshape it: {name}.reshape(-1, {', '.join(map(str, shape))})"
                        + (" (or load_mnist(shape='image'))" if len(shape) == 3 else ""))
            raise ValueError(f"{name} must have shape (n, {', '.join(map(str, shape))}) (the "
                             f"model's input shape), got {x.shape}{hint}")
        if 0 in x.shape:
            raise ValueError(f"{name} has no features")
        if not x.flags.c_contiguous:  # batches are gathered from C-ordered rows
            x = np.ascontiguousarray(x)
        return x

    def _xy(self, x, y, xname="x", yname="y", shape=None):
        x = self._input(x, xname, shape)
        y = self.loss.targets(y, x.shape[0], self._units(x.shape[1:]), self.dtype, yname)
        return x, y

    def _units(self, input_shape):
        """Outputs per sample of the last layer (checking the loss against it)."""
        shapes = self._infer(input_shape) if not self.built else \
            [self.layers[-1].output_shape]
        self._check_loss(self.loss, shapes[-1])
        return shapes[-1][0]

    # ------------------------------------------------------------ plans
    def _plan(self, be, batch, training):
        key = (training, batch)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _Plan(self, be, batch, training)
        return plan

    def _needs(self):
        """Per layer: whether a layer at or below it has parameters (so its delta is needed)."""
        needs, seen = [], False
        for layer in self.layers:
            seen = seen or layer.has_params
            needs.append(seen)
        return needs

    def _acts(self):
        acts = [layer.kernel_activation for layer in self.layers]
        acts[-1] = self._top_act(self.layers[-1])
        return acts

    def _alloc(self, be, batch, training):
        bufs = []
        for layer, act, need in zip(self.layers, self._acts(), self._needs()):
            specs = layer.buffer_specs(batch, act, training, need)
            # index buffers (argmax) start at zero: the gates check their values
            bufs.append({k: be.empty(shape, self.dtype) if dt is None else be.zeros(shape, dt)
                         for k, (shape, dt) in specs.items()})
        if not training:  # the loss gradient (evaluate) or the probabilities (predict)
            bufs[-1]["out"] = be.empty((batch,) + self.layers[-1].output_shape, self.dtype)
        return bufs

    def _records(self, bufs, training):
        below = _input_record()
        records = []
        for layer, b, act in zip(self.layers, bufs, self._acts()):
            below = layer.record(b, below, act, training)
            records.append(below)
        return records

    def _make_forward(self, be, plan, ctx):
        """The forward functions of ``plan``'s layers, in order."""
        return [layer.forward_fn(be, b, act, plan.training, ctx)
                for layer, b, act in zip(self.layers, plan.bufs, self._acts())]

    def _make_step(self, be, plan, opt_step, seeds, sync=None):
        """The training step on ``plan``'s buffers: forward, loss, backward and
        (when ``opt_step`` is given) the update, as closures over the kernels.

        ``sync`` (``fastnn.distributed``) makes the step of one rank instead:
        the top delta scaled by ``sync.scale`` (this rank's rows over the
        global batch's), ``sync.layer_done[i]()`` after layer ``i``'s
        backward (starts the sum of its gradients), ``sync.finish()`` before
        the update. A separate closure: the single-process step is unchanged."""
        ctx = _Context(seeds)
        fwd = self._make_forward(be, plan, ctx)
        needs = self._needs()
        bwd = []   # (layer index, function), top layer first
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            if not needs[i]:
                break
            below = plan.records[i - 1] if i > 0 and needs[i - 1] else None
            g = layer.backward_fn(be, plan.bufs[i], plan.records[i], self._grad_views[i],
                                  below, ctx)
            if g is not None:
                bwd.append((i, g))
        top = plan.records[-1]
        top_delta = top.delta
        top_act = top.act
        top_z = top.z
        activation_backward = be.activation_backward
        loss_kernel = getattr(be, self.loss.kernel)
        n_layers = len(fwd)
        ins = [None] * n_layers
        fwd_in = list(zip(range(n_layers), fwd))

        def forward_and_loss(xb, yb):
            a = xb
            for i, f in fwd_in:
                ins[i] = a
                a = f(a)
            loss = loss_kernel(a, yb, top_delta)
            if top_act != "identity":
                activation_backward(top_act, top_delta, top_z, a, top_delta)
            return loss

        def step(xb, yb):
            loss = forward_and_loss(xb, yb)
            for i, g in bwd:
                g(ins[i])
            if opt_step is not None:
                opt_step()
            return loss

        if sync is None:
            return step
        scale, finish, multiply = sync.scale, sync.finish, np.multiply
        bwd_sync = [(i, g, sync.layer_done.get(i)) for i, g in bwd]

        def synced_step(xb, yb):
            loss = forward_and_loss(xb, yb)
            multiply(top_delta, scale, out=top_delta)
            for i, g, done in bwd_sync:
                g(ins[i])
                if done is not None:
                    done()
            finish()
            opt_step()
            return loss

        return synced_step

    def _seeds(self):
        """Dropout seeds: one 64-bit draw from the model's generator per layer and step."""
        return self._rng.bit_generator.random_raw

    def _check_plan(self, plan, xb, yb, optimizer=True):
        """Run the kernel gates once on every call the plan's step makes."""
        if plan.checked:
            return
        gate_step = self._make_step(_Gates, plan, None, lambda: 0)
        gate_step(xb, yb)
        if optimizer:
            self.optimizer._check_flat(self._params, self._grads)
        plan.checked = True

    def _check_forward(self, plan, xb):
        if plan.checked:
            return
        a = xb
        for f in self._make_forward(_Gates, plan, _Context(lambda: 0)):
            a = f(a)
        plan.checked = True

    def _step_for(self, be, plan):
        """The plan's training step, made once per plan and optimizer state (a
        step closes over the state buffers, which ``reset`` or ``load`` replace)."""
        state = self.optimizer._states[0]
        if plan.step is None or plan.step_state is not state:
            plan.step = self._make_step(be, plan, self.optimizer._make_flat_step(
                be, self._params, self._grads), self._seeds())
            plan.step_state = state
        return plan.step

    def _forward_for(self, be, plan):
        if plan.forward is None:
            fwd = self._make_forward(be, plan, _Context(None))

            def forward(x):
                for f in fwd:
                    x = f(x)
                return x
            plan.forward = forward
        return plan.forward

    def _loss_and_grad(self, x, y):
        """Forward and backward on one batch (all of ``x``) with the model's own
        buffers and kernels, without an update: returns the loss and leaves the
        gradient in the flat gradient buffer (for tests and tools). Dropout
        draws its seeds from the model's generator as ``fit`` does."""
        self._require_compiled("computing gradients")
        self._require_layers()
        x, y = self._xy(x, y, shape=None if self.built else self._free_shape(x))
        x = np.ascontiguousarray(x, dtype=self.dtype)
        be = _backend.current()
        if not self.built:
            self._build(x.shape[1:])
        self._bind(be)
        plan = self._plan(be, x.shape[0], True)
        xd, yd = be.from_host(x), be.from_host(y)
        self._check_plan(plan, xd, yd, optimizer=False)
        step = self._make_step(be, plan, None, self._seeds())
        return step(xd, yd)

    @staticmethod
    def _free_shape(x):
        """The sample shape of an input given to a model that is not built."""
        shape = np.shape(x)
        return tuple(shape[1:]) if len(shape) >= 2 else None

    @property
    def params(self):
        """The flat parameter buffer (every layer's parameters are views into it)."""
        return self._params

    @property
    def grads(self):
        """The flat gradient buffer, in the layout of ``params``."""
        return self._grads

    # ------------------------------------------------------------ fit
    def fit(self, x, y, epochs=1, batch_size=32, validation_data=None, validation_split=0.0,
            shuffle=True, seed=None, verbose=1, callbacks=None, check_finite=True, comm=None):
        """Train with mini-batches.

        Parameters
        ----------
        x : array-like (n, *input_shape)
            Any real dtype; a NumPy array (a ``np.memmap`` too) is never
            copied or written: each batch is gathered from it (and converted
            to the model's dtype) in one pass, so memory does not grow with
            the data and data larger than memory trains from a memmap.
        y : array-like
            Integer labels ``(n,)`` (softmax cross-entropy), targets in [0, 1]
            ``(n,)`` or ``(n, 1)`` (sigmoid BCE), or ``(n, units)`` (MSE).
        epochs : int >= 1
        batch_size : int >= 1
            Buffers are sized for ``min(batch_size, n)``; the last batch of an
            epoch may be shorter.
        validation_data : (x_val, y_val), optional
            Evaluated after each epoch (``val_loss``, ``val_accuracy``), batch
            by batch, without a copy.
        validation_split : float in [0, 1)
            Without ``validation_data``: hold out this fraction of the samples,
            taken from the end of ``x`` before any shuffling.
        shuffle : bool or "batch"
            ``True``: a new permutation of the rows every epoch (random reads).
            ``"batch"``: shuffle the order of blocks of 8 batches of
            contiguous rows, then the rows within each block, for sequential
            reads from a memmap on a disk (see ``fastnn._batches``).
            ``False``: in order.
        seed : int, optional
            Seed of the shuffling for this call; by default the model's
            generator (``Sequential(seed=...)``) is used.
        verbose : {0, 1, 2}
            0 silent, 1 a tqdm progress bar per epoch, 2 one line per epoch.
        callbacks : list of fastnn.callbacks.Callback, optional
            Called at the start and end of training and of every epoch, and
            after every batch for those that define ``on_batch_end`` (the
            others cost the step nothing). A callback may set
            ``model.stop_training = True``.
        check_finite : bool
            Refuse an ``x`` or ``y`` holding NaN or inf (a ValueError naming
            the first such row) before training: one pass over the data. A
            single inf would otherwise turn every parameter into NaN. An ``x``
            that is a ``np.memmap`` is checked as the first epoch reads it,
            each batch before its step (a pass first would read the file
            twice): a bad row then stops ``fit`` in that epoch with the
            ValueError, and the model is put back as it was before the call
            (weights, optimizer state, generator, history).
        comm : mpi4py communicator, optional
            Train data-parallel over its ranks (``fastnn.distributed``); by
            default over ``fastnn.distributed.init()``'s, if it was called.
            Every rank gives the same arguments and data of the same shape
            (checked first); ``batch_size`` is then the global batch, rank
            ``r`` of ``N`` computing rows ``[r*B//N, (r+1)*B//N)`` of each.
            Only rank 0 prints. ``MPI.COMM_SELF`` trains on this rank alone.

        Returns
        -------
        History
            ``samples_per_s``: the wall-clock rate of each epoch, data
            movement included; ``step_samples_per_s``: the rate of the
            training steps alone (without gathering batches and bookkeeping).

        Raises
        ------
        RuntimeError
            Before ``compile``.
        TypeError, ValueError
            For a bad argument (each named), checked before anything changes:
            the model is then left exactly as it was.
        """
        self._require_compiled("fit")
        self._require_layers()
        epochs = _validate.integer("epochs", epochs, low=1)
        batch_size = _validate.integer("batch_size", batch_size, low=1)
        validation_split = _validate.real("validation_split", validation_split, low=0, high=1)
        shuffle = _batches.check_shuffle(shuffle)
        if seed is not None:
            seed = _validate.integer("seed", seed, low=0)
        verbose = _verbosity(verbose)
        check_finite = _validate.boolean("check_finite", check_finite)
        callbacks = _callback_list(callbacks)
        shape = None if self.built else self._free_shape(x)
        x, y = self._xy(x, y, shape=shape)
        shape = x.shape[1:]
        val = None
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise TypeError("validation_data must be a pair (x_val, y_val)")
            val = self._xy(*validation_data, xname="validation_data[0]",
                           yname="validation_data[1]", shape=shape)
        elif validation_split > 0:
            n_val = int(math.floor(x.shape[0] * validation_split))
            if n_val < 1 or n_val >= x.shape[0]:
                raise ValueError(f"validation_split={validation_split} of {x.shape[0]} samples "
                                 f"leaves {n_val} for validation and {x.shape[0] - n_val} for "
                                 f"training: both need at least one")
            val = (x[-n_val:], y[-n_val:])
            x, y = x[:-n_val], y[:-n_val]
        self._require_params()
        be = _backend.current()
        dist = _distributed._resolve(comm)
        if dist is not None:
            self._check_distributed(dist, be, x, y, val, shape, epochs, batch_size, shuffle,
                                    seed, callbacks)
            verbose = verbose if dist.rank == 0 else 0
        # a memmap's rows are checked as the first epoch reads them (a pass first
        # would read the file twice: see fastnn._batches), the rest here
        x_as_read = (check_finite and isinstance(x, np.memmap) and dist is None
                     and _space(be) == _HOST_SPACE)
        if check_finite:
            if not x_as_read:
                _check_finite(x, "x")
            _check_finite(y, "y")
            if val is not None:
                _check_finite(val[0], "validation_data[0]")
                _check_finite(val[1], "validation_data[1]")
        # every check has passed: from here on the model changes
        if not self.built:
            self._build(shape)
        self._bind(be)
        opt = self.optimizer
        if not opt._states:
            opt._init_flat(be, self._params.shape[0], self.dtype)
        if dist is not None:
            dist.broadcast_model(self)
        self._save_rank = 0 if dist is None else dist.rank
        n = x.shape[0]
        batch = min(batch_size, n)
        host = self._space == _HOST_SPACE
        source = _batches.Source(be, x, y, self.dtype, host)
        plan = self._plan(be, batch if dist is None else dist.plan_rows(batch), True)
        self._plan_inputs(be, plan, x, y)
        self._check_plan(plan, *source.batch(plan, None, 0, plan.batch))
        full_step = self._step_for(be, plan)
        snapshot = _batches.Snapshot(self, be) if x_as_read else None
        source.check = x_as_read
        # distributed: this rank's parts of the batches, run by trainer.epoch
        trainer = None if dist is None else dist.trainer(self, be, source, plan, batch, n)
        rng = np.random.default_rng(seed) if seed is not None else self._rng
        classification = self.loss.classification
        count_correct = be.count_correct
        keys = (["loss", "accuracy", "val_loss", "val_accuracy"] if classification
                else ["loss", "val_loss"]) + ["samples_per_s", "step_samples_per_s", "lr"]
        history = History(keys, {"epochs": epochs, "batch_size": batch, "samples": n,
                                 "backend": be.name, "shuffle": shuffle,
                                 "ranks": 1 if dist is None else dist.size})
        self.history = history
        self.stop_training = False
        batch_cbs = [cb for cb in callbacks if _overrides(cb, "on_batch_end")]
        for cb in callbacks:
            cb.set_model(self)
        for cb in callbacks:
            cb.on_train_begin({})
        bar_cls = _tqdm() if verbose == 1 else None
        perf_counter = time.perf_counter
        starts = range(0, n, batch) if trainer is None else ()
        for epoch in range(epochs):
            for cb in callbacks:
                cb.on_epoch_begin(epoch, {})
            bar = None
            if bar_cls is not None:
                bar = bar_cls(total=n, desc=f"epoch {epoch + 1}/{epochs}", unit=" samples",
                              leave=True, dynamic_ncols=True, mininterval=0.2)
            total_loss, correct, step_time, seen = 0.0, 0, 0.0, 0
            t0 = perf_counter()
            last_post = t0
            try:
                order = _batches.epoch_order(rng, n, shuffle, batch)
                if trainer is None:
                    source.epoch(order, batch)
                else:   # this rank's rows read ahead; the figures summed over the ranks
                    trainer.stage(order)
                    total_loss, correct, step_time, seen = trainer.epoch(
                        order, bar, batch_cbs, classification)
                for i, start in enumerate(starts):
                    stop = start + batch
                    if stop <= n:
                        step, p = full_step, plan
                    else:
                        stop = n
                        p = plan.view(self, be, n - start)
                        step = self._step_for(be, p)
                    xb, yb = source.batch(p, order, start, stop)
                    if not p.checked:
                        self._check_plan(p, xb, yb)
                    nb = stop - start
                    t = perf_counter()
                    loss = step(xb, yb)
                    step_time += perf_counter() - t
                    total_loss += loss * nb
                    seen = stop
                    if classification:
                        correct += count_correct(p.records[-1].y, yb)
                    if bar is not None:
                        bar.update(nb)
                        now = perf_counter()
                        if now - last_post > 0.5:
                            last_post = now
                            post = {"loss": f"{total_loss / stop:.4f}"}
                            if classification:
                                post["accuracy"] = f"{correct / stop:.4f}"
                            bar.set_postfix(post, refresh=False)
                    if batch_cbs:
                        logs = {"batch": i, "size": nb, "loss": loss}
                        for cb in batch_cbs:
                            cb.on_batch_end(i, logs)
                        if self.stop_training:
                            break
                seconds = perf_counter() - t0
                record = {"loss": total_loss / seen, "samples_per_s": seen / seconds,
                          "step_samples_per_s": seen / step_time if step_time else math.inf}
                if classification:
                    record["accuracy"] = correct / seen
                record["lr"] = opt.lr   # the rate of the next update, as Keras logs it
                if val is not None:
                    ev = self._evaluate(be, *val, _EVAL_BATCH, dist)
                    record.update({"val_" + k: v for k, v in ev.items()})
                for k in keys:
                    if k in record:
                        history.history[k].append(record[k])
                history.epoch.append(epoch)
                for cb in callbacks:
                    cb.on_epoch_end(epoch, record)
                if bar is not None:
                    bar.set_postfix_str(_format_record(record, seconds, with_speed=True),
                                        refresh=False)
                elif verbose == 2:
                    print(f"epoch {epoch + 1}/{epochs} - "
                          f"{_format_record(record, seconds, with_speed=True)}", flush=True)
            except _batches.NotFinite:
                snapshot.restore()   # raised only when checking as read
                raise
            finally:
                source.close()
                if bar is not None:
                    bar.close()
            source.check = False     # every row was checked in the first epoch
            if dist is not None:   # every rank stops together
                self.stop_training = dist.any(self.stop_training)
            if self.stop_training:
                break
        for cb in callbacks:
            cb.on_train_end({k: v[-1] for k, v in history.history.items() if v})
        return history

    def _check_distributed(self, dist, be, x, y, val, shape, epochs, batch_size, shuffle, seed,
                           callbacks):
        """Before a distributed ``fit`` changes anything: a CPU backend, and the
        same data shapes and arguments on every rank (one allgather; a
        difference raises the same ValueError on every rank)."""
        if _space(be) != _HOST_SPACE:
            raise ValueError(f"distributed training runs on the CPU backends (numpy, cython, "
                             f"numba): MPI sums host buffers; backend {be.name!r} keeps them "
                             f"elsewhere")

        def data(a):
            return None if a is None else f"shape {a.shape} {a.dtype}"

        layers = [{k: v for k, v in layer.get_config().items() if k != "name"}
                  for layer in self.layers]
        dist.check_same({
            "x": data(x), "y": data(y),
            "validation x": data(None if val is None else val[0]),
            "validation y": data(None if val is None else val[1]),
            "the model": repr((self.dtype.name, tuple(shape), layers)),
            "the loss": self.loss.alias, "the optimizer": repr(self.optimizer),
            "epochs": epochs, "batch_size": batch_size, "shuffle": shuffle, "seed": seed,
            "the number of callbacks with on_batch_end":
                sum(1 for cb in callbacks if _overrides(cb, "on_batch_end")),
            "the gradient reduction (distributed.init(reduce=...))": dist.reduce,
        })

    def _plan_inputs(self, be, plan, x, y):
        """Give ``plan`` (and its later short views) buffers that batches are
        gathered into: ``x`` rows in the model's dtype, targets as ``y``'s, and a
        host stage for the targets where the backend keeps arrays elsewhere."""
        if plan._inputs is not None and plan._inputs[0].shape[1:] == x.shape[1:] and (
                y is None or (plan._inputs[1].shape[1:] == y.shape[1:]
                              and plan._inputs[1].dtype == y.dtype)):
            return
        b = plan.batch
        xin = be.empty((b,) + x.shape[1:], self.dtype)
        yin = ystage = None
        if y is not None:
            if self._space == _HOST_SPACE:
                yin = np.empty((b,) + y.shape[1:], y.dtype)
            else:
                yin = be.empty((b,) + y.shape[1:], y.dtype)
                ystage = np.empty((b,) + y.shape[1:], y.dtype)
        plan._inputs = (xin, yin, ystage)
        plan.short = {}

    def _require_params(self):
        if not any(layer.has_params for layer in self.layers):
            raise ValueError("the model has no layer with parameters (Dense or Conv2D): there "
                             "is nothing to train")

    # ------------------------------------------------------------ evaluate / predict
    def evaluate(self, x, y, batch_size=None, verbose=0, comm=None):
        """Mean loss (and accuracy) over ``(x, y)``, batch by batch (no copy of
        ``x``; a memmap is read a batch at a time).

        Parameters
        ----------
        x, y : array-like
            As in ``fit``.
        batch_size : int, optional
            Rows per forward pass (default 1024).
        verbose : {0, 1, 2}
            Non-zero prints the result (on rank 0 only when distributed).
        comm : mpi4py communicator, optional
            Split the rows over its ranks and sum the losses (every rank must
            call ``evaluate``); by default ``fastnn.distributed.init()``'s, if
            it was called. ``MPI.COMM_SELF`` evaluates on this rank alone.

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
        dist = _distributed._resolve(comm)
        if dist is not None:
            dist.check_same({"x": f"shape {x.shape} {x.dtype}", "y": f"shape {y.shape} {y.dtype}"})
            verbose = verbose if dist.rank == 0 else 0
        self._bind(be)
        result = self._evaluate(be, x, y, batch_size, dist)
        if verbose:
            print(" - ".join(f"{k}: {v:.4f}" for k, v in result.items()))
        return result

    def _eval_plan(self, be, plan, source, start, stop):
        """The inference plan for rows ``start:stop`` (``plan``, or a view of it
        for a short last batch), checked on its first use."""
        if stop - start != plan.batch:
            plan = plan.view(self, be, stop - start)
        if not plan.checked:
            self._check_forward(plan, source.batch(plan, None, start, stop)[0])
        return plan

    def _evaluate(self, be, x, y, batch_size, dist=None):
        """``{"loss", "accuracy"}`` over ``(x, y)``; with ``dist`` (a
        ``fastnn.distributed`` communicator) over this rank's part of the rows,
        summed over the ranks."""
        if dist is not None:
            return dist.evaluate(self, be, x, y, batch_size)
        n = x.shape[0]
        total, correct = self._eval_sums(be, x, y, batch_size)
        result = {"loss": total / n}
        if self.loss.classification:
            result["accuracy"] = correct / n
        return result

    def _eval_sums(self, be, x, y, batch_size):
        """The sum of the per-row losses and the correct count over ``(x, y)``."""
        n = x.shape[0]
        full = self._plan(be, min(batch_size, n), False)
        self._plan_inputs(be, full, x, y)
        source = _batches.Source(be, x, y, self.dtype, self._space == _HOST_SPACE)
        loss_kernel = getattr(be, self.loss.kernel)
        loss_gate = getattr(_validate, self.loss.kernel)
        total, correct = 0.0, 0
        classification = self.loss.classification
        source.epoch(None, full.batch)
        for start in range(0, n, full.batch):
            stop = min(start + full.batch, n)
            plan = self._eval_plan(be, full, source, start, stop)
            xb, yb = source.batch(plan, None, start, stop)
            grad = plan.bufs[-1]["out"]
            if not plan.loss_checked:
                loss_gate(plan.records[-1].y, y[start:stop], grad)
                plan.loss_checked = True
            logits = self._forward_for(be, plan)(xb)
            total += loss_kernel(logits, yb, grad) * (stop - start)
            if classification:
                correct += be.count_correct(logits, yb)
        return total, correct

    def predict(self, x, batch_size=None):
        """Outputs for ``x``: probabilities for the classification losses
        (softmax rows, or the sigmoid as ``(n, 1)``), the last layer's values
        otherwise (also before ``compile``; a last ``Dense(k, "softmax")``
        gives the softmax). ``x`` is read batch by batch, never copied whole.

        Parameters
        ----------
        x : array-like (n, *input_shape)
        batch_size : int, optional
            Rows per forward pass (default 1024).

        Returns
        -------
        ndarray (n, units) of the model's dtype
        """
        if batch_size is not None:
            batch_size = _validate.integer("batch_size", batch_size, low=1)
        else:
            batch_size = _EVAL_BATCH
        self._require_layers()
        x = self._input(x, shape=None if self.built else self._free_shape(x))
        if self.loss is not None:
            self._check_loss(self.loss, self.layers[-1].output_shape if self.built else
                             self._infer(x.shape[1:])[-1])
        be = _backend.current()
        if not self.built:
            self._build(x.shape[1:])
        self._bind(be)
        n = x.shape[0]
        full = self._plan(be, min(batch_size, n), False)
        host = self._space == _HOST_SPACE
        if not (host and x.dtype == self.dtype and x.flags.c_contiguous):
            self._plan_inputs(be, full, x, None)
        source = _batches.Source(be, x, None, self.dtype, host)
        loss = self.loss
        top = self.layers[-1]
        softmax = loss is None and top.activation == "softmax"
        out = np.empty((n,) + top.output_shape, self.dtype)
        source.epoch(None, full.batch)
        for start in range(0, n, full.batch):
            stop = min(start + full.batch, n)
            plan = self._eval_plan(be, full, source, start, stop)
            logits = self._forward_for(be, plan)(source.batch(plan, None, start, stop)[0])
            dest = out[start:stop] if host else plan.bufs[-1]["out"]
            if loss is not None:
                loss.output(be, logits, dest)
            elif softmax:
                be.softmax(logits, dest)
            elif host:
                dest[...] = logits
            else:
                dest = logits
            if not host:
                out[start:stop] = be.to_host(dest)
        return out

    # ------------------------------------------------------------ summary
    def summary(self, print_fn=print):
        """Print (and return) a table of the layers, output shapes and
        parameter counts, as Keras does."""
        shapes = None
        if self.input_shape is not None:
            shapes = [layer.output_shape for layer in self.layers]
        else:
            self._name_layers()
        rows = [("Layer (type)", "Output Shape", "Param #", "Activation")]
        total = 0
        for i, layer in enumerate(self.layers):
            if shapes is not None:
                count = sum(math.prod(s) for s in layer.param_shapes())
                total += count
                shape = "(None, " + ", ".join(map(str, shapes[i])) + ")"
                count = f"{count:,}"
            else:
                shape, count = "?", "?"
            rows.append((layer._label(), shape, count, layer.activation))
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        line = lambda r: "  ".join(s.ljust(w) for s, w in zip(r, widths)).rstrip()  # noqa: E731
        rule = "=" * len(line(rows[0]))
        shape = None if self.input_shape is None else self.input_shape
        text = [f"Sequential: input_shape={shape}, dtype={self.dtype.name}", rule,
                line(rows[0]), rule] + [line(r) for r in rows[1:]] + [rule]
        if shapes is not None:
            text.append(f"Total params: {total:,} ({total * self.dtype.itemsize / 1e6:.2f} MB, "
                        f"one flat buffer)")
        if self.loss is not None:
            text.append(f"loss: {self.loss.alias}; optimizer: {self.optimizer!r}")
        out = "\n".join(text)
        if print_fn is not None:
            print_fn(out)
        return out

    # ------------------------------------------------------------ save / load
    def get_config(self):
        """The architecture, compile settings and generator state as JSON-able data."""
        config = {
            "format": _FORMAT, "version": _FORMAT_VERSION,
            "dtype": self.dtype.name,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "layers": [layer.get_config() for layer in self.layers],
            "rng": _rng_state(self._rng),
            "compile": None,
        }
        if self.loss is not None:
            opt = self.optimizer
            config["compile"] = {
                "loss": self.loss.alias, "metrics": list(self.metrics),
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
        ``path`` is used as given (no suffix is added). The file gets the mode
        a new file gets under the process' umask (0644 under the usual 022).
        In data-parallel training (``fastnn.distributed``) only rank 0 writes:
        the other ranks return at once (their models are the same).
        """
        self._require_built()
        if _distributed.skip_save(self):
            return
        path = os.fspath(path)
        to_host = self._space[3]
        arrays = {"config": np.array(json.dumps(self.get_config())),
                  "params": np.array(to_host(self._params))}
        if self.optimizer is not None:
            for k, a in self.optimizer._state_arrays().items():
                arrays["opt_" + k] = np.array(to_host(a))
        _files.write_atomic(path, lambda f: _write_npz(f, arrays))

    def export_onnx(self, path, opset=17):
        """Write the model as an ONNX file that computes ``predict`` (probabilities
        for the classification losses), for ONNX Runtime and other runtimes.

        Needs the ``onnx`` package (``pip install "fastnn[onnx]"``). The folder
        of ``path`` is checked first (it must exist and be writable), the file
        is written atomically, and the graph is checked with
        ``onnx.checker``. See ``fastnn.onnx_export`` for the operators used.

        Returns
        -------
        str
            ``path``.
        """
        from . import onnx_export

        return onnx_export.export_onnx(self, path, opset)


def _callback_list(callbacks):
    if callbacks is None:
        return []
    if not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"callbacks must be a list of fastnn.callbacks.Callback, got "
                        f"{type(callbacks).__name__}")
    from .callbacks import Callback

    for i, cb in enumerate(callbacks):
        if not isinstance(cb, Callback):
            raise TypeError(f"callbacks[{i}] must be a fastnn.callbacks.Callback, got "
                            f"{type(cb).__name__}")
    return list(callbacks)


def _overrides(obj, method):
    """Whether ``obj``'s class defines ``method`` itself (not the base's no-op)."""
    from .callbacks import Callback

    return getattr(type(obj), method) is not getattr(Callback, method)


#: rows per chunk of the finite check (a few MB at a time, whatever the dtype)
_FINITE_CHUNK_BYTES = 1 << 22


def _check_finite(a, name):
    """ValueError naming the first row of ``a`` that holds a NaN or an inf (one
    pass, in chunks; integer data is always finite)."""
    if a.dtype.kind not in "fc":
        return
    rows = max(1, _FINITE_CHUNK_BYTES // max(1, a[:1].nbytes))
    flat = a.reshape(a.shape[0], -1)
    pages = _batches.Pages(a)
    for start in range(0, a.shape[0], rows):
        chunk = flat[start:start + rows]
        pages.read(chunk.nbytes)
        ok = np.isfinite(chunk).all(axis=1) if chunk.ndim == 2 else np.isfinite(chunk)
        if not ok.all():
            row = start + int(np.argmin(ok))
            raise ValueError(f"{name} holds NaN or inf, first in row {row}; fix the data (or "
                             f"fit(check_finite=False) to train on it anyway)")


def _input_record():
    return Record("identity", None, None, None)


def _write_npz(fileobj, arrays):
    """The writer ``save`` uses (a seam for tests that make writing fail)."""
    np.savez(fileobj, **arrays)


def load_model(path):
    """Read a model written by ``Sequential.save`` (with ``allow_pickle=False``).

    Format versions 1 (Dense layers and ``input_dim``) and 2 (any layers and
    ``input_shape``) are read.

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
        A corrupt, truncated, edited or foreign file (the message says what is
        wrong); sizes are checked against the stored arrays before anything
        is allocated.
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
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError,
            json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a valid fastnn model file: {exc}") from None


def _field(mapping, key, kind, what):
    if not isinstance(mapping, dict) or key not in mapping:
        raise ValueError(f"{what} has no {key!r}")
    value = mapping[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ValueError(f"{what}[{key!r}] has the wrong type ({type(value).__name__})")
    return value


def _from_arrays(arrays):
    if "config" not in arrays or "params" not in arrays:
        raise ValueError("the arrays 'config' and 'params' are missing")
    cfg_arr = arrays["config"]
    if cfg_arr.dtype.kind != "U" or cfg_arr.ndim != 0:
        raise ValueError("'config' is not a JSON string")
    config = json.loads(str(cfg_arr[()]))
    if not isinstance(config, dict) or config.get("format") != _FORMAT:
        raise ValueError("no fastnn.Sequential configuration inside")
    version = config.get("version")
    if version not in _READS_VERSIONS:
        raise ValueError(f"format version {version!r} is not supported (this fastnn reads "
                         f"versions {', '.join(map(str, _READS_VERSIONS))})")
    dtype = _field(config, "dtype", str, "config")
    if version == 1:
        dim = config.get("input_dim")
        input_shape = None if dim is None else [dim]
    else:
        input_shape = config.get("input_shape")
    if input_shape is not None:
        if not isinstance(input_shape, list) or not input_shape or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in input_shape):
            raise ValueError(f"input shape {input_shape!r} is not a list of sizes >= 1")
    layer_cfgs = _field(config, "layers", list, "config")
    layers = []
    for i, lc in enumerate(layer_cfgs):
        name = _field(lc, "class_name", str, f"layers[{i}]")
        cls = LAYER_CLASSES.get(name)
        if cls is None or (version == 1 and cls is not Dense):
            raise ValueError(f"unknown layer {name!r}")
        try:
            layers.append(cls.from_config(lc))
        except TypeError as exc:
            raise ValueError(f"layers[{i}] ({name}): {exc}") from None
    params = arrays["params"]
    model = Sequential(layers, dtype=dtype)
    if input_shape is None:
        if params.size:
            raise ValueError("a model without an input shape has no parameters to store")
    else:
        model._infer(tuple(input_shape))   # every layer fits; allocates nothing
        shape = tuple(input_shape)
        for layer in layers:               # shapes only: param_shapes needs them
            shape = layer.build(shape)
        count = sum(math.prod(s) for layer in layers for s in layer.param_shapes())
        if params.dtype != model.dtype or params.shape != (count,):
            raise ValueError(f"'params' has shape {params.shape} and dtype {params.dtype}; the "
                             f"architecture needs ({count},) {model.dtype}")
        model._build(tuple(input_shape))
        model._params[...] = params
    model._rng = _rng_from_state(_field(config, "rng", dict, "config"))
    comp = config.get("compile")
    if comp is not None:
        opt_cfg = _field(comp, "optimizer", dict, "compile")
        opt = _optim.from_config(_field(opt_cfg, "class_name", str, "optimizer"),
                                 _field(opt_cfg, "config", dict, "optimizer"))
        metrics = comp.get("metrics") or None
        model.compile(_field(comp, "loss", str, "compile"), opt, metrics)
        names = comp.get("optimizer_state", [])
        if not isinstance(names, list) or not all(isinstance(k, str) for k in names):
            raise ValueError("'optimizer_state' is not a list of names")
        step = _validate.integer("optimizer_step", comp.get("optimizer_step"), low=0)
        if names or step:
            if not model.built:
                raise ValueError("optimizer state without parameters")
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
    name = _field(state, "bit_generator", str, "rng")
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
