# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Convolution, max pooling and dropout, NHWC (Cython, OpenMP, GEMMs by BLAS).

Three ways to a convolution, chosen by its geometry:

* Winograd for 3x3 kernels at stride 1 with at least
  ``WINOGRAD_MIN_CHANNELS`` channels in and out (conv2 of Keras' MNIST
  convnet): r x r output tiles, each tile's (r+2)x(r+2) input patch
  transformed, (r+2)**2 GEMMs per chunk of tiles (``M[xi] = V[xi] @ U[xi]``,
  K = input channels), the inverse transform with bias and activation
  fused. F(4x4, 3x3) (36 GEMMs, 2.25 multiplications per output and channel
  pair instead of 9) where its products, counting the tiles that hang over
  the edge, are at most ``WINOGRAD4_RATIO`` of F(2x2, 3x3)'s (16 GEMMs, 4
  multiplications): square outputs of 3, 4, 7, 8 and 11 or more a side (an
  11x11 output: 324 products against 576, and 1,089 direct), F(2x2, 3x3) at
  1, 2, 5, 6, 9 and 10 (where 4x4 tiles would hang over most). ``dw`` is the
  adjoint of the forward pass (``S[xi] += V[xi].T @ D[xi]`` with K = tiles,
  then ``dw = G^T S G``). The delta below is the adjoint too where F(4x4)
  pays (by the same rule, the layer's output against its input): ``D = A dz
  A^T`` per tile, ``dV[xi] = D[xi] @ U[xi].T``, each tile's 6x6 patch ``+= B
  dV B^T`` into whole images owned by one thread (patches overlap), then the
  derivative of the activation below; else F(2x2, 3x3) on ``dz`` with the
  kernel flipped and channels swapped, the derivative fused into its inverse
  transform. Measured at conv2's shapes (batch 32 and 128, 2 threads),
  F(4x4) against F(2x2): the forward pass 0.70-0.80x the time, dw 0.81-0.86x,
  the delta 0.53-0.72x (the adjoint has the forward pass's 9 tiles of 4x4
  per image; F(2x2) on dz needs 49 of 2x2 for the 13x13 input).
  Rounding in float32, measured against float64 at conv2's shapes (largest
  error relative to the largest output): F(2x2, 3x3) 0.35-0.55x im2col's
  error in the forward pass, 1.0-1.6x in ``dw``, 1.4-2.0x in the delta, at
  most 1e-6 of the largest output; F(4x4, 3x3) 3-7x, 5-17x and 6-8x (8-23x
  with OpenBLAS's Haswell kernels, ``OPENBLAS_CORETYPE=Haswell``), at
  most 6.2e-6 of the largest output (its transforms multiply by up to 8 and
  1/24). That is within the parity tolerance (``rtol`` 1e-5, ``atol`` 1e-6
  per term of the sum) for data at unit scale, but not for inputs spread
  over six decades or weights ten times their initialisation scale, where
  the error follows the largest output (``tests/test_cython.py``:
  ``test_winograd_rounding``, ``WINO4_REL`` in ``tests/conftest.py``).
  float64 keeps 4e-14 of the largest output; it is the path for a caller
  who needs im2col's rounding.
* A register-blocked loop of our own where the column width ``K = kh*kw*c``
  is at most ``DIRECT_MAX_K`` (conv1: ``K = 9``, where a GEMM runs far below
  its peak): 8 output pixels by 16 channels of accumulators (GCC vector
  extensions: one AVX-512 register a row in float32), multiply then add,
  ``k`` in order, so every CPU variant gives the same bits; it reads the
  columns from ``x`` itself (a table of offsets) where the windows lie inside
  the image, from im2col rows at the borders. ``dw`` likewise, 16 channels
  by up to 12 rows of ``dw`` in registers, ``db`` summed in float64 in the
  same pass over ``dz``.
* Otherwise im2col GEMMs, never materialised for the whole batch: chunks of
  about ``CHUNK_BYTES`` of columns written into a per-thread workspace, one
  GEMM per chunk, finished while in cache (forward: bias and activation;
  ``dw``: ``beta = 1`` after the first chunk; delta below: col2im into whole
  images owned by one thread, then the derivative). A 1x1 kernel at stride 1
  without padding reads ``x`` as its columns.

Threads: above ``PAR_MIN_FLOPS`` (multiply-adds) the work is cut into blocks
(rows, chunks, tiles, images) handed to the OpenMP threads as they come free
(``schedule(dynamic)``: a thread that shares its core with another process
takes fewer), each running its GEMMs on one BLAS thread. ``dw`` and ``db``
are summed in units (``DW_UNITS``) whose count depends on the geometry only,
each into its own buffer, then added in unit order: the same bits on 1 to
16 threads. Around every parallel region OpenBLAS is set to one thread and
its idle workers are sent to sleep (``_cy_dense``'s ``fnn_region_enter``:
after a GEMM an OpenBLAS worker spins for about 0.1 s, so a region right
after the dense layer's GEMMs shared a core with it); both are restored
afterwards.

Workspace: one buffer per calling Python thread (``threading.local``),
grown to the largest size asked for and reused, sliced per OpenMP thread and
per unit; so a training step allocates nothing after its first batch.

Max pooling: one pass over the windows' rows, the channel loop vectorized
with selects (NaN wins; the first maximum on ties; bit for bit the
reference); its backward pass writes each input row once (windows that do
not overlap; the ReLU derivative in the same pass) or adds in the
reference's order (windows that overlap), then multiplies the derivative of
the activation below while the row is in cache.

Dropout: the splitmix64 hash of each element's index computed in the loop
that applies the mask (vectorized in uint64), so no mask is stored and the
mask is the reference's bit for bit.

Inputs are trusted: ``fastnn._validate`` checks them first.
"""

import threading

import numpy as np

from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.math cimport floor
from libc.stdint cimport int32_t, uint64_t, uintptr_t
from libc.string cimport memcpy, memset

from _cy_blas cimport blas_t, gemm_with
from _cy_math cimport (
    ACT_RELU, FASTNN_OPENMP, act_backward_range, act_code, act_forward_range, bias_act_rows,
    chunk_step, n_chunks,
)

cdef extern from *:
    """
    #include <string.h>
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
    /* z[r*ldz + l] = b[l] + sum_k c(r, k) * w[k*ldw + l] for r < rows (<= 8) and    \
       l < lanes (<= 16): the sum first, in k order, then the bias; the column     \
       element c(r, k) = src[r*rs + off[k]] (off NULL: src[r*rs + k]) */          \
    static inline __attribute__((always_inline)) void fnn_fwd_tile_##SUF(              \
            const T* src, Py_ssize_t rs, const Py_ssize_t* off, Py_ssize_t K,         \
            const T* w, Py_ssize_t ldw, const T* b, T* z, Py_ssize_t ldz, int rows,   \
            int lanes) {                                                               \
        V a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0}; \
        V bv = {0};                                                                    \
        T buf[16];                                                                     \
        for (Py_ssize_t k = 0; k < K; k++) {                                           \
            V wv;                                                                      \
            __builtin_memcpy(&wv, w + k * ldw, sizeof(V));                             \
            const T* c = src + (off ? off[k] : k);                                     \
            a0 = a0 + c[0] * wv; a1 = a1 + c[rs] * wv;                                 \
            a2 = a2 + c[2 * rs] * wv; a3 = a3 + c[3 * rs] * wv;                        \
            a4 = a4 + c[4 * rs] * wv; a5 = a5 + c[5 * rs] * wv;                        \
            a6 = a6 + c[6 * rs] * wv; a7 = a7 + c[7 * rs] * wv;                        \
        }                                                                              \
        if (lanes == 16 && rows == 8) {                                                \
            __builtin_memcpy(&bv, b, sizeof(V));                                       \
            a0 = a0 + bv; a1 = a1 + bv; a2 = a2 + bv; a3 = a3 + bv;                    \
            a4 = a4 + bv; a5 = a5 + bv; a6 = a6 + bv; a7 = a7 + bv;                    \
            __builtin_memcpy(z, &a0, sizeof(V)); __builtin_memcpy(z + ldz, &a1, sizeof(V)); \
            __builtin_memcpy(z + 2 * ldz, &a2, sizeof(V)); __builtin_memcpy(z + 3 * ldz, &a3, sizeof(V)); \
            __builtin_memcpy(z + 4 * ldz, &a4, sizeof(V)); __builtin_memcpy(z + 5 * ldz, &a5, sizeof(V)); \
            __builtin_memcpy(z + 6 * ldz, &a6, sizeof(V)); __builtin_memcpy(z + 7 * ldz, &a7, sizeof(V)); \
            return;                                                                    \
        }                                                                              \
        V acc[8] = {a0, a1, a2, a3, a4, a5, a6, a7};                                   \
        for (int r = 0; r < rows; r++) {                                               \
            __builtin_memcpy(buf, &acc[r], sizeof(V));                                 \
            for (int l = 0; l < lanes; l++) z[r * ldz + l] = buf[l] + b[l];            \
        }                                                                              \
    }                                                                                  \
    /* acc[kk*ldacc + 0:16] += sum_r c(r, kk) * dz[r*ldz + 0:16], kk < KB, rows in    \
       order; c(r, kk) = src[r*rs + off[kk]] (off NULL: src[r*rs + kk]) */           \
    static inline __attribute__((always_inline)) void fnn_dw_block_##SUF(              \
            const T* src, Py_ssize_t rs, const Py_ssize_t* off, const T* dz,          \
            Py_ssize_t ldz, Py_ssize_t rows, T* acc, Py_ssize_t ldacc, const int KB) { \
        V a[12];                                                                       \
        Py_ssize_t ok[12];                                                             \
        for (int kk = 0; kk < KB; kk++) {                                              \
            __builtin_memcpy(&a[kk], acc + kk * ldacc, sizeof(V));                     \
            ok[kk] = off ? off[kk] : kk;                                               \
        }                                                                              \
        for (Py_ssize_t r = 0; r < rows; r++) {                                        \
            V d;                                                                       \
            __builtin_memcpy(&d, dz + r * ldz, sizeof(V));                             \
            const T* c = src + r * rs;                                                 \
            for (int kk = 0; kk < KB; kk++) a[kk] = a[kk] + c[ok[kk]] * d;             \
        }                                                                              \
        for (int kk = 0; kk < KB; kk++) __builtin_memcpy(acc + kk * ldacc, &a[kk], sizeof(V)); \
    }                                                                                  \
    /* the same for any KB in 1..12, each a block with its accumulators in registers */ \
    static void fnn_dw_tile_##SUF(const T* src, Py_ssize_t rs, const Py_ssize_t* off,  \
                                  const T* dz, Py_ssize_t ldz, Py_ssize_t rows, T* acc, \
                                  Py_ssize_t ldacc, int KB) {                          \
        switch (KB) {                                                                  \
        case 1: fnn_dw_block_##SUF(src, rs, off, dz, ldz, rows, acc, ldacc, 1); break; \
        case 2: fnn_dw_block_##SUF(src, rs, off, dz, ldz, rows, acc, ldacc, 2); break; \
        case 3: fnn_dw_block_##SUF(src, rs, off, dz, ldz, rows, acc, ldacc, 3); break; \
        case 4: fnn_dw_block_##SUF(src, rs, off, dz, ldz, rows, acc, ldacc, 4); break; \
        case 5: fnn_dw_block_##SUF(src, rs, off, dz, ldz, rows, acc, ldacc, 5); break; \
        case 6: fnn_dw_block_##SUF(src, rs, off, dz, ldz, rows, acc, ldacc, 6); break; \
        case 7: fnn_dw_block_##SUF(src, rs, off, dz, ldz, rows, acc, ldacc, 7); break; \
        case 8: fnn_dw_block_##SUF(src, rs, off, dz, ldz, rows, acc, ldacc, 8); break; \
        case 9: fnn_dw_block_##SUF(src, rs, off, dz, ldz, rows, acc, ldacc, 9); break; \
        case 10: fnn_dw_block_##SUF(src, rs, off, dz, ldz, rows, acc, ldacc, 10); break; \
        case 11: fnn_dw_block_##SUF(src, rs, off, dz, ldz, rows, acc, ldacc, 11); break; \
        default: fnn_dw_block_##SUF(src, rs, off, dz, ldz, rows, acc, ldacc, 12); break; \
        }                                                                              \
    }
    #else
    #define FNN_TILES(T, V, SUF)                                                        \
    static void fnn_fwd_tile_##SUF(const T* src, Py_ssize_t rs, const Py_ssize_t* off, \
                                   Py_ssize_t K, const T* w, Py_ssize_t ldw, const T* b, \
                                   T* z, Py_ssize_t ldz, int rows, int lanes) {        \
        for (int r = 0; r < rows; r++)                                                 \
            for (int l = 0; l < lanes; l++) {                                          \
                T acc = 0;                                                             \
                for (Py_ssize_t k = 0; k < K; k++)                                     \
                    acc = acc + src[r * rs + (off ? off[k] : k)] * w[k * ldw + l];     \
                z[r * ldz + l] = acc + b[l];                                           \
            }                                                                          \
    }                                                                                  \
    static void fnn_dw_tile_##SUF(const T* src, Py_ssize_t rs, const Py_ssize_t* off,  \
                                  const T* dz, Py_ssize_t ldz, Py_ssize_t rows, T* acc, \
                                  Py_ssize_t ldacc, int KB) {                          \
        for (Py_ssize_t r = 0; r < rows; r++)                                          \
            for (int kk = 0; kk < KB; kk++)                                            \
                for (int l = 0; l < 16; l++)                                           \
                    acc[kk * ldacc + l] = acc[kk * ldacc + l]                          \
                        + src[r * rs + (off ? off[kk] : kk)] * dz[r * ldz + l];        \
    }
    #endif
    FNN_TILES(float, fnn_vf, f)
    FNN_TILES(double, fnn_vd, d)

    /* Max pooling of one output pixel: out[c] = max over the window's KK
       elements s0[koff[k] + c] (k in row-major window order), am[c] = the first
       k that reached it; a NaN wins (the first NaN). 16 channels at a time with
       the maximum and its index in registers. */
    #if defined(__GNUC__)
    typedef int fnn_vi __attribute__((vector_size(64)));
    typedef long long fnn_vl __attribute__((vector_size(128)));
    #define FNN_POOL(T, V, M, SUF, TOI)                                                 \
    static void fnn_pool_px_##SUF(const T* s0, const Py_ssize_t* koff, int KK,          \
                                  Py_ssize_t C, T* out, int* am) {                     \
        Py_ssize_t c = 0;                                                              \
        for (; c + 16 <= C; c += 16) {                                                 \
            V cur, v;                                                                  \
            M idx = {0}, vb, cb, take;                                                 \
            __builtin_memcpy(&cur, s0 + c, sizeof(V));                                 \
            for (int k = 1; k < KK; k++) {                                             \
                __builtin_memcpy(&v, s0 + koff[k] + c, sizeof(V));                     \
                take = ~(v <= cur) & (cur == cur);                                     \
                __builtin_memcpy(&vb, &v, sizeof(V));                                  \
                __builtin_memcpy(&cb, &cur, sizeof(V));                                \
                cb = (vb & take) | (cb & ~take);                                       \
                __builtin_memcpy(&cur, &cb, sizeof(V));                                \
                idx = ((idx * 0 + k) & take) | (idx & ~take);                          \
            }                                                                          \
            __builtin_memcpy(out + c, &cur, sizeof(V));                                \
            fnn_vi ii = TOI(idx);                                                      \
            __builtin_memcpy(am + c, &ii, sizeof(fnn_vi));                             \
        }                                                                              \
        for (; c < C; c++) {                                                           \
            T cur = s0[c];                                                             \
            int idx = 0;                                                               \
            for (int k = 1; k < KK; k++) {                                             \
                T v = s0[koff[k] + c];                                                 \
                int take = !(v <= cur) && (cur == cur);                                \
                cur = take ? v : cur;                                                  \
                idx = take ? k : idx;                                                  \
            }                                                                          \
            out[c] = cur;                                                              \
            am[c] = idx;                                                               \
        }                                                                              \
    }
    #define FNN_TOI_F(x) (x)
    #define FNN_TOI_D(x) __builtin_convertvector((x), fnn_vi)
    FNN_POOL(float, fnn_vf, fnn_vi, f, FNN_TOI_F)
    FNN_POOL(double, fnn_vd, fnn_vl, d, FNN_TOI_D)
    /* One input pixel of the pooling gradient whose window chose index k:
       o[c] = (am[c] == k ? 0 + d[c] : 0), times (y[c] > 0 ? 1 : 0) when y
       (ReLU below), 16 channels at a time */
    #define FNN_POOLB(T, V, M, SUF, TOM)                                                \
    static void fnn_pool_back_px_##SUF(const T* d, const int* am, int k, const T* y,    \
                                       Py_ssize_t C, T* o) {                           \
        Py_ssize_t c = 0;                                                              \
        const V zero = {0}, one = zero + 1;                                            \
        for (; c + 16 <= C; c += 16) {                                                 \
            V dv, g, yv, f;                                                            \
            M bits, mask, fb;                                                          \
            fnn_vi a;                                                                  \
            __builtin_memcpy(&dv, d + c, sizeof(V));                                   \
            __builtin_memcpy(&a, am + c, sizeof(fnn_vi));                              \
            g = zero + dv;                                                             \
            __builtin_memcpy(&bits, &g, sizeof(V));                                    \
            bits &= TOM(a == k);                       /* chosen: 0 + d, else +0 */    \
            __builtin_memcpy(&g, &bits, sizeof(V));                                    \
            if (y) {                                                                   \
                __builtin_memcpy(&yv, y + c, sizeof(V));                               \
                mask = yv > zero;                                                      \
                __builtin_memcpy(&fb, &one, sizeof(V));                                \
                fb &= mask;                            /* 1 where y > 0, else 0 */     \
                __builtin_memcpy(&f, &fb, sizeof(V));                                  \
                g = g * f;                                                             \
            }                                                                          \
            __builtin_memcpy(o + c, &g, sizeof(V));                                    \
        }                                                                              \
        for (; c < C; c++) {                                                           \
            T g = am[c] == k ? (T)0 + d[c] : (T)0;                                     \
            o[c] = y ? g * (y[c] > 0 ? (T)1 : (T)0) : g;                               \
        }                                                                              \
    }
    #define FNN_TOM_F(m) (m)
    #define FNN_TOM_D(m) __builtin_convertvector((m), fnn_vl)
    FNN_POOLB(float, fnn_vf, fnn_vi, f, FNN_TOM_F)
    FNN_POOLB(double, fnn_vd, fnn_vl, d, FNN_TOM_D)
    #else
    #define FNN_POOL(T, SUF)                                                            \
    static void fnn_pool_px_##SUF(const T* s0, const Py_ssize_t* koff, int KK,          \
                                  Py_ssize_t C, T* out, int* am) {                     \
        for (Py_ssize_t c = 0; c < C; c++) {                                           \
            T cur = s0[c];                                                             \
            int idx = 0;                                                               \
            for (int k = 1; k < KK; k++) {                                             \
                T v = s0[koff[k] + c];                                                 \
                int take = !(v <= cur) && (cur == cur);                                \
                cur = take ? v : cur;                                                  \
                idx = take ? k : idx;                                                  \
            }                                                                          \
            out[c] = cur;                                                              \
            am[c] = idx;                                                               \
        }                                                                              \
    }
    FNN_POOL(float, f)
    FNN_POOL(double, d)
    #define FNN_POOLB(T, SUF)                                                           \
    static void fnn_pool_back_px_##SUF(const T* d, const int* am, int k, const T* y,    \
                                       Py_ssize_t C, T* o) {                           \
        for (Py_ssize_t c = 0; c < C; c++) {                                           \
            T g = am[c] == k ? (T)0 + d[c] : (T)0;                                     \
            o[c] = y ? g * (y[c] > 0 ? (T)1 : (T)0) : g;                               \
        }                                                                              \
    }
    FNN_POOLB(float, f)
    FNN_POOLB(double, d)
    #endif

    /* acc[o] += sum_r d[r*ld + o] in float64, rows in order, eight columns at a
       time with the partial sums in registers (a loop over rows that loads
       and stores acc each time is bound by store-to-load latency) */
    #define FNN_COLSUM(T, SUF)                                                          \
    static void fnn_colsum_##SUF(const T* d, Py_ssize_t ld, Py_ssize_t rows, Py_ssize_t O, \
                                 double* acc) {                                        \
        Py_ssize_t o = 0, r;                                                           \
        for (; o + 32 <= O; o += 32) {                                                 \
            double a[32];                                                              \
            for (int k = 0; k < 32; k++) a[k] = acc[o + k];                            \
            for (r = 0; r < rows; r++) {                                               \
                const T* x = d + r * ld + o;                                           \
                for (int k = 0; k < 32; k++) a[k] += (double)x[k];                     \
            }                                                                          \
            for (int k = 0; k < 32; k++) acc[o + k] = a[k];                            \
        }                                                                              \
        for (; o + 8 <= O; o += 8) {                                                   \
            double a[8];                                                               \
            for (int k = 0; k < 8; k++) a[k] = acc[o + k];                             \
            for (r = 0; r < rows; r++) {                                               \
                const T* x = d + r * ld + o;                                           \
                for (int k = 0; k < 8; k++) a[k] += (double)x[k];                      \
            }                                                                          \
            for (int k = 0; k < 8; k++) acc[o + k] = a[k];                             \
        }                                                                              \
        for (; o < O; o++) {                                                           \
            double a = acc[o];                                                         \
            for (r = 0; r < rows; r++) a += (double)d[r * ld + o];                     \
            acc[o] = a;                                                                \
        }                                                                              \
    }
    FNN_COLSUM(float, f)
    FNN_COLSUM(double, d)

    /* n elements (n < 16 the common case: a row segment of a narrow im2col)
       copied with fixed-size moves instead of a library call */
    #define FNN_CP(T, N) case N: memcpy(d, s, N * sizeof(T)); break;
    #define FNN_COPY(T, SUF)                                                            \
    static inline void fnn_copy_##SUF(T* d, const T* s, Py_ssize_t n) {                \
        switch (n) {                                                                   \
        FNN_CP(T, 1) FNN_CP(T, 2) FNN_CP(T, 3) FNN_CP(T, 4) FNN_CP(T, 5) FNN_CP(T, 6)   \
        FNN_CP(T, 7) FNN_CP(T, 8) FNN_CP(T, 9) FNN_CP(T, 10) FNN_CP(T, 11)             \
        FNN_CP(T, 12) FNN_CP(T, 13) FNN_CP(T, 14) FNN_CP(T, 15) FNN_CP(T, 16)          \
        default: memcpy(d, s, (size_t)n * sizeof(T));                                  \
        }                                                                              \
    }
    FNN_COPY(float, f)
    FNN_COPY(double, d)

    /* Winograd F(2x2, 3x3) transforms (Lavin & Gray 2016), one channel vector
       at a time (the channel loop vectorizes; NHWC keeps it contiguous):
       input  V = B^T d B,  B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]
       output Y = A^T M A,  A^T = [1 1 1 0; 0 1 -1 -1]
       dz     D = A g A^T   (the adjoint of the output transform, for dw)
       plane: the distance between the 16 matrices xi = 4*i + j. */
    #if defined(__GNUC__)
    #define FNN_RESTRICT __restrict__
    #else
    #define FNN_RESTRICT
    #endif
    /* the 16 streams of a transform never overlap its outputs: without this
       GCC gives up on the 17 pointers and runs the loops scalar (measured: the
       input transform took 56% of a Winograd conv2d_backprop) */
    #if defined(__clang__)
    #define FNN_IVDEP _Pragma("clang loop vectorize(assume_safety)")
    #elif defined(__GNUC__)
    #define FNN_IVDEP _Pragma("GCC ivdep")
    #else
    #define FNN_IVDEP
    #endif
    #define FNN_WINO(T, SUF)                                                            \
    static void fnn_wino_in_##SUF(const T* const* p, Py_ssize_t C, T* FNN_RESTRICT v,  \
                                  Py_ssize_t plane) {                                  \
        const T *p0 = p[0], *p1 = p[1], *p2 = p[2], *p3 = p[3], *p4 = p[4], *p5 = p[5], \
                *p6 = p[6], *p7 = p[7], *p8 = p[8], *p9 = p[9], *p10 = p[10],          \
                *p11 = p[11], *p12 = p[12], *p13 = p[13], *p14 = p[14], *p15 = p[15];  \
        FNN_IVDEP for (Py_ssize_t c = 0; c < C; c++) {                                 \
            T t00 = p0[c] - p8[c], t01 = p1[c] - p9[c], t02 = p2[c] - p10[c], t03 = p3[c] - p11[c]; \
            T t10 = p4[c] + p8[c], t11 = p5[c] + p9[c], t12 = p6[c] + p10[c], t13 = p7[c] + p11[c]; \
            T t20 = p8[c] - p4[c], t21 = p9[c] - p5[c], t22 = p10[c] - p6[c], t23 = p11[c] - p7[c]; \
            T t30 = p4[c] - p12[c], t31 = p5[c] - p13[c], t32 = p6[c] - p14[c], t33 = p7[c] - p15[c]; \
            v[c] = t00 - t02; v[plane + c] = t01 + t02;                                \
            v[2 * plane + c] = t02 - t01; v[3 * plane + c] = t01 - t03;                \
            v[4 * plane + c] = t10 - t12; v[5 * plane + c] = t11 + t12;                \
            v[6 * plane + c] = t12 - t11; v[7 * plane + c] = t11 - t13;                \
            v[8 * plane + c] = t20 - t22; v[9 * plane + c] = t21 + t22;                \
            v[10 * plane + c] = t22 - t21; v[11 * plane + c] = t21 - t23;              \
            v[12 * plane + c] = t30 - t32; v[13 * plane + c] = t31 + t32;              \
            v[14 * plane + c] = t32 - t31; v[15 * plane + c] = t31 - t33;              \
        }                                                                              \
    }                                                                                  \
    /* y0 = Y[0][0], y1 = Y[0][1], y2 = Y[1][0], y3 = Y[1][1] (+ b[o] when b) */      \
    static void fnn_wino_out_##SUF(const T* FNN_RESTRICT m, Py_ssize_t plane, Py_ssize_t O, \
                                   const T* b, T* FNN_RESTRICT y0, T* FNN_RESTRICT y1, \
                                   T* FNN_RESTRICT y2, T* FNN_RESTRICT y3) {          \
        FNN_IVDEP for (Py_ssize_t o = 0; o < O; o++) {                                 \
            T r00 = (m[o] + m[4 * plane + o]) + m[8 * plane + o];                      \
            T r01 = (m[plane + o] + m[5 * plane + o]) + m[9 * plane + o];              \
            T r02 = (m[2 * plane + o] + m[6 * plane + o]) + m[10 * plane + o];         \
            T r03 = (m[3 * plane + o] + m[7 * plane + o]) + m[11 * plane + o];         \
            T r10 = (m[4 * plane + o] - m[8 * plane + o]) - m[12 * plane + o];         \
            T r11 = (m[5 * plane + o] - m[9 * plane + o]) - m[13 * plane + o];         \
            T r12 = (m[6 * plane + o] - m[10 * plane + o]) - m[14 * plane + o];        \
            T r13 = (m[7 * plane + o] - m[11 * plane + o]) - m[15 * plane + o];        \
            T a = (r00 + r01) + r02, c = (r01 - r02) - r03;                            \
            T d = (r10 + r11) + r12, e = (r11 - r12) - r13;                            \
            if (b) { T bo = b[o]; a = a + bo; c = c + bo; d = d + bo; e = e + bo; }  \
            y0[o] = a; y1[o] = c; y2[o] = d; y3[o] = e;                                \
        }                                                                              \
    }                                                                                  \
    /* g0 = dz(y, x), g1 = dz(y, x+1), g2 = dz(y+1, x), g3 = dz(y+1, x+1); db += all four */ \
    static void fnn_wino_dz_##SUF(const T* g0, const T* g1, const T* g2, const T* g3,  \
                                  Py_ssize_t O, T* FNN_RESTRICT d, Py_ssize_t plane,   \
                                  double* FNN_RESTRICT db) {                           \
        FNN_IVDEP for (Py_ssize_t o = 0; o < O; o++) {                                 \
            T a = g0[o], b = g1[o], c = g2[o], e = g3[o];                              \
            T t1 = a + c, t2 = a - c, t3 = -c, u1 = b + e, u2 = b - e, u3 = -e;        \
            d[o] = a; d[plane + o] = a + b; d[2 * plane + o] = a - b; d[3 * plane + o] = -b; \
            d[4 * plane + o] = t1; d[5 * plane + o] = t1 + u1;                         \
            d[6 * plane + o] = t1 - u1; d[7 * plane + o] = -u1;                        \
            d[8 * plane + o] = t2; d[9 * plane + o] = t2 + u2;                         \
            d[10 * plane + o] = t2 - u2; d[11 * plane + o] = -u2;                      \
            d[12 * plane + o] = t3; d[13 * plane + o] = t3 + u3;                       \
            d[14 * plane + o] = t3 - u3; d[15 * plane + o] = -u3;                      \
            db[o] += (((double)a + (double)b) + (double)c) + (double)e;                \
        }                                                                              \
    }
    FNN_WINO(float, f)
    FNN_WINO(double, d)
    /* U[xi][c][o] = (G g G^T)[xi], G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1], for
       g[i][j] = w[i][j][c][o], or w[2-i][2-j][c][o] with flip */
    #define FNN_WKER(T, SUF)                                                            \
    static void fnn_wino_kernel_##SUF(const T* w, Py_ssize_t C, Py_ssize_t O, int flip,\
                                      T* FNN_RESTRICT u) {                             \
        const Py_ssize_t CO = C * O;                                                   \
        const T half = 0.5;                                                            \
        for (Py_ssize_t c = 0; c < C; c++) {                                           \
            const T* g[9];                                                             \
            for (int t = 0; t < 9; t++) g[t] = w + (flip ? 8 - t : t) * CO + c * O;    \
            const T *g0 = g[0], *g1 = g[1], *g2 = g[2], *g3 = g[3], *g4 = g[4],       \
                    *g5 = g[5], *g6 = g[6], *g7 = g[7], *g8 = g[8];                    \
            T* v = u + c * O;                                                          \
            FNN_IVDEP for (Py_ssize_t o = 0; o < O; o++) {                             \
                T t[4][3];                                                             \
                t[0][0] = g0[o]; t[0][1] = g1[o]; t[0][2] = g2[o];                     \
                t[1][0] = ((g0[o] + g3[o]) + g6[o]) * half;                            \
                t[1][1] = ((g1[o] + g4[o]) + g7[o]) * half;                            \
                t[1][2] = ((g2[o] + g5[o]) + g8[o]) * half;                            \
                t[2][0] = ((g0[o] - g3[o]) + g6[o]) * half;                            \
                t[2][1] = ((g1[o] - g4[o]) + g7[o]) * half;                            \
                t[2][2] = ((g2[o] - g5[o]) + g8[o]) * half;                            \
                t[3][0] = g6[o]; t[3][1] = g7[o]; t[3][2] = g8[o];                     \
                for (int a = 0; a < 4; a++) {                                          \
                    v[(4 * a) * CO + o] = t[a][0];                                     \
                    v[(4 * a + 1) * CO + o] = ((t[a][0] + t[a][1]) + t[a][2]) * half;  \
                    v[(4 * a + 2) * CO + o] = ((t[a][0] - t[a][1]) + t[a][2]) * half;  \
                    v[(4 * a + 3) * CO + o] = t[a][2];                                 \
                }                                                                      \
            }                                                                          \
        }                                                                              \
    }                                                                                  \
    /* dst[xi][o][c] = src[xi][c][o] for xi < planes, in 8x8 blocks */                 \
    static void fnn_transpose_planes_##SUF(const T* src, Py_ssize_t planes, Py_ssize_t C, \
                                           Py_ssize_t O, T* FNN_RESTRICT dst) {        \
        for (Py_ssize_t xi = 0; xi < planes; xi++)                                     \
            for (Py_ssize_t c0 = 0; c0 < C; c0 += 8)                                   \
                for (Py_ssize_t o0 = 0; o0 < O; o0 += 8)                               \
                    for (Py_ssize_t c = c0; c < c0 + 8 && c < C; c++)                  \
                        for (Py_ssize_t o = o0; o < o0 + 8 && o < O; o++)              \
                            dst[(xi * O + o) * C + c] = src[(xi * C + c) * O + o];     \
    }
    FNN_WKER(float, f)
    FNN_WKER(double, d)
    /* dw[i][j][k] = (G^T S[:, k] G)[i][j], G^T = [1 .5 .5 0; 0 .5 -.5 0; 0 .5 .5 1],
       for the n channel pairs k (S: 16 planes of n, dw: 9 planes of n) */
    #define FNN_WDWOUT(T, SUF)                                                          \
    static void fnn_wino_dw_out_##SUF(const T* s, Py_ssize_t n, T* FNN_RESTRICT dw) {  \
        const T half = 0.5;                                                            \
        FNN_IVDEP for (Py_ssize_t k = 0; k < n; k++) {                                 \
            T t[3][4];                                                                 \
            for (int a = 0; a < 4; a++) {                                              \
                T s0 = s[a * n + k], s1 = s[(4 + a) * n + k];                          \
                T s2 = s[(8 + a) * n + k], s3 = s[(12 + a) * n + k];                   \
                t[0][a] = s0 + (s1 + s2) * half;                                       \
                t[1][a] = (s1 - s2) * half;                                            \
                t[2][a] = (s1 + s2) * half + s3;                                       \
            }                                                                          \
            for (int a = 0; a < 3; a++) {                                              \
                dw[(3 * a) * n + k] = t[a][0] + (t[a][1] + t[a][2]) * half;            \
                dw[(3 * a + 1) * n + k] = (t[a][1] - t[a][2]) * half;                  \
                dw[(3 * a + 2) * n + k] = (t[a][1] + t[a][2]) * half + t[a][3];        \
            }                                                                          \
        }                                                                              \
    }
    FNN_WDWOUT(float, f)
    FNN_WDWOUT(double, d)

    /* Winograd F(4x4, 3x3) (Lavin & Gray 2016): 4x4 output tiles from 6x6
       input patches, 36 planes xi = 6*i + j.
       B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0;
              0 2 -1 -2 1 0; 0 4 0 -5 0 1]
       G   = [1/4 0 0; -1/6 -1/6 -1/6; -1/6 1/6 -1/6; 1/24 1/12 1/6;
              1/24 -1/12 1/6; 0 0 1]
       A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1]
       Each 2-D transform is two passes of a 1-D one over channel vectors
       (along the rows into a scratch of 36 vectors, then down the columns):
       straight loops over the channels that GCC vectorizes. */
    #define FNN_WINO4(T, SUF)                                                           \
    /* o_k = (B^T a)_k, six vectors a to six o */                                      \
    static inline void fnn_bt6_##SUF(const T* const* a, T* const* o, Py_ssize_t n) {   \
        const T *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5]; \
        T *o0 = o[0], *o1 = o[1], *o2 = o[2], *o3 = o[3], *o4 = o[4], *o5 = o[5];      \
        const T four = 4, five = 5, two = 2;                                           \
        FNN_IVDEP for (Py_ssize_t c = 0; c < n; c++) {                                 \
            T v0 = a0[c], v1 = a1[c], v2 = a2[c], v3 = a3[c], v4 = a4[c], v5 = a5[c];  \
            o0[c] = (four * v0 - five * v2) + v4;                                      \
            o1[c] = (v3 + v4) - four * (v1 + v2);                                      \
            o2[c] = four * (v1 - v2) + (v4 - v3);                                      \
            o3[c] = two * (v3 - v1) + (v4 - v2);                                       \
            o4[c] = two * (v1 - v3) + (v4 - v2);                                       \
            o5[c] = (four * v1 - five * v3) + v5;                                      \
        }                                                                              \
    }                                                                                  \
    /* o_k = (A^T a)_k (+ b), six vectors a to four o */                               \
    static inline void fnn_at6_##SUF(const T* const* a, T* const* o, Py_ssize_t n,     \
                                     const T* b) {                                     \
        const T *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5]; \
        T *o0 = o[0], *o1 = o[1], *o2 = o[2], *o3 = o[3];                              \
        const T two = 2, four = 4, eight = 8;                                          \
        FNN_IVDEP for (Py_ssize_t c = 0; c < n; c++) {                                 \
            T s12 = a1[c] + a2[c], d12 = a1[c] - a2[c];                                \
            T s34 = a3[c] + a4[c], d34 = a3[c] - a4[c];                                \
            T y0 = (a0[c] + s12) + s34, y1 = d12 + two * d34;                          \
            T y2 = s12 + four * s34, y3 = (d12 + eight * d34) + a5[c];                 \
            if (b) { T bc = b[c]; y0 = y0 + bc; y1 = y1 + bc; y2 = y2 + bc; y3 = y3 + bc; } \
            o0[c] = y0; o1[c] = y1; o2[c] = y2; o3[c] = y3;                            \
        }                                                                              \
    }                                                                                  \
    /* o_k = (A a)_k, four vectors a to six o (the adjoint of A^T) */                  \
    static inline void fnn_a6_##SUF(const T* const* a, T* const* o, Py_ssize_t n) {    \
        const T *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];                        \
        T *o0 = o[0], *o1 = o[1], *o2 = o[2], *o3 = o[3], *o4 = o[4], *o5 = o[5];      \
        const T two = 2, four = 4, eight = 8;                                          \
        FNN_IVDEP for (Py_ssize_t c = 0; c < n; c++) {                                 \
            T v0 = a0[c], v1 = a1[c], v2 = a2[c], v3 = a3[c];                          \
            T s02 = v0 + v2, s13 = v1 + v3;                                            \
            T f02 = v0 + four * v2, f13 = two * v1 + eight * v3;                       \
            o0[c] = v0; o1[c] = s02 + s13; o2[c] = s02 - s13;                          \
            o3[c] = f02 + f13; o4[c] = f02 - f13; o5[c] = v3;                          \
        }                                                                              \
    }                                                                                  \
    /* o_i += (B a)_i = sum_l B^T[l][i] a_l, six vectors a added into six o (the
       adjoint of fnn_bt6) */                                                       \
    static inline void fnn_b6_add_##SUF(const T* const* a, T* const* o, Py_ssize_t n) { \
        const T *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5]; \
        T *o0 = o[0], *o1 = o[1], *o2 = o[2], *o3 = o[3], *o4 = o[4], *o5 = o[5];      \
        const T four = 4, five = 5, two = 2;                                           \
        FNN_IVDEP for (Py_ssize_t c = 0; c < n; c++) {                                 \
            T v0 = a0[c], v1 = a1[c], v2 = a2[c], v3 = a3[c], v4 = a4[c], v5 = a5[c];  \
            o0[c] += four * v0;                                                        \
            o1[c] += (four * (v2 - v1) + two * (v4 - v3)) + four * v5;                 \
            o2[c] += (-five * v0 - four * (v1 + v2)) - (v3 + v4);                      \
            o3[c] += ((v1 - v2) + two * (v3 - v4)) - five * v5;                        \
            o4[c] += (v0 + (v1 + v2)) + (v3 + v4);                                     \
            o5[c] += v5;                                                               \
        }                                                                              \
    }                                                                                  \
    /* p[6i + j] += (B dV B^T)[i][j] for one tile: the adjoint of fnn_wino4_in (dV's  \
       plane xi at v + xi*plane; p: the patch's 36 vectors in dx, a sink outside the \
       image); tmp 36*C, zeroed here */                                                \
    static void fnn_wino4_in_adj_##SUF(const T* v, Py_ssize_t plane, Py_ssize_t C,     \
                                       T* const* p, T* tmp) {                          \
        const T* a[6]; T* o[6];                                                        \
        memset(tmp, 0, (size_t)(36 * C) * sizeof(T));                                  \
        for (int l = 0; l < 6; l++) {                                                  \
            for (int k = 0; k < 6; k++) a[k] = v + (6 * l + k) * plane;                \
            for (int j = 0; j < 6; j++) o[j] = tmp + (6 * l + j) * C;                  \
            fnn_b6_add_##SUF(a, o, C);                                                 \
        }                                                                              \
        for (int j = 0; j < 6; j++) {                                                  \
            for (int l = 0; l < 6; l++) a[l] = tmp + (6 * l + j) * C;                  \
            for (int i = 0; i < 6; i++) o[i] = p[6 * i + j];                           \
            fnn_b6_add_##SUF(a, o, C);                                                 \
        }                                                                              \
    }                                                                                  \
    /* V = B^T d B for one tile: p the 36 channel vectors of its 6x6 patch, V's     \
       plane xi at v + xi*plane, tmp 36*C */                                           \
    static void fnn_wino4_in_##SUF(const T* const* p, Py_ssize_t C, T* v, Py_ssize_t plane, \
                                   T* tmp) {                                           \
        const T* a[6]; T* o[6];                                                        \
        for (int i = 0; i < 6; i++) {                                                  \
            for (int k = 0; k < 6; k++) o[k] = tmp + (6 * i + k) * C;                  \
            fnn_bt6_##SUF(p + 6 * i, o, C);                                            \
        }                                                                              \
        for (int k = 0; k < 6; k++) {                                                  \
            for (int i = 0; i < 6; i++) a[i] = tmp + (6 * i + k) * C;                  \
            for (int l = 0; l < 6; l++) o[l] = v + (6 * l + k) * plane;                \
            fnn_bt6_##SUF(a, o, C);                                                    \
        }                                                                              \
    }                                                                                  \
    /* Y = A^T M A (+ b) for one tile: y the 16 output vectors (row-major), tmp 24*O */ \
    static void fnn_wino4_out_##SUF(const T* m, Py_ssize_t plane, Py_ssize_t O,        \
                                    const T* b, T* const* y, T* tmp) {                 \
        const T* a[6]; T* o[4];                                                        \
        for (int l = 0; l < 6; l++) {                                                  \
            for (int k = 0; k < 6; k++) a[k] = m + (6 * l + k) * plane;                \
            for (int j = 0; j < 4; j++) o[j] = tmp + (4 * l + j) * O;                  \
            fnn_at6_##SUF(a, o, O, NULL);                                              \
        }                                                                              \
        for (int j = 0; j < 4; j++) {                                                  \
            for (int l = 0; l < 6; l++) a[l] = tmp + (4 * l + j) * O;                  \
            for (int i = 0; i < 4; i++) o[i] = y[4 * i + j];                           \
            fnn_at6_##SUF(a, o, O, b);                                                 \
        }                                                                              \
    }                                                                                  \
    /* D = A g A^T for one tile of dz (g: its 16 vectors, row-major), db += all 16   \
       (unless db is NULL);                                                        \
       tmp 24*O */                                                                     \
    static void fnn_wino4_dz_##SUF(const T* const* g, Py_ssize_t O, T* d, Py_ssize_t plane, \
                                   double* FNN_RESTRICT db, T* tmp) {                  \
        const T* a[6]; T* o[6];                                                        \
        for (int i = 0; i < 4; i++) {                                                  \
            for (int k = 0; k < 6; k++) o[k] = tmp + (6 * i + k) * O;                  \
            fnn_a6_##SUF(g + 4 * i, o, O);                                             \
        }                                                                              \
        for (int k = 0; k < 6; k++) {                                                  \
            for (int i = 0; i < 4; i++) a[i] = tmp + (6 * i + k) * O;                  \
            for (int l = 0; l < 6; l++) o[l] = d + (6 * l + k) * plane;                \
            fnn_a6_##SUF(a, o, O);                                                     \
        }                                                                              \
        for (int k = 0; k < 16 && db; k++) {                                           \
            const T* gk = g[k];                                                        \
            FNN_IVDEP for (Py_ssize_t c = 0; c < O; c++) db[c] += (double)gk[c];       \
        }                                                                              \
    }                                                                                  \
    /* U[xi][c][o] = (G g G^T)[xi] for g[i][j] = w[i][j][c][o] (never flipped: the     \
       F(4x4) delta below is the forward pass's adjoint) */                          \
    static void fnn_wino4_kernel_##SUF(const T* w, Py_ssize_t C, Py_ssize_t O,          \
                                       T* FNN_RESTRICT u) {                            \
        const Py_ssize_t CO = C * O;                                                   \
        const T q4 = (T)0.25, q6 = (T)(1.0 / 6), q12 = (T)(1.0 / 12), q24 = (T)(1.0 / 24); \
        for (Py_ssize_t c = 0; c < C; c++) {                                           \
            const T* g[9];                                                             \
            for (int t = 0; t < 9; t++) g[t] = w + t * CO + c * O;                     \
            T* v = u + c * O;                                                          \
            FNN_IVDEP for (Py_ssize_t o = 0; o < O; o++) {                             \
                T t[6][3];                                                             \
                for (int j = 0; j < 3; j++) {                                          \
                    T a0 = g[j][o], a1 = g[3 + j][o], a2 = g[6 + j][o];                \
                    t[0][j] = a0 * q4; t[1][j] = -((a0 + a2) + a1) * q6;               \
                    t[2][j] = -((a0 + a2) - a1) * q6;                                  \
                    t[3][j] = (a0 * q24 + a2 * q6) + a1 * q12;                         \
                    t[4][j] = (a0 * q24 + a2 * q6) - a1 * q12; t[5][j] = a2;           \
                }                                                                      \
                for (int k = 0; k < 6; k++) {                                          \
                    T a0 = t[k][0], a1 = t[k][1], a2 = t[k][2];                        \
                    v[(6 * k) * CO + o] = a0 * q4;                                     \
                    v[(6 * k + 1) * CO + o] = -((a0 + a2) + a1) * q6;                  \
                    v[(6 * k + 2) * CO + o] = -((a0 + a2) - a1) * q6;                  \
                    v[(6 * k + 3) * CO + o] = (a0 * q24 + a2 * q6) + a1 * q12;         \
                    v[(6 * k + 4) * CO + o] = (a0 * q24 + a2 * q6) - a1 * q12;         \
                    v[(6 * k + 5) * CO + o] = a2;                                      \
                }                                                                      \
            }                                                                          \
        }                                                                              \
    }                                                                                  \
    /* dw[i][j][k] = (G^T S[:, k] G)[i][j] for the n channel pairs k (S: 36 planes   \
       of n, dw: 9 planes of n) */                                                     \
    static void fnn_wino4_dw_out_##SUF(const T* s, Py_ssize_t n, T* FNN_RESTRICT dw) { \
        const T q4 = (T)0.25, q6 = (T)(1.0 / 6), q12 = (T)(1.0 / 12), q24 = (T)(1.0 / 24); \
        FNN_IVDEP for (Py_ssize_t k = 0; k < n; k++) {                                 \
            T t[3][6];                                                                 \
            for (int a = 0; a < 6; a++) {                                              \
                T s0 = s[a * n + k], s1 = s[(6 + a) * n + k], s2 = s[(12 + a) * n + k]; \
                T s3 = s[(18 + a) * n + k], s4 = s[(24 + a) * n + k], s5 = s[(30 + a) * n + k]; \
                t[0][a] = (s0 * q4 - (s1 + s2) * q6) + (s3 + s4) * q24;                \
                t[1][a] = (s2 - s1) * q6 + (s3 - s4) * q12;                            \
                t[2][a] = ((s3 + s4) - (s1 + s2)) * q6 + s5;                           \
            }                                                                          \
            for (int a = 0; a < 3; a++) {                                              \
                T s0 = t[a][0], s1 = t[a][1], s2 = t[a][2], s3 = t[a][3], s4 = t[a][4], s5 = t[a][5]; \
                dw[(3 * a) * n + k] = (s0 * q4 - (s1 + s2) * q6) + (s3 + s4) * q24;    \
                dw[(3 * a + 1) * n + k] = (s2 - s1) * q6 + (s3 - s4) * q12;            \
                dw[(3 * a + 2) * n + k] = ((s3 + s4) - (s1 + s2)) * q6 + s5;           \
            }                                                                          \
        }                                                                              \
    }
    FNN_WINO4(float, f)
    FNN_WINO4(double, d)
    """
    uint64_t FNN_GOLDEN
    uint64_t FNN_MIX1
    uint64_t FNN_MIX2
    enum:
        FNN_VL
        FNN_RG
    void fnn_fwd_tile_f(const float* src, Py_ssize_t rs, const Py_ssize_t* off, Py_ssize_t K,
                        const float* w, Py_ssize_t ldw, const float* b, float* z,
                        Py_ssize_t ldz, int rows, int lanes) noexcept nogil
    void fnn_fwd_tile_d(const double* src, Py_ssize_t rs, const Py_ssize_t* off, Py_ssize_t K,
                        const double* w, Py_ssize_t ldw, const double* b, double* z,
                        Py_ssize_t ldz, int rows, int lanes) noexcept nogil
    void fnn_dw_tile_f(const float* src, Py_ssize_t rs, const Py_ssize_t* off, const float* dz,
                       Py_ssize_t ldz, Py_ssize_t rows, float* acc, Py_ssize_t ldacc,
                       int KB) noexcept nogil
    void fnn_dw_tile_d(const double* src, Py_ssize_t rs, const Py_ssize_t* off,
                       const double* dz, Py_ssize_t ldz, Py_ssize_t rows, double* acc,
                       Py_ssize_t ldacc, int KB) noexcept nogil
    void fnn_wino_kernel_f(const float* w, Py_ssize_t C, Py_ssize_t O, int flip,
                           float* u) noexcept nogil
    void fnn_wino_kernel_d(const double* w, Py_ssize_t C, Py_ssize_t O, int flip,
                           double* u) noexcept nogil
    void fnn_transpose_planes_f(const float* src, Py_ssize_t planes, Py_ssize_t C, Py_ssize_t O,
                                float* dst) noexcept nogil
    void fnn_transpose_planes_d(const double* src, Py_ssize_t planes, Py_ssize_t C, Py_ssize_t O,
                                double* dst) noexcept nogil
    void fnn_wino4_in_f(const float** p, Py_ssize_t C, float* v, Py_ssize_t plane,
                        float* tmp) noexcept nogil
    void fnn_wino4_in_d(const double** p, Py_ssize_t C, double* v, Py_ssize_t plane,
                        double* tmp) noexcept nogil
    void fnn_wino4_out_f(const float* m, Py_ssize_t plane, Py_ssize_t O, const float* b,
                         float** y, float* tmp) noexcept nogil
    void fnn_wino4_out_d(const double* m, Py_ssize_t plane, Py_ssize_t O, const double* b,
                         double** y, double* tmp) noexcept nogil
    void fnn_wino4_dz_f(const float** g, Py_ssize_t O, float* d, Py_ssize_t plane, double* db,
                        float* tmp) noexcept nogil
    void fnn_wino4_dz_d(const double** g, Py_ssize_t O, double* d, Py_ssize_t plane,
                        double* db, double* tmp) noexcept nogil
    void fnn_wino4_kernel_f(const float* w, Py_ssize_t C, Py_ssize_t O,
                            float* u) noexcept nogil
    void fnn_wino4_kernel_d(const double* w, Py_ssize_t C, Py_ssize_t O,
                            double* u) noexcept nogil
    void fnn_wino4_dw_out_f(const float* s, Py_ssize_t n, float* dw) noexcept nogil
    void fnn_wino4_in_adj_f(const float* v, Py_ssize_t plane, Py_ssize_t C, float** p,
                            float* tmp) noexcept nogil
    void fnn_wino4_in_adj_d(const double* v, Py_ssize_t plane, Py_ssize_t C, double** p,
                            double* tmp) noexcept nogil
    void fnn_wino4_dw_out_d(const double* s, Py_ssize_t n, double* dw) noexcept nogil
    void fnn_wino_dw_out_f(const float* s, Py_ssize_t n, float* dw) noexcept nogil
    void fnn_wino_dw_out_d(const double* s, Py_ssize_t n, double* dw) noexcept nogil
    void fnn_pool_px_f(const float* s0, const Py_ssize_t* koff, int KK, Py_ssize_t C, float* out,
                       int32_t* am) noexcept nogil
    void fnn_pool_px_d(const double* s0, const Py_ssize_t* koff, int KK, Py_ssize_t C,
                       double* out, int32_t* am) noexcept nogil
    void fnn_pool_back_px_f(const float* d, const int32_t* am, int k, const float* y,
                            Py_ssize_t C, float* o) noexcept nogil
    void fnn_pool_back_px_d(const double* d, const int32_t* am, int k, const double* y,
                            Py_ssize_t C, double* o) noexcept nogil
    void fnn_colsum_f(const float* d, Py_ssize_t ld, Py_ssize_t rows, Py_ssize_t O,
                      double* acc) noexcept nogil
    void fnn_colsum_d(const double* d, Py_ssize_t ld, Py_ssize_t rows, Py_ssize_t O,
                      double* acc) noexcept nogil
    void fnn_copy_f(float* d, const float* s, Py_ssize_t n) noexcept nogil
    void fnn_copy_d(double* d, const double* s, Py_ssize_t n) noexcept nogil
    void fnn_wino_in_f(const float** p, Py_ssize_t C, float* v, Py_ssize_t plane) noexcept nogil
    void fnn_wino_in_d(const double** p, Py_ssize_t C, double* v, Py_ssize_t plane) noexcept nogil
    void fnn_wino_out_f(const float* m, Py_ssize_t plane, Py_ssize_t O, const float* b,
                        float* y0, float* y1, float* y2, float* y3) noexcept nogil
    void fnn_wino_out_d(const double* m, Py_ssize_t plane, Py_ssize_t O, const double* b,
                        double* y0, double* y1, double* y2, double* y3) noexcept nogil
    void fnn_wino_dz_f(const float* g0, const float* g1, const float* g2, const float* g3,
                       Py_ssize_t O, float* d, Py_ssize_t plane, double* db) noexcept nogil
    void fnn_wino_dz_d(const double* g0, const double* g1, const double* g2, const double* g3,
                       Py_ssize_t O, double* d, Py_ssize_t plane, double* db) noexcept nogil


#: True when this extension was compiled with OpenMP.
OPENMP = bool(FASTNN_OPENMP)

# Work from which the threads split it: multiply-adds of a convolution (4 M:
# about 0.1 ms on one core, twice what waking a second thread after a BLAS
# call cost here, see _cy_elementwise), elements of a pooling pass (about
# 80 us) or of dropout.
cdef double PAR_MIN_FLOPS = 4e6
cdef Py_ssize_t PAR_MIN_POOL = 1 << 18
cdef Py_ssize_t PAR_MIN_DROPOUT = 1 << 19
# Columns per chunk and thread, in bytes (the GEMM's panel of im2col rows).
cdef Py_ssize_t CHUNK_BYTES = 1 << 18
# Column widths up to which the forward pass and dw run the register-blocked
# loop instead of a GEMM.
cdef Py_ssize_t DIRECT_MAX_K = 32
# Winograd F(2x2, 3x3) for 3x3 kernels at stride 1 with at least this many
# channels in and out (the GEMMs' K and N); its chunks: bytes of transformed
# tiles (input and output planes) per thread.
cdef Py_ssize_t WINOGRAD_MIN_CHANNELS = 16
cdef Py_ssize_t WINOGRAD_CHUNK_BYTES = 1 << 20
# F(4x4, 3x3) where its products are at most this share of F(2x2, 3x3)'s
# (0 = auto by that rule; 2 or 4 forces a tile side)
cdef double WINOGRAD4_RATIO = 0.8
cdef Py_ssize_t WINOGRAD_TILE = 0
# dw's partial sums: units of work (see _dw_plan) and the most bytes they take
cdef Py_ssize_t DW_UNITS = 16
cdef Py_ssize_t DW_UNIT_BYTES = 32 << 20
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


def _set_tuning(chunk_bytes=None, direct_max_k=None, winograd_min_channels=None,
                winograd_chunk_bytes=None, dw_units=None, winograd_tile=None,
                winograd4_ratio=None):
    """Set the chunk size (bytes of columns per chunk and thread), the widest
    column that runs the register-blocked loop, the fewest channels for
    Winograd (a huge number turns it off), its chunk size and the most units
    of dw's sums (tests, measurements); returns the old values in that order."""
    global CHUNK_BYTES, DIRECT_MAX_K, WINOGRAD_MIN_CHANNELS, WINOGRAD_CHUNK_BYTES, DW_UNITS
    global WINOGRAD_TILE, WINOGRAD4_RATIO
    old = (CHUNK_BYTES, DIRECT_MAX_K, WINOGRAD_MIN_CHANNELS, WINOGRAD_CHUNK_BYTES, DW_UNITS,
           WINOGRAD_TILE, WINOGRAD4_RATIO)
    if winograd_tile is not None:
        if winograd_tile not in (0, 2, 4):
            raise ValueError(f"winograd_tile must be 0 (auto), 2 or 4, got {winograd_tile!r}")
        WINOGRAD_TILE = winograd_tile
    if winograd4_ratio is not None:
        WINOGRAD4_RATIO = winograd4_ratio
    if dw_units is not None:
        DW_UNITS = max(1, dw_units)
    if chunk_bytes is not None:
        CHUNK_BYTES = max(1, chunk_bytes)
    if direct_max_k is not None:
        DIRECT_MAX_K = direct_max_k
    if winograd_min_channels is not None:
        WINOGRAD_MIN_CHANNELS = winograd_min_channels
    if winograd_chunk_bytes is not None:
        WINOGRAD_CHUNK_BYTES = max(1, winograd_chunk_bytes)
    return old


def _use_blas_table(uintptr_t address):
    """Read the BLAS from the ``blas_t`` at ``address`` (``_cy_dense._blas_table()``
    of the same variant)."""
    global _blas
    _blas = <const blas_t*>address


# Resolved on the first call of a kernel here (a symbol-table lookup of a few
# ms, kept out of ``import fastnn``): cython_cpu's ``_quiet_openblas``.
_quiet_hook = None
cdef bint _quiet_ready = False


def _set_quiet_hook(hook):
    """``hook()`` points the BLAS table at OpenBLAS' ``thread_timeout``; it runs
    on the next kernel call (again after every call of this function)."""
    global _quiet_hook, _quiet_ready
    _quiet_hook = hook
    _quiet_ready = False


cdef int _check_quiet() except -1:
    global _quiet_ready
    _quiet_ready = True
    if _quiet_hook is not None:
        _quiet_hook()
    return 0


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
    int threads                   # the thread count read once per call (the workspace's)
    bint identity                 # 1x1, stride 1, no padding: the columns are x


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
    g.threads = _num_threads
    g.identity = (g.kh == 1 and g.kw == 1 and g.sh == 1 and g.sw == 1 and top == 0
                  and bottom == 0 and left == 0 and right == 0)
    return 0


cdef inline int _threads_for(int threads, double work, double min_work,
                             Py_ssize_t parts) noexcept nogil:
    """Threads to split ``work`` over: 1 below ``min_work``, at most ``parts``."""
    if threads <= 1 or work < min_work or parts < 2:
        return 1
    return <int>min(<Py_ssize_t>threads, parts)


cdef inline void _region_enter() noexcept nogil:
    """Before a parallel region: one BLAS thread, OpenBLAS' idle workers asleep
    (``_cy_dense``'s guard, shared through the BLAS table)."""
    if _blas != NULL and _blas.region_enter != NULL:
        _blas.region_enter()


cdef inline void _region_leave() noexcept nogil:
    if _blas != NULL and _blas.region_leave != NULL:
        _blas.region_leave()


def _region_probe():
    """``(BLAS threads, OpenBLAS thread_timeout)`` as a parallel region of this
    module sees them (``-1`` where the BLAS does not say): for tests."""
    cdef int threads = -1
    cdef long long timeout = -1
    _ensure_blas()
    if not _quiet_ready:
        _check_quiet()
    with nogil:
        _region_enter()
        if _blas.get_threads != NULL:
            threads = _blas.get_threads()
        if _blas.thread_timeout != NULL:
            timeout = _blas.thread_timeout[0]
        _region_leave()
    return threads, timeout


cdef inline Py_ssize_t _block(Py_ssize_t parts, int T) noexcept nogil:
    """Parts per block of a dynamically scheduled loop: about 8 blocks a thread
    (a thread slowed by another process on its core takes fewer of them)."""
    return max(1, parts // (8 * T))


cdef void _im2col(const geom* g, const floating* x, floating* col,
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
            for i in range(g.kh):
                if floating is float:
                    fnn_copy_f(dst + i * seg, base + i * rowstride, seg)
                else:
                    fnn_copy_d(dst + i * seg, base + i * rowstride, seg)
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
                         const floating* b, floating* z, floating* out,
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
            _im2col(g, x, col, r0, e)
            a = col
        gemm_with(_blas, c'N', c'N', <int>O, <int>m, <int>K, w, <int>O, a, <int>K, 0,
                  z + r0 * O, <int>O)
        bias_act_rows(act, z + r0 * O, b, out + r0 * O, 0, m, O)
        r0 = e


cdef inline Py_ssize_t _buffer_rows(const geom* g, Py_ssize_t itemsize) noexcept nogil:
    """Column rows a thread's buffer holds: a GEMM chunk, or an output row
    (and a group of 8) for the register-blocked loops."""
    return max(_chunk_rows(g.k, itemsize), g.q + FNN_RG)


cdef void _offsets(const geom* g, Py_ssize_t* off) noexcept nogil:
    """``off[(i*kw + j)*c + ch] = (i*w + j)*c + ch``: a column's elements
    relative to its window's first one, for a window inside the image."""
    cdef Py_ssize_t i, j, ch, t = 0
    for i in range(g.kh):
        for j in range(g.kw):
            for ch in range(g.c):
                off[t] = (i * g.w + j) * g.c + ch
                t += 1


cdef inline bint _row_inside(const geom* g, Py_ssize_t p) noexcept nogil:
    cdef Py_ssize_t y0 = p * g.sh - g.top
    return y0 >= 0 and y0 + g.kh <= g.h


cdef inline bint _cols_inside(const geom* g, Py_ssize_t q0, Py_ssize_t q1) noexcept nogil:
    """Whether the windows of output columns ``q0 <= q < q1`` lie inside the image."""
    return q0 * g.sw - g.left >= 0 and (q1 - 1) * g.sw - g.left + g.kw <= g.w


cdef void _fwd_direct_rows(int act, const geom* g, const floating* x, const floating* wpad,
                           Py_ssize_t ldw, const floating* b, floating* z, floating* out,
                           const Py_ssize_t* off, floating* col, Py_ssize_t a,
                           Py_ssize_t e) noexcept nogil:
    """Output rows ``a <= n*p + p < e`` of the forward pass, small-K path: tiles
    of 8 pixels x 16 channels of ``cols @ w`` (``wpad``: ``w`` with its
    columns padded to ``ldw``, a multiple of 16) and ``z = tile + b``, the
    column elements read from ``x`` itself (through ``off``) where the 8
    windows lie inside the image, from im2col rows in ``col`` elsewhere; the
    last group of a row overlaps the one before (the same values written
    again) rather than running short; then ``out = act(z)`` over the row."""
    cdef Py_ssize_t row, n, p, qs, q0, nv, ob, l, O = g.o, K = g.k, Q = g.q, rs = g.sw * g.c
    cdef bint rowin
    cdef const floating* xb
    for row in range(a, e):
        n = row // g.p
        p = row - n * g.p
        rowin = _row_inside(g, p)
        qs = 0
        while qs < Q:
            q0 = Q - FNN_RG if qs + FNN_RG > Q and Q >= FNN_RG else qs
            nv = min(<Py_ssize_t>FNN_RG, Q - q0)
            if rowin and nv == FNN_RG and _cols_inside(g, q0, q0 + FNN_RG):
                xb = x + ((n * g.h + p * g.sh - g.top) * g.w + q0 * g.sw - g.left) * g.c
                for ob in range(0, O, 16):      # FNN_VL
                    if floating is float:
                        fnn_fwd_tile_f(xb, rs, off, K, wpad + ob, ldw, b + ob,
                                       z + (row * Q + q0) * O + ob, O, FNN_RG,
                                       <int>min(<Py_ssize_t>FNN_VL, O - ob))
                    else:
                        fnn_fwd_tile_d(xb, rs, off, K, wpad + ob, ldw, b + ob,
                                       z + (row * Q + q0) * O + ob, O, FNN_RG,
                                       <int>min(<Py_ssize_t>FNN_VL, O - ob))
            else:
                _im2col(g, x, col, row * Q + q0, row * Q + q0 + nv)
                for l in range(nv * K, FNN_RG * K):
                    col[l] = 0
                for ob in range(0, O, 16):      # FNN_VL
                    if floating is float:
                        fnn_fwd_tile_f(col, K, NULL, K, wpad + ob, ldw, b + ob,
                                       z + (row * Q + q0) * O + ob, O, <int>nv,
                                       <int>min(<Py_ssize_t>FNN_VL, O - ob))
                    else:
                        fnn_fwd_tile_d(col, K, NULL, K, wpad + ob, ldw, b + ob,
                                       z + (row * Q + q0) * O + ob, O, <int>nv,
                                       <int>min(<Py_ssize_t>FNN_VL, O - ob))
            qs += FNN_RG
        act_forward_range(act, z + row * Q * O, out + row * Q * O, 0, Q * O)


cdef void _conv_forward(int act, const geom* g, const floating* x, const floating* w,
                        const floating* b, floating* z, floating* out, char* ws) noexcept nogil:
    cdef wgeom wg
    if _winograd_fits(g):
        _wgeom_forward(&wg, g, sizeof(floating))
        _wino_run(0, act, &wg, x, w, False, b, z, out, NULL, NULL, ws)
        return
    cdef Py_ssize_t itemsize = sizeof(floating), K = g.k, O = g.o, rows = g.n * g.p
    cdef bint direct = K <= DIRECT_MAX_K and not g.identity
    cdef Py_ssize_t chunk = _chunk_rows(K, itemsize)
    cdef Py_ssize_t ldw = (O + FNN_VL - 1) // FNN_VL * FNN_VL
    cdef Py_ssize_t shared = _align(K * sizeof(Py_ssize_t)) + _align(K * ldw * itemsize)
    cdef Py_ssize_t per = _align(_buffer_rows(g, itemsize) * K * itemsize)
    cdef int T
    cdef Py_ssize_t* off = <Py_ssize_t*>ws
    cdef floating* wpad = <floating*>(ws + _align(K * sizeof(Py_ssize_t)))
    cdef Py_ssize_t t, i, j, step
    if direct:
        _offsets(g, off)
        for i in range(K):
            for j in range(ldw):
                wpad[i * ldw + j] = w[i * O + j] if j < O else 0
        T = _threads_for(g.threads, <double>g.m * K * O, PAR_MIN_FLOPS, rows)
        if T == 1:
            _fwd_direct_rows(act, g, x, wpad, ldw, b, z, out, off, <floating*>(ws + shared),
                             0, rows)
            return
        step = _block(rows, T)
        _region_enter()
        for t in prange((rows + step - 1) // step, schedule="dynamic", num_threads=T):
            _fwd_direct_rows(act, g, x, wpad, ldw, b, z, out, off,
                             <floating*>(ws + shared + threadid() * per),
                             t * step, min(rows, (t + 1) * step))
        _region_leave()
        return
    T = _threads_for(g.threads, <double>g.m * K * O, PAR_MIN_FLOPS,
                     (g.m + chunk - 1) // chunk)
    if T == 1:
        _fwd_gemm_rows(act, g, x, w, b, z, out, <floating*>(ws + shared), chunk, 0, g.m)
        return
    _region_enter()
    for t in prange((g.m + chunk - 1) // chunk, schedule="dynamic", num_threads=T):
        _fwd_gemm_rows(act, g, x, w, b, z, out, <floating*>(ws + shared + threadid() * per),
                       chunk, t * chunk, min(g.m, (t + 1) * chunk))
    _region_leave()


cdef Py_ssize_t _forward_workspace(const geom* g, Py_ssize_t itemsize) noexcept nogil:
    cdef wgeom wg
    if _winograd_fits(g):
        _wgeom_forward(&wg, g, itemsize)
        return _wino_workspace(&wg, itemsize)
    cdef Py_ssize_t K = g.k, ldw = (g.o + FNN_VL - 1) // FNN_VL * FNN_VL
    return (_align(K * sizeof(Py_ssize_t)) + _align(K * ldw * itemsize)
            + g.threads * _align(_buffer_rows(g, itemsize) * K * itemsize))


# ------------------------------------------------------------------ dw, db

cdef void _dw_block_rows(const floating* src, Py_ssize_t rs, const Py_ssize_t* off,
                         Py_ssize_t K, const floating* dp, Py_ssize_t ldz, Py_ssize_t m,
                         floating* dwt, Py_ssize_t lddw) noexcept nogil:
    """``dwt += cols.T @ dz`` over ``m`` rows by the register-blocked tiles: 16
    channels by at most 12 rows of ``dw`` at a time (blocks as even as they
    come), the column element ``(r, k)`` at ``src[r*rs + off[k]]`` (``off``
    NULL: ``src[r*rs + k]``)."""
    cdef Py_ssize_t ob, kb, nb
    for ob in range(0, lddw, 16):   # FNN_VL
        kb = 0
        while kb < K:
            nb = K - kb
            nb = (nb + (nb + 11) // 12 - 1) // ((nb + 11) // 12)
            if floating is float:
                fnn_dw_tile_f(src + (0 if off != NULL else kb), rs,
                              off + kb if off != NULL else NULL, dp + ob, ldz, m,
                              dwt + kb * lddw + ob, lddw, <int>nb)
            else:
                fnn_dw_tile_d(src + (0 if off != NULL else kb), rs,
                              off + kb if off != NULL else NULL, dp + ob, ldz, m,
                              dwt + kb * lddw + ob, lddw, <int>nb)
            kb += nb


cdef const floating* _padded_dz(const floating* d, Py_ssize_t m, Py_ssize_t O, Py_ssize_t lddw,
                                floating* dzbuf) noexcept nogil:
    """``m`` rows of ``dz``, padded to ``lddw`` channels (whole tiles of 16) when
    ``O`` is not a multiple of 16."""
    cdef Py_ssize_t r, o
    if O == lddw:
        return d
    for r in range(m):
        for o in range(lddw):
            dzbuf[r * lddw + o] = d[r * O + o] if o < O else 0
    return dzbuf


cdef void _dw_rows(const geom* g, const floating* x, const floating* dz,
                   floating* dwt, Py_ssize_t lddw, double* dbt, floating* col, floating* dzbuf,
                   Py_ssize_t chunk, Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    """This thread's share of ``dw`` (into ``dwt``, ``(k, lddw)``) and ``db``
    (into ``dbt``, float64) over the column rows ``[r0, r1)``, GEMM path:
    per chunk, columns and ``dwt += cols.T @ dz`` (BLAS, ``beta = 1`` after
    the first)."""
    cdef Py_ssize_t e, m, r, o, O = g.o, K = g.k
    cdef const floating* a
    cdef const floating* d
    cdef bint first = True
    for o in range(O):
        dbt[o] = 0
    if r0 >= r1:
        for r in range(K * lddw):
            dwt[r] = 0
    while r0 < r1:
        e = min(r1, r0 + chunk)
        m = e - r0
        d = dz + r0 * O
        if g.identity:
            a = x + r0 * K
        else:
            _im2col(g, x, col, r0, e)
            a = col
        gemm_with(_blas, c'N', c'T', <int>O, <int>K, <int>m, d, <int>O, a, <int>K,
                  0 if first else 1, dwt, <int>lddw)
        if floating is float:
            fnn_colsum_f(d, O, m, O, dbt)
        else:
            fnn_colsum_d(d, O, m, O, dbt)
        first = False
        r0 = e


cdef void _dw_direct_rows(const geom* g, const floating* x, const floating* dz,
                          const Py_ssize_t* off, floating* dwt, Py_ssize_t lddw, double* dbt,
                          floating* col, floating* dzbuf, Py_ssize_t a,
                          Py_ssize_t e) noexcept nogil:
    """This thread's share of ``dw`` and ``db`` over the output rows ``a <= n*p + p
    < e``, small-K path: per output row, the register-blocked tiles read the
    columns from ``x`` itself where every window of the row lies inside the
    image, from im2col rows elsewhere."""
    cdef Py_ssize_t row, n, p, r, o, O = g.o, K = g.k, Q = g.q
    cdef const floating* d
    cdef const floating* dp
    for o in range(O):
        dbt[o] = 0
    for r in range(K * lddw):
        dwt[r] = 0
    for row in range(a, e):
        n = row // g.p
        p = row - n * g.p
        d = dz + row * Q * O
        dp = _padded_dz(d, Q, O, lddw, dzbuf)
        if _row_inside(g, p) and _cols_inside(g, 0, Q):
            _dw_block_rows(x + ((n * g.h + p * g.sh - g.top) * g.w - g.left) * g.c,
                           g.sw * g.c, off, K, dp, lddw, Q, dwt, lddw)
        else:
            _im2col(g, x, col, row * Q, row * Q + Q)
            _dw_block_rows(col, K, <const Py_ssize_t*>NULL, K, dp, lddw, Q, dwt, lddw)
        if floating is float:
            fnn_colsum_f(d, O, Q, O, dbt)
        else:
            fnn_colsum_d(d, O, Q, O, dbt)


ctypedef struct dwplan:
    int T                       # threads
    int threads                 # the threads the workspace is sized for (>= T)
    Py_ssize_t U                # units of work, each with its own partial dw and db
    Py_ssize_t parts            # what the units split: output rows, 8-row blocks, tiles
    Py_ssize_t shared           # bytes before the units' buffers
    Py_ssize_t unit             # bytes of a unit's partial sums
    Py_ssize_t thread           # bytes of a thread's scratch


cdef void _dw_plan(dwplan* pl, int threads, double work, Py_ssize_t parts, Py_ssize_t least,
                   Py_ssize_t shared, Py_ssize_t unit, Py_ssize_t thread) noexcept nogil:
    """Split ``dw``'s sums into units of at least ``least`` parts, a power of
    two of them and ``DW_UNITS`` at most (fewer when their partial sums would pass
    ``DW_UNIT_BYTES``, but never fewer than the threads), handed to the
    threads as they come free and added in unit order: the result does not
    depend on which thread ran which unit, nor (up to ``DW_UNITS`` threads)
    on the thread count."""
    pl.T = _threads_for(threads, work, PAR_MIN_FLOPS, parts)
    pl.threads = threads
    pl.U = min(<Py_ssize_t>DW_UNITS, max(<Py_ssize_t>1, parts // least))
    # a power of two: 9 units on 2 threads ran as 5 + 4 (Winograd dw at batch
    # 128: 1.79 ms with 9 units, 1.61 ms with 8)
    while pl.U & (pl.U - 1):
        pl.U &= pl.U - 1
    if pl.U * unit > DW_UNIT_BYTES:
        pl.U = max(min(<Py_ssize_t>pl.T, parts), DW_UNIT_BYTES // unit)
    pl.U = max(pl.U, 1)
    pl.parts, pl.shared, pl.unit, pl.thread = parts, shared, unit, thread


cdef void _sum_units(floating* first, Py_ssize_t stride, Py_ssize_t U, Py_ssize_t n,
                     floating* out) noexcept nogil:
    """``out[k] = ((first[k] + unit1[k]) + unit2[k]) + ...`` for ``k < n``, unit
    ``u`` at ``first + u*stride``; ``out`` may be ``first``."""
    cdef Py_ssize_t u, k
    cdef floating* src
    if out != first:
        for k in range(n):
            out[k] = first[k]
    for u in range(1, U):
        src = first + u * stride
        for k in range(n):
            out[k] = out[k] + src[k]


cdef inline Py_ssize_t _dw_plan_bytes(const dwplan* pl) noexcept nogil:
    return pl.shared + pl.U * pl.unit + pl.threads * pl.thread


cdef void _conv_backward_plan(const geom* g, Py_ssize_t itemsize, dwplan* pl,
                              Py_ssize_t* lddw, Py_ssize_t* nrows) noexcept nogil:
    cdef Py_ssize_t K = g.k, O = g.o
    cdef bint direct = K <= DIRECT_MAX_K and not g.identity
    nrows[0] = _buffer_rows(g, itemsize)
    lddw[0] = (O + FNN_VL - 1) // FNN_VL * FNN_VL if direct else O
    # units of at least 256 column rows (whole output rows on the small-K path)
    _dw_plan(pl, g.threads, <double>g.m * K * O,
             g.n * g.p if direct else (g.m + FNN_RG - 1) // FNN_RG,
             (256 + g.q - 1) // g.q if direct else 32, _align(K * sizeof(Py_ssize_t)),
             _align(K * lddw[0] * itemsize) + _align(O * sizeof(double)),
             _align(nrows[0] * K * itemsize) + _align(nrows[0] * lddw[0] * itemsize))


cdef void _dw_unit(const geom* g, const dwplan* pl, bint direct, Py_ssize_t lddw,
                   Py_ssize_t nrows, const floating* x, const floating* dz,
                   const Py_ssize_t* off, char* ws, Py_ssize_t u, Py_ssize_t t) noexcept nogil:
    """Unit ``u`` of ``dw`` on thread ``t``: its parts into its own partial sums."""
    cdef Py_ssize_t a = u * pl.parts // pl.U, e = (u + 1) * pl.parts // pl.U
    cdef Py_ssize_t sdw = _align(g.k * lddw * sizeof(floating))
    cdef char* mine = ws + pl.shared + u * pl.unit
    cdef char* scratch = ws + pl.shared + pl.U * pl.unit + t * pl.thread
    cdef floating* col = <floating*>scratch
    cdef floating* dzbuf = <floating*>(scratch + _align(nrows * g.k * sizeof(floating)))
    if direct:
        _dw_direct_rows(g, x, dz, off, <floating*>mine, lddw, <double*>(mine + sdw), col, dzbuf,
                        a, e)
    else:
        _dw_rows(g, x, dz, <floating*>mine, lddw, <double*>(mine + sdw), col, dzbuf,
                 _chunk_rows(g.k, sizeof(floating)), min(g.m, a * FNN_RG),
                 min(g.m, e * FNN_RG))


cdef void _conv_backward(const geom* g, const floating* x, const floating* dz, floating* dw,
                         floating* db, char* ws) noexcept nogil:
    cdef wgeom wg
    if _winograd_fits(g):
        _wgeom_forward(&wg, g, sizeof(floating))
        _wino_backward(&wg, x, dz, dw, db, ws)
        return
    cdef Py_ssize_t K = g.k, O = g.o, lddw, nrows
    cdef bint direct = K <= DIRECT_MAX_K and not g.identity
    cdef dwplan pl
    cdef Py_ssize_t* off = <Py_ssize_t*>ws
    cdef Py_ssize_t u, i, o
    cdef Py_ssize_t sdw
    cdef double sd
    cdef char* base
    _conv_backward_plan(g, sizeof(floating), &pl, &lddw, &nrows)
    sdw = _align(K * lddw * sizeof(floating))
    base = ws + pl.shared
    if direct:
        _offsets(g, off)
    if pl.T == 1:
        for u in range(pl.U):
            _dw_unit(g, &pl, direct, lddw, nrows, x, dz, off, ws, u, 0)
    else:
        _region_enter()
        for u in prange(pl.U, schedule="dynamic", num_threads=pl.T):
            _dw_unit(g, &pl, direct, lddw, nrows, x, dz, off, ws, u, threadid())
        _region_leave()
    # the units' partial sums, in unit order
    _sum_units(<floating*>base, pl.unit // sizeof(floating), pl.U, K * lddw, <floating*>base)
    for i in range(K):
        for o in range(O):
            dw[i * O + o] = (<floating*>base)[i * lddw + o]
    for o in range(O):
        sd = (<double*>(base + sdw))[o]
        for u in range(1, pl.U):
            sd = sd + (<double*>(base + u * pl.unit + sdw))[o]
        db[o] = <floating>sd


cdef Py_ssize_t _backward_workspace(const geom* g, Py_ssize_t itemsize) noexcept nogil:
    cdef wgeom wg
    cdef dwplan pl
    cdef Py_ssize_t lddw, nrows
    if _winograd_fits(g):
        _wgeom_forward(&wg, g, itemsize)
        _wino_dw_plan(&wg, itemsize, &pl)
        return _dw_plan_bytes(&pl)
    _conv_backward_plan(g, itemsize, &pl, &lddw, &nrows)
    return _dw_plan_bytes(&pl)


# ------------------------------------------------------------------ backprop

cdef inline Py_ssize_t _derive_images(int act, floating* dx, const floating* zb,
                                      const floating* yb, Py_ssize_t hwc, Py_ssize_t nd,
                                      Py_ssize_t done) noexcept nogil:
    """The activation's derivative over images ``[nd, done)`` of ``dx`` (those
    whose last row or tile is in); returns ``done``."""
    cdef const floating* zp
    cdef const floating* yp
    while nd < done:
        zp = zb + nd * hwc if zb != NULL else NULL
        yp = yb + nd * hwc if yb != NULL else NULL
        act_backward_range(act, dx + nd * hwc, zp, yp, dx + nd * hwc, 0, hwc)
        nd += 1
    return nd


cdef void _backprop_images(int act, const geom* g, const floating* dz, const floating* w,
                           const floating* zb, const floating* yb, floating* dx, floating* dcol,
                           Py_ssize_t chunk, Py_ssize_t n0, Py_ssize_t n1) noexcept nogil:
    """Images ``[n0, n1)`` of the delta below: per chunk of rows, ``dcols = dz @
    w.T`` (BLAS), col2im into the zeroed images, then the derivative of the
    activation below over each image whose last row is in."""
    cdef Py_ssize_t pq = g.p * g.q, hwc = g.h * g.w * g.c, K = g.k, O = g.o
    cdef Py_ssize_t r0 = n0 * pq, r1 = n1 * pq, e, nz = n0, nd = n0
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
        nd = _derive_images(act, dx, zb, yb, hwc, nd, e // pq)
        r0 = e


cdef void _conv_backprop(int act, const geom* g, const floating* dz, const floating* w,
                         const floating* zb, const floating* yb, floating* dx,
                         char* ws) noexcept nogil:
    cdef wgeom wg
    if _winograd_fits(g):
        if _wino_delta_tile(g) == 4:
            _wgeom_forward(&wg, g, sizeof(floating), 4)
            _wino_delta(act, &wg, dz, w, zb, yb, dx, ws)
        else:
            _wgeom_backprop(&wg, g, sizeof(floating))
            _wino_run(1, act, &wg, dz, w, True, NULL, dx, dx, zb, yb, ws)
        return
    cdef Py_ssize_t itemsize = sizeof(floating), K = g.k, O = g.o
    cdef Py_ssize_t chunk = _chunk_rows(K, itemsize)
    cdef Py_ssize_t per = _align(chunk * K * itemsize)
    cdef int T = _threads_for(g.threads, <double>g.m * K * O, PAR_MIN_FLOPS, g.n)
    # groups of whole images (a thread owns an image: col2im adds into it), of
    # about a chunk of rows each, handed out as the threads come free
    cdef Py_ssize_t t, step = max(1, min(chunk // (g.p * g.q), _block(g.n, T)))
    if T == 1:
        _backprop_images(act, g, dz, w, zb, yb, dx, <floating*>ws, chunk, 0, g.n)
        return
    _region_enter()
    for t in prange((g.n + step - 1) // step, schedule="dynamic", num_threads=T):
        _backprop_images(act, g, dz, w, zb, yb, dx, <floating*>(ws + threadid() * per), chunk,
                         t * step, min(g.n, (t + 1) * step))
    _region_leave()



# ------------------------------------------------------------------ Winograd F(2x2 | 4x4, 3x3)
#
# A 3x3 convolution at stride 1 in r x r output tiles (r = 2 or 4): each
# tile's (r+2)x(r+2) input patch transformed (V = B^T d B), one GEMM per
# position xi of the transform and chunk of tiles (M[xi] = V[xi] @ U[xi], U =
# G w G^T, K = input channels), and the inverse transform (Y = A^T M A). Per
# output and channel pair, F(2x2, 3x3) multiplies 16/4 = 4 times and F(4x4,
# 3x3) 36/16 = 2.25 times instead of 9 (more where tiles hang over the edge:
# an 11x11 output is 36 tiles of 2x2 or 9 of 4x4, 576 or 324 products
# against 1,089; a 13x13 one 784 or 576 against 1,521). The weight gradient
# is the adjoint: S[xi] = sum over tiles of V[xi].T @ D[xi], D = A dz A^T,
# then dw = G^T S G; the delta below is the forward algorithm on dz with the
# kernel flipped and its channels swapped.
#
# Rounding: the transforms add and subtract up to 6 terms (F(4x4): with
# factors up to 8 and 1/24) before and after the GEMM, so a float32 result
# carries more rounding than im2col's dot product: tests/test_cython.py
# measures both against float64 (test_winograd_rounding) and bounds each.

ctypedef struct wgeom:
    Py_ssize_t n, h, w, ci      # the input of the transformed convolution
    Py_ssize_t p, q, co         # its output
    Py_ssize_t pt, pl           # zeros before the first input row / column
    Py_ssize_t r                # output tile side, 2 or 4
    Py_ssize_t np               # transform planes, (r + 2)**2
    Py_ssize_t th, tw           # tiles down / across an image
    Py_ssize_t tiles            # n*th*tw
    Py_ssize_t tt               # tiles per chunk
    int threads                 # as geom.threads


cdef inline Py_ssize_t _wino_tile(Py_ssize_t p, Py_ssize_t q) noexcept nogil:
    """The output tile side for a ``p x q`` output: ``WINOGRAD_TILE`` when set,
    else 4 where F(4x4)'s products (36 a tile) are at most ``WINOGRAD4_RATIO``
    of F(2x2)'s (16 a tile), counting the tiles that hang over the edge."""
    if WINOGRAD_TILE == 2 or WINOGRAD_TILE == 4:
        return WINOGRAD_TILE
    cdef double f2 = 16.0 * ((p + 1) // 2) * ((q + 1) // 2)
    cdef double f4 = 36.0 * ((p + 3) // 4) * ((q + 3) // 4)
    return 4 if f4 <= WINOGRAD4_RATIO * f2 else 2


cdef void _wgeom(wgeom* g, Py_ssize_t n, Py_ssize_t h, Py_ssize_t w, Py_ssize_t ci, Py_ssize_t p,
                 Py_ssize_t q, Py_ssize_t co, Py_ssize_t pt, Py_ssize_t pl,
                 Py_ssize_t itemsize, int threads, Py_ssize_t r) noexcept nogil:
    """``r``: the tile side of the forward pass (``_wino_tile`` of its output),
    which its delta below and dw use too."""
    g.n, g.h, g.w, g.ci, g.p, g.q, g.co, g.pt, g.pl = n, h, w, ci, p, q, co, pt, pl
    g.threads = threads
    g.r = r
    g.np = (r + 2) * (r + 2)
    g.th = (p + r - 1) // r
    g.tw = (q + r - 1) // r
    g.tiles = n * g.th * g.tw
    g.tt = WINOGRAD_CHUNK_BYTES // (g.np * (ci + co) * itemsize)
    if g.tt < 8:
        g.tt = 8


cdef inline bint _winograd_fits(const geom* g) noexcept nogil:
    return (g.kh == 3 and g.kw == 3 and g.sh == 1 and g.sw == 1
            and g.c >= WINOGRAD_MIN_CHANNELS and g.o >= WINOGRAD_MIN_CHANNELS)


cdef inline void _wgeom_forward(wgeom* wg, const geom* g, Py_ssize_t itemsize,
                                Py_ssize_t r=0) noexcept nogil:
    """The forward pass's Winograd geometry (dw's, and the adjoint delta's with
    ``r`` 4), its tile side ``r`` or ``_wino_tile``'s choice."""
    _wgeom(wg, g.n, g.h, g.w, g.c, g.p, g.q, g.o, g.top, g.left, itemsize, g.threads,
           r if r else _wino_tile(g.p, g.q))


cdef inline void _wgeom_backprop(wgeom* wg, const geom* g, Py_ssize_t itemsize) noexcept nogil:
    """The F(2x2, 3x3) delta below's: ``dz`` convolved with the flipped kernel,
    the pads turned around; its tiles cover the input's ``h x w``."""
    _wgeom(wg, g.n, g.p, g.q, g.o, g.h, g.w, g.c, 2 - g.top, 2 - g.left, itemsize, g.threads, 2)


cdef void _wino_patch(const wgeom* g, const floating* x, const floating* zero, Py_ssize_t t,
                      const floating** ptr) noexcept nogil:
    """The (r+2)**2 rows (channel vectors) of tile ``t``'s input patch; ``zero``
    where the patch hangs over the image."""
    cdef Py_ssize_t per = g.th * g.tw, n = t // per, ty = (t - n * per) // g.tw
    cdef Py_ssize_t tx = t - n * per - ty * g.tw, y0 = g.r * ty - g.pt, x0 = g.r * tx - g.pl
    cdef Py_ssize_t a, b, yy, xx, side = g.r + 2
    for a in range(side):
        yy = y0 + a
        for b in range(side):
            xx = x0 + b
            if yy >= 0 and yy < g.h and xx >= 0 and xx < g.w:
                ptr[side * a + b] = x + ((n * g.h + yy) * g.w + xx) * g.ci
            else:
                ptr[side * a + b] = zero


cdef inline Py_ssize_t _plane(Py_ssize_t n, Py_ssize_t itemsize) noexcept nogil:
    """Elements between two of the transform planes of ``n`` elements: an odd
    number of cache lines, so that the 16 streams a transform writes (or
    reads) never sit at one offset modulo 4 KB (at 128 tiles of 32 channels
    the planes were 16 KB apart and dw's transforms ran 1.2x slower: L1's 4K
    aliasing)."""
    cdef Py_ssize_t lines = (n * itemsize + 63) // 64
    return (lines | 1) * 64 // itemsize


cdef inline Py_ssize_t _planes(const wgeom* g, Py_ssize_t tt, Py_ssize_t ch,
                               Py_ssize_t itemsize) noexcept nogil:
    """Bytes of ``g.np`` planes of ``tt`` tiles by ``ch`` channels (``_plane``'s gaps)."""
    return _align(g.np * (tt * ch * itemsize + 128))


cdef inline Py_ssize_t _wino_scratch(const wgeom* g, Py_ssize_t itemsize) noexcept nogil:
    """Bytes of a thread's scratch: the outputs of a tile that fall outside the
    image, and F(4x4)'s 36 vectors between the passes of a transform."""
    return (_align(g.r * g.r * g.co * itemsize)
            + (_align(36 * max(g.ci, g.co) * itemsize) if g.r == 4 else 0))


cdef void _wino_in_chunk(const wgeom* g, const floating* x, const floating* zero,
                         floating* V, Py_ssize_t plane, Py_ssize_t t0,
                         Py_ssize_t e, floating* tmp) noexcept nogil:
    cdef const floating* ptr[36]
    cdef Py_ssize_t t
    for t in range(t0, e):
        _wino_patch(g, x, zero, t, ptr)
        if g.r == 4:
            if floating is float:
                fnn_wino4_in_f(ptr, g.ci, V + (t - t0) * g.ci, plane, tmp)
            else:
                fnn_wino4_in_d(ptr, g.ci, V + (t - t0) * g.ci, plane, tmp)
        elif floating is float:
            fnn_wino_in_f(ptr, g.ci, V + (t - t0) * g.ci, plane)
        else:
            fnn_wino_in_d(ptr, g.ci, V + (t - t0) * g.ci, plane)


cdef void _wino_conv_tiles(int mode, int act, const wgeom* g, const floating* x,
                           const floating* U, const floating* b, floating* z, floating* out,
                           const floating* zb, const floating* yb, const floating* zero,
                           floating* V, floating* M, floating* scratch, Py_ssize_t t0,
                           Py_ssize_t t1) noexcept nogil:
    """Output tiles ``[t0, t1)`` of the Winograd convolution. ``mode`` 0 (the
    forward pass): ``z = y + b``, ``out = act(z)``; mode 1 (the delta below):
    ``out = y * act'(zb or yb)``."""
    cdef Py_ssize_t e, m, t, xi, per = g.th * g.tw, n, ty, tx, yy, xx, k, CO = g.co
    cdef Py_ssize_t r = g.r, cols
    cdef floating* ys[16]
    cdef floating* tmp = <floating*>(<char*>scratch + _align(r * r * CO * sizeof(floating)))
    cdef Py_ssize_t off
    cdef Py_ssize_t vp, mp
    while t0 < t1:
        e = min(t1, t0 + g.tt)
        m = e - t0
        vp = _plane(m * g.ci, sizeof(floating))
        mp = _plane(m * CO, sizeof(floating))
        _wino_in_chunk(g, x, zero, V, vp, t0, e, tmp)
        for xi in range(g.np):
            gemm_with(_blas, c'N', c'N', <int>CO, <int>m, <int>g.ci, U + xi * g.ci * CO, <int>CO,
                      V + xi * vp, <int>g.ci, 0, M + xi * mp, <int>CO)
        for t in range(t0, e):
            n = t // per
            ty = (t - n * per) // g.tw
            tx = t - n * per - ty * g.tw
            cols = min(r, g.q - r * tx)
            for k in range(r * r):
                yy = r * ty + k // r
                xx = r * tx + k % r
                if yy < g.p and xx < g.q:
                    ys[k] = z + ((n * g.p + yy) * g.q + xx) * CO
                else:
                    ys[k] = scratch + k * CO
            if r == 4:
                if floating is float:
                    fnn_wino4_out_f(M + (t - t0) * CO, mp, CO, b if mode == 0 else NULL, ys, tmp)
                else:
                    fnn_wino4_out_d(M + (t - t0) * CO, mp, CO, b if mode == 0 else NULL, ys, tmp)
            elif floating is float:
                fnn_wino_out_f(M + (t - t0) * CO, mp, CO, b if mode == 0 else NULL,
                               ys[0], ys[1], ys[2], ys[3])
            else:
                fnn_wino_out_d(M + (t - t0) * CO, mp, CO, b if mode == 0 else NULL,
                               ys[0], ys[1], ys[2], ys[3])
            for k in range(r):          # the tile's rows of outputs inside the image
                yy = r * ty + k
                if yy >= g.p:
                    break
                off = ((n * g.p + yy) * g.q + r * tx) * CO
                if mode == 0:
                    act_forward_range(act, z + off, out + off, 0, cols * CO)
                else:
                    act_backward_range(act, z + off, zb + off if zb != NULL else NULL,
                                       yb + off if yb != NULL else NULL, z + off, 0, cols * CO)
        t0 = e


cdef void _wino_dw_tiles(const wgeom* g, const floating* x, const floating* dz,
                         const floating* zero, floating* V, floating* D, floating* tmp,
                         floating* S, double* dbt, Py_ssize_t t0, Py_ssize_t t1) noexcept nogil:
    """This thread's ``S[xi] = sum V[xi].T @ D[xi]`` and ``db`` over tiles ``[t0, t1)``
    (``g`` is the forward geometry: ``x`` in, ``dz`` out)."""
    cdef Py_ssize_t e, m, t, xi, per = g.th * g.tw, n, ty, tx, yy, xx, k, CO = g.co
    cdef Py_ssize_t r = g.r
    cdef const floating* gp[16]
    cdef bint first = True
    for k in range(CO):
        dbt[k] = 0
    if t0 >= t1:
        for k in range(g.np * g.ci * CO):
            S[k] = 0
    cdef Py_ssize_t vp, dp
    while t0 < t1:
        e = min(t1, t0 + g.tt)
        m = e - t0
        vp = _plane(m * g.ci, sizeof(floating))
        dp = _plane(m * CO, sizeof(floating))
        _wino_in_chunk(g, x, zero, V, vp, t0, e, tmp)
        for t in range(t0, e):
            n = t // per
            ty = (t - n * per) // g.tw
            tx = t - n * per - ty * g.tw
            for k in range(r * r):
                yy = r * ty + k // r
                xx = r * tx + k % r
                gp[k] = dz + ((n * g.p + yy) * g.q + xx) * CO if yy < g.p and xx < g.q else zero
            if r == 4:
                if floating is float:
                    fnn_wino4_dz_f(gp, CO, D + (t - t0) * CO, dp, dbt, tmp)
                else:
                    fnn_wino4_dz_d(gp, CO, D + (t - t0) * CO, dp, dbt, tmp)
            elif floating is float:
                fnn_wino_dz_f(gp[0], gp[1], gp[2], gp[3], CO, D + (t - t0) * CO, dp, dbt)
            else:
                fnn_wino_dz_d(gp[0], gp[1], gp[2], gp[3], CO, D + (t - t0) * CO, dp, dbt)
        for xi in range(g.np):
            gemm_with(_blas, c'N', c'T', <int>CO, <int>g.ci, <int>m, D + xi * dp, <int>CO,
                      V + xi * vp, <int>g.ci, 0 if first else 1, S + xi * g.ci * CO,
                      <int>CO)
        first = False
        t0 = e


cdef void _wino_kernel(const wgeom* g, const floating* w, Py_ssize_t C, Py_ssize_t O, bint flip,
                       floating* U, floating* tmp) noexcept nogil:
    """``U[xi] = (G g G^T)[xi]`` for every channel pair: ``U`` is ``(np, C, O)``
    with ``g = w[:, :, c, o]``, or with ``flip`` (F(2x2) only: its delta below)
    ``(np, O, C)`` with ``g = w[::-1, ::-1, c, o]`` (the transposed
    convolution's kernel, through ``tmp``)."""
    cdef floating* dst = tmp if flip else U
    if floating is float:
        if g.r == 4:
            fnn_wino4_kernel_f(w, C, O, U)
            return
        fnn_wino_kernel_f(w, C, O, flip, dst)
        if flip:
            fnn_transpose_planes_f(tmp, g.np, C, O, U)
    else:
        if g.r == 4:
            fnn_wino4_kernel_d(w, C, O, U)
            return
        fnn_wino_kernel_d(w, C, O, flip, dst)
        if flip:
            fnn_transpose_planes_d(tmp, g.np, C, O, U)


cdef void _wino_dw_out(const wgeom* g, const floating* S, Py_ssize_t C, Py_ssize_t O,
                       floating* dw) noexcept nogil:
    """``dw[:, :, c, o] = G^T S[:, c, o] G``."""
    if floating is float:
        if g.r == 4:
            fnn_wino4_dw_out_f(S, C * O, dw)
        else:
            fnn_wino_dw_out_f(S, C * O, dw)
    else:
        if g.r == 4:
            fnn_wino4_dw_out_d(S, C * O, dw)
        else:
            fnn_wino_dw_out_d(S, C * O, dw)


cdef Py_ssize_t _wino_workspace(const wgeom* g, Py_ssize_t itemsize) noexcept nogil:
    """Bytes of the forward pass (and the delta below): shared ``U``, its flipped
    copy and a zero row; per thread ``V``, ``M`` and scratch."""
    cdef Py_ssize_t shared = (2 * _align(g.np * g.ci * g.co * itemsize)
                              + _align(max(g.ci, g.co) * itemsize))
    cdef Py_ssize_t per = (_planes(g, g.tt, g.ci, itemsize) + _planes(g, g.tt, g.co, itemsize)
                           + _wino_scratch(g, itemsize))
    return shared + g.threads * per


cdef void _wino_run(int mode, int act, const wgeom* g, const floating* x, const floating* w,
                    bint flip, const floating* b, floating* z, floating* out, const floating* zb,
                    const floating* yb, char* ws) noexcept nogil:
    """The forward pass (mode 0) or the delta below (mode 1) by Winograd; the
    chunks of tiles go to the threads as they come free."""
    cdef Py_ssize_t itemsize = sizeof(floating), t, k, nch
    cdef Py_ssize_t ushare = _align(g.np * g.ci * g.co * itemsize)
    cdef Py_ssize_t shared = 2 * ushare + _align(max(g.ci, g.co) * itemsize)
    cdef Py_ssize_t vsz = _planes(g, g.tt, g.ci, itemsize), msz = _planes(g, g.tt, g.co, itemsize)
    cdef Py_ssize_t per = vsz + msz + _wino_scratch(g, itemsize)
    cdef floating* U = <floating*>ws
    cdef floating* zero = <floating*>(ws + ushare)
    cdef int T = _threads_for(g.threads, <double>g.n * g.p * g.q * g.ci * g.co * 4,
                              PAR_MIN_FLOPS, g.tiles)
    cdef wgeom gp = g[0]
    cdef char* mine
    for k in range(max(g.ci, g.co)):
        zero[k] = 0
    if flip:
        _wino_kernel(g, w, g.co, g.ci, True, U,
                     <floating*>(ws + ushare + _align(max(g.ci, g.co) * itemsize)))
    else:
        _wino_kernel(g, w, g.ci, g.co, False, U, NULL)
    if T == 1:
        mine = ws + shared
        _wino_conv_tiles(mode, act, g, x, U, b, z, out, zb, yb, zero, <floating*>mine,
                         <floating*>(mine + vsz), <floating*>(mine + vsz + msz), 0, g.tiles)
        return
    # smaller chunks when there are few (a tile's result does not depend on its chunk)
    gp.tt = min(g.tt, max(<Py_ssize_t>(64 // g.r), (g.tiles + 4 * T - 1) // (4 * T)))
    nch = (g.tiles + gp.tt - 1) // gp.tt
    _region_enter()
    for t in prange(nch, schedule="dynamic", num_threads=T):
        _wino_conv_tiles(mode, act, &gp, x, U, b, z, out, zb, yb, zero,
                         <floating*>(ws + shared + threadid() * per),
                         <floating*>(ws + shared + threadid() * per + vsz),
                         <floating*>(ws + shared + threadid() * per + vsz + msz),
                         t * gp.tt, min(g.tiles, (t + 1) * gp.tt))
    _region_leave()


cdef inline Py_ssize_t _wino_delta_tile(const geom* g) noexcept nogil:
    """The delta below's algorithm: 4, the adjoint of the forward pass's F(4x4,
    3x3) (36 products a 4x4 tile of the layer's output), or 2, F(2x2, 3x3) on
    ``dz`` with the kernel flipped (16 products a 2x2 tile of its input); by
    ``WINOGRAD_TILE`` when set, else by ``WINOGRAD4_RATIO`` as ``_wino_tile``."""
    if WINOGRAD_TILE == 2 or WINOGRAD_TILE == 4:
        return WINOGRAD_TILE
    cdef double f2 = 16.0 * ((g.h + 1) // 2) * ((g.w + 1) // 2)
    cdef double f4 = 36.0 * ((g.p + 3) // 4) * ((g.q + 3) // 4)
    return 4 if f4 <= WINOGRAD4_RATIO * f2 else 2


cdef inline Py_ssize_t _wino_delta_per(const wgeom* g, Py_ssize_t itemsize) noexcept nogil:
    """Bytes per thread of the adjoint delta: ``D`` and ``dV`` planes, the
    transforms' scratch and a sink row (patch positions outside the image)."""
    return (_planes(g, g.tt, g.co, itemsize) + _planes(g, g.tt, g.ci, itemsize)
            + _align(36 * max(g.ci, g.co) * itemsize) + _align(g.ci * itemsize))


cdef Py_ssize_t _wino_delta_workspace(const wgeom* g, Py_ssize_t itemsize) noexcept nogil:
    """Bytes of the adjoint delta: shared ``U`` and a zero row, then per thread
    ``_wino_delta_per``."""
    return (_align(g.np * g.ci * g.co * itemsize) + _align(max(g.ci, g.co) * itemsize)
            + g.threads * _wino_delta_per(g, itemsize))


cdef void _wino_delta_images(int act, const wgeom* g, const floating* dz, const floating* U,
                             const floating* zb, const floating* yb, floating* dx,
                             const floating* zero, char* mine, Py_ssize_t n0,
                             Py_ssize_t n1) noexcept nogil:
    """Images ``[n0, n1)`` of the delta below by the adjoint of the forward
    pass's F(4x4, 3x3) (``g``: its geometry, ``x`` in, ``dz`` out): per chunk
    of tiles ``D = A dz A^T``, ``dV[xi] = D[xi] @ U[xi].T`` (K = the layer's
    output channels), each tile's 6x6 patch ``+= B dV B^T`` into the zeroed
    images (patches overlap by two rows and columns: a thread owns whole
    images), then the derivative of the activation below over each image
    whose last tile is in."""
    cdef Py_ssize_t per = g.th * g.tw, hwc = g.h * g.w * g.ci, CO = g.co, C = g.ci
    cdef Py_ssize_t t0 = n0 * per, t1 = n1 * per, e, m, t, xi, n, ty, tx, yy, xx, k
    cdef Py_ssize_t nd = n0, dp, vp, y0, x0
    cdef Py_ssize_t dsz = _planes(g, g.tt, CO, sizeof(floating))
    cdef Py_ssize_t vsz = _planes(g, g.tt, C, sizeof(floating))
    cdef floating* D = <floating*>mine
    cdef floating* dV = <floating*>(mine + dsz)
    cdef floating* tmp = <floating*>(mine + dsz + vsz)
    cdef floating* sink = <floating*>(mine + dsz + vsz
                                      + _align(36 * max(C, CO) * sizeof(floating)))
    cdef const floating* gp[16]
    cdef floating* pp[36]
    memset(dx + n0 * hwc, 0, (n1 - n0) * hwc * sizeof(floating))
    while t0 < t1:
        e = min(t1, t0 + g.tt)
        m = e - t0
        dp = _plane(m * CO, sizeof(floating))
        vp = _plane(m * C, sizeof(floating))
        for t in range(t0, e):
            n = t // per
            ty = (t - n * per) // g.tw
            tx = t - n * per - ty * g.tw
            for k in range(16):
                yy = 4 * ty + k // 4
                xx = 4 * tx + k % 4
                gp[k] = dz + ((n * g.p + yy) * g.q + xx) * CO if yy < g.p and xx < g.q else zero
            if floating is float:
                fnn_wino4_dz_f(gp, CO, D + (t - t0) * CO, dp, NULL, tmp)
            else:
                fnn_wino4_dz_d(gp, CO, D + (t - t0) * CO, dp, NULL, tmp)
        for xi in range(36):
            gemm_with(_blas, c'T', c'N', <int>C, <int>m, <int>CO, U + xi * C * CO, <int>CO,
                      D + xi * dp, <int>CO, 0, dV + xi * vp, <int>C)
        for t in range(t0, e):
            n = t // per
            ty = (t - n * per) // g.tw
            tx = t - n * per - ty * g.tw
            y0 = 4 * ty - g.pt
            x0 = 4 * tx - g.pl
            for k in range(36):
                yy = y0 + k // 6
                xx = x0 + k % 6
                if yy >= 0 and yy < g.h and xx >= 0 and xx < g.w:
                    pp[k] = dx + ((n * g.h + yy) * g.w + xx) * C
                else:
                    pp[k] = sink
            if floating is float:
                fnn_wino4_in_adj_f(dV + (t - t0) * C, vp, C, pp, tmp)
            else:
                fnn_wino4_in_adj_d(dV + (t - t0) * C, vp, C, pp, tmp)
        nd = _derive_images(act, dx, zb, yb, hwc, nd, e // per)
        t0 = e


cdef void _wino_delta(int act, const wgeom* g, const floating* dz, const floating* w,
                      const floating* zb, const floating* yb, floating* dx,
                      char* ws) noexcept nogil:
    """The delta below by the adjoint of F(4x4, 3x3): groups of whole images
    handed to the threads as they come free."""
    cdef Py_ssize_t itemsize = sizeof(floating), k, t, step
    cdef Py_ssize_t ushare = _align(g.np * g.ci * g.co * itemsize)
    cdef Py_ssize_t shared = ushare + _align(max(g.ci, g.co) * itemsize)
    cdef Py_ssize_t per = _wino_delta_per(g, itemsize)
    cdef floating* U = <floating*>ws
    cdef floating* zero = <floating*>(ws + ushare)
    cdef int T = _threads_for(g.threads, <double>g.n * g.p * g.q * g.ci * g.co * 4,
                              PAR_MIN_FLOPS, g.n)
    for k in range(max(g.ci, g.co)):
        zero[k] = 0
    _wino_kernel(g, w, g.ci, g.co, False, U, NULL)
    if T == 1:
        _wino_delta_images(act, g, dz, U, zb, yb, dx, zero, ws + shared, 0, g.n)
        return
    # about 4 groups a thread, each at most a chunk of tiles
    step = max(1, min(g.tt // (g.th * g.tw), (g.n + 4 * T - 1) // (4 * T)))
    _region_enter()
    for t in prange((g.n + step - 1) // step, schedule="dynamic", num_threads=T):
        _wino_delta_images(act, g, dz, U, zb, yb, dx, zero, ws + shared + threadid() * per,
                           t * step, min(g.n, (t + 1) * step))
    _region_leave()


cdef void _wino_dw_plan(const wgeom* g, Py_ssize_t itemsize, dwplan* pl) noexcept nogil:
    """Units of ``dw`` over the tiles: shared zero row and sum; per unit ``S`` and
    ``db``; per thread ``V``, ``D`` and scratch."""
    cdef Py_ssize_t nxi = g.np * g.ci * g.co
    _dw_plan(pl, g.threads, <double>g.n * g.p * g.q * g.ci * g.co * 4, g.tiles, 128,
             _align(nxi * itemsize) + _align(max(g.ci, g.co) * itemsize),
             _align(nxi * itemsize) + _align(g.co * sizeof(double)),
             _planes(g, g.tt, g.ci, itemsize) + _planes(g, g.tt, g.co, itemsize)
             + _wino_scratch(g, itemsize))


cdef void _wino_dw_unit(const wgeom* g, const dwplan* pl, const floating* x, const floating* dz,
                        const floating* zero, char* ws, Py_ssize_t u, Py_ssize_t t) noexcept nogil:
    cdef Py_ssize_t nxi = g.np * g.ci * g.co
    cdef char* mine = ws + pl.shared + u * pl.unit
    cdef char* scratch = ws + pl.shared + pl.U * pl.unit + t * pl.thread
    cdef Py_ssize_t vsz = _planes(g, g.tt, g.ci, sizeof(floating))
    cdef Py_ssize_t dsz = _planes(g, g.tt, g.co, sizeof(floating))
    _wino_dw_tiles(g, x, dz, zero, <floating*>scratch, <floating*>(scratch + vsz),
                   <floating*>(scratch + vsz + dsz + _align(g.r * g.r * g.co * sizeof(floating))),
                   <floating*>mine, <double*>(mine + _align(nxi * sizeof(floating))),
                   u * pl.parts // pl.U, (u + 1) * pl.parts // pl.U)


cdef void _wino_backward(const wgeom* g, const floating* x, const floating* dz, floating* dw,
                         floating* db, char* ws) noexcept nogil:
    """``dw`` and ``db`` by Winograd: units of tiles (``_dw_plan``), each summing
    ``S[xi] = V[xi].T @ D[xi]`` into its own buffer, then ``S`` in unit order
    and ``dw = G^T S G``."""
    cdef Py_ssize_t itemsize = sizeof(floating), u, k, CO = g.co, nxi = g.np * g.ci * g.co
    cdef Py_ssize_t ssz = _align(nxi * itemsize)
    cdef dwplan pl
    cdef floating* S = <floating*>ws
    cdef floating* zero = <floating*>(ws + ssz)
    cdef double sd
    cdef char* base
    _wino_dw_plan(g, itemsize, &pl)
    base = ws + pl.shared
    for k in range(max(g.ci, g.co)):
        zero[k] = 0
    if pl.T == 1:
        for u in range(pl.U):
            _wino_dw_unit(g, &pl, x, dz, zero, ws, u, 0)
    else:
        _region_enter()
        for u in prange(pl.U, schedule="dynamic", num_threads=pl.T):
            _wino_dw_unit(g, &pl, x, dz, zero, ws, u, threadid())
        _region_leave()
    _sum_units(<floating*>base, pl.unit // itemsize, pl.U, nxi, S)
    _wino_dw_out(g, S, g.ci, g.co, dw)
    for k in range(CO):
        sd = (<double*>(base + ssz))[k]
        for u in range(1, pl.U):
            sd = sd + (<double*>(base + u * pl.unit + ssz))[k]
        db[k] = <floating>sd


cdef Py_ssize_t _backprop_workspace(const geom* g, Py_ssize_t itemsize) noexcept nogil:
    cdef wgeom wg
    if _winograd_fits(g):
        if _wino_delta_tile(g) == 4:
            _wgeom_forward(&wg, g, itemsize, 4)
            return _wino_delta_workspace(&wg, itemsize)
        _wgeom_backprop(&wg, g, itemsize)
        return _wino_workspace(&wg, itemsize)
    return g.threads * _align(_chunk_rows(g.k, itemsize) * g.k * itemsize)


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
    cdef Py_ssize_t koff[64]
    cdef bint small = ph * pw <= 64
    if small:           # the window's elements relative to its first
        for k in range(ph * pw):
            i = k // pw
            koff[k] = (i * W + k - i * pw) * C
    for row in range(a, b):
        n = row // P
        p = row - n * P
        for q in range(Q):
            o = out + (row * Q + q) * C
            ai = am + (row * Q + q) * C
            s0 = x + ((n * H + p * sh) * W + q * sw) * C
            if small:
                if floating is float:
                    fnn_pool_px_f(s0, koff, <int>(ph * pw), C, o, ai)
                else:
                    fnn_pool_px_d(s0, koff, <int>(ph * pw), C, o, ai)
                continue
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
    cdef floating zero = 0, one = 1
    cdef floating* o
    cdef const floating* d
    cdef const int32_t* ai
    cdef const floating* yr
    cdef int32_t k
    cdef bint rowin
    cdef bint relu = act == ACT_RELU and yb != NULL
    for row in range(a, b):
        n = row // H
        h = row - n * H
        p = h // sh
        i = h - p * sh
        rowin = p < P and i < ph
        o = out + row * wc
        yr = yb + row * wc if yb != NULL else NULL
        q = 0
        j = 0
        for w in range(W):      # q = w // sw, j = w % sw, kept incrementally
            if rowin and q < Q and j < pw:
                k = <int32_t>(i * pw + j)
                d = dy + ((n * P + p) * Q + q) * C
                ai = am + ((n * P + p) * Q + q) * C
                # with ReLU below, its derivative in the same pass: g * (y > 0)
                if floating is float:
                    fnn_pool_back_px_f(d, ai, k, yr + w * C if relu else NULL, C, o + w * C)
                else:
                    fnn_pool_back_px_d(d, ai, k, yr + w * C if relu else NULL, C, o + w * C)
            else:
                for c in range(C):
                    o[w * C + c] = zero
            j += 1
            if j == sw:
                j = 0
                q += 1
        if not relu:
            act_backward_range(act, o, zb + row * wc if zb != NULL else NULL, yr, o, 0, wc)


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
            _region_enter()
            for c in prange(chunks, schedule="static", num_threads=chunks):
                _dropout_range(xp, op, seed, threshold, s, min(n, c * step),
                               min(n, (c + 1) * step))
            _region_leave()


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
    if not _quiet_ready:
        _check_quiet()
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
    cdef int T = _threads_for(_num_threads, <double>N * P * Q * C * ph * pw, PAR_MIN_POOL, N * P)
    cdef Py_ssize_t t, step = _block(N * P, T)
    with nogil:
        if T == 1:
            _pool_rows(xp, op, ap, H, W, C, P, Q, ph, pw, sh, sw, 0, N * P)
        else:
            _region_enter()
            for t in prange((N * P + step - 1) // step, schedule="dynamic", num_threads=T):
                _pool_rows(xp, op, ap, H, W, C, P, Q, ph, pw, sh, sw, t * step,
                           min(N * P, (t + 1) * step))
            _region_leave()


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
    cdef int T = _threads_for(_num_threads, <double>N * H * W * C, PAR_MIN_POOL, parts)
    cdef Py_ssize_t t, step = _block(parts, T)
    with nogil:
        if T == 1:
            if overlap:
                _pool_back_images(act, dp, ap, zp, yp, op, H, W, C, P, Q, ph, pw, sh, sw, 0, N)
            else:
                _pool_back_rows(act, dp, ap, zp, yp, op, H, W, C, P, Q, ph, pw, sh, sw, 0, N * H)
        else:
            _region_enter()
            for t in prange((parts + step - 1) // step, schedule="dynamic", num_threads=T):
                if overlap:
                    _pool_back_images(act, dp, ap, zp, yp, op, H, W, C, P, Q, ph, pw, sh, sw,
                                      t * step, min(parts, (t + 1) * step))
                else:
                    _pool_back_rows(act, dp, ap, zp, yp, op, H, W, C, P, Q, ph, pw, sh, sw,
                                    t * step, min(parts, (t + 1) * step))
            _region_leave()


# ------------------------------------------------------------------ the contract's kernels

_EMPTY4 = {4: np.empty((0, 0, 0, 0), "float32"), 8: np.empty((0, 0, 0, 0), "float64")}


def _winograd_tiles(xshape, wshape, stride=(1, 1), padding=(0, 0, 0, 0)):
    """``(forward, backprop)``: the Winograd output tile side (2 or 4) that
    ``conv2d_forward`` and ``conv2d_backward`` (the first) and
    ``conv2d_backprop`` (the second) use at this geometry with the current
    settings, 0 where they do not use Winograd (tests: F(4x4, 3x3) rounds more)."""
    cdef geom g
    n, h, w, c = xshape
    kh, kw = wshape[0], wshape[1]
    top, bottom, left, right = padding
    p = (h + top + bottom - kh) // stride[0] + 1
    q = (w + left + right - kw) // stride[1] + 1
    _geometry(&g, tuple(xshape), tuple(wshape), (n, p, q, wshape[3]), stride, padding)
    if not _winograd_fits(&g):
        return 0, 0
    return _wino_tile(g.p, g.q), _wino_delta_tile(&g)


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
    if not _quiet_ready:
        _check_quiet()
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
    if not _quiet_ready:
        _check_quiet()
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
    if not _quiet_ready:
        _check_quiet()
    _ensure_blas()
    cdef int code = act_code(act)
    cdef geom g
    cdef int size = dz.dtype.itemsize
    _geometry(&g, out.shape, w.shape, dz.shape, stride, padding)
    cdef char* ws = _workspace(_backprop_workspace(&g, size))
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
    if not _quiet_ready:
        _check_quiet()
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
    if not _quiet_ready:
        _check_quiet()
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
