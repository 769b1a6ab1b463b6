"""Tests of the cuda backend that the parity suite does not cover.

They run on the CUDA simulator (``.ci/run`` runs this file with
``NUMBA_ENABLE_CUDASIM=1`` in its own pytest invocation) or on a real GPU;
elsewhere the backend is unavailable and they skip with its reason. Tests
marked ``gpu`` need a real GPU. A few tests need neither: the cuBLAS argument
mapping, the import hygiene, the reason given without a GPU, and the PTX
compilation of every kernel for a real GPU (which catches float64 promotion in
float32 kernels that the simulator cannot see).
"""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from fastnn.kernels import cuda as C
from fastnn.kernels import reference as R

OK, REASON = C.available()
SIMULATOR = OK and "simulator" in REASON
REAL_GPU = OK and not SIMULATOR
HAS_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None

needs_cuda = pytest.mark.skipif(not OK, reason=f"cuda backend unavailable: {REASON}")
needs_gpu = pytest.mark.skipif(not REAL_GPU, reason="needs a real CUDA GPU"
                               + ("" if OK else f" ({REASON})") + (" (simulator)" if SIMULATOR else ""))
DTYPES = (np.float32, np.float64)


def tol(dtype, n=1):
    """rtol/atol of DESIGN.md, scaled by the length ``n`` of a reordered sum."""
    if np.dtype(dtype) == np.float32:
        return dict(rtol=1e-5 * n, atol=1e-6 * n)
    return dict(rtol=1e-12 * n, atol=1e-13 * n)


def close(got, want, dtype, n=1):
    np.testing.assert_allclose(C.to_host(got), want, equal_nan=True, **tol(dtype, n))


def rand(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def dev(a):
    return C.from_host(a)


# ------------------------------------------------------------------ no GPU needed

def test_module_imports_no_numba():
    """Importing fastnn and the cuda backend module imports no numba; only
    available() does."""
    code = ("import sys, fastnn, fastnn.kernels.cuda as c; "
            "assert 'numba' not in sys.modules, 'numba imported'; print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.skipif(not HAS_NUMBA_CUDA or REAL_GPU, reason="needs numba-cuda and no GPU")
def test_reason_without_gpu_or_simulator():
    """Without the simulator and without a GPU, fastnn.backends() says why."""
    code = ("import fastnn; i = fastnn.backends()['cuda']; "
            "print(i.available); print(i.reason)")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    available, reason = out.stdout.strip().split("\n", 1)
    assert available == "False"
    assert reason.startswith("no usable CUDA GPU: ")
    assert "driver" in reason.lower() or "device" in reason.lower()


def test_reason_without_numba_cuda(monkeypatch):
    """Without numba-cuda the reason says how to install it."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "numba_cuda" else real(name, *a))
    ok, reason = C._probe()
    assert not ok
    assert "numba-cuda is not installed" in reason and "fastnn[cuda]" in reason


def test_parity_shapes_are_small():
    assert C.COMPLETE is True
    assert C.PARITY_SHAPES and all(1 <= b <= 5 and 1 <= w <= 10 for b, w in C.PARITY_SHAPES)
    assert not getattr(C, "PENDING", ())   # issue 16: the conv kernels are native
    assert set(R.CONTRACT) <= set(C.__all__)


def _colmajor(buf, rows, cols, ld):
    """The column-major ``rows x cols`` matrix with leading dimension ``ld`` in ``buf``."""
    return buf[:ld * cols].reshape(cols, ld)[:, :rows].T


@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
def test_cublas_arguments(ta, tb):
    """The column-major cuBLAS call computes the row-major product: emulate
    gemm(opB, opA, n, m, k, B, ldb, A, lda, C, n) on the raw buffers."""
    rng = np.random.default_rng(1)
    m, n, k = 3, 5, 4
    a = rng.standard_normal((k, m) if ta else (m, k))
    b = rng.standard_normal((n, k) if tb else (k, n))
    transb, transa, ldb, lda = C.cublas_arguments(m, n, k, ta, tb)
    op = {"N": lambda x: x, "T": lambda x: x.T}
    bcm = _colmajor(b.ravel(), *((k, n) if transb == "T" else (n, k)), ldb)
    acm = _colmajor(a.ravel(), *((m, k) if transa == "T" else (k, m)), lda)
    ct = op[transb](bcm) @ op[transa](acm)            # (n, m), column-major C
    c = np.empty(m * n)
    _colmajor(c, n, m, n)[...] = ct
    want = (a.T if ta else a) @ (b.T if tb else b)
    np.testing.assert_allclose(c.reshape(m, n), want, rtol=1e-12, atol=1e-13)


F32_REDUCING = {"mean_of_partials", "softmax_cross_entropy", "sigmoid_bce", "mse",
                "count_correct", "column_sum"}   # column_sum: db in float64 (issue 13)


@pytest.mark.skipif(not HAS_NUMBA_CUDA or SIMULATOR, reason="needs numba-cuda, not the simulator")
def test_kernels_compile_for_a_real_gpu(monkeypatch):
    """Every kernel compiles to PTX (compute capability 8.0) in both dtypes,
    and float32 kernels do no float64 arithmetic except the loss sums."""
    from numba import cuda
    import numba.cuda.dispatcher as dispatcher
    from types import SimpleNamespace
    from fastnn.kernels import _cuda_kernels as K

    monkeypatch.setattr(dispatcher, "get_current_device",
                        lambda: SimpleNamespace(compute_capability=(8, 0)))
    i, f64 = cuda.int64, cuda.float64[::1]
    for dtype, T in ((np.float32, cuda.float32), (np.float64, cuda.float64)):
        a1, a2 = T[::1], T[:, ::1]
        sigs = {
            "fill": (a1, T),
            "activation_forward": (i, a1, a1),
            "activation_backward": (i, a1, a1, a1, a1),
            "bias_activation": (a1, a1, i, a1, a1, i),
            "column_sum": (a2, a1),
            "gemm": (a2, a2, i, i, i, i, a1, a1, a1, i, a1, a1),
            "mean_of_partials": (f64, i, cuda.float64, f64),
            "softmax_cross_entropy": (a2, cuda.int64[::1], a2, f64),
            "softmax": (a2, a2),
            "sigmoid_bce": (a1, a1, a1, f64),
            "mse": (a1, a1, a1, T, f64),
            "count_correct": (a2, cuda.int64[::1], f64),
            "sgd": (a1, a1, a1, T, T, i, T, T),
            "adam": (a1, a1, a1, a1, a1, i, T, T, T, i, T, T, T, T, T, T, T),
            "rmsprop": (a1, a1, a1, a1, a1, T, T, T, T, T, i, T, T),
        }
        ks = K.build(np.dtype(dtype))   # fresh dispatchers: the cached set stays untouched
        for name, sig in sigs.items():
            try:
                ptx, _ = cuda.compile_ptx(getattr(ks, name).py_func, sig, cc=(8, 0))
            except Exception as exc:
                if "NVVM" in type(exc).__name__ or "libnvvm" in str(exc).lower():
                    pytest.skip(f"NVVM is not installed: {exc}")
                raise
            if dtype is np.float32 and name not in F32_REDUCING:
                f64_lines = [ln for ln in ptx.splitlines()
                             if ".f64" in ln and not ln.strip().startswith("//")]
                assert not f64_lines, f"{name} (float32) computes in float64: {f64_lines[:3]}"


#: Float64 arithmetic the conv kernels do by contract: db is summed in float64.
F32_REDUCING_CONV = {"column_partials", "column_finish"}


@pytest.mark.skipif(not HAS_NUMBA_CUDA or SIMULATOR, reason="needs numba-cuda, not the simulator")
def test_conv_kernels_compile_for_a_real_gpu(monkeypatch):
    """The convolution, pooling and dropout kernels compile to PTX (compute
    capability 8.0) in both dtypes; float32 ones do no float64 arithmetic
    except db's sums, and the dropout hash is integer arithmetic only."""
    from numba import cuda
    import numba.cuda.dispatcher as dispatcher
    from types import SimpleNamespace
    from fastnn.kernels import _cuda_conv as KC

    monkeypatch.setattr(dispatcher, "get_current_device",
                        lambda: SimpleNamespace(compute_capability=(8, 0)))
    i, f64, i32 = cuda.int64, cuda.float64[::1], cuda.int32[::1]
    for dtype, T in ((np.float32, cuda.float32), (np.float64, cuda.float64)):
        a1 = T[::1]
        sigs = {
            "im2col": (a1, a1) + (i,) * 11,
            "col2im_delta": (a1,) + (i,) * 12 + (a1, a1, a1),
            "column_partials": (a1, i, i, f64),
            "column_finish": (f64, i, a1),
            "maxpool_forward": (a1, a1, i32) + (i,) * 9,
            "maxpool_backward": (a1, i32) + (i,) * 10 + (a1, a1, a1),
            "dropout": (a1, a1, cuda.uint64, cuda.uint64, T, i),
        }
        ks = KC.build(np.dtype(dtype))   # fresh dispatchers: the cached set stays untouched
        for name, sig in sigs.items():
            try:
                ptx, _ = cuda.compile_ptx(getattr(ks, name).py_func, sig, cc=(8, 0))
            except Exception as exc:
                if "NVVM" in type(exc).__name__ or "libnvvm" in str(exc).lower():
                    pytest.skip(f"NVVM is not installed: {exc}")
                raise
            if dtype is np.float32 and name not in F32_REDUCING_CONV:
                f64_lines = [ln for ln in ptx.splitlines()
                             if ".f64" in ln and not ln.strip().startswith("//")]
                assert not f64_lines, f"{name} (float32) computes in float64: {f64_lines[:3]}"
            if name == "dropout":
                assert "mul.lo.s64" in ptx or "mul.lo.u64" in ptx   # the 64-bit hash


# ------------------------------------------------------------------ simulator or GPU

@needs_cuda
def test_registry_loads_cuda_complete():
    import fastnn

    info = fastnn.backends()["cuda"]
    assert info.available and info.fallbacks == tuple(getattr(C, "PENDING", ()))
    backend = fastnn._backend.load("cuda")
    for hook in ("empty", "zeros", "from_host", "to_host", "copy_from_host", "count_correct"):
        assert getattr(backend, hook) is getattr(C, hook)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_kernels_through_the_gate_on_device_arrays(dtype):
    """fastnn.ops runs the native conv, pooling and dropout kernels on device
    arrays and writes the device outputs; inputs stay as they were; in place
    stays in place; a view of a flat device buffer is a valid output; int32
    argmax on the device; NumPy arrays give the reference's results."""
    import fastnn

    assert not set(R.CONV_KERNELS) & set(fastnn.backends()["cuda"].fallbacks)
    assert fastnn._backend.load("cuda").conv2d_forward is C.conv2d_forward
    rng = np.random.default_rng(5)
    x, w, b = rand(rng, (2, 5, 4, 3), dtype), rand(rng, (3, 2, 3, 4), dtype), rand(rng, 4, dtype)
    want, pre = np.empty((2, 2, 3, 4), dtype), np.empty((2, 2, 3, 4), dtype)
    R.conv2d_forward(x, w, b, "gelu", want, pre, (2, 1), (1, 0, 0, 0))
    with fastnn.use_backend("cuda"):
        out, dpre = C.empty((2, 2, 3, 4), dtype), C.zeros((2, 2, 3, 4), dtype)
        dx = dev(x)
        fastnn.ops.conv2d_forward(dx, dev(w), dev(b), "gelu", out, dpre, (2, 1), (1, 0, 0, 0))
        close(out, want, dtype, 18)
        close(dpre, pre, dtype, 18)
        np.testing.assert_array_equal(C.to_host(dx), x)     # inputs are not written back
        # in place on the device
        d = dev(x)
        fastnn.ops.dropout_forward(d, 0.5, 11, d)
        expect = np.empty_like(x)
        R.dropout_forward(x, 0.5, 11, expect)
        np.testing.assert_array_equal(C.to_host(d), expect)
        # an int32 output, and a view of a flat device buffer as the output
        flat = C.zeros(2 * 2 * 2 * 3 + 4, dtype)
        pooled = flat[2:26].reshape(2, 2, 2, 3)
        argmax = C.empty((2, 2, 2, 3), np.int32)
        fastnn.ops.maxpool2d_forward(dev(x), pooled, argmax, (2, 2))
        ref_out, ref_arg = np.empty((2, 2, 2, 3), dtype), np.empty((2, 2, 2, 3), np.int32)
        R.maxpool2d_forward(x, ref_out, ref_arg, (2, 2))
        host = C.to_host(flat)
        np.testing.assert_array_equal(host[2:26].reshape(2, 2, 2, 3), ref_out)
        assert not host[:2].any() and not host[26:].any()
        np.testing.assert_array_equal(C.to_host(argmax), ref_arg)
        # the gate reads device argmax values back to check them
        bad = dev(np.full((2, 2, 2, 3), 4, np.int32))
        with pytest.raises(ValueError, match="argmax must hold window indices"):
            fastnn.ops.maxpool2d_backward(dev(ref_out), bad, None, dev(x), "relu",
                                          C.empty(x.shape, dtype), (2, 2))
        # NumPy arrays: copied up and back
        host_out = np.empty((2, 2, 3, 4), dtype)
        fastnn.ops.conv2d_forward(x, w, b, "gelu", host_out, None, (2, 1), (1, 0, 0, 0))
        close(host_out, want, dtype, 18)


#: (kernel, stride, padding): the general im2col path (odd kernel, stride and
#: pads), a 1x1 kernel at stride 1 (no im2col: x is the GEMM operand), a 1x1
#: kernel at stride 2 (im2col with one tap), and Keras' 3x3 "same".
CONV_GEOMETRIES = [((3, 2), (2, 1), (1, 2, 0, 1)), ((1, 1), (1, 1), (0, 0, 0, 0)),
                   ((1, 1), (2, 2), (0, 0, 0, 0)), ((3, 3), (1, 1), (1, 1, 1, 1))]


def _nan_device(shape, dtype):
    """A device array full of NaN: an output element a kernel forgets shows."""
    return dev(np.full(shape, np.nan, dtype))


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", CONV_GEOMETRIES)
@pytest.mark.parametrize("act", ["relu", "softplus"])
def test_conv_device_in_and_out(dtype, geometry, act):
    """conv2d_forward/backward/backprop on device arrays against the reference:
    every output element written, inputs untouched; relu's derivative comes
    from y, softplus' from z."""
    (kh, kw), stride, pads = geometry
    rng = np.random.default_rng(kh * 10 + stride[0])
    n, h, w, c, o = 2, 5, 6, 3, 4
    p = (h + pads[0] + pads[1] - kh) // stride[0] + 1
    q = (w + pads[2] + pads[3] - kw) // stride[1] + 1
    x, wt, b = rand(rng, (n, h, w, c), dtype), rand(rng, (kh, kw, c, o), dtype), rand(rng, o, dtype)
    dx, dwt, db = dev(x), dev(wt), dev(b)
    want, want_z = np.empty((n, p, q, o), dtype), np.empty((n, p, q, o), dtype)
    R.conv2d_forward(x, wt, b, act, want, want_z, stride, pads)
    out, z = _nan_device(want.shape, dtype), _nan_device(want.shape, dtype)
    C.conv2d_forward(dx, dwt, db, act, out, z, stride, pads)
    close(out, want, dtype, kh * kw * c)
    close(z, want_z, dtype, kh * kw * c)

    dz = rand(rng, (n, p, q, o), dtype)
    want_dw, want_db = np.empty_like(wt), np.empty_like(b)
    R.conv2d_backward(x, dz, want_dw, want_db, stride, pads)
    gdw, gdb = _nan_device(wt.shape, dtype), _nan_device(b.shape, dtype)
    C.conv2d_backward(dx, dev(dz), gdw, gdb, stride, pads)
    close(gdw, want_dw, dtype, n * p * q)
    close(gdb, want_db, dtype, n * p * q)

    zb = rand(rng, x.shape, dtype, 3.0)
    yb = np.empty_like(zb)
    R.activation_forward(act, zb, yb)
    zarg, yarg = (None, yb) if act in R.Y_ACTIVATIONS else (zb, None)
    want_d = np.empty_like(x)
    R.conv2d_backprop(dz, wt, zarg, yarg, act, want_d, stride, pads)
    delta = _nan_device(x.shape, dtype)
    C.conv2d_backprop(dev(dz), dwt, None if zarg is None else dev(zarg),
                      None if yarg is None else dev(yarg), act, delta, stride, pads)
    close(delta, want_d, dtype, kh * kw * o)
    for d, a in ((dx, x), (dwt, wt), (db, b)):
        np.testing.assert_array_equal(C.to_host(d), a)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pool,stride", [((2, 2), None), ((2, 3), (1, 1)), ((3, 2), (2, 3))])
def test_pool_and_dropout_device_in_and_out(dtype, pool, stride):
    """maxpool2d_forward's device argmax (int32) fed straight to
    maxpool2d_backward, as a model does; overlapping windows sum; dropout on
    device arrays, in place and not, equal bit for bit to the reference."""
    rng = np.random.default_rng(pool[0] * 7 + pool[1])
    n, h, w, c = 2, 7, 6, 3
    sh, sw = pool if stride is None else stride
    p, q = (h - pool[0]) // sh + 1, (w - pool[1]) // sw + 1
    x = np.round(rand(rng, (n, h, w, c), dtype, 2.0))     # ties in most windows
    x[0, 1, 1, 0] = np.nan
    want, want_arg = np.empty((n, p, q, c), dtype), np.empty((n, p, q, c), np.int32)
    R.maxpool2d_forward(x, want, want_arg, pool, stride)
    out, arg = _nan_device(want.shape, dtype), dev(np.full(want.shape, -1, np.int32))
    C.maxpool2d_forward(dev(x), out, arg, pool, stride)
    np.testing.assert_array_equal(C.to_host(out), want)
    got_arg = C.to_host(arg)
    assert got_arg.dtype == np.int32
    np.testing.assert_array_equal(got_arg, want_arg)

    dy = rand(rng, want.shape, dtype)
    zb = rand(rng, x.shape, dtype)
    want_g = np.empty_like(x)
    R.maxpool2d_backward(dy, want_arg, zb, None, "leaky_relu", want_g, pool, stride)
    g = _nan_device(x.shape, dtype)
    C.maxpool2d_backward(dev(dy), arg, dev(zb), None, "leaky_relu", g, pool, stride)
    close(g, want_g, dtype, pool[0] * pool[1])

    for rate, seed in ((0.5, 2**64 - 1), (0.1, 0), (0.0, 7)):
        want_d = np.empty_like(x)
        R.dropout_forward(x, rate, seed, want_d)
        d = dev(x)
        C.dropout_forward(d, rate, seed, d)
        np.testing.assert_array_equal(C.to_host(d), want_d)
        src, o = dev(x), _nan_device(x.shape, dtype)
        C.dropout_backward(src, rate, seed, o)
        np.testing.assert_array_equal(C.to_host(o), want_d)
        np.testing.assert_array_equal(C.to_host(src), x)


def _conv_step(dtype, batch, pads, outs=None):
    """One training step's conv, pooling and dropout calls on device arrays
    (allocated here on the first call, then passed back in ``outs``)."""
    rng = np.random.default_rng(batch)
    h, w, c, o = 6, 5, 2, 3
    x, wt, b = rand(rng, (batch, h, w, c), dtype), rand(rng, (3, 3, c, o), dtype), rand(rng, o, dtype)
    p, q = h + pads[0] + pads[1] - 2, w + pads[2] + pads[3] - 2
    if outs is None:
        outs = dict(x=dev(x), w=dev(wt), b=dev(b), y=C.empty((batch, p, q, o), dtype),
                    z=C.empty((batch, p, q, o), dtype), dw=C.empty(wt.shape, dtype),
                    db=C.empty(o, dtype), delta=C.empty(x.shape, dtype),
                    pooled=C.empty((batch, p // 2, q // 2, o), dtype),
                    arg=C.empty((batch, p // 2, q // 2, o), np.int32),
                    dpool=C.empty((batch, p, q, o), dtype))
    a = outs
    C.conv2d_forward(a["x"], a["w"], a["b"], "relu", a["y"], a["z"], (1, 1), pads)
    C.maxpool2d_forward(a["y"], a["pooled"], a["arg"], (2, 2))
    C.dropout_forward(a["pooled"], 0.5, 3, a["pooled"])
    C.dropout_backward(a["pooled"], 0.5, 3, a["pooled"])
    C.maxpool2d_backward(a["pooled"], a["arg"], None, a["y"], "relu", a["dpool"], (2, 2))
    C.conv2d_backward(a["x"], a["dpool"], a["dw"], a["db"], (1, 1), pads)
    C.conv2d_backprop(a["dpool"], a["w"], None, a["x"], "identity", a["delta"], (1, 1), pads)
    want_dw, want_db = np.empty_like(wt), np.empty_like(b)
    R.conv2d_backward(x, C.to_host(a["dpool"]), want_dw, want_db, (1, 1), pads)
    close(a["dw"], want_dw, dtype, batch * p * q)
    close(a["db"], want_db, dtype, batch * p * q)
    want_d = np.empty_like(x)
    R.conv2d_backprop(C.to_host(a["dpool"]), wt, None, x, "identity", want_d, (1, 1), pads)
    close(a["delta"], want_d, dtype, 9 * o)
    return outs


@needs_cuda
def test_conv_workspace_is_reused(monkeypatch):
    """The im2col columns and the db partial sums live in a per-thread device
    workspace: after the first step, a step of the same or a smaller batch
    allocates no device memory; a larger batch grows the columns once; another
    thread has a workspace of its own."""
    import threading

    dtype = np.float32
    pads = (1, 1, 1, 1)
    outs = _conv_step(dtype, 3, pads)
    held = dict(C._workspace.arrays)
    assert {name for name, _ in held} == {"cols", "partials"}
    nbytes = C._workspace.nbytes()
    assert nbytes > 0
    calls = []
    real = C._cuda.device_array

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(C._cuda, "device_array", counting)
    monkeypatch.setattr(C._cuda, "to_device", lambda *a, **k: calls.append(a) or 1 / 0)
    _conv_step(dtype, 3, pads, outs)
    assert calls == [] and C._workspace.nbytes() == nbytes
    assert all(C._workspace.arrays[key] is a for key, a in held.items())
    monkeypatch.undo()

    _conv_step(dtype, 1, pads)                     # smaller: the same arrays serve
    assert all(C._workspace.arrays[key] is a for key, a in held.items())
    monkeypatch.setattr(C._cuda, "device_array", counting)
    C.conv2d_forward(dev(np.ones((5, 6, 5, 2), dtype)), outs["w"], outs["b"], "relu",
                     C.empty((5, 6, 5, 3), dtype), None, (1, 1), pads)
    grown = [a for a in calls if a[0] == 5 * 6 * 5 * 18]
    assert len(grown) == 1 and len(calls) == 2     # the columns, and the output above
    monkeypatch.undo()

    seen = {}

    def other():
        seen["before"] = dict(C._workspace.arrays)
        _conv_step(dtype, 2, pads)
        seen["after"] = dict(C._workspace.arrays)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen["before"] == {}
    assert seen["after"][("cols", np.dtype(dtype))] is not C._workspace.arrays[("cols", np.dtype(dtype))]


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_hooks(dtype):
    z = C.zeros((3, 4), dtype)
    assert z.shape == (3, 4) and z.dtype == dtype
    np.testing.assert_array_equal(C.to_host(z), np.zeros((3, 4), dtype))
    e = C.empty(5, dtype)
    assert e.shape == (5,) and e.dtype == dtype
    host = np.arange(6, dtype=dtype).reshape(2, 3)
    d = C.from_host(host)
    assert not isinstance(d, np.ndarray) and hasattr(d, "__cuda_array_interface__")
    assert C.from_host(d) is d
    back = C.to_host(d)
    assert isinstance(back, np.ndarray) and back.dtype == dtype
    np.testing.assert_array_equal(back, host)
    assert C.to_host(host) is host
    # a view of a flat buffer, as a model slices its parameters
    flat = C.zeros(10, dtype)
    view = flat[2:8].reshape(2, 3)
    C.activation_forward("identity", d, view)
    np.testing.assert_array_equal(C.to_host(flat), [0, 0, 0, 1, 2, 3, 4, 5, 0, 0])


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_count_correct(dtype):
    logits = np.array([[0, 2, 1], [3, 3, 0], [0, 0, 5], [np.nan, 1, 2], [1, np.nan, 9]], dtype)
    labels = np.array([1, 1, 2, 0, 1])
    want = int(np.count_nonzero(logits.argmax(1) == labels))   # 1, tie->0, 2, nan->0, nan->1
    assert want == 4
    for lg, lb in ((logits, labels), (dev(logits), dev(labels)), (dev(logits), labels)):
        got = C.count_correct(lg, lb)
        assert type(got) is int and got == want
    binary = np.array([[0.5], [-1.0], [2.0], [0.0]], dtype)
    for y in (np.array([1, 0, 0, 0]), np.array([[1.0], [1.0], [0.0], [0.0]], dtype)):
        want = int(np.count_nonzero((binary[:, 0] > 0) == (y.reshape(-1) > 0.5)))
        assert C.count_correct(dev(binary), dev(y)) == want


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (9, 5, 17), (13, 11, 3), (4, 17, 9)])
def test_gemm_odd_shapes(dtype, m, k, n):
    """The three GEMMs (plain, A transposed, B transposed) on shapes that cut
    the tiles at odd places, through device arrays."""
    rng = np.random.default_rng(m * 100 + k * 10 + n)
    x, w, b = rand(rng, (m, k), dtype), rand(rng, (k, n), dtype), rand(rng, n, dtype)
    out = C.empty((m, n), dtype)
    C.dense_forward(dev(x), dev(w), dev(b), "identity", out)
    close(out, x @ w + b, dtype, k)
    dz = rand(rng, (m, n), dtype)
    dw, db = C.empty((k, n), dtype), C.empty(n, dtype)
    C.dense_backward(dev(x), dev(dz), dw, db)
    close(dw, x.T @ dz, dtype, m)
    close(db, dz.sum(0), dtype, m)
    delta = C.empty((m, k), dtype)
    y = np.abs(rand(rng, (m, k), dtype))
    C.backprop_delta(dev(dz), dev(w), None, dev(y), "identity", delta)
    close(delta, dz @ w.T, dtype, n)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", R.ACTIVATIONS)
def test_dense_device_and_numpy_paths(dtype, act):
    rng = np.random.default_rng(7)
    x, w, b = rand(rng, (5, 7), dtype), rand(rng, (7, 10), dtype), rand(rng, 10, dtype)
    want, want_z = np.empty((5, 10), dtype), np.empty((5, 10), dtype)
    R.dense_forward(x, w, b, act, want, want_z)
    # NumPy in, NumPy out
    out, z = np.empty_like(want), np.empty_like(want)
    C.dense_forward(x, w, b, act, out, z)
    close(out, want, dtype, 7)
    close(z, want_z, dtype, 7)
    # device in, device out
    dout, dz = C.empty(want.shape, dtype), C.empty(want.shape, dtype)
    C.dense_forward(dev(x), dev(w), dev(b), act, dout, dz)
    close(dout, want, dtype, 7)
    close(dz, want_z, dtype, 7)
    # backprop_delta through this layer's weights into a layer below with `act`
    dy = rand(rng, (5, 10), dtype)
    zb = rand(rng, (5, 7), dtype)
    yb = np.empty_like(zb)
    R.activation_forward(act, zb, yb)
    zarg, yarg = (None, yb) if act in R.Y_ACTIVATIONS else (zb, None)
    want_d = np.empty((5, 7), dtype)
    R.backprop_delta(dy, w, zarg, yarg, act, want_d)
    got = np.empty_like(want_d)
    C.backprop_delta(dy, w, zarg, yarg, act, got)
    close(got, want_d, dtype, 10)
    dgot = C.empty((5, 7), dtype)
    C.backprop_delta(dev(dy), dev(w), None if zarg is None else dev(zarg),
                     None if yarg is None else dev(yarg), act, dgot)
    close(dgot, want_d, dtype, 10)


@needs_cuda
@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the reference on inf and NaN
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", R.ACTIVATIONS)
def test_elementwise_in_place(dtype, act):
    rng = np.random.default_rng(3)
    z = rand(rng, (3, 7), dtype, 3.0)
    z[0, :4] = [np.nan, np.inf, -np.inf, 0]
    want = np.empty_like(z)
    R.activation_forward(act, z, want)
    # NumPy, out is z
    a = z.copy()
    C.activation_forward(act, a, a)
    close(a, want, dtype)
    # device, out is z
    d = dev(z)
    C.activation_forward(act, d, d)
    close(d, want, dtype)
    # backward, out is dy
    dy = rand(rng, z.shape, dtype)
    zz, yy = np.abs(z) + 0.5, want
    zarg, yarg = (None, yy) if act in R.Y_ACTIVATIONS else (zz, None)
    want_b = np.empty_like(z)
    R.activation_backward(act, dy, zarg, yarg, want_b)
    g = dev(dy)
    C.activation_backward(act, g, None if zarg is None else dev(zarg),
                          None if yarg is None else dev(yarg), g)
    close(g, want_b, dtype)
    h = dy.copy()
    C.activation_backward(act, h, zarg, yarg, h)
    close(h, want_b, dtype)


@needs_cuda
def test_gelu_tail_keeps_relative_accuracy():
    """In float32, GELU and its derivative for z in [-5.5, -3] match the float64
    values to 1e-5 relative: the kernels use 1 + tanh(u) = 2*sigmoid(2u),
    where ``t + 1`` would cancel (the float32 reference is off by up to
    ~1e-6 absolute there, for derivatives of ~1e-7)."""
    z = np.linspace(-5.5, -3, 64).astype(np.float32)   # float64 still accurate here
    z64 = z.astype(np.float64)
    y64, d64 = np.empty_like(z64), np.empty_like(z64)
    R.activation_forward("gelu", z64, y64)
    R.activation_backward("gelu", np.ones_like(z64), z64, None, d64)
    y, d = np.empty_like(z), np.empty_like(z)
    C.activation_forward("gelu", z, y)
    C.activation_backward("gelu", np.ones_like(z), z, None, d)
    np.testing.assert_allclose(y, y64, rtol=1e-5, atol=0)
    np.testing.assert_allclose(d, d64, rtol=1e-5, atol=0)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_losses_return_floats(dtype):
    rng = np.random.default_rng(5)
    logits = rand(rng, (5, 10), dtype, 3.0)
    labels = rng.integers(0, 10, 5).astype(np.int32)
    want_g = np.empty_like(logits)
    want = R.softmax_cross_entropy(logits, labels, want_g)
    for lg, lb in ((logits, labels), (dev(logits), dev(labels))):
        g = C.empty(logits.shape, dtype) if not isinstance(lg, np.ndarray) else np.empty_like(logits)
        loss = C.softmax_cross_entropy(lg, lb, g)
        assert type(loss) is float
        np.testing.assert_allclose(loss, want, **tol(dtype, 10))
        close(g, want_g, dtype, 10)

    z = rand(rng, (5, 1), dtype, 4.0)
    t = (rng.random((5, 1)) > 0.5).astype(dtype)
    want_g = np.empty_like(z)
    want = R.sigmoid_binary_cross_entropy(z, t, want_g)
    g = C.empty(z.shape, dtype)
    loss = C.sigmoid_binary_cross_entropy(dev(z), dev(t), g)
    assert type(loss) is float
    np.testing.assert_allclose(loss, want, **tol(dtype, 5))
    close(g, want_g, dtype)

    p, q = rand(rng, (3, 7), dtype), rand(rng, (3, 7), dtype)
    want_g = np.empty_like(p)
    want = R.mse(p, q, want_g)
    d = dev(p)
    loss = C.mse(d, dev(q), d)          # grad may be pred
    assert type(loss) is float
    np.testing.assert_allclose(loss, want, **tol(dtype, 21))
    close(d, want_g, dtype)

    want_s = np.empty_like(logits)
    R.softmax(logits, want_s)
    s = dev(logits)
    C.softmax(s, s)
    close(s, want_s, dtype, 10)


OPTIMIZERS = [
    ("sgd", dict(lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0, l1=0.0)),
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, l1=0.001)),
    ("adam", dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                  decoupled=False, l1=0.001, amsgrad=False)),
    ("adam", dict(lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1,
                  decoupled=True, l1=0.0, amsgrad=True)),
    ("rmsprop", dict(lr=1e-2, rho=0.9, eps=1e-8, momentum=0.0, centered=False,
                     weight_decay=0.0, l1=0.0)),
    ("rmsprop", dict(lr=1e-2, rho=0.9, eps=1e-8, momentum=0.5, centered=True,
                     weight_decay=0.01, l1=0.001)),
]


def _opt_step(mod, kind, arrays, hp, step):
    p, g, s1, s2, s3 = arrays
    if kind == "sgd":
        mod.sgd_step(p, g, s1 if hp["momentum"] else None, hp["lr"], hp["momentum"],
                     hp["nesterov"], hp["weight_decay"], hp["l1"])
    elif kind == "adam":
        mod.adam_step(p, g, s1, s2, step, hp["lr"], hp["beta1"], hp["beta2"], hp["eps"],
                      hp["weight_decay"], hp["decoupled"], hp["l1"],
                      s3 if hp["amsgrad"] else None)
    else:
        mod.rmsprop_step(p, g, s1, s2 if hp["momentum"] else None, hp["lr"], hp["rho"],
                         hp["eps"], hp["momentum"], s3 if hp["centered"] else None,
                         hp["weight_decay"], hp["l1"])


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,hp", OPTIMIZERS)
def test_optimizers_device_and_numpy(dtype, kind, hp):
    rng = np.random.default_rng(11)
    n = 37
    p = rand(rng, n, dtype)
    p[:3] = 0
    ref = [p.copy(), None, np.zeros(n, dtype), np.zeros(n, dtype), np.zeros(n, dtype)]
    host = [a.copy() if a is not None else None for a in ref]
    devs = [dev(p), None] + [C.zeros(n, dtype) for _ in range(3)]
    for step in (1, 2, 3):
        g = rand(rng, n, dtype)
        ref[1], host[1], devs[1] = g, g.copy(), dev(g)
        _opt_step(R, kind, ref, hp, step)
        _opt_step(C, kind, host, hp, step)
        _opt_step(C, kind, devs, hp, step)
        np.testing.assert_array_equal(C.to_host(devs[1]), g)   # g is never written
    for r, h, d in zip(ref, host, devs):
        close(h, r, dtype)
        close(d, r, dtype)


@needs_cuda
def test_gate_accepts_device_arrays():
    """fastnn.ops validates device arrays on the cuda backend (overlap checks
    see device addresses) and runs them."""
    import fastnn

    rng = np.random.default_rng(2)
    x, w, b = rand(rng, (3, 4), np.float32), rand(rng, (4, 2), np.float32), rand(rng, 2, np.float32)
    with fastnn.use_backend("cuda"):
        out = C.empty((3, 2), np.float32)
        fastnn.ops.dense_forward(dev(x), dev(w), dev(b), "relu", out)
        want = np.empty((3, 2), np.float32)
        R.dense_forward(x, w, b, "relu", want)
        close(out, want, np.float32, 4)
        buf = C.zeros(12, np.float32)
        with pytest.raises(ValueError, match="overlap"):
            fastnn.ops.activation_forward("relu", buf[0:6], buf[3:9])
        with pytest.raises(TypeError, match="dtype"):
            fastnn.ops.activation_forward("relu", C.zeros(3, np.float64), C.zeros(3, np.float32))
        labels = dev(np.array([0, 1, 5]))
        with pytest.raises(ValueError, match="class indices"):
            fastnn.ops.softmax_cross_entropy(dev(x[:, :2].copy()), labels,
                                             C.empty((3, 2), np.float32))


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_model_shaped_training_steps(dtype):
    """Two Adam steps of a 7-10-3 MLP (gelu, then softmax cross-entropy) with
    every buffer a view of one flat device buffer, against the reference."""
    rng = np.random.default_rng(42)
    batch, sizes = 5, (7, 10, 3)
    shapes = [(7, 10), (10,), (10, 3), (3,)]
    total = sum(int(np.prod(s)) for s in shapes)
    p0 = rand(rng, total, dtype, 0.5)

    def views(flat):
        out, off = [], 0
        for s in shapes:
            size = int(np.prod(s))
            out.append(flat[off:off + size].reshape(s))
            off += size
        return out

    def run(mod, params, grads, m, v, alloc, put):
        w1, b1, w2, b2 = views(params)
        gw1, gb1, gw2, gb2 = views(grads)
        losses = []
        for step in (1, 2):
            x = put(rand(np.random.default_rng(step), (batch, sizes[0]), dtype))
            labels = put(np.array([0, 2, 1, 2, 0][:batch], dtype=np.int64))
            z1, h1 = alloc((batch, 10)), alloc((batch, 10))
            mod.dense_forward(x, w1, b1, "gelu", h1, z1)
            logits = alloc((batch, 3))
            mod.dense_forward(h1, w2, b2, "identity", logits)
            dlog = alloc((batch, 3))
            losses.append(mod.softmax_cross_entropy(logits, labels, dlog))
            mod.dense_backward(h1, dlog, gw2, gb2)
            d1 = alloc((batch, 10))
            mod.backprop_delta(dlog, w2, z1, None, "gelu", d1)
            mod.dense_backward(x, d1, gw1, gb1)
            mod.adam_step(params, grads, m, v, step, 1e-2, 0.9, 0.999, 1e-8, 0.0, False, 0.0,
                          None)
        return losses

    ref_p = p0.copy()
    ref_losses = run(R, ref_p, np.zeros(total, dtype), np.zeros(total, dtype),
                     np.zeros(total, dtype), lambda s: np.empty(s, dtype), lambda a: a)
    dev_p = C.from_host(p0)
    dev_losses = run(C, dev_p, C.zeros(total, dtype), C.zeros(total, dtype),
                     C.zeros(total, dtype), lambda s: C.empty(s, dtype), C.from_host)
    np.testing.assert_allclose(dev_losses, ref_losses, **tol(dtype, 10))
    close(dev_p, ref_p, dtype, 10)


@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sequential_fit_on_cuda_matches_numpy(dtype):
    """fastnn's model trains on the cuda backend (buffers made by its hooks)
    and gives the numpy backend's losses, accuracy and predictions."""
    import fastnn as fn

    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 6)).astype(np.float32)
    y = rng.integers(0, 3, 24)
    results = {}
    for backend in ("numpy", "cuda"):
        with fn.use_backend(backend):
            model = fn.Sequential([fn.Dense(5, "tanh"), fn.Dense(3)], input_dim=6,
                                  dtype=dtype, seed=0)
            model.compile(loss="softmax_cross_entropy", optimizer=fn.Adam(lr=1e-2))
            hist = model.fit(x, y, epochs=1, batch_size=12, verbose=0, shuffle=False)
            results[backend] = (hist.history["loss"], hist.history["accuracy"],
                                model.predict(x[:3]))
    (loss_n, acc_n, pred_n), (loss_c, acc_c, pred_c) = results["numpy"], results["cuda"]
    np.testing.assert_allclose(loss_c, loss_n, **tol(dtype, 6))
    assert acc_c == acc_n
    np.testing.assert_allclose(pred_c, pred_n, **tol(dtype, 6))


@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sequential_convnet_on_cuda_matches_numpy(dtype):
    """A small Keras-style convnet (Conv2D relu, MaxPool2D, Conv2D "same",
    Flatten, Dropout, Dense) trains on the cuda backend with every kernel
    native and gives the numpy backend's losses and predictions (the dropout
    masks are the same on both)."""
    import fastnn as fn

    assert fn.backends()["cuda"].fallbacks == ()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((12, 7, 6, 1)).astype(np.float32)
    y = rng.integers(0, 3, 12)
    results = {}
    for backend in ("numpy", "cuda"):
        with fn.use_backend(backend):
            model = fn.Sequential([
                fn.Conv2D(3, (3, 3), activation="relu", input_shape=(7, 6, 1)),
                fn.MaxPool2D(pool_size=(2, 2)),
                fn.Conv2D(2, (2, 2), activation="tanh", padding="same"),
                fn.Flatten(),
                fn.Dropout(0.5),
                fn.Dense(3, activation="softmax"),
            ], dtype=dtype, seed=0)
            model.compile(loss="sparse_categorical_crossentropy", optimizer=fn.Adam(lr=1e-2))
            hist = model.fit(x, y, epochs=1, batch_size=6, verbose=0, shuffle=False)
            results[backend] = (hist.history["loss"], model.predict(x[:4]))
    (loss_n, pred_n), (loss_c, pred_c) = results["numpy"], results["cuda"]
    np.testing.assert_allclose(loss_c, loss_n, **tol(dtype, 20))
    np.testing.assert_allclose(pred_c, pred_n, **tol(dtype, 20))


# ------------------------------------------------------------------ real GPU only

@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("engine", ["numba", "cublas"])
def test_gemm_engines_on_gpu(dtype, engine):
    """Both GEMM engines match the reference on shapes larger than a tile."""
    try:
        C.set_gemm(engine)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    try:
        rng = np.random.default_rng(0)
        m, k, n = 130, 257, 65
        x, w, b = rand(rng, (m, k), dtype), rand(rng, (k, n), dtype), rand(rng, n, dtype)
        want, want_z = np.empty((m, n), dtype), np.empty((m, n), dtype)
        R.dense_forward(x, w, b, "silu", want, want_z)
        out, z = C.empty((m, n), dtype), C.empty((m, n), dtype)
        C.dense_forward(dev(x), dev(w), dev(b), "silu", out, z)
        close(out, want, dtype, k)
        close(z, want_z, dtype, k)
        dz = rand(rng, (m, n), dtype)
        dw, db = C.empty((k, n), dtype), C.empty(n, dtype)
        C.dense_backward(dev(x), dev(dz), dw, db)
        close(dw, x.T @ dz, dtype, m)
        close(db, dz.sum(0), dtype, m)
        zb = rand(rng, (m, k), dtype)
        want_d = np.empty((m, k), dtype)
        R.backprop_delta(dz, w, zb, None, "softplus", want_d)
        d = C.empty((m, k), dtype)
        C.backprop_delta(dev(dz), dev(w), dev(zb), None, "softplus", d)
        close(d, want_d, dtype, n)
    finally:
        C.set_gemm("auto")


@pytest.mark.gpu
@needs_gpu
def test_foreign_device_arrays_on_gpu():
    """CuPy arrays and PyTorch CUDA tensors work as they are (no copies)."""
    rng = np.random.default_rng(0)
    x = rand(rng, (6, 5), np.float32)
    want = np.empty_like(x)
    R.activation_forward("tanh", x, want)
    tried = 0
    if importlib.util.find_spec("cupy") is not None:
        import cupy

        a = cupy.asarray(x)
        C.activation_forward("tanh", a, a)
        np.testing.assert_allclose(cupy.asnumpy(a), want, **tol(np.float32))
        tried += 1
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            t = torch.from_numpy(x.copy()).cuda()
            C.activation_forward("tanh", t, t)
            np.testing.assert_allclose(t.cpu().numpy(), want, **tol(np.float32))
            tried += 1
    if not tried:
        pytest.skip("neither CuPy nor PyTorch CUDA is installed")


# ------------------------------------------------------------------ gather_rows (issue 17)

def _gather_src(rng, dtype, shape=(30, 2, 3)):
    if np.dtype(dtype) == np.bool_:
        return rng.integers(0, 3, shape).astype(np.uint8).view(np.bool_)   # bytes 0, 1, 2
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    return rand(rng, shape, dtype, 10.0)


@needs_cuda
@pytest.mark.parametrize("src_dtype", [np.uint8, np.int16, np.int64, np.float32, np.float64,
                                       np.bool_, np.float16])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_gather_rows_host_src_into_device_out(src_dtype, out_dtype):
    """``fit``'s case: the user's host array gathered and converted on the host
    into the pinned stage, then one copy into the device buffer; the stage
    grows with the batch and is reused."""
    rng = np.random.default_rng(0)
    src = _gather_src(rng, src_dtype)
    before = src.tobytes()
    for k in (4, 9, 2):                       # grows, then a smaller view of it
        index = rng.integers(0, 30, k)
        index[0] = index[-1]                  # a repeat
        out = C.empty((k, 2, 3), out_dtype)
        C.gather_rows(src, index, out)
        np.testing.assert_array_equal(C.to_host(out), src[index].astype(out_dtype))
    assert src.tobytes() == before


@needs_cuda
@pytest.mark.parametrize("src_dtype", [np.uint8, np.int32, np.float32, np.float64, np.bool_])
def test_gather_rows_device_src(src_dtype):
    """A source already on the device is gathered there, into a device or a
    host ``out``, from a host or a device index of any integer dtype."""
    rng = np.random.default_rng(1)
    src = _gather_src(rng, src_dtype)
    dsrc = dev(src)
    for index in (np.array([29, 0, 29, 5]), np.array([3, 3], np.int32), np.array([7], np.uint8)):
        want = src[index.astype(np.intp)].astype(np.float32)
        out = C.empty(want.shape, np.float32)
        C.gather_rows(dsrc, index, out)
        np.testing.assert_array_equal(C.to_host(out), want)
        host_out = np.empty_like(want)
        C.gather_rows(dsrc, dev(index), host_out)
        np.testing.assert_array_equal(host_out, want)
    np.testing.assert_array_equal(C.to_host(dsrc), src)


@needs_cuda
def test_gather_rows_through_ops_on_cuda(tmp_path):
    """Through the gate on the cuda backend: a read-only memmap into a device
    array, and the errors of a bad index."""
    import fastnn

    rng = np.random.default_rng(2)
    data = rng.integers(0, 256, (20, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "x.npy", data)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    out = C.empty((3, 4, 4), np.float32)
    with fastnn.use_backend("cuda"):
        fastnn.ops.gather_rows(mm, np.array([19, 0, 19]), out)
        np.testing.assert_array_equal(C.to_host(out), data[[19, 0, 19]].astype(np.float32))
        with pytest.raises(ValueError, match=r"index must hold row numbers of src in \[0, 20\)"):
            fastnn.ops.gather_rows(mm, np.array([19, 20, 0]), out)
        with pytest.raises(TypeError, match="index must have an integer dtype"):
            fastnn.ops.gather_rows(mm, dev(np.array([1.0, 2.0, 0.0])), out)


@pytest.mark.skipif(not HAS_NUMBA_CUDA or SIMULATOR, reason="needs numba-cuda, not the simulator")
def test_gather_kernels_compile_for_a_real_gpu(monkeypatch):
    """The device gather compiles to PTX for the (source, index, output) types
    it meets; into float32 it converts without float64 arithmetic (except from
    a float64 source)."""
    from numba import cuda
    import numba.cuda.dispatcher as dispatcher
    from types import SimpleNamespace
    from fastnn.kernels import _cuda_data as D

    monkeypatch.setattr(dispatcher, "get_current_device",
                        lambda: SimpleNamespace(compute_capability=(8, 0)))
    for src in (cuda.uint8, cuda.int16, cuda.int64, cuda.float32, cuda.float64):
        for index in (cuda.int64, cuda.int32):
            for out in (cuda.float32, cuda.float64):
                for kernel in (D.gather_rows, D.gather_rows_bool) if src == cuda.uint8 else \
                        (D.gather_rows,):
                    sig = (src[::1], index[::1], out[::1], cuda.int64)
                    try:
                        ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(8, 0))
                    except Exception as exc:
                        if "NVVM" in type(exc).__name__ or "libnvvm" in str(exc).lower():
                            pytest.skip(f"NVVM is not installed: {exc}")
                        raise
                    if out == cuda.float32 and src != cuda.float64:
                        f64 = [ln for ln in ptx.splitlines()
                               if ".f64" in ln and not ln.strip().startswith("//")]
                        assert not f64, f"{src} -> float32 computes in float64: {f64[:3]}"


# ------------------------------------------------------------------ launch shapes and streams (issue 13)

def test_gemm_grid_takes_any_number_of_rows():
    """The tiled GEMM's row tiles go on ``gridDim.x`` (up to 2^31 - 1), the
    column tiles on ``y`` (at most 65,535, the kernel strides over the rest):
    4,194,241 rows (one more than 65,535 tiles of 64 hold) and more launch."""
    for m, n in ((4_194_241, 10), (10**9, 1), (5, 65_535 * 64 + 1), (1, 1), (64, 64), (65, 129)):
        gx, gy = C.gemm_grid(m, n, 64)
        assert 1 <= gx <= 2**31 - 1 and 1 <= gy <= C.GRID_Y_MAX
        assert gx * 64 >= m > (gx - 1) * 64          # every row tile, once
        assert gy == min(-(-n // 64), C.GRID_Y_MAX)   # column tiles, strided beyond


@needs_cuda
def test_gemm_launch_for_more_rows_than_grid_y_holds(monkeypatch):
    """dense_forward of a batch of 4,194,305 rows on the tiled GEMM: the launch
    it configures fits CUDA's limits (the launch itself is intercepted: the
    simulator runs each GPU thread as a Python thread)."""
    if C.gemm_engine() != "numba":
        pytest.skip("cuBLAS does the GEMM here")
    launched = []

    def capture(kernel, grid, block):
        launched.append((kernel, grid, block))
        return lambda *args: None

    monkeypatch.setattr(C, "_launch", capture)
    m = 4_194_305
    x = C.empty((m, 1), np.float32)
    w, b = dev(np.ones((1, 2), np.float32)), dev(np.zeros(2, np.float32))
    C.dense_forward(x, w, b, "relu", C.empty((m, 2), np.float32))
    (kernel, (gx, gy), block), = launched
    bm = C._k.BM
    assert gy <= 65_535 and gx <= 2**31 - 1
    assert gx * bm >= m and gy * bm >= 2


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_strides_over_column_tiles_beyond_grid_y(monkeypatch, dtype):
    """With ``gridDim.y`` capped at 1, one block row walks every column tile:
    the three GEMMs still equal the reference."""
    if C.gemm_engine() != "numba":
        pytest.skip("cuBLAS does the GEMM here")
    monkeypatch.setattr(C, "GRID_Y_MAX", 1)
    rng = np.random.default_rng(16)
    bm = C._k.BM
    m, k, n = bm + 3, 5, 2 * bm + 3
    x, w, b = rand(rng, (m, k), dtype), rand(rng, (k, n), dtype), rand(rng, n, dtype)
    out = C.empty((m, n), dtype)
    C.dense_forward(dev(x), dev(w), dev(b), "identity", out)
    close(out, x @ w + b, dtype, k)
    dz = rand(rng, (m, n), dtype)
    dw, db = C.empty((k, n), dtype), C.empty(n, dtype)
    C.dense_backward(dev(x), dev(dz), dw, db)
    close(dw, x.T @ dz, dtype, m)
    delta = C.empty((m, k), dtype)
    C.backprop_delta(dev(dz), dev(w), None, dev(np.ones((m, k), dtype)), "identity", delta)
    close(delta, dz @ w.T, dtype, n)


class _FakeCupy:
    """What ``_stream`` reads of CuPy: ``cupy.cuda.get_current_stream().ptr``."""

    def __init__(self, ptr):
        stream = type("Stream", (), {"ptr": ptr})()
        self.cuda = type("cuda", (), {"get_current_stream": staticmethod(lambda: stream)})()


class _FakeKernel:
    def __init__(self):
        self.configs = []

    def __getitem__(self, config):
        self.configs.append(config)
        return lambda *args: None


@needs_cuda
def test_kernels_launch_on_cupys_current_stream(monkeypatch):
    """CuPy's cuBLAS wrappers run the GEMM on CuPy's current stream; every
    kernel launch (the epilogues after it included) and copy goes on that
    stream too, so a caller's non-blocking stream cannot see the epilogue
    read the GEMM's output early. Without CuPy, or on its null stream:
    numba's default stream (no stream argument)."""
    monkeypatch.setattr(C._k, "SIMULATOR", False)     # _launch's real path, kernels faked
    made = []
    monkeypatch.setattr(C._cuda, "external_stream",
                        lambda handle: made.append(handle) or ("stream", handle))
    monkeypatch.setattr(C, "_streams", {})
    monkeypatch.setattr(C, "_launches", {})
    kernel = _FakeKernel()
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    assert C._stream() is None
    C._launch(kernel, 4, 8)
    monkeypatch.setitem(sys.modules, "cupy", _FakeCupy(0))
    assert C._stream() is None
    C._launch(kernel, 4, 8)                           # the same launch: numba's default stream
    monkeypatch.setitem(sys.modules, "cupy", _FakeCupy(0xBEEF))
    C._launch(kernel, 4, 8)
    C._launch(kernel, 4, 8)                           # configured once per stream
    assert kernel.configs == [(4, 8), (4, 8, ("stream", 0xBEEF))]
    assert made == [0xBEEF]
    assert C._Staging().stream == ("stream", 0xBEEF)


@pytest.mark.gpu
@needs_gpu
def test_non_blocking_cupy_stream_orders_gemm_and_epilogue():
    """On a non-blocking CuPy stream, dense_forward through cuBLAS (a GEMM
    long enough to still run when the epilogue is launched) and backprop_delta
    equal the reference."""
    cupy = pytest.importorskip("cupy")
    if C.gemm_engine() != "cublas":
        pytest.skip("cuBLAS is not usable here")
    rng = np.random.default_rng(17)
    m, k, n = 4096, 4096, 512
    x, w, b = rand(rng, (m, k), np.float32), rand(rng, (k, n), np.float32), rand(rng, n, np.float32)
    want = np.empty((m, n), np.float32)
    R.dense_forward(x, w, b, "relu", want)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        dx, dw, db = cupy.asarray(x), cupy.asarray(w), cupy.asarray(b)
        out = cupy.empty((m, n), np.float32)
        for _ in range(3):
            C.dense_forward(dx, dw, db, "relu", out)
        got = cupy.asnumpy(out, stream=stream)
        stream.synchronize()
    np.testing.assert_allclose(got, want, **tol(np.float32, k))
