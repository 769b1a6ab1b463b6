"""Tests of the numba backend beyond the shared parity suite.

* the module exports the whole contract itself (no reference fallbacks);
* our vectorizable exp / tanh / log1p and the activations built on them,
  over a dense sweep of float32 values (tails, denormals, infinities, NaN) and
  a wide sample of float64 values, against NumPy in float64;
* the serial and the parallel (prange) paths give the same results;
* the optimizers equal the reference bit for bit (same operations, same order);
* the cache folder falls back to the user's cache when the package folder is
  not writable (the failure is injected: root ignores permissions);
* parallel kernels called from several Python threads at once (omp layer).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("numba")

import fastnn  # noqa: E402
import numba  # noqa: E402
from fastnn.kernels import numba_cpu as nb  # noqa: E402
from fastnn.kernels import reference as ref  # noqa: E402
from fastnn.kernels.numba_cpu import _math, _runtime  # noqa: E402
from conftest import DTYPES, assert_close  # noqa: E402

from numba import njit  # noqa: E402

F32_TINY = np.finfo(np.float32).tiny


# ------------------------------------------------------------ contract

def test_exports_the_whole_contract():
    assert nb.COMPLETE is True
    assert set(nb.ACTIVATIONS) == set(ref.ACTIVATIONS)
    pending = getattr(nb, "PENDING", ())   # issue 16 implements the conv kernels
    for name in ref.CONTRACT:
        assert callable(getattr(nb, name, None)) or name in pending, name
    info = fastnn.backends()["numba"]
    assert info.available, info.reason
    assert info.fallbacks == tuple(pending)


def test_info_and_threading_layer():
    info = nb.info()
    assert set(info) >= {"numba", "threading_layer", "cache_dir", "numba_threads"}
    if not _runtime._SERIALISE_PARALLEL:
        assert info["threading_layer"].startswith("omp")


def test_import_fastnn_does_not_import_numba():
    code = "import sys, fastnn; assert 'numba' not in sys.modules, 'numba imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_set_num_threads_reaches_the_module():
    try:
        fastnn.set_num_threads(1)
        assert nb.info()["numba_threads"] == 1
    finally:
        fastnn.set_num_threads(None)
    assert nb.info()["numba_threads"] == min(fastnn.get_num_threads(), numba.config.NUMBA_NUM_THREADS)


# ------------------------------------------------------------ math approximations

@njit(error_model="numpy")
def _apply(code, x, out):
    for i in range(x.size):
        if code == 0:
            out[i] = _math._exp(x[i])
        elif code == 1:
            out[i] = _math._tanh(x[i])
        else:
            out[i] = _math._log1p01(x[i])


def _ulps(a, b):
    """Distance in units in the last place (same dtype, finite, same sign side)."""
    ity = np.int32 if a.dtype == np.float32 else np.int64
    ai, bi = a.view(ity).astype(np.int64), b.view(ity).astype(np.int64)
    sign = np.int64(np.iinfo(ity).max)
    ai = np.where(ai < 0, -(ai & sign), ai)
    bi = np.where(bi < 0, -(bi & sign), bi)
    return np.abs(ai - bi)


def _float32_sweep():
    """Every 2039th float32 bit pattern (all magnitudes and both signs, about
    2 M values) plus the edges and non-finite values."""
    x = np.arange(0, 2**32, 2039, dtype=np.uint64).astype(np.uint32).view(np.float32)
    edges = [0.0, -0.0, F32_TINY, -F32_TINY, 1e-45, -1e-45, 88.72283, 88.72284, -87.33654,
             -103.97207, -103.9721, -104.0, 9.0, -9.0, 8.99, 1e30, -1e30,
             np.finfo(np.float32).max, -np.finfo(np.float32).max, np.inf, -np.inf, np.nan]
    return np.concatenate([x, np.array(edges, np.float32)])


def _float64_sample():
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.uniform(-750, 720, 200_000), rng.standard_normal(200_000) * 5,
                        rng.uniform(-1e-8, 1e-8, 50_000), rng.uniform(0, 1, 100_000),
                        [0.0, -0.0, 709.78, 709.79, -745.1, -745.2, -746.0, 1e300, -1e300,
                         5e-324, np.inf, -np.inf, np.nan]])
    return x


# (code, numpy function, domain, max ulp float32, max ulp float64)
MATH = [(0, np.exp, lambda x: np.ones(x.shape, bool), 1, 1),
        (1, np.tanh, lambda x: np.ones(x.shape, bool), 4, 2),
        (2, np.log1p, lambda x: (x >= 0) & (x <= 1) | np.isnan(x), 1, 1)]


@pytest.mark.parametrize("code, func, domain, ulp32, ulp64", MATH, ids=["exp", "tanh", "log1p"])
def test_math_float32_dense_sweep(code, func, domain, ulp32, ulp64):
    x = _float32_sweep()
    x = x[domain(x)]
    out = np.empty_like(x)
    _apply(code, x, out)
    with np.errstate(all="ignore"):
        exact = func(x.astype(np.float64))
    rounded = exact.astype(np.float32)
    # same NaNs, same infinities, same zeros
    np.testing.assert_array_equal(np.isnan(out), np.isnan(rounded))
    finite = np.isfinite(rounded)
    np.testing.assert_array_equal(out[~finite & ~np.isnan(rounded)],
                                  rounded[~finite & ~np.isnan(rounded)])
    normal = finite & (np.abs(rounded) >= F32_TINY)
    assert _ulps(out[normal], rounded[normal]).max() <= ulp32
    # denormal results (exp of -87.3 .. -104): absolutely within half the
    # smallest denormal step times a few
    sub = finite & (np.abs(rounded) < F32_TINY)
    assert np.all(np.abs(out[sub].astype(np.float64) - exact[sub]) <= 4e-45)


@pytest.mark.parametrize("code, func, domain, ulp32, ulp64", MATH, ids=["exp", "tanh", "log1p"])
def test_math_float64(code, func, domain, ulp32, ulp64):
    x = _float64_sample()
    x = x[domain(x)]
    out = np.empty_like(x)
    _apply(code, x, out)
    with np.errstate(all="ignore"):
        expected = func(x)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    normal = np.isfinite(expected) & (np.abs(expected) >= np.finfo(np.float64).tiny)
    assert _ulps(out[normal], expected[normal]).max() <= ulp64
    other = ~normal & ~np.isnan(expected)
    np.testing.assert_allclose(out[other], expected[other], rtol=0, atol=1e-320)


def test_math_special_values():
    f32 = np.float32
    x = np.array([np.inf, -np.inf, np.nan, 0.0, 89.0, -110.0, 1e30, -1e30], f32)
    out = np.empty_like(x)
    _apply(0, x, out)
    np.testing.assert_array_equal(out, np.array([np.inf, 0, np.nan, 1, np.inf, 0, np.inf, 0], f32))
    _apply(1, x, out)
    np.testing.assert_array_equal(out, np.array([1, -1, np.nan, 0, 1, -1, 1, -1], f32))
    x64 = x.astype(np.float64)
    out64 = np.empty_like(x64)
    _apply(0, x64, out64)
    np.testing.assert_array_equal(out64, [np.inf, 0, np.nan, 1, np.exp(89.0), np.exp(-110.0),
                                          np.inf, 0])
    _apply(1, x64, out64)
    np.testing.assert_array_equal(out64, [1, -1, np.nan, 0, 1, -1, 1, -1])


def _activation_truth(act, z32):
    """The reference evaluated in float64 on float32 inputs: forward and the
    derivative (with dy = 1)."""
    z = z32.astype(np.float64)
    with np.errstate(all="ignore"):
        y = np.empty_like(z)
        ref.activation_forward(act, z, y)
        d = np.empty_like(z)
        ref.activation_backward(act, np.ones_like(z), z, y, d)
    return y, d


@pytest.mark.parametrize("act", ref.ACTIVATIONS)
def test_activations_float32_dense_sweep(act):
    """Every activation and derivative over the float32 sweep: within the
    parity tolerance of the float64 truth and of the float32 reference, with
    NaN and infinities where they are."""
    z = _float32_sweep()
    dy = np.ones_like(z)
    with np.errstate(all="ignore"):
        y32 = np.empty_like(z)
        ref.activation_forward(act, z, y32)
        d32 = np.empty_like(z)
        ref.activation_backward(act, dy, z, y32, d32)
    y = np.empty_like(z)
    nb.activation_forward(act, z, y)
    d = np.empty_like(z)
    nb.activation_backward(act, dy, z, y32, d)
    y64, d64 = _activation_truth(act, z)
    assert_close(y, y32, np.float32, err_msg=f"{act} vs float32 reference")
    # against the float64 truth where float32 intermediates do not overflow
    ok = np.isfinite(y32)
    assert_close(y[ok], y64[ok].astype(np.float32), np.float32, err_msg=f"{act} vs float64")
    assert_close(d, d32, np.float32, err_msg=f"{act}' vs float32 reference")
    if act not in ref.Y_ACTIVATIONS:  # from y, the float32 rounding of y dominates
        ok = np.isfinite(d32)
        assert_close(d[ok], d64[ok].astype(np.float32), np.float32, err_msg=f"{act}' vs float64")


@pytest.mark.parametrize("act", ref.ACTIVATIONS)
def test_activations_float64_sample(act):
    z = _float64_sample()
    y64, d64 = _activation_truth(act, z)
    y = np.empty_like(z)
    nb.activation_forward(act, z, y)
    d = np.empty_like(z)
    nb.activation_backward(act, np.ones_like(z), z, y64, d)
    assert_close(y, y64, np.float64, err_msg=act)
    assert_close(d, d64, np.float64, err_msg=f"{act}'")


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_negative_tail_relative_accuracy(dtype):
    """exp(-|z|) form: relative accuracy all the way down the negative tail."""
    lo = -87.0 if dtype == np.float32 else -700.0
    z = np.linspace(lo, 0, 200_001).astype(dtype)
    out = np.empty_like(z)
    nb.activation_forward("sigmoid", z, out)
    exact = 1 / (1 + np.exp(-z.astype(np.longdouble)))
    rel = np.abs(out.astype(np.longdouble) - exact) / exact
    assert rel.max() < (4e-7 if dtype == np.float32 else 1e-15)


# ------------------------------------------------------------ serial vs parallel

@pytest.fixture
def force_parallel(monkeypatch):
    """Every kernel on its prange path with 2 threads (or skip on one core)."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: no parallel path")
    for k in nb.PARALLEL_MIN:
        monkeypatch.setitem(nb.PARALLEL_MIN, k, 1)
    previous = nb.info()["numba_threads"]
    nb.set_num_threads(2)
    yield
    nb.set_num_threads(previous)


def _both_paths(force, fn):
    """Run ``fn()`` (returning a tuple of arrays/floats) serially, then in
    parallel; returns both results."""
    saved = dict(nb.PARALLEL_MIN)
    nb.PARALLEL_MIN.update({k: 1 << 62 for k in saved})
    try:
        serial = fn()
    finally:
        nb.PARALLEL_MIN.update(saved)
    return serial, fn()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ref.ACTIVATIONS)
def test_serial_and_parallel_paths_agree(force_parallel, dtype, act):
    rng = np.random.default_rng(7)
    n = 4099   # odd: the chunk boundary is not a multiple of anything
    z = (rng.standard_normal(n) * 3).astype(dtype)
    dy = rng.standard_normal(n).astype(dtype)
    x = rng.standard_normal((67, 29)).astype(dtype)
    w = rng.standard_normal((29, 61)).astype(dtype)
    b = rng.standard_normal(61).astype(dtype)

    def run():
        y = np.empty_like(z)
        nb.activation_forward(act, z, y)
        d = np.empty_like(z)
        nb.activation_backward(act, dy, z, y, d)
        inplace = z.copy()
        nb.activation_forward(act, inplace, inplace)
        out, pre = np.empty((67, 61), dtype), np.empty((67, 61), dtype)
        nb.dense_forward(x, w, b, act, out, pre)
        delta = np.empty((67, 29), dtype)
        nb.backprop_delta(out, w, x, x, act, delta)
        return y, d, inplace, out, pre, delta

    serial, parallel = _both_paths(force_parallel, run)
    for s, p in zip(serial, parallel):
        np.testing.assert_array_equal(s, p)


@pytest.mark.parametrize("dtype", DTYPES)
def test_serial_and_parallel_losses_and_optimizers_agree(force_parallel, dtype):
    rng = np.random.default_rng(8)
    logits = (rng.standard_normal((301, 13)) * 4).astype(dtype)
    labels = rng.integers(0, 13, 301).astype(np.int32)
    targets = rng.uniform(0, 1, (301, 13)).astype(dtype)
    x = rng.standard_normal((301, 37)).astype(dtype)
    n = 70_001
    p, g = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)

    def run():
        results = []
        for kernel, second in ((nb.softmax_cross_entropy, labels),
                               (nb.sigmoid_binary_cross_entropy, targets), (nb.mse, targets)):
            grad = np.empty_like(logits)
            results += [kernel(logits, second, grad), grad]
        soft = np.empty_like(logits)
        nb.softmax(logits, soft)
        dw, db = np.empty((37, 13), dtype), np.empty(13, dtype)
        nb.dense_backward(x, logits, dw, db)
        results += [soft, dw, db]
        a = [p.copy(), np.zeros(n, dtype)]
        nb.sgd_step(a[0], g, a[1], 0.1, 0.9, True, 1e-2, 1e-3)
        b_ = [p.copy(), np.zeros(n, dtype), np.zeros(n, dtype), np.zeros(n, dtype)]
        nb.adam_step(b_[0], g, b_[1], b_[2], 3, 1e-3, 0.9, 0.999, 1e-8, 1e-2, True, 1e-3, b_[3])
        c = [p.copy(), np.zeros(n, dtype), np.zeros(n, dtype), np.zeros(n, dtype)]
        nb.rmsprop_step(c[0], g, c[1], c[2], 1e-2, 0.99, 1e-8, 0.9, c[3], 1e-2, 1e-3)
        return results + a + b_ + c

    serial, parallel = _both_paths(force_parallel, run)
    for s, p_ in zip(serial, parallel):
        if isinstance(s, float):   # a loss: the partial sums are added in another order
            assert p_ == pytest.approx(s, rel=1e-12)
        else:
            np.testing.assert_array_equal(s, p_)


# ------------------------------------------------------------ exactness, aliasing, dtypes

OPTIMIZER_CASES = [
    ("sgd_step", dict(buf=True, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, l1=1e-3)),
    ("sgd_step", dict(buf=False, lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0, l1=0.0)),
    ("adam_step", dict(step=7, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2,
                       decoupled=False, l1=1e-3, vmax=True)),
    ("adam_step", dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2,
                       decoupled=True, l1=0.0, vmax=False)),
    ("rmsprop_step", dict(buf=True, lr=1e-2, rho=0.99, eps=1e-8, momentum=0.9,
                          centered_mean=True, weight_decay=1e-2, l1=1e-3)),
    ("rmsprop_step", dict(buf=False, lr=1e-2, rho=0.99, eps=1e-8, momentum=0.0,
                          centered_mean=False, weight_decay=0.0, l1=0.0)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel, hp", OPTIMIZER_CASES)
def test_optimizers_equal_the_reference_bit_for_bit(kernel, hp, dtype):
    """Same operations in the same order, scalars cast as NumPy casts them, no
    FMA contraction: the results are identical, not only close."""
    rng = np.random.default_rng(9)
    n = 1003
    args = {"p": rng.standard_normal(n).astype(dtype), "g": rng.standard_normal(n).astype(dtype)}
    if kernel == "adam_step":
        args["m"] = rng.standard_normal(n).astype(dtype)
        args["v"] = np.abs(rng.standard_normal(n)).astype(dtype)
    if kernel == "rmsprop_step":
        args["sq"] = (np.abs(rng.standard_normal(n)) + 2).astype(dtype)
    for name, value in hp.items():
        if value is True and name in ("buf", "vmax", "centered_mean"):
            value = np.abs(rng.standard_normal(n)).astype(dtype)
        elif value is False and name in ("buf", "vmax", "centered_mean"):
            value = None
        args[name] = value
    mine = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    getattr(ref, kernel)(**args)
    getattr(nb, kernel)(**mine)
    for name, value in args.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(mine[name], value, err_msg=name)


@pytest.mark.parametrize("act", ref.ACTIVATIONS)
def test_backward_in_place_into_z_or_y(act):
    """``out`` may be the array the derivative is taken from."""
    rng = np.random.default_rng(10)
    z = (rng.standard_normal((33, 31)) * 3).astype(np.float32)
    y = np.empty_like(z)
    ref.activation_forward(act, z, y)
    dy = rng.standard_normal(z.shape).astype(np.float32)
    expected = np.empty_like(z)
    ref.activation_backward(act, dy, z, y, expected)
    src = (y if act in ref.Y_ACTIVATIONS else z).copy()
    args = dict(z=None, y=src) if act in ref.Y_ACTIVATIONS else dict(z=src, y=None)
    nb.activation_backward(act, dy, out=src, **args)
    assert_close(src, expected, np.float32)


@pytest.mark.parametrize("label_dtype", [np.int8, np.uint16, np.int32, np.uint64, np.intp])
def test_labels_of_any_integer_dtype(label_dtype):
    rng = np.random.default_rng(11)
    logits = rng.standard_normal((17, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 17).astype(label_dtype)
    before = labels.copy()
    expected_grad, grad = np.empty_like(logits), np.empty_like(logits)
    expected = ref.softmax_cross_entropy(logits, labels, expected_grad)
    loss = nb.softmax_cross_entropy(logits, labels, grad)
    assert type(loss) is float
    assert loss == pytest.approx(expected, rel=1e-6)
    assert_close(grad, expected_grad, np.float32, reduction=5)
    np.testing.assert_array_equal(labels, before)


def test_read_only_inputs():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((8, 5)).astype(np.float32)
    w = rng.standard_normal((5, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    for a in (x, w, b):
        a.setflags(write=False)
    out, expected = np.empty((8, 3), np.float32), np.empty((8, 3), np.float32)
    nb.dense_forward(x, w, b, "tanh", out)
    ref.dense_forward(x, w, b, "tanh", expected)
    assert_close(out, expected, np.float32, reduction=5)
    y = np.empty_like(x)
    nb.activation_forward("sigmoid", x, y)
    ref.activation_forward("sigmoid", x, expected := np.empty_like(x))
    assert_close(y, expected, np.float32)


# ------------------------------------------------------------ cache folder

def test_cache_plan_rules(tmp_path):
    pkg = str(tmp_path / "pkg")
    xdg = str(tmp_path / "xdg")
    mine = os.path.join(xdg, "fastnn", "numba")
    env = {"XDG_CACHE_HOME": xdg}
    plan = _runtime._cache_plan
    # the package folder first (numba's default: nothing to set)
    assert plan(pkg, env, writable=lambda p: True) == (None, True)
    # not writable: the user's cache folder
    assert plan(pkg, env, writable=lambda p: p == mine) == (mine, True)
    home = {"HOME": str(tmp_path / "home")}
    assert plan(pkg, home, writable=lambda p: not p.startswith(pkg))[0].startswith(
        os.path.expanduser("~"))
    # NUMBA_CACHE_DIR set by the user wins when it is writable
    user = {"NUMBA_CACHE_DIR": str(tmp_path / "mine"), **env}
    assert plan(pkg, user, writable=lambda p: True) == (None, True)
    assert plan(pkg, user, writable=lambda p: p == mine) == (mine, True)
    # nothing writable: compile without a cache
    assert plan(pkg, env, writable=lambda p: False) == (None, False)


def test_dir_writable_sees_a_failing_write(tmp_path, monkeypatch):
    assert _runtime._dir_writable(str(tmp_path / "cache"))

    def refuse(*args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr(_runtime.tempfile, "TemporaryFile", refuse)
    assert not _runtime._dir_writable(str(tmp_path / "cache"))


def test_unwritable_package_caches_in_user_folder(tmp_path):
    """A fresh process where writing into the package's __pycache__ fails
    (injected; root ignores permissions): kernels compile and are cached
    under $XDG_CACHE_HOME/fastnn/numba."""
    code = textwrap.dedent("""
        import os, tempfile
        import fastnn.kernels as k
        pkg_cache = os.path.join(os.path.dirname(os.path.abspath(k.__file__)), "numba_cpu",
                                 "__pycache__")
        real = tempfile.TemporaryFile
        def guarded(*args, dir=None, **kwargs):
            if dir is not None and os.path.abspath(dir) == pkg_cache:
                raise PermissionError("read-only package folder")
            return real(*args, dir=dir, **kwargs)
        tempfile.TemporaryFile = guarded
        import numpy as np
        from fastnn.kernels import numba_cpu as nb
        z = np.linspace(-3, 3, 11, dtype=np.float32)
        out = np.empty_like(z)
        nb.activation_forward("relu", z, out)
        print(os.environ["NUMBA_CACHE_DIR"])
        print(nb.cache_dir())
    """)
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    env.pop("NUMBA_CACHE_DIR", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    expected = os.path.join(str(tmp_path), "fastnn", "numba")
    assert proc.stdout.split() == [expected, expected]
    cached = [f for _, _, files in os.walk(expected) for f in files if f.endswith(".nbi")]
    assert cached, "nothing was cached in the user folder"


def test_nothing_writable_compiles_uncached(tmp_path):
    """No writable cache folder anywhere (package, user cache, NUMBA_CACHE_DIR;
    writes injected to fail): the kernels compile without a cache instead of
    failing, and the registry says so."""
    code = textwrap.dedent("""
        import tempfile
        def refuse(*args, **kwargs):
            raise PermissionError("read-only")
        tempfile.TemporaryFile = refuse
        import numpy as np
        import fastnn
        from fastnn.kernels import numba_cpu as nb
        z = np.linspace(-3, 3, 11, dtype=np.float32)
        out = np.empty_like(z)
        nb.activation_forward("tanh", z, out)
        assert abs(out[-1] - np.tanh(np.float32(3))) < 1e-6
        info = fastnn.backends()["numba"]
        assert info.available and "no writable cache folder" in info.reason, info
        assert nb.cache_dir() is None
        print("ok")
    """)
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    env.pop("NUMBA_CACHE_DIR", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ok"]


# ------------------------------------------------------------ threads

def test_concurrent_calls_from_python_threads(tmp_path):
    """Parallel kernels from four Python threads at once. numba's workqueue
    layer aborts the process here ("Concurrent access"); the omp layer we
    select does not. Run in a fresh process so that an abort fails the test."""
    code = textwrap.dedent("""
        import threading
        import numpy as np
        from fastnn.kernels import numba_cpu as nb, reference as ref
        nb.PARALLEL_MIN.update({k: 1 for k in nb.PARALLEL_MIN})
        nb.set_num_threads(2)
        z = np.linspace(-5, 5, 50_001, dtype=np.float32)
        expected = np.empty_like(z)
        ref.activation_forward("tanh", z, expected)
        errors = []
        def work():
            out = np.empty_like(z)
            for _ in range(200):
                nb.activation_forward("tanh", z, out)
            errors.append(float(np.abs(out - expected).max()))
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads: t.start()
        for t in threads: t.join()
        assert max(errors) < 1e-6, errors
        print(nb.threading_layer())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_forked_child_runs_serially():
    """GNU OpenMP aborts a child forked after the parent ran a parallel
    region; the backend runs such a child's kernels serially instead."""
    code = textwrap.dedent("""
        import os
        import numpy as np
        from fastnn.kernels import numba_cpu as nb
        nb.PARALLEL_MIN.update({k: 1 for k in nb.PARALLEL_MIN})
        nb.set_num_threads(2)
        z = np.linspace(-3, 3, 100_000, dtype=np.float32)
        before, after = np.empty_like(z), np.empty_like(z)
        nb.activation_forward("tanh", z, before)          # a parallel region here
        pid = os.fork()
        if pid == 0:
            nb.activation_forward("tanh", z, after)
            os._exit(0 if np.array_equal(after, before) else 3)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
    """)
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: no parallel path")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0"], proc.stdout + proc.stderr


# ------------------------------------------------------------ convolution, pooling, dropout
#
# What the parity suite does not reach: the parallel paths, chunk boundaries
# of the im2col workspace, the direct loop of kernels with few taps next to
# the im2col path, no allocation after the first call, and the cached
# activation variants of the conv kernels shared by processes.

from fastnn.kernels.numba_cpu import conv as nb_conv  # noqa: E402

#: (n, h, w, c, o, kh, kw, stride, padding), each reaching one code path
CONV_GEOMETRIES = [
    (2, 9, 8, 1, 5, 3, 3, (1, 1), (0, 0, 0, 0)),       # few taps: the direct loop
    (3, 9, 8, 1, 5, 3, 3, (2, 1), (1, 2, 2, 0)),       # direct loop, windows in the padding
    (3, 10, 9, 6, 7, 3, 3, (1, 1), (1, 1, 1, 1)),      # im2col + GEMM, "same" padding
    (2, 11, 7, 5, 4, 2, 4, (3, 2), (1, 0, 3, 2)),      # im2col, asymmetric pads, strides
    (2, 6, 5, 20, 3, 1, 1, (1, 1), (0, 0, 0, 0)),      # 1x1: x is its own im2col
    (2, 5, 5, 3, 4, 5, 5, (1, 1), (0, 0, 0, 0)),       # kernel = image: one output pixel
]
GEOMETRY_IDS = ["direct", "direct-padded", "im2col-same", "im2col-strided", "1x1", "whole"]


def _conv_arrays(geometry, dtype, act, seed=0):
    n, h, w, c, o, kh, kw, stride, pads = geometry
    rng = np.random.default_rng(seed)
    p = (h + pads[0] + pads[1] - kh) // stride[0] + 1
    q = (w + pads[2] + pads[3] - kw) // stride[1] + 1
    x = rng.standard_normal((n, h, w, c)).astype(dtype)
    zb = (rng.standard_normal((n, h, w, c)) * 2).astype(dtype)
    yb = np.empty_like(zb)
    ref.activation_forward(act, zb, yb)
    w_ = rng.standard_normal((kh, kw, c, o)) / np.sqrt(kh * kw * c)
    return dict(x=x, w=w_.astype(dtype), b=rng.standard_normal(o).astype(dtype),
                dz=rng.standard_normal((n, p, q, o)).astype(dtype), zb=zb, yb=yb, stride=stride,
                pads=pads, shape=(n, p, q, o))


def _conv_outputs(k, a, act):
    """The three conv kernels of module ``k`` on the arrays ``a``: every output."""
    out, pre, out2 = (np.empty(a["shape"], a["x"].dtype) for _ in range(3))
    k.conv2d_forward(a["x"], a["w"], a["b"], act, out, pre, a["stride"], a["pads"])
    k.conv2d_forward(a["x"], a["w"], a["b"], act, out2, None, a["stride"], a["pads"])
    dw, db = np.empty_like(a["w"]), np.empty_like(a["b"])
    k.conv2d_backward(a["x"], a["dz"], dw, db, a["stride"], a["pads"])
    dx = np.empty_like(a["x"])
    k.conv2d_backprop(a["dz"], a["w"], a["zb"], a["yb"], act, dx, a["stride"], a["pads"])
    return {"out": out, "preact": pre, "out (no preact)": out2, "dw": dw, "db": db, "dx": dx}


def _check_conv(got, expected, a, dtype):
    n, p, q, o = a["shape"]
    kh, kw, c, _ = a["w"].shape
    reduction = {"out": kh * kw * c, "preact": kh * kw * c, "out (no preact)": kh * kw * c,
                 "dw": n * p * q, "db": n * p * q, "dx": kh * kw * o}
    for name, value in expected.items():
        assert_close(got[name], value, dtype, reduction[name], err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("geometry", CONV_GEOMETRIES, ids=GEOMETRY_IDS)
def test_conv_serial_and_parallel_paths_agree(force_parallel, geometry, act, dtype):
    """Every loop of the conv kernels on its prange path (2 threads, odd row
    counts) gives the serial path's results bit for bit, and both the
    reference's."""
    a = _conv_arrays(geometry, dtype, act)
    serial, parallel = _both_paths(force_parallel, lambda: _conv_outputs(nb, a, act))
    for name in serial:
        np.testing.assert_array_equal(parallel[name], serial[name], err_msg=name)
    _check_conv(parallel, _conv_outputs(ref, a, act), a, dtype)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", CONV_GEOMETRIES, ids=GEOMETRY_IDS)
def test_conv_chunk_boundaries(monkeypatch, geometry, dtype, threads):
    """Workspace chunks of 1, 2, 5 and 7 GEMM rows (a chunk ends inside an
    output row and inside an image: conv2d_backprop zeroes an image in one
    chunk and multiplies its derivative in another) and one image of rows:
    the reference's results."""
    if threads > numba.config.NUMBA_NUM_THREADS:
        pytest.skip("one core")
    for k in nb.PARALLEL_MIN:
        monkeypatch.setitem(nb.PARALLEL_MIN, k, 1 if threads > 1 else 1 << 62)
    previous = nb.info()["numba_threads"]
    nb.set_num_threads(threads)
    try:
        a = _conv_arrays(geometry, dtype, "tanh", seed=3)
        expected = _conv_outputs(ref, a, "tanh")
        n, p, q, o = a["shape"]
        kh, kw, c, _ = a["w"].shape
        row_bytes = kh * kw * c * np.dtype(dtype).itemsize
        for rows in (1, 2, 5, 7, p * q):
            monkeypatch.setattr(nb_conv, "_CHUNK_BYTES", rows * row_bytes)
            _check_conv(_conv_outputs(nb, a, "tanh"), expected, a, dtype)
    finally:
        nb.set_num_threads(previous)


def test_conv_direct_loop_and_im2col_agree(monkeypatch):
    """A kernel with few taps runs as the direct loop; forced onto the im2col
    path (its tap-by-tap copy) it gives the same results within rounding."""
    for geometry in CONV_GEOMETRIES[:2]:
        for dtype in DTYPES:
            a = _conv_arrays(geometry, dtype, "silu", seed=5)
            direct = _conv_outputs(nb, a, "silu")
            monkeypatch.setattr(nb_conv, "_DIRECT_FWD", False)
            _check_conv(_conv_outputs(nb, a, "silu"), direct, a, dtype)
            monkeypatch.setattr(nb_conv, "_DIRECT_FWD", True)


#: (n, h, w, c, pool, stride): side by side, overlapping, with gaps, rows left
#: over; the last pool is larger than _POOL_UNROLL_MAX (the general loop)
POOL_GEOMETRIES = [(3, 8, 8, 5, (2, 2), None), (2, 9, 7, 3, (3, 2), (1, 1)),
                   (2, 11, 10, 4, (2, 3), (3, 4)), (4, 7, 9, 6, (3, 3), (2, 2)),
                   (2, 9, 10, 3, (4, 3), (2, 3))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", POOL_GEOMETRIES)
def test_pooling_parallel_path_bit_for_bit(force_parallel, geometry, dtype):
    """maxpool2d_forward on ties and NaN, and maxpool2d_backward with an exact
    derivative (relu, leaky_relu: one product), on the prange path: the
    reference's results bit for bit (the backward pass adds the windows'
    dy in the reference's order)."""
    n, h, w, c, pool, stride = geometry
    sh, sw = pool if stride is None else stride
    p, q = (h - pool[0]) // sh + 1, (w - pool[1]) // sw + 1
    rng = np.random.default_rng(9)
    x = np.round(rng.standard_normal((n, h, w, c)) * 2).astype(dtype)   # ties
    x.reshape(-1)[rng.integers(0, x.size, 7)] = np.nan
    out, argmax = np.empty((n, p, q, c), dtype), np.empty((n, p, q, c), np.int32)
    e_out, e_arg = np.empty_like(out), np.empty_like(argmax)
    nb.maxpool2d_forward(x, out, argmax, pool, stride)
    ref.maxpool2d_forward(x, e_out, e_arg, pool, stride)
    np.testing.assert_array_equal(out, e_out)
    np.testing.assert_array_equal(argmax, e_arg)
    dy = rng.standard_normal((n, p, q, c)).astype(dtype)
    z = rng.standard_normal((n, h, w, c)).astype(dtype)
    for act in ("identity", "relu", "leaky_relu"):
        y = np.empty_like(z)
        ref.activation_forward(act, z, y)
        got, expected = np.empty_like(z), np.empty_like(z)
        nb.maxpool2d_backward(dy, argmax, z, y, act, got, pool, stride)
        ref.maxpool2d_backward(dy, argmax, z, y, act, expected, pool, stride)
        np.testing.assert_array_equal(got, expected, err_msg=act)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_parallel_in_place_bit_for_bit(force_parallel, dtype):
    """Dropout on the prange path (odd length: the chunks' flat indices
    continue), in place and not, forward and backward, seeds at both ends
    of uint64 (the hash wraps) and as NumPy integers: the reference's mask and
    values bit for bit; rate 0 copies (or leaves ``out`` alone in place)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((37, 7, 11)).astype(dtype)
    for rate in (0.0, 0.1, 0.5, 0.875):
        for seed in (0, 1, 2**63, 2**64 - 1, np.uint64(2**64 - 2), np.int64(12345)):
            expected = np.empty_like(x)
            ref.dropout_forward(x, rate, int(seed), expected)
            got = np.empty_like(x)
            nb.dropout_forward(x, rate, seed, got)
            np.testing.assert_array_equal(got, expected)
            inplace = x.copy()
            nb.dropout_backward(inplace, rate, seed, inplace)
            np.testing.assert_array_equal(inplace, expected)
            assert not np.signbit(got[expected == 0]).any()


NO_ALLOCATION = textwrap.dedent(r"""
    import re
    import tracemalloc
    import numpy as np
    from numba.core.registry import CPUDispatcher
    import fastnn
    from fastnn.kernels import numba_cpu as nb
    from fastnn.kernels.numba_cpu import conv
    nb.set_num_threads(int(__import__("sys").argv[1]))
    if __import__("sys").argv[1] != "1":
        for k in nb.PARALLEL_MIN:
            nb.PARALLEL_MIN[k] = 1
    conv._CHUNK_BYTES = 1 << 16          # several chunks per call
    rng = np.random.default_rng(0)
    F = np.float32
    x1 = rng.standard_normal((8, 28, 28, 1)).astype(F)
    w1, b1 = rng.standard_normal((3, 3, 1, 32)).astype(F), np.zeros(32, F)
    y1, z1 = np.empty((8, 26, 26, 32), F), np.empty((8, 26, 26, 32), F)
    p1, a1 = np.empty((8, 13, 13, 32), F), np.empty((8, 13, 13, 32), np.int32)
    w2, b2 = rng.standard_normal((3, 3, 32, 16)).astype(F), np.zeros(16, F)
    y2, z2 = np.empty((8, 11, 11, 16), F), np.empty((8, 11, 11, 16), F)
    d2 = rng.standard_normal(y2.shape).astype(F)
    dw2, db2, dw1, db1 = np.empty_like(w2), np.empty_like(b2), np.empty_like(w1), np.empty_like(b1)
    dp1, dy1 = np.empty_like(p1), np.empty_like(y1)
    drop = np.empty_like(y2)

    def step():
        nb.conv2d_forward(x1, w1, b1, "relu", y1, z1)              # direct loop
        nb.conv2d_forward(x1, w1, b1, "gelu", y1)
        nb.maxpool2d_forward(y1, p1, a1, (2, 2))
        nb.conv2d_forward(p1, w2, b2, "relu", y2, z2, (1, 1), (1, 0, 1, 0))   # im2col
        nb.dropout_forward(y2, 0.5, 7, drop)
        nb.dropout_backward(d2, 0.5, 7, d2)
        nb.conv2d_backward(p1, d2, dw2, db2, (1, 1), (1, 0, 1, 0))
        nb.conv2d_backprop(d2, w2, None, p1, "relu", dp1, (1, 1), (1, 0, 1, 0))
        nb.maxpool2d_backward(dp1, a1, None, y1, "relu", dy1, (2, 2))
        nb.conv2d_backward(x1, dy1, dw1, db1)                       # im2col, few taps

    step()
    buffers = dict(conv._local.buffers)
    tracemalloc.start()
    step()
    step()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    same = all(conv._local.buffers[k] is v for k, v in buffers.items()) and \
        len(buffers) == len(conv._local.buffers)

    # the compiled loops that ran (fresh cache: their LLVM IR can be read)
    from fastnn.kernels.numba_cpu import _runtime, elementwise
    found = []
    def collect(obj):
        for d in (obj, getattr(obj, "run", None), getattr(obj, "par", None)):
            if isinstance(d, CPUDispatcher) and d.signatures:
                found.append(d)
    for mod in (conv, elementwise):
        for v in vars(mod).values():
            collect(v)
    for v in _runtime._built.values():
        for a in (vars(v).values() if hasattr(v, "__dict__") else [v]):
            collect(a)
    allocating = sorted({d.py_func.__name__ for d in found for sig in d.signatures
                         if re.search(r"NRT_MemInfo_alloc|NRT_Allocate",
                                      d.inspect_llvm(sig))})
    print("RESULT", peak, same, sum(v.nbytes for v in buffers.values()), len(found),
          ",".join(allocating) or "-")
""")


@pytest.mark.parametrize("threads", [1, 2])
def test_conv_kernels_allocate_nothing_after_the_first_call(tmp_path, threads):
    """A convnet's kernel calls, repeated: the workspace buffers are the
    same objects, NumPy allocates no array (tracemalloc: a few KiB of views
    and arguments, against a workspace of tens of KiB) and no compiled loop
    that ran calls numba's allocator (its LLVM IR, read in a process that
    compiled it)."""
    if threads > numba.config.NUMBA_NUM_THREADS:
        pytest.skip("one core")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", NO_ALLOCATION, str(threads)], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    peak, same, workspace, loops, allocating = proc.stdout.split("RESULT")[-1].split()
    assert same == "True"
    assert int(workspace) > 40_000
    assert int(peak) < 8_000, f"{peak} bytes traced"
    assert int(loops) >= 10
    assert allocating == "-", f"compiled loops that allocate: {allocating}"


#: Runs the cases ``kernel:act:k`` named in argv[1:] on the parallel path
#: (float32), one kernel each: the loops specialised per activation and per
#: tap count (the direct loop of a k x k kernel on one channel, im2col's
#: tap-by-tap copy of it, col2im, the pooling backward pass); prints
#: ``{case: [[what, normwise difference], ...]}``.
CONV_WORKER = textwrap.dedent(r"""
    import json, sys, zlib
    import numpy as np
    from fastnn.kernels import numba_cpu as nb, reference as ref

    assert nb.info()["numba_threads"] > 1
    for key in nb.PARALLEL_MIN:
        nb.PARALLEL_MIN[key] = 1                 # every loop on its prange path
    F = np.float32

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))

    def both(kernel, arrays, scalars, outputs):
        mine = {k: v.copy() for k, v in arrays.items()}
        theirs = {k: v.copy() for k, v in arrays.items()}
        getattr(nb, kernel)(**mine, **scalars)
        getattr(ref, kernel)(**theirs, **scalars)
        return [[f"{kernel}.{k}", rel(mine[k], theirs[k])] for k in outputs]

    report = {}
    for case in sys.argv[1:]:
        kernel, act, k = case.split(":")
        k = int(k)
        rng = np.random.default_rng(zlib.crc32(case.encode()))
        geo = dict(stride=(1, 1), padding=(0, 0, 0, 0))
        z = (rng.standard_normal((3, 9, 8, 5)) * 2).astype(F)
        y = np.empty_like(z)
        ref.activation_forward(act, z, y)
        if kernel == "forward":          # the direct loop of a k x k kernel on one channel
            x = rng.standard_normal((3, 9, 8, 1)).astype(F)
            w = rng.standard_normal((k, k, 1, 6)).astype(F)
            b = rng.standard_normal(6).astype(F)
            out = np.empty((3, 10 - k, 9 - k, 6), F)
            results = both("conv2d_forward", dict(x=x, w=w, b=b, out=out, preact=out.copy()),
                           dict(act=act, **geo), ["out", "preact"])
            results += both("conv2d_forward", dict(x=x, w=w, b=b, out=out),
                            dict(act=act, preact=None, **geo), ["out"])
        elif kernel == "backward":       # im2col tap by tap (k x k on one channel)
            x = rng.standard_normal((3, 9, 8, 1)).astype(F)
            dz = rng.standard_normal((3, 10 - k, 9 - k, 6)).astype(F)
            results = both("conv2d_backward", dict(x=x, dz=dz, dw=np.empty((k, k, 1, 6), F),
                                                   db=np.empty(6, F)), geo, ["dw", "db"])
        elif kernel == "backprop":       # col2im with the derivative
            w = rng.standard_normal((k, k, 5, 4)).astype(F)
            dz = rng.standard_normal((3, 10 - k, 9 - k, 4)).astype(F)
            results = both("conv2d_backprop", dict(dz=dz, w=w, z=z, y=y, out=np.empty_like(z)),
                           dict(act=act, **geo), ["out"])
        else:                            # the pooling backward pass with the derivative
            dy = rng.standard_normal((3, 9 // k, 8 // k, 5)).astype(F)
            argmax = rng.integers(0, k * k, dy.shape).astype(np.int32)
            results = both("maxpool2d_backward", dict(dy=dy, argmax=argmax, z=z, y=y,
                                                       out=np.empty_like(z)),
                           dict(act=act, pool=(k, k), stride=None), ["out"])
        report[case] = results
    print("REPORT" + json.dumps(report))
""")


def _no_aslr():
    """``setarch <arch> -R`` (address-space randomisation off) where it works,
    else nothing: numba names each prange loop after its object's address,
    which randomisation alone keeps apart between processes (see
    tests/test_numba_cache.py)."""
    import shutil

    setarch = shutil.which("setarch")
    if setarch is None:
        return ()
    prefix = (setarch, os.uname().machine, "-R")
    ok = subprocess.run([*prefix, sys.executable, "-c", "pass"], capture_output=True)
    return prefix if ok.returncode == 0 else ()


def _conv_shared_cache(cases, tmp_path):
    """Each case cached by a process of its own, one after the other, then all
    of them loaded by one process (address-space randomisation off where
    possible): the differences from the reference above rounding (float32:
    1e-6; a wrong variant differs by 1e-2 or more)."""
    cache = tmp_path / "numba-cache"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    env.pop("FASTNN_NUM_THREADS", None)
    prefix = _no_aslr()

    def run(names):
        proc = subprocess.run([*prefix, sys.executable, "-c", CONV_WORKER, *names], env=env,
                              capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT")][-1]
        return json.loads(line[len("REPORT"):])

    for case in cases:
        run([case])
    report = run(cases)
    assert set(report) == set(cases)
    return {case: [(what, d) for what, d in results if d > 1e-4]
            for case, results in report.items() if any(d > 1e-4 for _, d in results)}


def test_conv_shared_cache_activation_and_taps_variants(tmp_path):
    """issue 13 item 1 for the conv kernels: relu's and leaky_relu's col2im,
    the direct loops of a 3x3 and a 2x2 kernel, each cached by its own
    process, then loaded together by one: every result is the reference's."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: no parallel path")
    wrong = _conv_shared_cache(["backprop:relu:3", "backprop:leaky_relu:3",
                                "forward:relu:3", "forward:relu:2"], tmp_path)
    assert not wrong, wrong


@pytest.mark.slow
def test_conv_shared_cache_every_activation(tmp_path):
    """Every activation's conv loops (direct conv, col2im, pooling backward),
    and the direct loop and im2col of kernels of 4, 9 and 16 taps, each cached
    by its own process, loaded together by one."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: no parallel path")
    cases = [f"{kernel}:{act}:3" for kernel in ("forward", "backprop", "pool")
             for act in ref.ACTIVATIONS]
    cases += [f"{kernel}:relu:{k}" for kernel in ("forward", "backward") for k in (2, 4)]
    cases += ["backward:relu:3", "pool:relu:2"]
    wrong = _conv_shared_cache(cases, tmp_path)
    assert not wrong, wrong
