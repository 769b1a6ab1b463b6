"""Layers for ``fastnn.Sequential``, and the protocol they share.

A layer is a small object that builds itself from its input shape (Keras'
way): it says, once, its output shape, the shapes of its parameters (views
into the model's one flat parameter buffer and, in the same layout, the flat
gradient buffer), how to initialise them, which buffers it needs per batch,
and whether its backward pass folds in the activation derivative of the layer
below (Dense, Conv2D and MaxPool2D do: that is how ``backprop_delta`` stays
one pass). Per plan (a batch size, training or inference) it is handed a
backend and its buffers and returns its forward and backward functions, which
call the backend's contract kernels directly. ``Sequential`` runs the list and
knows nothing of what a layer computes.

Shapes exclude the batch: ``Dense`` takes ``(features,)``, ``Conv2D`` and
``MaxPool2D`` take images ``(height, width, channels)`` (channels-last, as
Keras), ``Flatten`` any shape.

The protocol, for a layer ``L`` (see ``Layer`` for the exact signatures):

* ``L.compute_output_shape(input_shape)``: pure, raises ``ValueError`` naming
  the layer when the input does not fit; ``L.build(input_shape)`` records it.
* ``L.param_shapes()`` and ``L.init_params(rng, arrays)``.
* ``L.buffer_specs(batch, act, training, need_delta)``: the arrays a plan
  allocates for it (``y`` its output, ``z`` its pre-activation when the
  derivative needs it, ``delta`` the gradient of the loss with respect to its
  pre-activation, and extras such as ``argmax``).
* ``L.record(bufs, below, act, training)``: the ``Record`` (activation, z, y,
  delta) that the layer above sees; ``Flatten`` passes its input's through.
* ``L.forward_fn(be, bufs, act, training, ctx)`` returns ``f(x) -> y`` and
  ``L.backward_fn(be, bufs, rec, grads, below, ctx)`` returns ``g(x)`` that
  writes the parameter gradients and, when ``below`` is given, the delta of
  the layer below (with its activation derivative applied).
"""

import functools
import math
from collections import namedtuple

import numpy as np

from . import _validate
from .kernels.reference import ACTIVATIONS, Z_ACTIVATIONS

__all__ = ["Layer", "Dense", "Conv2D", "MaxPool2D", "MaxPooling2D", "Flatten", "Dropout",
           "Record", "HE_ACTIVATIONS", "OUTPUT_ACTIVATIONS", "LAYER_CLASSES"]

#: Activations initialised with He's normal scheme (ReLU-like); the others
#: (identity, sigmoid, tanh) with Glorot's uniform scheme.
HE_ACTIVATIONS = ("relu", "leaky_relu", "gelu", "silu", "softplus")
#: Activations a last ``Dense`` may have that belong to the loss (Keras' way of
#: writing a classifier): ``softmax`` with ``sparse_categorical_crossentropy``.
OUTPUT_ACTIVATIONS = ("softmax",)

Record = namedtuple("Record", "act z y delta")
Record.__doc__ = """What a layer's output is to the layer above it.

act : str
    The activation whose derivative turns a gradient with respect to ``y``
    into one with respect to the pre-activation (``"identity"`` for layers
    without one).
z, y : arrays or None
    Pre-activation (when the derivative needs it) and output.
delta : array or None
    Where the gradient with respect to the pre-activation goes (None where no
    layer below has parameters, so no delta is needed).
"""


def _pair(layer, name, value):
    """An int or a pair of ints >= 1, as a tuple."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))
                   for v in value)):
        raise TypeError(f"{layer}: {name} must be an int or a pair of ints, got {value!r}")
    if min(value) < 1:
        raise ValueError(f"{layer}: {name} must be >= 1, got {tuple(value)}")
    return (int(value[0]), int(value[1]))


def _activation(layer, activation, extra=()):
    if activation is None:
        return "identity"
    if not isinstance(activation, str):
        raise TypeError(f"{layer}: activation must be a name (str), got "
                        f"{type(activation).__name__}")
    if activation not in ACTIVATIONS and activation not in extra:
        raise ValueError(f"{layer}: unknown activation {activation!r}; choose one of "
                         f"{', '.join(ACTIVATIONS + tuple(extra))}")
    return activation


def _shape_arg(layer, name, shape):
    if shape is None:
        return None
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, (bool, np.bool_)):
        shape = (shape,)
    if (not isinstance(shape, (tuple, list)) or not shape
            or any(isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer))
                   for s in shape)):
        raise TypeError(f"{layer}: {name} must be a tuple of ints, got {shape!r}")
    if min(shape) < 1:
        raise ValueError(f"{layer}: {name} must hold sizes >= 1, got {tuple(shape)}")
    return tuple(int(s) for s in shape)


def _init(rng, w, initializer, fan_in, fan_out):
    """He normal ``N(0, 2/fan_in)`` or Glorot uniform ``U(-a, a)``, ``a = sqrt(6/(fan_in+fan_out))``."""
    if initializer == "he_normal":
        rng.standard_normal(out=w, dtype=w.dtype)
        w *= (2.0 / fan_in) ** 0.5
    else:
        limit = (6.0 / (fan_in + fan_out)) ** 0.5
        rng.random(out=w, dtype=w.dtype)
        w *= 2 * limit
        w -= limit


class Layer:
    """Base class of the layer protocol (see the module docstring).

    Parameters
    ----------
    name : str, optional
        Shown by ``summary``; by default the model names it as Keras does
        (``dense``, ``dense_1``, ...).
    input_shape : tuple of int, optional
        The shape of one sample, on the first layer (Keras' way); the model's
        ``input_shape`` may give it instead.
    """

    #: the Keras base name (``summary`` numbers them: dense, dense_1, ...)
    kind = "layer"
    #: whether ``backward_fn`` applies the activation derivative of the layer below
    folds_below = True
    #: whether it has parameters (views into the model's flat buffer)
    has_params = False

    def __init__(self, name=None, input_shape=None):
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        self.name = name
        self.input_shape_arg = _shape_arg(self._label(), "input_shape", input_shape)
        self.input_shape = None
        self.output_shape = None
        self.params = []
        self._model = None

    # ---- description
    def _label(self):
        return f"{self.name or self.kind} ({type(self).__name__})"

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._args().items())})"

    def _args(self):
        return {}

    @property
    def activation(self):
        """The activation this layer applies (``"identity"`` for none)."""
        return "identity"

    @property
    def kernel_activation(self):
        """The activation its kernels apply (a contract activation)."""
        return self.activation

    @property
    def initializer(self):
        """How ``init_params`` fills the weights (``None`` without parameters)."""
        return None

    def get_config(self):
        """The JSON-able description ``save`` stores."""
        config = {"class_name": type(self).__name__, "name": self.name}
        config.update(self._args())
        if self.input_shape_arg is not None:
            config["input_shape"] = list(self.input_shape_arg)
        return config

    @classmethod
    def from_config(cls, config):
        """Rebuild from ``get_config()`` (each argument checked as in the constructor)."""
        config = dict(config)
        config.pop("class_name", None)
        return cls(**config)

    # ---- shapes and parameters
    def compute_output_shape(self, input_shape):
        """The output shape for ``input_shape`` (no batch); ``ValueError`` naming
        the layer when the input does not fit. Changes nothing."""
        return tuple(input_shape)

    def build(self, input_shape):
        """Record the input and output shapes (after ``compute_output_shape``)."""
        self.output_shape = self.compute_output_shape(input_shape)
        self.input_shape = tuple(input_shape)
        return self.output_shape

    def param_shapes(self):
        """Shapes of the parameter arrays, in their order in the flat buffer."""
        return []

    def init_params(self, rng, arrays):
        """Fill the host arrays (shapes ``param_shapes()``) from ``rng``."""

    def bind_params(self, arrays):
        """Hold the views of the model's parameter buffer."""
        self.params = list(arrays)

    # ---- per plan
    def buffer_specs(self, batch, act, training, need_delta):
        """``{name: (shape, dtype or None)}`` of the buffers a plan allocates
        (dtype None: the model's). ``need_delta``: some layer at or below this
        one has parameters."""
        shape = (batch,) + self.output_shape
        specs = {"y": (shape, None)}
        if training and need_delta:
            specs["delta"] = (shape, None)
            if act in Z_ACTIVATIONS:
                specs["z"] = (shape, None)
        return specs

    def record(self, bufs, below, act, training):
        """The ``Record`` the layer above sees."""
        return Record(act, bufs.get("z"), bufs["y"], bufs.get("delta"))

    def forward_fn(self, be, bufs, act, training, ctx):
        """``f(x) -> y``: the forward pass on the plan's buffers."""
        raise NotImplementedError

    def backward_fn(self, be, bufs, rec, grads, below, ctx):
        """``g(x)``: parameter gradients into ``grads`` and, when ``below`` is
        a Record, the delta of the layer below; or None when there is nothing
        to do."""
        return None


def _gemm_forward(layer, kernel, bufs, act, extra):
    """``f(x)`` of a layer with weights and bias (Dense, Conv2D): ``kernel(x, w,
    b, act, y, z, *extra)``, the contract's ``dense_forward`` / ``conv2d_forward``."""
    w, b = layer.params
    y, z = bufs["y"], bufs.get("z")
    if extra:
        stride, pads = extra

        def forward_strided(x):
            kernel(x, w, b, act, y, z, stride, pads)
            return y
        return forward_strided

    def forward(x):   # no *extra: a call with * costs a tuple per step
        kernel(x, w, b, act, y, z)
        return y
    return forward


def _gemm_backward(layer, backward, backprop, rec, grads, below, extra):
    """``g(x)`` of a layer with weights and bias: ``backward(x, delta, dw, db,
    *extra)`` for its gradients, then, when a layer below needs it,
    ``backprop(delta, w, z, y, act, delta_below, *extra)`` with the activation
    derivative of the layer below fused in."""
    dw, db = grads
    delta = rec.delta
    if extra:   # stride and padding, bound to the kernels once
        stride, pads = extra
        backward = functools.partial(_call_with, backward, stride, pads)
        backprop = functools.partial(_call_with, backprop, stride, pads)
    if below is None:
        def grad(x):
            backward(x, delta, dw, db)
        return grad
    w = layer.params[0]
    b_act, b_z, b_y, b_delta = below.act, below.z, below.y, below.delta

    def grad_and_delta(x):
        backward(x, delta, dw, db)
        backprop(delta, w, b_z, b_y, b_act, b_delta)
    return grad_and_delta


def _call_with(kernel, stride, pads, *args):
    return kernel(*args, stride, pads)


# ---------------------------------------------------------------- Dense

class _WeightsAndBias:
    """``w`` and ``b``: a layer's two parameter arrays once built (else None)."""

    @property
    def w(self):
        return self.params[0] if self.params else None

    @property
    def b(self):
        return self.params[1] if self.params else None


class Dense(_WeightsAndBias, Layer):
    """A fully connected layer: ``y = act(x @ w + b)``.

    Parameters
    ----------
    units : int
        Output width (>= 1).
    activation : str or None
        One of identity (default; also None), relu, leaky_relu, sigmoid, tanh,
        gelu, silu, softplus; on the last layer also ``"softmax"`` (with the
        loss ``sparse_categorical_crossentropy``, which then applies it fused
        with the cross-entropy) or ``"sigmoid"`` with ``binary_crossentropy``
        (the same). With ``softmax_cross_entropy`` or
        ``sigmoid_binary_cross_entropy`` the last layer stays identity: its
        output is the logits, and the loss applies softmax or sigmoid.
    name : str, optional
    input_shape : tuple, optional
        ``(features,)`` on a first layer.

    Attributes
    ----------
    w : ndarray (input_dim, units)
        Weights, once the model is built (a view into the model's buffer);
        initialised ``N(0, 2/input_dim)`` (He) for ReLU-like activations, else
        ``U(-a, a)`` with ``a = sqrt(6/(input_dim + units))`` (Glorot).
    b : ndarray (units,)
        Biases, initialised to zero.
    """

    kind = "dense"
    has_params = True

    def __init__(self, units, activation="identity", name=None, input_shape=None):
        super().__init__(name, input_shape)
        self.units = _validate.integer("units", units, low=1)
        self._act = _activation(self._label(), activation, OUTPUT_ACTIVATIONS)

    def _args(self):
        return {"units": self.units, "activation": self._act}

    def __repr__(self):
        return f"Dense({self.units}, {self._act!r})"

    @property
    def activation(self):
        return self._act

    @property
    def kernel_activation(self):
        return "identity" if self._act in OUTPUT_ACTIVATIONS else self._act

    @property
    def initializer(self):
        """``"he_normal"`` or ``"glorot_uniform"``."""
        return "he_normal" if self._act in HE_ACTIVATIONS else "glorot_uniform"

    @property
    def input_dim(self):
        return None if self.input_shape is None else self.input_shape[0]

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 1:
            raise ValueError(f"{self._label()} needs a flat input (features,), got "
                             f"{tuple(input_shape)}: put a Flatten() before it")
        return (self.units,)

    def param_count(self, input_dim):
        """``input_dim*units + units``."""
        return input_dim * self.units + self.units

    def param_shapes(self):
        return [(self.input_shape[0], self.units), (self.units,)]

    def init_params(self, rng, arrays):
        w, b = arrays
        _init(rng, w, self.initializer, w.shape[0], w.shape[1])
        b[...] = 0

    def init_weights(self, rng, w, b):
        """Fill host arrays ``w (input_dim, units)`` and ``b`` from ``rng``."""
        self.init_params(rng, (w, b))

    def forward_fn(self, be, bufs, act, training, ctx):
        return _gemm_forward(self, be.dense_forward, bufs, act, ())

    def backward_fn(self, be, bufs, rec, grads, below, ctx):
        return _gemm_backward(self, be.dense_backward, be.backprop_delta, rec, grads, below, ())


# ---------------------------------------------------------------- Conv2D

def conv_padding(padding, size, kernel, stride):
    """Keras padding for one axis: ``"valid"`` is ``(0, 0)``; ``"same"`` pads to
    an output of ``ceil(size / stride)`` with ``max((out - 1)*stride + kernel -
    size, 0)`` zeros in all, the extra one after (bottom or right)."""
    if padding == "valid":
        return 0, 0
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2D(_WeightsAndBias, Layer):
    """A 2-D convolution over channels-last images: ``y = act(conv(x, w) + b)``.

    ``z[n,p,q,o] = b[o] + sum_{i,j,c} xpad[n, p*sh+i, q*sw+j, c] * w[i,j,c,o]``
    (``fastnn.ops.conv2d_forward``).

    Parameters
    ----------
    filters : int
        Output channels.
    kernel_size : int or (int, int)
    activation : str or None
        As ``Dense`` (no ``softmax``).
    strides : int or (int, int)
    padding : {"valid", "same"}
        ``"valid"``: no padding, output ``(size - k) // stride + 1``;
        ``"same"``: output ``ceil(size / stride)``, the extra pad at the
        bottom/right (as Keras and TensorFlow).
    name : str, optional
    input_shape : (height, width, channels), optional
        On a first layer.

    Attributes
    ----------
    w : ndarray (kh, kw, channels, filters)
        He normal (fan-in ``kh*kw*channels``) for ReLU-like activations, else
        Glorot uniform (fan-in + fan-out ``kh*kw*(channels + filters)``).
    b : ndarray (filters,)
        Zero.
    """

    kind = "conv2d"
    has_params = True

    def __init__(self, filters, kernel_size, activation=None, strides=(1, 1), padding="valid",
                 name=None, input_shape=None):
        super().__init__(name, input_shape)
        label = self._label()
        self.filters = _validate.integer("filters", filters, low=1)
        self.kernel_size = _pair(label, "kernel_size", kernel_size)
        self.strides = _pair(label, "strides", strides)
        if not isinstance(padding, str) or padding.lower() not in ("valid", "same"):
            raise ValueError(f"{label}: padding must be 'valid' or 'same', got {padding!r}")
        self.padding = padding.lower()
        self._act = _activation(label, activation)
        self.pads = None

    def _args(self):
        return {"filters": self.filters, "kernel_size": list(self.kernel_size),
                "activation": self._act, "strides": list(self.strides), "padding": self.padding}

    @property
    def activation(self):
        return self._act

    @property
    def initializer(self):
        return "he_normal" if self._act in HE_ACTIVATIONS else "glorot_uniform"

    def _geometry(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"{self._label()} needs an image input (height, width, channels), "
                             f"got {tuple(input_shape)}")
        (h, w, _), (kh, kw), (sh, sw) = input_shape, self.kernel_size, self.strides
        top, bottom = conv_padding(self.padding, h, kh, sh)
        left, right = conv_padding(self.padding, w, kw, sw)
        p = (h + top + bottom - kh) // sh + 1
        q = (w + left + right - kw) // sw + 1
        if h + top + bottom < kh or w + left + right < kw:
            raise ValueError(f"{self._label()}: the kernel {self.kernel_size} is larger than "
                             f"its {self.padding}-padded input {tuple(input_shape[:2])}")
        return (top, bottom, left, right), (p, q)

    def compute_output_shape(self, input_shape):
        _, (p, q) = self._geometry(input_shape)
        return (p, q, self.filters)

    def build(self, input_shape):
        self.pads, _ = self._geometry(input_shape)
        return super().build(input_shape)

    def param_shapes(self):
        kh, kw = self.kernel_size
        return [(kh, kw, self.input_shape[2], self.filters), (self.filters,)]

    def init_params(self, rng, arrays):
        w, b = arrays
        kh, kw, c, o = w.shape
        _init(rng, w, self.initializer, kh * kw * c, kh * kw * o)
        b[...] = 0

    def forward_fn(self, be, bufs, act, training, ctx):
        return _gemm_forward(self, be.conv2d_forward, bufs, act, (self.strides, self.pads))

    def backward_fn(self, be, bufs, rec, grads, below, ctx):
        return _gemm_backward(self, be.conv2d_backward, be.conv2d_backprop, rec, grads, below,
                              (self.strides, self.pads))


# ---------------------------------------------------------------- pooling

class MaxPool2D(Layer):
    """Max pooling over channels-last images, without padding (Keras' ``"valid"``).

    ``y[n,p,q,c] = max_{i<ph, j<pw} x[n, p*sh+i, q*sw+j, c]``; a NaN in a window
    is its maximum. Output ``(size - pool) // stride + 1`` per axis.

    Parameters
    ----------
    pool_size : int or (int, int)
    strides : int, (int, int) or None
        None: the pool size (windows that do not overlap).
    name : str, optional
    input_shape : (height, width, channels), optional
    """

    kind = "max_pooling2d"

    def __init__(self, pool_size=(2, 2), strides=None, name=None, input_shape=None):
        super().__init__(name, input_shape)
        self.pool_size = _pair(self._label(), "pool_size", pool_size)
        self.strides = self.pool_size if strides is None else \
            _pair(self._label(), "strides", strides)

    def _args(self):
        return {"pool_size": list(self.pool_size), "strides": list(self.strides)}

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"{self._label()} needs an image input (height, width, channels), "
                             f"got {tuple(input_shape)}")
        h, w, c = input_shape
        (ph, pw), (sh, sw) = self.pool_size, self.strides
        if ph > h or pw > w:
            raise ValueError(f"{self._label()}: the pool {self.pool_size} is larger than its "
                             f"input {(h, w)}")
        return ((h - ph) // sh + 1, (w - pw) // sw + 1, c)

    def buffer_specs(self, batch, act, training, need_delta):
        specs = super().buffer_specs(batch, act, training, need_delta)
        specs["argmax"] = ((batch,) + self.output_shape, np.dtype(np.int32))
        return specs

    def forward_fn(self, be, bufs, act, training, ctx):
        y, argmax = bufs["y"], bufs["argmax"]
        pool, stride = self.pool_size, self.strides
        kernel = be.maxpool2d_forward

        def forward(x):
            kernel(x, y, argmax, pool, stride)
            return y
        return forward

    def backward_fn(self, be, bufs, rec, grads, below, ctx):
        if below is None:
            return None
        argmax, delta = bufs["argmax"], rec.delta
        pool, stride = self.pool_size, self.strides
        backward = be.maxpool2d_backward
        b_act, b_z, b_y, b_delta = below.act, below.z, below.y, below.delta

        def to_below(x):
            backward(delta, argmax, b_z, b_y, b_act, b_delta, pool, stride)
        return to_below


MaxPooling2D = MaxPool2D


# ---------------------------------------------------------------- Flatten

class Flatten(Layer):
    """A reshape to ``(batch, features)``, row-major (a flattened NHWC image
    is a free view). It costs nothing: its output and its delta are views of
    its input's, and the layer above folds in the activation derivative of the
    layer below it."""

    kind = "flatten"

    def compute_output_shape(self, input_shape):
        return (math.prod(input_shape),)

    def buffer_specs(self, batch, act, training, need_delta):
        return {}

    def record(self, bufs, below, act, training):
        def flat(a):
            return None if a is None else a.reshape(a.shape[0], -1)
        return Record(below.act, flat(below.z), flat(below.y), flat(below.delta))

    def forward_fn(self, be, bufs, act, training, ctx):
        def forward(x):
            return x.reshape(x.shape[0], -1)
        return forward


# ---------------------------------------------------------------- Dropout

class Dropout(Layer):
    """Inverted dropout: in ``fit``, each element is kept with probability
    ``1 - rate`` and scaled by ``1 / (1 - rate)``, the others are 0; in
    ``evaluate`` and ``predict`` it is the identity.

    The mask is a pure function of a 64-bit seed and the element's index
    (``fastnn.ops.dropout_forward``): the model draws one seed per step from
    its generator, so no mask is stored and every backend draws the same one.

    Parameters
    ----------
    rate : float in [0, 1)
    name : str, optional
    """

    kind = "dropout"
    folds_below = False

    def __init__(self, rate, name=None, input_shape=None):
        super().__init__(name, input_shape)
        rate = _validate.real("rate", rate, low=0, high=1)
        self.rate = rate

    def _args(self):
        return {"rate": self.rate}

    def buffer_specs(self, batch, act, training, need_delta):
        if not training:
            return {}
        return super().buffer_specs(batch, act, training, need_delta)

    def record(self, bufs, below, act, training):
        if not training:
            return below
        return super().record(bufs, below, act, training)

    def forward_fn(self, be, bufs, act, training, ctx):
        if not training:
            def identity(x):
                return x
            return identity
        y, rate, seeds = bufs["y"], self.rate, ctx.seeds
        seed = ctx.seed_cell(self)
        kernel = be.dropout_forward

        def forward(x):
            seed[0] = s = seeds()
            kernel(x, rate, s, y)
            return y
        return forward

    def backward_fn(self, be, bufs, rec, grads, below, ctx):
        if below is None:
            return None
        rate, delta, seed = self.rate, rec.delta, ctx.seed_cell(self)
        backward = be.dropout_backward
        b_act, b_z, b_y, b_delta = below.act, below.z, below.y, below.delta
        if b_act == "identity":
            def to_below(x):
                backward(delta, rate, seed[0], b_delta)
            return to_below
        activation_backward = be.activation_backward

        def to_below_act(x):
            backward(delta, rate, seed[0], b_delta)
            activation_backward(b_act, b_delta, b_z, b_y, b_delta)
        return to_below_act


#: Classes ``load_model`` rebuilds, by ``class_name``.
LAYER_CLASSES = {cls.__name__: cls for cls in (Dense, Conv2D, MaxPool2D, Flatten, Dropout)}
