"""Benchmark machinery: cases, timing, probes, training contenders, start-up.

One module, shared by ``python -m fastnn bench`` (``fastnn._cli_bench``), the
pytest-benchmark suites in ``benchmarks/`` and ``benchmarks/goals.py``, so
that every number is measured the same way:

* every figure is a ratio against the NumPy baseline (the ``numpy`` backend,
  ``fastnn.kernels.reference``) measured in the same run, interleaved with
  the backend it is compared with (round robin, so that a noisy neighbour
  slows both alike), as the median of several repeats;
* the first call of each kernel is a warm-up and is not timed (numba
  compiles then);
* inputs come from ``numpy.random.default_rng(SEED)``;
* two probes say how far a kernel is from what the hardware allows: the bare
  BLAS GEMM of the same shape (``np.matmul(..., out=)``) for the dense
  kernels, and a plain streaming kernel that reads and writes the optimizer's
  arrays once (Adam: 4 reads, 3 writes; SGD with momentum and RMSprop: 3
  reads, 2 writes) for the optimizers, DESIGN.md's memory-bandwidth floor.

Importing this module imports neither numba nor matplotlib; the floor probe
imports numba when it is first used.
"""

import contextlib
import functools
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

import fastnn
from fastnn import _backend
from fastnn.kernels import reference

SEED = 0
DTYPES = ("float32", "float64")
BACKEND_ORDER = tuple(_backend.MODULES)          # numpy, cython, numba, cuda

#: (batch, in, out) of the dense kernels. The 4096x4096 layer only at batch
#: 32 and 128: at batch 1024 one NumPy call takes seconds on 2 cores.
DENSE_SHAPES = ((32, 784, 256), (128, 784, 256), (1024, 784, 256),
                (32, 1024, 1024), (128, 1024, 1024), (1024, 1024, 1024),
                (32, 4096, 4096), (128, 4096, 4096))
#: (rows, cols) of the elementwise kernels: a hidden layer's output and 1 M elements.
ELEMENTWISE_SHAPES = ((128, 256), (1024, 1024))
#: (batch, classes) of softmax cross-entropy (issue 5: batch 128..1024, classes 10..1000).
SOFTMAX_CE_SHAPES = ((32, 10), (128, 10), (1024, 10), (128, 1000), (1024, 1000))
SOFTMAX_SHAPES = ((128, 10), (1024, 1000))
BCE_SHAPES = ((128, 1), (1024, 1), (1024, 1000))
MSE_SHAPES = ((128, 10), (1024, 1000))
OPTIMIZER_SIZES = (1_000_000, 10_000_000)
#: (batch, height, width, c_in, c_out, k) of the convolutions (k x k, stride 1, "valid"):
#: the two layers of Keras' MNIST convnet at batch 128.
CONV_SHAPES = ((128, 28, 28, 1, 32, 3), (128, 13, 13, 32, 64, 3))
#: (batch, height, width, channels) of 2x2 max pooling: the convnet's two pools.
POOL_SHAPES = ((128, 26, 26, 32), (128, 11, 11, 64))
#: (rows, cols) of dropout (rate 0.5): the convnet's flattened features, and 1 M elements.
DROPOUT_SHAPES = ((128, 1600), (1024, 1024))
#: (rows, batch, features) of gather_rows: batches of MNIST-sized rows picked at random
#: from a 100,000-row array (as ``fit`` reads a shuffled epoch: rows from memory, not cache).
GATHER_SHAPES = ((100_000, 128, 784), (100_000, 32, 784))
#: gather_rows' source dtypes: "same" (the case's dtype: row copies) and uint8 (converted).
GATHER_SOURCES = ("same", "uint8")
#: The MNIST MLP of the training benchmarks.
TRAIN_LAYERS = (784, 256, 128, 10)
TRAIN_BATCHES = (32, 128)


# ======================================================================= machine

def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model():
    """The CPU's model name (Linux: /proc/cpuinfo), else platform's guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average():
    """The 1-minute load average, or None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def machine_info():
    """What a reader needs to judge a figure: CPU, cores, threads, BLAS, versions, load.

    Returns
    -------
    dict
    """
    from threadpoolctl import threadpool_info

    blas = []
    for pool in threadpool_info():
        if pool.get("user_api") == "blas":
            lib = "numpy" if "numpy" in pool.get("filepath", "") else (
                "scipy" if "scipy" in pool.get("filepath", "") else os.path.basename(
                    pool.get("filepath", "")))
            blas.append(f"{pool.get('internal_api')} {pool.get('version')} "
                        f"({pool.get('architecture')}, {pool.get('num_threads')} threads, {lib})")
    versions = {"python": platform.python_version(), "numpy": np.__version__,
                "fastnn": fastnn.__version__}
    for dist in ("scipy", "numba", "torch", "scikit-learn"):
        v = _version(dist)
        if v:
            versions[dist] = v
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": fastnn.get_num_threads(),
        "blas": blas,
        "versions": versions,
        "platform": platform.platform(),
        "load": load_average(),
    }


def machine_line(info=None):
    """One line: ``CPU, cores, threads; BLAS; versions; load``."""
    info = info or machine_info()
    vers = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    blas = "; ".join(dict.fromkeys(info["blas"])) or "BLAS unknown"
    load = "" if info["load"] is None else f"; load average {info['load']:.1f} at start"
    threads = f"{info['threads']} thread{'s' if info['threads'] != 1 else ''}"
    return (f"{info['cpu']}, {info['cores']} cores, {threads} used; "
            f"BLAS: {blas}; {vers}; {info['platform']}{load}")


# ======================================================================= timing

def _sync_for(backend_name):
    """A callable that waits for the device (cuda), else None."""
    if backend_name != "cuda":
        return None
    from numba import cuda
    return cuda.synchronize


def measure(fns, repeats=7, min_time=0.02, max_time=3.0, warmup=1):
    """Median seconds per call of each callable, sampled round robin (the
    order turned by one each round).

    Parameters
    ----------
    fns : dict
        ``{name: zero-argument callable}``.
    repeats : int
        Samples per callable; the result is their median. Fewer are taken
        (at least 3) when one call is so slow that ``repeats`` would exceed
        ``max_time`` seconds.
    min_time : float
        Each sample times enough consecutive calls to last about this long
        (timer resolution and call overhead vanish); the sample is their mean.
    max_time : float
        Soft cap on the seconds spent sampling one callable.
    warmup : int
        Untimed calls first (numba compiles on the first).

    Returns
    -------
    dict
        ``{name: seconds}``, the median of the per-call sample means.
    """
    names = list(fns)
    loops, reps = {}, {}
    for name in names:
        fn = fns[name]
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        fn()
        t = max(time.perf_counter() - t0, 1e-7)
        loops[name] = max(1, int(min_time / t))
        reps[name] = max(3, min(repeats, math.ceil(max_time / (t * loops[name]))))
    samples = {name: [] for name in names}
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(max(reps.values(), default=0)):
            # the order turns each round: a callable runs after a different one each
            # time (what runs before moves a sample: OpenBLAS' workers still
            # spinning, caches, the clock), not always after the same neighbour
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                if r >= reps[name]:
                    continue
                fn, n = fns[name], loops[name]
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                samples[name].append((time.perf_counter() - t0) / n)
    finally:
        if gc_was:
            gc.enable()
    return {name: statistics.median(s) for name, s in samples.items()}


# ======================================================================= cases

@dataclass(frozen=True)
class Case:
    """One kernel at one shape and dtype.

    ``make(rng)`` returns the kernel's positional arguments as NumPy arrays
    and scalars; ``probe`` names the probe that bounds it (``"gemm"``,
    ``"floor"`` or None).
    """

    kernel: str
    variant: str        # activation or optimizer configuration, "" if none
    shape: str          # label, e.g. "128x784x256", "1024x1024", "10M"
    dtype: str
    make: object = field(compare=False, repr=False)
    probe: str = None
    dims: tuple = ()

    @property
    def name(self):
        """``kernel[variant]``, as in the report."""
        return f"{self.kernel}[{self.variant}]" if self.variant else self.kernel

    @property
    def id(self):
        """A pytest id: ``dense_forward[relu]-128x784x256-float32``."""
        return f"{self.name}-{self.shape}-{self.dtype}"

    @property
    def fallback_key(self):
        """How ``BackendInfo.fallbacks`` names this case when it runs the reference."""
        return self.kernel, (f"{self.kernel}[{self.variant}]" if self.kernel in
                             _backend._ACT_KERNELS else None)


def _rand(rng, shape, dtype, scale=1.0):
    a = rng.standard_normal(shape, dtype=np.float64) * scale
    return np.ascontiguousarray(a, dtype=dtype)


def _count(n):
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else str(n)


def _dense_forward(dims, dtype, act="relu"):
    bsz, din, dout = dims

    def make(rng):
        x = _rand(rng, (bsz, din), dtype)
        w = _rand(rng, (din, dout), dtype, 1 / math.sqrt(din))
        b = _rand(rng, (dout,), dtype, 0.1)
        out = np.empty((bsz, dout), dtype)
        pre = np.empty_like(out) if act in reference.Z_ACTIVATIONS else None
        return x, w, b, act, out, pre
    return Case("dense_forward", act, "x".join(map(str, dims)), dtype, make, "gemm", dims)


def _backprop_delta(dims, dtype, act="relu"):
    bsz, din, dout = dims

    def make(rng):
        dy = _rand(rng, (bsz, dout), dtype)
        w = _rand(rng, (din, dout), dtype, 1 / math.sqrt(din))
        z = _rand(rng, (bsz, din), dtype)
        y = np.empty_like(z)
        reference.activation_forward(act, z, y)
        out = np.empty((bsz, din), dtype)
        return dy, w, z, y, act, out
    return Case("backprop_delta", act, "x".join(map(str, dims)), dtype, make, "gemm", dims)


def _dense_backward(dims, dtype):
    bsz, din, dout = dims

    def make(rng):
        x = _rand(rng, (bsz, din), dtype)
        dz = _rand(rng, (bsz, dout), dtype)
        return x, dz, np.empty((din, dout), dtype), np.empty(dout, dtype)
    return Case("dense_backward", "", "x".join(map(str, dims)), dtype, make, "gemm", dims)


def _activation(kernel, act, dims, dtype):
    def make(rng):
        z = _rand(rng, dims, dtype, 2.0)
        out = np.empty_like(z)
        if kernel == "activation_forward":
            return act, z, out
        y = np.empty_like(z)
        reference.activation_forward(act, z, y)
        return act, _rand(rng, dims, dtype), z, y, out
    return Case(kernel, act, "x".join(map(str, dims)), dtype, make, None, dims)


def _loss(kernel, dims, dtype):
    def make(rng):
        z = _rand(rng, dims, dtype, 3.0)
        if kernel == "softmax":
            return z, np.empty_like(z)
        if kernel == "softmax_cross_entropy":
            labels = rng.integers(0, dims[1], dims[0]).astype(np.int64)
        elif kernel == "sigmoid_binary_cross_entropy":
            labels = (rng.random(dims) < 0.5).astype(dtype)
        else:
            labels = _rand(rng, dims, dtype)
        return z, labels, np.empty_like(z)
    return Case(kernel, "", "x".join(map(str, dims)), dtype, make, None, dims)


def _optimizer(kernel, n, dtype):
    """Adam (plain), SGD with momentum 0.9, RMSprop (plain): the configurations of
    the speed goals, each on flat arrays of ``n`` parameters."""
    def make(rng):
        p = _rand(rng, n, dtype)
        g = _rand(rng, n, dtype, 1e-2)
        if kernel == "adam_step":
            m = _rand(rng, n, dtype, 1e-3)
            v = np.abs(_rand(rng, n, dtype, 1e-4))
            return p, g, m, v, 10, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, 0.0, None
        if kernel == "sgd_step":
            return p, g, _rand(rng, n, dtype, 1e-2), 1e-3, 0.9, False, 0.0, 0.0
        sq = np.abs(_rand(rng, n, dtype, 1e-4))
        return p, g, sq, None, 1e-3, 0.99, 1e-8, 0.0, None, 0.0, 0.0
    variant = {"adam_step": "", "sgd_step": "momentum", "rmsprop_step": ""}[kernel]
    return Case(kernel, variant, _count(n), dtype, make, "floor", (n,))


def _conv(kernel, variant, dims, dtype):
    """The convolution, pooling and dropout kernels (``dims`` as in CONV_SHAPES,
    POOL_SHAPES, DROPOUT_SHAPES)."""
    def make(rng):
        if kernel.startswith("dropout"):
            return _rand(rng, dims, dtype), 0.5, 12345, np.empty(dims, dtype)
        if kernel.startswith("maxpool"):
            n, h, w, c = dims
            x = _rand(rng, dims, dtype)
            out = np.empty((n, h // 2, w // 2, c), dtype)
            argmax = np.empty(out.shape, np.int32)
            reference.maxpool2d_forward(x, out, argmax, (2, 2), None)
            if kernel == "maxpool2d_forward":
                return x, out, argmax, (2, 2), None
            y = np.maximum(x, 0)
            return _rand(rng, out.shape, dtype), argmax, None, y, variant, np.empty_like(x), \
                (2, 2), None
        n, h, w, c, o, k = dims
        x = _rand(rng, (n, h, w, c), dtype)
        wt = _rand(rng, (k, k, c, o), dtype, 1 / math.sqrt(k * k * c))
        dz = _rand(rng, (n, h - k + 1, w - k + 1, o), dtype)
        one, zero = (1, 1), (0, 0, 0, 0)
        if kernel == "conv2d_forward":
            return x, wt, _rand(rng, o, dtype, 0.1), variant, np.empty_like(dz), None, one, zero
        if kernel == "conv2d_backward":
            return x, dz, np.empty_like(wt), np.empty(o, dtype), one, zero
        return dz, wt, None, np.maximum(x, 0), variant, np.empty_like(x), one, zero
    probe_kind = "gemm" if kernel.startswith("conv2d") else None
    return Case(kernel, variant, "x".join(map(str, dims)), dtype, make, probe_kind, dims)


def conv_gemm_shapes(kernel, dims):
    """The GEMM inside a convolution kernel in its im2col form (stride 1, no
    padding), ``dims`` as in CONV_SHAPES: ``(a shape, b shape, c shape,
    trans_a, trans_b)`` of ``c = op(a) @ op(b)`` with ``M = n*p*q`` rows of
    columns, ``K = kh*kw*c`` and ``N = o`` filters:

    * ``conv2d_forward``: columns ``(M, K)`` @ ``w (K, N)`` -> ``(M, N)``;
    * ``conv2d_backward``: columns.T ``(K, M)`` @ ``dz (M, N)`` -> ``dw (K, N)``;
    * ``conv2d_backprop``: ``dz (M, N)`` @ ``w.T (N, K)`` -> ``(M, K)``.
    """
    n, h, w, c, o, k = dims
    m, kk = n * (h - k + 1) * (w - k + 1), k * k * c
    if kernel == "conv2d_forward":
        return (m, kk), (kk, o), (m, o), False, False
    if kernel == "conv2d_backward":
        return (m, kk), (m, o), (kk, o), True, False
    if kernel == "conv2d_backprop":
        return (m, o), (kk, o), (m, kk), False, True
    raise ValueError(f"{kernel} has no GEMM")


def np_gemm(a, b, c, trans_a=False, trans_b=False):
    """``c = op(a) @ op(b)`` by NumPy's BLAS (``np.matmul(out=)``, transposed
    views, no copies): the signature of ``_cy_dense._gemm``."""
    np.matmul(a.T if trans_a else a, b.T if trans_b else b, out=c)


def conv_gemm_fn(kernel, dims, dtype, gemm=np_gemm, seed=SEED):
    """A zero-argument callable: the GEMM alone of a convolution kernel
    (``conv_gemm_shapes``) on arrays that exist already (no im2col, no
    epilogue), through ``gemm`` (default NumPy's BLAS; the goals pass the
    cython backend's own, ``_cy_dense._gemm``)."""
    a_shape, b_shape, c_shape, ta, tb = conv_gemm_shapes(kernel, dims)
    rng = np.random.default_rng(seed)
    a, b = _rand(rng, a_shape, dtype), _rand(rng, b_shape, dtype, 0.1)
    c = np.empty(c_shape, dtype)
    return functools.partial(gemm, a, b, c, ta, tb)


def _conv_cases(dtype):
    cases = []
    for dims in CONV_SHAPES:
        cases += [_conv("conv2d_forward", "relu", dims, dtype),
                  _conv("conv2d_backward", "", dims, dtype)]
        if dims[3] > 1:   # a first layer has no delta below it
            cases.append(_conv("conv2d_backprop", "relu", dims, dtype))
    for dims in POOL_SHAPES:
        cases += [_conv("maxpool2d_forward", "", dims, dtype),
                  _conv("maxpool2d_backward", "relu", dims, dtype)]
    for dims in DROPOUT_SHAPES:
        cases += [_conv("dropout_forward", "", dims, dtype),
                  _conv("dropout_backward", "", dims, dtype)]
    return cases


def _gather(variant, dims, dtype):
    """gather_rows of ``k`` random rows of ``m`` features from ``n`` (``dims``),
    from a source of ``variant``'s dtype ("same": the case's) into ``dtype``."""
    n, k, m = dims

    def make(rng):
        src_dtype = np.dtype(dtype if variant == "same" else variant)
        if src_dtype.kind == "f":
            src = _rand(rng, (n, m), src_dtype)
        else:
            src = rng.integers(0, 256, (n, m)).astype(src_dtype)
        return src, rng.integers(0, n, k), np.empty((k, m), dtype)
    return Case("gather_rows", variant, "x".join(map(str, dims)), dtype, make, None, dims)


def all_cases(dtypes=DTYPES):
    """Every contract kernel at the sizes users meet (the pytest suites' set).

    Returns
    -------
    list of Case
    """
    cases = []
    for dtype in dtypes:
        for dims in DENSE_SHAPES:
            cases.append(_dense_forward(dims, dtype))
        for dims in DENSE_SHAPES:
            cases.append(_backprop_delta(dims, dtype))
        for dims in DENSE_SHAPES:
            cases.append(_dense_backward(dims, dtype))
        for kernel in ("activation_forward", "activation_backward"):
            for act in reference.ACTIVATIONS:
                for dims in ELEMENTWISE_SHAPES:
                    cases.append(_activation(kernel, act, dims, dtype))
        for kernel, shapes in (("softmax_cross_entropy", SOFTMAX_CE_SHAPES),
                               ("softmax", SOFTMAX_SHAPES),
                               ("sigmoid_binary_cross_entropy", BCE_SHAPES),
                               ("mse", MSE_SHAPES)):
            for dims in shapes:
                cases.append(_loss(kernel, dims, dtype))
        for kernel in ("sgd_step", "adam_step", "rmsprop_step"):
            for n in OPTIMIZER_SIZES:
                cases.append(_optimizer(kernel, n, dtype))
        cases += _conv_cases(dtype)
        cases += [_gather(v, dims, dtype) for dims in GATHER_SHAPES for v in GATHER_SOURCES]
    return cases


def quick_cases():
    """The set of ``bench --quick``: float32, the shapes the speed goals name."""
    d = "float32"
    cases = [_dense_forward(dims, d) for dims in ((32, 784, 256), (128, 784, 256),
                                                  (1024, 1024, 1024))]
    cases += [_backprop_delta((128, 784, 256), d), _backprop_delta((1024, 1024, 1024), d),
              _dense_backward((128, 784, 256), d)]
    cases += [_activation("activation_forward", a, (1024, 1024), d)
              for a in ("relu", "sigmoid", "tanh", "gelu")]
    cases += [_activation("activation_backward", a, (1024, 1024), d) for a in ("relu", "gelu")]
    cases += [_loss("softmax_cross_entropy", (128, 10), d),
              _loss("softmax_cross_entropy", (1024, 1000), d),
              _loss("softmax", (1024, 1000), d)]
    cases += [_optimizer(k, 10_000_000, d) for k in ("adam_step", "sgd_step", "rmsprop_step")]
    # Keras' convnet at batch 128 (conv1 is also seed 003's convolution)
    conv1, conv2 = CONV_SHAPES
    cases += [_conv("conv2d_forward", "relu", conv1, d), _conv("conv2d_backward", "", conv1, d),
              _conv("conv2d_forward", "relu", conv2, d), _conv("conv2d_backward", "", conv2, d),
              _conv("conv2d_backprop", "relu", conv2, d)]
    for dims in POOL_SHAPES:
        cases += [_conv("maxpool2d_forward", "", dims, d),
                  _conv("maxpool2d_backward", "relu", dims, d)]
    cases += [_conv("dropout_forward", "", DROPOUT_SHAPES[0], d),
              _conv("dropout_backward", "", DROPOUT_SHAPES[0], d)]
    cases.append(_gather("uint8", GATHER_SHAPES[0], d))
    return cases


def find_case(kernel, variant, shape, dtype):
    """The case of ``all_cases`` with these fields, or a new one for other shapes
    (``shape`` as dims tuple or label)."""
    if not isinstance(shape, str):
        dims = tuple(shape)
        if kernel == "dense_forward":
            return _dense_forward(dims, dtype, variant or "relu")
        if kernel == "backprop_delta":
            return _backprop_delta(dims, dtype, variant or "relu")
        if kernel == "dense_backward":
            return _dense_backward(dims, dtype)
        if kernel.startswith("activation_"):
            return _activation(kernel, variant, dims, dtype)
        if kernel.endswith("_step"):
            return _optimizer(kernel, dims[0], dtype)
        if kernel in reference.CONV_KERNELS:
            return _conv(kernel, variant, dims, dtype)
        if kernel == "gather_rows":
            return _gather(variant or "same", dims, dtype)
        return _loss(kernel, dims, dtype)
    for c in all_cases((dtype,)):
        if (c.kernel, c.variant, c.shape) == (kernel, variant, shape):
            return c
    raise KeyError((kernel, variant, shape, dtype))


# ======================================================================= backends

def cuda_simulated():
    """True when numba's CUDA simulator is on (``NUMBA_ENABLE_CUDASIM=1``): the
    ``cuda`` backend then runs kernels in Python threads and its times mean nothing."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def available_backends(names=None, simulator=False):
    """Names of the backends that can run here, in registry order.

    Parameters
    ----------
    names : iterable of str, optional
        Restrict to these (unknown or unavailable ones are left out).
    simulator : bool
        Keep ``cuda`` when it runs on the CUDA simulator (default: leave it out).
    """
    infos = fastnn.backends()
    wanted = BACKEND_ORDER if names is None else tuple(names)
    out = [n for n in BACKEND_ORDER if n in wanted and infos[n].available]
    if "cuda" in out and not simulator and cuda_simulated():
        out.remove("cuda")
    return out


def runs_reference(case, backend_name):
    """True when ``backend_name`` runs the NumPy reference for this case (the
    kernel, or the activation inside it, is not native there)."""
    if backend_name == "numpy":
        return False
    fallbacks = _backend.load(backend_name).fallbacks
    kernel, per_act = case.fallback_key
    return kernel in fallbacks or (per_act is not None and per_act in fallbacks)


def _to_device(backend, args):
    return tuple(backend.from_host(a) if isinstance(a, np.ndarray) else a for a in args)


def bind(case, backend_name, seed=SEED):
    """A zero-argument callable that runs ``case`` on a backend with fresh,
    seeded inputs (device arrays on cuda; the call then waits for the device)."""
    backend = _backend.load(backend_name)
    args = case.make(np.random.default_rng(seed))
    fn = getattr(backend, case.kernel)
    sync = _sync_for(backend_name)
    if sync is None:
        return functools.partial(fn, *args)
    args = _to_device(backend, args)

    def run():
        fn(*args)
        sync()
    return run


# ======================================================================= probes

_FLOOR = {}


def _floor_kernels():
    """numba streaming kernels for the memory-bandwidth floor (compiled once per
    dtype on first use): each array read once, each state array written once."""
    if not _FLOOR:
        import numba

        @numba.njit(parallel=True, error_model="numpy", nogil=True)
        def stream_4r3w(p, g, m, v, c):
            for i in numba.prange(p.size):
                gi = g[i]
                m[i] = m[i] * c + gi
                v[i] = v[i] * c + gi
                p[i] = p[i] * c - gi

        @numba.njit(parallel=True, error_model="numpy", nogil=True)
        def stream_3r2w(p, g, s, c):
            for i in numba.prange(p.size):
                gi = g[i]
                s[i] = s[i] * c + gi
                p[i] = p[i] * c - gi

        _FLOOR["adam_step"] = stream_4r3w
        _FLOOR["sgd_step"] = _FLOOR["rmsprop_step"] = stream_3r2w
    return _FLOOR


def floor_available():
    """Whether the streaming probe can run (it needs numba)."""
    return importlib.util.find_spec("numba") is not None


def probe(case, seed=SEED):
    """A zero-argument callable of the probe that bounds ``case`` on the CPU, or None.

    gemm: ``np.matmul`` into a preallocated output, of the GEMM inside the kernel
    (``x @ w`` for dense_forward, ``dy @ w.T`` for backprop_delta, ``x.T @ dz``
    and ``dz.sum(0)`` for dense_backward; the im2col GEMM of a convolution,
    ``conv_gemm_shapes``, on columns that exist already). floor: the streaming kernel over the
    optimizer's arrays (Adam 4 reads + 3 writes, SGD-momentum and RMSprop 3 + 2),
    on ``fastnn.get_num_threads()`` threads.
    """
    rng = np.random.default_rng(seed)
    dtype = np.dtype(case.dtype)
    if case.probe == "gemm" and case.kernel.startswith("conv2d"):
        return conv_gemm_fn(case.kernel, case.dims, dtype, seed=seed)
    if case.probe == "gemm":
        bsz, din, dout = case.dims
        if case.kernel == "dense_forward":
            x, w = _rand(rng, (bsz, din), dtype), _rand(rng, (din, dout), dtype)
            out = np.empty((bsz, dout), dtype)
            return functools.partial(np.matmul, x, w, out=out)
        if case.kernel == "backprop_delta":
            dy, w = _rand(rng, (bsz, dout), dtype), _rand(rng, (din, dout), dtype)
            out = np.empty((bsz, din), dtype)
            return functools.partial(np.matmul, dy, w.T, out=out)
        x, dz = _rand(rng, (bsz, din), dtype), _rand(rng, (bsz, dout), dtype)
        dw, db = np.empty((din, dout), dtype), np.empty(dout, dtype)

        def gemm_and_sum():
            np.matmul(x.T, dz, out=dw)
            np.sum(dz, axis=0, out=db)
        return gemm_and_sum
    if case.probe == "floor" and floor_available():
        import numba

        kernel = _floor_kernels()[case.kernel]
        n = case.dims[0]
        arrays = [_rand(rng, n, dtype) for _ in range(4 if case.kernel == "adam_step" else 3)]
        c = dtype.type(1)
        threads = fastnn.get_num_threads()

        def stream():
            kernel(*arrays, c)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        return stream
    return None


PROBE_LABEL = {"gemm": "GEMM", "floor": "floor"}


# ======================================================================= kernel runs

@dataclass
class KernelResult:
    """One row of the kernel table. ``speedup`` is NumPy's time over this one's;
    ``probe_ratio`` is this time over the GEMM probe's (gemm) or the floor's time
    over this one (floor: the fraction of the bandwidth floor reached)."""

    kernel: str
    variant: str
    shape: str
    dtype: str
    backend: str
    seconds: float
    speedup: float
    probe: str = None
    probe_seconds: float = None
    probe_ratio: float = None

    @property
    def name(self):
        return f"{self.kernel}[{self.variant}]" if self.variant else self.kernel


def run_case(case, backends, repeats=7, min_time=0.02, max_time=3.0, with_probe=True):
    """Time ``case`` on ``backends`` (NumPy first, always) and its probe, interleaved.

    Backends that would run the reference for this case are left out.

    Returns
    -------
    list of KernelResult
    """
    names = ["numpy"] + [b for b in backends if b != "numpy" and not runs_reference(case, b)]
    fns = {b: bind(case, b) for b in names}
    p = probe(case) if with_probe else None
    if p is not None:
        fns["probe"] = p
    times = measure(fns, repeats=repeats, min_time=min_time, max_time=max_time)
    base = times["numpy"]
    rows = []
    for b in names:
        t = times[b]
        row = KernelResult(case.kernel, case.variant, case.shape, case.dtype, b, t, base / t)
        if p is not None and b != "cuda":
            row.probe, row.probe_seconds = case.probe, times["probe"]
            row.probe_ratio = t / times["probe"] if case.probe == "gemm" else times["probe"] / t
        rows.append(row)
    return rows


# ======================================================================= training

def _training_data(n, dtype="float32", seed=SEED, din=TRAIN_LAYERS[0], classes=TRAIN_LAYERS[-1]):
    rng = np.random.default_rng(seed)
    x = rng.random((n, din), dtype=np.float64).astype(dtype)
    y = rng.integers(0, classes, n).astype(np.int64)
    return x, y


class KernelMLP:
    """A ReLU MLP trained with Adam by calling a backend's contract kernels
    directly: one flat parameter buffer, one flat gradient buffer, buffers
    allocated once, one ``adam_step`` a step.

    On the ``numpy`` backend this is the plain NumPy implementation of the
    training benchmarks (the reference kernels are plain NumPy with ``out=``).

    Parameters
    ----------
    backend : str
    batch : int
    dtype : str
    layers : tuple of int
        Widths, input first.
    """

    def __init__(self, backend, batch, dtype="float32", layers=TRAIN_LAYERS, seed=SEED, lr=1e-3):
        be = self.be = _backend.load(backend)
        self.sync = _sync_for(backend)
        self.batch, self.lr, self.t = batch, lr, 0
        rng = np.random.default_rng(seed)
        pairs = list(zip(layers[:-1], layers[1:]))
        n = sum(i * o + o for i, o in pairs)
        host = np.empty(n, dtype)
        off = 0
        for i, o in pairs:
            host[off:off + i * o] = rng.standard_normal(i * o) * math.sqrt(2 / i)
            host[off + i * o:off + i * o + o] = 0
            off += i * o + o
        self.p = be.from_host(host)
        self.g, self.m, self.v = (be.zeros(n, dtype) for _ in range(3))
        self.w, self.b, self.dw, self.db = [], [], [], []
        off = 0
        for i, o in pairs:
            for flat, ws, bs in ((self.p, self.w, self.b), (self.g, self.dw, self.db)):
                ws.append(flat[off:off + i * o].reshape(i, o))
                bs.append(flat[off + i * o:off + i * o + o])
            off += i * o + o
        self.a = [be.empty((batch, o), dtype) for _, o in pairs]       # layer outputs
        self.d = [be.empty((batch, o), dtype) for _, o in pairs]       # deltas
        self.acts = ["relu"] * (len(pairs) - 1) + ["identity"]

    def step(self, x, y):
        """One forward, backward and Adam step on a batch (device arrays on cuda)."""
        be, a, d, w = self.be, self.a, self.d, self.w
        inp = x
        for k in range(len(w)):
            be.dense_forward(inp, w[k], self.b[k], self.acts[k], a[k])
            inp = a[k]
        loss = be.softmax_cross_entropy(a[-1], y, d[-1])
        for k in range(len(w) - 1, -1, -1):
            below = x if k == 0 else a[k - 1]
            be.dense_backward(below, d[k], self.dw[k], self.db[k])
            if k > 0:
                be.backprop_delta(d[k], w[k], None, a[k - 1], self.acts[k - 1], d[k - 1])
        self.t += 1
        be.adam_step(self.p, self.g, self.m, self.v, self.t, self.lr, 0.9, 0.999, 1e-8,
                     0.0, False, 0.0, None)
        return loss

    def epoch_fn(self, x, y):
        """A zero-argument callable: one epoch over ``(x, y)`` in order (full
        batches only), waiting for the device at the end on cuda."""
        x, y = self.be.from_host(x), self.be.from_host(y)
        bsz = self.batch
        starts = range(0, x.shape[0] - bsz + 1, bsz)

        def epoch():
            for s in starts:
                self.step(x[s:s + bsz], y[s:s + bsz])
            if self.sync:
                self.sync()
        return epoch


def gemm_ceiling_fn(x, batch, layers=TRAIN_LAYERS, seed=SEED):
    """One epoch of only the GEMMs of a training step (3 forward, 5 backward for
    three layers), into preallocated outputs: the ceiling of samples/s."""
    dtype = x.dtype
    rng = np.random.default_rng(seed)
    pairs = list(zip(layers[:-1], layers[1:]))
    w = [_rand(rng, (i, o), dtype, 0.05) for i, o in pairs]
    a = [np.empty((batch, o), dtype) for _, o in pairs]
    d = [np.empty((batch, o), dtype) for _, o in pairs]
    dw = [np.empty_like(wk) for wk in w]
    for dk in d:
        dk[...] = 0.01
    starts = range(0, x.shape[0] - batch + 1, batch)

    def epoch():
        for s in starts:
            xb = x[s:s + batch]
            inp = xb
            for k in range(len(w)):
                np.matmul(inp, w[k], out=a[k])
                inp = a[k]
            for k in range(len(w) - 1, -1, -1):
                np.matmul((xb if k == 0 else a[k - 1]).T, d[k], out=dw[k])
                if k > 0:
                    np.matmul(d[k], w[k].T, out=d[k - 1])
    return epoch


def sequential_available():
    """``(True, "")`` when ``fastnn.Sequential`` exists, else ``(False, why)``."""
    try:
        importlib.import_module("fastnn.model")
    except ImportError as exc:
        return False, f"fastnn.Sequential is not there yet ({exc})"
    if not hasattr(fastnn, "Sequential"):
        return False, "fastnn.Sequential is not exported yet"
    return True, ""


def sequential_epoch_fn(backend, x, y, batch, layers=TRAIN_LAYERS, seed=SEED, network="mlp"):
    """A zero-argument callable: one ``fit`` epoch of a ``fastnn.Sequential``
    with Adam on ``backend`` (no shuffle, silent): the 784-256-128-10 ReLU MLP
    (``layers``), or ``network`` ``"convnet"`` / ``"cnn"`` (``fastnn_network``)."""
    ok, why = sequential_available()
    if not ok:
        raise RuntimeError(why)
    with fastnn.use_backend(backend):
        if network == "mlp":
            model = fastnn.Sequential(
                [fastnn.Dense(u, "relu") for u in layers[1:-1]] + [fastnn.Dense(layers[-1])],
                input_dim=layers[0], dtype=str(x.dtype), seed=seed)
            model.compile(loss="softmax_cross_entropy", optimizer=fastnn.Adam(lr=1e-3))
        else:
            model = fastnn_network(network, str(x.dtype), seed)

    def epoch():
        with fastnn.use_backend(backend):
            model.fit(x, y, epochs=1, batch_size=batch, shuffle=False, verbose=0)
    return epoch


# ----------------------------------------------------------------------- convnets

#: The networks of the training table: the MNIST MLP, Keras' "simple MNIST
#: convnet" and seed 003's network (``python -m fastnn train --model convnet``
#: and ``--model cnn``).
NETWORKS = {
    "mlp": "784-256-128-10 ReLU MLP",
    "convnet": "Keras' convnet: Conv2D(32, 3, relu), MaxPool2D(2), Conv2D(64, 3, relu), "
               "MaxPool2D(2), Flatten, Dropout(0.5), Dense(10)",
    "cnn": "seed 003's network: Conv2D(32, 3, relu), Flatten, Dense(10)",
}
#: Short names of the networks, for chart labels and goal lines.
NETWORK_SHORT = {"mlp": "MLP", "convnet": "Keras' convnet", "cnn": "seed 003 CNN"}
CONV_NETWORKS = ("convnet", "cnn")
#: MNIST's images, channels-last.
IMAGE_SHAPE = (28, 28, 1)


def _image_data(n, dtype="float32", seed=SEED):
    """``(x, y)``: ``n`` random images ``(n, 28, 28, 1)`` in [0, 1) and labels 0..9."""
    rng = np.random.default_rng(seed)
    x = rng.random((n,) + IMAGE_SHAPE, dtype=np.float32).astype(dtype, copy=False)
    return x, rng.integers(0, 10, n).astype(np.int64)


def network_data(network, n, dtype="float32"):
    """Generated training data of ``network``'s input shape: ``(x, y)``."""
    return _training_data(n, dtype) if network == "mlp" else _image_data(n, dtype)


def fastnn_network(network, dtype="float32", seed=SEED):
    """A compiled ``fastnn.Sequential`` of ``"convnet"`` (Keras' simple MNIST
    convnet) or ``"cnn"`` (seed 003's), written as Keras writes them, with
    Adam (lr 1e-3) and sparse categorical cross-entropy (the softmax fused
    with the loss)."""
    layers = [fastnn.Conv2D(32, (3, 3), activation="relu", input_shape=IMAGE_SHAPE)]
    if network == "convnet":
        layers += [fastnn.MaxPool2D(2), fastnn.Conv2D(64, (3, 3), activation="relu"),
                   fastnn.MaxPool2D(2), fastnn.Flatten(), fastnn.Dropout(0.5)]
    elif network == "cnn":
        layers.append(fastnn.Flatten())
    else:
        raise ValueError(f"network must be one of {CONV_NETWORKS}, got {network!r}")
    layers.append(fastnn.Dense(10, activation="softmax"))
    model = fastnn.Sequential(layers, dtype=dtype, seed=seed)
    model.compile(optimizer=fastnn.Adam(lr=1e-3), loss="sparse_categorical_crossentropy")
    return model


def _conv_param_shapes(network):
    if network == "convnet":
        return [(3, 3, 1, 32), (32,), (3, 3, 32, 64), (64,), (1600, 10), (10,)]
    if network == "cnn":
        return [(3, 3, 1, 32), (32,), (26 * 26 * 32, 10), (10,)]
    raise ValueError(f"network must be one of {CONV_NETWORKS}, got {network!r}")


class KernelConvNet:
    """Keras' convnet (``"convnet"``) or seed 003's network (``"cnn"``) trained
    with Adam by calling a backend's contract kernels directly, as ``KernelMLP``
    does for the MLP: NHWC, one flat parameter buffer and one flat gradient
    buffer, every buffer allocated once, relu fused into the convolutions,
    relu's derivative into the pooling's backward pass, a new dropout seed each
    step, one ``adam_step`` a step.

    On the ``numpy`` backend this is the NumPy implementation the convnet goals
    compare with (the reference kernels: im2col + one GEMM per convolution,
    NHWC, ``out=`` everywhere).
    """

    def __init__(self, backend, batch, network="convnet", dtype="float32", seed=SEED, lr=1e-3):
        be = self.be = _backend.load(backend)
        self.sync = _sync_for(backend)
        self.network, self.batch, self.lr, self.t = network, batch, lr, 0
        shapes = _conv_param_shapes(network)
        sizes = [math.prod(s) for s in shapes]
        rng = np.random.default_rng(seed)
        host = np.zeros(sum(sizes), dtype)
        off = 0
        for shape, size in zip(shapes, sizes):
            if len(shape) > 1:   # He initialisation of the kernels; biases zero
                host[off:off + size] = rng.standard_normal(size) * math.sqrt(
                    2 / math.prod(shape[:-1]))
            off += size
        self.p = be.from_host(host)
        self.g, self.m, self.v = (be.zeros(host.size, dtype) for _ in range(3))

        def views(flat):
            out, at = [], 0
            for shape, size in zip(shapes, sizes):
                out.append(flat[at:at + size].reshape(shape))
                at += size
            return out
        self.w, self.dw = views(self.p), views(self.g)
        B = batch

        def e(*shape):
            return be.empty(shape, dtype)
        self.a1, self.d_a1 = e(B, 26, 26, 32), e(B, 26, 26, 32)
        if network == "convnet":
            self.p1, self.i1 = e(B, 13, 13, 32), be.zeros((B, 13, 13, 32), np.int32)
            self.a2, self.d_a2 = e(B, 11, 11, 64), e(B, 11, 11, 64)
            self.p2, self.i2 = e(B, 5, 5, 64), be.zeros((B, 5, 5, 64), np.int32)
            self.d_p1 = e(B, 13, 13, 32)
            self.drop, self.d_drop = e(B, 1600), e(B, 1600)
        self.logits, self.d_logits = e(B, 10), e(B, 10)

    def step(self, x, y):
        """One forward, backward and Adam step on a batch ``x (batch, 28, 28, 1)``."""
        be, w, dw = self.be, self.w, self.dw
        one, zero, pool = (1, 1), (0, 0, 0, 0), (2, 2)
        self.t += 1
        be.conv2d_forward(x, w[0], w[1], "relu", self.a1, None, one, zero)
        if self.network == "convnet":
            seed = 0x5EED + self.t
            be.maxpool2d_forward(self.a1, self.p1, self.i1, pool, None)
            be.conv2d_forward(self.p1, w[2], w[3], "relu", self.a2, None, one, zero)
            be.maxpool2d_forward(self.a2, self.p2, self.i2, pool, None)
            be.dropout_forward(self.p2.reshape(self.batch, 1600), 0.5, seed, self.drop)
            be.dense_forward(self.drop, w[4], w[5], "identity", self.logits)
            loss = be.softmax_cross_entropy(self.logits, y, self.d_logits)
            be.dense_backward(self.drop, self.d_logits, dw[4], dw[5])
            be.backprop_delta(self.d_logits, w[4], None, self.drop, "identity", self.d_drop)
            be.dropout_backward(self.d_drop, 0.5, seed, self.d_drop)
            be.maxpool2d_backward(self.d_drop.reshape(self.p2.shape), self.i2, None, self.a2,
                                  "relu", self.d_a2, pool, None)
            be.conv2d_backward(self.p1, self.d_a2, dw[2], dw[3], one, zero)
            be.conv2d_backprop(self.d_a2, w[2], None, self.p1, "identity", self.d_p1, one, zero)
            be.maxpool2d_backward(self.d_p1, self.i1, None, self.a1, "relu", self.d_a1, pool,
                                  None)
        else:
            flat = self.a1.reshape(self.batch, -1)
            be.dense_forward(flat, w[2], w[3], "identity", self.logits)
            loss = be.softmax_cross_entropy(self.logits, y, self.d_logits)
            be.dense_backward(flat, self.d_logits, dw[2], dw[3])
            be.backprop_delta(self.d_logits, w[2], None, flat, "relu",
                              self.d_a1.reshape(self.batch, -1))
        be.conv2d_backward(x, self.d_a1, dw[0], dw[1], one, zero)
        be.adam_step(self.p, self.g, self.m, self.v, self.t, self.lr, 0.9, 0.999, 1e-8,
                     0.0, False, 0.0, None)
        return loss

    epoch_fn = KernelMLP.epoch_fn


def conv_gemm_ceiling_fn(network, x, batch, seed=SEED):
    """One epoch of only the GEMMs of a convnet's training step in their im2col
    form (``conv_gemm_shapes``: forward, weight gradient and, above the first
    convolution, the delta's; the dense layer's three), on columns that exist
    already, by NumPy's BLAS: no im2col, pooling, dropout or epilogue. The
    ceiling of an im2col implementation's samples/s."""
    dtype = x.dtype
    rng = np.random.default_rng(seed)
    convs = [(batch, 28, 28, 1, 32, 3)]
    dense = (batch, 26 * 26 * 32, 10)
    if network == "convnet":
        convs.append((batch, 13, 13, 32, 64, 3))
        dense = (batch, 1600, 10)
    calls = []
    for i, dims in enumerate(convs):
        for kernel in ("conv2d_forward", "conv2d_backward") + (("conv2d_backprop",) if i else ()):
            a_shape, b_shape, c_shape, ta, tb = conv_gemm_shapes(kernel, dims)
            calls.append((_rand(rng, a_shape, dtype), _rand(rng, b_shape, dtype, 0.1),
                          np.empty(c_shape, dtype), ta, tb))
    b, i, o = dense
    for a_shape, b_shape, c_shape, ta, tb in (((b, i), (i, o), (b, o), False, False),
                                              ((b, i), (b, o), (i, o), True, False),
                                              ((b, o), (i, o), (b, i), False, True)):
        calls.append((_rand(rng, a_shape, dtype), _rand(rng, b_shape, dtype, 0.1),
                      np.empty(c_shape, dtype), ta, tb))
    steps = range(x.shape[0] // batch)

    def epoch():
        for _ in steps:
            for a, bb, c, ta, tb in calls:
                np_gemm(a, bb, c, ta, tb)
    return epoch


def sklearn_epoch_fn(x, y, batch, layers=TRAIN_LAYERS, seed=SEED):
    """A zero-argument callable: one ``MLPClassifier.partial_fit`` epoch (Adam,
    same layers, no shuffle). Raises ImportError when scikit-learn is missing."""
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=layers[1:-1], activation="relu", solver="adam",
                        batch_size=batch, learning_rate_init=1e-3, shuffle=False,
                        random_state=seed)
    classes = np.arange(layers[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.partial_fit(x, y, classes=classes)

    def epoch():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf.partial_fit(x, y)
    return epoch


#: Run by ``python -c`` in a fresh process: PyTorch CPU, fused Adam, the same MLP.
TORCH_SCRIPT = r"""
import json, statistics, sys, time
cfg = json.loads(sys.argv[1])
import torch
torch.manual_seed(cfg["seed"])
torch.set_num_threads(cfg["threads"])
dtype = getattr(torch, cfg["dtype"])
device = cfg.get("device", "cpu")
if device == "cuda" and not torch.cuda.is_available():
    print("ERROR this PyTorch build has no CUDA device", file=sys.stderr)
    sys.exit(3)
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
layers = cfg["layers"]
network = cfg.get("network", "mlp")
g = torch.Generator().manual_seed(cfg["seed"])
shape = (layers[0],) if network == "mlp" else (1, 28, 28)    # NCHW images
x = torch.rand(cfg["n"], *shape, generator=g, dtype=dtype).to(device)
y = torch.randint(0, layers[-1], (cfg["n"],), generator=g).to(device)
out = {"version": torch.__version__, "threads": torch.get_num_threads(), "device": device,
       "network": network, "epoch_s": {}}
nn = torch.nn
for batch in cfg["batches"]:
    if network == "convnet":    # Keras' convnet
        mods = [nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3), nn.ReLU(),
                nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.5), nn.Linear(1600, 10)]
    elif network == "cnn":      # seed 003's network
        mods = [nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Flatten(), nn.Linear(26 * 26 * 32, 10)]
    else:
        mods = []
        for i, o in zip(layers[:-2], layers[1:-1]):
            mods += [nn.Linear(i, o), nn.ReLU()]
        mods.append(nn.Linear(layers[-2], layers[-1]))
    model = nn.Sequential(*mods).to(device=device, dtype=dtype)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    loss_fn = torch.nn.CrossEntropyLoss()
    batches = [(x[s:s + batch], y[s:s + batch]) for s in range(0, cfg["n"] - batch + 1, batch)]
    def epoch():
        for xb, yb in batches:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
        sync()
    epoch()
    times = []
    for _ in range(cfg["repeats"]):
        t0 = time.perf_counter()
        epoch()
        times.append(time.perf_counter() - t0)
    out["epoch_s"][str(batch)] = times
print("RESULT " + json.dumps(out))
"""


def peer_env():
    """The environment of a peer's process (PyTorch): this one's, without the
    ``GOMP_SPINCOUNT=1000`` that ``import fastnn`` puts there when it is unset
    (it would shorten the spinning of PyTorch's OpenMP threads too)."""
    env = dict(os.environ)
    if env.get("GOMP_SPINCOUNT") == "1000":
        del env["GOMP_SPINCOUNT"]
    return env


def torch_available():
    """``(True, version)`` when torch is installed, else ``(False, why)`` (not imported)."""
    if importlib.util.find_spec("torch") is None:
        return False, ("PyTorch is not installed (the peers extra; here "
                       "`pip install torch==2.13.0`, a CPU build)")
    return True, _version("torch") or ""


def sklearn_available():
    if importlib.util.find_spec("sklearn") is None:
        return False, "scikit-learn is not installed (`pip install scikit-learn`, the peers extra)"
    return True, _version("scikit-learn") or ""


def torch_epochs(batches, n, repeats, dtype="float32", threads=None, layers=TRAIN_LAYERS,
                 timeout=600, device="cpu", network="mlp"):
    """Per-epoch seconds of PyTorch (``Adam(fused=True)``) in its own process, on
    the CPU or (``device="cuda"``) the GPU: the MLP of ``layers``, or
    ``network`` ``"convnet"`` / ``"cnn"`` with the same layers as
    ``fastnn_network`` in NCHW (PyTorch's native layout; its default
    ``nn.Conv2d``, ``nn.MaxPool2d``, ``nn.Dropout``), on ``threads`` threads
    (default: fastnn's), full batches of generated data in order.

    Returns
    -------
    dict
        ``{"version", "threads", "epoch_s": {batch: [seconds, ...]}}``.

    Raises
    ------
    RuntimeError
        When the subprocess fails (its stderr's last lines in the message).
    """
    cfg = {"batches": list(batches), "n": n, "repeats": repeats, "dtype": dtype,
           "threads": threads or fastnn.get_num_threads(), "layers": list(layers), "seed": SEED,
           "device": device, "network": network}
    proc = subprocess.run([sys.executable, "-c", TORCH_SCRIPT, json.dumps(cfg)],
                          capture_output=True, text=True, timeout=timeout, env=peer_env())
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            res["epoch_s"] = {int(k): v for k, v in res["epoch_s"].items()}
            return res
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    raise RuntimeError(f"PyTorch subprocess failed (exit {proc.returncode}): {tail}")


@dataclass
class TrainResult:
    """One row of the training table: ``samples_per_s`` of one epoch (median)
    of ``network`` (a key of ``NETWORKS``); the ratios are against the rows of
    the same network and batch."""

    batch: int
    contender: str      # "numpy (plain)", "fastnn[cython]", "kernel step[numba]", "pytorch", ...
    backend: str        # colour key: numpy, cython, numba, cuda, pytorch, sklearn, gemm
    samples_per_s: float
    vs_numpy: float = None
    vs_torch: float = None
    of_ceiling: float = None
    note: str = ""
    network: str = "mlp"
    vs_kernels: float = None    # fastnn[b] over kernel step[b]: what the model keeps


def run_training(backends, batches=TRAIN_BATCHES, n=4096, repeats=5, dtype="float32",
                 peers=True, kernel_steps=True, progress=None, networks=("mlp",), conv_n=None):
    """Samples/s of one epoch of each network for every contender.

    In this process, interleaved: the plain NumPy implementation (``KernelMLP``
    or ``KernelConvNet`` on the reference kernels), ``fastnn.Sequential`` on
    each backend, the backends' kernels called directly (``KernelMLP`` /
    ``KernelConvNet``, what the model costs on top shows against it), a
    GEMMs-only loop (the ceiling; the convnets': their im2col GEMMs) and, for
    the MLP, scikit-learn's ``MLPClassifier.partial_fit``. PyTorch runs in its
    own process (the convnets in NCHW).

    Parameters
    ----------
    networks : tuple of str
        Keys of ``NETWORKS``: ``"mlp"``, ``"convnet"``, ``"cnn"``.
    n, conv_n : int
        Samples per epoch of the MLP and of the convnets (default ``n``; the
        convnets on the NumPy reference run about 1,000 samples/s).

    Returns
    -------
    (list of TrainResult, list of str)
        The rows and the messages of skipped contenders.
    """
    skipped = []
    rows = []
    seq_ok, seq_why = sequential_available()
    if not seq_ok:
        skipped.append(f"fastnn.Sequential: {seq_why}; skipped")
    sk_ok, sk_why = sklearn_available() if peers else (False, "peers not requested")
    if peers and not sk_ok and "mlp" in networks:
        skipped.append(f"scikit-learn: {sk_why}; skipped")
    th_ok, th_why = torch_available() if peers else (False, "")
    if peers and not th_ok:
        skipped.append(f"PyTorch: {th_why}; skipped")
    for network in networks:
        size = n if network == "mlp" or conv_n is None else conv_n
        rows += _train_network(network, backends, batches, size, repeats, dtype, seq_ok,
                               sk_ok and network == "mlp", th_ok, kernel_steps, skipped,
                               progress)
    by = {(r.network, r.batch, r.contender): r for r in rows}
    for r in rows:
        key = (r.network, r.batch)
        base, tor = by.get(key + ("numpy (plain)",)), by.get(key + ("pytorch",))
        ceil = by.get(key + ("GEMMs only",))
        r.vs_numpy = r.samples_per_s / base.samples_per_s if base else None
        r.vs_torch = r.samples_per_s / tor.samples_per_s if tor else None
        r.of_ceiling = r.samples_per_s / ceil.samples_per_s if ceil else None
        if r.contender.startswith("fastnn["):
            k = by.get(key + (f"kernel step[{r.backend}]",))
            r.vs_kernels = r.samples_per_s / k.samples_per_s if k else None
    return rows, skipped


def _train_network(network, backends, batches, n, repeats, dtype, seq_ok, sk_ok, th_ok,
                   kernel_steps, skipped, progress):
    """The rows of ``run_training`` for one network."""
    label = "" if network == "mlp" else f"{NETWORK_SHORT[network]} "
    x, y = network_data(network, n, dtype)
    kernel_net = KernelMLP if network == "mlp" else functools.partial(KernelConvNet,
                                                                     network=network)
    torch_res = None
    if th_ok:
        try:
            torch_res = torch_epochs(batches, n, repeats, dtype, network=network)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            skipped.append(f"PyTorch {label}: {exc}")
        if progress:
            progress()
    rows = []
    for batch in batches:
        if batch > n:
            skipped.append(f"{label}batch {batch}: more than the {n} samples; skipped")
            continue
        fns, meta = {}, {}
        fns["numpy (plain)"] = kernel_net("numpy", batch, dtype=dtype).epoch_fn(x, y)
        meta["numpy (plain)"] = "numpy"
        for b in backends:
            if seq_ok:
                try:
                    fns[f"fastnn[{b}]"] = sequential_epoch_fn(b, x, y, batch, network=network)
                    meta[f"fastnn[{b}]"] = b
                except Exception as exc:  # a model still being written: report, go on
                    skipped.append(f"{label}fastnn[{b}] batch {batch}: "
                                   f"{type(exc).__name__}: {exc}")
            if kernel_steps and b != "numpy":
                try:
                    fns[f"kernel step[{b}]"] = kernel_net(b, batch, dtype=dtype).epoch_fn(x, y)
                    meta[f"kernel step[{b}]"] = b
                except Exception as exc:
                    skipped.append(f"{label}kernel step[{b}] batch {batch}: "
                                   f"{type(exc).__name__}: {exc}")
        if sk_ok:
            fns["scikit-learn"] = sklearn_epoch_fn(x, y, batch)
            meta["scikit-learn"] = "sklearn"
        fns["GEMMs only"] = (gemm_ceiling_fn(x, batch) if network == "mlp"
                             else conv_gemm_ceiling_fn(network, x, batch))
        meta["GEMMs only"] = "gemm"
        # a contender whose first epoch raises is reported and dropped
        for name in list(fns):
            try:
                fns[name]()
            except Exception as exc:
                skipped.append(f"{label}{name} batch {batch}: {type(exc).__name__}: {exc}")
                del fns[name]
        times = measure(fns, repeats=repeats, min_time=0.0, max_time=60.0, warmup=0)
        if torch_res is not None:
            times["pytorch"] = statistics.median(torch_res["epoch_s"][batch])
            meta["pytorch"] = "pytorch"
        steps = n // batch
        for name, t in times.items():
            note = ""
            if name == "pytorch":
                note = (f"torch {torch_res['version']}, {torch_res['threads']} threads, "
                        f"own process" + ("" if network == "mlp" else ", NCHW"))
            rows.append(TrainResult(batch, name, meta[name], steps * batch / t, note=note,
                                    network=network))
        if progress:
            progress()
    return rows


# ======================================================================= data at scale

#: Run by ``python -c`` in a fresh process: one training epoch of the MLP over a
#: data set, by fastnn (``fit``) or PyTorch (a ``DataLoader`` over a
#: ``TensorDataset``), with the resident size at each stage (Linux: the peak is
#: reset between stages through ``/proc/self/clear_refs``) and, when asked,
#: ``tracemalloc``'s peaks. Prints ``RESULT {json}``.
FIT_PROCESS_SCRIPT = r"""
def _status():
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out
stages = {"start": _status()}       # the interpreter, before any import
import json, math, sys, time
cfg = json.loads(sys.argv[1])


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


import numpy as np
torch = None
if cfg["framework"] == "torch":
    import torch
    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(cfg["threads"])
else:
    import fastnn
    fastnn.set_num_threads(cfg["threads"])
    if cfg.get("backend"):
        fastnn.set_backend(cfg["backend"])
stages["imports"] = _status()
n, features, dtype = cfg["n"], cfg["features"], np.dtype(cfg["dtype"])
kind = cfg["data"]
if kind == "generated":   # in chunks: no temporary of the whole set
    rng = np.random.default_rng(cfg["seed"])
    x = np.empty((n, features), dtype)
    for s in range(0, n, 8192):
        x[s:s + 8192] = rng.random((min(8192, n - s), features), dtype=np.float32)
    y = rng.integers(0, 10, n).astype(np.int64)
else:
    x = np.load(cfg["path"], mmap_mode="r" if kind == "memmap" else None)
    y = np.load(cfg["ypath"]).astype(np.int64)
    n = x.shape[0]
stages["data"] = _status()
resets = reset_peak()
traced = {}
if cfg.get("tracemalloc"):
    import tracemalloc
    tracemalloc.start()
batch = cfg["batch"]
shuffle = cfg["shuffle"]
layers = (features, 256, 128, 10)
if torch is None:
    model = fastnn.Sequential([fastnn.Dense(256, "relu"), fastnn.Dense(128, "relu"),
                               fastnn.Dense(10)], input_dim=features, dtype=str(dtype),
                              seed=cfg["seed"])
    model.compile(loss="softmax_cross_entropy", optimizer=fastnn.Adam(lr=1e-3))

    def train(xs, ys, shuffle):
        return model.fit(xs, ys, epochs=cfg["epochs"], batch_size=batch, shuffle=shuffle,
                         verbose=0)
else:
    nn = torch.nn
    model = nn.Sequential(nn.Linear(features, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    loss_fn = nn.CrossEntropyLoss()

    def train(xs, ys, shuffle):
        data = torch.utils.data.TensorDataset(torch.from_numpy(xs), torch.from_numpy(ys))
        loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=bool(shuffle))
        for _ in range(cfg["epochs"]):
            for xb, yb in loader:
                opt.zero_grad(set_to_none=True)
                loss_fn(model(xb), yb).backward()
                opt.step()
if cfg.get("warmup"):    # the model's own buffers and state exist before the peak is reset
    train(x[:2 * batch], y[:2 * batch], False)
if cfg.get("tracemalloc"):
    traced["model"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    traced["before"] = tracemalloc.get_traced_memory()[0]
stages["ready"] = _status()
reset_peak()
t0 = time.perf_counter()
history = train(x, y, shuffle)
wall = time.perf_counter() - t0
if cfg.get("tracemalloc"):
    traced["peak"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
stages["end"] = _status()
import resource
res = {"framework": cfg["framework"], "n": int(n), "epochs": cfg["epochs"], "wall_s": wall,
       "samples_per_s": n * cfg["epochs"] / wall, "stages": stages, "peak_resets": resets,
       "traced": traced, "data_bytes": int(x.nbytes + y.nbytes),
       "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
if torch is None:
    res["history"] = {k: history.history[k] for k in ("samples_per_s", "step_samples_per_s")}
    res["backend"] = fastnn.get_backend()
else:
    res["version"] = torch.__version__
res["threads"] = cfg["threads"]
print("RESULT " + json.dumps(res))
"""


def fit_process(framework="fastnn", n=100_000, batch=128, shuffle=True, epochs=1, data="generated",
                path=None, ypath=None, features=TRAIN_LAYERS[0], dtype="float32", warmup=True,
                trace=False, backend=None, threads=None, timeout=1800):
    """Train the 784-256-128-10 MLP (Adam) for ``epochs`` over a data set in a
    fresh process and measure it.

    Parameters
    ----------
    framework : {"fastnn", "torch"}
        ``Sequential.fit``, or PyTorch with ``Adam(fused=True)`` over a
        ``DataLoader(TensorDataset(...), batch_size, shuffle)`` (no workers).
    data : {"generated", "npy", "memmap"}
        ``n`` rows of ``features`` uniform values made in the process (in
        chunks), or the ``.npy`` at ``path`` (labels at ``ypath``) loaded
        whole or opened as a read-only memmap.
    shuffle : bool or "batch"
        As ``fit``'s (PyTorch: a bool).
    warmup : bool
        Train on the first two batches first: the model's buffers and the
        optimizer's state then exist before the measured epoch.
    trace : bool
        Also measure with ``tracemalloc`` (slows Python code: the rate of such
        a run is not the one to quote).

    Returns
    -------
    dict
        ``wall_s``, ``samples_per_s`` (the wall-clock rate of the epochs),
        ``stages``: the ``/proc/self/status`` figures (``VmRSS``, ``VmHWM``,
        ``RssAnon``, ``RssFile``, bytes) at ``start`` (the interpreter,
        before any import), ``imports``, ``data`` (the data made or opened),
        ``ready`` (the model made and warmed up; ``VmHWM`` the peak since
        ``data``) and ``end`` (``VmHWM`` the peak of the measured epochs);
        ``peak_resets`` (whether the peak could be reset: Linux);
        ``traced``: ``model`` (tracemalloc's peak while making and warming
        the model), ``before`` and ``peak`` (current at the start of the
        epochs and peak during them); ``data_bytes``; fastnn's ``history``
        rates.
    """
    cfg = {"framework": framework, "n": n, "batch": batch, "shuffle": shuffle,
           "epochs": epochs, "data": data, "path": path, "ypath": ypath,
           "features": features, "dtype": dtype, "warmup": warmup, "tracemalloc": trace,
           "backend": backend, "threads": threads or fastnn.get_num_threads(), "seed": SEED}
    env = peer_env() if framework == "torch" else dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", FIT_PROCESS_SCRIPT, json.dumps(cfg)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    raise RuntimeError(f"{framework} training process failed (exit {proc.returncode}): {tail}")


def peak_over(res, stage="data"):
    """Bytes of the resident peak after ``stage`` (``"data"``: model, warm-up
    and epochs; ``"ready"``: the epochs alone) over the resident size at
    ``stage``; None where the peak could not be reset (then ``ru_maxrss`` minus
    that size, an upper bound, when ``stage`` is ``"data"``)."""
    st = res["stages"]
    if not res["peak_resets"]:
        return res["ru_maxrss"] - st[stage]["VmRSS"] if stage == "data" else None
    later = ["end"] if stage == "ready" else ["ready", "end"]
    return max(st[s]["VmHWM"] for s in later) - st[stage]["VmRSS"]


def mnist_or_generated(folder):
    """The full MNIST training set (60,000 x 784 float32) saved as ``x.npy`` and
    ``y.npy`` in ``folder`` when a copy is on this machine
    (``fastnn.datasets.load_mnist(download=False)``); else None (the caller
    generates a set of the same shape). Returns ``(x path, y path, label)``."""
    try:
        (x, y), _ = fastnn.datasets.load_mnist(download=False)
    except Exception:   # no copy here, and no download from a benchmark
        return None
    xp, yp = os.path.join(folder, "x.npy"), os.path.join(folder, "y.npy")
    np.save(xp, x)
    np.save(yp, y)
    return xp, yp, "MNIST (60,000 training images)"


@dataclass
class DataResult:
    """One row of the data-at-scale table: a whole training epoch of the MLP,
    batch ``batch``, shuffled, in a fresh process."""

    data: str
    samples: int
    batch: int
    contender: str
    backend: str
    samples_per_s: float        # wall clock of the epoch, data movement included
    peak_over_data: int         # bytes: resident peak over the size once the data exists
    data_bytes: int
    step_samples_per_s: float = None    # fastnn: the steps alone (history)
    note: str = ""


#: The data sets of the data-at-scale table: (kind, samples).
DATA_SETS = (("mnist", 60_000), ("generated", 1_000_000))


def run_data(backend=None, sets=DATA_SETS, batch=128, peers=True, progress=None):
    """A shuffled training epoch of the 784-256-128-10 MLP over the full MNIST
    (or, without a copy on this machine, a generated set of its shape) and a
    generated 1,000,000-sample set (3.1 GB of float32), each framework in its
    own process: fastnn's ``fit`` on ``backend`` (default: the current one)
    and PyTorch with a ``DataLoader`` over a ``TensorDataset`` (same batch,
    ``shuffle=True``, the same threads). Wall-clock samples/s and the resident
    peak over the data (the model, one warm-up and the epoch).

    Returns
    -------
    (list of DataResult, list of str)
    """
    backend = backend or fastnn.get_backend()
    th_ok, th_why = torch_available() if peers else (False, "peers not requested")
    notes = [] if th_ok or not peers else [f"data at scale: PyTorch left out: {th_why}"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastnn-bench-data-") as tmp:
        for kind, n in sets:
            spec = dict(data="generated", n=n)
            label = f"generated {n:,} x 784 float32"
            if kind == "mnist":
                found = mnist_or_generated(tmp)
                if found:
                    spec = dict(data="npy", path=found[0], ypath=found[1], n=60_000)
                    label = found[2]
                else:
                    label = (f"generated {n:,} x 784 float32 (MNIST's shape: no copy of "
                             f"MNIST on this machine)")
            for framework in ("fastnn", "torch") if th_ok else ("fastnn",):
                try:
                    r = fit_process(framework, batch=batch, shuffle=True, warmup=True,
                                    backend=backend if framework == "fastnn" else None, **spec)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    notes.append(f"data at scale, {label}, {framework}: {exc}")
                    continue
                finally:
                    if progress:
                        progress()
                if framework == "fastnn":
                    row = DataResult(label, r["n"], batch, f"fastnn[{r['backend']}] fit",
                                     r["backend"], r["samples_per_s"], peak_over(r),
                                     r["data_bytes"], r["history"]["step_samples_per_s"][0])
                else:
                    row = DataResult(label, r["n"], batch, "pytorch DataLoader", "pytorch",
                                     r["samples_per_s"], peak_over(r), r["data_bytes"],
                                     note=f"torch {r['version']}, {r['threads']} threads, "
                                          f"own process, TensorDataset, shuffle=True")
                rows.append(row)
    return rows, notes


# ======================================================================= start-up

#: Run in a fresh process: ``import fastnn``, then a first call on one backend.
STARTUP_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import fastnn
t1 = time.perf_counter()
backend, what = sys.argv[1], sys.argv[2]
fastnn.set_backend(backend)
t2 = time.perf_counter()
from fastnn import _bench
kind = _bench.startup_first_call(backend, what)
t3 = time.perf_counter()
print("RESULT " + json.dumps({"import": t1 - t0, "load": t2 - t1, "first": t3 - t2,
                              "kind": kind}))
"""


def startup_first_call(backend, what="step"):
    """The first call timed by the start-up benchmark, in a fresh process.

    ``what``: ``"step"``, one training step (``fastnn.Sequential.fit`` on one
    batch of 128 when the model exists, else the kernels of one step called
    directly, ``KernelMLP``); ``"dense_forward"``, one relu dense_forward at
    128x784x256 float32. Returns what ran.
    """
    if what == "dense_forward":
        bind(_dense_forward((128, 784, 256), "float32"), backend)()
        return "dense_forward 128x784x256"
    x, y = _training_data(128)
    if sequential_available()[0] and what == "step":
        sequential_epoch_fn(backend, x, y, 128)()
        return "Sequential.fit, one batch of 128"
    KernelMLP(backend, 128).epoch_fn(x, y)()
    return "kernels of one step, batch 128"


def startup(backend, what="step", cache_dir=None, timeout=600):
    """Seconds of ``import fastnn`` and a first call in a fresh process.

    Parameters
    ----------
    backend : str
    what : str
        See ``startup_first_call``.
    cache_dir : str, optional
        ``NUMBA_CACHE_DIR`` of the process: an empty folder gives a cold start,
        one filled by an earlier run a warm one.

    Returns
    -------
    dict
        ``import``, ``load`` (the backend module), ``first`` (the first call),
        ``total`` (the process's wall time, interpreter start included), ``kind``.
    """
    env = dict(os.environ)
    env["FASTNN_BACKEND"] = backend
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", STARTUP_SCRIPT, backend, what],
                          capture_output=True, text=True, env=env, timeout=timeout)
    total = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            res["total"] = total
            return res
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    raise RuntimeError(f"start-up run of {backend} failed (exit {proc.returncode}): {tail}")


@dataclass
class StartupResult:
    backend: str
    cache: str          # "cold" or "warm"
    import_s: float
    load_s: float
    first_s: float
    total_s: float
    kind: str


def run_startup(backends, modes=("cold", "warm"), what="step", progress=None):
    """Cold and warm start-up of each backend, each in a fresh process.

    Cold uses an empty ``NUMBA_CACHE_DIR`` (numba compiles everything); warm
    runs again with the cache the cold run filled (or, when only warm is
    asked, one filled by an untimed run first).

    Returns
    -------
    (list of StartupResult, list of str)
    """
    rows, errors = [], []
    for b in backends:
        with tempfile.TemporaryDirectory(prefix="fastnn-numba-cache-") as cache:
            if "cold" not in modes:
                with contextlib.suppress(Exception):
                    startup(b, what, cache)
            for mode in modes:
                try:
                    r = startup(b, what, cache)
                    rows.append(StartupResult(b, mode, r["import"], r["load"], r["first"],
                                              r["total"], r["kind"]))
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    errors.append(f"{b} {mode}: {exc}")
                if progress:
                    progress()
    return rows, errors


# ======================================================================= thread pools

#: Run in a fresh process: GEMM, a parallel kernel, GEMM again, in a loop, against
#: the parts timed alone. NumPy's BLAS on all cores (the default).
POOLS_SCRIPT = r"""
import json, sys
import numpy as np
import fastnn
from fastnn import _backend, _bench
backend, kernel = sys.argv[1], sys.argv[2]
be = _backend.load(backend)
rng = np.random.default_rng(0)
x = rng.standard_normal((128, 784)).astype(np.float32)
w = rng.standard_normal((784, 256)).astype(np.float32)
z = np.empty((128, 256), np.float32)
gemm = lambda: np.matmul(x, w, out=z)
case = _bench.find_case(kernel, "relu" if kernel.startswith("activation") else "",
                        (1024, 1024) if kernel.startswith("activation") else (1_000_000,),
                        "float32")
k = _bench.bind(case, backend)
def combo():
    gemm(); k(); gemm()
t = _bench.measure({"gemm": gemm, "kernel": k, "combo": combo}, repeats=15, min_time=0.05)
native = not _bench.runs_reference(case, backend)
print("RESULT " + json.dumps({"gemm": t["gemm"], "kernel": t["kernel"], "combo": t["combo"],
      "ratio": t["combo"] / (2 * t["gemm"] + t["kernel"]), "native": native}))
"""


def thread_pools(backend, kernel="activation_forward", timeout=300):
    """GEMM + parallel kernel + GEMM in a loop, over the sum of the parts alone,
    in a fresh process (issues 4 and 5: within 1.1x).

    ``kernel``: ``activation_forward`` (relu over 1 M float32) or ``adam_step``
    (1 M float32). Returns a dict with ``gemm``, ``kernel``, ``combo`` (seconds),
    ``ratio`` and ``native`` (False when the backend runs the reference there).
    """
    proc = subprocess.run([sys.executable, "-c", POOLS_SCRIPT, backend, kernel],
                          capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    raise RuntimeError(f"thread-pool run of {backend} failed (exit {proc.returncode}): {tail}")


# ======================================================================= per-call overhead

#: Calls timed per contender in the overhead table (issue 14: median over 1,000).
OVERHEAD_CALLS = 1000
#: The small sizes of the overhead table: a training step's small calls.
OVERHEAD_DENSE = (32, 128, 10)
OVERHEAD_ELEMENTWISE = (32, 256)
OVERHEAD_LOSS = (32, 10)
OVERHEAD_PARAMS = 1000
#: (batch, height, width, c_in, c_out, k), its pool's input, dropout's rows x cols.
OVERHEAD_CONV = (8, 12, 12, 8, 16, 3)
OVERHEAD_POOL = (8, 10, 10, 16)
#: gather_rows: 32 rows of 256 features picked from 1,000.
OVERHEAD_GATHER = (1000, 32, 256)


def overhead_cases(dtype="float32"):
    """Every contract kernel at a small size, where a call's fixed cost shows:
    32x128x10 dense, 32x256 elementwise (relu and sigmoid), 32x10 losses,
    1,000 parameters for the optimizers, an 8x12x12x8 image under a 3x3x8x16
    convolution, 2x2 pooling of its output, 32x256 dropout, 32 rows of 256
    gathered from 1,000. A kernel added to the contract without a size here
    gets its smallest ``all_cases`` case."""
    d = dtype
    cases = [_dense_forward(OVERHEAD_DENSE, d), _backprop_delta(OVERHEAD_DENSE, d),
             _dense_backward(OVERHEAD_DENSE, d)]
    for kernel in ("activation_forward", "activation_backward"):
        cases += [_activation(kernel, act, OVERHEAD_ELEMENTWISE, d) for act in ("relu", "sigmoid")]
    cases += [_loss(k, OVERHEAD_LOSS, d) for k in ("softmax_cross_entropy",
                                                    "sigmoid_binary_cross_entropy", "mse",
                                                    "softmax")]
    cases += [_optimizer(k, OVERHEAD_PARAMS, d) for k in ("sgd_step", "adam_step", "rmsprop_step")]
    conv = {"conv2d_forward": ("relu", OVERHEAD_CONV), "conv2d_backward": ("", OVERHEAD_CONV),
            "conv2d_backprop": ("relu", OVERHEAD_CONV),
            "maxpool2d_forward": ("", OVERHEAD_POOL), "maxpool2d_backward": ("relu", OVERHEAD_POOL),
            "dropout_forward": ("", OVERHEAD_ELEMENTWISE),
            "dropout_backward": ("", OVERHEAD_ELEMENTWISE)}
    cases += [_conv(k, v, dims, d) for k, (v, dims) in conv.items() if k in reference.CONTRACT]
    if "gather_rows" in reference.CONTRACT:
        cases.append(_gather("same", OVERHEAD_GATHER, d))
    have = {c.kernel for c in cases}
    for kernel in reference.CONTRACT:
        if kernel not in have:
            rest = [c for c in all_cases((d,)) if c.kernel == kernel]
            if rest:
                cases.append(min(rest, key=lambda c: math.prod(c.dims)))
    return cases


def per_call(fns, calls=OVERHEAD_CALLS, warmup=20):
    """Median seconds of one call of each zero-argument callable, each call
    timed alone (``perf_counter_ns``; its own ~50 ns are in every figure),
    the callables interleaved call by call in a rotating order. Each timed
    call follows an untimed call of the same callable, so that no callable
    is timed right after another's (a reference kernel that allocates, say)
    more often than the others.

    Returns
    -------
    dict
        ``{name: seconds}``.
    """
    names = list(fns)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {n: [] for n in names}
    clock = time.perf_counter_ns
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for i in range(calls):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                fn = fns[name]
                fn()
                t0 = clock()
                fn()
                samples[name].append(clock() - t0)
    finally:
        if gc_was:
            gc.enable()
    return {n: statistics.median(s) * 1e-9 for n, s in samples.items()}


@dataclass
class OverheadResult:
    """One row of the per-call table: the median seconds of one call through
    ``fastnn.ops``, of the backend's kernel called directly, of the NumPy
    reference called directly and of PyTorch's op (its own process)."""

    kernel: str
    variant: str
    shape: str
    dtype: str
    backend: str
    ops_s: float
    direct_s: float
    numpy_s: float
    torch_s: float = None
    torch_op: str = ""
    path: str = ""      # how fastnn.ops ran it: "C entry", "compiled gate", "Python gate"

    @property
    def name(self):
        return f"{self.kernel}[{self.variant}]" if self.variant else self.kernel

    @property
    def overhead_s(self):
        return self.ops_s - self.direct_s


def _ops_path(case, args, backend_name):
    """How ``fastnn.ops`` runs these arguments on this backend."""
    from fastnn import _gate

    op = _gate.OPS.get(case.kernel)
    if _gate._cy_gate is None or op is None or not op.accepts(*args):
        return "Python gate"
    with fastnn.use_backend(backend_name):
        table = _gate._cy_gate.current_kernels()
    if table.has_entry(reference.CONTRACT.index(case.kernel)):
        return "C entry"
    return "compiled gate"


def run_overhead(backends=("cython",), dtype="float32", calls=OVERHEAD_CALLS, peers=True,
                 progress=None):
    """The per-call table: every case of ``overhead_cases`` on each backend
    (not ``numpy``, whose kernels are the reference column), through
    ``fastnn.ops``, directly and as the NumPy reference, interleaved call by
    call in this process; PyTorch's equivalent ops in their own process.

    Returns
    -------
    (list of OverheadResult, list of str)
        The rows, and notes on what was left out.
    """
    notes = []
    torch_times = {}
    cases = overhead_cases(dtype)
    if peers:
        ok, why = torch_available()
        if ok:
            try:
                torch_times = torch_calls(cases, dtype, calls)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                notes.append(f"overhead table: PyTorch left out: {exc}")
        else:
            notes.append(f"overhead table: PyTorch left out: {why}")
    rows = []
    for backend_name in backends:
        if backend_name == "numpy" or (backend_name == "cuda" and cuda_simulated()):
            continue
        be = _backend.load(backend_name)
        if backend_name == "cuda":
            notes.append("overhead table: cuda left out (device arrays and synchronisation "
                         "make per-call figures of another kind)")
            continue
        for case in cases:
            args = case.make(np.random.default_rng(SEED))
            op = getattr(fastnn.ops, case.kernel)
            fns = {"ops": functools.partial(op, *args),
                   "direct": functools.partial(getattr(be, case.kernel), *args),
                   "numpy": functools.partial(getattr(reference, case.kernel), *args)}
            with fastnn.use_backend(backend_name), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                times = per_call(fns, calls)
            t = torch_times.get(case.id, (None, ""))
            rows.append(OverheadResult(case.kernel, case.variant, case.shape, dtype, backend_name,
                                       times["ops"], times["direct"], times["numpy"], t[0], t[1],
                                       _ops_path(case, args, backend_name)))
            if progress:
                progress()
    return rows, notes


#: PyTorch's op for each overhead case, in its own process; prints ``RESULT {id:
#: [seconds, label]}``. Ops that need an argument of another layout (NCHW weights,
#: a dropout mask) get it built once, outside the timing.
TORCH_CALLS_SCRIPT = r"""
import gc, json, statistics, sys, time
import torch
import torch.nn.functional as F

cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
dt = {"float32": torch.float32, "float64": torch.float64}[cfg["dtype"]]
g = torch.Generator().manual_seed(0)
r = lambda *s: torch.randn(*s, generator=g, dtype=dt)
aten = torch.ops.aten
ops = {}
for c in cfg["cases"]:
    k, v, dims, key = c["kernel"], c["variant"], c["dims"], c["id"]
    try:
        if k == "activation_forward" and v == "relu":
            z = r(*dims)
            ops[key] = ("torch.relu", lambda z=z: torch.relu(z))
        elif k == "activation_forward" and v == "sigmoid":
            z = r(*dims); out = torch.empty_like(z)
            ops[key] = ("torch.sigmoid(out=)", lambda z=z, out=out: torch.sigmoid(z, out=out))
        elif k == "activation_backward" and v == "relu":
            dy = r(*dims); y = torch.relu(r(*dims))
            ops[key] = ("aten.threshold_backward", lambda dy=dy, y=y: aten.threshold_backward(dy, y, 0))
        elif k == "activation_backward" and v == "sigmoid":
            dy = r(*dims); y = torch.sigmoid(r(*dims))
            ops[key] = ("aten.sigmoid_backward", lambda dy=dy, y=y: aten.sigmoid_backward(dy, y))
        elif k == "dense_forward":
            b, i, o = dims; x = r(b, i); w = r(i, o); bias = r(o); out = torch.empty(b, o, dtype=dt)
            ops[key] = ("addmm(out=) + relu_", lambda x=x, w=w, bias=bias, out=out:
                        torch.addmm(bias, x, w, out=out).relu_())
        elif k == "backprop_delta":
            b, i, o = dims; dy = r(b, o); w = r(i, o); y = torch.relu(r(b, i)); out = torch.empty(b, i, dtype=dt)
            ops[key] = ("mm(out=) + threshold_backward", lambda dy=dy, w=w, y=y, out=out:
                        aten.threshold_backward(torch.mm(dy, w.t(), out=out), y, 0))
        elif k == "dense_backward":
            b, i, o = dims; x = r(b, i); dz = r(b, o); dw = torch.empty(i, o, dtype=dt); db = torch.empty(o, dtype=dt)
            ops[key] = ("mm(out=) + sum(out=)", lambda x=x, dz=dz, dw=dw, db=db:
                        (torch.mm(x.t(), dz, out=dw), torch.sum(dz, 0, out=db)))
        elif k == "softmax_cross_entropy":
            z = r(*dims); lab = torch.randint(0, dims[1], (dims[0],), generator=g)
            ops[key] = ("F.cross_entropy (loss only)", lambda z=z, lab=lab: F.cross_entropy(z, lab))
        elif k == "sigmoid_binary_cross_entropy":
            z = r(*dims); t = (torch.rand(*dims, generator=g) < 0.5).to(dt)
            ops[key] = ("F.binary_cross_entropy_with_logits (loss only)",
                        lambda z=z, t=t: F.binary_cross_entropy_with_logits(z, t))
        elif k == "mse":
            p = r(*dims); t = r(*dims)
            ops[key] = ("F.mse_loss (loss only)", lambda p=p, t=t: F.mse_loss(p, t))
        elif k == "softmax":
            z = r(*dims)
            ops[key] = ("torch.softmax", lambda z=z: torch.softmax(z, 1))
        elif k == "sgd_step":
            n = dims[0]; p, gr, buf = r(n), r(n), r(n)
            ops[key] = ("torch._fused_sgd_", lambda p=p, gr=gr, buf=buf: torch._fused_sgd_(
                [p], [gr], [buf], weight_decay=0.0, momentum=0.9, lr=1e-3, dampening=0.0,
                nesterov=False, maximize=False, is_first_step=False))
        elif k == "adam_step":
            n = dims[0]; p, gr, m, vv = r(n), r(n), r(n), r(n).abs()
            step = torch.tensor(10.0, dtype=dt)
            ops[key] = ("torch._fused_adam_", lambda p=p, gr=gr, m=m, vv=vv, step=step:
                        torch._fused_adam_([p], [gr], [m], [vv], [], [step], lr=1e-3, beta1=0.9,
                                           beta2=0.999, weight_decay=0.0, eps=1e-8,
                                           amsgrad=False, maximize=False))
        elif k in ("conv2d_forward", "conv2d_backward", "conv2d_backprop"):
            n, h, w_, ci, co, kk = dims
            x = r(n, ci, h, w_).contiguous(memory_format=torch.channels_last)
            w = r(co, ci, kk, kk).contiguous(memory_format=torch.channels_last)
            bias = r(co)
            dz = r(n, co, h - kk + 1, w_ - kk + 1).contiguous(memory_format=torch.channels_last)
            if k == "conv2d_forward":
                ops[key] = ("F.conv2d + relu_ (channels_last)",
                            lambda x=x, w=w, bias=bias: F.conv2d(x, w, bias).relu_())
            elif k == "conv2d_backward":
                ops[key] = ("aten.convolution_backward (weight, bias)",
                            lambda x=x, w=w, dz=dz: aten.convolution_backward(
                                dz, x, w, [co], [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                [False, True, True]))
            else:
                y = torch.relu(x)
                ops[key] = ("aten.convolution_backward (input) + threshold_backward",
                            lambda x=x, w=w, dz=dz, y=y: aten.threshold_backward(
                                aten.convolution_backward(dz, x, w, [co], [1, 1], [0, 0], [1, 1],
                                                          False, [0, 0], 1,
                                                          [True, False, False])[0], y, 0))
        elif k in ("maxpool2d_forward", "maxpool2d_backward"):
            n, h, w_, ch = dims
            x = r(n, ch, h, w_).contiguous(memory_format=torch.channels_last)
            if k == "maxpool2d_forward":
                ops[key] = ("F.max_pool2d(return_indices) (channels_last)",
                            lambda x=x: F.max_pool2d(x, 2, return_indices=True))
            else:
                out, idx = F.max_pool2d(x, 2, return_indices=True)
                dy = r(*out.shape).contiguous(memory_format=torch.channels_last)
                ops[key] = ("aten.max_pool2d_with_indices_backward",
                            lambda x=x, dy=dy, idx=idx: aten.max_pool2d_with_indices_backward(
                                dy, x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx))
        elif k == "dropout_forward":
            x = r(*dims)
            ops[key] = ("F.dropout", lambda x=x: F.dropout(x, 0.5, training=True))
        elif k == "gather_rows":
            n, kk, m = dims
            src = r(n, m); idx = torch.randint(0, n, (kk,), generator=g)
            out = torch.empty(kk, m, dtype=dt)
            ops[key] = ("torch.index_select(out=)", lambda src=src, idx=idx, out=out:
                        torch.index_select(src, 0, idx, out=out))
        elif k == "dropout_backward":
            dy = r(*dims); mask = torch.rand(*dims, generator=g) < 0.5
            ops[key] = ("aten.native_dropout_backward",
                        lambda dy=dy, mask=mask: aten.native_dropout_backward(dy, mask, 2.0))
    except Exception as exc:
        print(f"{key}: {exc!r}", file=sys.stderr)
res = {}
with torch.inference_mode():
    for key, (label, fn) in ops.items():
        for _ in range(20):
            fn()
    samples = {key: [] for key in ops}
    keys = list(ops)
    clock = time.perf_counter_ns
    gc.disable()
    for i in range(cfg["calls"]):
        j = i % max(len(keys), 1)
        for key in keys[j:] + keys[:j]:
            fn = ops[key][1]
            fn()
            t0 = clock()
            fn()
            samples[key].append(clock() - t0)
for key, (label, fn) in ops.items():
    res[key] = [statistics.median(samples[key]) * 1e-9, label]
print("RESULT " + json.dumps(res))
"""


def torch_calls(cases, dtype="float32", calls=OVERHEAD_CALLS, threads=None, timeout=600):
    """PyTorch's equivalent op of each case (where there is one) timed per call,
    interleaved, in its own process.

    Returns
    -------
    dict
        ``{case.id: (seconds, op label)}``.
    """
    cfg = {"dtype": dtype, "calls": calls, "threads": threads or fastnn.get_num_threads(),
           "cases": [{"kernel": c.kernel, "variant": c.variant, "dims": list(c.dims),
                      "id": c.id} for c in cases]}
    proc = subprocess.run([sys.executable, "-c", TORCH_CALLS_SCRIPT, json.dumps(cfg)],
                          capture_output=True, text=True, timeout=timeout, env=peer_env())
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {k: tuple(v) for k, v in json.loads(line[7:]).items()}
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    raise RuntimeError(f"PyTorch subprocess failed (exit {proc.returncode}): {tail}")


# ======================================================================= formatting

def fmt_time(s):
    """``1.23 ms``, ``456 us``, ``2.1 s``."""
    if s is None:
        return ""
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def fmt_ratio(r):
    """``1.23x``; two significant digits below 0.1 (``0.031x``)."""
    if r is None:
        return ""
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x"


def fmt_probe(row):
    """``1.03x GEMM`` (time over the bare GEMM) or ``91% of floor`` (floor time
    over this time: 100% runs at memory bandwidth)."""
    if row.probe_ratio is None:
        return ""
    if row.probe == "gemm":
        return f"{row.probe_ratio:.2f}x GEMM"
    return f"{100 * row.probe_ratio:.0f}% of floor"
