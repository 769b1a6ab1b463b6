# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Elementwise activations and their derivatives (Cython, OpenMP).

Every loop runs over raw pointers of C-contiguous arrays (the range helpers of
``_cy_math.pxd``, shared with the dense layer's epilogues), serially below a
size threshold and in ``num_threads`` static chunks above it. Inputs are
trusted: ``fastnn._validate`` checks them first.
"""

from cython cimport floating

from _cy_math cimport (
    FASTNN_OPENMP, act_backward, act_code, act_forward, act_is_transcendental, n_chunks,
    vexp, vlog1p_unit, vsigmoid, vtanh,
)

#: True when this extension was compiled with OpenMP.
OPENMP = bool(FASTNN_OPENMP)

# Parallel thresholds in elements, shared by every _cy_* module (as numba_cpu's
# PARALLEL_MIN, for the same reason). Alone and back to back, two threads win
# from ~128 k cheap elements (relu backward at 131 k: 11.6 us serial, 6.8 us
# on 2 idle cores) and ~16 k transcendental ones (sigmoid at 16 k: 34 us, 18
# us). But in a training step each kernel follows a BLAS call, libgomp's
# worker is asleep (GOMP_SPINCOUNT=1000) and OpenBLAS's is spinning on the
# other core: waking ours costs ~50 us. The 784-256-128-10 Adam step at
# batch 32 ran at 1.44x NumPy with thresholds of 128 k / 16 k / 32 k and 1.80x
# with 1 M for all (the same as fully serial, 1.76x), at batch 128 1.20x
# against 1.32x (benchmarks/train_throughput.py-style interleaved epochs,
# 2 threads, quiet machine). A region pays off after a wake-up once half the
# serial time exceeds those ~50 us: cheap loops (~0.07 ns/element) and the
# optimizers (~0.2 ns) from 1 M elements, the transcendental loops (sigmoid
# ~0.34 ns/element serially on AVX-512) from 512 k.
cdef Py_ssize_t PAR_MIN_CHEAP = 1 << 20
cdef Py_ssize_t PAR_MIN_TRANS = 1 << 19
cdef int _num_threads = 1


def set_num_threads(int n):
    """Set the OpenMP threads of this module's parallel loops."""
    global _num_threads
    _num_threads = max(1, n)


def _set_parallel_min(Py_ssize_t cheap, Py_ssize_t trans):
    """Set the parallel thresholds (for tests and threshold measurements);
    returns the previous pair."""
    global PAR_MIN_CHEAP, PAR_MIN_TRANS
    old = (PAR_MIN_CHEAP, PAR_MIN_TRANS)
    PAR_MIN_CHEAP, PAR_MIN_TRANS = cheap, trans
    return old


cdef inline Py_ssize_t _act_chunks(int act, Py_ssize_t n) noexcept nogil:
    return n_chunks(n, PAR_MIN_TRANS if act_is_transcendental(act) else PAR_MIN_CHEAP,
                    _num_threads)



cdef void _forward_typed(int act,
                         const floating[::1] z,     # IN (batch*width,)
                         floating[::1] out):        # OUT (batch*width,), may be z
    with nogil:
        act_forward(act, &z[0], &out[0], z.shape[0], _act_chunks(act, z.shape[0]))


cdef void _backward_typed(int act,
                          const floating[::1] dy,   # IN (n,)
                          const floating[::1] z,    # IN (n,) or empty when y is used
                          const floating[::1] y,    # IN (n,) or empty when z is used
                          floating[::1] out):       # OUT (n,), may be dy or z
    cdef const floating* zp = &z[0] if z.shape[0] else NULL
    cdef const floating* yp = &y[0] if y.shape[0] else NULL
    with nogil:
        act_backward(act, &dy[0], zp, yp, &out[0], dy.shape[0],
                     _act_chunks(act, dy.shape[0]))


def activation_forward(str act, z, out):
    """Apply an activation elementwise: ``out = act(z)``.

    Parameters
    ----------
    act : str
        identity, relu (``max(z, 0)``), leaky_relu (``z`` or ``0.01*z``),
        sigmoid (``1/(1+exp(-z))``), tanh, gelu
        (``0.5*z*(1 + tanh(sqrt(2/pi)*(z + 0.044715*z^3)))``), silu
        (``z*sigmoid(z)``) or softplus (``log1p(exp(-|z|)) + max(z, 0)``).
    z : ndarray, float32 or float64, C-contiguous
        IN
    out : ndarray, same shape and dtype
        OUT; may be ``z``.
    """
    cdef int code = act_code(act)
    if code == 0 and out is z:
        return
    if z.dtype.itemsize == 4:
        _forward_typed[float](code, z.reshape(-1), out.reshape(-1))
    else:
        _forward_typed[double](code, z.reshape(-1), out.reshape(-1))


_EMPTY = {4: __import__("numpy").empty(0, "float32"), 8: __import__("numpy").empty(0, "float64")}


def activation_backward(str act, dy, z, y, out):
    """Backpropagate through an activation: ``out = dy * act'(z)``.

    From ``y`` for identity (1), relu (``y > 0``), sigmoid (``y*(1-y)``) and
    tanh (``1 - y^2``); from ``z`` for leaky_relu (1 or 0.01), gelu, silu
    (``s*(1 + z*(1-s))``, ``s = sigmoid(z)``) and softplus (``sigmoid(z)``).

    Parameters
    ----------
    act : str
    dy : ndarray
        IN
    z, y : ndarray or None
        IN; the one the derivative does not use may be None.
    out : ndarray
        OUT; may be ``dy`` or ``z``.
    """
    cdef int code = act_code(act)
    if code == 0 and out is dy:
        return
    cdef int size = dy.dtype.itemsize
    empty = _EMPTY[size]
    zf = empty if z is None else z.reshape(-1)
    yf = empty if y is None else y.reshape(-1)
    if size == 4:
        _backward_typed[float](code, dy.reshape(-1), zf, yf, out.reshape(-1))
    else:
        _backward_typed[double](code, dy.reshape(-1), zf, yf, out.reshape(-1))


cdef void _math_typed(int fn, const floating[::1] x, floating[::1] out) noexcept:
    cdef Py_ssize_t i, n = x.shape[0]
    cdef const floating* xp = &x[0]
    cdef floating* op = &out[0]
    with nogil:
        if fn == 0:
            for i in range(n):
                op[i] = vexp(xp[i])
        elif fn == 1:
            for i in range(n):
                op[i] = vtanh(xp[i])
        elif fn == 2:
            for i in range(n):
                op[i] = vsigmoid(xp[i])
        else:
            for i in range(n):
                op[i] = vlog1p_unit(xp[i])


_MATH = {"exp": 0, "tanh": 1, "sigmoid": 2, "log1p_unit": 3}


def _math(str fn, x, out):
    """The vectorizable math of ``_cy_math.pxd`` elementwise (for tests):
    ``fn`` is exp, tanh, sigmoid or log1p_unit (``log1p`` for ``x`` in [0, 1])."""
    if x.dtype.itemsize == 4:
        _math_typed[float](_MATH[fn], x.reshape(-1), out.reshape(-1))
    else:
        _math_typed[double](_MATH[fn], x.reshape(-1), out.reshape(-1))


# ------------------------------------------------------------------ C entries

# What fastnn.ops' compiled gate calls once it has checked a call (``_cy_call.pxd``):
# the same loops as the kernels above, from the checked call's pointers.
from cpython.pycapsule cimport PyCapsule_New

from _cy_call cimport FASTNN_CALL_CAPSULE, fastnn_call


cdef int _entry_activation_forward(fastnn_call* c) except -1:
    # act, z, out
    cdef int act = c.act
    cdef Py_ssize_t n = c.size[1]
    if act == 0 and c.data[2] == c.data[1]:       # identity in place
        return 0
    with nogil:
        if c.dtype == 0:
            act_forward(act, <const float*>c.data[1], <float*>c.data[2], n, _act_chunks(act, n))
        else:
            act_forward(act, <const double*>c.data[1], <double*>c.data[2], n,
                        _act_chunks(act, n))
    return 0


cdef int _entry_activation_backward(fastnn_call* c) except -1:
    # act, dy, z, y, out (z or y NULL when None)
    cdef int act = c.act
    cdef Py_ssize_t n = c.size[1]
    if act == 0 and c.data[4] == c.data[1]:
        return 0
    with nogil:
        if c.dtype == 0:
            act_backward(act, <const float*>c.data[1], <const float*>c.data[2],
                         <const float*>c.data[3], <float*>c.data[4], n, _act_chunks(act, n))
        else:
            act_backward(act, <const double*>c.data[1], <const double*>c.data[2],
                         <const double*>c.data[3], <double*>c.data[4], n, _act_chunks(act, n))
    return 0


ENTRIES = {
    "activation_forward": PyCapsule_New(<void*>_entry_activation_forward, FASTNN_CALL_CAPSULE,
                                        NULL),
    "activation_backward": PyCapsule_New(<void*>_entry_activation_backward,
                                         FASTNN_CALL_CAPSULE, NULL),
}
