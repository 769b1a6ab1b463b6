"""Large inputs: an elementwise kernel in place on a float32 array of more than
2^31 elements (8.6 GB), so that an index or a size held in 32 bits anywhere on
the path (the gate, the chunking of the parallel loop, the loop itself) shows
as a wrong or untouched tail, or as a crash.

The array holds ``v[i] = ((i % 4099) - 2049) / 256`` (exact in float32); the
cython and then the numba backend apply ``sigmoid`` in place, and after each
pass sampled positions at both ends, around 2^31 and at random are checked
against the reference applied to the formula (once, then twice).

Slow (filling 8.6 GB and two passes: ~15-40 s) and memory-hungry: skipped
unless ~12 GiB are available.
"""

import gc
import os

import numpy as np
import pytest

import fastnn
from fastnn.kernels import reference as ref
from conftest import assert_close

N = (1 << 31) + (1 << 20) + 7          # 8.594 GB of float32; an odd tail for the last chunk
PERIOD = 4099
NEED_BYTES = 12 << 30


def _available_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _formula(idx):
    return (((idx % PERIOD) - 2049) / 256).astype(np.float32)


def _sample_positions(rng):
    edge = 1 << 16
    return np.unique(np.concatenate([
        np.arange(0, edge),                                   # the head
        np.arange((1 << 31) - edge, (1 << 31) + edge),        # around 2^31
        np.arange((1 << 32) - 4, (1 << 32) + 4) % N,          # (wrap of a 32-bit unsigned)
        np.arange(N - edge, N),                               # the tail
        rng.integers(0, N, 4096),                             # anywhere
    ]).astype(np.int64))


BACKENDS = [b for b in ("cython", "numba") if fastnn.backends()[b].available]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(np.intp(0).itemsize < 8, reason="needs a 64-bit platform"),
    pytest.mark.skipif(_available_bytes() < NEED_BYTES,
                       reason=f"needs ~{NEED_BYTES >> 30} GiB of available memory, "
                              f"{_available_bytes() / 2**30:.1f} GiB available"),
    pytest.mark.skipif(not BACKENDS, reason="neither the cython nor the numba backend is available"),
]


@pytest.fixture(scope="module")
def huge():
    """The 8.6 GB array, filled with the formula in 1 M-element chunks; freed
    at the end of the module."""
    a = np.empty(N, np.float32)
    chunk = PERIOD * 256                 # a multiple of the period: one template (4 MB)
    template = _formula(np.arange(chunk, dtype=np.int64))
    for start in range(0, N, chunk):
        stop = min(N, start + chunk)
        a[start:stop] = template[:stop - start]
    yield a
    del a
    gc.collect()


def test_sigmoid_in_place_beyond_2_31_elements(huge):
    assert huge.size > 2**31
    pos = _sample_positions(np.random.default_rng(0))
    values = _formula(pos)
    np.testing.assert_array_equal(huge[pos], values)      # the fill itself
    expected = values.copy()
    for backend in BACKENDS:
        with fastnn.use_backend(backend):
            fastnn.ops.activation_forward("sigmoid", huge, huge)
        ref.activation_forward("sigmoid", expected, expected)
        got = huge[pos]
        assert_close(got, expected, np.float32, err_msg=f"{backend}: sampled positions")
        # the tail: a 32-bit loop bound would leave it untouched (or wrap into the head)
        assert_close(huge[-1000:], expected[-1000:], np.float32, err_msg=f"{backend}: tail")
