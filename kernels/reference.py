"""The NumPy reference: the semantics every fastnn backend must match.

Every kernel of the contract is defined here, readable first and as fast as
plain NumPy allows (in-place operations and ``out=``); it is also the
``numpy`` backend and the baseline every benchmark is measured against.

Conventions (``../shared/DESIGN.md``, "The kernel contract"):

* Kernels write into arrays the caller allocates (``out``, ``grad``) and
  update optimizer state in place. The three losses return the mean loss as a
  Python float; every other kernel returns None.
* All floating arrays of one call share one dtype, float32 or float64; no
  kernel casts. Labels are integer class indices.
* Elementwise kernels may work in place (``out`` is ``z`` or ``out`` is
  ``dy``); the output of a kernel with a GEMM must not overlap its inputs.
* Non-finite values are computed as IEEE arithmetic does, never rejected.
* Kernels trust their inputs: ``fastnn._validate`` checks them first.
* Rounding: a backend matches these results within ``rtol`` 1e-5 and ``atol``
  1e-6 per term of a sum it may reorder (float64: 1e-12 and 1e-13;
  ``tests/conftest.py``). The one exception is a fewer-multiplication
  convolution: the cython backend's 3x3, stride-1 convolutions with 16 or more
  channels in and out run Winograd F(2x2, 3x3) (within the tolerance) or,
  for outputs where it saves more, F(4x4, 3x3), whose float32 error follows
  the largest output instead: at most 6.2e-6 of it measured at the MNIST
  convnet's shapes (3-23x im2col's error, by the BLAS's kernels; within the tolerance for data at
  unit scale, not for inputs spread over six decades), bounded at 2e-5 of it
  in the tests (``WINO4_REL``). float64 keeps 4e-14 of it.
"""

import math

import numpy as np

__all__ = [
    "CONTRACT", "ACTIVATIONS", "Y_ACTIVATIONS", "Z_ACTIVATIONS",
    "LEAKY_SLOPE", "GELU_C", "GELU_A",
    "dense_forward", "activation_forward", "activation_backward",
    "backprop_delta", "dense_backward", "softmax_cross_entropy",
    "sigmoid_binary_cross_entropy", "mse", "sgd_step", "adam_step",
    "rmsprop_step", "softmax",
    "conv2d_forward", "conv2d_backward", "conv2d_backprop",
    "maxpool2d_forward", "maxpool2d_backward", "dropout_forward", "dropout_backward",
    "CONV_KERNELS", "OUTPUTS", "conv_output_size", "same_padding", "keras_padding",
    "dropout_threshold", "DATA_KERNELS", "gather_rows",
]

#: The kernels of the convolutional layers (issue 15): NHWC images.
CONV_KERNELS = (
    "conv2d_forward", "conv2d_backward", "conv2d_backprop",
    "maxpool2d_forward", "maxpool2d_backward", "dropout_forward", "dropout_backward",
)

#: Data movement (issue 17): the batch gather of ``fit``, the one kernel that converts.
DATA_KERNELS = ("gather_rows",)

#: Every kernel a backend must export, with these signatures.
CONTRACT = (
    "dense_forward", "activation_forward", "activation_backward",
    "backprop_delta", "dense_backward", "softmax_cross_entropy",
    "sigmoid_binary_cross_entropy", "mse", "sgd_step", "adam_step",
    "rmsprop_step", "softmax",
) + CONV_KERNELS + DATA_KERNELS

#: The array parameters each kernel writes (outputs and in-place state); every
#: other array parameter is read only.
OUTPUTS = {
    "dense_forward": ("out", "preact"), "activation_forward": ("out",),
    "activation_backward": ("out",), "backprop_delta": ("out",),
    "dense_backward": ("dw", "db"), "softmax_cross_entropy": ("grad",),
    "sigmoid_binary_cross_entropy": ("grad",), "mse": ("grad",), "softmax": ("out",),
    "sgd_step": ("p", "buf"), "adam_step": ("p", "m", "v", "vmax"),
    "rmsprop_step": ("p", "sq", "buf", "centered_mean"),
    "conv2d_forward": ("out", "preact"), "conv2d_backward": ("dw", "db"),
    "conv2d_backprop": ("out",), "maxpool2d_forward": ("out", "argmax"),
    "maxpool2d_backward": ("out",), "dropout_forward": ("out",), "dropout_backward": ("out",),
    "gather_rows": ("out",),
}

#: The reference implements the whole contract (the registry's ``COMPLETE``).
COMPLETE = True

#: Activations whose derivative is computed from the output ``y``.
Y_ACTIVATIONS = ("identity", "relu", "sigmoid", "tanh")
#: Activations whose derivative needs the pre-activation ``z``.
Z_ACTIVATIONS = ("leaky_relu", "gelu", "silu", "softplus")
ACTIVATIONS = Y_ACTIVATIONS + Z_ACTIVATIONS

LEAKY_SLOPE = 0.01
GELU_C = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


# ---------------------------------------------------------------- activations

def _sigmoid(z, out):
    """``out = 1 / (1 + exp(-z))`` without overflow: with ``e = exp(-|z|)``,
    ``sigmoid(z) = 1/(1+e)`` for ``z >= 0`` and ``e/(1+e)`` otherwise, which
    keeps full relative accuracy in the negative tail. The numerator is
    ``exp(min(z, 0))``: branch-free, as ``np.where`` on random signs is 4x
    slower than the whole rest."""
    e = np.abs(z)
    np.negative(e, out=e)
    np.exp(e, out=e)
    num = np.minimum(z, 0)  # exp(min(z, 0)) is 1 for z >= 0 and e otherwise
    np.exp(num, out=num)
    e += 1
    np.divide(num, e, out=out)
    return out


def _gelu_s(z):
    """``s = sigmoid(2u)``, ``u = c*(z + a*z^3)``, as a new array.

    The tanh-form GELU's ``0.5*(1 + tanh(u))`` equals ``s``; as a sigmoid it
    avoids the cancellation of ``1 + tanh(u)`` when ``tanh(u)`` is near -1
    (float32 GELU and its derivative for z in [-6, -3]).
    """
    u = z * z
    u *= GELU_A
    u += 1
    u *= z
    u *= 2 * GELU_C
    return _sigmoid(u, u)


def activation_forward(act, z, out):
    """Apply an activation elementwise: ``out = act(z)``.

    Parameters
    ----------
    act : str
        One of ``ACTIVATIONS``:

        * identity: ``z``
        * relu: ``max(z, 0)``
        * leaky_relu: ``z`` if ``z > 0`` else ``0.01*z``
        * sigmoid: ``1 / (1 + exp(-z))``
        * tanh: ``tanh(z)``
        * gelu (tanh form): ``0.5*z*(1 + tanh(u))``, ``u = sqrt(2/pi)*(z + 0.044715*z^3)``,
          computed as ``z*sigmoid(2u)``
        * silu: ``z*sigmoid(z)``
        * softplus: ``log1p(exp(-|z|)) + max(z, 0)``
    z : ndarray, float32 or float64
        Pre-activation. IN
    out : ndarray, same shape and dtype
        Result; may be ``z`` itself. OUT

    Non-finite inputs are computed as IEEE arithmetic does.
    """
    if act == "identity":
        if out is not z:
            np.copyto(out, z)
    elif act == "relu":
        np.maximum(z, 0, out=out)
    elif act == "leaky_relu":
        # for a slope below one, leaky_relu(z) = max(z, slope*z)
        np.maximum(z, z * LEAKY_SLOPE, out=out)
    elif act == "sigmoid":
        _sigmoid(z, out)
    elif act == "tanh":
        np.tanh(z, out=out)
    elif act == "gelu":
        # 0.5*z*(1 + tanh(u)) = z*sigmoid(2u)
        np.multiply(z, _gelu_s(z), out=out)
    elif act == "silu":
        s = _sigmoid(z, np.empty_like(z))
        np.multiply(z, s, out=out)
    elif act == "softplus":
        t = np.exp(-np.abs(z))
        np.log1p(t, out=t)
        np.maximum(z, 0, out=out)
        out += t
    else:
        raise ValueError(f"unknown activation {act!r}")


def _derivative(act, z, y):
    """``act'`` as a new array, from ``y`` for Y_ACTIVATIONS, else from ``z``."""
    if act == "identity":
        return np.ones_like(y)
    if act == "relu":
        return (y > 0).astype(y.dtype)
    if act == "sigmoid":
        return y * (1 - y)
    if act == "tanh":
        d = y * y
        np.subtract(1, d, out=d)
        return d
    if act == "leaky_relu":
        # 1 where z > 0, else the slope (0.99 + 0.01 is exactly 1 in both dtypes;
        # np.where on random signs is 20x slower)
        d = (z > 0).astype(z.dtype)
        d *= 1 - LEAKY_SLOPE
        d += LEAKY_SLOPE
        return d
    if act == "gelu":
        # d/dz = 0.5*(1+t) + 0.5*z*(1-t^2)*c*(1 + 3a*z^2), t = tanh(u);
        # with 0.5*(1+t) = s and 1-t^2 = 4*s*q, q = 1-s:
        # s*(1 + 2*z*q*c*(1 + 3a*z^2)); where q = 1-s loses relative accuracy
        # (s near 1) its term is below rounding
        s = _gelu_s(z)
        q = 1 - s
        d = z * z
        d *= 3 * GELU_A
        d += 1
        d *= 2 * GELU_C
        d *= z
        d *= q
        d += 1
        d *= s
        return d
    if act == "silu":
        # d/dz = s*(1 + z*(1-s)), s = sigmoid(z)
        s = _sigmoid(z, np.empty_like(z))
        d = 1 - s
        d *= z
        d += 1
        d *= s
        return d
    if act == "softplus":
        return _sigmoid(z, np.empty_like(z))
    raise ValueError(f"unknown activation {act!r}")


def activation_backward(act, dy, z, y, out):
    """Backpropagate through an activation: ``out = dy * act'(z)``.

    The derivative comes from the output ``y`` for identity (1), relu
    (``y > 0``, so ``relu'(0) = 0``), sigmoid (``y*(1-y)``) and tanh
    (``1 - y^2``); ``z`` may then be None. leaky_relu (1 if ``z > 0`` else
    0.01), gelu, silu (``s*(1 + z*(1-s))``) and softplus (``sigmoid(z)``)
    need ``z``; ``y`` may then be None.

    Parameters
    ----------
    act : str
    dy : ndarray
        Gradient with respect to ``y``. IN
    z, y : ndarray or None
        Pre-activation and activation output, same shape as ``dy``. IN
    out : ndarray
        Gradient with respect to ``z``; may be ``dy`` or ``z``. OUT
    """
    if act == "identity":
        if out is not dy:
            np.copyto(out, dy)
        return
    np.multiply(dy, _derivative(act, z, y), out=out)


# ---------------------------------------------------------------- dense layer

def dense_forward(x, w, b, act, out, preact=None):
    """Dense layer forward: ``out = act(x @ w + b)``.

    Parameters
    ----------
    x : ndarray (batch, in)
        IN
    w : ndarray (in, out)
        IN
    b : ndarray (out,)
        IN
    act : str
        Activation name.
    out : ndarray (batch, out)
        OUT; must not overlap ``x``, ``w`` or ``b``.
    preact : ndarray (batch, out) or None
        OUT: receives ``z = x @ w + b`` when given (the backward pass of
        leaky_relu, gelu, silu and softplus needs it).
    """
    z = out if preact is None else preact
    np.matmul(x, w, out=z)
    z += b
    activation_forward(act, z, out)


def backprop_delta(dy, w, z, y, act, out):
    """Delta of the layer below: ``out = (dy @ w.T) * act'(z)``.

    Parameters
    ----------
    dy : ndarray (batch, out)
        Gradient with respect to this layer's pre-activation. IN
    w : ndarray (in, out)
        This layer's weights. IN
    z, y : ndarray (batch, in) or None
        Pre-activation and output of the layer below (the derivative is taken
        from ``y`` where the activation allows, see ``activation_backward``). IN
    act : str
        Activation of the layer below.
    out : ndarray (batch, in)
        OUT; must not overlap any input.
    """
    np.matmul(dy, w.T, out=out)
    activation_backward(act, out, z, y, out)


def dense_backward(x, dz, dw, db):
    """Parameter gradients of a dense layer: ``dw = x.T @ dz``, ``db = dz.sum(0)``.

    ``db`` is accumulated in float64 and rounded once (a float32 running sum
    over a batch of 2^20 is off by 1e-5 relative).

    Parameters
    ----------
    x : ndarray (batch, in)
        IN
    dz : ndarray (batch, out)
        Gradient with respect to the pre-activation. IN
    dw : ndarray (in, out)
        OUT
    db : ndarray (out,)
        OUT
    """
    np.matmul(x.T, dz, out=dw)
    np.sum(dz, axis=0, dtype=np.float64, out=db)


# ---------------------------------------------------------------- losses

def softmax(z, out):
    """Row-wise softmax: ``out[i] = exp(z[i] - max(z[i])) / sum(exp(z[i] - max(z[i])))``.

    Parameters
    ----------
    z : ndarray (batch, classes)
        IN
    out : ndarray (batch, classes)
        OUT; may be ``z``.
    """
    m = z.max(axis=1, keepdims=True)
    np.subtract(z, m, out=out)
    np.exp(out, out=out)
    out /= out.sum(axis=1, keepdims=True)


def softmax_cross_entropy(logits, labels, grad):
    """Mean softmax cross-entropy and its gradient with respect to the logits.

    With ``m_i = max_j z_ij`` and ``s_i = sum_j exp(z_ij - m_i)``:
    ``loss = mean_i(log(s_i) - (z_{i,label_i} - m_i))`` and
    ``grad = (softmax(z) - onehot(labels)) / batch``.

    Parameters
    ----------
    logits : ndarray (batch, classes)
        IN
    labels : integer ndarray (batch,)
        Class indices in ``[0, classes)``. IN
    grad : ndarray (batch, classes)
        OUT

    Returns
    -------
    float
        The mean loss (per-row losses in the array dtype, averaged in float64).
    """
    n = logits.shape[0]
    rows = np.arange(n)
    m = logits.max(axis=1, keepdims=True)
    np.subtract(logits, m, out=grad)
    picked = grad[rows, labels]
    np.exp(grad, out=grad)
    s = grad.sum(axis=1)
    loss = np.mean(np.log(s) - picked, dtype=np.float64)
    grad /= s[:, None]
    grad[rows, labels] -= 1
    grad /= n
    return float(loss)


def sigmoid_binary_cross_entropy(logits, targets, grad):
    """Mean binary cross-entropy on logits, and its gradient.

    ``loss = mean(max(z, 0) - z*t + log1p(exp(-|z|)))`` over all elements
    (PyTorch's ``BCEWithLogitsLoss(reduction='mean')``; for the usual
    ``(batch, 1)`` output this is the mean over the batch) and
    ``grad = (sigmoid(z) - t) / z.size``.

    Parameters
    ----------
    logits : ndarray
        IN
    targets : ndarray, same shape and dtype
        Targets in ``[0, 1]``. IN
    grad : ndarray, same shape and dtype
        OUT

    Returns
    -------
    float
    """
    n = logits.size
    per = np.exp(-np.abs(logits))
    np.log1p(per, out=per)
    per += np.maximum(logits, 0)
    per -= logits * targets
    loss = np.mean(per, dtype=np.float64)
    _sigmoid(logits, grad)
    grad -= targets
    grad /= n
    return float(loss)


def mse(pred, target, grad):
    """Mean squared error over all elements and its gradient.

    ``loss = mean((pred - target)^2)``, ``grad = 2*(pred - target) / pred.size``.

    Parameters
    ----------
    pred, target : ndarray, same shape and dtype
        IN
    grad : ndarray, same shape and dtype
        OUT; may be ``pred`` or ``target`` (each element of both is read
        before the gradient is written).

    Returns
    -------
    float
    """
    n = pred.size
    d = pred - target
    loss = np.mean(np.square(d), dtype=np.float64)
    np.multiply(d, 2 / n, out=grad)
    return float(loss)


# ---------------------------------------------------------------- optimizers

def _regularized(p, g, weight_decay, l1):
    """``g' = g + weight_decay*p + l1*sign(p)``; returns ``g`` itself when no
    term applies, else a new array (``g`` is never written)."""
    if weight_decay == 0 and l1 == 0:
        return g
    gp = g.copy()
    if weight_decay != 0:
        gp += weight_decay * p
    if l1 != 0:
        gp += l1 * np.sign(p)
    return gp


def sgd_step(p, g, buf, lr, momentum, nesterov, weight_decay, l1):
    """One SGD step in place (PyTorch's ``torch.optim.SGD``, dampening 0).

    ``g' = g + weight_decay*p + l1*sign(p)``; with ``momentum > 0``:
    ``buf = momentum*buf + g'`` and ``d = g' + momentum*buf`` (Nesterov) or
    ``d = buf``; without momentum ``d = g'``. Then ``p -= lr*d``.

    Parameters
    ----------
    p : ndarray (n,)
        Parameters. IN/OUT
    g : ndarray (n,)
        Gradient. IN
    buf : ndarray (n,) or None
        Momentum buffer, zero before the first step; None (or unused) when
        ``momentum == 0``. IN/OUT
    lr, momentum, weight_decay, l1 : float
    nesterov : bool
    """
    gp = _regularized(p, g, weight_decay, l1)
    if momentum == 0:
        d = np.multiply(gp, lr)
    else:
        buf *= momentum
        buf += gp
        if nesterov:
            d = np.multiply(buf, momentum)
            d += gp
            d *= lr
        else:
            d = np.multiply(buf, lr)
    p -= d


def adam_step(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, decoupled, l1, vmax):
    """One Adam / AdamW / AMSGrad step in place (PyTorch's ``torch.optim.Adam``
    and ``AdamW``).

    ``g' = g + weight_decay*p + l1*sign(p)``, except that with ``decoupled``
    (AdamW) the weight-decay term is instead ``p *= 1 - lr*weight_decay``
    before the update (``sign(p)`` is taken before it). Then
    ``m = beta1*m + (1-beta1)*g'``, ``v = beta2*v + (1-beta2)*g'^2``; with
    AMSGrad ``vmax = max(vmax, v)`` replaces ``v`` below;
    ``p -= lr/(1-beta1^t) * m / (sqrt(v)/sqrt(1-beta2^t) + eps)``.

    Parameters
    ----------
    p : ndarray (n,)
        IN/OUT
    g : ndarray (n,)
        IN
    m, v : ndarray (n,)
        First and second moments, zero before the first step. IN/OUT
    step : int
        ``t``, the 1-based step count after this step.
    lr, beta1, beta2, eps, weight_decay, l1 : float
    decoupled : bool
        AdamW's decoupled weight decay.
    vmax : ndarray (n,) or None
        AMSGrad's running maximum of ``v``, or None for plain Adam. IN/OUT

    Bias corrections are computed once per call in float64.
    """
    if decoupled:
        gp = _regularized(p, g, 0, l1)
        if weight_decay != 0:
            p *= 1 - lr * weight_decay
    else:
        gp = _regularized(p, g, weight_decay, l1)
    bc1 = 1 - beta1 ** step
    bc2_sqrt = math.sqrt(1 - beta2 ** step)
    tmp = np.multiply(gp, 1 - beta1)  # the one scratch array
    m *= beta1
    m += tmp
    np.multiply(gp, gp, out=tmp)
    tmp *= 1 - beta2
    v *= beta2
    v += tmp
    if vmax is not None:
        np.maximum(vmax, v, out=vmax)
        second = vmax
    else:
        second = v
    np.sqrt(second, out=tmp)
    tmp /= bc2_sqrt
    tmp += eps
    np.divide(m, tmp, out=tmp)
    tmp *= lr / bc1
    p -= tmp


def rmsprop_step(p, g, sq, buf, lr, rho, eps, momentum, centered_mean, weight_decay, l1):
    """One RMSprop step in place (PyTorch's ``torch.optim.RMSprop``).

    ``g' = g + weight_decay*p + l1*sign(p)``; ``sq = rho*sq + (1-rho)*g'^2``;
    centered: ``cm = rho*cm + (1-rho)*g'`` and ``den = sqrt(max(sq - cm^2, 0)) + eps``
    (``sq - cm^2 >= 0`` exactly, but rounding can make it negative),
    else ``den = sqrt(sq) + eps``; with ``momentum > 0``:
    ``buf = momentum*buf + g'/den`` and ``p -= lr*buf``, else ``p -= lr*g'/den``.

    Parameters
    ----------
    p : ndarray (n,)
        IN/OUT
    g : ndarray (n,)
        IN
    sq : ndarray (n,)
        Running mean of squared gradients, zero at the start. IN/OUT
    buf : ndarray (n,) or None
        Momentum buffer; None (or unused) when ``momentum == 0``. IN/OUT
    lr, rho, eps, momentum, weight_decay, l1 : float
    centered_mean : ndarray (n,) or None
        Running mean of gradients when centered, else None. IN/OUT
    """
    gp = _regularized(p, g, weight_decay, l1)
    den = np.multiply(gp, gp)  # the one scratch array
    den *= 1 - rho
    sq *= rho
    sq += den
    if centered_mean is not None:
        np.multiply(gp, 1 - rho, out=den)
        centered_mean *= rho
        centered_mean += den
        np.multiply(centered_mean, centered_mean, out=den)
        np.subtract(sq, den, out=den)
        np.maximum(den, 0, out=den)
        np.sqrt(den, out=den)
    else:
        np.sqrt(sq, out=den)
    den += eps
    np.divide(gp, den, out=den)
    if momentum > 0:
        buf *= momentum
        buf += den
        np.multiply(buf, lr, out=den)
    else:
        den *= lr
    p -= den


# ---------------------------------------------------------------- convolution (NHWC)
#
# Images are channels-last: x (batch, height, width, channels), kernels
# w (kh, kw, c_in, c_out). ``stride`` is (sh, sw); ``padding`` is
# (top, bottom, left, right) rows/columns of zeros around the input.

def conv_output_size(size, k, stride, before=0, after=0):
    """Output length of a convolution or pooling along one axis:
    ``(size + before + after - k) // stride + 1`` (below 1: no output).

    Parameters
    ----------
    size : int
        Input length.
    k : int
        Kernel (or pool) extent.
    stride : int
    before, after : int
        Zeros padded before and after.

    Returns
    -------
    int
    """
    return (size + before + after - k) // stride + 1


def same_padding(size, k, stride):
    """Keras' ``"same"`` padding along one axis, as ``(before, after)``.

    The output length is ``ceil(size / stride)``; the total pad
    ``max((out - 1)*stride + k - size, 0)`` is split with the extra zero
    after (bottom/right), as Keras and TensorFlow do. Each side stays below
    ``k``, as the kernels require.

    Parameters
    ----------
    size, k, stride : int

    Returns
    -------
    (int, int)
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def keras_padding(mode, image, kernel, stride):
    """Map Keras' ``padding`` argument onto the kernels' ``(top, bottom, left, right)``.

    Parameters
    ----------
    mode : {"valid", "same"}
        ``"valid"``: no padding; ``"same"``: :func:`same_padding` on each axis.
    image : (int, int)
        Input ``(height, width)``.
    kernel, stride : (int, int)

    Returns
    -------
    (int, int, int, int)
    """
    if mode == "valid":
        return (0, 0, 0, 0)
    if mode == "same":
        return same_padding(image[0], kernel[0], stride[0]) + \
            same_padding(image[1], kernel[1], stride[1])
    raise ValueError(f"padding must be 'valid' or 'same', got {mode!r}")


def _padded(x, padding):
    """``x`` with ``padding`` zeros around its image axes (``x`` itself when none)."""
    top, bottom, left, right = padding
    if not (top or bottom or left or right):
        return x
    n, h, w, c = x.shape
    xpad = np.zeros((n, h + top + bottom, w + left + right, c), x.dtype)
    xpad[:, top:top + h, left:left + w] = x
    return xpad


def _windows(a, kh, kw, stride, p, q):
    """The read-only view ``v[n, p, q, i, j, c] = a[n, p*sh + i, q*sw + j, c]``
    (no copy): the im2col matrix is ``v`` reshaped to ``(n*p*q, kh*kw*c)``."""
    sh, sw = stride
    sn, sy, sx, sc = a.strides
    n, c = a.shape[0], a.shape[3]
    return np.lib.stride_tricks.as_strided(
        a, (n, p, q, kh, kw, c), (sn, sy * sh, sx * sw, sy, sx, sc), writeable=False)


def _im2col(x, kh, kw, stride, padding, p, q):
    """Columns ``(n*p*q, kh*kw*c)``, row ``(n, p, q)`` holding the window
    ``xpad[n, p*sh:p*sh+kh, q*sw:q*sw+kw, :]`` in (i, j, c) order (the order of
    ``w.reshape(kh*kw*c, o)``). One copy; none for a 1x1 kernel at stride 1
    without padding."""
    v = _windows(_padded(x, padding), kh, kw, stride, p, q)
    return np.ascontiguousarray(v).reshape(-1, kh * kw * x.shape[3])


def _row_slice(start, count, step):
    """The positions ``start + step*t`` for ``t < count``, as a slice."""
    return slice(start, start + step * (count - 1) + 1, step)


def conv2d_forward(x, w, b, act, out, preact=None, stride=(1, 1), padding=(0, 0, 0, 0)):
    """2-D convolution (cross-correlation, as Keras and PyTorch), NHWC, fused
    with bias and activation: ``out = act(z)``,

    ``z[n,p,q,o] = b[o] + sum_{i,j,c} xpad[n, p*sh+i, q*sw+j, c] * w[i,j,c,o]``

    where ``xpad`` is ``x`` with ``padding`` zeros. Computed as one GEMM of the
    im2col columns with ``w`` reshaped to ``(kh*kw*c, o)``.

    Parameters
    ----------
    x : ndarray (n, h, w, c)
        IN
    w : ndarray (kh, kw, c, o)
        IN
    b : ndarray (o,)
        IN
    act : str
        Activation name.
    out : ndarray (n, p, q, o)
        OUT, with ``p = (h + top + bottom - kh) // sh + 1`` and
        ``q = (w + left + right - kw) // sw + 1``; must not overlap any input.
    preact : ndarray (n, p, q, o) or None
        OUT: receives ``z`` when given (as in ``dense_forward``).
    stride : (int, int)
        ``(sh, sw)``, each >= 1.
    padding : (int, int, int, int)
        ``(top, bottom, left, right)`` zeros, each below the kernel extent.
    """
    kh, kw, c, o = w.shape
    p, q = out.shape[1:3]
    z = out if preact is None else preact
    cols = _im2col(x, kh, kw, stride, padding, p, q)
    np.matmul(cols, w.reshape(kh * kw * c, o), out=z.reshape(-1, o))
    z += b
    activation_forward(act, z, out)


def _sum_rows(a, out):
    """``out = a.sum(0)`` for a 2-D ``a``, accumulated in float64 (rounded once
    into a float32 ``out``)."""
    if a.dtype == np.float64:
        np.sum(a, axis=0, out=out)
    else:
        np.copyto(out, np.sum(a, axis=0, dtype=np.float64))


def conv2d_backward(x, dz, dw, db, stride=(1, 1), padding=(0, 0, 0, 0)):
    """Parameter gradients of a convolution, in one call (overwritten, not
    accumulated):

    ``dw[i,j,c,o] = sum_{n,p,q} xpad[n, p*sh+i, q*sw+j, c] * dz[n,p,q,o]``,
    ``db[o] = sum_{n,p,q} dz[n,p,q,o]`` (summed in float64 for float32
    arrays, then rounded).

    ``dw`` is one GEMM: the im2col columns transposed times ``dz`` as
    ``(n*p*q, o)``.

    Parameters
    ----------
    x : ndarray (n, h, w, c)
        The layer's input. IN
    dz : ndarray (n, p, q, o)
        Gradient with respect to the pre-activation. IN
    dw : ndarray (kh, kw, c, o)
        OUT; its shape gives the kernel extent.
    db : ndarray (o,)
        OUT
    stride, padding
        As in :func:`conv2d_forward`.
    """
    kh, kw, c, o = dw.shape
    p, q = dz.shape[1:3]
    cols = _im2col(x, kh, kw, stride, padding, p, q)
    dz2 = dz.reshape(-1, o)
    np.matmul(cols.T, dz2, out=dw.reshape(kh * kw * c, o))
    _sum_rows(dz2, db)


def conv2d_backprop(dz, w, z, y, act, out, stride=(1, 1), padding=(0, 0, 0, 0)):
    """Delta of the layer below a convolution: the transposed convolution of
    ``dz``, cropped to the unpadded input, times the derivative of the
    activation that produced the input:

    ``out[n,h,w,c] = act'(z or y)[n,h,w,c] * sum dz[n,p,q,o] * w[i,j,c,o]``

    over ``(i, j, p, q, o)`` with ``p*sh + i - top == h`` and
    ``q*sw + j - left == w`` (overlapping windows sum; positions no window
    covers get 0). Computed as one GEMM, ``dz (n*p*q, o) @ w.T (o, kh*kw*c)``,
    then col2im: the ``kh*kw`` column blocks added at their shifted strided
    positions.

    Parameters
    ----------
    dz : ndarray (n, p, q, o)
        Gradient with respect to this layer's pre-activation. IN
    w : ndarray (kh, kw, c, o)
        This layer's kernel. IN
    z, y : ndarray (n, h, w, c) or None
        Pre-activation and output of the layer below (the derivative is taken
        from ``y`` for identity, relu, sigmoid and tanh, else from ``z``, as in
        ``backprop_delta``). IN
    act : str
        Activation of the layer below.
    out : ndarray (n, h, w, c)
        OUT; its shape gives the input's ``(h, w)`` (several sizes can give the
        same output size when ``stride > 1``); must not overlap any input.
    stride, padding
        As in :func:`conv2d_forward`.
    """
    kh, kw, c, o = w.shape
    n, p, q, _ = dz.shape
    sh, sw = stride
    top, bottom, left, right = padding
    h, wd = out.shape[1:3]
    dcols = np.matmul(dz.reshape(-1, o), w.reshape(kh * kw * c, o).T)
    dcols = dcols.reshape(n, p, q, kh, kw, c)
    padded = top or bottom or left or right
    dxpad = np.zeros((n, h + top + bottom, wd + left + right, c), out.dtype) if padded else out
    if not padded:
        out.fill(0)
    for i in range(kh):
        rows = _row_slice(i, p, sh)
        for j in range(kw):
            dxpad[:, rows, _row_slice(j, q, sw)] += dcols[:, :, :, i, j]
    if padded:
        np.copyto(out, dxpad[:, top:top + h, left:left + wd])
    activation_backward(act, out, z, y, out)


# ---------------------------------------------------------------- max pooling (NHWC)

def _pool_stride(pool, stride):
    return tuple(pool) if stride is None else tuple(stride)


def _bits(a):
    """``a`` viewed as signed integers of its width (no copy)."""
    return a.view(np.int32 if a.dtype.itemsize == 4 else np.int64)


def _select(dst, src, mask, tmp):
    """``dst = src where mask else dst``, branch-free: ``dst += mask*(src - dst)``
    on integer arrays (bit patterns for floats, so exact for every value, inf and
    NaN included). ``tmp`` is integer scratch like ``dst``. NumPy's masked
    ``copyto(where=)`` on a random mask is several times slower."""
    np.subtract(src, dst, out=tmp)
    np.multiply(tmp, mask, out=tmp)
    np.add(dst, tmp, out=dst)


def maxpool2d_forward(x, out, argmax, pool=(2, 2), stride=None):
    """Max pooling without padding, NHWC:

    ``out[n,p,q,c] = max_{i<ph, j<pw} x[n, p*sh+i, q*sw+j, c]``,
    ``argmax[n,p,q,c] = i*pw + j`` of the chosen element, and ``out`` is that
    element exactly: the first in row-major window order on ties; a NaN counts
    as the maximum (the first NaN of a window is chosen, so ``out`` is NaN
    there, as in PyTorch).

    Computed as ``ph*pw`` passes over the output, one per window offset, each
    reading a strided slice of ``x`` and taking it where it wins.

    Parameters
    ----------
    x : ndarray (n, h, w, c)
        IN
    out : ndarray (n, p, q, c)
        OUT, ``p = (h - ph) // sh + 1``, ``q = (w - pw) // sw + 1``.
    argmax : int32 ndarray (n, p, q, c)
        OUT
    pool : (int, int)
        ``(ph, pw)``.
    stride : (int, int) or None
        ``(sh, sw)``; None means ``pool`` (windows side by side).
    """
    ph, pw = pool
    sh, sw = _pool_stride(pool, stride)
    p, q = out.shape[1:3]
    np.copyto(out, x[:, _row_slice(0, p, sh), _row_slice(0, q, sw)])
    argmax.fill(0)
    take, number = np.empty(out.shape, bool), np.empty(out.shape, bool)
    tmp, tmp_arg = np.empty(out.shape, _bits(out).dtype), np.empty(out.shape, np.int32)
    for k in range(1, ph * pw):
        i, j = divmod(k, pw)
        s = x[:, _row_slice(i, p, sh), _row_slice(j, q, sw)]
        # s wins where it is greater, or NaN while the current maximum is not:
        # not (s <= out) is s > out or either NaN; out == out rules out a NaN kept
        np.less_equal(s, out, out=take)
        np.logical_not(take, out=take)
        np.equal(out, out, out=number)
        take &= number
        _select(argmax, k, take, tmp_arg)
        _select(_bits(out), _bits(s), take, tmp)


def maxpool2d_backward(dy, argmax, z, y, act, out, pool=(2, 2), stride=None):
    """Gradient through max pooling, times the derivative of the activation
    below the pool:

    ``out = act'(z or y) * g``, ``g[n, p*sh+i, q*sw+j, c] += dy[n,p,q,c]``
    for every window ``(p, q)`` with ``argmax[n,p,q,c] == i*pw + j``, ``g``
    zero elsewhere (overlapping windows, ``stride < pool``, sum; positions no
    window chose get 0).

    Computed as ``ph*pw`` additions into strided slices of ``out``, one per
    window offset, of ``dy`` where ``argmax`` names that offset and ``+0.0``
    elsewhere (no scatter; adding ``+0.0`` to a sum that starts at ``+0.0``
    changes nothing, also for inf and NaN ``dy`` elsewhere).

    Parameters
    ----------
    dy : ndarray (n, p, q, c)
        Gradient with respect to the pool's output. IN
    argmax : int32 ndarray (n, p, q, c)
        From :func:`maxpool2d_forward`. IN
    z, y : ndarray (n, h, w, c) or None
        Pre-activation and output of the layer below (see ``backprop_delta``). IN
    act : str
        Activation of the layer below.
    out : ndarray (n, h, w, c)
        OUT: the gradient with respect to the pool's input ``(n, h, w, c)``.
    pool, stride
        As in :func:`maxpool2d_forward`.
    """
    ph, pw = pool
    sh, sw = _pool_stride(pool, stride)
    p, q = dy.shape[1:3]
    out.fill(0)
    chosen = np.empty(dy.shape, bool)
    part = np.empty_like(dy)
    dy_bits, part_bits = _bits(dy), _bits(part)
    for k in range(ph * pw):
        i, j = divmod(k, pw)
        s = out[:, _row_slice(i, p, sh), _row_slice(j, q, sw)]
        np.equal(argmax, k, out=chosen)
        np.multiply(dy_bits, chosen, out=part_bits)     # dy where chosen, +0.0 elsewhere
        s += part
    activation_backward(act, out, z, y, out)


# ---------------------------------------------------------------- dropout

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
#: Elements hashed per block: the uint64 temporaries stay in cache.
_DROPOUT_BLOCK = 1 << 16


def dropout_threshold(rate):
    """``T = floor(rate * 2**24 + 0.5)`` in float64: an element is kept iff its
    24-bit hash is ``>= T`` (so the kept fraction is ``1 - T/2**24``)."""
    return int(math.floor(float(rate) * 2.0**24 + 0.5))


def _dropout_keep(start, stop, seed, threshold, ramp, z, t, keep):
    """``keep[:stop-start]`` = whether the elements ``start <= i < stop`` are kept:
    ``splitmix64(seed + (i+1)*0x9E3779B97F4A7C15) >> 40 >= threshold`` (uint64
    arithmetic wraps). ``ramp`` is ``0, 1, 2, ...`` (uint64), ``z`` and ``t``
    uint64 scratch, all at least ``stop - start`` long."""
    m = stop - start
    z, t, keep = z[:m], t[:m], keep[:m]
    np.add(ramp[:m], np.uint64(start + 1), out=z)
    z *= _GOLDEN
    z += seed
    # the splitmix64 finaliser
    np.right_shift(z, np.uint64(30), out=t)
    z ^= t
    z *= _MIX1
    np.right_shift(z, np.uint64(27), out=t)
    z ^= t
    z *= _MIX2
    np.right_shift(z, np.uint64(31), out=t)
    z ^= t
    np.right_shift(z, np.uint64(40), out=t)
    np.greater_equal(t, np.uint64(threshold), out=keep)
    return keep


def dropout_forward(x, rate, seed, out):
    """Inverted dropout: ``out = x * s`` where element ``i`` is kept, ``+0.0``
    where it is dropped, ``s = 1/(1 - rate)`` (computed in float64, rounded once
    to the dtype; the product in the dtype).

    The mask is a pure function of ``(seed, i)``, ``i`` the flat C-order index:
    kept iff ``splitmix64((seed + (i+1)*0x9E3779B97F4A7C15) mod 2**64) >> 40 >=
    T``, ``T = floor(rate*2**24 + 0.5)``, where ``splitmix64(z)`` is
    ``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27;
    z *= 0x94D049BB133111EB; z ^= z >> 31`` in wrapping uint64. So every backend
    draws the same mask, no mask is stored, and the backward pass recomputes it.
    A dropped element is ``+0.0`` even where ``x`` is inf or NaN. ``rate == 0``
    copies ``x``.

    Parameters
    ----------
    x : ndarray, any shape
        IN
    rate : float
        In ``[0, 1)``.
    seed : int
        In ``[0, 2**64)``.
    out : ndarray, same shape and dtype
        OUT; may be ``x`` (in place).
    """
    if rate == 0:
        if out is not x:
            np.copyto(out, x)
        return
    scale = x.dtype.type(1.0 / (1.0 - float(rate)))
    threshold = dropout_threshold(rate)
    seed = np.uint64(int(seed))
    xf, of = x.reshape(-1), out.reshape(-1)
    block = min(xf.size, _DROPOUT_BLOCK)
    ramp = np.arange(block, dtype=np.uint64)
    z, t = np.empty(block, np.uint64), np.empty(block, np.uint64)
    keep = np.empty(block, bool)
    for start in range(0, xf.size, block):
        stop = min(start + block, xf.size)
        k = _dropout_keep(start, stop, seed, threshold, ramp, z, t, keep)
        o = of[start:stop]
        np.multiply(xf[start:stop], scale, out=o)
        ob = _bits(o)
        np.multiply(ob, k, out=ob)      # dropped: the bits of +0.0, whatever o held


def dropout_backward(dy, rate, seed, out):
    """Backward pass of :func:`dropout_forward`: the same mask and scale applied
    to ``dy`` (``out = dy * s`` where kept, ``+0.0`` where dropped).

    Parameters
    ----------
    dy : ndarray, any shape
        Gradient with respect to the dropout output. IN
    rate : float
        In ``[0, 1)``: the forward pass's.
    seed : int
        The forward pass's.
    out : ndarray, same shape and dtype
        OUT; may be ``dy`` (in place).
    """
    dropout_forward(dy, rate, seed, out)


# ---------------------------------------------------------------- data movement (issue 17)

#: Source bytes per step of a converting gather: the temporary in the source
#: dtype stays bounded (a whole batch at once was the fastest plain-NumPy form
#: measured; chunks of 16-256 KB were 0-60 % slower from the extra calls).
_GATHER_CHUNK_BYTES = 1 << 22


def gather_rows(src, index, out):
    """Gather rows by index, converting to ``out``'s dtype: ``out[i] = src[index[i]]``.

    A row is everything after the first axis: ``src (n, *shape)``,
    ``out (len(index), *shape)``, so ``out[i, ...] = src[index[i], ...]``
    for ``i in range(len(index))``. Indices may repeat and come in any order.
    This is the one kernel that converts: ``src`` may have any real dtype
    (bool, signed and unsigned integers, float16/32/64) and each value is
    converted to ``out``'s float32 or float64 exactly as
    ``src.astype(out.dtype)`` would (the same results bit for bit; bool gives
    0 or 1), in the same pass as the copy, so a uint8 data set is gathered
    and converted batch by batch without a converted copy of the whole array.

    Parameters
    ----------
    src : ndarray (n, *shape), any real dtype
        IN, never written. Each row must be one C-contiguous block; the rows
        may lie at any constant stride (a C-contiguous array, a read-only
        ``np.memmap`` such as ``np.load(path, mmap_mode="r")``, a slice of
        rows or columns of a bigger array).
    index : ndarray (k,), integer dtype
        IN. Row numbers in ``[0, n)``, ``k >= 1``; repeats and any order allowed.
    out : ndarray (k, *shape), float32 or float64, C-contiguous
        OUT. Must not overlap ``src`` or ``index``.

    Plain NumPy: ``np.take`` into ``out`` when the dtypes agree (``mode="clip"``:
    with ``out=`` the default ``mode="raise"`` gathers into a temporary first and
    was 1.3-3.5x slower; the gate has checked the indices); otherwise ``np.take``
    of up to 4 MB of source rows at a time, converted into ``out`` by
    ``np.copyto(casting="unsafe")`` (astype's conversion).
    """
    if src.dtype == out.dtype:
        np.take(src, index, axis=0, out=out, mode="clip")
        return
    k = index.shape[0]
    row_bytes = src.itemsize * (out.size // k)
    step = max(1, _GATHER_CHUNK_BYTES // max(row_bytes, 1))
    for lo in range(0, k, step):
        hi = min(k, lo + step)
        np.copyto(out[lo:hi], np.take(src, index[lo:hi], axis=0, mode="clip"), casting="unsafe")
