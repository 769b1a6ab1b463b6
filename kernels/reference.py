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
]

#: Every kernel a backend must export, with these signatures.
CONTRACT = (
    "dense_forward", "activation_forward", "activation_backward",
    "backprop_delta", "dense_backward", "softmax_cross_entropy",
    "sigmoid_binary_cross_entropy", "mse", "sgd_step", "adam_step",
    "rmsprop_step", "softmax",
)

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
    np.sum(dz, axis=0, out=db)


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
        OUT; may be ``pred``.

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
    centered: ``cm = rho*cm + (1-rho)*g'`` and ``den = sqrt(sq - cm^2) + eps``,
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
