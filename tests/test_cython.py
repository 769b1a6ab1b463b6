"""Cython-backend specifics: the whole contract compiled, the vectorizable
math against NumPy over dense sweeps, serial and parallel paths, thread
counts, BLAS calls with 1-wide dimensions and read-only inputs.

(The parity suite, tests/test_parity.py, runs every kernel of this backend
against the reference; these tests cover what is particular to it.)
"""

import contextlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastnn
from fastnn.kernels import reference as ref
from conftest import DTYPES, assert_close

cy = pytest.importorskip("fastnn.kernels.cython_cpu",
                         reason="the Cython extensions are not built")
from fastnn.kernels import _cy_dense, _cy_elementwise, _cy_loss, _cy_optim  # noqa: E402

EXTENSIONS = (_cy_elementwise, _cy_dense, _cy_loss, _cy_optim)


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
