"""ONNX export of a trained ``Sequential`` (``model.export_onnx(path)``).

Needs the ``onnx`` package (``pip install "fastnn[onnx]"``, which also brings
``onnxruntime`` to run the file); it is imported only here, only when
exporting.

The graph computes what ``model.predict`` returns, in the model's dtype:

* input ``"input"`` of shape ``(N, *input_shape)``, as ``predict`` takes it
  (images channels-last, NHWC); output ``"output"``, ``(N, *output_shape)``;
* ``Dense``: ``Gemm(x, w, b)`` (``y = x @ w + b``), then its activation;
* ``Conv2D``: in float32, ``Conv`` in NCHW with the weights as ``(out, in,
  kh, kw)``, explicit ``pads`` (ONNX's order: top, left, bottom, right) and
  ``strides``. ONNX Runtime has no double ``Conv`` kernel (1.32), so in
  float64 the same convolution is written in NHWC as im2col: ``Pad``, one
  strided ``Slice`` per kernel position, ``Concat`` on the channels (the
  order of ``w.reshape(kh*kw*c, filters)``), one ``MatMul``, ``Add`` the bias;
* ``MaxPool2D``: ``MaxPool`` in NCHW (no padding, floor mode, as fastnn);
* ``Flatten``: ``Flatten(axis=1)`` of the NHWC tensor, so the order equals
  fastnn's row-major flatten; ``Dropout``: left out (identity at inference).

Layouts: the input stays NHWC until an operator needs NCHW (``Conv``,
``MaxPool``); one ``Transpose`` goes there and one back before anything that
needs NHWC (``Flatten``, the float64 convolution, the output).

Activations: relu ``Relu``; sigmoid ``Sigmoid``; tanh ``Tanh``; leaky_relu
``LeakyRelu(alpha=0.01)`` (float64: ``Max(z, 0.01*z)``, no double kernel in
ONNX Runtime); softplus ``Softplus`` (ONNX's ``log(exp(z) + 1)``; ONNX
Runtime's float kernel matched fastnn's ``log1p(exp(-|z|)) + max(z, 0)`` to
2.2e-7 relative over [-100, 1000]; float64 has no kernel, so it is composed
as ``max(z, 0) + log1p(exp(-|z|))`` with Kahan's ``log1p(e) = e*log(u)/(u-1)``,
``u = 1 + e``, or ``e`` where ``u == 1``); gelu (tanh form) as fastnn computes
it, ``z * sigmoid(2*sqrt(2/pi)*(z + 0.044715*z^3))`` from primitives (ONNX's
``Gelu(approximate="tanh")``, opset 20, computes ``0.5*z*(1 + tanh(u))``,
whose ``1 + tanh`` cancels in the negative tail: measured in ONNX Runtime
1.32, 30 % relative error at z = -5 in float32); silu ``z * sigmoid(z)``. In
silu and gelu the sigmoid is fastnn's ``exp(min(z, 0)) / (1 + exp(-|z|))``
from primitives: ONNX Runtime's ``Sigmoid`` is off by up to 6e-8 absolute in
float32 in the negative tail (and 1e-3 relative at z = -30 in float64), an
error these two multiply by ``|z|`` (1.4e-6 at z = -17 in float32).

Output function, as ``predict``: ``Softmax`` (axis -1) for the softmax
cross-entropy losses and for an uncompiled model ending in
``Dense(k, "softmax")``; ``Sigmoid`` for sigmoid binary cross-entropy
(``binary_crossentropy`` after ``Dense(1, "sigmoid")`` included); none for
MSE.

Accuracy: the ``Sigmoid`` operator (the sigmoid activation and the output
function) is accurate in absolute terms (ONNX Runtime 1.32: about 6e-8 in
float32, 1e-16 in float64) but not relatively in the far negative tail (a
float32 probability near 1e-8 may be off by a factor of 3); everything else
matched ``predict`` to float rounding in the tests (1e-5 relative in float32,
1e-12 in float64).
"""

import numpy as np

from . import _files
from .kernels.reference import GELU_A, GELU_C, LEAKY_SLOPE
from .layers import Conv2D, Dense, Dropout, Flatten, MaxPool2D

__all__ = ["export_onnx", "DEFAULT_OPSET", "MIN_OPSET"]

#: The default opset: ONNX Runtime >= 1.12 and most runtimes read it.
DEFAULT_OPSET = 17
#: Softmax over one axis (not the 2-D coerced form) exists from opset 13.
MIN_OPSET = 13

_TO_NCHW = [0, 3, 1, 2]
_TO_NHWC = [0, 2, 3, 1]


def _import_onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError as exc:
        raise ImportError(f"export_onnx needs the onnx package: pip install "
                          f"\"fastnn[onnx]\" ({exc})") from None
    return onnx, helper, numpy_helper


class _Graph:
    """Nodes and initializers of one graph, with fresh names."""

    def __init__(self, helper, numpy_helper, dtype):
        self.helper, self.numpy_helper = helper, numpy_helper
        self.dtype = dtype
        self.nodes, self.inits = [], []
        self._count = {"input": 1, "output": 1}   # the graph's own names stay free

    def name(self, base):
        n = self._count.get(base, 0)
        self._count[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def const(self, base, value, dtype=None):
        """An initializer of the model's dtype (or ``dtype``)."""
        name = self.name(base)
        array = np.ascontiguousarray(value, dtype=self.dtype if dtype is None else dtype)
        self.inits.append(self.numpy_helper.from_array(array, name))
        return name

    def op(self, op_type, inputs, base=None, **attrs):
        out = self.name(base or op_type.lower())
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [out],
                                                name=self.name("n_" + out), **attrs))
        return out


def _sigmoid(g, x):
    """``exp(min(x, 0)) / (1 + exp(-|x|))``, the reference's sigmoid, accurate in
    the negative tail (ONNX Runtime's ``Sigmoid`` is off by up to 6e-8 in float32
    there, an error that silu and gelu would multiply by ``|x|``)."""
    e = g.op("Exp", [g.op("Neg", [g.op("Abs", [x])])])
    num = g.op("Exp", [g.op("Min", [x, g.const("zero", 0.0)])])
    return g.op("Div", [num, g.op("Add", [e, g.const("one", 1.0)])], "sigmoid")


def _activation(g, act, x, label):
    """The nodes of ``act(x)``; returns the output name."""
    f64 = g.dtype == np.float64
    if act == "identity":
        return x
    if act == "relu":
        return g.op("Relu", [x])
    if act == "sigmoid":
        return g.op("Sigmoid", [x])
    if act == "tanh":
        return g.op("Tanh", [x])
    if act == "leaky_relu":
        if not f64:
            return g.op("LeakyRelu", [x], alpha=LEAKY_SLOPE)
        return g.op("Max", [x, g.op("Mul", [x, g.const("leaky_slope", LEAKY_SLOPE)])],
                    "leaky_relu")
    if act == "silu":
        return g.op("Mul", [x, _sigmoid(g, x)], "silu")
    if act == "gelu":
        # z * sigmoid(2c*z*(1 + a*z^2)), in the reference's order of operations
        u = g.op("Mul", [x, x])
        u = g.op("Mul", [u, g.const("gelu_a", GELU_A)])
        u = g.op("Add", [u, g.const("one", 1.0)])
        u = g.op("Mul", [u, x])
        u = g.op("Mul", [u, g.const("gelu_2c", 2 * GELU_C)])
        return g.op("Mul", [x, _sigmoid(g, u)], "gelu")
    if act == "softplus":
        if not f64:
            return g.op("Softplus", [x])
        e = g.op("Exp", [g.op("Neg", [g.op("Abs", [x])])])
        one, zero = g.const("one", 1.0), g.const("zero", 0.0)
        u = g.op("Add", [e, one])
        d = g.op("Sub", [u, one])
        kahan = g.op("Div", [g.op("Mul", [e, g.op("Log", [u])]), d])
        log1p = g.op("Where", [g.op("Equal", [d, zero]), e, kahan], "log1p")
        return g.op("Add", [g.op("Max", [x, zero]), log1p], "softplus")
    raise ValueError(f"export_onnx: the activation {act!r} of {label} has no ONNX conversion")


def _output_function(model):
    """``"softmax"``, ``"sigmoid"`` or None: what ``predict`` applies to the
    last layer's output."""
    from . import losses

    loss, top = model.loss, model.layers[-1]
    if loss is None:
        return "softmax" if top.activation == "softmax" else None
    if isinstance(loss, losses.SoftmaxCrossEntropy):
        return "softmax"
    if isinstance(loss, losses.SigmoidBinaryCrossEntropy):
        return "sigmoid"
    if isinstance(loss, losses.MeanSquaredError):
        return None
    raise ValueError(f"export_onnx: the loss {type(loss).__name__} has no ONNX output "
                     f"function")


def _kernel_acts(model):
    """Per layer, the activation its kernels apply (the last one without the
    softmax/sigmoid that belongs to the loss), as ``fit``/``predict`` run it."""
    acts = [layer.kernel_activation for layer in model.layers]
    if model.loss is not None:
        acts[-1] = model._top_act(model.layers[-1])
    return acts


_SUPPORTED = (Dense, Conv2D, MaxPool2D, Flatten, Dropout)


def _check_layers(model):
    for layer in model.layers:
        if type(layer) not in _SUPPORTED:
            raise ValueError(f"export_onnx: the layer {layer._label()} has no ONNX conversion "
                             f"(exported: {', '.join(c.__name__ for c in _SUPPORTED)})")


def _conv_im2col(g, x, layer, w, b):
    """A float64 convolution in NHWC from Pad, strided Slices, Concat and MatMul."""
    (kh, kw), (sh, sw) = layer.kernel_size, layer.strides
    top, bottom, left, right = layer.pads
    p, q, filters = layer.output_shape
    c = layer.input_shape[2]
    if top or bottom or left or right:
        x = g.op("Pad", [x, g.const("pads", [0, top, left, 0, 0, bottom, right, 0], np.int64)])
    axes, steps = g.const("axes_hw", [1, 2], np.int64), g.const("steps", [sh, sw], np.int64)
    cols = []
    for i in range(kh):
        for j in range(kw):
            starts = g.const("starts", [i, j], np.int64)
            ends = g.const("ends", [i + sh * (p - 1) + 1, j + sw * (q - 1) + 1], np.int64)
            cols.append(g.op("Slice", [x, starts, ends, axes, steps], "patch"))
    col = cols[0] if len(cols) == 1 else g.op("Concat", cols, "im2col", axis=-1)
    y = g.op("MatMul", [col, g.const(layer.name + ".w", w.reshape(kh * kw * c, filters))])
    return g.op("Add", [y, g.const(layer.name + ".b", b)], layer.name)


def _build(model, onnx, helper, numpy_helper, opset):
    dtype = model.dtype.type
    g = _Graph(helper, numpy_helper, dtype)
    weights = model.get_weights()
    acts = _kernel_acts(model)
    x, nchw = "input", False

    def to(layout_nchw, x, nchw):
        if layout_nchw == nchw:
            return x, nchw
        return g.op("Transpose", [x], perm=_TO_NCHW if layout_nchw else _TO_NHWC), layout_nchw

    k = 0
    for layer, act in zip(model.layers, acts):
        n_params = len(layer.param_shapes())
        params, k = weights[k:k + n_params], k + n_params
        if isinstance(layer, Dense):
            w, b = params
            x = g.op("Gemm", [x, g.const(layer.name + ".w", w), g.const(layer.name + ".b", b)],
                     layer.name)
        elif isinstance(layer, Conv2D):
            w, b = params
            if dtype == np.float32:
                x, nchw = to(True, x, nchw)
                top, bottom, left, right = layer.pads
                x = g.op("Conv", [x, g.const(layer.name + ".w", w.transpose(3, 2, 0, 1)),
                                  g.const(layer.name + ".b", b)], layer.name,
                         kernel_shape=list(layer.kernel_size), strides=list(layer.strides),
                         pads=[top, left, bottom, right], dilations=[1, 1], group=1)
            else:
                x, nchw = to(False, x, nchw)
                x = _conv_im2col(g, x, layer, w, b)
        elif isinstance(layer, MaxPool2D):
            x, nchw = to(True, x, nchw)
            x = g.op("MaxPool", [x], layer.name, kernel_shape=list(layer.pool_size),
                     strides=list(layer.strides))
        elif isinstance(layer, Flatten):
            x, nchw = to(False, x, nchw)
            x = g.op("Flatten", [x], layer.name, axis=1)
        else:  # Dropout: the identity at inference
            continue
        x = _activation(g, act, x, layer._label())
    x, nchw = to(False, x, nchw)
    out_fn = _output_function(model)
    if out_fn == "softmax":
        x = g.op("Softmax", [x], "probabilities", axis=-1)
    elif out_fn == "sigmoid":
        x = g.op("Sigmoid", [x], "probabilities")
    # the graph's output has a fixed name: the last node (which computes x) writes it
    if g.nodes:
        g.nodes[-1].output[0] = "output"
    else:  # nothing but Dropout
        g.nodes.append(helper.make_node("Identity", [x], ["output"], name="identity"))
    elem = helper.np_dtype_to_tensor_dtype(model.dtype)
    graph = helper.make_graph(
        g.nodes, "fastnn_sequential",
        [helper.make_tensor_value_info("input", elem, ["N", *model.input_shape])],
        [helper.make_tensor_value_info("output", elem, ["N", *model.output_shape])],
        initializer=g.inits)
    import fastnn

    opsets = [helper.make_opsetid("", opset)]
    onnx_model = helper.make_model(
        graph, opset_imports=opsets, producer_name="fastnn", producer_version=fastnn.__version__,
        ir_version=helper.find_min_ir_version_for(opsets),
        doc_string=f"fastnn.Sequential {model.dtype.name}; output: "
                   f"{out_fn or 'the last layer'}{'' if out_fn is None else ' probabilities'}")
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def export_onnx(model, path, opset=DEFAULT_OPSET):
    """Write ``model`` as an ONNX file computing ``model.predict``.

    Parameters
    ----------
    model : fastnn.Sequential
        Built (its weights exist); compiled or not (as ``predict``).
    path : str or os.PathLike
        The file to write. Its folder must exist and be writable: checked
        first, before anything is built. Written atomically (a temporary file
        renamed over ``path``): a failed write leaves an existing file intact.
    opset : int, default 17
        The ONNX opset (``MIN_OPSET`` = 13 up to the installed onnx's newest).

    Returns
    -------
    str
        ``path``.

    Raises
    ------
    TypeError, ValueError
        A bad path or folder (named), an unbuilt model, a bad ``opset``, or a
        layer or activation with no ONNX conversion (named).
    ImportError
        The onnx package is not installed (the message says how to install it).
    """
    from . import _validate
    from .model import Sequential

    if not isinstance(model, Sequential):
        raise TypeError(f"model must be a fastnn.Sequential, got {type(model).__name__}")
    path = _files.check_writable(path, "path")
    opset = _validate.integer("opset", opset, low=MIN_OPSET)
    model._require_built()
    _check_layers(model)
    onnx, helper, numpy_helper = _import_onnx()
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ValueError(f"opset must be <= {newest} (the newest the installed onnx "
                         f"{onnx.__version__} knows), got {opset}")
    onnx_model = _build(model, onnx, helper, numpy_helper, opset)
    data = onnx_model.SerializeToString()
    _files.write_atomic(path, lambda f: _write(f, data))
    return path


def _write(fileobj, data):
    """The writer ``export_onnx`` uses (a seam for tests that make writing fail)."""
    fileobj.write(data)
