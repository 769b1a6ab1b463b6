# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Convolution, max pooling and dropout, NHWC (Cython, OpenMP, GEMMs by BLAS).

A convolution is GEMMs over im2col columns (row ``(n, p, q)`` holds the window
``xpad[n, p*sh:p*sh+kh, q*sw:q*sw+kw, :]`` in ``(i, j, c)`` order, the order of
``w.reshape(kh*kw*c, o)``), never materialised for the whole batch: the rows
are cut into chunks of about ``CHUNK_BYTES`` of columns, and each chunk is
written into a per-thread workspace, multiplied at once (one GEMM per chunk)
and finished while it is in cache:

* ``conv2d_forward``: columns, ``z = cols @ w`` (BLAS), then bias and
  activation over the chunk's rows (``preact`` keeps ``z``);
* ``conv2d_backward``: columns, ``dw += cols.T @ dz`` (BLAS, ``beta = 1``
  after a thread's first chunk), and ``db`` summed in float64 over the
  chunk's rows of ``dz``; the threads' partial sums are added in thread order;
* ``conv2d_backprop``: ``dcols = dz @ w.T`` (BLAS), col2im adds them into the
  chunk's images, and an image is multiplied by the derivative of the
  activation below once its last row is in (the threads own whole images,
  so no two write one image).

A 1x1 kernel at stride 1 without padding needs no columns: the GEMMs read
``x`` (and write ``out``) directly. Where the column width ``K = kh*kw*c`` is
small (``DIRECT_MAX_K``: conv1 of an MNIST network has ``K = 9``), a GEMM runs
far below its peak, and the forward pass and ``dw`` run a register-blocked
loop of our own instead: 8 rows by 16 output channels of accumulators (GCC
vector extensions: one AVX-512 register a row in float32), multiply then
add, ``k`` in order, so every CPU variant gives the same bits.

Threads: above ``PAR_MIN_FLOPS`` the rows (whole images for
``conv2d_backprop``) are split into one contiguous range per OpenMP thread,
and each thread runs its chunks with single-threaded GEMMs. For that the
BLAS (OpenBLAS: ``blas_t.set_threads``) is set to one thread for the length
of the parallel region and set back afterwards (a process-wide setting:
a GEMM another Python thread runs meanwhile gets one thread too); a BLAS
without that function gets one thread of ours and its own threads. Below
the threshold everything runs on the calling thread.

Workspace: one buffer per calling Python thread (``threading.local``),
grown to the largest size asked for and reused, sliced per OpenMP thread;
so a training step allocates nothing after its first batch.

Max pooling: one pass over the windows' rows, the channel loop vectorized
with selects (NaN wins; the first maximum on ties; bit for bit the
reference); its backward pass writes each input row once (windows that do
not overlap) or adds in the reference's order (windows that overlap), then
multiplies the derivative of the activation below while the row is in cache.

Dropout: the splitmix64 hash of each element's index computed in the loop
that applies the mask (vectorized in uint64), so no mask is stored and the
mask is the reference's bit for bit.

Inputs are trusted: ``fastnn._validate`` checks them first.
"""

import threading

import numpy as np

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport floor
from libc.stdint cimport int32_t, uint64_t, uintptr_t
from libc.string cimport memcpy, memset

from _cy_blas cimport blas_t, gemm_with, get_threads_t, set_threads_t
from _cy_math cimport (
    FASTNN_OPENMP, act_backward_range, act_code, act_forward_range, bias_act_rows, chunk_step,
    n_chunks,
)

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #endif
    /* The BLAS thread count around a parallel region whose threads each call
       the BLAS: set to 1 by the first region to enter, set back by the last
       to leave (several Python threads may run regions at once). */
    typedef void (*fnn_set_threads_t)(int);
    typedef int (*fnn_get_threads_t)(void);
    #ifdef _OPENMP
    static omp_lock_t fnn_blas_lock;
    #endif
    static int fnn_blas_users = 0, fnn_blas_saved = 1;
    static void fnn_blas_lock_init(void) {
    #ifdef _OPENMP
        omp_init_lock(&fnn_blas_lock);
    #endif
    }
    static void fnn_blas_enter(fnn_set_threads_t set, fnn_get_threads_t get) {
    #ifdef _OPENMP
        omp_set_lock(&fnn_blas_lock);
        if (fnn_blas_users++ == 0) {
            fnn_blas_saved = get();
            if (fnn_blas_saved != 1) set(1);
        }
        omp_unset_lock(&fnn_blas_lock);
    #endif
    }
    static void fnn_blas_leave(fnn_set_threads_t set) {
    #ifdef _OPENMP
        omp_set_lock(&fnn_blas_lock);
        if (--fnn_blas_users == 0 && fnn_blas_saved != 1) set(fnn_blas_saved);
        omp_unset_lock(&fnn_blas_lock);
    #endif
    }

    /* Register-blocked tiles of the small-K loops: FNN_RG rows by FNN_VL
       output channels. GCC/clang vector extensions keep the accumulators in
       registers (float32: one AVX-512 register a row); every lane is a plain
       multiply then add in k order, the same on every instruction set. */
    /* dropout's hash: splitmix64 of seed + (i + 1)*golden */
    #define FNN_GOLDEN 0x9E3779B97F4A7C15ULL
    #define FNN_MIX1 0xBF58476D1CE4E5B9ULL
    #define FNN_MIX2 0x94D049BB133111EBULL

    #define FNN_VL 16
    #define FNN_RG 8
    #if defined(__GNUC__)
    typedef float fnn_vf __attribute__((vector_size(64)));
    typedef double fnn_vd __attribute__((vector_size(128)));
    #define FNN_TILES(T, V, SUF)                                                        \
    /* acc[r][0:16] = sum_k col[r*K + k] * w[k*ldw + 0:16], r < 8 */                  \
    static inline void fnn_fwd_tile_##SUF(const T* col, Py_ssize_t K, const T* w,      \
                                          Py_ssize_t ldw, T* acc) {                    \
        V a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0}; \
        for (Py_ssize_t k = 0; k < K; k++) {                                           \
            V wv;                                                                      \
            __builtin_memcpy(&wv, w + k * ldw, sizeof(V));                             \
            const T* c = col + k;                                                      \
            a0 = a0 + c[0] * wv; a1 = a1 + c[K] * wv;                                  \
            a2 = a2 + c[2 * K] * wv; a3 = a3 + c[3 * K] * wv;                          \
            a4 = a4 + c[4 * K] * wv; a5 = a5 + c[5 * K] * wv;                          \
            a6 = a6 + c[6 * K] * wv; a7 = a7 + c[7 * K] * wv;                          \
        }                                                                              \
        __builtin_memcpy(acc, &a0, sizeof(V)); __builtin_memcpy(acc + 16, &a1, sizeof(V)); \
        __builtin_memcpy(acc + 32, &a2, sizeof(V)); __builtin_memcpy(acc + 48, &a3, sizeof(V)); \
        __builtin_memcpy(acc + 64, &a4, sizeof(V)); __builtin_memcpy(acc + 80, &a5, sizeof(V)); \
        __builtin_memcpy(acc + 96, &a6, sizeof(V)); __builtin_memcpy(acc + 112, &a7, sizeof(V)); \
    }                                                                                  \
    /* acc[kk*ldacc + 0:16] += sum_r col[r*K + kk] * dz[r*ldz + 0:16], kk < KB */      \
    static inline __attribute__((always_inline)) void fnn_dw_tile_##SUF(               \
            const T* col, Py_ssize_t K, const T* dz, Py_ssize_t ldz, Py_ssize_t rows,  \
            T* acc, Py_ssize_t ldacc, const int KB) {                                  \
        V a[8];                                                                        \
        for (int kk = 0; kk < KB; kk++) __builtin_memcpy(&a[kk], acc + kk * ldacc, sizeof(V)); \
        for (Py_ssize_t r = 0; r < rows; r++) {                                        \
            V d;                                                                       \
            __builtin_memcpy(&d, dz + r * ldz, sizeof(V));                             \
            const T* c = col + r * K;                                                  \
            for (int kk = 0; kk < KB; kk++) a[kk] = a[kk] + c[kk] * d;                 \
        }                                                                              \
        for (int kk = 0; kk < KB; kk++) __builtin_memcpy(acc + kk * ldacc, &a[kk], sizeof(V)); \
    }
    #else
    #define FNN_TILES(T, V, SUF)                                                        \
    static void fnn_fwd_tile_##SUF(const T* col, Py_ssize_t K, const T* w,             \
                                   Py_ssize_t ldw, T* acc) {                           \
        for (int i = 0; i < 128; i++) acc[i] = 0;                                      \
        for (Py_ssize_t k = 0; k < K; k++)                                             \
            for (int r = 0; r < 8; r++)                                                \
                for (int l = 0; l < 16; l++)                                           \
                    acc[r * 16 + l] = acc[r * 16 + l] + col[r * K + k] * w[k * ldw + l]; \
    }                                                                                  \
    static void fnn_dw_tile_##SUF(const T* col, Py_ssize_t K, const T* dz,             \
                                  Py_ssize_t ldz, Py_ssize_t rows, T* acc,             \
                                  Py_ssize_t ldacc, const int KB) {                    \
        for (Py_ssize_t r = 0; r < rows; r++)                                          \
            for (int kk = 0; kk < KB; kk++)                                            \
                for (int l = 0; l < 16; l++)                                           \
                    acc[kk * ldacc + l] = acc[kk * ldacc + l] + col[r * K + kk] * dz[r * ldz + l]; \
    }
    #endif
    FNN_TILES(float, fnn_vf, f)
    FNN_TILES(double, fnn_vd, d)
    """
    ctypedef void (*fnn_set_threads_t)(int) noexcept nogil
    ctypedef int (*fnn_get_threads_t)() noexcept nogil
    void fnn_blas_lock_init() noexcept nogil
    void fnn_blas_enter(fnn_set_threads_t s, fnn_get_threads_t g) noexcept nogil
    void fnn_blas_leave(fnn_set_threads_t s) noexcept nogil
    uint64_t FNN_GOLDEN
    uint64_t FNN_MIX1
    uint64_t FNN_MIX2
    enum:
        FNN_VL
        FNN_RG
    void fnn_fwd_tile_f(const float* col, Py_ssize_t K, const float* w, Py_ssize_t ldw,
                        float* acc) noexcept nogil
    void fnn_fwd_tile_d(const double* col, Py_ssize_t K, const double* w, Py_ssize_t ldw,
                        double* acc) noexcept nogil
    void fnn_dw_tile_f(const float* col, Py_ssize_t K, const float* dz, Py_ssize_t ldz,
                       Py_ssize_t rows, float* acc, Py_ssize_t ldacc, int KB) noexcept nogil
    void fnn_dw_tile_d(const double* col, Py_ssize_t K, const double* dz, Py_ssize_t ldz,
                       Py_ssize_t rows, double* acc, Py_ssize_t ldacc, int KB) noexcept nogil

fnn_blas_lock_init()

#: True when this extension was compiled with OpenMP.
OPENMP = bool(FASTNN_OPENMP)

# Work (multiply-adds of the convolution, or elements for pooling) from which
# the threads split it; see the measurements in set_tuning's docstring.
cdef double PAR_MIN_FLOPS = 4e6
cdef Py_ssize_t PAR_MIN_POOL = 1 << 18
cdef Py_ssize_t PAR_MIN_DROPOUT = 1 << 19
# Columns per chunk and thread, in bytes (the GEMM's panel of im2col rows).
cdef Py_ssize_t CHUNK_BYTES = 1 << 18
# Column widths up to which the forward pass and dw run the register-blocked
# loop instead of a GEMM.
cdef Py_ssize_t DIRECT_MAX_K = 32
cdef int _num_threads = 1
cdef const blas_t* _blas = NULL


def set_num_threads(int n):
    """Set the OpenMP threads of this module's parallel loops (the GEMMs inside
    them run on one BLAS thread each)."""
    global _num_threads
    _num_threads = max(1, n)


def _set_parallel_min(double flops, Py_ssize_t pool, dropout=None):
    """Set the parallel thresholds (tests, measurements): multiply-adds of a
    convolution, elements of a pooling pass, elements of dropout (``pool``'s
    when None); returns the old triple."""
    global PAR_MIN_FLOPS, PAR_MIN_POOL, PAR_MIN_DROPOUT
    old = (PAR_MIN_FLOPS, PAR_MIN_POOL, PAR_MIN_DROPOUT)
    PAR_MIN_FLOPS, PAR_MIN_POOL = flops, pool
    PAR_MIN_DROPOUT = pool if dropout is None else dropout
    return old


def _set_tuning(chunk_bytes=None, direct_max_k=None):
    """Set the chunk size (bytes of columns per chunk and thread) and the widest
    column that runs the register-blocked loop (tests, measurements); returns
    the old pair."""
    global CHUNK_BYTES, DIRECT_MAX_K
    old = (CHUNK_BYTES, DIRECT_MAX_K)
    if chunk_bytes is not None:
        CHUNK_BYTES = max(1, chunk_bytes)
    if direct_max_k is not None:
        DIRECT_MAX_K = direct_max_k
    return old


def _use_blas_table(uintptr_t address):
    """Read the BLAS from the ``blas_t`` at ``address`` (``_cy_dense._blas_table()``
    of the same variant)."""
    global _blas
    _blas = <const blas_t*>address


cdef int _ensure_blas() except -1:
    """Used alone (not through ``cython_cpu``), read the table of the same
    variant's ``_cy_dense``, which then loads SciPy's BLAS as its kernels do."""
    if _blas == NULL or (_blas.sgemm32 == NULL and _blas.sgemm64 == NULL):
        import importlib
        dense = importlib.import_module(__name__.replace("_cy_conv", "_cy_dense"))
        _use_blas_table(dense._blas_table(True))
    return 0


# ------------------------------------------------------------------ workspace

_local = threading.local()


cdef char* _workspace(Py_ssize_t nbytes) except NULL:
    """A 64-byte aligned scratch buffer of at least ``nbytes`` for the calling
    thread: grown when a call needs more, reused otherwise."""
    cdef uintptr_t address
    buf = getattr(_local, "buf", None)
    if buf is None or buf.nbytes < nbytes + 64:
        buf = np.empty(nbytes + 64, np.uint8)
        _local.buf = buf
        _local.address = buf.ctypes.data
    address = _local.address
    return <char*>((address + 63) & ~(<uintptr_t>63))


cdef inline Py_ssize_t _align(Py_ssize_t nbytes) noexcept nogil:
    return (nbytes + 63) & ~(<Py_ssize_t>63)


# ------------------------------------------------------------------ geometry

ctypedef struct geom:
    Py_ssize_t n, h, w, c         # input (n, h, w, c)
    Py_ssize_t kh, kw, o          # kernel (kh, kw, c, o)
    Py_ssize_t p, q               # output (n, p, q, o)
    Py_ssize_t sh, sw, top, left
    Py_ssize_t k                  # kh*kw*c: the width of a column row
    Py_ssize_t m                  # n*p*q: the column rows
    bint identity                 # 1x1, stride 1, no padding: the columns are x
    bint small_seg                # kw*c below 16: gather through offsets, not memcpy


cdef int _geometry(geom* g, tuple xshape, tuple wshape, tuple oshape, stride, padding) except -1:
    g.n, g.h, g.w, g.c = xshape
    g.kh, g.kw = wshape[0], wshape[1]
    g.o = wshape[3]
    g.p, g.q = oshape[1], oshape[2]
    g.sh, g.sw = stride
    top, bottom, left, right = padding
    g.top, g.left = top, left
    g.k = g.kh * g.kw * g.c
    g.m = g.n * g.p * g.q
    g.identity = (g.kh == 1 and g.kw == 1 and g.sh == 1 and g.sw == 1 and top == 0
                  and bottom == 0 and left == 0 and right == 0)
    g.small_seg = g.kw * g.c < 16
    return 0


cdef inline int _threads_for(double work, double min_work, Py_ssize_t parts) noexcept nogil:
    """Threads to split ``work`` over: 1 below ``min_work``, at most ``parts``."""
    if _num_threads <= 1 or work < min_work or parts < 2:
        return 1
    return <int>min(<Py_ssize_t>_num_threads, parts)


cdef void _offsets(const geom* g, Py_ssize_t* off) noexcept nogil:
    """``off[(i*kw + j)*c + ch] = (i*w + j)*c + ch``: the column's elements
    relative to the window's first one, for a window inside the image."""
    cdef Py_ssize_t i, j, ch, t = 0
    for i in range(g.kh):
        for j in range(g.kw):
            for ch in range(g.c):
                off[t] = (i * g.w + j) * g.c + ch
                t += 1


cdef void _im2col(const geom* g, const floating* x, const Py_ssize_t* off, floating* col,
                  Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    """Column rows ``r0 <= r < r1`` into ``col`` (``(r1 - r0, k)``, row-major)."""
    cdef Py_ssize_t r, n, p, q, i, j, t, y, x0, xx, pq = g.p * g.q
    cdef Py_ssize_t C = g.c, K = g.k, seg = g.kw * g.c, rowstride = g.w * g.c
    cdef floating* dst
    cdef const floating* base
    cdef const floating* src
    n = r0 // pq
    p = (r0 - n * pq) // g.q
    q = r0 - n * pq - p * g.q
    for r in range(r0, r1):
        dst = col + (r - r0) * K
        y = p * g.sh - g.top
        x0 = q * g.sw - g.left
        if y >= 0 and y + g.kh <= g.h and x0 >= 0 and x0 + g.kw <= g.w:
            base = x + ((n * g.h + y) * g.w + x0) * C
            if g.small_seg:
                for t in range(K):
                    dst[t] = base[off[t]]
            else:
                for i in range(g.kh):
                    memcpy(dst + i * seg, base + i * rowstride, seg * sizeof(floating))
        else:
            for i in range(g.kh):
                if y + i < 0 or y + i >= g.h:
                    for t in range(seg):
                        dst[i * seg + t] = 0
                    continue
                src = x + (n * g.h + y + i) * rowstride
                for j in range(g.kw):
                    xx = x0 + j
                    if xx < 0 or xx >= g.w:
                        for t in range(C):
                            dst[i * seg + j * C + t] = 0
                    else:
                        for t in range(C):
                            dst[i * seg + j * C + t] = src[xx * C + t]
        q += 1
        if q == g.q:
            q = 0
            p += 1
            if p == g.p:
                p = 0
                n += 1


cdef void _col2im(const geom* g, const floating* dcol, floating* dx,
                  Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    """``dx[n, p*sh+i-top, q*sw+j-left, :] += dcol[r, (i, j, :)]`` for the rows
    ``r0 <= r < r1`` (``dcol`` holds them from its first row); positions in the
    padding are dropped."""
    cdef Py_ssize_t r, n, p, q, i, j, t, y, x0, xx, pq = g.p * g.q
    cdef Py_ssize_t C = g.c, K = g.k, seg = g.kw * g.c, rowstride = g.w * g.c
    cdef const floating* src
    cdef floating* dst
    n = r0 // pq
    p = (r0 - n * pq) // g.q
    q = r0 - n * pq - p * g.q
    for r in range(r0, r1):
        src = dcol + (r - r0) * K
        y = p * g.sh - g.top
        x0 = q * g.sw - g.left
        for i in range(g.kh):
            if y + i < 0 or y + i >= g.h:
                continue
            dst = dx + (n * g.h + y + i) * rowstride
            if x0 >= 0 and x0 + g.kw <= g.w:
                dst = dst + x0 * C
                for t in range(seg):
                    dst[t] = dst[t] + src[i * seg + t]
            else:
                for j in range(g.kw):
                    xx = x0 + j
                    if xx >= 0 and xx < g.w:
                        for t in range(C):
                            dst[xx * C + t] = dst[xx * C + t] + src[i * seg + j * C + t]
        q += 1
        if q == g.q:
            q = 0
            p += 1
            if p == g.p:
                p = 0
                n += 1


cdef inline Py_ssize_t _chunk_rows(Py_ssize_t width, Py_ssize_t itemsize) noexcept nogil:
    """Column rows per chunk: ``CHUNK_BYTES`` of rows ``width`` wide, a multiple
    of 8 and at least 8."""
    cdef Py_ssize_t rows = CHUNK_BYTES // (width * itemsize)
    rows = rows - rows % FNN_RG
    return rows if rows >= FNN_RG else FNN_RG


# ------------------------------------------------------------------ forward

cdef void _fwd_gemm_rows(int act, const geom* g, const floating* x, const floating* w,
                         const floating* b, floating* z, floating* out, const Py_ssize_t* off,
                         floating* col, Py_ssize_t chunk, Py_ssize_t r0,
                         Py_ssize_t r1) noexcept nogil:
    """Rows ``[r0, r1)`` of the forward pass, GEMM path: per chunk, columns,
    ``z = cols @ w``, then ``z += b``, ``out = act(z)``."""
    cdef Py_ssize_t e, m, O = g.o, K = g.k
    cdef const floating* a
    while r0 < r1:
        e = min(r1, r0 + chunk)
        m = e - r0
        if g.identity:
            a = x + r0 * K
        else:
            _im2col(g, x, off, col, r0, e)
            a = col
        gemm_with(_blas, c'N', c'N', <int>O, <int>m, <int>K, w, <int>O, a, <int>K, 0,
                  z + r0 * O, <int>O)
        bias_act_rows(act, z + r0 * O, b, out + r0 * O, 0, m, O)
        r0 = e


cdef void _fwd_direct_rows(int act, const geom* g, const floating* x, const floating* wpad,
                           Py_ssize_t ldw, const floating* b, floating* z, floating* out,
                           const Py_ssize_t* off, floating* col, Py_ssize_t chunk,
                           Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    """Rows ``[r0, r1)`` of the forward pass, small-K path: per chunk, columns,
    then tiles of 8 rows x 16 channels of ``cols @ w`` (``wpad``: ``w`` with
    its columns padded to ``ldw``, a multiple of 16), ``z = tile + b`` and
    ``out = act(z)`` per group of 8 rows."""
    cdef Py_ssize_t e, m, mp, rb, ob, rr, l, nv, lanes, O = g.o, K = g.k
    cdef floating acc[FNN_RG * FNN_VL]
    cdef floating* zr
    while r0 < r1:
        e = min(r1, r0 + chunk)
        m = e - r0
        _im2col(g, x, off, col, r0, e)
        mp = (m + FNN_RG - 1) // FNN_RG * FNN_RG
        for l in range(m * K, mp * K):
            col[l] = 0
        for rb in range(0, mp, 8):          # FNN_RG
            nv = min(<Py_ssize_t>FNN_RG, m - rb)
            for ob in range(0, O, 16):      # FNN_VL
                if floating is float:
                    fnn_fwd_tile_f(col + rb * K, K, wpad + ob, ldw, acc)
                else:
                    fnn_fwd_tile_d(col + rb * K, K, wpad + ob, ldw, acc)
                lanes = min(<Py_ssize_t>FNN_VL, O - ob)
                for rr in range(nv):
                    zr = z + (r0 + rb + rr) * O + ob
                    for l in range(lanes):
                        zr[l] = acc[rr * FNN_VL + l] + b[ob + l]
            act_forward_range(act, z + (r0 + rb) * O, out + (r0 + rb) * O, 0, nv * O)
        r0 = e


cdef void _conv_forward(int act, const geom* g, const floating* x, const floating* w,
                        const floating* b, floating* z, floating* out, char* ws) noexcept nogil:
    cdef Py_ssize_t itemsize = sizeof(floating), K = g.k, O = g.o
    cdef bint direct = K <= DIRECT_MAX_K and not g.identity
    cdef Py_ssize_t chunk = _chunk_rows(K, itemsize)
    cdef Py_ssize_t ldw = (O + FNN_VL - 1) // FNN_VL * FNN_VL
    cdef Py_ssize_t shared = _align(K * sizeof(Py_ssize_t)) + (_align(K * ldw * itemsize) if direct else 0)
    cdef Py_ssize_t per = _align(chunk * K * itemsize)
    cdef int T = _threads_for(<double>g.m * K * O, PAR_MIN_FLOPS, (g.m + FNN_RG - 1) // FNN_RG)
    cdef Py_ssize_t* off = <Py_ssize_t*>ws
    cdef floating* wpad = <floating*>(ws + _align(K * sizeof(Py_ssize_t)))
    cdef Py_ssize_t t, i, j, step
    _offsets(g, off)
    if direct:
        for i in range(K):
            for j in range(ldw):
                wpad[i * ldw + j] = w[i * O + j] if j < O else 0
    if T == 1:
        if direct:
            _fwd_direct_rows(act, g, x, wpad, ldw, b, z, out, off, <floating*>(ws + shared),
                             chunk, 0, g.m)
        else:
            _fwd_gemm_rows(act, g, x, w, b, z, out, off, <floating*>(ws + shared), chunk, 0, g.m)
        return
    step = (g.m + T - 1) // T
    step = (step + FNN_RG - 1) // FNN_RG * FNN_RG
    if not direct and _blas.set_threads != NULL:
        fnn_blas_enter(<fnn_set_threads_t>_blas.set_threads, <fnn_get_threads_t>_blas.get_threads)
    for t in prange(T, schedule="static", num_threads=T):
        if direct:
            _fwd_direct_rows(act, g, x, wpad, ldw, b, z, out, off,
                             <floating*>(ws + shared + t * per), chunk,
                             min(g.m, t * step), min(g.m, (t + 1) * step))
        else:
            _fwd_gemm_rows(act, g, x, w, b, z, out, off, <floating*>(ws + shared + t * per),
                           chunk, min(g.m, t * step), min(g.m, (t + 1) * step))
    if not direct and _blas.set_threads != NULL:
        fnn_blas_leave(<fnn_set_threads_t>_blas.set_threads)


cdef Py_ssize_t _forward_workspace(const geom* g, Py_ssize_t itemsize) noexcept nogil:
    cdef Py_ssize_t K = g.k, ldw = (g.o + FNN_VL - 1) // FNN_VL * FNN_VL
    cdef Py_ssize_t chunk = _chunk_rows(K, itemsize)
    return (_align(K * sizeof(Py_ssize_t)) + _align(K * ldw * itemsize)
            + _num_threads * _align(chunk * K * itemsize))


# ------------------------------------------------------------------ dw, db

cdef void _dw_rows(const geom* g, const floating* x, const floating* dz, const Py_ssize_t* off,
                   floating* dwt, Py_ssize_t lddw, double* dbt, floating* col, floating* dzbuf,
                   Py_ssize_t chunk, bint direct, Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    """This thread's share of ``dw`` (into ``dwt``, ``(k, lddw)``) and ``db``
    (into ``dbt``, float64) over the rows ``[r0, r1)``."""
    cdef Py_ssize_t e, m, r, o, ob, kb, nb, ldz, O = g.o, K = g.k
    cdef const floating* a
    cdef const floating* d
    cdef const floating* dp
    cdef bint first = True
    for o in range(O):
        dbt[o] = 0
    if direct:
        for r in range(K * lddw):
            dwt[r] = 0
    elif r0 >= r1:
        for r in range(K * lddw):
            dwt[r] = 0
    while r0 < r1:
        e = min(r1, r0 + chunk)
        m = e - r0
        d = dz + r0 * O
        if g.identity:
            a = x + r0 * K
        else:
            _im2col(g, x, off, col, r0, e)
            a = col
        if direct:
            if O % FNN_VL == 0:
                dp, ldz = d, O
            else:   # rows padded to whole tiles of 16 channels
                ldz = lddw
                for r in range(m):
                    for o in range(lddw):
                        dzbuf[r * ldz + o] = d[r * O + o] if o < O else 0
                dp = dzbuf
            for ob in range(0, lddw, 16):   # FNN_VL
                kb = 0
                while kb < K:
                    nb = K - kb
                    if nb >= 8:
                        if floating is float:
                            fnn_dw_tile_f(a + kb, K, dp + ob, ldz, m, dwt + kb * lddw + ob, lddw, 8)
                        else:
                            fnn_dw_tile_d(a + kb, K, dp + ob, ldz, m, dwt + kb * lddw + ob, lddw, 8)
                        nb = 8
                    elif nb >= 4:
                        if floating is float:
                            fnn_dw_tile_f(a + kb, K, dp + ob, ldz, m, dwt + kb * lddw + ob, lddw, 4)
                        else:
                            fnn_dw_tile_d(a + kb, K, dp + ob, ldz, m, dwt + kb * lddw + ob, lddw, 4)
                        nb = 4
                    elif nb >= 2:
                        if floating is float:
                            fnn_dw_tile_f(a + kb, K, dp + ob, ldz, m, dwt + kb * lddw + ob, lddw, 2)
                        else:
                            fnn_dw_tile_d(a + kb, K, dp + ob, ldz, m, dwt + kb * lddw + ob, lddw, 2)
                        nb = 2
                    else:
                        if floating is float:
                            fnn_dw_tile_f(a + kb, K, dp + ob, ldz, m, dwt + kb * lddw + ob, lddw, 1)
                        else:
                            fnn_dw_tile_d(a + kb, K, dp + ob, ldz, m, dwt + kb * lddw + ob, lddw, 1)
                        nb = 1
                    kb += nb
        else:
            gemm_with(_blas, c'N', c'T', <int>O, <int>K, <int>m, d, <int>O, a, <int>K,
                      0 if first else 1, dwt, <int>lddw)
        for r in range(m):
            for o in range(O):
                dbt[o] += d[r * O + o]
        first = False
        r0 = e


cdef void _conv_backward(const geom* g, const floating* x, const floating* dz, floating* dw,
                         floating* db, char* ws) noexcept nogil:
    cdef Py_ssize_t itemsize = sizeof(floating), K = g.k, O = g.o
    cdef bint direct = K <= DIRECT_MAX_K and not g.identity
    cdef Py_ssize_t chunk = _chunk_rows(K, itemsize)
    cdef Py_ssize_t lddw = (O + FNN_VL - 1) // FNN_VL * FNN_VL if direct else O
    cdef Py_ssize_t per = (_align(K * lddw * itemsize) + _align(O * sizeof(double))
                           + _align(chunk * K * itemsize) + _align(chunk * lddw * itemsize))
    cdef Py_ssize_t base = _align(K * sizeof(Py_ssize_t))
    cdef int T = _threads_for(<double>g.m * K * O, PAR_MIN_FLOPS, (g.m + FNN_RG - 1) // FNN_RG)
    cdef Py_ssize_t* off = <Py_ssize_t*>ws
    cdef Py_ssize_t t, i, o, step
    cdef char* mine
    cdef floating s
    cdef double sd
    _offsets(g, off)
    step = (g.m + T - 1) // T
    step = (step + FNN_RG - 1) // FNN_RG * FNN_RG
    if T == 1:
        mine = ws + base
        _dw_rows(g, x, dz, off, <floating*>mine, lddw,
                 <double*>(mine + _align(K * lddw * itemsize)),
                 <floating*>(mine + _align(K * lddw * itemsize) + _align(O * sizeof(double))),
                 <floating*>(mine + _align(K * lddw * itemsize) + _align(O * sizeof(double))
                             + _align(chunk * K * itemsize)),
                 chunk, direct, 0, g.m)
    else:
        if not direct and _blas.set_threads != NULL:
            fnn_blas_enter(<fnn_set_threads_t>_blas.set_threads,
                           <fnn_get_threads_t>_blas.get_threads)
        for t in prange(T, schedule="static", num_threads=T):
            _dw_rows(g, x, dz, off, <floating*>(ws + base + t * per), lddw,
                     <double*>(ws + base + t * per + _align(K * lddw * itemsize)),
                     <floating*>(ws + base + t * per + _align(K * lddw * itemsize)
                                 + _align(O * sizeof(double))),
                     <floating*>(ws + base + t * per + _align(K * lddw * itemsize)
                                 + _align(O * sizeof(double)) + _align(chunk * K * itemsize)),
                     chunk, direct, min(g.m, t * step), min(g.m, (t + 1) * step))
        if not direct and _blas.set_threads != NULL:
            fnn_blas_leave(<fnn_set_threads_t>_blas.set_threads)
    # the threads' partial sums, in thread order
    for i in range(K):
        for o in range(O):
            s = (<floating*>(ws + base))[i * lddw + o]
            for t in range(1, T):
                s = s + (<floating*>(ws + base + t * per))[i * lddw + o]
            dw[i * O + o] = s
    for o in range(O):
        sd = (<double*>(ws + base + _align(K * lddw * itemsize)))[o]
        for t in range(1, T):
            sd = sd + (<double*>(ws + base + t * per + _align(K * lddw * itemsize)))[o]
        db[o] = <floating>sd


cdef Py_ssize_t _backward_workspace(const geom* g, Py_ssize_t itemsize) noexcept nogil:
    cdef Py_ssize_t K = g.k, O = g.o, lddw = (O + FNN_VL - 1) // FNN_VL * FNN_VL
    cdef Py_ssize_t chunk = _chunk_rows(K, itemsize)
    return _align(K * sizeof(Py_ssize_t)) + _num_threads * (
        _align(K * lddw * itemsize) + _align(O * sizeof(double)) + _align(chunk * K * itemsize)
        + _align(chunk * lddw * itemsize))


# ------------------------------------------------------------------ backprop

cdef void _backprop_images(int act, const geom* g, const floating* dz, const floating* w,
                           const floating* zb, const floating* yb, floating* dx, floating* dcol,
                           Py_ssize_t chunk, Py_ssize_t n0, Py_ssize_t n1) noexcept nogil:
    """Images ``[n0, n1)`` of the delta below: per chunk of rows, ``dcols = dz @
    w.T`` (BLAS), col2im into the zeroed images, then the derivative of the
    activation below over each image whose last row is in."""
    cdef Py_ssize_t pq = g.p * g.q, hwc = g.h * g.w * g.c, K = g.k, O = g.o
    cdef Py_ssize_t r0 = n0 * pq, r1 = n1 * pq, e, n, nz = n0, nd = n0
    cdef const floating* zp
    cdef const floating* yp
    while r0 < r1:
        e = min(r1, r0 + chunk)
        if g.identity:   # dx rows are the GEMM's rows
            gemm_with(_blas, c'T', c'N', <int>K, <int>(e - r0), <int>O, w, <int>O,
                      dz + r0 * O, <int>O, 0, dx + r0 * K, <int>K)
            zp = zb + r0 * K if zb != NULL else NULL
            yp = yb + r0 * K if yb != NULL else NULL
            act_backward_range(act, dx + r0 * K, zp, yp, dx + r0 * K, 0, (e - r0) * K)
            r0 = e
            continue
        while nz * pq < e:   # images that start in this chunk
            memset(dx + nz * hwc, 0, hwc * sizeof(floating))
            nz += 1
        gemm_with(_blas, c'T', c'N', <int>K, <int>(e - r0), <int>O, w, <int>O, dz + r0 * O,
                  <int>O, 0, dcol, <int>K)
        _col2im(g, dcol, dx, r0, e)
        while (nd + 1) * pq <= e:   # images complete after this chunk
            n = nd
            zp = zb + n * hwc if zb != NULL else NULL
            yp = yb + n * hwc if yb != NULL else NULL
            act_backward_range(act, dx + n * hwc, zp, yp, dx + n * hwc, 0, hwc)
            nd += 1
        r0 = e


cdef void _conv_backprop(int act, const geom* g, const floating* dz, const floating* w,
                         const floating* zb, const floating* yb, floating* dx,
                         char* ws) noexcept nogil:
    cdef Py_ssize_t itemsize = sizeof(floating), K = g.k, O = g.o
    cdef Py_ssize_t chunk = _chunk_rows(K, itemsize)
    cdef Py_ssize_t per = _align(chunk * K * itemsize)
    cdef int T = _threads_for(<double>g.m * K * O, PAR_MIN_FLOPS, g.n)
    cdef Py_ssize_t t, step = (g.n + T - 1) // T
    if T == 1:
        _backprop_images(act, g, dz, w, zb, yb, dx, <floating*>ws, chunk, 0, g.n)
        return
    if _blas.set_threads != NULL:
        fnn_blas_enter(<fnn_set_threads_t>_blas.set_threads, <fnn_get_threads_t>_blas.get_threads)
    for t in prange(T, schedule="static", num_threads=T):
        _backprop_images(act, g, dz, w, zb, yb, dx, <floating*>(ws + t * per), chunk,
                         min(g.n, t * step), min(g.n, (t + 1) * step))
    if _blas.set_threads != NULL:
        fnn_blas_leave(<fnn_set_threads_t>_blas.set_threads)


# ------------------------------------------------------------------ max pooling

cdef void _pool_rows(const floating* x, floating* out, int32_t* am, Py_ssize_t H, Py_ssize_t W,
                     Py_ssize_t C, Py_ssize_t P, Py_ssize_t Q, Py_ssize_t ph, Py_ssize_t pw,
                     Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    """Output rows ``a <= n*P + p < b`` of max pooling."""
    cdef Py_ssize_t row, n, p, q, k, c, i, j
    cdef floating* o
    cdef int32_t* ai
    cdef const floating* s0
    cdef const floating* s
    cdef floating v, cur
    cdef bint take
    cdef int32_t kk
    for row in range(a, b):
        n = row // P
        p = row - n * P
        for q in range(Q):
            o = out + (row * Q + q) * C
            ai = am + (row * Q + q) * C
            s0 = x + ((n * H + p * sh) * W + q * sw) * C
            for c in range(C):
                o[c] = s0[c]
                ai[c] = 0
            for k in range(1, ph * pw):
                i = k // pw
                j = k - i * pw
                s = s0 + (i * W + j) * C
                kk = <int32_t>k
                for c in range(C):
                    v = s[c]
                    cur = o[c]
                    # v wins where greater, or NaN while the maximum so far is not
                    take = (not (v <= cur)) and (cur == cur)
                    o[c] = v if take else cur
                    ai[c] = kk if take else ai[c]


cdef void _pool_back_rows(int act, const floating* dy, const int32_t* am, const floating* zb,
                          const floating* yb, floating* out, Py_ssize_t H, Py_ssize_t W,
                          Py_ssize_t C, Py_ssize_t P, Py_ssize_t Q, Py_ssize_t ph, Py_ssize_t pw,
                          Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    """Input rows ``a <= n*H + h < b`` of the pooling gradient, windows that do
    not overlap (``stride >= pool``): each element written once, ``0 + dy``
    where its window chose it, else 0, then times the derivative."""
    cdef Py_ssize_t row, n, h, p, i, w, q, j, c, wc = W * C
    cdef floating zero = 0
    cdef floating* o
    cdef const floating* d
    cdef const int32_t* ai
    cdef int32_t k
    cdef bint rowin
    for row in range(a, b):
        n = row // H
        h = row - n * H
        p = h // sh
        i = h - p * sh
        rowin = p < P and i < ph
        o = out + row * wc
        for w in range(W):
            q = w // sw
            j = w - q * sw
            if rowin and q < Q and j < pw:
                k = <int32_t>(i * pw + j)
                d = dy + ((n * P + p) * Q + q) * C
                ai = am + ((n * P + p) * Q + q) * C
                for c in range(C):
                    o[w * C + c] = (zero + d[c]) if ai[c] == k else zero
            else:
                for c in range(C):
                    o[w * C + c] = zero
        act_backward_range(act, o, zb + row * wc if zb != NULL else NULL,
                           yb + row * wc if yb != NULL else NULL, o, 0, wc)


cdef void _pool_back_images(int act, const floating* dy, const int32_t* am, const floating* zb,
                            const floating* yb, floating* out, Py_ssize_t H, Py_ssize_t W,
                            Py_ssize_t C, Py_ssize_t P, Py_ssize_t Q, Py_ssize_t ph,
                            Py_ssize_t pw, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t a,
                            Py_ssize_t b) noexcept nogil:
    """Images ``[a, b)`` of the pooling gradient, windows that overlap: zero,
    add ``dy`` window offset by window offset (the reference's order), then
    times the derivative."""
    cdef Py_ssize_t n, k, i, j, p, q, c, hwc = H * W * C
    cdef floating zero = 0
    cdef floating* img
    cdef floating* o
    cdef const floating* d
    cdef const int32_t* ai
    cdef int32_t kk
    for n in range(a, b):
        img = out + n * hwc
        memset(img, 0, hwc * sizeof(floating))
        for k in range(ph * pw):
            i = k // pw
            j = k - i * pw
            kk = <int32_t>k
            for p in range(P):
                for q in range(Q):
                    o = img + ((p * sh + i) * W + q * sw + j) * C
                    d = dy + ((n * P + p) * Q + q) * C
                    ai = am + ((n * P + p) * Q + q) * C
                    for c in range(C):
                        o[c] = o[c] + (d[c] if ai[c] == kk else zero)
        act_backward_range(act, img, zb + n * hwc if zb != NULL else NULL,
                           yb + n * hwc if yb != NULL else NULL, img, 0, hwc)


# ------------------------------------------------------------------ dropout

cdef void _dropout_range(const floating* x, floating* out, uint64_t seed, uint64_t threshold,
                         floating scale, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """``out[i] = x[i]*scale`` where element ``i`` is kept, ``+0.0`` where it is
    dropped, for ``lo <= i < hi``: kept iff ``splitmix64(seed + (i+1)*golden) >> 40
    >= threshold`` (wrapping uint64), hashed in the loop that applies it."""
    cdef Py_ssize_t i
    cdef uint64_t h
    cdef floating zero = 0, v
    for i in range(lo, hi):
        h = seed + <uint64_t>(i + 1) * FNN_GOLDEN
        h = (h ^ (h >> 30)) * FNN_MIX1
        h = (h ^ (h >> 27)) * FNN_MIX2
        h = h ^ (h >> 31)
        v = x[i] * scale
        out[i] = v if (h >> 40) >= threshold else zero


cdef void _dropout_typed(const floating[::1] x, floating[::1] out, uint64_t seed,
                         uint64_t threshold, double scale):
    cdef Py_ssize_t n = x.shape[0], c, step
    cdef Py_ssize_t chunks = n_chunks(n, PAR_MIN_DROPOUT, _num_threads)
    cdef floating s = <floating>scale    # rounded once to the dtype
    cdef const floating* xp = &x[0]
    cdef floating* op = &out[0]
    with nogil:
        if chunks == 1:
            _dropout_range(xp, op, seed, threshold, s, 0, n)
        else:
            step = chunk_step(n, chunks)
            for c in prange(chunks, schedule="static", num_threads=chunks):
                _dropout_range(xp, op, seed, threshold, s, min(n, c * step),
                               min(n, (c + 1) * step))


def dropout_forward(x, rate, seed, out):
    """Inverted dropout: ``out = x * s`` where element ``i`` (flat C-order index)
    is kept, ``+0.0`` where dropped (also for inf/NaN inputs), ``s = 1/(1 - rate)``
    computed in float64 and rounded once to the dtype.

    Kept iff ``splitmix64((seed + (i+1)*0x9E3779B97F4A7C15) mod 2**64) >> 40 >= T``,
    ``T = floor(rate*2**24 + 0.5)``: the reference's mask bit for bit, computed
    in the loop that applies it (no mask in memory). ``rate == 0`` copies.

    Parameters
    ----------
    x : ndarray, any shape, C-contiguous
        IN
    rate : float in [0, 1)
    seed : int in [0, 2**64)
    out : ndarray, same shape and dtype
        OUT; may be ``x``.
    """
    cdef double r = rate
    if r == 0:
        if out is not x:
            __import__("numpy").copyto(out, x)
        return
    cdef uint64_t threshold = <uint64_t>floor(r * 16777216.0 + 0.5)
    cdef uint64_t s = <uint64_t>int(seed)
    if x.dtype.itemsize == 4:
        _dropout_typed[float](x.reshape(-1), out.reshape(-1), s, threshold, 1.0 / (1.0 - r))
    else:
        _dropout_typed[double](x.reshape(-1), out.reshape(-1), s, threshold, 1.0 / (1.0 - r))


def dropout_backward(dy, rate, seed, out):
    """Backward pass of :func:`dropout_forward`: the same mask and scale on ``dy``
    (``out`` may be ``dy``).

    Parameters
    ----------
    dy : ndarray, any shape, C-contiguous
        IN
    rate : float in [0, 1)
        The forward pass's.
    seed : int
        The forward pass's.
    out : ndarray, same shape and dtype
        OUT; may be ``dy``.
    """
    dropout_forward(dy, rate, seed, out)



# ------------------------------------------------------------------ typed drivers

cdef void _forward_typed(int act, const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] w,
                         const floating[::1] b, floating[:, :, :, ::1] out,
                         floating[:, :, :, ::1] preact, geom* g, char* ws) noexcept:
    cdef floating* o = &out[0, 0, 0, 0]
    cdef floating* z = &preact[0, 0, 0, 0] if preact.shape[0] else o
    with nogil:
        _conv_forward(act, g, &x[0, 0, 0, 0], &w[0, 0, 0, 0], &b[0], z, o, ws)


cdef void _backward_typed(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] dz,
                          floating[:, :, :, ::1] dw, floating[::1] db, geom* g,
                          char* ws) noexcept:
    with nogil:
        _conv_backward(g, &x[0, 0, 0, 0], &dz[0, 0, 0, 0], &dw[0, 0, 0, 0], &db[0], ws)


cdef void _backprop_typed(int act, const floating[:, :, :, ::1] dz,
                          const floating[:, :, :, ::1] w, const floating[:, :, :, ::1] z,
                          const floating[:, :, :, ::1] y, floating[:, :, :, ::1] out, geom* g,
                          char* ws) noexcept:
    cdef const floating* zp = &z[0, 0, 0, 0] if z.shape[0] else NULL
    cdef const floating* yp = &y[0, 0, 0, 0] if y.shape[0] else NULL
    with nogil:
        _conv_backprop(act, g, &dz[0, 0, 0, 0], &w[0, 0, 0, 0], zp, yp, &out[0, 0, 0, 0], ws)


cdef void _pool_typed(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out,
                      int32_t[:, :, :, ::1] argmax, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t sh,
                      Py_ssize_t sw) noexcept:
    cdef Py_ssize_t N = x.shape[0], H = x.shape[1], W = x.shape[2], C = x.shape[3]
    cdef Py_ssize_t P = out.shape[1], Q = out.shape[2]
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef floating* op = &out[0, 0, 0, 0]
    cdef int32_t* ap = &argmax[0, 0, 0, 0]
    cdef int T = _threads_for(<double>N * P * Q * C * ph * pw, PAR_MIN_POOL, N * P)
    cdef Py_ssize_t t, step = (N * P + T - 1) // T
    with nogil:
        if T == 1:
            _pool_rows(xp, op, ap, H, W, C, P, Q, ph, pw, sh, sw, 0, N * P)
        else:
            for t in prange(T, schedule="static", num_threads=T):
                _pool_rows(xp, op, ap, H, W, C, P, Q, ph, pw, sh, sw,
                           min(N * P, t * step), min(N * P, (t + 1) * step))


cdef void _pool_back_typed(int act, const floating[:, :, :, ::1] dy,
                           const int32_t[:, :, :, ::1] argmax, const floating[:, :, :, ::1] z,
                           const floating[:, :, :, ::1] y, floating[:, :, :, ::1] out,
                           Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t sh,
                           Py_ssize_t sw) noexcept:
    cdef Py_ssize_t N = out.shape[0], H = out.shape[1], W = out.shape[2], C = out.shape[3]
    cdef Py_ssize_t P = dy.shape[1], Q = dy.shape[2]
    cdef const floating* zp = &z[0, 0, 0, 0] if z.shape[0] else NULL
    cdef const floating* yp = &y[0, 0, 0, 0] if y.shape[0] else NULL
    cdef const floating* dp = &dy[0, 0, 0, 0]
    cdef const int32_t* ap = &argmax[0, 0, 0, 0]
    cdef floating* op = &out[0, 0, 0, 0]
    cdef bint overlap = sh < ph or sw < pw
    cdef Py_ssize_t parts = N if overlap else N * H
    cdef int T = _threads_for(<double>N * H * W * C, PAR_MIN_POOL, parts)
    cdef Py_ssize_t t, step = (parts + T - 1) // T
    with nogil:
        if T == 1:
            if overlap:
                _pool_back_images(act, dp, ap, zp, yp, op, H, W, C, P, Q, ph, pw, sh, sw, 0, N)
            else:
                _pool_back_rows(act, dp, ap, zp, yp, op, H, W, C, P, Q, ph, pw, sh, sw, 0, N * H)
        else:
            for t in prange(T, schedule="static", num_threads=T):
                if overlap:
                    _pool_back_images(act, dp, ap, zp, yp, op, H, W, C, P, Q, ph, pw, sh, sw,
                                      min(parts, t * step), min(parts, (t + 1) * step))
                else:
                    _pool_back_rows(act, dp, ap, zp, yp, op, H, W, C, P, Q, ph, pw, sh, sw,
                                    min(parts, t * step), min(parts, (t + 1) * step))


# ------------------------------------------------------------------ the contract's kernels

_EMPTY4 = {4: np.empty((0, 0, 0, 0), "float32"), 8: np.empty((0, 0, 0, 0), "float64")}


def conv2d_forward(x, w, b, str act, out, preact=None, stride=(1, 1), padding=(0, 0, 0, 0)):
    """2-D convolution, NHWC, fused with bias and activation: ``out = act(z)``,
    ``z[n,p,q,o] = b[o] + sum_{i,j,c} xpad[n, p*sh+i, q*sw+j, c] * w[i,j,c,o]``.

    Per chunk of output rows: im2col into the workspace, one GEMM, then bias and
    activation while the rows are in cache (or, for ``kh*kw*c <= 32``, the
    register-blocked loop with the same epilogue; see the module docstring).

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
        OUT; must not overlap any input.
    preact : ndarray (n, p, q, o) or None
        OUT: ``z``.
    stride : (int, int)
    padding : (int, int, int, int)
        ``(top, bottom, left, right)`` zeros.
    """
    _ensure_blas()
    cdef int code = act_code(act)
    cdef geom g
    cdef int size = x.dtype.itemsize
    _geometry(&g, x.shape, w.shape, out.shape, stride, padding)
    cdef char* ws = _workspace(_forward_workspace(&g, size))
    if preact is None:
        preact = _EMPTY4[size]
    if size == 4:
        _forward_typed[float](code, x, w, b, out, preact, &g, ws)
    else:
        _forward_typed[double](code, x, w, b, out, preact, &g, ws)


def conv2d_backward(x, dz, dw, db, stride=(1, 1), padding=(0, 0, 0, 0)):
    """Parameter gradients of a convolution in one call (overwritten):
    ``dw[i,j,c,o] = sum_{n,p,q} xpad[n, p*sh+i, q*sw+j, c] * dz[n,p,q,o]``,
    ``db[o] = sum_{n,p,q} dz[n,p,q,o]`` (float64 sums, rounded once).

    Per chunk of rows: im2col, ``dw += cols.T @ dz`` (BLAS, or the
    register-blocked loop for ``kh*kw*c <= 32``), and ``db`` over the same rows
    of ``dz``; the threads' partial sums are added in thread order.

    Parameters
    ----------
    x : ndarray (n, h, w, c)
        IN
    dz : ndarray (n, p, q, o)
        IN
    dw : ndarray (kh, kw, c, o)
        OUT
    db : ndarray (o,)
        OUT
    stride, padding
        As in :func:`conv2d_forward`.
    """
    _ensure_blas()
    cdef geom g
    cdef int size = x.dtype.itemsize
    _geometry(&g, x.shape, dw.shape, dz.shape, stride, padding)
    cdef char* ws = _workspace(_backward_workspace(&g, size))
    if size == 4:
        _backward_typed[float](x, dz, dw, db, &g, ws)
    else:
        _backward_typed[double](x, dz, dw, db, &g, ws)


def conv2d_backprop(dz, w, z, y, str act, out, stride=(1, 1), padding=(0, 0, 0, 0)):
    """Delta of the layer below a convolution: ``out = convT(dz, w) * act'(z or y)``,
    cropped to the unpadded input.

    Per chunk of rows (each thread owns whole images): ``dcols = dz @ w.T``
    (BLAS), col2im into the images, then the derivative over every image
    whose last row is in.

    Parameters
    ----------
    dz : ndarray (n, p, q, o)
        IN
    w : ndarray (kh, kw, c, o)
        IN
    z, y : ndarray (n, h, w, c) or None
        Pre-activation and output of the layer below (the one the derivative
        does not use may be None). IN
    act : str
        Activation of the layer below.
    out : ndarray (n, h, w, c)
        OUT; must not overlap any input.
    stride, padding
        As in :func:`conv2d_forward`.
    """
    _ensure_blas()
    cdef int code = act_code(act)
    cdef geom g
    cdef int size = dz.dtype.itemsize
    _geometry(&g, out.shape, w.shape, dz.shape, stride, padding)
    cdef Py_ssize_t chunk = _chunk_rows(g.k, size)
    cdef char* ws = _workspace(_num_threads * _align(chunk * g.k * size))
    empty = _EMPTY4[size]
    if z is None:
        z = empty
    if y is None:
        y = empty
    if size == 4:
        _backprop_typed[float](code, dz, w, z, y, out, &g, ws)
    else:
        _backprop_typed[double](code, dz, w, z, y, out, &g, ws)


def maxpool2d_forward(x, out, argmax, pool=(2, 2), stride=None):
    """Max pooling without padding, NHWC: ``out[n,p,q,c] = max_{i<ph, j<pw}
    x[n, p*sh+i, q*sw+j, c]``, ``argmax = i*pw + j`` of the first maximum (a
    NaN is the maximum: the first NaN).

    Parameters
    ----------
    x : ndarray (n, h, w, c)
        IN
    out : ndarray (n, p, q, c)
        OUT
    argmax : int32 ndarray (n, p, q, c)
        OUT
    pool : (int, int)
    stride : (int, int) or None
        None: ``pool``.
    """
    ph, pw = pool
    sh, sw = (ph, pw) if stride is None else stride
    if x.dtype.itemsize == 4:
        _pool_typed[float](x, out, argmax, ph, pw, sh, sw)
    else:
        _pool_typed[double](x, out, argmax, ph, pw, sh, sw)


def maxpool2d_backward(dy, argmax, z, y, str act, out, pool=(2, 2), stride=None):
    """Gradient through max pooling times the derivative below:
    ``out = act'(z or y) * g``, ``g[n, p*sh+i, q*sw+j, c] += dy[n,p,q,c]`` where
    ``argmax[n,p,q,c] == i*pw + j``, 0 where no window chose.

    Parameters
    ----------
    dy : ndarray (n, p, q, c)
        IN
    argmax : int32 ndarray (n, p, q, c)
        IN
    z, y : ndarray (n, h, w, c) or None
        IN
    act : str
        Activation of the layer below.
    out : ndarray (n, h, w, c)
        OUT
    pool, stride
        As in :func:`maxpool2d_forward`.
    """
    cdef int code = act_code(act)
    ph, pw = pool
    sh, sw = (ph, pw) if stride is None else stride
    cdef int size = dy.dtype.itemsize
    empty = _EMPTY4[size]
    if z is None:
        z = empty
    if y is None:
        y = empty
    if size == 4:
        _pool_back_typed[float](code, dy, argmax, z, y, out, ph, pw, sh, sw)
    else:
        _pool_back_typed[double](code, dy, argmax, z, y, out, ph, pw, sh, sw)
