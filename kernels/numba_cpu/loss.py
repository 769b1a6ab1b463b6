"""Losses and softmax of the numba backend: loss and gradient in one pass,
per-row or per-element losses summed in float64."""

import math

import numpy as np
from numba.extending import register_jitable

from ._runtime import _ALIGN, PARALLEL_MIN, _Kernel, _launch, _scalar, _specialised
from ._math import _c, _exp, _log1p01, _relu

_BLOCK = 256   # elements per block of per-element losses before they are summed


@register_jitable(error_model="numpy", fastmath={"reassoc"})
def _sum64(buf, m):
    """``sum(buf[:m])`` in float64; reassociated (vectorized): the order of a
    float64 sum of at most ``_BLOCK`` terms changes it by ~1e-16 relative."""
    total = 0.0
    for i in range(m):
        total += np.float64(buf[i])
    return total


_LANES = 16   # width of the running maxima of _row_max


@_scalar
def _row_max(z, r, lanes):
    """``max(z[r])``, NaN skipped unless first (it reaches the row's results
    anyway through ``exp(z - max)``, as in the reference). Sixteen running
    maxima in ``lanes`` (a scratch array of ``_LANES``): an elementwise select
    over them vectorizes, where one running maximum is a chain of dependent
    compares (LLVM does not vectorize a float max reduction without fast-math)."""
    row = z[r]
    n = row.shape[0]
    if n < _LANES:
        m = row[0]
        for j in range(1, n):
            x = row[j]
            m = x if x > m else m
        return m
    for k in range(_LANES):
        lanes[k] = row[k]
    j = _LANES
    while j + _LANES <= n:
        for k in range(_LANES):
            x = row[j + k]
            b = lanes[k]
            lanes[k] = x if x > b else b
        j += _LANES
    m = lanes[0]
    for k in range(1, _LANES):
        x = lanes[k]
        m = x if x > m else m
    while j < n:
        x = row[j]
        m = x if x > m else m
        j += 1
    return m


@register_jitable(error_model="numpy", fastmath={"reassoc"})
def _sum_row64(row):
    """``sum(row)`` accumulated in float64, reassociated so that it vectorizes
    (a different order than a running sum: ~1e-16 relative)."""
    s = 0.0
    for j in range(row.shape[0]):
        s += np.float64(row[j])
    return s


@_scalar
def _exp_row(z, r, m, out):
    """``out[r] = exp(z[r] - m)``; returns its sum (in float64, rounded to the
    array dtype)."""
    zr = z[r]
    orow = out[r]
    for j in range(zr.shape[0]):
        orow[j] = _exp(zr[j] - m)
    return _c(m, _sum_row64(orow))


def _softmax_ce_rows(lo, hi, z, labels, grad, n):
    """Rows ``lo..hi``: ``grad = (softmax(z) - onehot) / n``; returns the sum
    of the rows' losses ``log(s) - (z[label] - max)`` in float64."""
    z, labels, grad = z[lo:hi], labels[lo:hi], grad[lo:hi]
    lanes = np.empty(_LANES, z.dtype)
    total = 0.0
    for r in range(z.shape[0]):
        m = _row_max(z, r, lanes)
        label = labels[r]
        picked = z[r, label] - m
        s = _exp_row(z, r, m, grad)
        for j in range(z.shape[1]):
            hot = _c(s, 1.0) if j == label else _c(s, 0.0)
            grad[r, j] = (grad[r, j] / s - hot) / n
        total += np.float64(math.log(s) - picked)
    return total


def _softmax_rows(lo, hi, z, out):
    """Rows ``lo..hi``: ``out = exp(z - max) / sum(exp(z - max))``."""
    z, out = z[lo:hi], out[lo:hi]
    lanes = np.empty(_LANES, z.dtype)
    for r in range(z.shape[0]):
        m = _row_max(z, r, lanes)
        s = _exp_row(z, r, m, out)
        for j in range(z.shape[1]):
            out[r, j] = out[r, j] / s


def _bce_elements(lo, hi, z, t, grad, n):
    """``grad = (sigmoid(z) - t) / n``; returns the float64 sum of
    ``max(z, 0) - z*t + log1p(exp(-|z|))``."""
    losses = np.empty(_BLOCK, z.dtype)
    total = 0.0
    for b0 in range(lo, hi, _BLOCK):
        b1 = min(hi, b0 + _BLOCK)
        zb, tb, gb = z[b0:b1], t[b0:b1], grad[b0:b1]
        for i in range(zb.size):
            zi = zb[i]
            ti = tb[i]
            e = _exp(-abs(zi))
            one = _c(zi, 1.0)
            losses[i] = (_log1p01(e) + _relu(zi)) - zi * ti
            gb[i] = ((one if zi >= 0 else e) / (one + e) - ti) / n
        total += _sum64(losses, zb.size)
    return total


def _mse_elements(lo, hi, pred, target, grad, scale):
    """``grad = (pred - target) * (2/n)``; returns the float64 sum of ``(pred - target)^2``."""
    losses = np.empty(_BLOCK, pred.dtype)
    total = 0.0
    for b0 in range(lo, hi, _BLOCK):
        b1 = min(hi, b0 + _BLOCK)
        pb, tb, gb = pred[b0:b1], target[b0:b1], grad[b0:b1]
        for i in range(pb.size):
            d = pb[i] - tb[i]
            losses[i] = d * d
            gb[i] = d * scale
        total += _sum64(losses, pb.size)
    return total


def _loss_kernel(body):
    return _specialised(body.__name__, _Kernel, body, 1 if body.__name__.endswith("rows")
                        else _ALIGN, True)


def _labels_intp(labels):
    """Labels as intp (one compiled kernel for every integer dtype); a copy
    only when they are not intp already (they are small: one per row)."""
    return labels if labels.dtype == np.intp else labels.astype(np.intp)


def softmax_cross_entropy(logits, labels, grad):
    """Mean softmax cross-entropy and its gradient with respect to the logits.

    With ``m_i = max_j z_ij`` and ``s_i = sum_j exp(z_ij - m_i)``:
    ``loss = mean_i(log(s_i) - (z_{i,label_i} - m_i))`` and
    ``grad = (softmax(z) - onehot(labels)) / batch``, one pass per row.

    Parameters
    ----------
    logits : ndarray (batch, classes). IN
    labels : integer ndarray (batch,), values in ``[0, classes)``. IN
    grad : ndarray (batch, classes). OUT

    Returns
    -------
    float
        The mean loss (rows' losses in the array dtype, averaged in float64).
    """
    rows, classes = logits.shape
    total = _launch(_loss_kernel(_softmax_ce_rows), rows,
                    max(1, PARALLEL_MIN["exp"] // classes),
                    logits, _labels_intp(labels), grad, logits.dtype.type(rows))
    return float(total / rows)


def softmax(z, out):
    """Row-wise softmax: ``out[i] = exp(z[i] - max(z[i])) / sum(exp(z[i] - max(z[i])))``.

    Parameters
    ----------
    z : ndarray (batch, classes). IN
    out : ndarray (batch, classes); may be ``z``. OUT
    """
    rows, classes = z.shape
    kernel = _specialised("softmax", _Kernel, _softmax_rows, 1)
    _launch(kernel, rows, max(1, PARALLEL_MIN["exp"] // classes), z, out)


def sigmoid_binary_cross_entropy(logits, targets, grad):
    """Mean binary cross-entropy on logits, and its gradient.

    ``loss = mean(max(z, 0) - z*t + log1p(exp(-|z|)))`` over all elements and
    ``grad = (sigmoid(z) - t) / z.size``, one pass.

    Parameters
    ----------
    logits : ndarray. IN
    targets : ndarray like ``logits``, values in [0, 1]. IN
    grad : ndarray like ``logits``. OUT

    Returns
    -------
    float
    """
    n = logits.size
    total = _launch(_loss_kernel(_bce_elements), n, PARALLEL_MIN["exp"], logits.reshape(-1),
                    targets.reshape(-1), grad.reshape(-1), logits.dtype.type(n))
    return float(total / n)


def mse(pred, target, grad):
    """Mean squared error over all elements and its gradient.

    ``loss = mean((pred - target)^2)``, ``grad = 2*(pred - target) / pred.size``, one pass.

    Parameters
    ----------
    pred, target : ndarray, same shape and dtype. IN
    grad : ndarray like ``pred``; may be ``pred`` or ``target``. OUT

    Returns
    -------
    float
    """
    n = pred.size
    total = _launch(_loss_kernel(_mse_elements), n, PARALLEL_MIN["cheap"], pred.reshape(-1),
                    target.reshape(-1), grad.reshape(-1), pred.dtype.type(2 / n))
    return float(total / n)

