"""Losses for ``Sequential.compile``: by name or as objects.

* ``softmax_cross_entropy`` (alias ``cross_entropy``): last layer ``Dense(k)``
  with k >= 2 and no activation (its output is the logits); ``y`` integer
  class indices of shape ``(n,)`` in ``[0, k)``; ``predict`` returns the
  softmax. Keras' ``sparse_categorical_crossentropy`` is the same kernel
  written after a last ``Dense(k, "softmax")``: the softmax then belongs to
  the loss and is computed once, fused with it (a last layer without
  activation is also taken as the logits).
* ``sigmoid_binary_cross_entropy`` (``bce``, ``binary_cross_entropy``): last
  layer ``Dense(1)``, no activation; ``y`` in ``[0, 1]`` of shape ``(n,)`` or
  ``(n, 1)``, any real dtype; ``predict`` returns the sigmoid, ``(n, 1)``.
  Keras' ``binary_crossentropy`` is the same after a last
  ``Dense(1, "sigmoid")``, fused in the same way.
* ``mse`` (``mean_squared_error``): last layer ``Dense(k)``; ``y`` real of
  shape ``(n, k)`` (or ``(n,)`` when k == 1); ``predict`` returns the outputs.

The formulas are the kernels' (``fastnn.kernels.reference``): the mean over
the batch of ``log(sum_j exp(z_j)) - z_label`` (softmax cross-entropy), of
``max(z, 0) - z*t + log1p(exp(-|z|))`` (sigmoid BCE), and the mean of
``(pred - target)^2`` over all elements (MSE), as PyTorch's
``reduction='mean'``. The last layer's output is the logits (or predictions)
the loss reads; its gradient goes straight into the top delta.
"""

import numpy as np

__all__ = ["Loss", "SoftmaxCrossEntropy", "SigmoidBinaryCrossEntropy", "MeanSquaredError",
           "get"]


class Loss:
    """Base class: a named loss kernel, how it reads targets, and what
    ``predict`` applies to the logits."""

    #: canonical name (what ``save`` stores)
    name = None
    #: the contract kernel computing the loss and its gradient
    kernel = None
    #: whether accuracy is tracked
    classification = False
    #: the name it was asked for by (``save`` stores it)
    alias = None
    #: whether the last layer's softmax/sigmoid belongs to the loss (Keras' names:
    #: ``sparse_categorical_crossentropy``, ``binary_crossentropy``)
    fuses_output = False

    def __init__(self, alias=None):
        self.alias = alias or self.name
        self.fuses_output = self.alias in _FUSING

    def __repr__(self):
        return f"{type(self).__name__}()"

    def __eq__(self, other):
        return type(self) is type(other)

    def __hash__(self):
        return hash(type(self))

    def check_units(self, units):
        """Raise ``ValueError`` when a last layer of ``units`` outputs does not fit."""

    def targets(self, y, n, units, dtype, name="y"):
        """Check ``y`` for ``n`` samples and return it in the kernel's form
        (a C-contiguous array, converted once). Raises TypeError/ValueError."""
        raise NotImplementedError

    def output(self, be, logits, out):
        """Write what ``predict`` returns for ``logits`` into ``out``."""
        raise NotImplementedError


def _as_array(y, name):
    try:
        return np.asarray(y)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name} must be array-like, got {type(y).__name__} ({exc})") from None


def _check_rows(y, n, name):
    if y.ndim == 0 or y.shape[0] != n:
        raise ValueError(f"{name} must have {n} rows (one per sample of x), got shape {y.shape}")


class SoftmaxCrossEntropy(Loss):
    """Softmax cross-entropy on integer class labels.

    ``loss = mean_i(log(sum_j exp(z_ij)) - z_{i,y_i})``, computed stably
    (the row maximum subtracted); ``d loss / d z = (softmax(z) - onehot(y)) / n``.
    """

    name = "softmax_cross_entropy"
    kernel = "softmax_cross_entropy"
    classification = True

    def check_units(self, units):
        if units < 2:
            raise ValueError(f"{self.name} needs a last Dense layer with at least 2 units "
                             f"(one per class), got {units}; for two classes with one output "
                             f"use sigmoid_binary_cross_entropy")

    def targets(self, y, n, units, dtype, name="y"):
        y = _as_array(y, name)
        if y.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integer class indices for {self.name}, got "
                            f"dtype {y.dtype}")
        if y.ndim != 1:
            raise ValueError(f"{name} must be 1-D of shape ({n},) with one class index per "
                             f"sample, got shape {y.shape}")
        _check_rows(y, n, name)
        lo, hi = (int(y.min()), int(y.max())) if n else (0, 0)
        if lo < 0 or hi >= units:
            raise ValueError(f"{name} must hold class indices in [0, {units}) (the last layer "
                             f"has {units} units), got values in [{lo}, {hi}]")
        return np.ascontiguousarray(y, dtype=np.int64)

    def output(self, be, logits, out):
        be.softmax(logits, out)


class SigmoidBinaryCrossEntropy(Loss):
    """Sigmoid binary cross-entropy on one logit per sample.

    ``loss = mean_i(max(z_i, 0) - z_i*t_i + log1p(exp(-|z_i|)))``;
    ``d loss / d z = (sigmoid(z) - t) / n``. Accuracy counts ``z > 0`` against
    ``t > 0.5``.
    """

    name = "sigmoid_binary_cross_entropy"
    kernel = "sigmoid_binary_cross_entropy"
    classification = True

    def check_units(self, units):
        if units != 1:
            raise ValueError(f"{self.name} needs a last Dense(1) (one logit per sample), got "
                             f"{units} units; for several classes use softmax_cross_entropy")

    def targets(self, y, n, units, dtype, name="y"):
        y = _as_array(y, name)
        if y.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be real targets in [0, 1], got dtype {y.dtype}")
        if not (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)):
            raise ValueError(f"{name} must have shape ({n},) or ({n}, 1), got {y.shape}")
        _check_rows(y, n, name)
        t = np.ascontiguousarray(y, dtype=dtype).reshape(n, 1)
        if not np.all((t >= 0) & (t <= 1)):
            raise ValueError(f"{name} must lie in [0, 1] (binary targets)")
        return t

    def output(self, be, logits, out):
        be.activation_forward("sigmoid", logits, out)


class MeanSquaredError(Loss):
    """Mean squared error over all elements.

    ``loss = mean((pred - target)^2)``; ``d loss / d pred = 2*(pred - target) / pred.size``.
    """

    name = "mse"
    kernel = "mse"

    def targets(self, y, n, units, dtype, name="y"):
        y = _as_array(y, name)
        if y.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be real, got dtype {y.dtype}")
        if y.ndim == 1 and units == 1:
            y = y.reshape(-1, 1)
        if y.ndim != 2 or y.shape[1] != units:
            raise ValueError(f"{name} must have shape ({n}, {units}) (the last layer has "
                             f"{units} units), got {y.shape}")
        _check_rows(y, n, name)
        return np.ascontiguousarray(y, dtype=dtype)

    def output(self, be, logits, out):
        if out is not logits:
            out[...] = logits


#: Keras' names: the output layer's softmax or sigmoid is part of the loss
_FUSING = ("sparse_categorical_crossentropy", "binary_crossentropy")
_CLASSES = (SoftmaxCrossEntropy, SigmoidBinaryCrossEntropy, MeanSquaredError)
_ALIASES = {
    "softmax_cross_entropy": SoftmaxCrossEntropy,
    "sparse_categorical_crossentropy": SoftmaxCrossEntropy,
    "cross_entropy": SoftmaxCrossEntropy,
    "sigmoid_binary_cross_entropy": SigmoidBinaryCrossEntropy,
    "binary_crossentropy": SigmoidBinaryCrossEntropy,
    "binary_cross_entropy": SigmoidBinaryCrossEntropy,
    "bce": SigmoidBinaryCrossEntropy,
    "mse": MeanSquaredError,
    "mean_squared_error": MeanSquaredError,
}


def get(loss):
    """The ``Loss`` for a name (see the module table) or an instance.

    Raises
    ------
    TypeError
        Neither a str nor a ``Loss``.
    ValueError
        An unknown name (the message lists the names).
    """
    if isinstance(loss, Loss):
        if type(loss) not in _CLASSES:
            raise TypeError(f"loss must be one of fastnn's losses, got {type(loss).__name__}")
        return loss
    if isinstance(loss, type) and loss in _CLASSES:
        return loss()
    if not isinstance(loss, str):
        raise TypeError(f"loss must be a name (str) or a fastnn.losses.Loss, got "
                        f"{type(loss).__name__}")
    cls = _ALIASES.get(loss.lower())
    if cls is None:
        raise ValueError(f"unknown loss {loss!r}; choose one of softmax_cross_entropy, "
                         f"sigmoid_binary_cross_entropy, mse (or Keras' "
                         f"sparse_categorical_crossentropy, binary_crossentropy)")
    return cls(loss.lower())
