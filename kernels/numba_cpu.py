"""The ``numba`` backend: every kernel of the contract as ``numba.njit`` loops.

Importing this module imports numba (``fastnn`` itself never does; the
registry imports this module the first time the backend is used).

How it is built (DESIGN.md, "Rules the code keeps"):

* GEMMs are NumPy's BLAS, called on views into the caller's arrays
  (``np.matmul(x, w, out=z)``, ``x.T @ dz`` and ``dy @ w.T`` without copies);
  everything around them is one fused numba loop: bias + activation over the
  GEMM output, the activation derivative multiplied into ``dy @ w.T``,
  softmax-CE loss and gradient, and each optimizer as one loop that reads and
  writes every array once.
* Every loop body is one ``register_jitable`` function over an index range
  ``[lo, hi)``. It runs directly (``njit``, serial) below a size threshold and
  as static chunks of a ``prange`` above it (``njit(parallel=True)``), with the
  thread count of ``fastnn.set_num_threads``.
* Loops specialised per activation and per optimizer variant are made by small
  factories; a specialisation is compiled on its first use, for the dtype it is
  called with (float32 or float64), and cached on disk (``cache=True``). Every
  call passes arrays of one layout and scalars of the array dtype, so each
  kernel compiles once per dtype.
* ``exp``, ``tanh`` and ``log1p`` are our own, branch-free so that LLVM
  vectorizes the loops around them (numba's ``math.exp`` is a scalar libm
  call and loses to NumPy's SIMD): ``exp`` is a polynomial with exponent bit
  tricks (``2**n`` by ``vscalef`` on AVX-512), float32 ``tanh`` a rational
  function we fitted, ``log1p`` an ``atanh`` series. Measured errors against
  NumPy in float64 over a dense float32 sweep: exp and log1p 1 ulp, tanh 4 ulp
  (float64: 1-2 ulp); overflow, underflow, infinities and NaN give the IEEE
  results (tests/test_numba.py).
* ``error_model='numpy'`` everywhere (Python's division checks block
  vectorization). Fast-math only where it changes no result beyond the parity
  tolerance and keeps IEEE semantics: ``contract`` (FMA) inside the math
  helpers above, ``reassoc`` in the float64 sum of per-element losses. No
  ``nnan``/``ninf``. Everything else follows the reference's order of
  operations with scalars cast as NumPy casts them, so the optimizers match the
  reference bit for bit.

Threads: numba's ``omp`` threading layer is selected when it is available (it
is thread-safe and shares libgomp with the Cython backend; ``workqueue`` is not
thread-safe, and parallel calls then hold a lock). ``fastnn/__init__.py`` sets
``GOMP_SPINCOUNT`` before libgomp loads, so its idle threads do not steal the
cores from the next BLAS call. A process forked after a parallel region runs
every kernel serially (GNU OpenMP cannot start a region in such a child).

Cache: next to this file when that folder is writable, else in
``$XDG_CACHE_HOME/fastnn/numba`` (``~/.cache/fastnn/numba``), set as
``NUMBA_CACHE_DIR`` before numba is imported; a ``NUMBA_CACHE_DIR`` of the
user's wins; with no writable folder at all kernels compile uncached
(``available()`` says so).
"""

import importlib
import math
import os
import tempfile
import threading

import numpy as np

__all__ = [
    "dense_forward", "activation_forward", "activation_backward", "backprop_delta",
    "dense_backward", "softmax_cross_entropy", "sigmoid_binary_cross_entropy", "mse",
    "sgd_step", "adam_step", "rmsprop_step", "softmax",
    "available", "info", "set_num_threads",
]

#: This backend implements the whole contract itself (no reference fallbacks).
COMPLETE = True


# ------------------------------------------------------------ cache folder (before numba)

def _user_cache_dir(environ):
    """``$XDG_CACHE_HOME/fastnn/numba``, else ``~/.cache/fastnn/numba``."""
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastnn", "numba")


def _dir_writable(path):
    """Whether numba could write its cache into ``path`` (tried as numba does:
    create the folder and a temporary file in it; ``os.access`` is wrong for
    root and for read-only mounts)."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def _cache_plan(package_dir, environ, writable=_dir_writable):
    """Where compiled kernels are cached: ``(cache_dir_to_set, enabled)``.

    The first writable of: ``NUMBA_CACHE_DIR`` when the user set it, the
    package folder (``__pycache__`` next to this file, numba's default), the
    user's cache folder (``_user_cache_dir``; then it is returned, to be set
    as ``NUMBA_CACHE_DIR``). When none is writable (a read-only install run
    with no home), ``enabled`` is False: kernels compile in every process
    instead of failing (numba's ``cache=True`` raises without a cache folder).
    """
    user = environ.get("NUMBA_CACHE_DIR")
    if user and writable(user):
        return None, True
    if writable(os.path.join(package_dir, "__pycache__")):
        return None, True
    mine = _user_cache_dir(environ)
    if writable(mine):
        return mine, True
    return None, False


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_CACHE_DIR_SET, _CACHE_ENABLED = _cache_plan(_PACKAGE_DIR, os.environ)
if _CACHE_DIR_SET is not None:
    os.environ["NUMBA_CACHE_DIR"] = _CACHE_DIR_SET

import numba  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba.extending import intrinsic, overload, register_jitable  # noqa: E402

if _CACHE_DIR_SET is not None and numba.config.CACHE_DIR != _CACHE_DIR_SET:
    numba.config.CACHE_DIR = _CACHE_DIR_SET  # numba was imported before us


def _select_threading_layer():
    """Prefer ``omp`` (thread-safe) unless the user chose a layer. Returns
    whether parallel calls must be serialised by a lock (a layer that may be
    workqueue, which aborts on concurrent calls from Python threads)."""
    if os.environ.get("NUMBA_THREADING_LAYER"):
        return numba.config.THREADING_LAYER not in ("omp", "tbb", "safe", "threadsafe")
    try:
        importlib.import_module("numba.np.ufunc.omppool")
    except ImportError:
        # tbb if installed, else workqueue; which one is known after the first launch
        return True
    numba.config.THREADING_LAYER = "omp"
    return False


_SERIALISE_PARALLEL = _select_threading_layer()
_parallel_lock = threading.Lock()

#: Options of every compiled kernel.
_JIT = dict(cache=_CACHE_ENABLED, nogil=True, error_model="numpy")
#: Options of the inlined helpers (loop bodies, scalar functions).
_INNER = dict(error_model="numpy")


def _scalar(fn):
    """A helper callable from our kernels (compiled into them, inlined by LLVM)."""
    return register_jitable(**_INNER)(fn)


def _scalar_fma(fn):
    """A math helper whose ``a*b + c`` may become one FMA (``contract``: one
    rounding instead of two; no other fast-math assumption, so infinities and
    NaN keep their IEEE meaning). Used for polynomials, not for the optimizers
    (those match the reference bit for bit)."""
    return register_jitable(error_model="numpy", fastmath={"contract"})(fn)


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
# arithmetic, so float32 rounding (2-3 ulp) dominates. The result is capped at
# 1 and takes the sign of x; NaN propagates.
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
    return _c(z, 0.0) if z < 0 else z   # NaN stays NaN, as np.maximum


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


# ------------------------------------------------------------ serial / parallel launch

# Below these element counts a kernel runs its serial loop, above them the
# prange path. Measured on the development machine (2 cores, a KVM guest,
# numba 0.68 omp layer, GOMP_SPINCOUNT=1000 from fastnn/__init__.py, quiet:
# load < 0.8; ``python benchmarks/numba_goals.py --thresholds``). Serially,
# relu forward takes 66 us per 1 M float32 (memory-bound), sigmoid 190 us,
# Adam 180 us (in cache). A parallel call right after another one costs
# 1-2 us more than its work (relu over 4 k: 0.5 us serial, 1.7 us parallel),
# so back to back two threads win from ~100 k cheap elements and ~30 k
# transcendental or optimizer ones. But libgomp's workers fall asleep ~1 us
# after a region, and waking them costs ~50 us on this VM (relu over 4 k after
# a pause: 47 us, p10 of 400 calls). That is the case in a training step,
# where our kernels alternate with BLAS calls: the whole 784-256-128-10 Adam
# step ran 8-16% slower with thresholds of 128 k / 16 k / 32 k than fully
# serial, and as fast as serial with these. So a kernel goes parallel from
# 1 M elements, where it wins back to back and loses little or nothing after a
# wake-up: sigmoid over 1 M took 190 us serial, 97 us parallel and ~150 us
# parallel after a pause; Adam over 1 M 181 us, 97 us and ~150 us; relu over
# 1 M 66 us, 43 us and 77 us (p10; a cheap kernel that large follows a GEMM
# of milliseconds in a training step, so the 11 us are noise there), over
# 2 M 134 us and 73 us. A machine whose threads wake faster would profit
# sooner.
PARALLEL_MIN = {"cheap": 1 << 20, "exp": 1 << 20, "optimizer": 1 << 20}
_ALIGN = 64   # chunk boundaries at multiples of 64 elements (whole cache lines)


class _Kernel:
    """A loop body over ``[lo, hi)`` compiled twice: ``run(lo, hi, *args)``
    (serial) and ``par(threads, n, align, *args)`` (static chunks in prange)."""

    __slots__ = ("run", "par", "align", "reduces")

    def __init__(self, body, align=_ALIGN, reduces=False):
        _scalar(body)  # callable from the parallel driver
        self.run = njit(**_JIT)(body)
        self.par = (_parallel_sum if reduces else _parallel)(body)
        self.align = align
        self.reduces = reduces


def _chunk(n, threads, align):
    step = (n + threads - 1) // threads
    return (step + align - 1) // align * align


register_jitable(_chunk)


def _parallel(body):
    def par(threads, n, align, *args):
        step = _chunk(n, threads, align)
        for c in prange(threads):
            lo = c * step
            hi = min(n, lo + step)
            if lo < hi:
                body(lo, hi, *args)

    return njit(parallel=True, **_JIT)(par)


def _parallel_sum(body):
    def par(threads, n, align, *args):
        step = _chunk(n, threads, align)
        parts = np.zeros(threads)
        for c in prange(threads):
            lo = c * step
            hi = min(n, lo + step)
            if lo < hi:
                parts[c] = body(lo, hi, *args)
        total = 0.0
        for c in range(threads):
            total += parts[c]
        return total

    return njit(parallel=True, **_JIT)(par)


_num_threads = 1
# numba's thread count is per Python thread; each one is set on its first
# parallel launch (and when fastnn's count changed). Calling
# numba.set_num_threads inside the compiled driver instead would make it
# uncachable (it embeds a function pointer).
_thread_state = threading.local()


# GNU OpenMP cannot start a parallel region in a child forked after the
# parent used it (numba then aborts the child: "fork() called from a process
# already using GNU OpenMP"); a forked child runs every kernel serially
# (fastnn._threads sets the flag from its at-fork hook).
from fastnn import _threads as _fastnn_threads  # noqa: E402


def _launch(kernel, n, min_parallel, *args):
    """Run ``kernel`` over ``n`` items (elements or rows), in parallel from
    ``min_parallel`` on. Returns what the body returns (losses: a float64 sum)."""
    threads = _num_threads
    if threads > 1 and n >= min_parallel and not _fastnn_threads.forked_child:
        if getattr(_thread_state, "threads", 0) != threads:
            numba.set_num_threads(threads)
            _thread_state.threads = threads
        if _SERIALISE_PARALLEL:
            with _parallel_lock:
                return kernel.par(threads, n, kernel.align, *args)
        return kernel.par(threads, n, kernel.align, *args)
    return kernel.run(0, n, *args)


_build_lock = threading.Lock()
_built = {}


def _specialised(key, factory, *params):
    """The kernels ``factory(*params)`` makes, built once per ``key``."""
    kernels = _built.get(key)
    if kernels is None:
        with _build_lock:
            kernels = _built.get(key)
            if kernels is None:
                kernels = _built[key] = factory(*params)
    return kernels


# ------------------------------------------------------------ elementwise loops

class _ActKernels:
    """The loops of one activation."""

    def __init__(self, f, d):
        # Each body first slices [lo, hi): LLVM vectorizes a loop only when
        # it can prove its indices non-negative (numba wraps negative ones).
        def fwd(lo, hi, z, out):
            z, out = z[lo:hi], out[lo:hi]
            for i in range(z.size):
                out[i] = f(z[i])

        def fwd_inplace(lo, hi, a):
            a = a[lo:hi]
            for i in range(a.size):
                a[i] = f(a[i])

        def bias_act(lo, hi, z, b, out):          # rows lo..hi of (batch, width)
            z, out = z[lo:hi], out[lo:hi]
            for r in range(z.shape[0]):
                for j in range(b.size):
                    v = z[r, j] + b[j]
                    z[r, j] = v
                    out[r, j] = f(v)

        def bias_act_inplace(lo, hi, a, b):
            a = a[lo:hi]
            for r in range(a.shape[0]):
                for j in range(b.size):
                    a[r, j] = f(a[r, j] + b[j])

        def grad(lo, hi, dy, s, out):
            dy, s, out = dy[lo:hi], s[lo:hi], out[lo:hi]
            for i in range(dy.size):
                out[i] = dy[i] * d(s[i])

        def grad_into_dy(lo, hi, a, s):
            a, s = a[lo:hi], s[lo:hi]
            for i in range(a.size):
                a[i] = a[i] * d(s[i])

        def grad_into_s(lo, hi, dy, a):
            dy, a = dy[lo:hi], a[lo:hi]
            for i in range(a.size):
                a[i] = dy[i] * d(a[i])

        self.fwd = _Kernel(fwd)
        self.fwd_inplace = _Kernel(fwd_inplace)
        self.bias_act = _Kernel(bias_act, align=1)
        self.bias_act_inplace = _Kernel(bias_act_inplace, align=1)
        self.grad = _Kernel(grad)
        self.grad_into_dy = _Kernel(grad_into_dy)
        self.grad_into_s = _Kernel(grad_into_s)


def _act_kernels(act):
    f, d, _ = _ACT[act]
    return _specialised(("act", act), _ActKernels, f, d)


def _same(a, b):
    """Whether two validated arrays are the same memory (the gate allows an
    output to be an input exactly, or disjoint from it)."""
    return a is b or (b is not None and np.may_share_memory(a, b))


def _threshold(act, derivative=False):
    costly = act in (_TRANSCENDENTAL_D if derivative else _TRANSCENDENTAL)
    return PARALLEL_MIN["exp" if costly else "cheap"]


def activation_forward(act, z, out):
    """Apply an activation elementwise: ``out = act(z)`` (see the reference
    for the eight formulas); ``out`` may be ``z``.

    Parameters
    ----------
    act : str
    z : ndarray, float32 or float64, C-contiguous. IN
    out : ndarray like ``z``. OUT
    """
    if act == "identity":
        if not _same(out, z):
            np.copyto(out, z)
        return
    k = _act_kernels(act)
    n = z.size
    if _same(out, z):
        _launch(k.fwd_inplace, n, _threshold(act), out.reshape(-1))
    else:
        _launch(k.fwd, n, _threshold(act), z.reshape(-1), out.reshape(-1))


def _derivative_source(act, z, y):
    return y if _ACT[act][2] else z


def activation_backward(act, dy, z, y, out):
    """Backpropagate through an activation: ``out = dy * act'(z)``.

    The derivative is taken from ``y`` for identity, relu (``y > 0``), sigmoid
    (``y*(1-y)``) and tanh (``1 - y^2``), from ``z`` for leaky_relu, gelu, silu
    and softplus. ``out`` may be ``dy``, ``z`` or ``y``.

    Parameters
    ----------
    act : str
    dy : ndarray. IN
    z, y : ndarray or None (the one the derivative does not use). IN
    out : ndarray like ``dy``. OUT
    """
    if act == "identity":
        if not _same(out, dy):
            np.copyto(out, dy)
        return
    k = _act_kernels(act)
    s = _derivative_source(act, z, y)
    n = dy.size
    t = _threshold(act, derivative=True)
    if _same(out, dy):
        _launch(k.grad_into_dy, n, t, out.reshape(-1), s.reshape(-1))
    elif _same(out, s):
        _launch(k.grad_into_s, n, t, dy.reshape(-1), out.reshape(-1))
    else:
        _launch(k.grad, n, t, dy.reshape(-1), s.reshape(-1), out.reshape(-1))


# ------------------------------------------------------------ dense layer

def dense_forward(x, w, b, act, out, preact=None):
    """Dense layer forward: ``out = act(x @ w + b)``.

    ``x @ w`` is one BLAS call into ``preact`` (or ``out``); bias and
    activation follow in one pass over it. ``preact``, when given, receives
    ``z = x @ w + b``.

    Parameters
    ----------
    x : ndarray (batch, in). IN
    w : ndarray (in, out). IN
    b : ndarray (out,). IN
    act : str
    out : ndarray (batch, out). OUT
    preact : ndarray (batch, out) or None. OUT
    """
    k = _act_kernels(act)
    rows, cols = out.shape
    t = max(1, _threshold(act) // cols)
    if preact is None:
        np.matmul(x, w, out=out)
        _launch(k.bias_act_inplace, rows, t, out, b)
    else:
        np.matmul(x, w, out=preact)
        _launch(k.bias_act, rows, t, preact, b, out)


def backprop_delta(dy, w, z, y, act, out):
    """Delta of the layer below: ``out = (dy @ w.T) * act'(z)``.

    ``dy @ w.T`` is one BLAS call on the transposed view of ``w`` (no copy);
    the derivative (from ``y`` where the activation allows, else ``z``) is
    multiplied in one pass over the result.

    Parameters
    ----------
    dy : ndarray (batch, out). IN
    w : ndarray (in, out). IN
    z, y : ndarray (batch, in) or None. IN
    act : str
    out : ndarray (batch, in). OUT
    """
    np.matmul(dy, w.T, out=out)
    if act == "identity":
        return
    k = _act_kernels(act)
    s = _derivative_source(act, z, y)
    _launch(k.grad_into_dy, out.size, _threshold(act, derivative=True), out.reshape(-1),
            s.reshape(-1))


def _column_sums(lo, hi, dz, db):
    """``db[j] = sum_i dz[i, j]`` for columns ``lo..hi``, row by row (NumPy's order)."""
    dz, db = dz[:, lo:hi], db[lo:hi]
    for j in range(db.size):
        db[j] = 0
    for i in range(dz.shape[0]):
        for j in range(db.size):
            db[j] += dz[i, j]


_COLUMN_SUMS = None


def dense_backward(x, dz, dw, db):
    """Parameter gradients of a dense layer: ``dw = x.T @ dz``, ``db = dz.sum(0)``.

    ``x.T @ dz`` is one BLAS call on the transposed view (no copy); ``db`` sums
    the rows of ``dz`` in a loop vectorized along the columns.

    Parameters
    ----------
    x : ndarray (batch, in). IN
    dz : ndarray (batch, out). IN
    dw : ndarray (in, out). OUT
    db : ndarray (out,). OUT
    """
    global _COLUMN_SUMS
    np.matmul(x.T, dz, out=dw)
    if _COLUMN_SUMS is None:
        _COLUMN_SUMS = _specialised("column_sums", _Kernel, _column_sums, 16)
    rows, cols = dz.shape
    _launch(_COLUMN_SUMS, cols, max(16, PARALLEL_MIN["cheap"] // rows), dz, db)


# ------------------------------------------------------------ losses and softmax

_BLOCK = 256   # elements per block of per-element losses before they are summed


@register_jitable(error_model="numpy", fastmath={"reassoc"})
def _sum64(buf, m):
    """``sum(buf[:m])`` in float64; reassociated (vectorized): the order of a
    float64 sum of at most ``_BLOCK`` terms changes it by ~1e-16 relative."""
    total = 0.0
    for i in range(m):
        total += np.float64(buf[i])
    return total


_LANES = 16   # width of the running maxima of _row_max


@_scalar
def _row_max(z, r, lanes):
    """``max(z[r])``, NaN skipped unless first (it reaches the row's results
    anyway through ``exp(z - max)``, as in the reference). Sixteen running
    maxima in ``lanes`` (a scratch array of ``_LANES``): an elementwise select
    over them vectorizes, where one running maximum is a chain of dependent
    compares (LLVM does not vectorize a float max reduction without fast-math)."""
    row = z[r]
    n = row.shape[0]
    if n < _LANES:
        m = row[0]
        for j in range(1, n):
            x = row[j]
            m = x if x > m else m
        return m
    for k in range(_LANES):
        lanes[k] = row[k]
    j = _LANES
    while j + _LANES <= n:
        for k in range(_LANES):
            x = row[j + k]
            b = lanes[k]
            lanes[k] = x if x > b else b
        j += _LANES
    m = lanes[0]
    for k in range(1, _LANES):
        x = lanes[k]
        m = x if x > m else m
    while j < n:
        x = row[j]
        m = x if x > m else m
        j += 1
    return m


@register_jitable(error_model="numpy", fastmath={"reassoc"})
def _sum_row64(row):
    """``sum(row)`` accumulated in float64, reassociated so that it vectorizes
    (a different order than a running sum: ~1e-16 relative)."""
    s = 0.0
    for j in range(row.shape[0]):
        s += np.float64(row[j])
    return s


@_scalar
def _exp_row(z, r, m, out):
    """``out[r] = exp(z[r] - m)``; returns its sum (in float64, rounded to the
    array dtype)."""
    zr = z[r]
    orow = out[r]
    for j in range(zr.shape[0]):
        orow[j] = _exp(zr[j] - m)
    return _c(m, _sum_row64(orow))


def _softmax_ce_rows(lo, hi, z, labels, grad, n):
    """Rows ``lo..hi``: ``grad = (softmax(z) - onehot) / n``; returns the sum
    of the rows' losses ``log(s) - (z[label] - max)`` in float64."""
    z, labels, grad = z[lo:hi], labels[lo:hi], grad[lo:hi]
    lanes = np.empty(_LANES, z.dtype)
    total = 0.0
    for r in range(z.shape[0]):
        m = _row_max(z, r, lanes)
        label = labels[r]
        picked = z[r, label] - m
        s = _exp_row(z, r, m, grad)
        for j in range(z.shape[1]):
            hot = _c(s, 1.0) if j == label else _c(s, 0.0)
            grad[r, j] = (grad[r, j] / s - hot) / n
        total += np.float64(math.log(s) - picked)
    return total


def _softmax_rows(lo, hi, z, out):
    """Rows ``lo..hi``: ``out = exp(z - max) / sum(exp(z - max))``."""
    z, out = z[lo:hi], out[lo:hi]
    lanes = np.empty(_LANES, z.dtype)
    for r in range(z.shape[0]):
        m = _row_max(z, r, lanes)
        s = _exp_row(z, r, m, out)
        for j in range(z.shape[1]):
            out[r, j] = out[r, j] / s


def _bce_elements(lo, hi, z, t, grad, n):
    """``grad = (sigmoid(z) - t) / n``; returns the float64 sum of
    ``max(z, 0) - z*t + log1p(exp(-|z|))``."""
    losses = np.empty(_BLOCK, z.dtype)
    total = 0.0
    for b0 in range(lo, hi, _BLOCK):
        b1 = min(hi, b0 + _BLOCK)
        zb, tb, gb = z[b0:b1], t[b0:b1], grad[b0:b1]
        for i in range(zb.size):
            zi = zb[i]
            ti = tb[i]
            e = _exp(-abs(zi))
            one = _c(zi, 1.0)
            losses[i] = (_log1p01(e) + _relu(zi)) - zi * ti
            gb[i] = ((one if zi >= 0 else e) / (one + e) - ti) / n
        total += _sum64(losses, zb.size)
    return total


def _mse_elements(lo, hi, pred, target, grad, scale):
    """``grad = (pred - target) * (2/n)``; returns the float64 sum of ``(pred - target)^2``."""
    losses = np.empty(_BLOCK, pred.dtype)
    total = 0.0
    for b0 in range(lo, hi, _BLOCK):
        b1 = min(hi, b0 + _BLOCK)
        pb, tb, gb = pred[b0:b1], target[b0:b1], grad[b0:b1]
        for i in range(pb.size):
            d = pb[i] - tb[i]
            losses[i] = d * d
            gb[i] = d * scale
        total += _sum64(losses, pb.size)
    return total


def _loss_kernel(body):
    return _specialised(body.__name__, _Kernel, body, 1 if body.__name__.endswith("rows")
                        else _ALIGN, True)


def _labels_intp(labels):
    """Labels as intp (one compiled kernel for every integer dtype); a copy
    only when they are not intp already (they are small: one per row)."""
    return labels if labels.dtype == np.intp else labels.astype(np.intp)


def softmax_cross_entropy(logits, labels, grad):
    """Mean softmax cross-entropy and its gradient with respect to the logits.

    With ``m_i = max_j z_ij`` and ``s_i = sum_j exp(z_ij - m_i)``:
    ``loss = mean_i(log(s_i) - (z_{i,label_i} - m_i))`` and
    ``grad = (softmax(z) - onehot(labels)) / batch``, one pass per row.

    Parameters
    ----------
    logits : ndarray (batch, classes). IN
    labels : integer ndarray (batch,), values in ``[0, classes)``. IN
    grad : ndarray (batch, classes). OUT

    Returns
    -------
    float
        The mean loss (rows' losses in the array dtype, averaged in float64).
    """
    rows, classes = logits.shape
    total = _launch(_loss_kernel(_softmax_ce_rows), rows,
                    max(1, PARALLEL_MIN["exp"] // classes),
                    logits, _labels_intp(labels), grad, logits.dtype.type(rows))
    return float(total / rows)


def softmax(z, out):
    """Row-wise softmax: ``out[i] = exp(z[i] - max(z[i])) / sum(exp(z[i] - max(z[i])))``.

    Parameters
    ----------
    z : ndarray (batch, classes). IN
    out : ndarray (batch, classes); may be ``z``. OUT
    """
    rows, classes = z.shape
    kernel = _specialised("softmax", _Kernel, _softmax_rows, 1)
    _launch(kernel, rows, max(1, PARALLEL_MIN["exp"] // classes), z, out)


def sigmoid_binary_cross_entropy(logits, targets, grad):
    """Mean binary cross-entropy on logits, and its gradient.

    ``loss = mean(max(z, 0) - z*t + log1p(exp(-|z|)))`` over all elements and
    ``grad = (sigmoid(z) - t) / z.size``, one pass.

    Parameters
    ----------
    logits : ndarray. IN
    targets : ndarray like ``logits``, values in [0, 1]. IN
    grad : ndarray like ``logits``. OUT

    Returns
    -------
    float
    """
    n = logits.size
    total = _launch(_loss_kernel(_bce_elements), n, PARALLEL_MIN["exp"], logits.reshape(-1),
                    targets.reshape(-1), grad.reshape(-1), logits.dtype.type(n))
    return float(total / n)


def mse(pred, target, grad):
    """Mean squared error over all elements and its gradient.

    ``loss = mean((pred - target)^2)``, ``grad = 2*(pred - target) / pred.size``, one pass.

    Parameters
    ----------
    pred, target : ndarray, same shape and dtype. IN
    grad : ndarray like ``pred``. OUT

    Returns
    -------
    float
    """
    n = pred.size
    total = _launch(_loss_kernel(_mse_elements), n, PARALLEL_MIN["cheap"], pred.reshape(-1),
                    target.reshape(-1), grad.reshape(-1), pred.dtype.type(2 / n))
    return float(total / n)


# ------------------------------------------------------------ optimizers
#
# One loop per optimizer variant: the flags are constants of the closure, so
# each variant compiles without the branches it does not take. Scalars are
# cast to the array dtype as NumPy casts Python floats (``p *= beta1``), and
# the operations follow the reference's order: the results are identical.

def _sgd_kernel(has_wd, has_l1, has_momentum, nesterov):
    def sgd(lo, hi, p, g, buf, lr, momentum, wd, l1):
        p, g, buf = p[lo:hi], g[lo:hi], buf[lo:hi]
        for i in range(p.size):
            pi = p[i]
            gi = g[i]
            if has_wd:
                gi = gi + wd * pi
            if has_l1:
                gi = gi + l1 * _sign(pi)
            if has_momentum:
                b = buf[i] * momentum + gi
                buf[i] = b
                d = gi + momentum * b if nesterov else b
            else:
                d = gi
            p[i] = pi - lr * d

    return _Kernel(sgd)


def sgd_step(p, g, buf, lr, momentum, nesterov, weight_decay, l1):
    """One SGD step in place (PyTorch's ``torch.optim.SGD``, dampening 0).

    ``g' = g + weight_decay*p + l1*sign(p)``; with ``momentum > 0``:
    ``buf = momentum*buf + g'`` and ``d = g' + momentum*buf`` (Nesterov) or
    ``d = buf``; without momentum ``d = g'``. Then ``p -= lr*d``. One pass.

    Parameters
    ----------
    p : ndarray (n,). IN/OUT
    g : ndarray (n,). IN
    buf : ndarray (n,) or None (when ``momentum == 0``). IN/OUT
    lr, momentum, weight_decay, l1 : float
    nesterov : bool
    """
    has_momentum = momentum != 0
    flags = (weight_decay != 0, l1 != 0, has_momentum, bool(nesterov) and has_momentum)
    kernel = _specialised(("sgd",) + flags, _sgd_kernel, *flags)
    ft = p.dtype.type
    _launch(kernel, p.size, PARALLEL_MIN["optimizer"], p, g, buf if has_momentum else p,
            ft(lr), ft(momentum), ft(weight_decay), ft(l1))


def _adam_kernel(decoupled, has_wd, has_l1, amsgrad):
    def adam(lo, hi, p, g, m, v, vmax, decay, wd, l1, beta1, c1, beta2, c2, bc2_sqrt, eps,
             step_size):
        p, g, m, v, vmax = p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], vmax[lo:hi]
        for i in range(p.size):
            pi = p[i]
            gi = g[i]
            if decoupled:
                if has_l1:
                    gi = gi + l1 * _sign(pi)      # sign(p) before the decay
                if has_wd:
                    pi = pi * decay
            else:
                if has_wd:
                    gi = gi + wd * pi
                if has_l1:
                    gi = gi + l1 * _sign(pi)
            mi = m[i] * beta1 + c1 * gi
            vi = v[i] * beta2 + c2 * (gi * gi)
            m[i] = mi
            v[i] = vi
            if amsgrad:
                vi = _maximum(vmax[i], vi)
                vmax[i] = vi
            p[i] = pi - mi / (math.sqrt(vi) / bc2_sqrt + eps) * step_size

    return _Kernel(adam)


def adam_step(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, decoupled, l1, vmax):
    """One Adam / AdamW / AMSGrad step in place (PyTorch's ``torch.optim.Adam``
    and ``AdamW``), one pass over the arrays.

    ``g' = g + weight_decay*p + l1*sign(p)`` (with ``decoupled``, AdamW: no
    weight-decay term in ``g'``, ``p *= 1 - lr*weight_decay`` instead);
    ``m = beta1*m + (1-beta1)*g'``, ``v = beta2*v + (1-beta2)*g'^2``, with
    AMSGrad ``vmax = max(vmax, v)`` used for ``v``;
    ``p -= lr/(1-beta1^t) * m / (sqrt(v)/sqrt(1-beta2^t) + eps)``.

    Parameters
    ----------
    p : ndarray (n,). IN/OUT
    g : ndarray (n,). IN
    m, v : ndarray (n,). IN/OUT
    step : int
        ``t``, 1-based, after this step.
    lr, beta1, beta2, eps, weight_decay, l1 : float
    decoupled : bool
    vmax : ndarray (n,) or None. IN/OUT
    """
    amsgrad = vmax is not None
    flags = (bool(decoupled), weight_decay != 0, l1 != 0, amsgrad)
    kernel = _specialised(("adam",) + flags, _adam_kernel, *flags)
    ft = p.dtype.type
    bc1 = 1 - beta1 ** step
    bc2_sqrt = math.sqrt(1 - beta2 ** step)
    _launch(kernel, p.size, PARALLEL_MIN["optimizer"], p, g, m, v, vmax if amsgrad else v,
            ft(1 - lr * weight_decay), ft(weight_decay), ft(l1), ft(beta1), ft(1 - beta1),
            ft(beta2), ft(1 - beta2), ft(bc2_sqrt), ft(eps), ft(lr / bc1))


def _rmsprop_kernel(has_wd, has_l1, centered, has_momentum):
    def rmsprop(lo, hi, p, g, sq, buf, cm, lr, rho, c, eps, momentum, wd, l1):
        p, g, sq, buf, cm = p[lo:hi], g[lo:hi], sq[lo:hi], buf[lo:hi], cm[lo:hi]
        for i in range(p.size):
            pi = p[i]
            gi = g[i]
            if has_wd:
                gi = gi + wd * pi
            if has_l1:
                gi = gi + l1 * _sign(pi)
            s = sq[i] * rho + c * (gi * gi)
            sq[i] = s
            if centered:
                mi = cm[i] * rho + c * gi
                cm[i] = mi
                den = math.sqrt(s - mi * mi)
            else:
                den = math.sqrt(s)
            r = gi / (den + eps)
            if has_momentum:
                b = buf[i] * momentum + r
                buf[i] = b
                p[i] = pi - lr * b
            else:
                p[i] = pi - r * lr

    return _Kernel(rmsprop)


def rmsprop_step(p, g, sq, buf, lr, rho, eps, momentum, centered_mean, weight_decay, l1):
    """One RMSprop step in place (PyTorch's ``torch.optim.RMSprop``), one pass.

    ``g' = g + weight_decay*p + l1*sign(p)``; ``sq = rho*sq + (1-rho)*g'^2``;
    centered: ``cm = rho*cm + (1-rho)*g'``, ``den = sqrt(sq - cm^2) + eps``,
    else ``den = sqrt(sq) + eps``; with ``momentum > 0``:
    ``buf = momentum*buf + g'/den``, ``p -= lr*buf``, else ``p -= lr*g'/den``.

    Parameters
    ----------
    p : ndarray (n,). IN/OUT
    g : ndarray (n,). IN
    sq : ndarray (n,). IN/OUT
    buf : ndarray (n,) or None (when ``momentum == 0``). IN/OUT
    lr, rho, eps, momentum, weight_decay, l1 : float
    centered_mean : ndarray (n,) or None. IN/OUT
    """
    has_momentum = momentum > 0
    centered = centered_mean is not None
    flags = (weight_decay != 0, l1 != 0, centered, has_momentum)
    kernel = _specialised(("rmsprop",) + flags, _rmsprop_kernel, *flags)
    ft = p.dtype.type
    _launch(kernel, p.size, PARALLEL_MIN["optimizer"], p, g, sq, buf if has_momentum else p,
            centered_mean if centered else p, ft(lr), ft(rho), ft(1 - rho), ft(eps),
            ft(momentum), ft(weight_decay), ft(l1))


# ------------------------------------------------------------ backend hooks

def available():
    """numba imported; the caveats: no cache folder, a threading layer that is
    not thread-safe."""
    caveats = []
    if not _CACHE_ENABLED:
        caveats.append(f"no writable cache folder (package folder, {_user_cache_dir(os.environ)}"
                       f", NUMBA_CACHE_DIR): kernels compile in every process")
    if _SERIALISE_PARALLEL:
        caveats.append(f"numba threading layer {numba.config.THREADING_LAYER!r} may be "
                       f"workqueue (not thread-safe): parallel kernels are serialised across "
                       f"Python threads")
    return True, "; ".join(caveats)


def cache_dir():
    """Where compiled kernels are cached (``NUMBA_CACHE_DIR``, else next to
    this file), or None when nothing is writable (no caching)."""
    if not _CACHE_ENABLED:
        return None
    user = numba.config.CACHE_DIR
    if user and _dir_writable(user):
        return user
    return os.path.join(_PACKAGE_DIR, "__pycache__")


def threading_layer():
    """numba's threading layer: the one in use once a parallel kernel ran,
    else the configured choice."""
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel launch yet
        return f"{numba.config.THREADING_LAYER} (not started)"


def info():
    """Lines for ``python -m fastnn info``."""
    return {"numba": numba.__version__, "threading_layer": threading_layer(),
            "cache_dir": cache_dir(), "numba_threads": _num_threads,
            "parallel_min": dict(PARALLEL_MIN)}


def set_num_threads(n):
    """Use ``n`` threads in the parallel loops (``numba.set_num_threads``);
    fastnn's ``set_num_threads`` calls this with OpenMP and BLAS together."""
    global _num_threads
    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    _num_threads = n
    numba.set_num_threads(n)
    _thread_state.threads = n


def _init_threads():
    from fastnn._threads import get_num_threads

    set_num_threads(get_num_threads())


_init_threads()
