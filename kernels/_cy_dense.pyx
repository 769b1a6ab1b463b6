# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The dense layer: GEMM by BLAS (without the GIL) and our fused epilogues
around it (Cython, OpenMP).

Which BLAS: ``fastnn.kernels.cython_cpu`` hands the addresses of a Fortran
``sgemm``/``dgemm`` to ``_set_blas``: NumPy's own OpenBLAS (ILP64) when it
finds it (one BLAS, one thread pool in the process, shared with the user's
``np.dot``), else SciPy's ``scipy.linalg.cython_blas`` (LP64). Nothing is
cimported from SciPy, so importing this module does not import
``scipy.linalg`` (0.14 s); called before ``_set_blas``, a kernel loads
SciPy's BLAS itself.

One product is not BLAS's: ``x @ w`` in ``dense_forward`` where ``w`` has at
most a vector of columns (16 float32, 8 float64) and ``x`` at least
``SKINNY_MIN_K`` (the classifier after a Flatten: seed 003's 32x21632 @
21632x10, where OpenBLAS packs all of ``x`` and reaches about 20 GFLOP/s)
runs our register-blocked loop (``fnn_skinny``), reading ``x`` once.

Row-major arrays seen by column-major BLAS are transposed, so row-major
``C = A @ B`` is ``gemm('N', 'N', n, m, k, 1, B, n, A, k, 0, C, n)``;
``x.T @ dz`` and ``dy @ w.T`` put a ``'T'`` on the right operand; nothing is
copied. Inputs are trusted: ``fastnn._validate`` checks them first (shapes,
one dtype, C-contiguity, no overlap of the output with the inputs).
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.stdint cimport int64_t, uintptr_t

from _cy_blas cimport (
    blas_t, dgemm32_t, dgemm64_t, gemm_with, get_threads_t, set_threads_t, sgemm32_t, sgemm64_t,
)
from _cy_math cimport (
    FASTNN_OPENMP, act_backward, act_code, act_is_transcendental, bias_act_rows, n_chunks,
)

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #endif
    /* Around every parallel region of the modules sharing the BLAS table
       (_cy_dense's epilogues, _cy_conv; several Python threads may
       run regions at once: the first to enter saves, the last to leave
       restores):
       - the BLAS thread count is set to 1, since each thread of ours calls
         the BLAS itself;
       - OpenBLAS' idle workers are sent to sleep: after a GEMM they spin for
         about 2^28 cycles (0.1 s) on a core of their own, so a region that
         follows a GEMM (the dense layer's, every step) shares a core with
         that spin; its thread_timeout, lowered to 16 cycles for the region,
         ends the spin at its next check and is restored afterwards, so the
         next GEMM wakes the worker once and it spins again as before. */
    typedef void (*fnn_set_threads_t)(int);
    typedef int (*fnn_get_threads_t)(void);
    #ifdef _OPENMP
    static omp_lock_t fnn_region_lock;
    #endif
    static int fnn_region_users = 0, fnn_saved_threads = 1;
    static unsigned int fnn_saved_timeout = 0;
    static void fnn_region_lock_init(void) {
    #ifdef _OPENMP
        omp_init_lock(&fnn_region_lock);
    #endif
    }
    static void fnn_region_enter(fnn_set_threads_t set, fnn_get_threads_t get,
                                 unsigned int* timeout) {
    #ifdef _OPENMP
        omp_set_lock(&fnn_region_lock);
        if (fnn_region_users++ == 0) {
            fnn_saved_threads = 1;
            if (set && get) {
                fnn_saved_threads = get();
                if (fnn_saved_threads != 1) set(1);
            }
            if (timeout) {
                fnn_saved_timeout = *(volatile unsigned int*)timeout;
                *(volatile unsigned int*)timeout = 16;
            }
        }
        omp_unset_lock(&fnn_region_lock);
    #endif
    }
    static void fnn_region_leave(fnn_set_threads_t set, unsigned int* timeout) {
    #ifdef _OPENMP
        omp_set_lock(&fnn_region_lock);
        if (--fnn_region_users == 0) {
            if (set && fnn_saved_threads != 1) set(fnn_saved_threads);
            if (timeout) *(volatile unsigned int*)timeout = fnn_saved_timeout;
        }
        omp_unset_lock(&fnn_region_lock);
    #endif
    }
    """
    ctypedef void (*fnn_set_threads_t)(int) noexcept nogil
    ctypedef int (*fnn_get_threads_t)() noexcept nogil
    void fnn_region_lock_init() noexcept nogil
    void fnn_region_enter(fnn_set_threads_t s, fnn_get_threads_t g,
                          unsigned int* timeout) noexcept nogil
    void fnn_region_leave(fnn_set_threads_t s, unsigned int* timeout) noexcept nogil


cdef extern from *:
    """
    #include <string.h>
    /* x @ w for a narrow w (n <= FNN_SK_LANES output columns: the classifier
       after a Flatten, 32x21632 @ 21632x10, where OpenBLAS packs all of x and
       runs at ~20 GFLOP/s): 8 rows of x at a time, one vector of
       accumulators a row (GCC vector extensions, 64 bytes: 16 float lanes or
       8 double), w's row k read as one vector (its lanes past n hold the next
       row's values and are never stored; the last rows, where that would read
       past w, through a zero-padded copy). Each lane a multiply then an add in
       k order: the same bits on every instruction set and thread count. */
    /* each row's sum in blocks of FNN_SK_BLOCK terms, the blocks added in order
       (a running sum over 21,632 terms rounded 4.5e-6 of the largest output in
       float32, 12x OpenBLAS's blocked sum) */
    #define FNN_SK_BLOCK 256
    #if defined(__GNUC__)
    typedef float fnn_skf __attribute__((vector_size(64)));
    typedef double fnn_skd __attribute__((vector_size(64)));
    #define FNN_SK_HAVE 1
    #define FNN_SKINNY(T, V, SUF)                                                       \
    static inline V fnn_sk_row_##SUF(const T* w, Py_ssize_t kk, Py_ssize_t n, Py_ssize_t safe) { \
        V v;                                                                           \
        if (kk < safe) { memcpy(&v, w + kk * n, sizeof(V)); return v; }               \
        T pad[sizeof(V) / sizeof(T)] = {0};                                            \
        memcpy(pad, w + kk * n, (size_t)n * sizeof(T));                                \
        memcpy(&v, pad, sizeof(V));                                                    \
        return v;                                                                      \
    }                                                                                  \
    /* z[r*n + l] = sum_kk x[r*K + kk] * w[kk*n + l], rows [r0, r1), l < n */          \
    static void fnn_skinny_##SUF(const T* x, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t K, \
                                 const T* w, Py_ssize_t n, T* z) {                     \
        const Py_ssize_t L = sizeof(V) / sizeof(T);                                    \
        /* rows of w that can be read as a whole vector inside w */                   \
        Py_ssize_t safe = K - (L - n + n - 1) / n;                                     \
        if (safe < 0) safe = 0;                                                        \
        for (Py_ssize_t r = r0; r < r1; r += 8) {                                      \
            const T* x0 = x + r * K;                                                   \
            T out[8][sizeof(V) / sizeof(T)];                                           \
            int R = (int)(r1 - r < 8 ? r1 - r : 8);                                    \
            if (R == 8) {                                                              \
                V s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, s4 = {0}, s5 = {0}, s6 = {0}, s7 = {0}; \
                for (Py_ssize_t k0 = 0; k0 < K; k0 += FNN_SK_BLOCK) {                  \
                    Py_ssize_t k1 = K - k0 < FNN_SK_BLOCK ? K : k0 + FNN_SK_BLOCK;      \
                    V a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0}; \
                    for (Py_ssize_t kk = k0; kk < k1; kk++) {                          \
                        V wv = fnn_sk_row_##SUF(w, kk, n, safe);                       \
                        a0 = a0 + x0[kk] * wv; a1 = a1 + x0[K + kk] * wv;              \
                        a2 = a2 + x0[2 * K + kk] * wv; a3 = a3 + x0[3 * K + kk] * wv;  \
                        a4 = a4 + x0[4 * K + kk] * wv; a5 = a5 + x0[5 * K + kk] * wv;  \
                        a6 = a6 + x0[6 * K + kk] * wv; a7 = a7 + x0[7 * K + kk] * wv;  \
                    }                                                                  \
                    s0 = s0 + a0; s1 = s1 + a1; s2 = s2 + a2; s3 = s3 + a3;            \
                    s4 = s4 + a4; s5 = s5 + a5; s6 = s6 + a6; s7 = s7 + a7;            \
                }                                                                      \
                memcpy(out[0], &s0, sizeof(V)); memcpy(out[1], &s1, sizeof(V));        \
                memcpy(out[2], &s2, sizeof(V)); memcpy(out[3], &s3, sizeof(V));        \
                memcpy(out[4], &s4, sizeof(V)); memcpy(out[5], &s5, sizeof(V));        \
                memcpy(out[6], &s6, sizeof(V)); memcpy(out[7], &s7, sizeof(V));        \
            } else {                                                                   \
                for (int i = 0; i < R; i++) {                                          \
                    V s = {0};                                                         \
                    for (Py_ssize_t k0 = 0; k0 < K; k0 += FNN_SK_BLOCK) {              \
                        Py_ssize_t k1 = K - k0 < FNN_SK_BLOCK ? K : k0 + FNN_SK_BLOCK;  \
                        V a = {0};                                                     \
                        for (Py_ssize_t kk = k0; kk < k1; kk++)                        \
                            a = a + x0[i * K + kk] * fnn_sk_row_##SUF(w, kk, n, safe); \
                        s = s + a;                                                     \
                    }                                                                  \
                    memcpy(out[i], &s, sizeof(V));                                     \
                }                                                                      \
            }                                                                          \
            for (int i = 0; i < R; i++)                                                \
                for (Py_ssize_t l = 0; l < n; l++) z[(r + i) * n + l] = out[i][l];     \
        }                                                                              \
    }
    FNN_SKINNY(float, fnn_skf, f)
    FNN_SKINNY(double, fnn_skd, d)
    #define FNN_SK_LANES_F 16
    #define FNN_SK_LANES_D 8
    #else
    #define FNN_SK_HAVE 0
    #define FNN_SK_LANES_F 0
    #define FNN_SK_LANES_D 0
    static void fnn_skinny_f(const float* x, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t K,
                             const float* w, Py_ssize_t n, float* z) {}
    static void fnn_skinny_d(const double* x, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t K,
                             const double* w, Py_ssize_t n, double* z) {}
    #endif
    """
    int FNN_SK_LANES_F
    int FNN_SK_LANES_D
    void fnn_skinny_f(const float* x, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t K, const float* w,
                      Py_ssize_t n, float* z) noexcept nogil
    void fnn_skinny_d(const double* x, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t K,
                      const double* w, Py_ssize_t n, double* z) noexcept nogil

#: True when this extension was compiled with OpenMP.
OPENMP = bool(FASTNN_OPENMP)

# Parallel thresholds of the epilogues, in output elements (the same measured
# figures as _cy_elementwise).
cdef Py_ssize_t PAR_MIN_CHEAP = 1 << 20
cdef Py_ssize_t PAR_MIN_TRANS = 1 << 19
cdef int _num_threads = 1
# x @ w by our own loop (fnn_skinny) where w has at most a vector of columns
# (16 float32, 8 float64) and x at least SKINNY_MIN_K of them: SKINNY_MIN_K
# and SKINNY_PAR_MIN (multiply-adds from which its row groups go to the
# threads). Measured (m x K @ K x 10, float32, 2 threads, us, BLAS / ours on
# 1 thread / on 2): m 32: K 4096 65 / 42 / 44, K 8192 128 / 83 / 65, K 21632
# 350 / 216 / 137; m 128: K 1024 46 / 43 / 47, K 21632 1061 / 894 / 541 (below
# about 2 M multiply-adds the second thread costs its wake-up).
cdef Py_ssize_t SKINNY_MIN_K = 4096
cdef double SKINNY_PAR_MIN = 1 << 21


def set_num_threads(int n):
    """Set the OpenMP threads of this module's parallel epilogues (BLAS threads
    are set through threadpoolctl by ``fastnn.set_num_threads``)."""
    global _num_threads
    _num_threads = max(1, n)


def _set_skinny(min_k=None, par_min=None):
    """Set the narrowest ``x`` (columns) that takes the narrow-``w`` loop (a huge
    number turns it off) and its parallel threshold in multiply-adds (tests,
    measurements); returns the old pair."""
    global SKINNY_MIN_K, SKINNY_PAR_MIN
    old = (SKINNY_MIN_K, SKINNY_PAR_MIN)
    if min_k is not None:
        SKINNY_MIN_K = min_k
    if par_min is not None:
        SKINNY_PAR_MIN = par_min
    return old


def _set_parallel_min(Py_ssize_t cheap, Py_ssize_t trans):
    """Set the parallel thresholds (tests, measurements); returns the old pair."""
    global PAR_MIN_CHEAP, PAR_MIN_TRANS
    old = (PAR_MIN_CHEAP, PAR_MIN_TRANS)
    PAR_MIN_CHEAP, PAR_MIN_TRANS = cheap, trans
    return old


cdef void _region_enter() noexcept nogil:
    """Before an OpenMP region (here or in ``_cy_conv``, through
    ``blas_t.region_enter``): the BLAS on one thread, OpenBLAS' idle workers
    asleep (``fnn_region_enter``)."""
    fnn_region_enter(<fnn_set_threads_t>_blas.set_threads, <fnn_get_threads_t>_blas.get_threads,
                     _blas.thread_timeout)


cdef void _region_leave() noexcept nogil:
    fnn_region_leave(<fnn_set_threads_t>_blas.set_threads, _blas.thread_timeout)


cdef inline Py_ssize_t _act_chunks(int act, Py_ssize_t n) noexcept nogil:
    return n_chunks(n, PAR_MIN_TRANS if act_is_transcendental(act) else PAR_MIN_CHEAP,
                    _num_threads)


# The BLAS entry points (``_cy_blas.pxd``): one table, read by ``_cy_conv`` too
# through ``_blas_table()``
cdef blas_t _blas
fnn_region_lock_init()
_blas.region_enter = _region_enter
_blas.region_leave = _region_leave


def _set_blas(uintptr_t sgemm_addr, uintptr_t dgemm_addr, bint ilp64,
              uintptr_t set_threads_addr=0, uintptr_t get_threads_addr=0,
              uintptr_t thread_timeout_addr=0):
    """Call the Fortran ``sgemm``/``dgemm`` at these addresses (both non-zero),
    with 64-bit integers when ``ilp64``; ``set_threads_addr``/``get_threads_addr``:
    that library's ``openblas_set_num_threads``/``openblas_get_num_threads``
    (both, or 0 when unknown), which the convolutions use to run their GEMMs on
    one BLAS thread each inside their own parallel region;
    ``thread_timeout_addr``: OpenBLAS' idle-spin limit (0 when unknown), which
    they lower for the length of a region (see ``_cy_conv``)."""
    if sgemm_addr == 0 or dgemm_addr == 0:
        raise ValueError("_set_blas: both addresses are needed")
    if ilp64:
        _blas.sgemm64, _blas.dgemm64 = <sgemm64_t>sgemm_addr, <dgemm64_t>dgemm_addr
        _blas.sgemm32, _blas.dgemm32 = NULL, NULL
    else:
        _blas.sgemm32, _blas.dgemm32 = <sgemm32_t>sgemm_addr, <dgemm32_t>dgemm_addr
        _blas.sgemm64, _blas.dgemm64 = NULL, NULL
    if set_threads_addr != 0 and get_threads_addr != 0:
        _blas.set_threads = <set_threads_t>set_threads_addr
        _blas.get_threads = <get_threads_t>get_threads_addr
    else:
        _blas.set_threads, _blas.get_threads = NULL, NULL
    _blas.thread_timeout = <unsigned int*>thread_timeout_addr


def _set_thread_timeout(uintptr_t address):
    """Point the table at the BLAS' ``thread_timeout`` (0: none; see ``_set_blas``)."""
    _blas.thread_timeout = <unsigned int*>address


def _blas_table(bint load=False):
    """The address of this module's ``blas_t`` (``_cy_blas.pxd``), for the
    other extensions of the same variant; with ``load``, SciPy's BLAS is set
    first when none was."""
    if load:
        _ensure_blas()
    return <uintptr_t>&_blas


def _scipy_blas_addresses():
    """The addresses of ``sgemm``/``dgemm`` in ``scipy.linalg.cython_blas``."""
    import ctypes

    from scipy.linalg import cython_blas

    name = ctypes.pythonapi.PyCapsule_GetName
    name.restype, name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    pointer = ctypes.pythonapi.PyCapsule_GetPointer
    pointer.restype, pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    capi = cython_blas.__pyx_capi__
    return tuple(pointer(capi[f], name(capi[f])) for f in ("sgemm", "dgemm"))


cdef inline int _ensure_blas() except -1:
    if _blas.sgemm32 == NULL and _blas.sgemm64 == NULL:
        _set_blas(*_scipy_blas_addresses(), False)
    return 0


def _blas_is_scipy():
    """True when the GEMMs go to an LP64 BLAS (SciPy's ``cython_blas``)."""
    return _blas.sgemm64 == NULL


cdef inline void gemm(char ta, char tb, int m, int n, int k,
                      const floating* a, int lda, const floating* b, int ldb,
                      floating* c, int ldc) noexcept nogil:
    """Column-major ``C = op(A) @ op(B)`` (alpha 1, beta 0) by BLAS."""
    gemm_with(&_blas, ta, tb, m, n, k, a, lda, b, ldb, 0, c, ldc)


cdef void _dense_forward(int act,
                         const floating[:, ::1] x,   # IN (batch, in)
                         const floating[:, ::1] w,   # IN (in, out)
                         const floating[::1] b,      # IN (out,)
                         floating[:, ::1] out,       # OUT (batch, out)
                         floating[:, ::1] preact):   # OUT (batch, out) or an empty (0, 0) view
    with nogil:
        _dense_forward_p(act, &x[0, 0], &w[0, 0], &b[0], &out[0, 0],
                         &preact[0, 0] if preact.shape[0] else NULL,
                         x.shape[0], x.shape[1], w.shape[1])


cdef void _skinny(const floating* x, const floating* w, floating* z, int m, int k,
                  int n) noexcept nogil:
    """``z = x @ w`` (``fnn_skinny``): groups of 8 rows, to the threads above
    ``SKINNY_PAR_MIN`` multiply-adds."""
    cdef Py_ssize_t groups = (m + 7) // 8, t
    cdef int T = 1
    if _num_threads > 1 and <double>m * k * n >= SKINNY_PAR_MIN and groups > 1:
        T = <int>min(<Py_ssize_t>_num_threads, groups)
    if T == 1:
        if floating is float:
            fnn_skinny_f(x, 0, m, k, w, n, z)
        else:
            fnn_skinny_d(x, 0, m, k, w, n, z)
        return
    _region_enter()
    for t in prange(groups, schedule="dynamic", num_threads=T):
        if floating is float:
            fnn_skinny_f(x, 8 * t, min(<Py_ssize_t>m, 8 * t + 8), k, w, n, z)
        else:
            fnn_skinny_d(x, 8 * t, min(<Py_ssize_t>m, 8 * t + 8), k, w, n, z)
    _region_leave()


cdef void _dense_forward_p(int act, const floating* x, const floating* w, const floating* bp,
                           floating* o, floating* z, int m, int k, int n) noexcept nogil:
    """``o = act(x @ w + b)`` for ``x`` (m, k), ``w`` (k, n); ``z`` keeps
    ``x @ w + b`` (NULL: none)."""
    cdef Py_ssize_t c, nc, step
    if z == NULL:
        z = o
    cdef int lanes = FNN_SK_LANES_D
    if floating is float:
        lanes = FNN_SK_LANES_F
    if k >= SKINNY_MIN_K and n <= lanes:
        _skinny(x, w, z, m, k, n)
    else:
        gemm(c'N', c'N', n, m, k, w, n, x, k, z, n)
    nc = _act_chunks(act, <Py_ssize_t>m * n)
    if nc == 1:
        bias_act_rows(act, z, bp, o, 0, m, n)
    else:
        step = (m + nc - 1) // nc
        _region_enter()
        for c in prange(nc, schedule="static", num_threads=nc):
            bias_act_rows(act, z, bp, o, min(m, c * step), min(m, (c + 1) * step), n)
        _region_leave()


cdef void _backprop_delta(int act,
                          const floating[:, ::1] dy,  # IN (batch, out)
                          const floating[:, ::1] w,   # IN (in, out)
                          const floating[:, ::1] z,   # IN (batch, in) or empty (0, 0)
                          const floating[:, ::1] y,   # IN (batch, in) or empty (0, 0)
                          floating[:, ::1] out):      # OUT (batch, in)
    with nogil:
        _backprop_delta_p(act, &dy[0, 0], &w[0, 0], &z[0, 0] if z.shape[0] else NULL,
                          &y[0, 0] if y.shape[0] else NULL, &out[0, 0],
                          dy.shape[0], dy.shape[1], w.shape[0])


cdef void _backprop_delta_p(int act, const floating* dy, const floating* w, const floating* zp,
                            const floating* yp, floating* o, int m, int k,
                            int n) noexcept nogil:
    """``o = (dy @ w.T) * act'`` for ``dy`` (m, k), ``w`` (n, k); ``zp``/``yp``
    NULL when not given."""
    cdef Py_ssize_t size = <Py_ssize_t>m * n, chunks
    gemm(c'T', c'N', n, m, k, w, k, dy, k, o, n)
    chunks = _act_chunks(act, size)
    if chunks > 1:      # right after a GEMM: its OpenBLAS worker would share a core
        _region_enter()
    act_backward(act, o, zp, yp, o, size, chunks)
    if chunks > 1:
        _region_leave()


cdef void _dense_backward(const floating[:, ::1] x,   # IN (batch, in)
                          const floating[:, ::1] dz,  # IN (batch, out)
                          floating[:, ::1] dw,        # OUT (in, out)
                          floating[::1] db):          # OUT (out,)
    with nogil:
        _dense_backward_p(&x[0, 0], &dz[0, 0], &dw[0, 0], &db[0], x.shape[0], x.shape[1],
                          dz.shape[1])


cdef enum:
    SUM_COLUMNS = 64   # column sums: float64 accumulators (on the stack) per pass


cdef void _dense_backward_p(const floating* x, const floating* dz, floating* dw, floating* s,
                            int m, int k, int n) noexcept nogil:
    """``dw = x.T @ dz``, ``s = dz.sum(0)`` for ``x`` (m, k), ``dz`` (m, n);
    ``s`` accumulated in float64 and rounded once."""
    cdef Py_ssize_t r, j, j0, w
    cdef const floating* row
    cdef double acc[SUM_COLUMNS]
    gemm(c'N', c'T', n, k, m, dz, n, x, k, dw, n)
    # column sums, row after row in order (as NumPy's axis-0 sum), SUM_COLUMNS
    # columns at a time; the inner loop runs along a row, so it vectorizes
    # without reordering a sum
    j0 = 0
    while j0 < n:
        w = min(<Py_ssize_t>SUM_COLUMNS, n - j0)
        for j in range(w):
            acc[j] = 0
        for r in range(m):
            row = dz + <Py_ssize_t>r * n + j0
            for j in range(w):
                acc[j] = acc[j] + row[j]
        for j in range(w):
            s[j0 + j] = <floating>acc[j]
        j0 += SUM_COLUMNS


_EMPTY2 = {4: __import__("numpy").empty((0, 0), "float32"),
           8: __import__("numpy").empty((0, 0), "float64")}


def dense_forward(x, w, b, str act, out, preact=None):
    """Dense layer forward: ``out = act(x @ w + b)``, keeping ``z = x @ w + b``
    in ``preact`` when given.

    One BLAS GEMM into ``preact`` (or ``out``), then one pass over its rows that
    adds the bias and applies the activation while the row is in cache.

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
        OUT; must not overlap the inputs.
    preact : ndarray (batch, out) or None
        OUT: ``z = x @ w + b``.
    """
    _ensure_blas()
    cdef int code = act_code(act)
    cdef int size = x.dtype.itemsize
    if preact is None:
        preact = _EMPTY2[size]
    if size == 4:
        _dense_forward[float](code, x, w, b, out, preact)
    else:
        _dense_forward[double](code, x, w, b, out, preact)


def backprop_delta(dy, w, z, y, str act, out):
    """Delta of the layer below: ``out = (dy @ w.T) * act'(z)``.

    One BLAS GEMM into ``out``, then one pass multiplying the derivative in
    (from ``y`` for identity/relu/sigmoid/tanh, else from ``z``).

    Parameters
    ----------
    dy : ndarray (batch, out)
        IN
    w : ndarray (in, out)
        IN
    z, y : ndarray (batch, in) or None
        Pre-activation and output of the layer below; the one the derivative
        does not use may be None. IN
    act : str
        Activation of the layer below.
    out : ndarray (batch, in)
        OUT; must not overlap the inputs.
    """
    _ensure_blas()
    cdef int code = act_code(act)
    cdef int size = dy.dtype.itemsize
    empty = _EMPTY2[size]
    if z is None:
        z = empty
    if y is None:
        y = empty
    if size == 4:
        _backprop_delta[float](code, dy, w, z, y, out)
    else:
        _backprop_delta[double](code, dy, w, z, y, out)


def dense_backward(x, dz, dw, db):
    """Parameter gradients of a dense layer in one call: ``dw = x.T @ dz`` (BLAS)
    and ``db = dz.sum(0)``.

    Parameters
    ----------
    x : ndarray (batch, in)
        IN
    dz : ndarray (batch, out)
        IN
    dw : ndarray (in, out)
        OUT
    db : ndarray (out,)
        OUT
    """
    _ensure_blas()
    if x.dtype.itemsize == 4:
        _dense_backward[float](x, dz, dw, db)
    else:
        _dense_backward[double](x, dz, dw, db)


cdef void _gemm_typed(bint ta, bint tb,
                      const floating[:, ::1] a,   # IN (m, k), or (k, m) with ta
                      const floating[:, ::1] b,   # IN (k, n), or (n, k) with tb
                      floating[:, ::1] c):        # OUT (m, n)
    cdef int m = c.shape[0], n = c.shape[1]
    cdef int k = a.shape[0] if ta else a.shape[1]
    with nogil:
        gemm(c'T' if tb else c'N', c'T' if ta else c'N', n, m, k,
             &b[0, 0], b.shape[1], &a[0, 0], a.shape[1], &c[0, 0], n)


def _gemm(a, b, c, trans_a=False, trans_b=False):
    """The bare BLAS GEMM of this module, ``c = op(a) @ op(b)`` (``op``
    transposes when asked), with nothing around it, on the BLAS the kernels
    use: the baseline of the dense-layer goals (benchmarks/goals.py, kernels section)."""
    _ensure_blas()
    if a.dtype.itemsize == 4:
        _gemm_typed[float](trans_a, trans_b, a, b, c)
    else:
        _gemm_typed[double](trans_a, trans_b, a, b, c)


# ------------------------------------------------------------------ C entries

# What fastnn.ops' compiled gate calls once it has checked a call (``_cy_call.pxd``):
# the same functions as the kernels above, from the checked call's pointers.
from cpython.pycapsule cimport PyCapsule_New

from _cy_call cimport FASTNN_CALL_CAPSULE, fastnn_call


cdef int _entry_dense_forward(fastnn_call* c) except -1:
    # x, w, b, act, out, preact (NULL: None)
    _ensure_blas()
    cdef int m = <int>c.shape[0][0], k = <int>c.shape[0][1], n = <int>c.shape[1][1]
    with nogil:
        if c.dtype == 0:
            _dense_forward_p(c.act, <const float*>c.data[0], <const float*>c.data[1],
                             <const float*>c.data[2], <float*>c.data[4], <float*>c.data[5],
                             m, k, n)
        else:
            _dense_forward_p(c.act, <const double*>c.data[0], <const double*>c.data[1],
                             <const double*>c.data[2], <double*>c.data[4], <double*>c.data[5],
                             m, k, n)
    return 0


cdef int _entry_backprop_delta(fastnn_call* c) except -1:
    # dy, w, z, y, act, out (z or y NULL when None)
    _ensure_blas()
    cdef int m = <int>c.shape[0][0], k = <int>c.shape[0][1], n = <int>c.shape[1][0]
    with nogil:
        if c.dtype == 0:
            _backprop_delta_p(c.act, <const float*>c.data[0], <const float*>c.data[1],
                              <const float*>c.data[2], <const float*>c.data[3],
                              <float*>c.data[5], m, k, n)
        else:
            _backprop_delta_p(c.act, <const double*>c.data[0], <const double*>c.data[1],
                              <const double*>c.data[2], <const double*>c.data[3],
                              <double*>c.data[5], m, k, n)
    return 0


cdef int _entry_dense_backward(fastnn_call* c) except -1:
    # x, dz, dw, db
    _ensure_blas()
    cdef int m = <int>c.shape[0][0], k = <int>c.shape[0][1], n = <int>c.shape[1][1]
    with nogil:
        if c.dtype == 0:
            _dense_backward_p(<const float*>c.data[0], <const float*>c.data[1],
                              <float*>c.data[2], <float*>c.data[3], m, k, n)
        else:
            _dense_backward_p(<const double*>c.data[0], <const double*>c.data[1],
                              <double*>c.data[2], <double*>c.data[3], m, k, n)
    return 0


ENTRIES = {
    "dense_forward": PyCapsule_New(<void*>_entry_dense_forward, FASTNN_CALL_CAPSULE, NULL),
    "backprop_delta": PyCapsule_New(<void*>_entry_backprop_delta, FASTNN_CALL_CAPSULE, NULL),
    "dense_backward": PyCapsule_New(<void*>_entry_dense_backward, FASTNN_CALL_CAPSULE, NULL),
}
