# cython: language_level=3
"""The one BLAS GEMM wrapper of the Cython backend, shared by ``_cy_dense``
and ``_cy_conv``.

``_cy_dense`` owns the table of Fortran entry points (``blas_t``): which BLAS,
set by ``fastnn.kernels.cython_cpu`` through ``_cy_dense._set_blas``. Other
modules read that same table through a pointer (``_cy_dense._blas_table()``
hands out its address), so ``use_blas`` switches every module at once. Each
per-CPU variant of ``_cy_conv`` points at the table of the same variant's
``_cy_dense``: a cimport would bind one fixed module name.

Column-major BLAS sees row-major arrays transposed: row-major ``C = A @ B``
is ``gemm(t, 'N', 'N', n, m, k, B, n, A, k, 0, C, n)``.
"""

from cython cimport floating
from libc.stdint cimport int64_t

# Fortran ``?gemm_``, with 32-bit (LP64: SciPy's) or 64-bit integers (ILP64:
# NumPy's bundled OpenBLAS)
ctypedef void (*sgemm32_t)(const char*, const char*, const int*, const int*, const int*,
                           const float*, const float*, const int*, const float*, const int*,
                           const float*, float*, const int*) noexcept nogil
ctypedef void (*dgemm32_t)(const char*, const char*, const int*, const int*, const int*,
                           const double*, const double*, const int*, const double*,
                           const int*, const double*, double*, const int*) noexcept nogil
ctypedef void (*sgemm64_t)(const char*, const char*, const int64_t*, const int64_t*,
                           const int64_t*, const float*, const float*, const int64_t*,
                           const float*, const int64_t*, const float*, float*,
                           const int64_t*) noexcept nogil
ctypedef void (*dgemm64_t)(const char*, const char*, const int64_t*, const int64_t*,
                           const int64_t*, const double*, const double*, const int64_t*,
                           const double*, const int64_t*, const double*, double*,
                           const int64_t*) noexcept nogil
# OpenBLAS' ``openblas_set_num_threads`` / ``openblas_get_num_threads``
ctypedef void (*set_threads_t)(int) noexcept nogil
ctypedef int (*get_threads_t)() noexcept nogil
# ``_cy_dense``'s region guards (see ``blas_t.region_enter``)
ctypedef void (*region_fn_t)() noexcept nogil

ctypedef struct blas_t:
    sgemm32_t sgemm32       # LP64 entry points, or NULL
    dgemm32_t dgemm32
    sgemm64_t sgemm64       # ILP64 entry points, or NULL
    dgemm64_t dgemm64
    set_threads_t set_threads   # the library's thread count (OpenBLAS), or NULL
    get_threads_t get_threads
    # OpenBLAS' ``thread_timeout`` (cycles an idle worker spins before it
    # sleeps; an internal variable found through the library's symbol table),
    # or NULL
    unsigned int* thread_timeout
    # Called around every OpenMP region of the modules that share this table
    # (set by ``_cy_dense`` at import, one lock and one saved state for all):
    # the BLAS on one thread, OpenBLAS' idle workers asleep; restored after.
    region_fn_t region_enter
    region_fn_t region_leave


cdef inline void gemm_with(const blas_t* t, char ta, char tb, int m, int n, int k,
                           const floating* a, int lda, const floating* b, int ldb,
                           floating beta, floating* c, int ldc) noexcept nogil:
    """Column-major ``C = op(A) @ op(B) + beta*C`` (alpha 1) by the BLAS of ``t``."""
    cdef floating alpha = 1
    cdef int64_t m8 = m, n8 = n, k8 = k, lda8 = lda, ldb8 = ldb, ldc8 = ldc
    if floating is float:
        if t.sgemm64 != NULL:
            t.sgemm64(&ta, &tb, &m8, &n8, &k8, &alpha, a, &lda8, b, &ldb8, &beta, c, &ldc8)
        else:
            t.sgemm32(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc)
    else:
        if t.dgemm64 != NULL:
            t.dgemm64(&ta, &tb, &m8, &n8, &k8, &alpha, a, &lda8, b, &ldb8, &beta, c, &ldc8)
        else:
            t.dgemm32(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc)
