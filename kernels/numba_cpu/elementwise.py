"""Elementwise kernels of the numba backend: the loops of each activation
(forward, derivative, and the bias + activation epilogue of a GEMM), and
``activation_forward`` / ``activation_backward``."""

import numpy as np

from ._runtime import PARALLEL_MIN, _Kernel, _launch, _specialised
from ._math import _ACT, _TRANSCENDENTAL, _TRANSCENDENTAL_D

class _ActKernels:
    """The loops of one activation."""

    def __init__(self, f, d):
        # Each body first slices [lo, hi): LLVM vectorizes a loop only when
        # it can prove its indices non-negative (numba wraps negative ones).
        def fwd(lo, hi, z, out):
            z, out = z[lo:hi], out[lo:hi]
            for i in range(z.size):
                out[i] = f(z[i])

        def fwd_inplace(lo, hi, a):
            a = a[lo:hi]
            for i in range(a.size):
                a[i] = f(a[i])

        def bias_act(lo, hi, z, b, out):          # rows lo..hi of (batch, width)
            z, out = z[lo:hi], out[lo:hi]
            for r in range(z.shape[0]):
                for j in range(b.size):
                    v = z[r, j] + b[j]
                    z[r, j] = v
                    out[r, j] = f(v)

        def bias_act_inplace(lo, hi, a, b):
            a = a[lo:hi]
            for r in range(a.shape[0]):
                for j in range(b.size):
                    a[r, j] = f(a[r, j] + b[j])

        def grad(lo, hi, dy, s, out):
            dy, s, out = dy[lo:hi], s[lo:hi], out[lo:hi]
            for i in range(dy.size):
                out[i] = dy[i] * d(s[i])

        def grad_into_dy(lo, hi, a, s):
            a, s = a[lo:hi], s[lo:hi]
            for i in range(a.size):
                a[i] = a[i] * d(s[i])

        def grad_into_s(lo, hi, dy, a):
            dy, a = dy[lo:hi], a[lo:hi]
            for i in range(a.size):
                a[i] = dy[i] * d(a[i])

        self.fwd = _Kernel(fwd)
        self.fwd_inplace = _Kernel(fwd_inplace)
        self.bias_act = _Kernel(bias_act, align=1)
        self.bias_act_inplace = _Kernel(bias_act_inplace, align=1)
        self.grad = _Kernel(grad)
        self.grad_into_dy = _Kernel(grad_into_dy)
        self.grad_into_s = _Kernel(grad_into_s)


def _act_kernels(act):
    f, d, _ = _ACT[act]
    return _specialised(("act", act), _ActKernels, f, d)


def _same(a, b):
    """Whether two validated arrays are the same memory (the gate allows an
    output to be an input exactly, or disjoint from it)."""
    return a is b or (b is not None and np.may_share_memory(a, b))


def _threshold(act, derivative=False):
    costly = act in (_TRANSCENDENTAL_D if derivative else _TRANSCENDENTAL)
    return PARALLEL_MIN["exp" if costly else "cheap"]


def activation_forward(act, z, out):
    """Apply an activation elementwise: ``out = act(z)`` (see the reference
    for the eight formulas); ``out`` may be ``z``.

    Parameters
    ----------
    act : str
    z : ndarray, float32 or float64, C-contiguous. IN
    out : ndarray like ``z``. OUT
    """
    if act == "identity":
        if not _same(out, z):
            np.copyto(out, z)
        return
    k = _act_kernels(act)
    n = z.size
    if _same(out, z):
        _launch(k.fwd_inplace, n, _threshold(act), out.reshape(-1))
    else:
        _launch(k.fwd, n, _threshold(act), z.reshape(-1), out.reshape(-1))


def _derivative_source(act, z, y):
    return y if _ACT[act][2] else z


def activation_backward(act, dy, z, y, out):
    """Backpropagate through an activation: ``out = dy * act'(z)``.

    The derivative is taken from ``y`` for identity, relu (``y > 0``), sigmoid
    (``y*(1-y)``) and tanh (``1 - y^2``), from ``z`` for leaky_relu, gelu, silu
    and softplus. ``out`` may be ``dy``, ``z`` or ``y``.

    Parameters
    ----------
    act : str
    dy : ndarray. IN
    z, y : ndarray or None (the one the derivative does not use). IN
    out : ndarray like ``dy``. OUT
    """
    if act == "identity":
        if not _same(out, dy):
            np.copyto(out, dy)
        return
    k = _act_kernels(act)
    s = _derivative_source(act, z, y)
    n = dy.size
    t = _threshold(act, derivative=True)
    if _same(out, dy):
        _launch(k.grad_into_dy, n, t, out.reshape(-1), s.reshape(-1))
    elif _same(out, s):
        _launch(k.grad_into_s, n, t, dy.reshape(-1), out.reshape(-1))
    else:
        _launch(k.grad, n, t, dy.reshape(-1), s.reshape(-1), out.reshape(-1))

