# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Elementwise activations and their derivatives (Cython, OpenMP).

Every loop runs over raw pointers of C-contiguous arrays, serially below
``PARALLEL_MIN`` elements and in ``num_threads`` static chunks above it.
Inputs are trusted: ``fastnn._validate`` checks them first.
"""

cimport cython
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport exp, expf, tanh, tanhf, fabs, fabsf

cdef extern from *:
    """
    #ifdef _OPENMP
    #define FASTNN_OPENMP 1
    #else
    #define FASTNN_OPENMP 0
    #endif
    """
    int FASTNN_OPENMP

#: True when this extension was compiled with OpenMP.
OPENMP = bool(FASTNN_OPENMP)

cdef enum Act:
    IDENTITY, RELU, SIGMOID, TANH

_CODES = {"relu": RELU, "sigmoid": SIGMOID, "tanh": TANH}
#: Activations implemented here; the registry sends the others to the reference.
ACTIVATIONS = tuple(_CODES)

# Below this many elements a parallel region costs more than it saves.
cdef Py_ssize_t PARALLEL_MIN = 1 << 16
cdef int _num_threads = 1


def set_num_threads(int n):
    """Set the OpenMP threads of this module's parallel loops."""
    global _num_threads
    _num_threads = max(1, n)


cdef inline floating _exp(floating x) noexcept nogil:
    if floating is float:
        return expf(x)
    else:
        return exp(x)


cdef inline floating _tanh(floating x) noexcept nogil:
    if floating is float:
        return tanhf(x)
    else:
        return tanh(x)


cdef inline floating _sigmoid(floating z) noexcept nogil:
    # e = exp(-|z|) keeps relative accuracy in the negative tail
    cdef floating e = _exp(-fabs(z))
    return (1 if z >= 0 else e) / (1 + e)


cdef void _forward_range(int act, const floating* z, floating* out,
                         Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef Py_ssize_t i
    if act == RELU:
        for i in range(lo, hi):
            out[i] = z[i] if z[i] > 0 else 0
    elif act == SIGMOID:
        for i in range(lo, hi):
            out[i] = _sigmoid(z[i])
    elif act == TANH:
        for i in range(lo, hi):
            out[i] = _tanh(z[i])


cdef void _backward_range(int act, const floating* dy, const floating* y, floating* out,
                          Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef Py_ssize_t i
    if act == RELU:
        for i in range(lo, hi):
            out[i] = dy[i] * (1 if y[i] > 0 else 0)
    elif act == SIGMOID:
        for i in range(lo, hi):
            out[i] = dy[i] * (y[i] * (1 - y[i]))
    elif act == TANH:
        for i in range(lo, hi):
            out[i] = dy[i] * (1 - y[i] * y[i])


cdef inline Py_ssize_t _chunks(Py_ssize_t n) noexcept nogil:
    """How many static chunks to split ``n`` elements into (1: run serially)."""
    if n < PARALLEL_MIN or _num_threads == 1:
        return 1
    return _num_threads


cdef void _forward(int act, const floating* z, floating* out, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t c, nc = _chunks(n), step = (n + nc - 1) // nc
    if nc == 1:
        _forward_range(act, z, out, 0, n)
        return
    for c in prange(nc, schedule="static", num_threads=nc):
        _forward_range(act, z, out, c * step, min(n, (c + 1) * step))


cdef void _backward(int act, const floating* dy, const floating* y, floating* out,
                    Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t c, nc = _chunks(n), step = (n + nc - 1) // nc
    if nc == 1:
        _backward_range(act, dy, y, out, 0, n)
        return
    for c in prange(nc, schedule="static", num_threads=nc):
        _backward_range(act, dy, y, out, c * step, min(n, (c + 1) * step))


cdef void _forward_typed(int act, const floating[::1] z,  # IN
                         floating[::1] out) noexcept:   # OUT
    with nogil:
        _forward(act, &z[0], &out[0], z.shape[0])


cdef void _backward_typed(int act, const floating[::1] dy,  # IN
                          const floating[::1] y,           # IN
                          floating[::1] out) noexcept:  # OUT
    with nogil:
        _backward(act, &dy[0], &y[0], &out[0], dy.shape[0])


def activation_forward(str act, z, out):
    """``out = act(z)`` for relu, sigmoid and tanh (see the reference)."""
    cdef int code = _CODES[act]
    if z.dtype.itemsize == 4:
        _forward_typed[float](code, z.reshape(-1), out.reshape(-1))
    else:
        _forward_typed[double](code, z.reshape(-1), out.reshape(-1))


def activation_backward(str act, dy, z, y, out):
    """``out = dy * act'(z)``, from ``y``, for relu, sigmoid and tanh."""
    cdef int code = _CODES[act]
    if dy.dtype.itemsize == 4:
        _backward_typed[float](code, dy.reshape(-1), y.reshape(-1), out.reshape(-1))
    else:
        _backward_typed[double](code, dy.reshape(-1), y.reshape(-1), out.reshape(-1))
