"""Data-movement kernels of the numba backend: ``gather_rows``, the batch
gather of ``fit`` (rows picked by index, converted to the output's dtype in
the same pass)."""

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._runtime import PARALLEL_MIN, _Kernel, _launch

# Bytes moved (read + written) from which the rows are gathered in parallel,
# kept with the package's other thresholds (``PARALLEL_MIN``, which tests set
# to 1 to force every parallel path): the Cython backend's threshold.
PARALLEL_MIN.setdefault("gather_bytes", 1 << 23)

#: Rows prefetched ahead of the one being copied, and the bytes of each (as the
#: Cython backend's ``_cy_data``): 128 random rows of 784 uint8 from 100,000
#: into float32 took 30.5 us without, 18.3 us with (32 rows: 8.2 -> 5.3 us);
#: float32 row copies are bound by bandwidth, 54 -> 53 us (one thread, load ~11
#: on 2 cores: provisional).
AHEAD = 4
PREFETCH_BYTES = 4096


@intrinsic
def _prefetch_row(typingctx, arr, row, nbytes):
    """Prefetch (for reading, kept in every cache level) the cache lines of the
    first ``nbytes`` of ``arr[row]`` (``llvm.prefetch``, one per 64 bytes)."""
    if not isinstance(arr, types.Array) or arr.ndim != 2:
        return None

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        zero = context.get_constant(types.intp, 0)
        ptr = cgutils.get_item_pointer2(
            context, builder, ary.data, cgutils.unpack_tuple(builder, ary.shape),
            cgutils.unpack_tuple(builder, ary.strides), aryty.layout, [args[1], zero])
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        start = builder.bitcast(ptr, i8p)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
            "llvm.prefetch.p0i8")
        with cgutils.for_range_slice(builder, zero, args[2],
                                     context.get_constant(types.intp, 64)) as (at, _):
            builder.call(fn, [builder.gep(start, [at]), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(arr, types.intp, types.intp), codegen


# One module-level body, compiled per argument types (the source dtype, the
# output dtype, the index dtype, C or strided source rows): every pair gets a
# symbol and a cache entry of its own, named after those types.


def gather_rows_body(lo, hi, src, index, out):
    nbytes = min(src.shape[1] * src.itemsize, PREFETCH_BYTES)
    for i in range(lo, min(hi, lo + AHEAD)):
        _prefetch_row(src, index[i], nbytes)
    for i in range(lo, hi):
        if i + AHEAD < hi:
            _prefetch_row(src, index[i + AHEAD], nbytes)
        r = src[index[i]]
        o = out[i]
        for j in range(o.size):
            o[j] = r[j]          # numba casts as C does: astype's results


def gather_rows_bool_body(lo, hi, src, index, out):
    # src holds bool bytes read as uint8: NumPy's bool -> float is ``value != 0``
    nbytes = min(src.shape[1], PREFETCH_BYTES)
    for i in range(lo, min(hi, lo + AHEAD)):
        _prefetch_row(src, index[i], nbytes)
    for i in range(lo, hi):
        if i + AHEAD < hi:
            _prefetch_row(src, index[i + AHEAD], nbytes)
        r = src[index[i]]
        o = out[i]
        for j in range(o.size):
            o[j] = 1 if r[j] != 0 else 0


_GATHER = _Kernel(gather_rows_body, align=1)
_GATHER_BOOL = _Kernel(gather_rows_bool_body, align=1)

#: Source dtypes gathered natively (others run the reference: float16, longdouble).
_NATIVE = frozenset(np.dtype(t) for t in (
    np.bool_, np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32,
    np.uint64, np.int64, np.float32, np.float64))


def gather_rows(src, index, out):
    """Gather rows by index, converting to ``out``'s dtype: ``out[i] = src[index[i]]``.

    A row is everything after the first axis; values are converted as
    ``src.astype(out.dtype)`` converts them (bit for bit; bool gives 0 or 1).
    One loop over the rows (``prange`` from ``PARALLEL_MIN["gather_bytes"]``
    bytes read and written; the row ``AHEAD`` rows on prefetched),
    reading ``src`` at its first-axis stride. Source dtypes outside
    ``_NATIVE``, byte-swapped or misaligned ones run the NumPy reference. See
    ``fastnn.kernels.reference.gather_rows``.

    Parameters
    ----------
    src : ndarray (n, *shape), real dtype, rows C-contiguous at any stride
        IN, never written.
    index : ndarray (k,), integer dtype, values in ``[0, n)``
        IN
    out : ndarray (k, *shape), float32 or float64, C-contiguous
        OUT
    """
    dtype = src.dtype
    if dtype not in _NATIVE or not src.flags.aligned:   # also a byte-swapped dtype
        from ..reference import gather_rows as reference

        reference(src, index, out)
        return
    # one index type (the batch's few row numbers, copied only when not intp):
    # half as many specialisations to compile
    index = index.astype(np.intp, copy=False)
    k = index.shape[0]
    row = out.size // k
    # (n, row): a view, C-contiguous, or strided between rows only
    src2 = src.reshape(src.shape[0], row)
    out2 = out.reshape(k, row)
    kernel = _GATHER
    if dtype == np.bool_:
        src2, kernel = src2.view(np.uint8), _GATHER_BOOL
    row_bytes = row * (dtype.itemsize + out.itemsize)
    _launch(kernel, k, -(-PARALLEL_MIN["gather_bytes"] // row_bytes), src2, index, out2)
