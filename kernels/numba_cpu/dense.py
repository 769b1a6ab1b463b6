"""Dense-layer kernels of the numba backend: the GEMM is NumPy's BLAS on views
of the caller's arrays, bias, activation and derivative one fused loop over
its result."""

import numpy as np

from ._runtime import PARALLEL_MIN, _Kernel, _launch, _specialised
from .elementwise import _act_kernels, _derivative_source, _threshold

def dense_forward(x, w, b, act, out, preact=None):
    """Dense layer forward: ``out = act(x @ w + b)``.

    ``x @ w`` is one BLAS call into ``preact`` (or ``out``); bias and
    activation follow in one pass over it. ``preact``, when given, receives
    ``z = x @ w + b``.

    Parameters
    ----------
    x : ndarray (batch, in). IN
    w : ndarray (in, out). IN
    b : ndarray (out,). IN
    act : str
    out : ndarray (batch, out). OUT
    preact : ndarray (batch, out) or None. OUT
    """
    k = _act_kernels(act)
    rows, cols = out.shape
    t = max(1, _threshold(act) // cols)
    if preact is None:
        np.matmul(x, w, out=out)
        _launch(k.bias_act_inplace, rows, t, out, b)
    else:
        np.matmul(x, w, out=preact)
        _launch(k.bias_act, rows, t, preact, b, out)


def backprop_delta(dy, w, z, y, act, out):
    """Delta of the layer below: ``out = (dy @ w.T) * act'(z)``.

    ``dy @ w.T`` is one BLAS call on the transposed view of ``w`` (no copy);
    the derivative (from ``y`` where the activation allows, else ``z``) is
    multiplied in one pass over the result.

    Parameters
    ----------
    dy : ndarray (batch, out). IN
    w : ndarray (in, out). IN
    z, y : ndarray (batch, in) or None. IN
    act : str
    out : ndarray (batch, in). OUT
    """
    np.matmul(dy, w.T, out=out)
    if act == "identity":
        return
    k = _act_kernels(act)
    s = _derivative_source(act, z, y)
    _launch(k.grad_into_dy, out.size, _threshold(act, derivative=True), out.reshape(-1),
            s.reshape(-1))


def _column_sums(lo, hi, dz, db):
    """``db[j] = sum_i dz[i, j]`` for columns ``lo..hi``, row by row (NumPy's
    order), accumulated in float64 and rounded once."""
    dz, db = dz[:, lo:hi], db[lo:hi]
    acc = np.zeros(db.size)
    for i in range(dz.shape[0]):
        for j in range(db.size):
            acc[j] += np.float64(dz[i, j])
    for j in range(db.size):
        db[j] = acc[j]


_COLUMN_SUMS = None


def dense_backward(x, dz, dw, db):
    """Parameter gradients of a dense layer: ``dw = x.T @ dz``, ``db = dz.sum(0)``.

    ``x.T @ dz`` is one BLAS call on the transposed view (no copy); ``db`` sums
    the rows of ``dz`` in a loop vectorized along the columns, in float64.

    Parameters
    ----------
    x : ndarray (batch, in). IN
    dz : ndarray (batch, out). IN
    dw : ndarray (in, out). OUT
    db : ndarray (out,). OUT
    """
    global _COLUMN_SUMS
    np.matmul(x.T, dz, out=dw)
    if _COLUMN_SUMS is None:
        _COLUMN_SUMS = _specialised("column_sums", _Kernel, _column_sums, 16)
    rows, cols = dz.shape
    _launch(_COLUMN_SUMS, cols, max(16, PARALLEL_MIN["cheap"] // rows), dz, db)

