"""The ``cuda`` backend: every kernel of the contract on an NVIDIA GPU.

Kernels take device arrays (anything exporting ``__cuda_array_interface__``:
numba device arrays, CuPy arrays, PyTorch CUDA tensors) and NumPy arrays. A
NumPy argument is copied to the device, the kernel runs there, and NumPy
outputs and in-place state are copied back, which is convenient for tests but
slow; a model on this backend allocates its buffers with the array hooks below
(``empty``, ``zeros``, ``from_host``) and keeps them on the device for the whole
of ``fit``: only batches go up, and only scalars (the loss, the count of correct
predictions) come down. Every GEMM, kernel and copy of a call goes on one
stream: CuPy's current stream when CuPy is in use (its cuBLAS calls take that
stream, so a caller's non-blocking stream orders the GEMM and the kernels
around it), else numba's default stream; the losses and ``count_correct``
wait for it, as they return host numbers.

GEMM is cuBLAS, called through CuPy's bindings with the device pointers (no
copies, no CuPy arrays), when CuPy and its cuBLAS are installed; otherwise a
tiled shared-memory ``numba.cuda`` GEMM with the epilogue fused in. Around it,
``numba.cuda`` kernels from ``_cuda_kernels``: the bias + activation epilogue,
the derivative epilogue of ``backprop_delta``, the ``db`` column sum, softmax
cross-entropy (one block per row, shared-memory reductions), BCE, MSE, softmax,
and the optimizers as grid-stride kernels that read and write each array once
(bias corrections computed here in float64, once per call).

Availability: numba-cuda must be installed (``pip install 'fastnn[cuda]'``) and
a GPU usable, or the CUDA simulator enabled (``NUMBA_ENABLE_CUDASIM=1`` in the
environment before numba is first imported; kernels then run as Python
threads, for tests only). Importing this module imports no numba;
``available()`` does, and says why the backend cannot run when it cannot.
"""

import importlib.util
import math
import os
import sys
import threading
import warnings

import numpy as np

from .reference import ACTIVATIONS  # noqa: F401 - the backend implements all of them
from .reference import dropout_threshold

__all__ = [
    "dense_forward", "activation_forward", "activation_backward",
    "backprop_delta", "dense_backward", "softmax_cross_entropy",
    "sigmoid_binary_cross_entropy", "mse", "sgd_step", "adam_step",
    "rmsprop_step", "softmax",
    "conv2d_forward", "conv2d_backward", "conv2d_backprop",
    "maxpool2d_forward", "maxpool2d_backward", "dropout_forward", "dropout_backward",
    "gather_rows",
    "available", "info", "empty", "zeros", "from_host", "to_host", "copy_from_host",
    "count_correct", "synchronize", "set_gemm", "gemm_engine",
]

COMPLETE = True   # every kernel, every activation in ACTIVATIONS (imported above)
#: (batch, width) pairs for the parity suite: tiny, as the simulator runs
#: every GPU thread as a Python thread.
PARITY_SHAPES = tuple((batch, width) for batch in (1, 3, 5) for width in (1, 7, 10))

_cuda = None        # numba.cuda, once probed
_k = None           # the _cuda_kernels module, once probed
_status = None      # (available, reason)
_device_types = ()  # classes of numba's own device arrays
_probe_lock = threading.Lock()


# ------------------------------------------------------------------ availability

def available():
    """Whether the backend can run here, and why not.

    Returns
    -------
    (bool, str)
        ``(True, "")`` with a usable GPU, ``(True, caveat)`` under the CUDA
        simulator or without cuBLAS, ``(False, reason)`` when numba-cuda is
        not installed, there is no CUDA driver, or no GPU.
    """
    global _status
    if _status is None:
        with _probe_lock:
            if _status is None:
                _status = _probe()
    return _status


def _probe():
    global _cuda, _k, _device_types
    if importlib.util.find_spec("numba_cuda") is None:
        return False, ("numba-cuda is not installed (pip install 'fastnn[cuda]', which brings "
                       "numba-cuda[cu12] and cupy-cuda12x)")
    try:
        from numba import cuda
    except Exception as exc:  # a broken install: missing cuda-bindings, ...
        return False, f"numba.cuda failed to import: {type(exc).__name__}: {_one_line(exc)}"
    try:
        from numba.cuda.core import config
        simulator = bool(config.ENABLE_CUDASIM)
    except ImportError:
        simulator = False
    if simulator:
        from . import _cuda_sim

        _device_types = (_cuda_sim.install(cuda),)
    else:
        if not cuda.is_available():
            return False, f"no usable CUDA GPU: {_driver_error(cuda)}"
        from numba.cuda.cudadrv.devicearray import DeviceNDArray

        _device_types = (DeviceNDArray,)
    from . import _cuda_kernels

    _cuda, _k = cuda, _cuda_kernels
    if simulator:
        return True, ("CUDA simulator (NUMBA_ENABLE_CUDASIM=1): kernels run as Python threads, "
                      "for tests only")
    engine, why = _resolve_gemm()
    return True, "" if engine == "cublas" else f"GEMM: numba tiled kernel ({why})"


def _one_line(exc):
    return " ".join(str(exc).split()).rstrip(" :")


def _driver_error(cuda):
    """The driver's own words for why there is no GPU."""
    try:
        cuda.current_context()
    except Exception as exc:
        return _one_line(exc) or type(exc).__name__
    return "cuda.is_available() is False"


def _ready():
    """numba.cuda, importing it on a direct call without ``available()``."""
    if _k is None:
        ok, reason = available()
        if not ok:
            raise RuntimeError(f"the cuda backend is not available: {reason}")
    return _cuda


def info():
    """Lines for ``python -m fastnn info``: device, GEMM engine, versions."""
    ok, reason = available()
    if not ok:
        return {"reason": reason}
    out = {}
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("numba-cuda", "cupy-cuda12x"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    if _k.SIMULATOR:
        out["device"] = "CUDA simulator"
    else:
        dev = _cuda.get_current_device()
        name = dev.name.decode() if isinstance(dev.name, bytes) else dev.name
        out["device"] = f"{name} (compute capability {dev.compute_capability[0]}."\
                        f"{dev.compute_capability[1]}, {dev.MULTIPROCESSOR_COUNT} SMs)"
    out["gemm"] = gemm_engine()
    return out


# ------------------------------------------------------------------ arrays

def _is_device(a):
    return isinstance(a, _device_types)


class _Staging:
    """Device arrays for the arguments of one call.

    Device arrays pass as they are (foreign ones, CuPy or PyTorch, through
    ``numba.cuda.as_cuda_array``, no copy). A NumPy array is copied to the
    device once per call, keyed by its memory, so ``out is z`` stays one
    array; ``out=True`` marks it to be copied back by ``finish``; ``fresh``
    allocates without copying in (an output the kernel overwrites).
    """

    __slots__ = ("host", "back", "stream")

    def __init__(self):
        if _k is None:
            _ready()
        self.host = None
        self.back = None
        self.stream = _stream()

    def __call__(self, a, out=False, fresh=False):
        if _is_device(a):
            return a
        if not isinstance(a, np.ndarray):
            return _cuda.as_cuda_array(a)
        if self.host is None:
            self.host, self.back = {}, []
        key = (a.__array_interface__["data"][0], a.shape, a.dtype.str)
        d = self.host.get(key)
        if d is None:
            d = (_cuda.device_array(a.shape, a.dtype) if fresh
                 else _cuda.to_device(a, stream=self.stream or 0))
            self.host[key] = d
        if out:
            self.back.append((d, a))
        return d

    def finish(self):
        """Copy the NumPy outputs back (this waits for the kernels)."""
        if self.back:
            for d, a in self.back:
                d.copy_to_host(a, stream=self.stream or 0)
            _wait(self.stream)


def _flat(d):
    """A 1-D view of a C-contiguous device array."""
    shape = d.shape
    if len(shape) == 1:
        return d
    return d.reshape(math.prod(shape))


class _Scratch(threading.local):
    """Per-thread device scratch for the loss reductions: ``partials``
    (float64, grown as needed), ``result`` (one float64) and a pinned host
    float64 to read it into."""

    def __init__(self):
        self.partials = None
        self.result = None
        self.host = None

    def get(self, count):
        if self.partials is None or self.partials.shape[0] < count:
            size = max(count, 2 * (0 if self.partials is None else self.partials.shape[0]), 1024)
            self.partials = _cuda.device_array(size, np.float64)
        if self.result is None:
            self.result = _cuda.device_array(1, np.float64)
            self.host = _cuda.pinned_array(1, np.float64)
        return self.partials, self.result

    def read(self):
        """The scalar in ``result`` as a Python float (waits for the kernels)."""
        stream = _stream()
        self.result.copy_to_host(self.host, stream=stream or 0)
        _wait(stream)
        return float(self.host[0])


_scratch = _Scratch()
_max_blocks = None


def _blocks(n):
    """Blocks of ``BLOCK`` threads for a grid-stride kernel over ``n`` elements:
    enough to cover it, at most 16 per multiprocessor."""
    global _max_blocks
    if _max_blocks is None:
        _max_blocks = 4 if _k.SIMULATOR else 16 * _cuda.get_current_device().MULTIPROCESSOR_COUNT
    return max(1, min(-(-n // _k.BLOCK), _max_blocks))


_streams = {}   # CUDA stream handle -> numba's object for it


def _stream():
    """The stream of this call: CuPy's current stream when CuPy is imported
    (the stream its cuBLAS wrappers set on the handle before every GEMM, so
    that the GEMM and our kernels are ordered on one stream), else None:
    numba's default stream. Also None for CuPy's null stream, which is the
    same legacy default stream."""
    cupy = sys.modules.get("cupy")
    if cupy is None or _k.SIMULATOR:
        return None
    return _stream_of(cupy.cuda.get_current_stream().ptr)


def _stream_of(handle):
    """numba's stream object for the CUDA stream ``handle`` (None for 0)."""
    if not handle:
        return None
    s = _streams.get(handle)
    if s is None:
        if len(_streams) > 256:
            _streams.clear()
        s = _streams[handle] = _cuda.external_stream(handle)
    return s


def _wait(stream):
    """Wait for ``stream`` (numba's default stream's copies already waited)."""
    if stream is not None:
        stream.synchronize()


_launches = {}


def _launch(kernel, grid, block):
    """``kernel[grid, block, stream]`` on this call's stream (``_stream``),
    kept for reuse: a configured launch is built once per shape and stream,
    and without numba's low-occupancy warning, which small batches trigger by
    design (a loss's final reduction is one block)."""
    if _k.SIMULATOR:   # the simulator's kernels reconfigure themselves in place
        return kernel[grid, block]
    stream = _stream()
    key = (kernel, grid, block, stream)
    launch = _launches.get(key)
    if launch is None:
        if len(_launches) > 4096:
            _launches.clear()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Grid size")
            launch = _launches[key] = (kernel[grid, block] if stream is None
                                       else kernel[grid, block, stream])
    return launch


def _act(act):
    return _k.ACT_CODES[act]


# ------------------------------------------------------------------ GEMM

_gemm = {"engine": None, "why": ""}
_cublas = None   # (cublas module, get_cublas_handle, alpha/beta host scalars per dtype)


def _resolve_gemm():
    """Pick cuBLAS (CuPy installed, its cuBLAS found, a GPU) or the numba
    tiled GEMM; ``FASTNN_CUDA_GEMM=numba`` forces the latter."""
    global _cublas
    if _gemm["engine"] is not None:
        return _gemm["engine"], _gemm["why"]
    engine, why = "numba", ""
    if _k.SIMULATOR:
        why = "CUDA simulator"
    elif os.environ.get("FASTNN_CUDA_GEMM", "").strip().lower() == "numba":
        why = "FASTNN_CUDA_GEMM=numba"
    elif importlib.util.find_spec("cupy") is None:
        why = "CuPy is not installed"
    else:
        try:
            import cupy.cuda.device
            from cupy_backends.cuda.libs import cublas

            cupy.cuda.runtime.getDeviceCount()
            scalars = {}
            for dt in (np.float32, np.float64):
                scalars[np.dtype(dt)] = (np.ones(1, dt), np.zeros(1, dt),
                                         cublas.sgemm if dt is np.float32 else cublas.dgemm)
            _cublas = (cublas, cupy.cuda.device.get_cublas_handle, scalars)
            engine = "cublas"
        except Exception as exc:
            why = f"CuPy's cuBLAS is not usable: {type(exc).__name__}: {_one_line(exc)}"
    _gemm["engine"], _gemm["why"] = engine, why
    return engine, why


def gemm_engine():
    """``"cublas"`` or ``"numba"``: what the GEMM kernels use now."""
    _ready()
    return _resolve_gemm()[0]


def set_gemm(engine):
    """Choose the GEMM: ``"cublas"`` (raises ``RuntimeError`` when it is not
    usable), ``"numba"`` (the tiled kernel) or ``"auto"`` (cuBLAS when usable).
    For tests and benchmarks; returns the engine now in use."""
    if engine not in ("cublas", "numba", "auto"):
        raise ValueError(f"engine must be 'cublas', 'numba' or 'auto', got {engine!r}")
    _ready()
    _gemm["engine"] = None
    best, why = _resolve_gemm()
    if engine == "cublas" and best != "cublas":
        raise RuntimeError(f"cuBLAS is not usable: {why}")
    if engine == "numba":
        _gemm["engine"], _gemm["why"] = "numba", "set_gemm('numba')"
    return _gemm["engine"]


def cublas_arguments(m, n, k, ta, tb):
    """Column-major cuBLAS arguments for row-major ``C = op(A) @ op(B)``.

    ``C (m, n)``; ``op(A) = A.T`` when ``ta`` (``A`` stored ``(k, m)``) else
    ``A`` (``(m, k)``); likewise ``op(B)`` with ``B`` stored ``(n, k)`` or
    ``(k, n)``. A row-major matrix is its transpose in column-major order, so
    the call computes ``C.T = op(B).T @ op(A).T``:
    ``gemm(opB, opA, n, m, k, alpha, B, ldb, A, lda, beta, C, n)``.

    Returns
    -------
    (transb, transa, ldb, lda) : ("N" or "T", "N" or "T", int, int)
    """
    transb, ldb = ("T", k) if tb else ("N", n)
    transa, lda = ("T", m) if ta else ("N", k)
    return transb, transa, ldb, lda


def _ptr(d):
    return d.device_ctypes_pointer.value


#: CUDA's largest ``gridDim.y``; ``gridDim.x`` goes to 2^31 - 1.
GRID_Y_MAX = 65535


def gemm_grid(m, n, bm):
    """Blocks of the tiled GEMM for ``C (m, n)`` in ``bm x bm`` tiles: the
    row tiles on ``x`` (a batch of any size), the column tiles on ``y``, at
    most ``GRID_Y_MAX`` of them (the kernel strides over the rest). Before,
    the row tiles were on ``y``: more than 65,535 * 64 = 4,194,240 rows could
    not launch.

    Returns
    -------
    (int, int)
    """
    return -(-m // bm), max(1, min(-(-n // bm), GRID_Y_MAX))


def _matmul(a, b, c, ta, tb, ks, epi, act=0, bias=None, preact=None, z=None, y=None):
    """``c = op(a) @ op(b)`` then the epilogue ``epi`` (see ``_cuda_kernels``):
    one fused tiled kernel, or cuBLAS followed by the epilogue kernel."""
    k_ = _k
    m, n = c.shape
    fc = _flat(c)
    fpre = fc if preact is None else _flat(preact)
    if _gemm["engine"] is None:
        _resolve_gemm()
    if _gemm["engine"] == "numba":
        _launch(ks.gemm, gemm_grid(m, n, k_.BM), (k_.TS, k_.TS))(
            a, b, int(ta), int(tb), epi, act, fc if bias is None else bias, fc, fpre,
            int(preact is not None), fc if z is None else _flat(z), fc if y is None else _flat(y))
        return
    cublas, handle, scalars = _cublas
    alpha, beta, gemm = scalars[c.dtype]
    k = a.shape[0] if ta else a.shape[1]
    transb, transa, ldb, lda = cublas_arguments(m, n, k, ta, tb)
    h = handle()
    cublas.setPointerMode(h, cublas.CUBLAS_POINTER_MODE_HOST)
    op = {"N": cublas.CUBLAS_OP_N, "T": cublas.CUBLAS_OP_T}
    target = c if preact is None else preact
    gemm(h, op[transb], op[transa], n, m, k, alpha.ctypes.data, _ptr(b), ldb, _ptr(a), lda,
         beta.ctypes.data, _ptr(target), n)
    size = m * n
    if epi == k_.EPI_FORWARD:
        _launch(ks.bias_activation, _blocks(size), k_.BLOCK)(
            fpre, bias, act, fc, fpre, int(preact is not None))
    elif epi == k_.EPI_DELTA:
        _launch(ks.activation_backward, _blocks(size), k_.BLOCK)(
            act, fc, fc if z is None else _flat(z), fc if y is None else _flat(y), fc)


# ------------------------------------------------------------------ dense layer

def dense_forward(x, w, b, act, out, preact=None):
    """Dense layer forward: ``out = act(x @ w + b)``, keeping ``x @ w + b`` in
    ``preact`` when given.

    One tiled GEMM with the bias and activation in its store, or cuBLAS and
    one epilogue kernel (``z = zin + b``, ``preact = z``, ``out = act(z)``).
    Arrays: ``x (batch, in)``, ``w (in, out)``, ``b (out,)``,
    ``out``/``preact (batch, out)``, device or NumPy, float32 or float64.
    """
    s = _Staging()
    dx, dw, db = s(x), s(w), s(b)
    dout = s(out, out=True, fresh=True)
    dpre = None if preact is None else s(preact, out=True, fresh=True)
    ks = _k.kernels(dx.dtype)
    _matmul(dx, dw, dout, False, False, ks, _k.EPI_FORWARD, _act(act), db, preact=dpre)
    s.finish()


def backprop_delta(dy, w, z, y, act, out):
    """Delta of the layer below: ``out = (dy @ w.T) * act'(z)``, ``act'`` from
    ``y`` for identity, relu, sigmoid, tanh (``z`` may be None), else from
    ``z`` (``y`` may be None).

    The GEMM reads ``w`` transposed in place (no copy); the derivative is its
    fused epilogue (tiled) or one elementwise kernel after cuBLAS.
    """
    s = _Staging()
    ddy, dw = s(dy), s(w)
    dz = None if z is None else s(z)
    dyy = None if y is None else s(y)
    dout = s(out, out=True, fresh=True)
    ks = _k.kernels(ddy.dtype)
    code = _act(act)
    epi = _k.EPI_STORE if code == 0 else _k.EPI_DELTA
    _matmul(ddy, dw, dout, False, True, ks, epi, code, z=dz, y=dyy)
    s.finish()


def dense_backward(x, dz, dw, db):
    """Parameter gradients: ``dw = x.T @ dz`` (``x`` read transposed in
    place) and ``db = dz.sum(0)`` (a shared-memory column sum)."""
    s = _Staging()
    dx, ddz = s(x), s(dz)
    ddw = s(dw, out=True, fresh=True)
    ddb = s(db, out=True, fresh=True)
    ks = _k.kernels(dx.dtype)
    _matmul(dx, ddz, ddw, True, False, ks, _k.EPI_STORE)
    n = ddz.shape[1]
    _launch(ks.column_sum, -(-n // _k.CW), (_k.CW, _k.RW))(ddz, ddb)
    s.finish()


# ------------------------------------------------------------------ elementwise

def activation_forward(act, z, out):
    """``out = act(z)`` elementwise, any shape; ``out`` may be ``z``."""
    s = _Staging()
    dz = s(z)
    dout = s(out, out=True, fresh=True)
    ks = _k.kernels(dz.dtype)
    fz, fo = _flat(dz), _flat(dout)
    _launch(ks.activation_forward, _blocks(fo.shape[0]), _k.BLOCK)(_act(act), fz, fo)
    s.finish()


def activation_backward(act, dy, z, y, out):
    """``out = dy * act'(z)`` elementwise; ``act'`` from ``y`` for identity,
    relu, sigmoid, tanh, else from ``z``; ``out`` may be ``dy`` or ``z``."""
    s = _Staging()
    ddy = s(dy)
    dz = None if z is None else s(z)
    dyy = None if y is None else s(y)
    dout = s(out, out=True, fresh=True)
    code = _act(act)
    if not (code == 0 and dout is ddy):
        ks = _k.kernels(ddy.dtype)
        fdy, fo = _flat(ddy), _flat(dout)
        _launch(ks.activation_backward, _blocks(fo.shape[0]), _k.BLOCK)(
            code, fdy, fdy if dz is None else _flat(dz), fdy if dyy is None else _flat(dyy), fo)
    s.finish()


# ------------------------------------------------------------------ losses

def softmax(z, out):
    """Row-wise softmax ``out_i = exp(z_i - max z_i) / sum exp(z_i - max z_i)``,
    one block per row; ``out`` may be ``z``."""
    s = _Staging()
    dz = s(z)
    dout = s(out, out=True, fresh=True)
    ks = _k.kernels(dz.dtype)
    _launch(ks.softmax, dz.shape[0], _k.BLOCK)(dz, dout)
    s.finish()


def softmax_cross_entropy(logits, labels, grad):
    """Mean softmax cross-entropy ``mean_i(log s_i - (z_{i,label_i} - m_i))``
    and ``grad = (softmax(z) - onehot(labels)) / batch``, with
    ``m_i = max_j z_ij``, ``s_i = sum_j exp(z_ij - m_i)``.

    One block per row (shared-memory max and sum), then a one-block float64
    mean of the row losses; only that float comes back.

    Returns
    -------
    float
    """
    s = _Staging()
    dl, dlab = s(logits), s(labels)
    dg = s(grad, out=True, fresh=True)
    ks = _k.kernels(dl.dtype)
    batch = dl.shape[0]
    partials, result = _scratch.get(batch)
    _launch(ks.softmax_cross_entropy, batch, _k.BLOCK)(dl, dlab, dg, partials)
    _launch(ks.mean_of_partials, 1, _k.BLOCK)(partials, batch, float(batch), result)
    s.finish()
    return _scratch.read()


def sigmoid_binary_cross_entropy(logits, targets, grad):
    """Mean ``max(z, 0) - z*t + log1p(exp(-|z|))`` over all elements and
    ``grad = (sigmoid(z) - t) / z.size``.

    Returns
    -------
    float
    """
    s = _Staging()
    dl, dt = s(logits), s(targets)
    dg = s(grad, out=True, fresh=True)
    ks = _k.kernels(dl.dtype)
    fl = _flat(dl)
    n = fl.shape[0]
    blocks = _blocks(n)
    partials, result = _scratch.get(blocks)
    _launch(ks.sigmoid_bce, blocks, _k.BLOCK)(fl, _flat(dt), _flat(dg), partials)
    _launch(ks.mean_of_partials, 1, _k.BLOCK)(partials, blocks, float(n), result)
    s.finish()
    return _scratch.read()


def mse(pred, target, grad):
    """Mean squared error ``mean((pred - target)^2)`` and
    ``grad = 2*(pred - target) / pred.size`` (``grad`` may be ``pred`` or ``target``).

    Returns
    -------
    float
    """
    s = _Staging()
    dp, dt = s(pred), s(target)
    dg = s(grad, out=True, fresh=True)
    ks = _k.kernels(dp.dtype)
    fp = _flat(dp)
    n = fp.shape[0]
    blocks = _blocks(n)
    partials, result = _scratch.get(blocks)
    _launch(ks.mse, blocks, _k.BLOCK)(fp, _flat(dt), _flat(dg), ks.dtype.type(2 / n), partials)
    _launch(ks.mean_of_partials, 1, _k.BLOCK)(partials, blocks, float(n), result)
    s.finish()
    return _scratch.read()


# ------------------------------------------------------------------ optimizers

def sgd_step(p, g, buf, lr, momentum, nesterov, weight_decay, l1):
    """SGD in place, one grid-stride kernel: ``g' = g + weight_decay*p +
    l1*sign(p)``; with ``momentum > 0`` ``buf = momentum*buf + g'`` and
    ``d = g' + momentum*buf`` (Nesterov) or ``buf``, else ``d = g'``;
    ``p -= lr*d``."""
    s = _Staging()
    dp = s(p, out=True)
    dg = s(g)
    dbuf = s(buf, out=True) if (buf is not None and momentum != 0) else dp
    ks = _k.kernels(dp.dtype)
    F = ks.dtype.type
    _launch(ks.sgd, _blocks(dp.shape[0]), _k.BLOCK)(
        dp, dg, dbuf, F(lr), F(momentum), int(bool(nesterov)), F(weight_decay), F(l1))
    s.finish()


def adam_step(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, decoupled, l1, vmax):
    """Adam / AdamW / AMSGrad in place, one grid-stride kernel.

    ``g' = g + weight_decay*p + l1*sign(p)`` (AdamW: ``p *= 1 - lr*weight_decay``
    instead of the ``weight_decay`` term); ``m = beta1*m + (1-beta1)*g'``,
    ``v = beta2*v + (1-beta2)*g'^2``; AMSGrad ``vmax = max(vmax, v)`` replaces
    ``v``; ``p -= lr/(1-beta1^t) * m / (sqrt(v)/sqrt(1-beta2^t) + eps)``. The bias
    corrections are computed here in float64, once per call.
    """
    s = _Staging()
    dp = s(p, out=True)
    dg = s(g)
    dm, dv = s(m, out=True), s(v, out=True)
    dvmax = dp if vmax is None else s(vmax, out=True)
    ks = _k.kernels(dp.dtype)
    F = ks.dtype.type
    bc1 = 1.0 - float(beta1) ** step
    bc2_sqrt = math.sqrt(1.0 - float(beta2) ** step)
    if decoupled:
        wd, decay, has_decay = 0.0, 1.0 - lr * weight_decay, int(weight_decay != 0)
    else:
        wd, decay, has_decay = weight_decay, 1.0, 0
    _launch(ks.adam, _blocks(dp.shape[0]), _k.BLOCK)(
        dp, dg, dm, dv, dvmax, int(vmax is not None), F(wd), F(l1), F(decay), has_decay,
        F(beta1), F(1.0 - beta1), F(beta2), F(1.0 - beta2), F(bc2_sqrt), F(eps), F(lr / bc1))
    s.finish()


def rmsprop_step(p, g, sq, buf, lr, rho, eps, momentum, centered_mean, weight_decay, l1):
    """RMSprop in place, one grid-stride kernel: ``g' = g + weight_decay*p +
    l1*sign(p)``; ``sq = rho*sq + (1-rho)*g'^2``; centered
    ``cm = rho*cm + (1-rho)*g'``, ``den = sqrt(max(sq - cm^2, 0)) + eps``, else
    ``den = sqrt(sq) + eps``; with ``momentum > 0`` ``buf = momentum*buf + g'/den``,
    ``p -= lr*buf``, else ``p -= lr*g'/den``."""
    s = _Staging()
    dp = s(p, out=True)
    dg = s(g)
    dsq = s(sq, out=True)
    dbuf = s(buf, out=True) if (buf is not None and momentum != 0) else dp
    dcm = dp if centered_mean is None else s(centered_mean, out=True)
    ks = _k.kernels(dp.dtype)
    F = ks.dtype.type
    _launch(ks.rmsprop, _blocks(dp.shape[0]), _k.BLOCK)(
        dp, dg, dsq, dbuf, dcm, F(lr), F(rho), F(1.0 - rho), F(eps), F(momentum),
        int(centered_mean is not None), F(weight_decay), F(l1))
    s.finish()


# ------------------------------------------------------------------ convolution, pooling, dropout
#
# NHWC images (the contract's rows of issue 15). A convolution is GEMMs: the
# im2col columns (n*p*q, kh*kw*c) go into a per-thread device workspace
# (``_workspace``), then ``_matmul`` runs cuBLAS (or the tiled kernel) with
# the same epilogues as the dense layer; a 1x1 kernel at stride 1 without
# padding uses x itself. The kernels around the GEMMs are in ``_cuda_conv``.

_kc = None   # the _cuda_conv module, imported on first use (it imports numba)


def _conv_kernels(dtype):
    global _kc
    if _kc is None:
        _ready()
        from . import _cuda_conv

        _kc = _cuda_conv
    return _kc.kernels(dtype)


class _Workspace(threading.local):
    """Per-thread device scratch of the convolution kernels (the contract's
    workspace): one flat array per (purpose, dtype), grown on demand and then
    reused, so a training step allocates nothing after its first batch.
    Reusing it from one call to the next is safe because a thread's kernels
    and GEMMs run in order on one stream."""

    def __init__(self):
        self.arrays = {}

    def get(self, name, count, dtype):
        """The first ``count`` elements of the ``name`` array of ``dtype``."""
        key = (name, np.dtype(dtype))
        a = self.arrays.get(key)
        if a is None or a.shape[0] < count:
            self.arrays[key] = None          # free the old one before allocating
            a = self.arrays[key] = _cuda.device_array(max(count, 1), key[1])
        return a[:count]

    def nbytes(self):
        """Device bytes held by this thread's workspace."""
        return sum(a.shape[0] * a.dtype.itemsize for a in self.arrays.values() if a is not None)


_workspace = _Workspace()


def _direct(kh, kw, sh, sw, padding):
    """A 1x1 kernel at stride 1 without padding: the columns are x itself."""
    return kh == kw == 1 and sh == sw == 1 and not any(padding)


def _im2col(kc, x, kh, kw, p, q, sh, sw, padding):
    """The im2col matrix ``(n*p*q, kh*kw*c)`` of the device array ``x``: a
    view of ``x`` for a 1x1 kernel at stride 1 unpadded, else the workspace
    filled by the ``im2col`` kernel."""
    n, h, w, c = x.shape
    m, k = n * p * q, kh * kw * c
    if _direct(kh, kw, sh, sw, padding):
        return x.reshape(m, k)
    cols = _workspace.get("cols", m * k, x.dtype)
    _launch(kc.im2col, _blocks(m * k), _k.BLOCK)(
        _flat(x), cols, h, w, c, p, q, kh, kw, sh, sw, int(padding[0]), int(padding[2]))
    return cols.reshape(m, k)


def _column_sum64(kc, a, rows, cols, out):
    """``out = a.sum(0)`` for the flat ``(rows, cols)`` device array ``a``,
    accumulated in float64 over row blocks (``column_partials``), then summed
    and rounded once (``column_finish``)."""
    cap = 2 if _k.SIMULATOR else 128
    parts = max(1, min(-(-rows // _k.RW), cap))
    partials = _workspace.get("partials", parts * cols, np.float64)
    _launch(kc.column_partials, (-(-cols // _k.CW), parts), (_k.CW, _k.RW))(
        a, rows, cols, partials)
    _launch(kc.column_finish, _blocks(cols), _k.BLOCK)(partials, parts, out)


def _strides(stride):
    return int(stride[0]), int(stride[1])


def conv2d_forward(x, w, b, act, out, preact=None, stride=(1, 1), padding=(0, 0, 0, 0)):
    """2-D convolution (cross-correlation), NHWC, with bias and activation:
    ``out = act(z)``, ``preact = z`` when given,
    ``z[n,p,q,o] = b[o] + sum_{i,j,c} xpad[n, p*sh+i, q*sw+j, c] * w[i,j,c,o]``.

    im2col into the workspace, then one GEMM ``cols (n*p*q, kh*kw*c) @ w``
    with ``dense_forward``'s bias + activation epilogue (fused into the tiled
    GEMM, or one kernel after cuBLAS). Arrays: ``x (n, h, w, c)``,
    ``w (kh, kw, c, o)``, ``b (o,)``, ``out``/``preact (n, p, q, o)``;
    ``stride (sh, sw)``, ``padding (top, bottom, left, right)``.
    """
    s = _Staging()
    dx, dw, db = s(x), s(w), s(b)
    dout = s(out, out=True, fresh=True)
    dpre = None if preact is None else s(preact, out=True, fresh=True)
    kc = _conv_kernels(dx.dtype)
    kh, kw, c, o = dw.shape
    n, p, q, _ = dout.shape
    sh, sw = _strides(stride)
    m = n * p * q
    cols = _im2col(kc, dx, kh, kw, p, q, sh, sw, padding)
    _matmul(cols, dw.reshape(kh * kw * c, o), dout.reshape(m, o), False, False,
            _k.kernels(dx.dtype), _k.EPI_FORWARD, _act(act), db,
            preact=None if dpre is None else dpre.reshape(m, o))
    s.finish()


def conv2d_backward(x, dz, dw, db, stride=(1, 1), padding=(0, 0, 0, 0)):
    """Parameter gradients of a convolution (overwritten):
    ``dw[i,j,c,o] = sum_{n,p,q} xpad[n,p*sh+i,q*sw+j,c] * dz[n,p,q,o]``,
    ``db[o] = sum_{n,p,q} dz[n,p,q,o]`` (summed in float64, rounded once).

    im2col into the workspace, one GEMM ``cols.T @ dz`` (the columns read
    transposed in place), and a two-pass float64 column sum for ``db``.
    """
    s = _Staging()
    dx, ddz = s(x), s(dz)
    ddw = s(dw, out=True, fresh=True)
    ddb = s(db, out=True, fresh=True)
    kc = _conv_kernels(dx.dtype)
    kh, kw, c, o = ddw.shape
    n, p, q, _ = ddz.shape
    sh, sw = _strides(stride)
    m = n * p * q
    cols = _im2col(kc, dx, kh, kw, p, q, sh, sw, padding)
    dz2 = ddz.reshape(m, o)
    _matmul(cols, dz2, ddw.reshape(kh * kw * c, o), True, False, _k.kernels(dx.dtype),
            _k.EPI_STORE)
    _column_sum64(kc, _flat(ddz), m, o, ddb)
    s.finish()


def conv2d_backprop(dz, w, z, y, act, out, stride=(1, 1), padding=(0, 0, 0, 0)):
    """Delta of the layer below a convolution:
    ``out[n,h,w,c] = act'(z or y) * sum dz[n,p,q,o] * w[i,j,c,o]`` over
    ``p*sh + i - top == h``, ``q*sw + j - left == w`` (``act'`` from ``y``
    for identity, relu, sigmoid, tanh, else from ``z``).

    One GEMM ``dz (n*p*q, o) @ w.T`` into the workspace (``w`` read
    transposed in place), then ``col2im_delta``: a thread per input element
    gathers its window terms and multiplies by the derivative. A 1x1 kernel
    at stride 1 unpadded is ``backprop_delta``: the GEMM with the derivative
    epilogue straight into ``out``.
    """
    s = _Staging()
    ddz, dw = s(dz), s(w)
    dzz = None if z is None else s(z)
    dyy = None if y is None else s(y)
    dout = s(out, out=True, fresh=True)
    ks = _k.kernels(ddz.dtype)
    kh, kw, c, o = dw.shape
    n, p, q, _ = ddz.shape
    _, h, wd, _ = dout.shape
    sh, sw = _strides(stride)
    m, k = n * p * q, kh * kw * c
    code = _act(act)
    dz2, w2 = ddz.reshape(m, o), dw.reshape(k, o)
    if _direct(kh, kw, sh, sw, padding):
        _matmul(dz2, w2, dout.reshape(m, k), False, True, ks,
                _k.EPI_STORE if code == 0 else _k.EPI_DELTA, code, z=dzz, y=dyy)
    else:
        kc = _conv_kernels(ddz.dtype)
        dcols = _workspace.get("cols", m * k, ddz.dtype)
        _matmul(dz2, w2, dcols.reshape(m, k), False, True, ks, _k.EPI_STORE)
        fo = _flat(dout)
        _launch(kc.col2im_delta, _blocks(fo.shape[0]), _k.BLOCK)(
            dcols, h, wd, c, p, q, kh, kw, sh, sw, int(padding[0]), int(padding[2]), code,
            fo if dzz is None else _flat(dzz), fo if dyy is None else _flat(dyy), fo)
    s.finish()


def _pool_steps(pool, stride):
    ph, pw = int(pool[0]), int(pool[1])
    sh, sw = (ph, pw) if stride is None else _strides(stride)
    return ph, pw, sh, sw


def maxpool2d_forward(x, out, argmax, pool=(2, 2), stride=None):
    """Max pooling without padding, NHWC:
    ``out[n,p,q,c] = max_{i<ph, j<pw} x[n, p*sh+i, q*sw+j, c]`` and the int32
    ``argmax = i*pw + j`` of the first maximum (a NaN is the maximum);
    ``stride`` None means ``pool``. One thread per output element."""
    s = _Staging()
    dx = s(x)
    dout = s(out, out=True, fresh=True)
    darg = s(argmax, out=True, fresh=True)
    kc = _conv_kernels(dx.dtype)
    ph, pw, sh, sw = _pool_steps(pool, stride)
    n, h, w, c = dx.shape
    p, q = dout.shape[1:3]
    fo = _flat(dout)
    _launch(kc.maxpool_forward, _blocks(fo.shape[0]), _k.BLOCK)(
        _flat(dx), fo, _flat(darg), h, w, c, p, q, ph, pw, sh, sw)
    s.finish()


def maxpool2d_backward(dy, argmax, z, y, act, out, pool=(2, 2), stride=None):
    """Gradient through max pooling times the derivative of the layer below:
    ``out = act'(z or y) * g``, ``g[n, p*sh+i, q*sw+j, c] = sum dy[n,p,q,c]``
    over the windows whose ``argmax`` is ``i*pw + j`` (0 where none chose).
    One thread per input element gathers from the windows that contain it
    (no atomics; overlapping windows sum in the reference's order)."""
    s = _Staging()
    ddy, darg = s(dy), s(argmax)
    dzz = None if z is None else s(z)
    dyy = None if y is None else s(y)
    dout = s(out, out=True, fresh=True)
    kc = _conv_kernels(ddy.dtype)
    ph, pw, sh, sw = _pool_steps(pool, stride)
    n, p, q, c = ddy.shape
    h, w = dout.shape[1:3]
    fo = _flat(dout)
    _launch(kc.maxpool_backward, _blocks(fo.shape[0]), _k.BLOCK)(
        _flat(ddy), _flat(darg), h, w, c, p, q, ph, pw, sh, sw, _act(act),
        fo if dzz is None else _flat(dzz), fo if dyy is None else _flat(dyy), fo)
    s.finish()


def _dropout(x, rate, seed, out):
    s = _Staging()
    dx = s(x)
    dout = s(out, out=True, fresh=True)
    rate = float(rate)
    if not (rate == 0 and dout is dx):
        kc = _conv_kernels(dx.dtype)
        fx, fo = _flat(dx), _flat(dout)
        scale = dx.dtype.type(1.0 / (1.0 - rate))
        _launch(kc.dropout, _blocks(fo.shape[0]), _k.BLOCK)(
            fx, fo, np.uint64(int(seed)), np.uint64(dropout_threshold(rate)), scale,
            int(rate == 0))
    s.finish()


def dropout_forward(x, rate, seed, out):
    """Inverted dropout, any shape: element ``i`` (flat C order) is kept iff
    ``splitmix64((seed + (i+1)*0x9E3779B97F4A7C15) mod 2**64) >> 40 >=
    floor(rate*2**24 + 0.5)``; kept ``out = x * s``, ``s = 1/(1 - rate)``
    rounded once to the dtype; dropped ``out = +0.0``; ``rate == 0`` copies.
    ``out`` may be ``x``. The mask is computed in the kernel that applies it."""
    _dropout(x, rate, seed, out)


def dropout_backward(dy, rate, seed, out):
    """Backward pass of :func:`dropout_forward`: the same mask and scale on
    ``dy`` (``out`` may be ``dy``)."""
    _dropout(dy, rate, seed, out)


# ------------------------------------------------------------------ data movement (issue 17)
#
# ``fit`` gathers each batch from the user's data, which lives in host memory
# (a NumPy array or a memmap): the rows are gathered and converted on the host
# into a per-thread pinned buffer (the fastest CPU gather there is: the Cython
# backend's when built), then copied to the device in one transfer. A source
# already on the device is gathered there by ``_cuda_data.gather_rows``.


class _PinnedStage(threading.local):
    """Per-thread pinned host buffers, one per dtype, grown on demand and then
    reused: the gathered batch waits there for its copy to the device (which
    is synchronous, so the next call may overwrite it)."""

    def __init__(self):
        self.arrays = {}

    def get(self, shape, dtype):
        """A pinned host array of ``shape`` and ``dtype`` (a view of the buffer)."""
        dtype = np.dtype(dtype)
        count = math.prod(shape)
        a = self.arrays.get(dtype)
        if a is None or a.shape[0] < count:
            self.arrays[dtype] = None
            a = self.arrays[dtype] = _cuda.pinned_array(max(count, 1), dtype)
        return a[:count].reshape(shape)


_pinned = _PinnedStage()
_host_gather_fn = None
_kd = None   # the _cuda_data module, imported on first use (it imports numba)


def _host_gather(src, index, out):
    """``gather_rows`` on host arrays: the Cython backend's kernel when it is
    built (serial below its threshold, as fastnn's threads allow above), else
    the NumPy reference."""
    global _host_gather_fn
    if _host_gather_fn is None:
        try:
            from ._cy_data import gather_rows as fn
        except ImportError:
            from .reference import gather_rows as fn
        _host_gather_fn = fn
    _host_gather_fn(src, index, out)


def gather_rows(src, index, out):
    """Gather rows by index, converting to ``out``'s dtype: ``out[i] = src[index[i]]``.

    A row is everything after the first axis; values are converted as
    ``src.astype(out.dtype)`` converts them (see
    ``fastnn.kernels.reference.gather_rows``). ``src`` is never written.

    * ``src`` on the host (NumPy array, memmap), ``out`` on the device: the
      rows are gathered and converted on the host into a reusable pinned
      buffer, then copied to ``out`` in one transfer (this waits for the
      device's queued work and the copy).
    * both on the host: gathered on the host straight into ``out``.
    * ``src`` on the device (C-contiguous): one kernel gathers on the device
      (an ``index`` or ``out`` on the host is staged; a NaN converted from
      float64 to float32 there is the canonical NaN, not NumPy's).

    Parameters
    ----------
    src : ndarray (n, *shape) or device array, real dtype
        IN
    index : ndarray or device array (k,), integer dtype, values in ``[0, n)``
        IN
    out : device array or ndarray (k, *shape), float32 or float64
        OUT
    """
    if isinstance(src, np.ndarray):
        host_index = index if isinstance(index, np.ndarray) else to_host(index)
        if isinstance(out, np.ndarray):
            _host_gather(src, host_index, out)
            return
        _ready()
        stage = _pinned.get(tuple(out.shape), out.dtype)
        _host_gather(src, host_index, stage)
        dout = out if _is_device(out) else _cuda.as_cuda_array(out)
        stream = _stream()   # after the kernels that may still read out; before `stage` is reused
        dout.copy_to_device(stage, stream=stream or 0)
        _wait(stream)
        return
    global _kd
    if _kd is None:
        _ready()
        from . import _cuda_data

        _kd = _cuda_data
    s = _Staging()
    dsrc, didx = _flat(s(src)), s(index)
    dout = _flat(s(out, out=True, fresh=True))
    k = didx.shape[0]
    row = dout.shape[0] // k
    kernel = _kd.gather_rows
    if dsrc.dtype == np.bool_:
        dsrc, kernel = dsrc.view(np.uint8), _kd.gather_rows_bool
    _launch(kernel, _blocks(dout.shape[0]), _k.BLOCK)(dsrc, didx, dout, row)
    s.finish()


# ------------------------------------------------------------------ array hooks

def empty(shape, dtype):
    """An uninitialised device array."""
    return _ready().device_array(shape, np.dtype(dtype))


def zeros(shape, dtype):
    """A device array of zeros (filled on the device for float32/float64)."""
    cuda = _ready()
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        stream = _stream()
        a = cuda.to_device(np.zeros(shape, dtype), stream=stream or 0)
        _wait(stream)
        return a
    a = cuda.device_array(shape, dtype)
    fa = _flat(a)
    if fa.shape[0]:
        _launch(_k.kernels(dtype).fill, _blocks(fa.shape[0]), _k.BLOCK)(fa, dtype.type(0))
    return a


def from_host(a):
    """A device copy of a host array (a device array is returned as it is)."""
    cuda = _ready()
    if _is_device(a) or (not isinstance(a, np.ndarray)
                         and hasattr(a, "__cuda_array_interface__")):
        return a
    stream = _stream()
    d = cuda.to_device(np.ascontiguousarray(a), stream=stream or 0)
    _wait(stream)
    return d


def to_host(a):
    """A NumPy array with the contents of ``a`` (NumPy arrays pass as they are)."""
    if isinstance(a, np.ndarray):
        return a
    cuda = _ready()
    if not _is_device(a):
        a = cuda.as_cuda_array(a)
    stream = _stream()
    h = a.copy_to_host(stream=stream or 0)
    _wait(stream)
    return h


def copy_from_host(dst, src):
    """Copy the NumPy array ``src`` into the existing array ``dst`` (device or
    NumPy, same shape and dtype); waits for the copy."""
    if isinstance(dst, np.ndarray):
        np.copyto(dst, src)
        return
    cuda = _ready()
    if not _is_device(dst):
        dst = cuda.as_cuda_array(dst)
    stream = _stream()
    dst.copy_to_device(np.ascontiguousarray(src), stream=stream or 0)
    _wait(stream)


def count_correct(logits, labels):
    """Rows whose prediction equals the label, counted on the device:
    ``argmax(logits_i) == labels_i`` for several classes,
    ``(logits_i > 0) == (labels_i > 0.5)`` for one column.

    Parameters
    ----------
    logits : device or NumPy array (batch, classes)
    labels : device or NumPy array (batch,) or (batch, 1)

    Returns
    -------
    int
    """
    _ready()
    s = _Staging()
    dl, dlab = s(logits), s(labels)
    ks = _k.kernels(dl.dtype)
    rows = dl.shape[0]
    blocks = _blocks(rows)
    partials, result = _scratch.get(blocks)
    _launch(ks.count_correct, blocks, _k.BLOCK)(dl, _flat(dlab), partials)
    _launch(ks.mean_of_partials, 1, _k.BLOCK)(partials, blocks, 1.0, result)
    return int(round(_scratch.read()))


def synchronize():
    """Wait until every kernel queued on the device has finished (for timing)."""
    _ready().synchronize()
