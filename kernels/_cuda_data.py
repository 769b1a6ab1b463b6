"""The ``numba.cuda`` kernel of ``gather_rows`` for a source already on the device.

Imported only by ``fastnn.kernels.cuda`` once it has found numba-cuda and a GPU
(or the simulator), and only when ``gather_rows`` gets a device ``src`` (a
host ``src``, the usual case, is gathered on the host: see ``cuda.py``).
One grid-stride loop of ``BLOCK`` threads per block over the flat output:
element ``e`` of row ``i = e // row`` is ``src[index[i]*row + e - i*row]``,
converted by the assignment (the GPU's round-to-nearest conversions, as C's:
the same values as ``astype``, except that a NaN comes out as the canonical
NaN rather than with its payload's high bits). Compiled on first use for each
(source, index, output) dtype triple.
"""

import functools

import numpy as np
from numba import cuda

from ._cuda_kernels import SIMULATOR


def _quiet(fn):
    """``fn`` under ``np.errstate(all="ignore")`` (as ``_cuda_kernels._quiet``;
    defined here so that the simulator swaps this module's ``cuda``)."""
    @functools.wraps(fn)
    def quiet(*args):
        with np.errstate(all="ignore"):
            return fn(*args)
    return quiet


kernel = (lambda fn: cuda.jit(_quiet(fn))) if SIMULATOR else cuda.jit


@kernel
def gather_rows(src, index, out, row):
    """``out[e] = src[index[e // row]*row + e % row]`` (flat C-order arrays)."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for e in range(start, out.size, stride):
        i = e // row
        out[e] = src[index[i] * row + (e - i * row)]


@kernel
def gather_rows_bool(src, index, out, row):
    """:func:`gather_rows` for bool bytes read as uint8: ``value != 0``."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for e in range(start, out.size, stride):
        i = e // row
        out[e] = 1 if src[index[i] * row + (e - i * row)] != 0 else 0
