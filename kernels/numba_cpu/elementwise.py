"""Elementwise kernels of the numba backend: the loops of each activation
(forward, derivative, and the bias + activation epilogue of a GEMM), and
``activation_forward`` / ``activation_backward``."""

import math

import numpy as np

from ._runtime import PARALLEL_MIN, _Kernel, _launch, _named, _specialised
from ._math import _ACT, _TRANSCENDENTAL, _TRANSCENDENTAL_D, _c


class _ActKernels:
    """The loops of one activation, each named after it (``fwd__relu``)."""

    def __init__(self, act):
        f, d, _ = _ACT[act]

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

        self.fwd = _Kernel(_named(fwd, act))
        self.fwd_inplace = _Kernel(_named(fwd_inplace, act))
        self.bias_act = _Kernel(_named(bias_act, act), align=1)
        self.bias_act_inplace = _Kernel(_named(bias_act_inplace, act), align=1)
        self.grad = _Kernel(_named(grad, act))
        self.grad_into_dy = _Kernel(_named(grad_into_dy, act))
        self.grad_into_s = _Kernel(_named(grad_into_s, act))


def _act_kernels(act):
    return _specialised(("act", act), _ActKernels, act)


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



# ------------------------------------------------------------ dropout

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _dropout_body(lo, hi, x, out, seed, threshold, scale):
    """Elements ``lo..hi`` (flat): ``out = x * scale`` where
    ``splitmix64(seed + (i+1)*golden) >> 40 >= threshold``, else ``+0.0``.
    All hash arithmetic in uint64 (numba would turn uint64 mixed with int64
    into float64), so it wraps as the contract says."""
    x, out = x[lo:hi], out[lo:hi]
    zero = _c(scale, 0.0)
    i = np.uint64(lo)
    for t in range(x.size):
        i += np.uint64(1)
        z = seed + i * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
        out[t] = x[t] * scale if (z >> np.uint64(40)) >= threshold else zero


_DROPOUT = _Kernel(_dropout_body)


def dropout_forward(x, rate, seed, out):
    """Inverted dropout: ``out = x * s`` where element ``i`` (flat, C order) is
    kept, ``+0.0`` where it is dropped; ``s = 1/(1 - rate)`` computed in float64
    and rounded once to the dtype. Kept iff
    ``splitmix64((seed + (i+1)*0x9E3779B97F4A7C15) mod 2**64) >> 40 >= T``,
    ``T = floor(rate*2**24 + 0.5)``: the mask is computed in the loop that
    applies it, the same on every backend. ``rate == 0`` copies.

    Parameters
    ----------
    x : ndarray, any shape. IN
    rate : float in [0, 1)
    seed : int in [0, 2**64)
    out : ndarray like ``x``. OUT; may be ``x``.
    """
    if rate == 0:
        if not _same(out, x):
            np.copyto(out, x)
        return
    threshold = math.floor(float(rate) * 2.0**24 + 0.5)
    scale = x.dtype.type(1.0 / (1.0 - float(rate)))
    _launch(_DROPOUT, x.size, PARALLEL_MIN["exp"], x.reshape(-1), out.reshape(-1),
            np.uint64(int(seed)), np.uint64(threshold), scale)


def dropout_backward(dy, rate, seed, out):
    """Backward pass of :func:`dropout_forward`: the same mask and scale on
    ``dy`` (``out = dy * s`` where kept, ``+0.0`` where dropped).

    Parameters
    ----------
    dy : ndarray, any shape. IN
    rate : float in [0, 1): the forward pass's.
    seed : int: the forward pass's.
    out : ndarray like ``dy``. OUT; may be ``dy``.
    """
    dropout_forward(dy, rate, seed, out)
