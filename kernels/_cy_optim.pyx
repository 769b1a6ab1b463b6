# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Optimizer steps (Cython, OpenMP): SGD (momentum, Nesterov), Adam / AdamW /
AMSGrad, RMSprop (centered, momentum), each one loop that reads and writes
every array once, in place, with L2 / decoupled weight decay and L1 inside it.

Scalar hyper-parameters are rounded to the dtype once per call (as NumPy's
``array * python_float`` does); bias corrections are computed once per call in
double. Options that change which arrays are touched (momentum buffer, AMSGrad
``vmax``, centered mean) select a loop variant through a compile-time flag of
an inline range function; the others are vectorized selects in the loop.
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport pow, sqrt, sqrtf

from _cy_math cimport FASTNN_OPENMP, chunk_step, n_chunks

#: True when this extension was compiled with OpenMP.
OPENMP = bool(FASTNN_OPENMP)

# Parallel threshold in elements (see _cy_elementwise.pyx): alone, Adam wins on
# 2 idle cores from ~32 k elements (16 k: 24 us serial, 14 us parallel, SSE2),
# but after a BLAS call in a training step waking the OpenMP worker costs ~50
# us, so parallel from 1 M.
cdef Py_ssize_t PAR_MIN_OPT = 1 << 20
cdef int _num_threads = 1


def set_num_threads(int n):
    """Set the OpenMP threads of this module's parallel loops."""
    global _num_threads
    _num_threads = max(1, n)


def _set_parallel_min(Py_ssize_t n):
    """Set the parallel threshold (tests, measurements); returns the old one."""
    global PAR_MIN_OPT
    old = PAR_MIN_OPT
    PAR_MIN_OPT = n
    return old


ctypedef struct Hyper:
    # every scalar of a step, in double; rounded to the dtype in the range loops
    double lr, momentum, beta1, beta2, eps, weight_decay, l1
    double decay          # AdamW: 1 - lr*weight_decay (1 otherwise)
    double inv_bc2_sqrt   # Adam: 1/sqrt(1 - beta2^t)
    double step_size      # Adam: lr/(1 - beta1^t)
    bint use_wd, use_l1, nesterov


cdef inline floating regularized(floating p, floating g, floating wd, floating l1,
                                 bint use_wd, bint use_l1) noexcept nogil:
    """``g + wd*p + l1*sign(p)``, each term only when it applies (so that a
    non-finite ``p`` changes nothing when its coefficient is 0)."""
    cdef floating zero = 0, one = 1, mone = -1
    cdef floating a = g + wd * p
    g = a if use_wd else g
    cdef floating s = one if p > zero else mone
    s = s if p != zero else p        # sign(0) = 0, sign(NaN) = NaN
    a = g + l1 * s
    return a if use_l1 else g


cdef inline floating fsqrt(floating x) noexcept nogil:
    """``sqrt`` in the dtype's precision (``sqrtf`` for float32: libm's ``sqrt``
    would promote the whole float32 expression to double)."""
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


# ------------------------------------------------------------------ SGD

cdef inline void sgd_range(floating* p, const floating* g, floating* buf, const Hyper* h,
                           Py_ssize_t lo, Py_ssize_t hi, bint momentum) noexcept nogil:
    cdef floating lr = h.lr, mom = h.momentum, wd = h.weight_decay, l1 = h.l1
    cdef bint use_wd = h.use_wd, use_l1 = h.use_l1, nesterov = h.nesterov
    cdef floating gp, b, d
    cdef Py_ssize_t i
    for i in range(lo, hi):
        gp = regularized(p[i], g[i], wd, l1, use_wd, use_l1)
        if momentum:
            b = buf[i] * mom + gp
            buf[i] = b
            d = gp + mom * b
            gp = d if nesterov else b
        p[i] = p[i] - lr * gp


cdef void sgd_chunk(floating* p, const floating* g, floating* buf, const Hyper* h,
                    Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    if buf != NULL:
        sgd_range(p, g, buf, h, lo, hi, True)
    else:
        sgd_range(p, g, buf, h, lo, hi, False)


cdef void _sgd(floating[::1] p,          # IN/OUT (n,) parameters
               const floating[::1] g,    # IN (n,) gradient
               floating[::1] buf,        # IN/OUT (n,) momentum buffer, or empty
               Hyper* h):
    run(OPT_SGD, &p[0], &g[0], &buf[0] if buf.shape[0] else NULL, NULL, NULL, h, p.shape[0])


# ------------------------------------------------------------------ Adam

cdef inline void adam_range(floating* p, const floating* g, floating* m, floating* v,
                            floating* vmax, const Hyper* h, Py_ssize_t lo, Py_ssize_t hi,
                            bint ams) noexcept nogil:
    cdef floating b1 = h.beta1, b2 = h.beta2, c1 = 1 - h.beta1, c2 = 1 - h.beta2
    cdef floating wd = h.weight_decay, l1 = h.l1, decay = h.decay, eps = h.eps
    cdef floating inv_bc2 = h.inv_bc2_sqrt, step_size = h.step_size
    cdef bint use_wd = h.use_wd, use_l1 = h.use_l1
    cdef floating pi, gp, mi, vi, vm, t
    cdef Py_ssize_t i
    for i in range(lo, hi):
        pi = p[i]
        gp = regularized(pi, g[i], wd, l1, use_wd, use_l1)
        pi = pi * decay                         # AdamW (decay is 1 otherwise)
        mi = m[i] * b1 + c1 * gp
        vi = v[i] * b2 + c2 * (gp * gp)
        m[i] = mi
        v[i] = vi
        if ams:
            vm = vmax[i]
            t = vm if vm > vi else vi
            vm = vm if vm != vm else t          # NaN propagates, as np.maximum
            vmax[i] = vm
            vi = vm
        p[i] = pi - (mi / (fsqrt(vi) * inv_bc2 + eps)) * step_size


cdef void adam_chunk(floating* p, const floating* g, floating* m, floating* v,
                     floating* vmax, const Hyper* h, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    if vmax != NULL:
        adam_range(p, g, m, v, vmax, h, lo, hi, True)
    else:
        adam_range(p, g, m, v, vmax, h, lo, hi, False)


cdef void _adam(floating[::1] p,          # IN/OUT (n,) parameters
                const floating[::1] g,    # IN (n,) gradient
                floating[::1] m,          # IN/OUT (n,) first moment
                floating[::1] v,          # IN/OUT (n,) second moment
                floating[::1] vmax,       # IN/OUT (n,) AMSGrad maximum, or empty
                Hyper* h):
    run(OPT_ADAM, &p[0], &g[0], &m[0], &v[0], &vmax[0] if vmax.shape[0] else NULL, h,
        p.shape[0])


# ------------------------------------------------------------------ RMSprop

cdef inline void rmsprop_range(floating* p, const floating* g, floating* sq, floating* buf,
                               floating* cm, const Hyper* h, Py_ssize_t lo, Py_ssize_t hi,
                               bint momentum, bint centered) noexcept nogil:
    cdef floating rho = h.beta2, c2 = 1 - h.beta2, eps = h.eps, lr = h.lr, mom = h.momentum
    cdef floating wd = h.weight_decay, l1 = h.l1
    cdef bint use_wd = h.use_wd, use_l1 = h.use_l1
    cdef floating gp, s, a, q
    cdef Py_ssize_t i
    for i in range(lo, hi):
        gp = regularized(p[i], g[i], wd, l1, use_wd, use_l1)
        s = sq[i] * rho + c2 * (gp * gp)
        sq[i] = s
        if centered:
            a = cm[i] * rho + c2 * gp
            cm[i] = a
            s = s - a * a
            s = 0 if s < 0 else s       # >= 0 exactly; rounding may make it negative
        q = gp / (fsqrt(s) + eps)
        if momentum:
            q = buf[i] * mom + q
            buf[i] = q
        p[i] = p[i] - lr * q


cdef void rmsprop_chunk(floating* p, const floating* g, floating* sq, floating* buf,
                        floating* cm, const Hyper* h, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    if buf != NULL:
        if cm != NULL:
            rmsprop_range(p, g, sq, buf, cm, h, lo, hi, True, True)
        else:
            rmsprop_range(p, g, sq, buf, cm, h, lo, hi, True, False)
    elif cm != NULL:
        rmsprop_range(p, g, sq, buf, cm, h, lo, hi, False, True)
    else:
        rmsprop_range(p, g, sq, buf, cm, h, lo, hi, False, False)


cdef void _rmsprop(floating[::1] p,          # IN/OUT (n,) parameters
                   const floating[::1] g,    # IN (n,) gradient
                   floating[::1] sq,         # IN/OUT (n,) mean of squared gradients
                   floating[::1] buf,        # IN/OUT (n,) momentum buffer, or empty
                   floating[::1] cm,         # IN/OUT (n,) centered mean, or empty
                   Hyper* h):
    run(OPT_RMSPROP, &p[0], &g[0], &sq[0], &buf[0] if buf.shape[0] else NULL,
        &cm[0] if cm.shape[0] else NULL, h, p.shape[0])


# ------------------------------------------------------------------ the memory floor

cdef inline void stream_range(floating* p, const floating* g, floating* m, floating* v,
                              Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gi
    for i in range(lo, hi):
        gi = g[i]
        m[i] = m[i] + gi
        v[i] = v[i] + gi
        p[i] = p[i] + gi


cdef void _stream(floating[::1] p, const floating[::1] g, floating[::1] m, floating[::1] v):
    run(OPT_STREAM, &p[0], &g[0], &m[0], &v[0], NULL, NULL, p.shape[0])


# ------------------------------------------------------------------ one driver

cdef enum:
    OPT_SGD = 0
    OPT_ADAM = 1
    OPT_RMSPROP = 2
    OPT_STREAM = 3


cdef inline void run_chunk(int kind, floating* p, const floating* g, floating* a, floating* b,
                           floating* c, const Hyper* h, Py_ssize_t lo,
                           Py_ssize_t hi) noexcept nogil:
    """Elements ``lo..hi`` of one optimizer; ``a, b, c`` are its state arrays
    in the order of its kernel's arguments (NULL: not used)."""
    if kind == OPT_SGD:
        sgd_chunk(p, g, a, h, lo, hi)
    elif kind == OPT_ADAM:
        adam_chunk(p, g, a, b, c, h, lo, hi)
    elif kind == OPT_RMSPROP:
        rmsprop_chunk(p, g, a, b, c, h, lo, hi)
    else:
        stream_range(p, g, a, b, lo, hi)


cdef void run(int kind, floating* p, const floating* g, floating* a, floating* b, floating* c,
              const Hyper* h, Py_ssize_t n) noexcept:
    """One optimizer over ``n`` elements: serially below ``PAR_MIN_OPT``, else in
    ``num_threads`` static chunks of whole cache lines."""
    cdef Py_ssize_t i, nc, step
    with nogil:
        nc = n_chunks(n, PAR_MIN_OPT, _num_threads)
        if nc == 1:
            run_chunk(kind, p, g, a, b, c, h, 0, n)
        else:
            step = chunk_step(n, nc)
            for i in prange(nc, schedule="static", num_threads=nc):
                run_chunk(kind, p, g, a, b, c, h, min(n, i * step), min(n, (i + 1) * step))


def _stream_floor(p, g, m, v):
    """The memory-bandwidth floor of Adam (benchmarks only): a plain loop that
    reads 4 arrays and writes 3 (``m += g; v += g; p += g``), chunked as the
    optimizers are."""
    if p.dtype.itemsize == 4:
        _stream[float](p, g, m, v)
    else:
        _stream[double](p, g, m, v)


# ------------------------------------------------------------------ scalars of a step

cdef void _sgd_hyper(Hyper* h, double lr, double momentum, bint nesterov, double weight_decay,
                     double l1) noexcept:
    h.lr = lr
    h.momentum = momentum
    h.weight_decay = weight_decay
    h.l1 = l1
    h.use_wd = weight_decay != 0
    h.use_l1 = l1 != 0
    h.nesterov = nesterov


cdef void _adam_hyper(Hyper* h, double step, double lr, double beta1, double beta2, double eps,
                      double weight_decay, bint decoupled, double l1) noexcept:
    cdef double bc1 = 1 - pow(beta1, step), bc2 = 1 - pow(beta2, step)
    h.beta1 = beta1
    h.beta2 = beta2
    h.eps = eps
    h.weight_decay = weight_decay
    h.l1 = l1
    h.use_l1 = l1 != 0
    h.use_wd = (not decoupled) and weight_decay != 0
    h.decay = 1 - lr * weight_decay if decoupled and weight_decay != 0 else 1
    h.inv_bc2_sqrt = 1 / sqrt(bc2)
    h.step_size = lr / bc1


cdef void _rmsprop_hyper(Hyper* h, double lr, double rho, double eps, double momentum,
                         double weight_decay, double l1) noexcept:
    h.lr = lr
    h.beta2 = rho
    h.eps = eps
    h.momentum = momentum
    h.weight_decay = weight_decay
    h.l1 = l1
    h.use_wd = weight_decay != 0
    h.use_l1 = l1 != 0


# ------------------------------------------------------------------ the public kernels

import numpy as np

_EMPTY = {4: np.empty(0, np.float32), 8: np.empty(0, np.float64)}


def sgd_step(p, g, buf, lr, momentum, nesterov, weight_decay, l1):
    """One SGD step in place (PyTorch's ``torch.optim.SGD``, dampening 0).

    ``g' = g + weight_decay*p + l1*sign(p)``; with ``momentum > 0``:
    ``buf = momentum*buf + g'`` and ``d = g' + momentum*buf`` (Nesterov) or
    ``d = buf``; without momentum ``d = g'``. Then ``p -= lr*d``. One loop.

    Parameters
    ----------
    p : ndarray (n,)
        IN/OUT
    g : ndarray (n,)
        IN
    buf : ndarray (n,) or None
        Momentum buffer; None (or unused) when ``momentum == 0``. IN/OUT
    lr, momentum, weight_decay, l1 : float
    nesterov : bool
    """
    cdef Hyper h
    _sgd_hyper(&h, lr, momentum, nesterov, weight_decay, l1)
    size = p.dtype.itemsize
    if momentum == 0 or buf is None:
        buf = _EMPTY[size]
    if size == 4:
        _sgd[float](p, g, buf, &h)
    else:
        _sgd[double](p, g, buf, &h)


def adam_step(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, decoupled, l1, vmax):
    """One Adam / AdamW / AMSGrad step in place (PyTorch's algorithms), one loop.

    ``g' = g + weight_decay*p + l1*sign(p)`` (AdamW instead:
    ``p *= 1 - lr*weight_decay``, ``sign(p)`` taken before it);
    ``m = beta1*m + (1-beta1)*g'``, ``v = beta2*v + (1-beta2)*g'^2``; AMSGrad:
    ``vmax = max(vmax, v)`` replaces ``v`` below;
    ``p -= lr/(1-beta1^t) * m / (sqrt(v)/sqrt(1-beta2^t) + eps)``.

    Parameters
    ----------
    p : ndarray (n,)
        IN/OUT
    g : ndarray (n,)
        IN
    m, v : ndarray (n,)
        IN/OUT
    step : int
        ``t``, the 1-based step count after this step.
    lr, beta1, beta2, eps, weight_decay, l1 : float
    decoupled : bool
    vmax : ndarray (n,) or None
        IN/OUT

    Bias corrections are computed once per call in double.
    """
    cdef Hyper h
    _adam_hyper(&h, step, lr, beta1, beta2, eps, weight_decay, decoupled, l1)
    size = p.dtype.itemsize
    if vmax is None:
        vmax = _EMPTY[size]
    if size == 4:
        _adam[float](p, g, m, v, vmax, &h)
    else:
        _adam[double](p, g, m, v, vmax, &h)


def rmsprop_step(p, g, sq, buf, lr, rho, eps, momentum, centered_mean, weight_decay, l1):
    """One RMSprop step in place (PyTorch's ``torch.optim.RMSprop``), one loop.

    ``g' = g + weight_decay*p + l1*sign(p)``; ``sq = rho*sq + (1-rho)*g'^2``;
    centered: ``cm = rho*cm + (1-rho)*g'`` and ``den = sqrt(max(sq - cm^2, 0)) + eps``,
    else ``den = sqrt(sq) + eps``; with ``momentum > 0``:
    ``buf = momentum*buf + g'/den`` and ``p -= lr*buf``, else ``p -= lr*g'/den``.

    Parameters
    ----------
    p : ndarray (n,)
        IN/OUT
    g : ndarray (n,)
        IN
    sq : ndarray (n,)
        IN/OUT
    buf : ndarray (n,) or None
        IN/OUT; None (or unused) when ``momentum == 0``.
    lr, rho, eps, momentum, weight_decay, l1 : float
    centered_mean : ndarray (n,) or None
        IN/OUT when centered.
    """
    cdef Hyper h
    _rmsprop_hyper(&h, lr, rho, eps, momentum, weight_decay, l1)
    size = p.dtype.itemsize
    empty = _EMPTY[size]
    if not momentum > 0 or buf is None:
        buf = empty
    if centered_mean is None:
        centered_mean = empty
    if size == 4:
        _rmsprop[float](p, g, sq, buf, centered_mean, &h)
    else:
        _rmsprop[double](p, g, sq, buf, centered_mean, &h)


# ------------------------------------------------------------------ C entries

# What fastnn.ops' compiled gate calls once it has checked a call (``_cy_call.pxd``):
# the same step as the kernels above, from the checked call's pointers and values.
from cpython.pycapsule cimport PyCapsule_New

from _cy_call cimport FASTNN_CALL_CAPSULE, fastnn_call


cdef int _entry_sgd_step(fastnn_call* c) except -1:
    # p, g, buf, lr, momentum, nesterov, weight_decay, l1
    cdef Hyper h
    _sgd_hyper(&h, c.real[3], c.real[4], c.ival[5] != 0, c.real[6], c.real[7])
    cdef char* buf = c.data[2] if c.real[4] != 0 else NULL
    if c.dtype == 0:
        run(OPT_SGD, <float*>c.data[0], <const float*>c.data[1], <float*>buf, NULL, NULL, &h,
            c.size[0])
    else:
        run(OPT_SGD, <double*>c.data[0], <const double*>c.data[1], <double*>buf, NULL, NULL, &h,
            c.size[0])
    return 0


cdef int _entry_adam_step(fastnn_call* c) except -1:
    # p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, decoupled, l1, vmax
    cdef Hyper h
    _adam_hyper(&h, <double>c.ival[4], c.real[5], c.real[6], c.real[7], c.real[8], c.real[9],
                c.ival[10] != 0, c.real[11])
    if c.dtype == 0:
        run(OPT_ADAM, <float*>c.data[0], <const float*>c.data[1], <float*>c.data[2],
            <float*>c.data[3], <float*>c.data[12], &h, c.size[0])
    else:
        run(OPT_ADAM, <double*>c.data[0], <const double*>c.data[1], <double*>c.data[2],
            <double*>c.data[3], <double*>c.data[12], &h, c.size[0])
    return 0


cdef int _entry_rmsprop_step(fastnn_call* c) except -1:
    # p, g, sq, buf, lr, rho, eps, momentum, centered_mean, weight_decay, l1
    cdef Hyper h
    _rmsprop_hyper(&h, c.real[4], c.real[5], c.real[6], c.real[7], c.real[9], c.real[10])
    cdef char* buf = c.data[3] if c.real[7] > 0 else NULL
    if c.dtype == 0:
        run(OPT_RMSPROP, <float*>c.data[0], <const float*>c.data[1], <float*>c.data[2],
            <float*>buf, <float*>c.data[8], &h, c.size[0])
    else:
        run(OPT_RMSPROP, <double*>c.data[0], <const double*>c.data[1], <double*>c.data[2],
            <double*>buf, <double*>c.data[8], &h, c.size[0])
    return 0


ENTRIES = {
    "sgd_step": PyCapsule_New(<void*>_entry_sgd_step, FASTNN_CALL_CAPSULE, NULL),
    "adam_step": PyCapsule_New(<void*>_entry_adam_step, FASTNN_CALL_CAPSULE, NULL),
    "rmsprop_step": PyCapsule_New(<void*>_entry_rmsprop_step, FASTNN_CALL_CAPSULE, NULL),
}
