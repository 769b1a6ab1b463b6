# cython: language_level=3
"""Shared inline helpers of the Cython backend: vectorizable math, the
activations and their derivatives over raw-pointer ranges, and the thread
chunking every parallel loop uses.

Everything here is ``cdef inline``: each ``_cy_*.pyx`` that cimports it gets
its own copy, written once. The math is built so that gcc vectorizes the loops
that call it at ``-O3`` without ``-ffast-math`` (no libm calls, no branches
that cannot be if-converted, no float reductions inside a vector loop):

* ``vexp``: exp by range reduction ``x = n*ln2 + r`` (Cody-Waite, two
  constants), a polynomial (float32: Cephes ``expf``, ~1 ulp) or a Pade
  rational (float64: Cephes ``exp``, ~1 ulp) for ``exp(r)``, and ``2^n`` built
  from exponent bits (``memcpy`` bit casts, which compile to register moves).
  ``n`` is split in two halves so that the subnormal range comes out right;
  the argument is clamped so that overflow gives ``inf`` and underflow ``0``;
  NaN propagates through the polynomial.
* ``vtanh``: Cephes' odd polynomial (float32) / rational (float64) below
  ``|x| = 0.625``, ``(1-e)/(1+e)`` with ``e = exp(-2|x|)`` above, blended by a
  select.
* GELU as ``z*sigmoid(2u)`` (``gelu_halves``), as the reference computes it.
* ``vsigmoid``: ``e = exp(-|z|)``, ``(z >= 0 ? 1 : e) / (1 + e)``: full
  relative accuracy in the negative tail; ``sigmoid(-inf) = 0``.
* ``vlog1p_unit``: ``log1p(u)`` for ``u`` in ``[0, 1]`` (softplus, BCE) as
  ``2*atanh(s)``, ``s = u/(2+u)``, a series in ``s^2 <= 1/9`` (no cancellation).
"""

from cython cimport floating
from libc.math cimport copysign, copysignf
from cython.parallel cimport prange

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #ifdef _OPENMP
    #define FASTNN_OPENMP 1
    #else
    #define FASTNN_OPENMP 0
    #endif
    /* 2^n for an integer-valued n (float32: n in [-126, 127]; float64: n in
       [-1022, 1023]): add the rounding constant 1.5*2^mant so that n lands in
       the low mantissa bits, then move it into the exponent field. */
    /* a*b + c in one rounding where the target has FMA (the x86-64-v3/v4
       variants, ARM), as two roundings elsewhere (baseline x86-64, where
       fmaf would be a slow library call). Only the polynomials of the math
       below use it: it makes them faster and no less accurate. */
    #if defined(__FMA__) || defined(__aarch64__)
    #define FASTNN_HAS_FMA 1
    #define fastnn_fmaf(a, b, c) __builtin_fmaf((a), (b), (c))
    #define fastnn_fma(a, b, c) __builtin_fma((a), (b), (c))
    #else
    #define FASTNN_HAS_FMA 0
    #define fastnn_fmaf(a, b, c) ((a) * (b) + (c))
    #define fastnn_fma(a, b, c) ((a) * (b) + (c))
    #endif
    #define FASTNN_LEAKY_SLOPE 0.01
    #define FASTNN_GELU_C 0.7978845608028654   /* sqrt(2/pi) */
    #define FASTNN_GELU_A 0.044715
    static inline float fastnn_pow2f(float n) {
        float k = n + 12582912.0f;               /* 0x4B400000 */
        uint32_t u;
        memcpy(&u, &k, 4);
        u = (u - 0x4B400000u + 127u) << 23;
        memcpy(&k, &u, 4);
        return k;
    }
    static inline double fastnn_pow2d(double n) {
        double k = n + 6755399441055744.0;       /* 0x4338000000000000 */
        uint64_t u;
        memcpy(&u, &k, 8);
        u = (u - 0x4338000000000000ull + 1023ull) << 52;
        memcpy(&k, &u, 8);
        return k;
    }
    """
    int FASTNN_OPENMP
    # the reference's constants (kernels/reference.py)
    double LEAKY_SLOPE "FASTNN_LEAKY_SLOPE"
    double GELU_C "FASTNN_GELU_C"
    double GELU_A "FASTNN_GELU_A"
    float fastnn_pow2f(float n) noexcept nogil
    double fastnn_pow2d(double n) noexcept nogil
    int FASTNN_HAS_FMA
    float fastnn_fmaf(float a, float b, float c) noexcept nogil
    double fastnn_fma(double a, double b, double c) noexcept nogil


# ------------------------------------------------------------------ threads

cdef inline Py_ssize_t n_chunks(Py_ssize_t work, Py_ssize_t min_work, int threads) noexcept nogil:
    """How many static chunks to split ``work`` into: 1 (serial) below
    ``min_work`` or with one thread, else ``threads``."""
    if threads <= 1 or work < min_work:
        return 1
    return threads


cdef inline Py_ssize_t chunk_step(Py_ssize_t n, Py_ssize_t chunks) noexcept nogil:
    """Chunk length, rounded up to 16 elements (whole vectors, own cache lines)."""
    cdef Py_ssize_t step = (n + chunks - 1) // chunks
    return (step + 15) & ~(<Py_ssize_t>15)


# ------------------------------------------------------------------ math

# Cython writes a bare literal as a C double (``1.0``), which would promote
# float32 arithmetic to double: every constant below is a typed local
# (``one``, ``two``, ...) or cast with ``<floating>``; the compiler folds them.

cdef inline floating fma(floating a, floating b, floating c) noexcept nogil:
    """``a*b + c``, fused where the target has FMA (see ``fastnn_fmaf``)."""
    if floating is float:
        return fastnn_fmaf(a, b, c)
    return fastnn_fma(a, b, c)


cdef inline floating vexp(floating x) noexcept nogil:
    """``exp(x)``, vectorizable, IEEE at the edges (see the module docstring)."""
    cdef floating n, r, p, xx, px, lo, hi, shift, half = 0.5, one = 1, two = 2
    if floating is float:
        # clamp: exp(-104) rounds to 0 and exp(89) overflows to inf; NaN passes
        lo = -104.0
        hi = 89.0
        shift = 12582912.0      # 1.5*2^23: adding it rounds to an integer
        x = lo if x < lo else x
        x = hi if x > hi else x
        n = (x * <float>1.44269504088896341 + shift) - shift
        r = x - n * <float>0.693359375
        r = r - n * <float>-2.12194440e-4
        p = fma(fma(fma(fma(fma(<float>1.9875691500E-4, r, <float>1.3981999507E-3), r,
                            <float>8.3334519073E-3), r, <float>4.1665795894E-2), r,
                    <float>1.6666665459E-1), r, <float>5.0000001201E-1)
        p = fma(p, r * r, r) + one
        xx = (n * half + shift) - shift
        return (p * fastnn_pow2f(xx)) * fastnn_pow2f(n - xx)
    else:
        lo = -746.0
        hi = 710.0
        shift = 6755399441055744.0   # 1.5*2^52
        x = lo if x < lo else x
        x = hi if x > hi else x
        n = (x * 1.4426950408889634074 + shift) - shift
        r = x - n * 6.93145751953125E-1
        r = r - n * 1.42860682030941723212E-6
        xx = r * r
        px = r * fma(fma(<double>1.26177193074810590878E-4, xx, 3.02994407707441961300E-2), xx,
                     9.99999999999999999910E-1)
        p = one + two * (px / (fma(fma(fma(<double>3.00198505138664455042E-6, xx,
                                           2.52448340349684104192E-3), xx,
                                       2.27265548208155028766E-1), xx,
                                   2.00000000000000000009E0) - px))
        xx = (n * half + shift) - shift
        return (p * fastnn_pow2d(xx)) * fastnn_pow2d(n - xx)


cdef inline floating vtanh(floating x) noexcept nogil:
    """``tanh(x)``, vectorizable: ``tanh(+-inf) = +-1``, ``tanh(-0) = -0``, NaN in
    gives NaN out.

    float32: ``a*P(a^2)/Q(a^2)`` for ``a = min(|x|, 9)`` (degrees 12/6 in ``a``,
    the fit numba_cpu's ``_tanh32`` uses: relative error 6.8e-9 in exact
    arithmetic, so float32 rounding dominates: over every float32 input at
    most 5.84 ulp of the exact value in the baseline build, 5.48 with FMA in
    v3/v4, not monotone within that; exactly +-1 first at ``|x|`` = 7.9746
    (baseline) or 8.0192 (FMA), always from 9 on; NumPy's float32 tanh from
    9.0109), capped at 1, with the sign of ``x``: no exp, one division. float64: Cephes' rational below
    ``|x| = 0.625``, ``(1-e)/(1+e)`` with ``e = exp(-2|x|)`` above."""
    cdef floating zero = 0, one = 1, cut = 0.625
    cdef floating nx = -x
    cdef floating a = nx if x < zero else x
    cdef floating s, small, big, e, t, p, q
    if floating is float:
        a = <float>9.0 if a > <float>9.0 else a
        s = a * a
        p = fma(fma(fma(fma(fma(fma(<float>-8.495948331325435e-14, s,
                                    <float>5.280828463159531e-11), s,
                                <float>-2.0231339254149916e-08), s,
                            <float>1.1155844725058647e-05), s, <float>0.00310410505045857), s,
                    <float>0.13084144022594307), s, <float>0.9999999935599421)
        q = fma(fma(fma(<float>0.0002546360753548572, s, <float>0.024495773165404498), s,
                    <float>0.46417471187381487), s, one)
        t = a * p / q
        t = one if t > one else t
    else:
        s = a * a
        small = a + a * s * (((-9.64399179425052238628E-1 * s - 9.92877231001918586564E1) * s
                              - 1.61468768441708447952E3)
                             / (((s + 1.12811678491632931402E2) * s
                                 + 2.23548839060100448583E3) * s + 4.84406305325125486048E3))
        e = vexp(-(a + a))
        big = (one - e) / (one + e)
        t = small if a < cut else big
    if floating is float:
        return copysignf(t, x)
    return copysign(t, x)


cdef inline floating vsigmoid(floating z) noexcept nogil:
    """``1 / (1 + exp(-z))`` as ``(z >= 0 ? 1 : e) / (1 + e)``, ``e = exp(-|z|)``."""
    cdef floating zero = 0, one = 1
    cdef floating nz = -z
    cdef floating e = vexp(z if z < zero else nz)
    cdef floating num = one if z >= zero else e
    return num / (one + e)


cdef inline floating vlog1p_unit(floating u) noexcept nogil:
    """``log1p(u)`` for ``u`` in ``[0, 1]`` (and inf/NaN as IEEE): ``2*atanh(s)``
    with ``s = u/(2+u)``, a series in ``s^2 <= 1/9``."""
    cdef floating two = 2
    cdef floating s = u / (two + u)
    cdef floating t = s * s
    cdef floating q
    if floating is float:
        q = ((((((<float>(1.0 / 15) * t + <float>(1.0 / 13)) * t + <float>(1.0 / 11)) * t
                + <float>(1.0 / 9)) * t + <float>(1.0 / 7)) * t + <float>(1.0 / 5)) * t
             + <float>(1.0 / 3)) * t
    else:
        q = (((((((((((((((1.0 / 33 * t + 1.0 / 31) * t + 1.0 / 29) * t + 1.0 / 27) * t
                        + 1.0 / 25) * t + 1.0 / 23) * t + 1.0 / 21) * t + 1.0 / 19) * t
                   + 1.0 / 17) * t + 1.0 / 15) * t + 1.0 / 13) * t + 1.0 / 11) * t
               + 1.0 / 9) * t + 1.0 / 7) * t + 1.0 / 5) * t + 1.0 / 3) * t
    return (s + s) + (s + s) * q


# ------------------------------------------------------------------ activations

cdef enum:
    ACT_IDENTITY = 0
    ACT_RELU = 1
    ACT_LEAKY_RELU = 2
    ACT_SIGMOID = 3
    ACT_TANH = 4
    ACT_GELU = 5
    ACT_SILU = 6
    ACT_SOFTPLUS = 7


cdef inline int act_code(str act) except -1:
    """The ``ACT_*`` code of an activation name (``ValueError`` if unknown)."""
    if act == "relu":
        return ACT_RELU
    if act == "identity":
        return ACT_IDENTITY
    if act == "sigmoid":
        return ACT_SIGMOID
    if act == "tanh":
        return ACT_TANH
    if act == "leaky_relu":
        return ACT_LEAKY_RELU
    if act == "gelu":
        return ACT_GELU
    if act == "silu":
        return ACT_SILU
    if act == "softplus":
        return ACT_SOFTPLUS
    raise ValueError(f"unknown activation {act!r}")


cdef inline bint act_is_transcendental(int act) noexcept nogil:
    return act >= ACT_SIGMOID


cdef inline floating gelu_halves(floating z, floating* q) noexcept nogil:
    """``s = sigmoid(2u)`` of the tanh-form GELU, ``u = c*(z + a*z^3)`` (the
    reference's order), and ``q = sigmoid(-2u) = 1 - s`` into ``q``.

    ``0.5*(1 + tanh(u)) = s`` and ``1 - tanh(u)^2 = 4*s*q``: both without the
    cancellation of ``1 + tanh(u)`` near ``tanh(u) = -1``. One ``exp(-2|u|)``
    serves both halves."""
    cdef floating zero = 0, one = 1
    cdef floating u = (((z * z) * <floating>GELU_A + one) * z) * <floating>(2 * GELU_C)
    cdef floating nu = -u
    cdef floating e = vexp(u if u < zero else nu)
    cdef floating r = one / (one + e)
    cdef floating lo = e * r, hi = r
    q[0] = lo if u >= zero else hi
    return hi if u >= zero else lo


cdef inline void act_forward_range(int act, const floating* z, floating* out,
                                   Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """``out[i] = act(z[i])`` for ``lo <= i < hi``; ``out`` may be ``z``."""
    cdef Py_ssize_t i
    cdef floating v, t, s
    cdef floating zero = 0, one = 1, half = 0.5, slope = LEAKY_SLOPE
    if act == ACT_IDENTITY:
        if out != z:
            for i in range(lo, hi):
                out[i] = z[i]
    elif act == ACT_RELU:
        for i in range(lo, hi):
            v = z[i]
            out[i] = zero if v <= zero else v          # NaN passes, as np.maximum
    elif act == ACT_LEAKY_RELU:
        for i in range(lo, hi):
            v = z[i]
            t = v * slope
            out[i] = t if v <= zero else v
    elif act == ACT_SIGMOID:
        for i in range(lo, hi):
            out[i] = vsigmoid(z[i])
    elif act == ACT_TANH:
        for i in range(lo, hi):
            out[i] = vtanh(z[i])
    elif act == ACT_GELU:
        # 0.5*z*(1 + tanh(u)) = z*sigmoid(2u)
        for i in range(lo, hi):
            v = z[i]
            out[i] = v * gelu_halves(v, &t)
    elif act == ACT_SILU:
        for i in range(lo, hi):
            v = z[i]
            out[i] = v * vsigmoid(v)
    elif act == ACT_SOFTPLUS:
        for i in range(lo, hi):
            v = z[i]
            t = -v
            t = vexp(v if v < zero else t)
            s = v if v > zero else zero
            out[i] = s + vlog1p_unit(t)


cdef inline void bias_act_rows(int act, floating* z, const floating* b, floating* out,
                               Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t n) noexcept nogil:
    """The epilogue after a GEMM, rows ``r0 <= r < r1`` of width ``n``:
    ``z[r] += b``, ``out[r] = act(z[r])`` (``out`` may be ``z``); the row stays
    in L1 between the two loops."""
    cdef Py_ssize_t r, j
    cdef floating* zr
    for r in range(r0, r1):
        zr = z + r * n
        for j in range(n):
            zr[j] = zr[j] + b[j]
        act_forward_range(act, zr, out + r * n, 0, n)


cdef inline void act_backward_range(int act, const floating* dy, const floating* z,
                                    const floating* y, floating* out,
                                    Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """``out[i] = dy[i] * act'(z[i])`` for ``lo <= i < hi``, from ``y`` for
    identity/relu/sigmoid/tanh and from ``z`` for the others; ``out`` may be
    ``dy`` or ``z``."""
    cdef Py_ssize_t i
    cdef floating v, t, s, d
    cdef floating zero = 0, one = 1, half = 0.5, slope = LEAKY_SLOPE
    cdef floating c2 = 2 * GELU_C, a3 = 3 * GELU_A
    if act == ACT_IDENTITY:
        if out != dy:
            for i in range(lo, hi):
                out[i] = dy[i]
    elif act == ACT_RELU:
        for i in range(lo, hi):
            out[i] = dy[i] * (one if y[i] > zero else zero)
    elif act == ACT_SIGMOID:
        for i in range(lo, hi):
            v = y[i]
            out[i] = dy[i] * (v * (one - v))
    elif act == ACT_TANH:
        for i in range(lo, hi):
            v = y[i]
            out[i] = dy[i] * (one - v * v)
    elif act == ACT_LEAKY_RELU:
        for i in range(lo, hi):
            out[i] = dy[i] * (one if z[i] > zero else slope)
    elif act == ACT_GELU:
        # 0.5*(1+t) + 0.5*z*(1-t^2)*c*(1 + 3a*z^2), t = tanh(u); with
        # 0.5*(1+t) = s and 1-t^2 = 4*s*q: s*(1 + 2*z*q*c*(1 + 3a*z^2)), in the
        # reference's order
        for i in range(lo, hi):
            v = z[i]
            t = gelu_halves(v, &s)
            d = ((((v * v) * a3 + one) * c2) * v) * s
            out[i] = dy[i] * ((d + one) * t)
    elif act == ACT_SILU:
        for i in range(lo, hi):
            v = z[i]
            s = vsigmoid(v)
            out[i] = dy[i] * ((((one - s) * v) + one) * s)
    elif act == ACT_SOFTPLUS:
        for i in range(lo, hi):
            out[i] = dy[i] * vsigmoid(z[i])


cdef inline void act_forward(int act, const floating* z, floating* out, Py_ssize_t n,
                             Py_ssize_t chunks) noexcept nogil:
    """``out = act(z)`` over ``n`` elements, in ``chunks`` static parallel chunks
    (1: serially, no parallel region)."""
    cdef Py_ssize_t c, step
    if chunks <= 1:
        act_forward_range(act, z, out, 0, n)
        return
    step = chunk_step(n, chunks)
    for c in prange(chunks, schedule="static", num_threads=chunks):
        act_forward_range(act, z, out, min(n, c * step), min(n, (c + 1) * step))


cdef inline void act_backward(int act, const floating* dy, const floating* z,
                              const floating* y, floating* out, Py_ssize_t n,
                              Py_ssize_t chunks) noexcept nogil:
    """``out = dy * act'(z)`` over ``n`` elements, in ``chunks`` static chunks."""
    cdef Py_ssize_t c, step
    if chunks <= 1:
        act_backward_range(act, dy, z, y, out, 0, n)
        return
    step = chunk_step(n, chunks)
    for c in prange(chunks, schedule="static", num_threads=chunks):
        act_backward_range(act, dy, z, y, out, min(n, c * step), min(n, (c + 1) * step))


cdef inline double sum_range(const floating* a, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """``sum(a[lo:hi])`` accumulated in double, eight partial sums (which the
    compiler vectorizes; a plain running sum would be latency-bound)."""
    cdef double acc[8]
    cdef Py_ssize_t i = lo, l
    for l in range(8):
        acc[l] = 0
    while i + 8 <= hi:
        for l in range(8):
            acc[l] += a[i + l]
        i += 8
    while i < hi:
        acc[0] += a[i]
        i += 1
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
