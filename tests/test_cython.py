"""Cython-backend specifics: the whole contract compiled, the vectorizable
math against NumPy over dense sweeps, serial and parallel paths, thread
counts, BLAS calls with 1-wide dimensions and read-only inputs; the
convolutions' code paths, chunks, threads, BLAS libraries and workspaces.

(The parity suite, tests/test_parity.py, runs every kernel of this backend
against the reference; these tests cover what is particular to it.)
"""

import contextlib
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastnn
from fastnn.kernels import reference as ref
from conftest import DTYPES, WINO4_REL, assert_close, blas_rounds_rows_alike, tolerance

cy = pytest.importorskip("fastnn.kernels.cython_cpu",
                         reason="the Cython extensions are not built")
from fastnn.kernels import _cy_conv, _cy_dense, _cy_elementwise, _cy_loss, _cy_optim  # noqa: E402

EXTENSIONS = (_cy_elementwise, _cy_dense, _cy_loss, _cy_optim, _cy_conv)


# ------------------------------------------------------------ the contract

def test_exports_whole_contract_compiled():
    assert cy.COMPLETE is True
    assert not hasattr(cy, "ACTIVATIONS") or set(cy.ACTIVATIONS) == set(ref.ACTIVATIONS)
    pending = getattr(cy, "PENDING", ())   # issue 16 implements the conv kernels
    for name in ref.CONTRACT:
        if name in pending:
            assert not hasattr(cy, name)
            continue
        fn = getattr(cy, name)
        assert fn is not getattr(ref, name)
        assert fn.__module__.startswith("fastnn.kernels._cy_"), (name, fn.__module__)
        assert fn.__doc__ and "``" in fn.__doc__, f"{name} needs a docstring with its formula"
    assert fastnn.backends()["cython"].fallbacks == tuple(pending)


def test_openmp_flag_and_availability():
    assert cy.OPENMP == all(ext.OPENMP for ext in EXTENSIONS)
    ok, reason = cy.available()
    assert ok
    assert ("without OpenMP" in reason) == (not cy.OPENMP)
    assert fastnn.backends()["cython"].reason == reason


# ------------------------------------------------------------ vectorizable math

def _sweep(dtype):
    """A dense float sweep: uniform over [-120, 120], log-spaced magnitudes
    from 1e-30 to 1e4 of both signs, the exp over/underflow edges, and
    non-finite values."""
    lin = np.linspace(-120, 120, 400_001)
    mag = np.geomspace(1e-30, 1e4, 100_001)
    edges = [0.0, -0.0, 88.72, 88.73, 89.0, -87.3, -103.9, -104.0, -150.0,
             709.7, 709.8, 710.0, -708.4, -745.1, -746.0, 1e30, -1e30,
             np.inf, -np.inf, np.nan]
    return np.concatenate([lin, mag, -mag, edges]).astype(dtype)


# ulp-level bounds met by the polynomial / rational forms (measured: float32
# exp 2.4e-7, tanh 1.3e-7; float64 exp, tanh ~4e-16)
MATH_RTOL = {np.float32: 4e-7, np.float64: 2e-15}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fn", ["exp", "tanh", "sigmoid"])
def test_vectorized_math_sweep(fn, dtype):
    x = _sweep(dtype)
    out = np.empty_like(x)
    _cy_elementwise._math(fn, x, out)
    with np.errstate(all="ignore"):
        if fn == "exp":
            expected = np.exp(x.astype(np.float64)).astype(dtype)
        elif fn == "tanh":
            expected = np.tanh(x.astype(np.float64)).astype(dtype)
        else:
            expected = np.empty_like(x)
            ref._sigmoid(x.astype(np.float64), expected)
    # NaN exactly where expected, same infinities and zeros
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    np.testing.assert_array_equal(out[np.isinf(expected)], expected[np.isinf(expected)])
    finite = np.isfinite(expected)
    tiny = np.finfo(dtype).tiny  # subnormal results keep only absolute accuracy
    np.testing.assert_allclose(out[finite], expected[finite], rtol=MATH_RTOL[dtype],
                               atol=tiny * 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_vectorized_math_edges(dtype):
    x = np.array([-np.inf, np.inf, np.nan, 0.0, -0.0, -1e30, 1e30, -200.0], dtype)
    out = np.empty_like(x)
    with np.errstate(all="ignore"):
        _cy_elementwise._math("exp", x, out)
        np.testing.assert_array_equal(out, [0, np.inf, np.nan, 1, 1, 0, np.inf, np.exp(dtype(-200))])
        _cy_elementwise._math("tanh", x, out)
        np.testing.assert_array_equal(out, [-1, 1, np.nan, 0, 0, -1, 1, -1])
        _cy_elementwise._math("sigmoid", x, out)
        np.testing.assert_array_equal(out[:7], [0, 1, np.nan, 0.5, 0.5, 0, 1])
    # relative accuracy in the negative tail of sigmoid (exp(-|z|) form)
    z = np.array([-20.0, -50.0, -80.0], dtype)
    _cy_elementwise._math("sigmoid", z, out[:3])
    np.testing.assert_allclose(out[:3], np.exp(z.astype(np.float64)) / (1 + np.exp(z.astype(np.float64))),
                               rtol=MATH_RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_log1p_unit(dtype):
    u = np.concatenate([np.linspace(0, 1, 100_001), np.geomspace(1e-30, 1, 10_001)]).astype(dtype)
    out = np.empty_like(u)
    _cy_elementwise._math("log1p_unit", u, out)
    expected = np.log1p(u.astype(np.float64)).astype(dtype)
    np.testing.assert_allclose(out, expected, rtol=MATH_RTOL[dtype], atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ref.ACTIVATIONS)
def test_activation_sweep_against_reference(act, dtype):
    """Every activation and derivative over the dense sweep, within the
    parity tolerance, NaN and infinities where the reference has them."""
    z = _sweep(dtype)
    y, expected_y = np.empty_like(z), np.empty_like(z)
    dz, expected_dz = np.empty_like(z), np.empty_like(z)
    dy = np.ones_like(z)
    with np.errstate(all="ignore"):
        ref.activation_forward(act, z, expected_y)
        cy.activation_forward(act, z, y)
        ref.activation_backward(act, dy, z, expected_y, expected_dz)
        cy.activation_backward(act, dy, z, expected_y, dz)
    assert_close(y, expected_y, dtype, err_msg=act)
    assert_close(dz, expected_dz, dtype, err_msg=f"{act}'")


# ------------------------------------------------------------ serial vs parallel

@pytest.fixture
def forced_threads():
    """Run with 3 threads in every extension (uneven chunks) and parallel
    thresholds set by the test; restore both afterwards."""
    saved = (_cy_elementwise._set_parallel_min(1 << 16, 1 << 13),
             _cy_dense._set_parallel_min(1 << 16, 1 << 13),
             _cy_loss._set_parallel_min(1 << 16, 1 << 13),
             _cy_optim._set_parallel_min(1 << 14))

    def set_mode(parallel):
        lo = 1 if parallel else 1 << 60
        for ext in (_cy_elementwise, _cy_dense, _cy_loss):
            ext._set_parallel_min(lo, lo)
        _cy_optim._set_parallel_min(lo)
        for ext in EXTENSIONS:
            ext.set_num_threads(3 if parallel else 1)

    yield set_mode
    _cy_elementwise._set_parallel_min(*saved[0])
    _cy_dense._set_parallel_min(*saved[1])
    _cy_loss._set_parallel_min(*saved[2])
    _cy_optim._set_parallel_min(saved[3])
    cy.set_num_threads(fastnn.get_num_threads())


def _all_kernels(dtype, rng, batch=37, n_in=29, n_out=11):
    """Run every kernel once on fixed inputs; return every output array and loss."""
    def normal(*shape):
        return rng.standard_normal(shape).astype(dtype)

    x, w, b = normal(batch, n_in), normal(n_in, n_out), normal(n_out)
    results = {}
    for act in ref.ACTIVATIONS:
        out, pre = np.empty((batch, n_out), dtype), np.empty((batch, n_out), dtype)
        cy.dense_forward(x, w, b, act, out, pre)
        results[f"dense_forward[{act}]"] = (out, pre)
        z = normal(batch, n_in) * 3
        y = np.empty_like(z)
        cy.activation_forward(act, z, y)
        d = np.empty_like(z)
        cy.activation_backward(act, np.ones_like(z), z, y, d)
        delta = np.empty((batch, n_in), dtype)
        cy.backprop_delta(normal(batch, n_out), w, z, y, act, delta)
        results[f"act[{act}]"] = (y, d, delta)
    dw, db = np.empty((n_in, n_out), dtype), np.empty(n_out, dtype)
    cy.dense_backward(x, normal(batch, n_out), dw, db)
    results["dense_backward"] = (dw, db)
    logits = normal(batch, n_out) * 5
    labels = rng.integers(0, n_out, batch)
    g = np.empty_like(logits)
    results["sce"] = (cy.softmax_cross_entropy(logits, labels, g), g.copy())
    results["bce"] = (cy.sigmoid_binary_cross_entropy(logits, rng.uniform(size=logits.shape).astype(dtype), g),
                      g.copy())
    results["mse"] = (cy.mse(logits, normal(batch, n_out), g), g.copy())
    cy.softmax(logits, g)
    results["softmax"] = (g.copy(),)
    n = batch * n_in
    p, gr, m, v, vm = normal(n), normal(n), normal(n), np.abs(normal(n)), np.abs(normal(n)) + 1
    cy.adam_step(p, gr, m, v, 3, 1e-3, 0.9, 0.999, 1e-8, 1e-2, True, 1e-3, vm)
    buf = normal(n)
    cy.sgd_step(p, gr, buf, 0.1, 0.9, True, 1e-2, 1e-3)
    sq, cm = np.abs(normal(n)) + 2, normal(n) * 0.1
    cy.rmsprop_step(p, gr, sq, buf, 1e-2, 0.99, 1e-8, 0.9, cm, 1e-2, 1e-3)
    results["optim"] = (p, m, v, vm, buf, sq, cm)
    return results


@pytest.mark.parametrize("dtype", DTYPES)
def test_serial_and_parallel_paths_agree(forced_threads, dtype):
    forced_threads(False)
    serial = _all_kernels(dtype, np.random.default_rng(7))
    forced_threads(True)
    parallel = _all_kernels(dtype, np.random.default_rng(7))
    for key, values in serial.items():
        for a, b in zip(values, parallel[key]):
            if isinstance(a, float):  # a loss: partial sums reorder
                assert_close(b, a, dtype, reduction=1000, err_msg=key)
            else:  # elementwise and per-row work: bit for bit
                np.testing.assert_array_equal(b, a, err_msg=key)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_thread_and_all_cores_agree(dtype):
    rng_seed = 11
    with fastnn.num_threads(1):
        one = _all_kernels(dtype, np.random.default_rng(rng_seed), batch=300, n_in=300, n_out=200)
    every = _all_kernels(dtype, np.random.default_rng(rng_seed), batch=300, n_in=300, n_out=200)
    for key, values in one.items():
        for a, b in zip(values, every[key]):
            # BLAS may split a GEMM's sums differently by thread count
            assert_close(b, a, dtype, reduction=300, err_msg=key)


# ------------------------------------------------------------ BLAS shapes and read-only inputs

NUMPY_BLAS_USABLE = cy._numpy_blas_addresses()[0] is not None


@contextlib.contextmanager
def _using_blas(name):
    """Route the GEMMs to one BLAS (NumPy's bundled OpenBLAS or SciPy's
    cython_blas) for the block; the process's choice is restored afterwards."""
    previous = cy.use_blas(name)
    try:
        yield
    finally:
        cy.use_blas(previous)


BLAS_NAMES = [pytest.param("numpy", marks=pytest.mark.skipif(
                  not NUMPY_BLAS_USABLE, reason="NumPy has no bundled ILP64 OpenBLAS")),
              "scipy"]


def test_blas_choice_reported():
    assert cy.blas() in ("numpy", "scipy")
    assert _cy_dense._blas_is_scipy() == (cy.blas() == "scipy")
    assert ("NumPy" in cy.info()["blas"]) == (cy.blas() == "numpy")
    if np.__config__.CONFIG["Build Dependencies"]["blas"]["name"] == "scipy-openblas":
        # the PyPI wheels: NumPy's own OpenBLAS is found and used by default
        assert cy.blas() == "numpy", cy.info()["blas"]


def test_use_blas_rejects_other_names():
    before = cy.blas()
    with pytest.raises(ValueError, match="'numpy' or 'scipy'"):
        cy.use_blas("mkl")
    with pytest.raises(ValueError, match="both addresses are needed"):
        _cy_dense._set_blas(1, 0, True)
    assert cy.blas() == before


@pytest.mark.parametrize("value, expect", [("scipy", "scipy"), ("numpy", "numpy"),
                                           ("bogus", "error")])
def test_fastnn_blas_environment(value, expect):
    import os
    import subprocess
    import sys

    env = dict(os.environ, FASTNN_BLAS=value)
    code = ("import fastnn\nb = fastnn.backends()['cython']\n"
            "if b.available:\n    from fastnn.kernels import cython_cpu as c\n    print(c.blas())\n"
            "else:\n    print('error: ' + b.reason)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    if expect == "error":
        assert out.startswith("error") and "FASTNN_BLAS" in out, out
    elif expect == "numpy" and out.startswith("error"):
        assert "NumPy's BLAS cannot be used" in out   # a NumPy without bundled OpenBLAS
    else:
        assert out == expect


def _fresh(code, **env):
    import os
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not NUMPY_BLAS_USABLE, reason="NumPy has no bundled ILP64 OpenBLAS")
def test_first_dense_call_does_not_import_scipy_linalg():
    """With NumPy's BLAS, the cython backend never imports scipy.linalg (0.14 s)."""
    out = _fresh("import sys, numpy as np, fastnn\n"
                 "x = np.ones((3, 4), np.float32); w = np.ones((4, 2), np.float32)\n"
                 "o = np.empty((3, 2), np.float32)\n"
                 "fastnn.ops.dense_forward(x, w, np.zeros(2, np.float32), 'relu', o)\n"
                 "print(fastnn.get_backend(), 'scipy.linalg' in sys.modules, o[0, 0])",
                 FASTNN_BACKEND="cython")
    assert out == "cython False 4.0"


def test_scipy_blas_loaded_late_gets_the_thread_count():
    """A thread count set before the backend loads SciPy's BLAS reaches it."""
    out = _fresh("import fastnn\nfastnn.set_num_threads(1)\n"
                 "from fastnn.kernels import cython_cpu as c\nimport threadpoolctl\n"
                 "print(c.blas(), sorted({p['num_threads'] for p in threadpoolctl.threadpool_info()}))",
                 FASTNN_BLAS="scipy")
    assert out == "scipy [1]"


def test_extension_used_alone_loads_scipy_blas():
    """The bare extension, before cython_cpu chose a BLAS, falls back to SciPy's."""
    variant = cy.CPU_VARIANT
    name = "fastnn.kernels._cy_dense" + ("" if variant == "baseline" else f"_{variant}")
    out = _fresh(f"import numpy as np, importlib\nd = importlib.import_module({name!r})\n"
                 "a = np.arange(6, dtype=np.float64).reshape(2, 3)\nc = np.empty((2, 2))\n"
                 "d._gemm(a, a.T.copy(), c)\nprint(d._blas_is_scipy(), c.tolist())")
    assert out == "True [[5.0, 14.0], [14.0, 50.0]]"


@given(batch=st.sampled_from([1, 2, 5]), n_in=st.sampled_from([1, 3, 64]),
       n_out=st.sampled_from([1, 4, 33]), dtype=st.sampled_from(DTYPES),
       act=st.sampled_from(ref.ACTIVATIONS))
@pytest.mark.parametrize("blas", BLAS_NAMES)
def test_blas_paths_with_one_wide_dimensions(blas, batch, n_in, n_out, dtype, act):
    with _using_blas(blas):
        _check_dense_kernels(batch, n_in, n_out, dtype, act)


def _check_dense_kernels(batch, n_in, n_out, dtype, act):
    rng = np.random.default_rng(batch * 100 + n_in * 10 + n_out)
    x = rng.standard_normal((batch, n_in)).astype(dtype)
    w = rng.standard_normal((n_in, n_out)).astype(dtype)
    b = rng.standard_normal(n_out).astype(dtype)
    out, expected = np.empty((batch, n_out), dtype), np.empty((batch, n_out), dtype)
    cy.dense_forward(x, w, b, act, out)
    ref.dense_forward(x, w, b, act, expected)
    assert_close(out, expected, dtype, reduction=n_in)

    dy = rng.standard_normal((batch, n_out)).astype(dtype)
    z = rng.standard_normal((batch, n_in)).astype(dtype)
    y = np.empty_like(z)
    ref.activation_forward(act, z, y)
    delta, expected = np.empty_like(z), np.empty_like(z)
    cy.backprop_delta(dy, w, z, y, act, delta)
    ref.backprop_delta(dy, w, z, y, act, expected)
    assert_close(delta, expected, dtype, reduction=n_out)

    dw, db = np.empty_like(w), np.empty_like(b)
    edw, edb = np.empty_like(w), np.empty_like(b)
    cy.dense_backward(x, dy, dw, db)
    ref.dense_backward(x, dy, edw, edb)
    assert_close(dw, edw, dtype, reduction=batch)
    assert_close(db, edb, dtype, reduction=batch)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_forward_narrow_w(dtype):
    """x @ w by our own loop where w has at most a vector of columns (16
    float32, 8 float64) and x many (the classifier after a Flatten): against
    the reference for every width up to the vector and one above (BLAS),
    batches that are not a multiple of its 8-row groups, every activation and
    a NaN in x; the same bits on 1, 2 and 3 threads and with the loop's
    threshold at its default (21,632 columns: seed 003's Dense layer)."""
    lanes = 16 if np.dtype(dtype) == np.float32 else 8
    rng = np.random.default_rng(21)
    saved_min, saved_threads = _cy_dense._set_skinny(), cy.get_num_threads()
    try:
        for k, widths, batches in ((1100, (1, 3, lanes - 1, lanes, lanes + 1), (1, 7, 8, 9, 33)),
                                   (21632, (10,), (32,))):
            for n in widths:
                for m in batches:
                    x = rng.standard_normal((m, k)).astype(dtype)
                    w = (rng.standard_normal((k, n)) * 0.03).astype(dtype)
                    b = rng.standard_normal(n).astype(dtype)
                    if m == 9:
                        x[4, 17] = np.nan
                    for act in (("identity", "relu", "gelu") if m == 9 else ("relu",)):
                        expected, ez = np.empty((m, n), dtype), np.empty((m, n), dtype)
                        ref.dense_forward(x, w, b, act, expected, ez)
                        runs = []
                        for threads, min_k in ((1, 1), (2, 1), (3, 1), (2, None)):
                            _cy_dense._set_skinny(min_k if min_k else saved_min[0], 1)
                            _cy_dense.set_num_threads(threads)
                            out, z = np.empty((m, n), dtype), np.empty((m, n), dtype)
                            cy.dense_forward(x, w, b, act, out, z)
                            runs.append((out, z))
                        for out, z in runs:
                            assert_close(z, ez, dtype, reduction=k, err_msg=f"{m}x{k}x{n}")
                            assert_close(out, expected, dtype, reduction=k,
                                         err_msg=f"{m}x{k}x{n} {act}")
                            if m == 9:
                                assert np.isnan(z[4]).all() and not np.isnan(z[3]).any()
                        if n <= lanes and (k >= saved_min[0]):
                            for out, z in runs[1:]:
                                np.testing.assert_array_equal(z, runs[0][1])
                        elif n <= lanes:
                            for out, z in runs[1:3]:
                                np.testing.assert_array_equal(z, runs[0][1])
    finally:
        _cy_dense._set_skinny(*saved_min)
        _cy_dense.set_num_threads(saved_threads)


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("dtype", DTYPES)
def test_read_only_inputs(dtype):
    rng = np.random.default_rng(3)
    x = _readonly(rng.standard_normal((8, 5)).astype(dtype))
    w = _readonly(rng.standard_normal((5, 4)).astype(dtype))
    b = _readonly(rng.standard_normal(4).astype(dtype))
    out, expected = np.empty((8, 4), dtype), np.empty((8, 4), dtype)
    cy.dense_forward(x, w, b, "gelu", out)
    ref.dense_forward(x, w, b, "gelu", expected)
    assert_close(out, expected, dtype, reduction=5)
    dy = _readonly(rng.standard_normal((8, 4)).astype(dtype))
    delta = np.empty((8, 5), dtype)
    cy.backprop_delta(dy, w, x, None, "silu", delta)
    cy.dense_backward(x, dy, np.empty((5, 4), dtype), np.empty(4, dtype))
    cy.activation_forward("tanh", x, np.empty_like(x))
    cy.activation_backward("tanh", dy, None, _readonly(np.tanh(dy)), np.empty_like(dy))
    labels = _readonly(np.array([0, 1, 2, 3, 0, 1, 2, 3], np.int16))
    cy.softmax_cross_entropy(dy, labels, np.empty_like(dy))
    cy.sigmoid_binary_cross_entropy(dy, _readonly(np.ones_like(dy)), np.empty_like(dy))
    cy.mse(dy, dy, np.empty_like(dy))
    cy.softmax(dy, np.empty_like(dy))
    g = _readonly(rng.standard_normal(40).astype(dtype))
    p = np.zeros(40, dtype)
    cy.adam_step(p, g, np.zeros_like(p), np.zeros_like(p), 1, 1e-3, 0.9, 0.999, 1e-8, 0, False, 0, None)
    cy.sgd_step(p, g, None, 0.1, 0, False, 0, 0)
    cy.rmsprop_step(p, g, np.zeros_like(p), None, 1e-2, 0.99, 1e-8, 0, None, 0, 0)
    assert np.all(np.isfinite(p))


@pytest.mark.parametrize("label_dtype", [np.int8, np.uint8, np.int16, np.uint16, np.int32,
                                         np.uint32, np.int64, np.uint64, np.intp])
def test_labels_of_any_integer_dtype(label_dtype):
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((6, 4)).astype(np.float32)
    labels = np.array([0, 3, 1, 2, 3, 0], label_dtype)
    g, eg = np.empty_like(logits), np.empty_like(logits)
    loss = cy.softmax_cross_entropy(logits, labels, g)
    expected = ref.softmax_cross_entropy(logits, labels, eg)
    assert type(loss) is float
    assert_close(loss, expected, np.float32, reduction=4)
    assert_close(g, eg, np.float32, reduction=4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_parameters_untouched_by_zero_regularization(dtype):
    """With weight_decay = l1 = 0, an inf parameter gives what the reference
    gives (no 0*inf = NaN from a term that does not apply)."""
    p = np.array([np.inf, -np.inf, 1.0, np.nan], dtype)
    g = np.array([1.0, 1.0, 1.0, 1.0], dtype)
    for kernel, args in (("sgd_step", lambda p: (p, g, None, 0.1, 0, False, 0, 0)),
                         ("adam_step", lambda p: (p, g, np.zeros_like(p), np.zeros_like(p), 1,
                                                  1e-3, 0.9, 0.999, 1e-8, 0, False, 0, None)),
                         ("rmsprop_step", lambda p: (p, g, np.zeros_like(p), None, 1e-2, 0.99,
                                                     1e-8, 0, None, 0, 0))):
        a, b = p.copy(), p.copy()
        with np.errstate(all="ignore"):
            getattr(cy, kernel)(*args(a))
            getattr(ref, kernel)(*args(b))
        np.testing.assert_array_equal(a, b, err_msg=kernel)


# ------------------------------------------------------------ convolution, pooling, dropout
#
# kernels/_cy_conv.pyx: chunked im2col GEMMs (or the register-blocked loop for
# narrow columns), per-thread workspaces, OpenMP regions whose threads run
# single-threaded GEMMs. The parity suite draws tiny geometries; these reach
# the chunk boundaries, both code paths, both BLAS libraries and the threads.


def _conv_shapes(n, h, w, c, o, kh, kw, stride, pads):
    p = (h + pads[0] + pads[1] - kh) // stride[0] + 1
    q = (w + pads[2] + pads[3] - kw) // stride[1] + 1
    return p, q


def _assert_conv_close(actual, expected, dtype, reduction, tile, err_msg, scale=None):
    """The parity tolerance; for F(4x4, 3x3) (``tile`` 4) ``atol`` at least
    ``WINO4_REL`` of ``scale``: the largest value of the convolution's own
    output (before an activation or its derivative; default: ``expected``'s)."""
    if tile != 4:
        assert_close(actual, expected, dtype, reduction=reduction, err_msg=err_msg)
        return
    rtol, atol = tolerance(dtype, reduction)
    if scale is None:
        scale = float(np.abs(expected).max(initial=0))
    atol = max(atol, WINO4_REL[np.dtype(dtype)] * scale)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol,
                               err_msg=f"{err_msg} (Winograd F(4x4, 3x3))")


def _check_conv(geometry, dtype, acts=("relu", "tanh"), seed=0, exact_forward=None):
    """The three convolution kernels of the backend against the reference on one
    geometry ``(n, h, w, c, o, kh, kw, stride, pads)``; returns the outputs."""
    n, h, w, c, o, kh, kw, stride, pads = geometry
    p, q = _conv_shapes(*geometry)
    tile_fwd, tile_back = _cy_conv._winograd_tiles((n, h, w, c), (kh, kw, c, o), stride, pads)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h, w, c)).astype(dtype)
    k = rng.standard_normal((kh, kw, c, o)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype)
    results = {}
    for act in acts:
        out, z, eout, ez = (np.empty((n, p, q, o), dtype) for _ in range(4))
        cy.conv2d_forward(x, k, b, act, out, z, stride, pads)
        ref.conv2d_forward(x, k, b, act, eout, ez, stride, pads)
        _assert_conv_close(z, ez, dtype, kh * kw * c, tile_fwd, f"forward z {geometry}")
        _assert_conv_close(out, eout, dtype, kh * kw * c, tile_fwd, f"forward {act} {geometry}",
                           scale=float(np.abs(ez).max(initial=0)))
        alone = np.empty_like(out)          # without preact: the same values
        cy.conv2d_forward(x, k, b, act, alone, None, stride, pads)
        np.testing.assert_array_equal(alone, out)
        results[f"forward[{act}]"] = out
    dz = rng.standard_normal((n, p, q, o)).astype(dtype)
    dw, db, edw, edb = np.empty_like(k), np.empty_like(b), np.empty_like(k), np.empty_like(b)
    cy.conv2d_backward(x, dz, dw, db, stride, pads)
    ref.conv2d_backward(x, dz, edw, edb, stride, pads)
    _assert_conv_close(dw, edw, dtype, n * p * q, tile_fwd, f"dw {geometry}")
    _assert_conv_close(db, edb, dtype, n * p * q, tile_fwd, f"db {geometry}")
    results["dw"], results["db"] = dw, db
    plain = np.empty_like(x)        # the delta before the derivative: F(4x4)'s scale
    ref.conv2d_backprop(dz, k, None, x, "identity", plain, stride, pads)
    for act in acts:
        zb = rng.standard_normal((n, h, w, c)).astype(dtype)
        yb = np.empty_like(zb)
        ref.activation_forward(act, zb, yb)
        dx, edx = np.empty_like(x), np.empty_like(x)
        cy.conv2d_backprop(dz, k, zb, yb, act, dx, stride, pads)
        ref.conv2d_backprop(dz, k, zb, yb, act, edx, stride, pads)
        _assert_conv_close(dx, edx, dtype, kh * kw * o, tile_back, f"backprop {act} {geometry}",
                           scale=float(np.abs(plain).max(initial=0)))
        results[f"backprop[{act}]"] = dx
    return results


@contextlib.contextmanager
def _conv_settings(threads=None, par_min=None, chunk_bytes=None, direct_max_k=None,
                   winograd=None, winograd_chunk_bytes=None, dw_units=None, tile=None):
    """Thread count, parallel thresholds and tuning of ``_cy_conv`` for the block
    (``winograd``: True for every 3x3 stride-1 kernel, False for none, None
    for the default; ``tile``: its output tiles, 2 or 4, None for the default
    choice by the output's size)."""
    saved_min = _cy_conv._set_parallel_min(*par_min) if par_min else None
    saved_tuning = _cy_conv._set_tuning(
        chunk_bytes, direct_max_k, None if winograd is None else (1 if winograd else 10**9),
        winograd_chunk_bytes, dw_units, tile)
    if threads is not None:
        _cy_conv.set_num_threads(threads)
    try:
        yield
    finally:
        if saved_min:
            _cy_conv._set_parallel_min(*saved_min)
        _cy_conv._set_tuning(*saved_tuning)
        _cy_conv.set_num_threads(cy.get_num_threads())


#: (n, h, w, c, o, kh, kw, stride, pads): the convnet's two convolutions, a 1x1
#: kernel (the columns are x itself) and one with a stride (columns needed),
#: asymmetric pads with strides, a kernel as large as the padded input, wide
#: channels, a 5x5 kernel with K above the register-blocked limit.
CONV_GEOMETRIES = [
    (3, 28, 28, 1, 32, 3, 3, (1, 1), (0, 0, 0, 0)),
    (2, 13, 13, 32, 64, 3, 3, (1, 1), (0, 0, 0, 0)),
    (2, 7, 9, 5, 20, 1, 1, (1, 1), (0, 0, 0, 0)),
    (2, 7, 9, 5, 20, 1, 1, (2, 3), (0, 0, 0, 0)),
    (3, 11, 10, 4, 17, 3, 2, (2, 1), (1, 2, 0, 1)),
    (2, 9, 8, 3, 5, 4, 3, (3, 2), (3, 0, 2, 1)),
    (2, 5, 6, 2, 3, 6, 6, (1, 1), (1, 0, 0, 0)),
    (1, 12, 12, 40, 48, 3, 3, (1, 1), (1, 1, 1, 1)),
    (2, 12, 10, 3, 16, 5, 5, (1, 2), (2, 2, 2, 2)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", CONV_GEOMETRIES, ids=lambda g: "x".join(map(str, g[:7])))
def test_conv_geometries_every_code_path(geometry, dtype):
    """Every geometry through the im2col GEMM path, the register-blocked loop
    (forward pass and dw, whatever K = kh*kw*c) and, for 3x3 kernels at stride
    1, Winograd (whatever the channel counts)."""
    with _conv_settings(direct_max_k=0, winograd=False):
        _check_conv(geometry, dtype)
    with _conv_settings(direct_max_k=10**6, winograd=False):
        _check_conv(geometry, dtype)
    for tile in (2, 4):
        with _conv_settings(winograd=True, tile=tile):
            _check_conv(geometry, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blas", BLAS_NAMES)
def test_conv_on_both_blas_libraries(blas, dtype):
    with _using_blas(blas):
        for geometry in CONV_GEOMETRIES[:5]:
            _check_conv(geometry, dtype, acts=("relu",))
        # and on the parallel path, whose GEMMs run on one BLAS thread each
        with _conv_settings(threads=2, par_min=(1, 1)):
            _check_conv(CONV_GEOMETRIES[1], dtype, acts=("relu",))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_bytes", [1, 1000, 40_000])
@pytest.mark.parametrize("path", ["gemm", "direct", "winograd", "winograd2"])
def test_conv_chunk_boundaries(chunk_bytes, path, dtype):
    """Chunks of 8 rows or tiles (the least), of a few more than a multiple of
    8, and of several images; rows n*p*q (tiles) not a multiple of the chunk;
    batch 1; an image bigger than a chunk (conv2d_backprop completes an image
    across chunks); odd output sizes (Winograd's last tiles hang over);
    output rows shorter than the 8-pixel groups of the register-blocked loop;
    on one thread and on three (uneven ranges)."""
    geometries = [(1, 31, 29, 3, 16, 3, 3, (1, 1), (1, 1, 1, 1)),
                  (5, 13, 13, 2, 7, 3, 3, (1, 1), (0, 0, 0, 0)),
                  (2, 8, 6, 3, 5, 3, 3, (1, 1), (2, 0, 0, 1)),
                  (3, 10, 11, 6, 9, 2, 2, (2, 2), (1, 0, 1, 0))]
    for threads in (1, 3):
        with _conv_settings(threads=threads, par_min=(1, 1), chunk_bytes=chunk_bytes,
                            direct_max_k=10**6 if path == "direct" else 0,
                            winograd=path.startswith("winograd"),
                            winograd_chunk_bytes=chunk_bytes,
                            tile=2 if path == "winograd2" else None):
            for geometry in geometries:
                _check_conv(geometry, dtype, acts=("relu",))


#: The largest float32 error of Winograd at conv2's shapes, as a multiple of
#: the im2col GEMM's (both against float64, relative to the largest output):
#: measured F(2x2, 3x3) forward 0.35-0.55x, dw 1.0-1.6x, delta 1.4-2.0x;
#: F(4x4, 3x3) forward 3.3-7.3x, dw 5.2-16.5x (a unit of dw's sum spans up
#: to 128 tiles), delta (the forward pass's adjoint) 6.3-8.4x with OpenBLAS's
#: SkylakeX kernels and 8.4-22.6x with its Haswell kernels
#: (``OPENBLAS_CORETYPE=Haswell``: the delta's error 1.3-2.6x larger, im2col's
#: the same). The bounds leave 1.5-2x over that.
WINOGRAD_ROUNDING = {2: {"forward": 3, "dw": 3, "dx": 3},
                     4: {"forward": 12, "dw": 24, "dx": 36}}
#: ... and relative to the largest output: F(4x4, 3x3) measured at most 6.2e-6
WINOGRAD_ROUNDING_MAX = {2: 1e-6, 4: 1e-5}


def test_winograd_tile_choice():
    """F(4x4, 3x3) where its products (with the tiles that hang over) are at most
    0.8x F(2x2)'s: the forward pass by the output's size, the delta (the
    forward pass's adjoint against F(2x2) on the input's size) by both; no
    Winograd under 16 channels; a tile other than 0, 2, 4 is refused."""
    with _conv_settings():
        assert _cy_conv._winograd_tiles((2, 13, 13, 32), (3, 3, 32, 64)) == (4, 4)
        assert _cy_conv._winograd_tiles((2, 7, 7, 16), (3, 3, 16, 16)) == (2, 4)
        assert _cy_conv._winograd_tiles((2, 5, 5, 16), (3, 3, 16, 16), (1, 1),
                                        (1, 1, 1, 1)) == (2, 2)
        assert _cy_conv._winograd_tiles((2, 13, 13, 8), (3, 3, 8, 64)) == (0, 0)
        assert _cy_conv._winograd_tiles((2, 13, 13, 32), (3, 3, 32, 64), (2, 2)) == (0, 0)
    with _conv_settings(tile=2):
        assert _cy_conv._winograd_tiles((2, 13, 13, 32), (3, 3, 32, 64)) == (2, 2)
    before = _cy_conv._set_tuning()
    with pytest.raises(ValueError, match="winograd_tile"):
        _cy_conv._set_tuning(winograd_tile=3)
    assert _cy_conv._set_tuning() == before


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("scale", ["uniform", "signed", "wide"])
def test_winograd_rounding(scale, tile):
    """What Winograd's transforms cost in float32, at the convnet's conv2 shapes
    (batch 8 and 32): against the float64 result, its largest error (relative
    to the largest output) stays within ``WINOGRAD_ROUNDING`` times the
    im2col GEMM's and within ``WINOGRAD_ROUNDING_MAX`` of the largest output;
    at batch 8 within the parity tolerance too, except F(4x4, 3x3) on the
    data over six decades (outputs in the hundreds, where the parity
    tolerance's absolute part is a relative 1e-6; im2col misses it too at
    batch 32): there, 1e-5 of the largest output."""
    rng = np.random.default_rng({"uniform": 1, "signed": 2, "wide": 3}[scale])
    for n in (8, 32):
        if scale == "uniform":      # a pooled ReLU output
            x = rng.random((n, 13, 13, 32))
        elif scale == "signed":
            x = rng.standard_normal((n, 13, 13, 32))
        else:                       # magnitudes over six decades
            x = (rng.standard_normal((n, 13, 13, 32))
                 * 10.0 ** rng.uniform(-3, 3, (n, 13, 13, 32)))
        w = rng.standard_normal((3, 3, 32, 64)) * 0.06
        b = rng.standard_normal(64) * 0.1
        dz = rng.standard_normal((n, 11, 11, 64)) * 1e-2
        exact = {}
        exact["forward"] = np.empty((n, 11, 11, 64))
        ref.conv2d_forward(x, w, b, "identity", exact["forward"])
        exact["dw"], exact["db"] = np.empty_like(w), np.empty(64)
        ref.conv2d_backward(x, dz, exact["dw"], exact["db"])
        exact["dx"] = np.empty_like(x)
        ref.conv2d_backprop(dz, w, None, x, "identity", exact["dx"])
        f = np.float32
        xf, wf, bf, dzf = x.astype(f), w.astype(f), b.astype(f), dz.astype(f)
        errors = {}
        for winograd in (False, True):
            with _conv_settings(winograd=winograd, tile=tile):
                assert _cy_conv._winograd_tiles(xf.shape, wf.shape) == ((tile, tile) if winograd
                                                                       else (0, 0))
                got = {"forward": np.empty((n, 11, 11, 64), f), "dw": np.empty_like(wf),
                       "db": np.empty(64, f), "dx": np.empty_like(xf)}
                cy.conv2d_forward(xf, wf, bf, "identity", got["forward"])
                cy.conv2d_backward(xf, dzf, got["dw"], got["db"])
                cy.conv2d_backprop(dzf, wf, None, xf, "identity", got["dx"])
            for key in ("forward", "dw", "dx"):
                errors[winograd, key] = (np.abs(got[key] - exact[key]).max()
                                         / np.abs(exact[key]).max())
                reduction = {"forward": 288, "dw": n * 121, "dx": 576}[key]
                # the parity tolerance at batch 8 (at 32 the wide data's extremes pass
                # im2col's too); F(4x4) only at unit scale (see WINO4_REL)
                if n == 8 and (tile == 2 or not winograd or scale != "wide"):
                    assert_close(got[key], exact[key].astype(f), f, reduction=reduction,
                                 err_msg=f"winograd={winograd} tile={tile} {key}")
        for key in ("forward", "dw", "dx"):
            assert errors[True, key] <= (WINOGRAD_ROUNDING[tile][key] * errors[False, key]
                                         + 1e-7), (n, key, errors)
            assert errors[True, key] <= WINOGRAD_ROUNDING_MAX[tile], (n, key, errors)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_big_image(dtype):
    """One 96x96x8 image (a column matrix of 9,216 rows, far more than a chunk)."""
    _check_conv((1, 96, 96, 8, 16, 3, 3, (1, 1), (1, 1, 1, 1)), dtype, acts=("relu",))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["gemm", "direct", "winograd", "winograd2"])
def test_conv_serial_and_parallel_paths(path, dtype):
    """Two and three threads (uneven shares, handed out as threads come free)
    against one. The forward pass, the delta below, pooling and dropout work
    per row or tile; dw and db are summed in units whose number does not
    depend on the threads, then added in unit order: bit for bit where the
    BLAS rounds a row alike wherever it falls and on any thread count
    (``blas_rounds_rows_alike``: OpenBLAS's SkylakeX kernels, not its Haswell
    ones), else what goes through a GEMM within the GEMM's tolerance. The
    im2col forward pass and delta (one GEMM per chunk) may round a row by
    where it falls in a chunk in any BLAS (chunks of a few rows take
    OpenBLAS's small-matrix kernels)."""
    geometry = (5, 13, 13, 16, 24, 3, 3, (1, 1), (1, 1, 1, 1))
    settings = {"gemm": dict(direct_max_k=0, winograd=False),
                "direct": dict(direct_max_k=10**6, winograd=False),
                "winograd": dict(winograd=True),            # F(4x4, 3x3) at 13x13
                "winograd2": dict(winograd=True, tile=2)}[path]
    # what goes through a GEMM, and the length of its sums
    by_gemm = {"forward": 144, "backprop": 216, "dw": 845}
    if path == "direct":
        by_gemm = {"backprop": 216}   # the delta below; the forward pass and dw are loops
    exact_gemm = blas_rounds_rows_alike(dtype)
    with _conv_settings(threads=1, **settings):
        serial = _check_conv(geometry, dtype, acts=("relu", "gelu"), seed=4)
    for threads in (2, 3):
        with _conv_settings(threads=threads, par_min=(1, 1), **settings):
            parallel = _check_conv(geometry, dtype, acts=("relu", "gelu"), seed=4)
        for key, value in serial.items():
            reduction = by_gemm.get(key.split("[")[0])
            if reduction and (not exact_gemm or (path == "gemm" and key != "dw")):
                assert_close(parallel[key], value, dtype, reduction=reduction,
                             err_msg=f"{key} {threads}")
            else:
                np.testing.assert_array_equal(parallel[key], value, err_msg=f"{key} {threads}")
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 14, 15, 6)).astype(dtype)
    dy_over = rng.standard_normal((3, 6, 7, 6)).astype(dtype)
    am_over = rng.integers(0, 9, (3, 6, 7, 6)).astype(np.int32)
    pooled = {}
    for threads, par_min in ((1, None), (3, (1, 1))):
        with _conv_settings(threads=threads, par_min=par_min):
            out, am = np.empty((3, 7, 7, 6), dtype), np.empty((3, 7, 7, 6), np.int32)
            cy.maxpool2d_forward(x, out, am, (2, 2))
            back = np.empty_like(x)
            cy.maxpool2d_backward(out, am, None, x, "relu", back, (2, 2))
            over = np.empty_like(x)
            cy.maxpool2d_backward(dy_over, am_over, None, x, "relu", over, (3, 3), (2, 2))
            drop = np.empty_like(x)
            cy.dropout_forward(x, 0.3, 99, drop)
            pooled[threads] = (out, am, back, over, drop)
    for a, b in zip(pooled[1], pooled[3]):
        np.testing.assert_array_equal(a, b)


def test_blas_thread_count_restored_after_parallel_regions():
    """The parallel path sets OpenBLAS to one thread for its region and back."""
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads():
        return sorted(p["num_threads"] for p in threadpoolctl.threadpool_info()
                      if p["internal_api"] == "openblas")

    before = blas_threads()
    with _conv_settings(threads=2, par_min=(1, 1)):
        _check_conv(CONV_GEOMETRIES[1], np.float32, acts=("relu",))
    assert blas_threads() == before


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_from_several_python_threads(dtype):
    """Each calling thread has its own workspace: concurrent calls of
    different sizes give the reference's results."""
    import threading

    errors = []

    def work(geometry, seed):
        try:
            for _ in range(3):
                _check_conv(geometry, dtype, acts=("relu",), seed=seed)
        except Exception as exc:        # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(g, i))
               for i, g in enumerate(CONV_GEOMETRIES[:4])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backward", [False, True])
def test_dropout_in_place_and_parallel(backward, dtype):
    """In place (out is x) and into another array, serial and on three threads:
    the reference's mask and rounding bit for bit, and the kept fraction."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((300, 1001)).astype(dtype)
    kernel = "dropout_backward" if backward else "dropout_forward"
    expected = np.empty_like(x)
    getattr(ref, kernel)(x, 0.25, 2**63 + 5, expected)
    for threads, par_min in ((1, None), (3, (1, 1))):
        with _conv_settings(threads=threads, par_min=par_min):
            got = x.copy()
            getattr(cy, kernel)(got, 0.25, 2**63 + 5, got)
            np.testing.assert_array_equal(got, expected)
            other = np.empty_like(x)
            getattr(cy, kernel)(x, 0.25, 2**63 + 5, other)
            np.testing.assert_array_equal(other, expected)
    kept = np.count_nonzero(expected) / x.size
    assert abs(kept - 0.75) < 4 * np.sqrt(0.75 * 0.25 / x.size)


def _traced_peak(fn):
    """Peak bytes traced by tracemalloc while ``fn()`` runs."""
    import tracemalloc

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("threads", [1, 2])
def test_no_allocation_after_the_first_call(threads):
    """After a first call at a size, the workspace is reused: a second call
    allocates no array (a few hundred bytes of argument handling at most,
    where the workspace alone is hundreds of kilobytes)."""
    rng = np.random.default_rng(2)
    f = np.float32
    x = rng.standard_normal((16, 13, 13, 32)).astype(f)
    w = rng.standard_normal((3, 3, 32, 64)).astype(f)
    b = np.zeros(64, f)
    y, z, dz = (np.empty((16, 11, 11, 64), f) for _ in range(3))
    dz[...] = 1
    x1 = rng.standard_normal((16, 28, 28, 1)).astype(f)
    w1 = rng.standard_normal((3, 3, 1, 32)).astype(f)
    y1 = np.empty((16, 26, 26, 32), f)
    dw, db, dw1, db1, dx = np.empty_like(w), np.empty_like(b), np.empty_like(w1), \
        np.empty(32, f), np.empty_like(x)
    pooled, am = np.empty((16, 5, 5, 64), f), np.empty((16, 5, 5, 64), np.int32)
    back = np.empty_like(y)
    drop = np.empty((16, 1600), f)
    calls = [
        lambda: cy.conv2d_forward(x, w, b, "relu", y, z, (1, 1), (0, 0, 0, 0)),
        lambda: cy.conv2d_forward(x1, w1, b[:32], "relu", y1, None, (1, 1), (0, 0, 0, 0)),
        lambda: cy.conv2d_backward(x, dz, dw, db, (1, 1), (0, 0, 0, 0)),
        lambda: cy.conv2d_backward(x1, y1, dw1, db1, (1, 1), (0, 0, 0, 0)),
        lambda: cy.conv2d_backprop(dz, w, None, x, "relu", dx, (1, 1), (0, 0, 0, 0)),
        lambda: cy.maxpool2d_forward(y, pooled, am, (2, 2), None),
        lambda: cy.maxpool2d_backward(pooled, am, None, y, "relu", back, (2, 2), None),
        lambda: cy.dropout_forward(pooled.reshape(16, -1), 0.5, 3, drop),
    ]
    with _conv_settings(threads=threads, par_min=(1, 1) if threads > 1 else None):
        for call in calls:
            call()      # the first call at this size may grow the workspace
        for call in calls:
            assert _traced_peak(call) < 2048, call


# ------------------------------------------------------------ OpenBLAS' idle workers

def test_elf_symbols_of_a_file_that_is_no_elf(tmp_path):
    path = tmp_path / "not_elf.so"
    path.write_bytes(b"MZ" + b"\0" * 100)
    assert cy._elf_symbols(str(path), ["thread_timeout"]) == {}
    assert cy._thread_timeout_address(str(path), "sgemm_", 12345) == 0


@pytest.mark.skipif(not NUMPY_BLAS_USABLE or not sys.platform.startswith("linux"),
                    reason="NumPy's bundled OpenBLAS on Linux")
@pytest.mark.parametrize("blas", ["numpy", "scipy"])
def test_openblas_in_a_region_one_thread_workers_asleep_and_restored(blas):
    """Inside a parallel region the BLAS runs on one thread and OpenBLAS'
    thread_timeout (found in the library's symbol table) is 16 cycles, so a
    worker spinning after a GEMM goes to sleep at its next check; both are as
    before afterwards."""
    import ctypes

    with _using_blas(blas), fastnn.num_threads(2):
        threads, timeout = _cy_conv._region_probe()
        address = cy._TIMEOUTS.get(blas, 0)
        assert address, f"thread_timeout not found in {blas}'s OpenBLAS"
        after = ctypes.c_uint.from_address(address).value
        assert (threads, timeout) == (1, 16)
        assert after >= 1 << 4 and after & (after - 1) == 0 and after != 16
        assert _cy_conv._region_probe() == (1, 16)
        assert ctypes.c_uint.from_address(address).value == after


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pool, stride", [((2, 2), None), ((3, 3), (2, 2)), ((2, 3), (3, 1)),
                                          ((9, 8), (1, 1))])
def test_pooling_vector_lanes_ties_and_nan(pool, stride, dtype):
    """37 channels (two vectors of 16 and a scalar tail), few distinct values
    (ties everywhere), NaN and inf: the reference's maxima, first indices and
    gradients bit for bit, with the ReLU below and with gelu (which goes
    through the separate derivative pass); a window of 72 elements takes the
    loop for windows of more than 64."""
    rng = np.random.default_rng(9)
    n, h, w, c = 2, 11, 10, 37
    x = np.round(rng.standard_normal((n, h, w, c)) * 1.5).astype(dtype)
    flat = x.reshape(-1)
    flat[rng.integers(0, flat.size, 40)] = np.nan
    flat[rng.integers(0, flat.size, 40)] = np.inf
    sh, sw = pool if stride is None else stride
    p, q = (h - pool[0]) // sh + 1, (w - pool[1]) // sw + 1
    out, am, eout, eam = (np.empty((n, p, q, c), t) for t in (dtype, np.int32, dtype, np.int32))
    cy.maxpool2d_forward(x, out, am, pool, stride)
    ref.maxpool2d_forward(x, eout, eam, pool, stride)
    np.testing.assert_array_equal(out, eout)
    np.testing.assert_array_equal(np.signbit(out), np.signbit(eout))
    np.testing.assert_array_equal(am, eam)
    dy = rng.standard_normal((n, p, q, c)).astype(dtype)
    dy.reshape(-1)[::7] = -0.0
    for act in ("relu", "identity", "gelu"):
        z = rng.standard_normal((n, h, w, c)).astype(dtype)
        y = np.empty_like(z)
        ref.activation_forward(act, z, y)
        got, expected = np.empty_like(x), np.empty_like(x)
        cy.maxpool2d_backward(dy, am, z, y, act, got, pool, stride)
        ref.maxpool2d_backward(dy, eam, z, y, act, expected, pool, stride)
        if act == "gelu":
            assert_close(got, expected, dtype, reduction=pool[0] * pool[1], err_msg=act)
        else:
            np.testing.assert_array_equal(got, expected, err_msg=act)
            np.testing.assert_array_equal(np.signbit(got), np.signbit(expected), err_msg=act)
