"""Scalar math of the numba backend, compiled into the loops that call it:
typed constants and bit casts, our vectorizable ``exp``, ``tanh`` and
``log1p``, ``sign`` and ``maximum`` as NumPy defines them, and the eight
activations with their derivatives (the counterpart of ``_cy_math.pxd``).
"""

import math

import numpy as np

from ._runtime import _scalar, _scalar_fma  # first: sets the cache folder before numba loads

import numba  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import types  # noqa: E402
from numba.extending import intrinsic, overload  # noqa: E402

# ------------------------------------------------------------ typed constants, bit casts

def _c(x, value):
    """``value`` as the type of ``x`` (a float32 kernel must not compute in
    float64: numba types ``float32 * 0.5`` as float64)."""
    return value


@overload(_c, inline="always")
def _c_overload(x, value):
    to = x

    def impl(x, value):
        return to(value)

    return impl


@intrinsic
def _bits(typingctx, x):
    """The bits of a float as a signed integer of its width."""
    ity = {types.float32: types.int32, types.float64: types.int64}.get(x)
    if ity is None:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(ity))

    return ity(x), codegen


def _use_ldexp():
    """Whether ``p * 2**n`` can be LLVM's ``ldexp``: one ``vscalef`` instruction
    on AVX-512 (LLVM >= 16); elsewhere LLVM would call libm per element."""
    from llvmlite import binding

    if binding.llvm_version_info < (16,):
        return False
    if numba.config.CPU_NAME:  # compiling for a named CPU: trust its features only
        return "+avx512f" in (numba.config.CPU_FEATURES or "")
    return bool(binding.get_host_cpu_features().get("avx512f"))


_LDEXP = _use_ldexp()


@intrinsic
def _scale2(typingctx, p, n):
    """``p * 2**n`` for a float ``p`` and an integer ``n`` in [-1100, 1100]:
    ``ldexp`` where it is one instruction, else two exact power-of-two
    factors built from their bits (so that a denormal result rounds once and
    an overflow gives inf)."""
    width = {types.float32: (32, 23, 127), types.float64: (64, 52, 1023)}.get(p)
    if width is None or not isinstance(n, types.Integer):
        return None
    bits, mantissa, bias = width

    def codegen(context, builder, signature, args):
        fty = context.get_value_type(p)
        i = args[1]
        if _LDEXP:
            i32 = ir.IntType(32)
            i = builder.trunc(i, i32) if i.type.width > 32 else builder.sext(i, i32) \
                if i.type.width < 32 else i
            name = f"llvm.ldexp.f{bits}.i32"
            fn = builder.module.globals.get(name) or ir.Function(
                builder.module, ir.FunctionType(fty, [fty, i32]), name=name)
            return builder.call(fn, [args[0], i])
        ity = ir.IntType(bits)
        if i.type.width > bits:
            i = builder.trunc(i, ity)
        elif i.type.width < bits:
            i = builder.sext(i, ity)
        half = builder.ashr(i, ity(1))
        result = args[0]
        for k in (half, builder.sub(i, half)):
            k = builder.shl(builder.add(k, ity(bias)), ity(mantissa))
            result = builder.fmul(result, builder.bitcast(k, fty))
        return result

    return p(p, n), codegen


# ------------------------------------------------------------ exp, tanh, log1p

# exp(x) = 2**n * exp(r), n = round(x/ln2), r = x - n*ln2 (ln2 split in two so
# that n*LN2_HI is exact), exp(r) by a polynomial on |r| <= ln2/2. n comes from
# the bits of x/ln2 + 1.5*2**mantissa_bits (round to nearest, no float->int
# conversion, so NaN stays defined); _scale2 applies 2**n with IEEE overflow
# and gradual underflow. x is clamped first (NaN passes the clamp:
# comparisons with NaN are false).
_F32 = np.float32
_E32_HI, _E32_LO = _F32(89.0), _F32(-110.0)
_E32_LOG2E = _F32(1.4426950408889634)
_E32_MAGIC = _F32(12582912.0)                  # 1.5 * 2**23
_E32_MAGIC_BITS = np.int32(0x4B400000)
_E32_LN2_HI, _E32_LN2_LO = _F32(0.693359375), _F32(-2.12194440e-4)
# Cephes expf: exp(r) ~ 1 + r + r^2 * P(r)
_E32_P = tuple(_F32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                  4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))
_F32_1, _F32_2 = _F32(1.0), _F32(2.0)

_E64_HI, _E64_LO = 710.0, -746.0
_E64_LOG2E = 1.4426950408889634
_E64_MAGIC = 6755399441055744.0                # 1.5 * 2**52
_E64_MAGIC_BITS = np.int64(0x4338000000000000)
_E64_LN2_HI, _E64_LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10
# exp(r) by its Taylor series to r^13: truncation 4e-18 relative on |r| <= ln2/2
_E64_T = tuple(1.0 / math.factorial(k) for k in range(13, 1, -1))


@_scalar_fma
def _exp32(x):
    if x > _E32_HI:
        x = _E32_HI
    if x < _E32_LO:
        x = _E32_LO
    kf = x * _E32_LOG2E + _E32_MAGIC
    n = _bits(kf) - _E32_MAGIC_BITS
    kf = kf - _E32_MAGIC
    r = (x - kf * _E32_LN2_HI) - kf * _E32_LN2_LO
    p0, p1, p2, p3, p4, p5 = _E32_P
    p = ((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + p5
    p = p * (r * r) + r + _F32_1
    return _scale2(p, n)


@_scalar_fma
def _exp64(x):
    if x > _E64_HI:
        x = _E64_HI
    if x < _E64_LO:
        x = _E64_LO
    kf = x * _E64_LOG2E + _E64_MAGIC
    n = _bits(kf) - _E64_MAGIC_BITS
    kf = kf - _E64_MAGIC
    r = (x - kf * _E64_LN2_HI) - kf * _E64_LN2_LO
    p = 0.0
    for c in _E64_T:  # unrolled: _E64_T is a constant tuple
        p = p * r + c
    p = p * (r * r) + r + 1.0
    return _scale2(p, n)


# float32 tanh(x) = x*P(x^2)/Q(x^2) on |x| <= 9 (and +-1 beyond, where float32
# tanh rounds to 1), degrees 12/6 in x: no exp, one division. We fitted the
# coefficients (least squares on the relative error, then Lawson reweighting
# towards minimax; scaled variable (x/9)^2): max relative error 6.8e-9 in exact
# arithmetic, so the float32 rounding of the polynomials and the division
# dominates. Measured over every float32 input against float64 np.tanh: at most
# 5.48 ulp of the exact value with FMA (this code, cython's v3/v4 builds; worst
# at |x| = 6.09), 5.84 ulp without (cython's baseline build). That rounding is
# noise, not monotone: from |x| = 0.55 on, a larger x can give a result up to
# 6 ulp smaller (8 without FMA). So the result is exactly +-1 first at
# |x| = 8.0192 (7.9746 without FMA), 1 or a few ulp below it up to 9, and
# exactly +-1 from 9 on, where NumPy's float32 tanh reaches 1 at 9.0109
# (1 - tanh(x) <= 2.2e-7 from 8: within the bound). tests/test_numerics.py
# checks this over every input (slow). The result is capped at 1 and takes the
# sign of x; NaN propagates.
_T32_CLAMP = _F32(9.0)
_T32_P = tuple(_F32(c) for c in (
    -8.495948331325435e-14, 5.280828463159531e-11, -2.0231339254149916e-08,
    1.1155844725058647e-05, 0.00310410505045857, 0.13084144022594307, 0.9999999935599421))
_T32_Q = tuple(_F32(c) for c in (
    0.0002546360753548572, 0.024495773165404498, 0.46417471187381487, 1.0))
# float64: x + x^3 * P(x^2)/Q(x^2) for |x| < 0.625 (Cephes tanh), else
# sign(x) * (1 - 2e/(1+e)) with e = exp(-2|x|) (no cancellation there).
_T_SMALL = 0.625
_T64_P = (-9.64399179425052238628e-1, -9.92877231001918586564e1, -1.61468768441708447952e3)
_T64_Q = (1.12811678491632931402e2, 2.23548839060100448583e3, 4.84406305325125486048e3)


@_scalar_fma
def _tanh32(x):
    a = abs(x)
    if a > _T32_CLAMP:
        a = _T32_CLAMP
    s = a * a
    p0, p1, p2, p3, p4, p5, p6 = _T32_P
    q0, q1, q2, q3 = _T32_Q
    p = (((((p0 * s + p1) * s + p2) * s + p3) * s + p4) * s + p5) * s + p6
    q = ((q0 * s + q1) * s + q2) * s + q3
    t = a * p / q
    if t > _F32_1:
        t = _F32_1
    return math.copysign(t, x)


@_scalar_fma
def _tanh64(x):
    ax = abs(x)
    if ax < _T_SMALL:
        s = x * x
        p = (_T64_P[0] * s + _T64_P[1]) * s + _T64_P[2]
        q = ((s + _T64_Q[0]) * s + _T64_Q[1]) * s + _T64_Q[2]
        return x + x * (s * p / q)
    e = _exp64(-(ax + ax))
    t = 1.0 - (e + e) / (1.0 + e)
    return t if x > 0 else -t


# log1p(x) for x in [0, 1] (or NaN): the only arguments we need (exp(-|z|)).
# u = 1 + x = 2^k * m with m in [sqrt(1/2), sqrt(2)), f = m - 1 exact,
# log(m) = 2 atanh(s) = f - s*(f - R(s^2)), s = f/(2 + f), plus the rounding
# of u corrected by (x - (u - 1))/u.
_L32_R = tuple(_F32(2.0 / (2 * k + 1)) for k in range(4, 0, -1))   # 2/9 .. 2/3
_L64_R = tuple(2.0 / (2 * k + 1) for k in range(10, 0, -1))        # 2/21 .. 2/3
_SQRT2 = math.sqrt(2.0)
_L32_LN2_HI, _L32_LN2_LO = _F32(0.693359375), _F32(-2.12194440e-4)


@_scalar_fma
def _log1p01_32(x):
    u = _F32_1 + x
    big = u > _F32(_SQRT2)
    m = u * _F32(0.5) if big else u
    k = _F32_1 if big else _F32(0.0)
    f = m - _F32_1
    s = f / (_F32_2 + f)
    z = s * s
    r0, r1, r2, r3 = _L32_R
    rr = (((r0 * z + r1) * z + r2) * z + r3) * z
    logm = f - s * (f - rr)
    corr = (x - (u - _F32_1)) / u
    return k * _L32_LN2_HI + (logm + (k * _L32_LN2_LO + corr))


@_scalar_fma
def _log1p01_64(x):
    u = 1.0 + x
    big = u > _SQRT2
    m = u * 0.5 if big else u
    k = 1.0 if big else 0.0
    f = m - 1.0
    s = f / (2.0 + f)
    z = s * s
    rr = 0.0
    for c in _L64_R:
        rr = rr * z + c
    rr = rr * z
    logm = f - s * (f - rr)
    corr = (x - (u - 1.0)) / u
    return k * _E64_LN2_HI + (logm + (k * _E64_LN2_LO + corr))


def _by_dtype(f32, f64):
    """A generic scalar function: ``f32`` for float32 arguments, ``f64`` for float64."""
    def stub(x):
        raise NotImplementedError("callable from compiled code only")

    @overload(stub, inline="always")
    def _overload(x):
        if x == types.float32:
            return lambda x: f32(x)
        if x == types.float64:
            return lambda x: f64(x)
        return None

    return stub


_exp = _by_dtype(_exp32, _exp64)
_tanh = _by_dtype(_tanh32, _tanh64)
_log1p01 = _by_dtype(_log1p01_32, _log1p01_64)


# ------------------------------------------------------------ activations (scalar)

LEAKY_SLOPE = 0.01
GELU_C = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


@_scalar
def _sigmoid(z):
    # exp(-|z|) keeps full relative accuracy in the negative tail
    e = _exp(-abs(z))
    one = _c(z, 1.0)
    return (one if z >= 0 else e) / (one + e)


@_scalar
def _relu(z):
    # np.maximum(z, 0): +0.0 for -0.0 (and for +0.0), NaN stays NaN
    return _c(z, 0.0) if z <= 0 else z


@_scalar
def _gelu_halves(z):
    """``s = sigmoid(2u)`` and ``q = sigmoid(-2u)`` for ``u = c*(z + a*z^3)``,
    in the reference's order of operations (``0.5*(1 + tanh(u)) = s`` and
    ``1 - tanh(u)^2 = 4*s*q``, without the cancellation of ``1 + tanh(u)``
    near ``tanh(u) = -1``); one exp for both."""
    u = z * z
    u = u * _c(z, GELU_A) + _c(z, 1.0)
    u = u * z * _c(z, 2 * GELU_C)
    e = _exp(-abs(u))
    one = _c(z, 1.0)
    d = one + e
    return (one if u >= 0 else e) / d, (e if u >= 0 else one) / d


@_scalar
def _f_identity(z):
    return z


@_scalar
def _f_leaky_relu(z):
    return z if z > 0 else z * _c(z, LEAKY_SLOPE)


@_scalar
def _f_tanh(z):
    return _tanh(z)


@_scalar
def _f_gelu(z):
    # 0.5*z*(1 + tanh(u)) = z*sigmoid(2u)
    return z * _gelu_halves(z)[0]


@_scalar
def _f_silu(z):
    return z * _sigmoid(z)


@_scalar
def _f_softplus(z):
    return _relu(z) + _log1p01(_exp(-abs(z)))


@_scalar
def _d_identity(s):
    return _c(s, 1.0)


@_scalar
def _d_relu(y):
    return _c(y, 1.0) if y > 0 else _c(y, 0.0)


@_scalar
def _d_sigmoid(y):
    return y * (_c(y, 1.0) - y)


@_scalar
def _d_tanh(y):
    return _c(y, 1.0) - y * y


@_scalar
def _d_leaky_relu(z):
    return _c(z, 1.0) if z > 0 else _c(z, LEAKY_SLOPE)


@_scalar
def _d_gelu(z):
    # 0.5*(1 + t) + 0.5*z*(1 - t^2)*c*(1 + 3a*z^2) with t = tanh(u), 0.5*(1 + t) = s
    # and 1 - t^2 = 4*s*q: s*(1 + 2c*z*q*(1 + 3a*z^2)), in the reference's order
    s, q = _gelu_halves(z)
    d = z * z * _c(z, 3 * GELU_A) + _c(z, 1.0)
    d = d * _c(z, 2 * GELU_C) * z * q
    return (d + _c(z, 1.0)) * s


@_scalar
def _d_silu(z):
    s = _sigmoid(z)
    return ((_c(z, 1.0) - s) * z + _c(z, 1.0)) * s


#: name -> (forward f(z), derivative d(y or z), derivative takes y)
_ACT = {
    "identity": (_f_identity, _d_identity, True),
    "relu": (_relu, _d_relu, True),
    "sigmoid": (_sigmoid, _d_sigmoid, True),
    "tanh": (_f_tanh, _d_tanh, True),
    "leaky_relu": (_f_leaky_relu, _d_leaky_relu, False),
    "gelu": (_f_gelu, _d_gelu, False),
    "silu": (_f_silu, _d_silu, False),
    "softplus": (_f_softplus, _sigmoid, False),
}
ACTIVATIONS = tuple(_ACT)
#: Activations whose forward loop calls exp/tanh/log1p (more work per element:
#: parallel sooner), and those whose derivative does (sigmoid' and tanh' come
#: from y: cheap).
_TRANSCENDENTAL = frozenset(("sigmoid", "tanh", "gelu", "silu", "softplus"))
_TRANSCENDENTAL_D = frozenset(("gelu", "silu", "softplus"))


@_scalar
def _sign(x):
    """np.sign: -1, 0 or 1, NaN for NaN."""
    one = _c(x, 1.0)
    return one if x > 0 else (-one if x < 0 else x * _c(x, 0.0))


@_scalar
def _maximum(a, b):
    """np.maximum: NaN if either is NaN."""
    return b if (b > a or b != b) else a

