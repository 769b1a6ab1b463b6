"""Shared test settings and helpers.

Hypothesis runs with ``deadline=None`` and a bounded number of examples,
derandomized in CI (``CI`` set) so that a run is repeatable.
"""

import functools
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "fastnn", deadline=None, max_examples=12, derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("fastnn")

import fastnn  # noqa: E402

DTYPES = (np.float32, np.float64)
#: (rtol, atol) of DESIGN.md, "Rules the code keeps".
TOLERANCE = {np.dtype(np.float32): (1e-5, 1e-6), np.dtype(np.float64): (1e-12, 1e-13)}


#: Winograd F(4x4, 3x3)'s rounding, relative to the largest output: its
#: transforms multiply by up to 8 and 1/24 and add six terms, so the error
#: follows the outputs' scale rather than the sum's length (the parity
#: tolerance's ``atol`` per term). test_winograd_rounding measures it at the
#: convnet's shapes (float32: at most 6.2e-6 of the largest output).
WINO4_REL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 4e-14}


@functools.cache
def blas_rounds_rows_alike(dtype):
    """Whether the cython backend's BLAS gives a row of an 845x144 @ 144x24
    product the same bits on 1 and 2 threads and wherever the row falls (the
    rows shifted by 5). OpenBLAS's SkylakeX kernels do; its Haswell kernels
    (``OPENBLAS_CORETYPE=Haswell``, set on some machines) do not: there a
    row's rounding depends on the micro-kernel its position gives it. Tests
    that claim the same bits for a GEMM cut into other pieces (threads,
    chunks) claim them where this holds, and the GEMM's tolerance elsewhere.
    (A product of a few rows may round otherwise in either: OpenBLAS's small-
    matrix kernels.)"""
    from threadpoolctl import threadpool_limits

    from fastnn.kernels import cython_cpu as cy

    rng = np.random.default_rng(0)
    x = rng.standard_normal((845, 144)).astype(dtype)
    w = rng.standard_normal((144, 24)).astype(dtype)
    b = np.zeros(24, dtype)

    def product(start, threads):
        out = np.empty((845 - start, 24), dtype)
        with threadpool_limits(threads, user_api="blas"):
            cy.dense_forward(x[start:], w, b, "identity", out)
        return out

    product(844, 1)   # the BLAS loaded before its threads are limited
    whole = product(0, 2)
    return np.array_equal(whole, product(0, 1)) and np.array_equal(whole[5:], product(5, 2))


def tolerance(dtype, reduction=1):
    """(rtol, atol) for ``dtype``; ``atol`` scaled by the length of a sum that a
    backend may reorder."""
    rtol, atol = TOLERANCE[np.dtype(dtype)]
    return rtol, atol * max(1, reduction)


def assert_close(actual, expected, dtype, reduction=1, err_msg=""):
    rtol, atol = tolerance(dtype, reduction)
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol,
                               err_msg=err_msg)


def _backend_params():
    params = []
    for name, info in fastnn.backends().items():
        reason = info.reason or "unavailable"
        params.append(pytest.param(name, id=name, marks=pytest.mark.skipif(
            not info.available, reason=f"backend {name} unavailable: {reason}")))
    return params


#: Every backend, the unavailable ones skipped with the registry's reason.
BACKENDS = _backend_params()


@pytest.fixture(autouse=True)
def _restore_backend_default():
    """Tests that call ``set_backend`` must not leak it into other tests."""
    from fastnn import _backend

    saved = _backend._default
    yield
    _backend._default = saved


def pytest_configure(config):
    # also registered in pyproject.toml; repeated here for runs outside the tree
    config.addinivalue_line("markers", "gpu: needs a real CUDA GPU (skipped when there is none)")
    config.addinivalue_line("markers", "slow: long-running")
