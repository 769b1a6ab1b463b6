"""The functional API: every kernel of the contract, validated, then dispatched.

Each function has the signature and semantics of its namesake in
``fastnn.kernels.reference`` (the docstrings below are those). A call is
checked by ``fastnn._validate`` (dtypes, shapes, contiguity, writability,
aliasing, names and hyper-parameter ranges) and raises ``TypeError`` or
``ValueError`` before any array is written; it then runs on the backend in
effect (``fastnn.get_backend()``). Non-finite values are computed as IEEE
arithmetic does, never rejected.

Example
-------
>>> import numpy as np, fastnn as fn
>>> x = np.ones((2, 3), np.float32); w = np.ones((3, 4), np.float32)
>>> b = np.zeros(4, np.float32); out = np.empty((2, 4), np.float32)
>>> fn.ops.dense_forward(x, w, b, "relu", out)
>>> float(out[0, 0])
3.0
"""

from . import _gate
from .kernels import reference

__all__ = list(reference.CONTRACT)


def _op(name):
    # the checks compiled (fastnn._gate), the backend's kernels resolved once per
    # backend and looked up per call by the context's backend name
    return _gate.function(name, __name__)


dense_forward = _op("dense_forward")
activation_forward = _op("activation_forward")
activation_backward = _op("activation_backward")
backprop_delta = _op("backprop_delta")
dense_backward = _op("dense_backward")
softmax_cross_entropy = _op("softmax_cross_entropy")
sigmoid_binary_cross_entropy = _op("sigmoid_binary_cross_entropy")
mse = _op("mse")
sgd_step = _op("sgd_step")
adam_step = _op("adam_step")
rmsprop_step = _op("rmsprop_step")
softmax = _op("softmax")
conv2d_forward = _op("conv2d_forward")
conv2d_backward = _op("conv2d_backward")
conv2d_backprop = _op("conv2d_backprop")
maxpool2d_forward = _op("maxpool2d_forward")
maxpool2d_backward = _op("maxpool2d_backward")
dropout_forward = _op("dropout_forward")
dropout_backward = _op("dropout_backward")
gather_rows = _op("gather_rows")
