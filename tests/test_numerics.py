"""Numerical behaviour every backend shares with the reference, at the edges
the parity suite's random inputs do not reach (issue 13): signed zeros,
cancellation in centered RMSprop, long float32 sums, in-place MSE.

Every backend runs through ``fastnn.ops`` under ``use_backend`` (the gate
included); the reference is checked against an independent computation
(exact sums by ``math.fsum``, a float64 recurrence).
"""

import math

import numpy as np
import pytest

import fastnn
from fastnn.kernels import reference as ref
from conftest import BACKENDS


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


# ------------------------------------------------------------ relu of signed zeros (item 10)

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_relu_of_signed_zeros_is_plus_zero(backend, dtype):
    """relu(-0.0) = relu(+0.0) = +0.0, as ``np.maximum(z, 0)``; NaN stays NaN;
    out of place and in place, and in dense_forward's epilogue."""
    z = np.array([-0.0, 0.0, -0.0, 1.5, -2.0, np.nan, -np.inf, np.inf], dtype)
    expected = np.array([0.0, 0.0, 0.0, 1.5, 0.0, np.nan, 0.0, np.inf], dtype)
    np.testing.assert_array_equal(_bits(np.maximum(z, 0)), _bits(expected))   # the reference's op
    with fastnn.use_backend(backend):
        out = np.full_like(z, 7.0)
        fastnn.ops.activation_forward("relu", z, out)
        inplace = z.copy()
        fastnn.ops.activation_forward("relu", inplace, inplace)
        # dense epilogue: x @ w is -0.0 or +0.0 (as the GEMM sums), plus -0.0
        x = np.full((3, 1), -0.0, dtype)
        w = np.ones((1, 2), dtype)
        b = np.array([-0.0, -0.0], dtype)
        dense = np.full((3, 2), 7.0, dtype)
        fastnn.ops.dense_forward(x, w, b, "relu", dense)
    np.testing.assert_array_equal(_bits(out), _bits(expected))
    np.testing.assert_array_equal(_bits(inplace), _bits(expected))
    np.testing.assert_array_equal(_bits(dense), _bits(np.zeros((3, 2), dtype)))
