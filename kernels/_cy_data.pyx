# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Data movement (Cython, OpenMP): ``gather_rows``, the batch gather of ``fit``,
and ``gather_batch``, ``fit``'s rows and targets of one batch in one call.

``out[i] = src[index[i]]`` row by row, where a row is everything after the
first axis: one ``memcpy`` per row when ``src`` has ``out``'s dtype, else one
converting loop per row (``out_t(value)``, the C conversion NumPy's ``astype``
uses, so the results agree bit for bit; bool gives ``value != 0``). The rows of
``src`` are read at its first-axis stride (a C-contiguous array, a memmap, a
slice of rows or columns), the index at its own stride, int32 or int64 (other
integer widths are converted to ``intp`` first: the index is small). Serial
below ``PAR_MIN_BYTES`` moved, ``num_threads`` static chunks of rows above;
while a row is copied, the rows ``PREFETCH_SPAN`` bytes on are prefetched into
the L2 cache (random rows come from memory).

Native source dtypes: bool, (u)int8/16/32/64, float32, float64 in the
machine's byte order and aligned. Anything else the gate accepts (float16,
longdouble, a byte-swapped or misaligned array) runs the NumPy reference.
Inputs are trusted: ``fastnn._validate.gather_rows`` checks them first.
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from _cy_math cimport FASTNN_OPENMP, n_chunks
from _cy_numpy cimport (
    NPY_ARRAY_ALIGNED, NPY_ARRAY_C_CONTIGUOUS, NPY_BOOL, NPY_DOUBLE, NPY_FLOAT,
    PyArrayObject, PyArray_BYTES, PyArray_DIMS, PyArray_FLAGS, PyArray_ISNOTSWAPPED,
    PyArray_ITEMSIZE, PyArray_NDIM, PyArray_SIZE, PyArray_STRIDES, PyArray_TYPE,
    PyTypeNum_ISINTEGER, PyTypeNum_ISSIGNED, _import_array, npy_intp,
)

import numpy as np

from fastnn.kernels.reference import gather_rows as _reference_gather_rows

cdef extern from *:
    """
    /* Ask for the first ``bytes`` of a row read soon, into the L2 cache
       (locality 2: prefetcht1 on x86). Rows picked at random from a large
       array come from memory, and the hardware prefetcher follows a row only
       after missing in it. A prefetch into L1 holds one of the core's few L1
       miss buffers until the line arrives (and the copy's own loads queue
       behind it); one into L2 does not, so whole rows can be in flight.
       The empty volatile asm marks the function as one with side effects:
       GCC 12 found a caller that only prefetches free of them and removed
       every call to it (at -O1 and above). */
    static inline void fastnn_prefetch_row(const char* p, Py_ssize_t bytes) {
    #if defined(__GNUC__) || defined(__clang__)
        for (Py_ssize_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 2);
        __asm__ __volatile__("" : : "r"(p));
    #else
        (void)p; (void)bytes;
    #endif
    }
    """
    void prefetch_row "fastnn_prefetch_row"(const char* p, Py_ssize_t bytes) noexcept nogil

_import_array()

#: True when this extension was compiled with OpenMP.
OPENMP = bool(FASTNN_OPENMP)

# Parallel threshold in bytes moved (read + written); benchmarks/gather_rows.py
# --threshold measures it. Serially a gather of random rows from memory moves
# ~16 GB/s (float32 -> float32: 128 rows of 784 in 50 us) and ~26 GB/s
# (uint8 -> float32: 19 us). Back to back, with a core free, two threads did
# 128 float32 rows in 31 us against 49 and 128 uint8 rows in 13 against 18.
# But in fit the gather follows a training step, whose BLAS calls leave
# libgomp's worker asleep (waking it costs ~50 us here, see
# _cy_elementwise.pyx), and right after a 256x256 SGEMM two threads lost at
# every size measured, 200 KB to 26 MB (6.4 MB: 558 us against 462; load 5-6
# on 2 shared cores, so provisional). Parallel from 8 MB moved (~500 us
# serial), where a wake-up costs at most a tenth: batches of fit stay serial.
cdef Py_ssize_t PAR_MIN_BYTES = 1 << 23
# Bytes of rows prefetched ahead of the row being copied: the next
# max(2, ceil(PREFETCH_SPAN / row bytes)) rows, each whole up to PREFETCH_SPAN
# (a longer row's rest the hardware streams). Median of 4 x 200 gathers of
# random rows of 784 from 100,000, us, one thread, an 8 MB buffer written
# between gathers (as a training step does; load ~0.8): the old scheme (the
# first 1 KB of the row 8 on, into L1) against whole rows into L2 at 2 / 3 /
# 4 / 8 rows ahead:
#   128 float32 rows        48.0-49.3   37.3-38.0 / 36.8 / 37.0 / -
#   128 uint8 rows          19.4        17.9 / 16.4 / 15.4 / 13.9
#   32 uint8 rows           10.4        10.0 / 9.6 / 9.1 / 8.6
#   128 float64 rows        88.5        78.3 / 87.2 / 86.2 / 79.7
# (no prefetch: 58.8 for 128 float32 rows). 8 KB ahead is 3 float32 rows of
# 784, 11 of uint8, 2 of float64.
cdef Py_ssize_t PREFETCH_SPAN = 8192
cdef int _num_threads = 1


def set_num_threads(int n):
    """Set the OpenMP threads of this module's parallel loops."""
    global _num_threads
    _num_threads = max(1, n)


def _set_prefetch(Py_ssize_t span):
    """Set the bytes of rows prefetched ahead (0: none; for measurements);
    returns the old value."""
    global PREFETCH_SPAN
    old = PREFETCH_SPAN
    PREFETCH_SPAN = max(0, span)
    return old


def _set_parallel_min(Py_ssize_t n):
    """Set the parallel threshold in bytes moved (tests, measurements);
    returns the old one."""
    global PAR_MIN_BYTES
    old = PAR_MIN_BYTES
    PAR_MIN_BYTES = n
    return old


# source codes (out: float32 or float64)
cdef enum:
    S_REF = 0     # not native here: the NumPy reference
    S_BOOL, S_U8, S_I8, S_U16, S_I16, S_U32, S_I32, S_U64, S_I64, S_F32, S_F64

# index codes
cdef enum:
    I_CONVERT = 0, I_32, I_U32, I_64   # I_64 also holds uint64 (values < n < 2**63)


ctypedef fused src_t:
    uint8_t
    int8_t
    uint16_t
    int16_t
    uint32_t
    int32_t
    uint64_t
    int64_t
    float
    double


ctypedef struct Gather:
    const char* src       # row 0 of src
    Py_ssize_t stride     # bytes from one row of src to the next (any sign)
    const char* index
    Py_ssize_t istride    # bytes from one index entry to the next
    int ikind             # I_32, I_U32, I_64
    char* out             # C-contiguous (k, row)
    Py_ssize_t row        # elements per row
    Py_ssize_t k          # rows gathered


cdef inline Py_ssize_t _row_of(const Gather* g, Py_ssize_t i) noexcept nogil:
    cdef const char* p = g.index + i * g.istride
    if g.ikind == I_64:
        return <Py_ssize_t>(<const int64_t*>p)[0]
    if g.ikind == I_32:
        return <Py_ssize_t>(<const int32_t*>p)[0]
    return <Py_ssize_t>(<const uint32_t*>p)[0]


cdef inline Py_ssize_t _ahead(Py_ssize_t row_bytes) noexcept nogil:
    """Rows prefetched ahead of the one being copied (``PREFETCH_SPAN``)."""
    if PREFETCH_SPAN <= 0 or row_bytes <= 0:
        return 0
    return max(2, (PREFETCH_SPAN + row_bytes - 1) // row_bytes)


cdef inline void _prefetch_ahead(const Gather* g, Py_ssize_t i, Py_ssize_t lo, Py_ssize_t hi,
                                 Py_ssize_t ahead, Py_ssize_t row_bytes) noexcept nogil:
    """Before row ``i`` of ``lo:hi`` is read: prefetch row ``i + ahead`` (at
    ``i == lo``, rows ``lo:lo + ahead`` too)."""
    cdef Py_ssize_t j
    cdef Py_ssize_t nbytes = min(row_bytes, PREFETCH_SPAN)
    if ahead == 0:
        return
    if i == lo:
        for j in range(lo, min(hi, lo + ahead)):
            prefetch_row(g.src + _row_of(g, j) * g.stride, nbytes)
    if i + ahead < hi:
        prefetch_row(g.src + _row_of(g, i + ahead) * g.stride, nbytes)


cdef void _copy_rows(const Gather* g, Py_ssize_t lo, Py_ssize_t hi,
                     Py_ssize_t row_bytes) noexcept nogil:
    cdef Py_ssize_t i, ahead = _ahead(row_bytes)
    for i in range(lo, hi):
        _prefetch_ahead(g, i, lo, hi, ahead, row_bytes)
        memcpy(g.out + i * row_bytes, g.src + _row_of(g, i) * g.stride, row_bytes)


cdef void _convert_rows(const src_t* kind, floating* okind, const Gather* g,
                        Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    # kind, okind: NULL pointers that only select the specialisation
    cdef Py_ssize_t i, c, m = g.row
    cdef const src_t* s
    cdef floating* o
    cdef Py_ssize_t row_bytes = m * sizeof(src_t)
    cdef Py_ssize_t ahead = _ahead(row_bytes)
    for i in range(lo, hi):
        _prefetch_ahead(g, i, lo, hi, ahead, row_bytes)
        s = <const src_t*>(g.src + _row_of(g, i) * g.stride)
        o = <floating*>g.out + i * m
        for c in range(m):
            o[c] = <floating>s[c]


cdef void _bool_rows(floating* okind, const Gather* g, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    # NumPy's bool -> float conversion is ``value != 0`` (a byte of 2 gives 1)
    cdef Py_ssize_t i, c, m = g.row
    cdef const uint8_t* s
    cdef floating* o
    cdef floating one = 1, zero = 0
    cdef Py_ssize_t ahead = _ahead(m)
    for i in range(lo, hi):
        _prefetch_ahead(g, i, lo, hi, ahead, m)
        s = <const uint8_t*>(g.src + _row_of(g, i) * g.stride)
        o = <floating*>g.out + i * m
        for c in range(m):
            o[c] = one if s[c] != 0 else zero


cdef void _rows(int scode, floating* okind, const Gather* g, Py_ssize_t lo,
                Py_ssize_t hi) noexcept nogil:
    if (floating is float and scode == S_F32) or (floating is double and scode == S_F64):
        _copy_rows(g, lo, hi, g.row * sizeof(floating))
    elif scode == S_BOOL:
        _bool_rows(okind, g, lo, hi)
    elif scode == S_U8:
        _convert_rows(<const uint8_t*>NULL, okind, g, lo, hi)
    elif scode == S_I8:
        _convert_rows(<const int8_t*>NULL, okind, g, lo, hi)
    elif scode == S_U16:
        _convert_rows(<const uint16_t*>NULL, okind, g, lo, hi)
    elif scode == S_I16:
        _convert_rows(<const int16_t*>NULL, okind, g, lo, hi)
    elif scode == S_U32:
        _convert_rows(<const uint32_t*>NULL, okind, g, lo, hi)
    elif scode == S_I32:
        _convert_rows(<const int32_t*>NULL, okind, g, lo, hi)
    elif scode == S_U64:
        _convert_rows(<const uint64_t*>NULL, okind, g, lo, hi)
    elif scode == S_I64:
        _convert_rows(<const int64_t*>NULL, okind, g, lo, hi)
    elif scode == S_F32:
        _convert_rows(<const float*>NULL, okind, g, lo, hi)
    else:
        _convert_rows(<const double*>NULL, okind, g, lo, hi)


cdef void _gather(int scode, floating* okind, const Gather* g, Py_ssize_t chunks) noexcept nogil:
    cdef Py_ssize_t c, lo, hi, step
    if chunks <= 1:
        _rows(scode, okind, g, 0, g.k)
        return
    step = (g.k + chunks - 1) // chunks
    for c in prange(chunks, schedule="static", num_threads=chunks):
        lo = c * step
        hi = min(g.k, lo + step)
        if lo < hi:
            _rows(scode, okind, g, lo, hi)


cdef int _src_code(PyArrayObject* a) noexcept:
    cdef int t = PyArray_TYPE(a)
    cdef npy_intp size = PyArray_ITEMSIZE(a)
    if not PyArray_ISNOTSWAPPED(a) or not (PyArray_FLAGS(a) & NPY_ARRAY_ALIGNED):
        return S_REF
    if t == NPY_FLOAT:
        return S_F32
    if t == NPY_DOUBLE:
        return S_F64
    if t == NPY_BOOL:
        return S_BOOL
    if not PyTypeNum_ISINTEGER(t):
        return S_REF
    cdef bint signed = PyTypeNum_ISSIGNED(t)
    if size == 1:
        return S_I8 if signed else S_U8
    if size == 2:
        return S_I16 if signed else S_U16
    if size == 4:
        return S_I32 if signed else S_U32
    if size == 8:
        return S_I64 if signed else S_U64
    return S_REF


cdef int _index_code(PyArrayObject* a) noexcept:
    cdef int t = PyArray_TYPE(a)
    cdef npy_intp size = PyArray_ITEMSIZE(a)
    if not PyArray_ISNOTSWAPPED(a) or not (PyArray_FLAGS(a) & NPY_ARRAY_ALIGNED):
        return I_CONVERT
    if size == 8:
        return I_64
    if size == 4:
        return I_32 if PyTypeNum_ISSIGNED(t) else I_U32
    return I_CONVERT


cdef void _describe(Gather* g, PyArrayObject* s, PyArrayObject* ix, Py_ssize_t start,
                    Py_ssize_t k, PyArrayObject* o) noexcept:
    """``g`` for ``out = src[index[start:start + k]]`` (index kind already set)."""
    g.k = k
    g.istride = PyArray_STRIDES(ix)[0]
    g.index = PyArray_BYTES(ix) + start * g.istride
    g.src = PyArray_BYTES(s)
    g.stride = PyArray_STRIDES(s)[0]
    g.out = PyArray_BYTES(o)
    g.row = PyArray_SIZE(o) // k if k > 0 else 0


cdef void _run(int scode, PyArrayObject* s, PyArrayObject* o, const Gather* g):
    """Gather ``g`` serially or in chunks (``PAR_MIN_BYTES``)."""
    cdef Py_ssize_t moved = PyArray_SIZE(o) * (PyArray_ITEMSIZE(s) + PyArray_ITEMSIZE(o))
    cdef Py_ssize_t chunks = n_chunks(moved, PAR_MIN_BYTES, _num_threads)
    if chunks > g.k:
        chunks = g.k
    cdef bint single = PyArray_TYPE(o) == NPY_FLOAT
    with nogil:
        if single:
            _gather(scode, <float*>NULL, g, chunks)
        else:
            _gather(scode, <double*>NULL, g, chunks)


def gather_rows(src, index, out):
    """Gather rows by index, converting to ``out``'s dtype: ``out[i] = src[index[i]]``.

    A row is everything after the first axis; values are converted as
    ``src.astype(out.dtype)`` converts them (bit for bit). See
    ``fastnn.kernels.reference.gather_rows``.

    Parameters
    ----------
    src : ndarray (n, *shape), real dtype, rows C-contiguous at any stride
        IN, never written.
    index : ndarray (k,), integer dtype, values in ``[0, n)``
        IN
    out : ndarray (k, *shape), float32 or float64, C-contiguous
        OUT
    """
    cdef PyArrayObject* s = <PyArrayObject*><void*>src
    cdef PyArrayObject* ix = <PyArrayObject*><void*>index
    cdef PyArrayObject* o = <PyArrayObject*><void*>out
    cdef int scode = _src_code(s)
    if scode == S_REF:
        _reference_gather_rows(src, index, out)
        return
    cdef Gather g
    g.ikind = _index_code(ix)
    if g.ikind == I_CONVERT:
        index = np.array(index, dtype=np.intp)    # a copy: aligned, native
        ix = <PyArrayObject*><void*>index
        g.ikind = I_64 if PyArray_ITEMSIZE(ix) == 8 else I_32
    _describe(&g, s, ix, 0, PyArray_DIMS(ix)[0], o)
    _run(scode, s, o, &g)


cdef bint _rows_contiguous(PyArrayObject* a) noexcept:
    """Whether each row (``a[i]``) is C-contiguous, whatever the first axis' stride."""
    cdef int d
    cdef Py_ssize_t expect = PyArray_ITEMSIZE(a)
    for d in range(PyArray_NDIM(a) - 1, 0, -1):
        if PyArray_DIMS(a)[d] != 1 and PyArray_STRIDES(a)[d] != expect:
            return False
        expect *= PyArray_DIMS(a)[d]
    return True


def gather_batch(x, order, Py_ssize_t start, Py_ssize_t stop, xb, y, yb):
    """One batch of ``fit``: ``xb = x[order[start:stop]]`` (``gather_rows``, in
    ``xb``'s dtype) and, when ``y`` is not None, ``yb = y[order[start:stop]]``
    (``y``'s dtype), in one call.

    Not a contract kernel: ``fit``'s shortcut around slicing ``order``, a
    ``gather_rows`` call and ``np.take`` for the targets (a few us a batch
    right after a training step, when NumPy's code and data have left the
    caches). Inputs are trusted, as ``fastnn._batches.Source`` makes them:
    ``order`` holds row numbers of ``x`` and ``y``, ``xb`` is C-contiguous
    with ``stop - start`` rows, ``yb`` too, in ``y``'s dtype. Rows that are
    not contiguous go to the reference (``x``) or ``np.take`` (``y``).
    """
    cdef PyArrayObject* s = <PyArrayObject*><void*>x
    cdef PyArrayObject* ix = <PyArrayObject*><void*>order
    cdef PyArrayObject* o = <PyArrayObject*><void*>xb
    cdef PyArrayObject* ys
    cdef PyArrayObject* yo
    cdef Py_ssize_t k = stop - start, row_bytes
    cdef int scode = _src_code(s)
    cdef Gather g
    g.ikind = _index_code(ix)
    if not _rows_contiguous(s):
        _reference_gather_rows(x, order[start:stop], xb)
    elif scode == S_REF or g.ikind == I_CONVERT:
        gather_rows(x, order[start:stop], xb)
    else:
        _describe(&g, s, ix, start, k, o)
        _run(scode, s, o, &g)
    if y is None:
        return
    ys, yo = <PyArrayObject*><void*>y, <PyArrayObject*><void*>yb
    if (g.ikind != I_CONVERT and PyArray_TYPE(ys) == PyArray_TYPE(yo)
            and PyArray_ITEMSIZE(ys) == PyArray_ITEMSIZE(yo) and PyArray_ISNOTSWAPPED(ys)
            and PyArray_FLAGS(ys) & NPY_ARRAY_ALIGNED and PyArray_FLAGS(yo) & NPY_ARRAY_ALIGNED
            and PyArray_FLAGS(yo) & NPY_ARRAY_C_CONTIGUOUS
            and _rows_contiguous(ys)
            and PyArray_DIMS(yo)[0] == k and k > 0):
        _describe(&g, ys, ix, start, k, yo)
        row_bytes = g.row * PyArray_ITEMSIZE(yo)
        with nogil:
            _copy_rows(&g, 0, k, row_bytes)
    else:
        # indices are in range, so "clip" changes nothing and skips
        # mode="raise"'s temporary
        y.take(order[start:stop], 0, yb, "clip")
