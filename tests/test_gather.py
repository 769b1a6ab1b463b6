"""``gather_rows`` (issue 17): the batch gather of ``fit``, on every CPU backend.

The parity suite compares every backend with the reference on random calls
(tests/test_parity.py) and the gate's errors are in tests/test_validate.py;
here: the reference against an independent element-by-element conversion,
the caller's arrays unchanged byte for byte (a read-only memmap from
``np.load(mmap_mode="r")`` too), the parallel paths forced on, the paths that
fall back to the reference, and row numbers past 2**31. The cuda backend's
device paths are in tests/test_cuda.py (run on the simulator).
"""

import contextlib

import numpy as np
import pytest

import fastnn
from fastnn.kernels import reference as ref

CPU = [name for name, info in fastnn.backends().items() if name != "cuda" and info.available]
OUT_DTYPES = (np.float32, np.float64)
SOURCES = (np.bool_, np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64,
           np.int64, np.float16, np.float32, np.float64, np.longdouble)


def _bits(a):
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


def _source(rng, shape, dtype):
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 256, shape).astype(np.uint8).view(np.bool_)   # any byte
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        a = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
        a.flat[:2] = [info.min, info.max]
        return a
    with np.errstate(all="ignore"):
        a = (rng.standard_normal(shape) * rng.choice([1e-300, 1e-40, 1.0, 1e30, 1e300], shape))
        a = a.astype(dtype)
        a.flat[:5] = [np.nan, np.inf, -np.inf, -0.0, 5e-324]
    return a


@contextlib.contextmanager
def _parallel(backend):
    """The backend's gather on its parallel path: two threads, threshold 1 byte."""
    if backend == "cython":
        from fastnn.kernels import cython_cpu

        mod = cython_cpu._cy_data
        old = mod._set_parallel_min(1)
        mod.set_num_threads(2)
        try:
            yield
        finally:
            mod._set_parallel_min(old)
            mod.set_num_threads(fastnn.get_num_threads())
    elif backend == "numba":
        from fastnn.kernels import numba_cpu as nb

        old = nb.PARALLEL_MIN["gather_bytes"]
        nb.PARALLEL_MIN["gather_bytes"] = 1
        nb.set_num_threads(2)
        try:
            yield
        finally:
            nb.PARALLEL_MIN["gather_bytes"] = old
            nb.set_num_threads(fastnn.get_num_threads())
    else:
        yield


# ------------------------------------------------------------------ the reference

@pytest.mark.parametrize("src_dtype", SOURCES)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_reference_converts_as_scalars_do(src_dtype, out_dtype):
    """Against an independent check: each element converted on its own by
    NumPy's scalar constructor (``np.float32(v)``), bool as ``v != 0``."""
    rng = np.random.default_rng(0)
    src = _source(rng, (9, 2, 3), src_dtype)
    index = np.array([8, 0, 8, 3, 3, 1])
    out = np.empty((6, 2, 3), out_dtype)
    with np.errstate(all="ignore"):
        ref.gather_rows(src, index, out)
        for i, row in enumerate(index):
            for j, v in enumerate(src[row].reshape(-1)):
                want = out_dtype(bool(v)) if src.dtype == np.bool_ else out_dtype(v)
                got = out[i].reshape(-1)[j]
                assert got.tobytes() == want.tobytes() or (np.isnan(got) and np.isnan(want)), \
                    (i, j, v, got, want)


def test_reference_chunks_a_converting_gather(monkeypatch):
    """Past ``_GATHER_CHUNK_BYTES`` of source rows the gather runs in steps;
    the result is the same."""
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, (50, 7), dtype=np.uint8)
    index = rng.integers(0, 50, 40)
    whole = np.empty((40, 7), np.float32)
    ref.gather_rows(src, index, whole)
    monkeypatch.setattr(ref, "_GATHER_CHUNK_BYTES", 20)     # 2 rows a step
    steps = np.empty((40, 7), np.float32)
    ref.gather_rows(src, index, steps)
    np.testing.assert_array_equal(steps, whole)
    np.testing.assert_array_equal(whole, src[index].astype(np.float32))


# ------------------------------------------------------------------ every CPU backend

@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("src_dtype", SOURCES)
def test_backends_equal_the_reference_bit_for_bit(backend, parallel, src_dtype):
    rng = np.random.default_rng(2)
    src = _source(rng, (40, 3, 5), src_dtype)
    indices = [rng.integers(0, 40, 33), np.array([39, 39, 0, 39]), np.arange(40)[::-1]]
    if not parallel:    # (each numba specialisation compiles twice in parallel: fewer here)
        indices += [np.array([5], np.int32), rng.integers(0, 40, 17).astype(np.uint32)]
    for index in indices:
        for out_dtype in OUT_DTYPES:
            want = np.empty((index.size, 3, 5), out_dtype)
            with np.errstate(all="ignore"):
                ref.gather_rows(src, index, want)
            got = np.full_like(want, 7)
            with fastnn.use_backend(backend), _parallel(backend if parallel else None), \
                    np.errstate(all="ignore"):
                fastnn.ops.gather_rows(src, index, got)
            np.testing.assert_array_equal(_bits(got), _bits(want),
                                          err_msg=f"{backend}: {src.dtype} -> {want.dtype}")


@pytest.mark.parametrize("backend", CPU)
def test_fallback_paths(backend):
    """What the compiled backends leave to the reference: a byte-swapped or
    misaligned src, float16; and what they convert first: a byte-swapped or
    misaligned index."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal((12, 4))
    raw = np.zeros(base.nbytes + 1, np.uint8)
    misaligned = raw[1:].view(np.float64).reshape(12, 4)
    misaligned[...] = base
    assert not misaligned.flags.aligned
    iraw = np.zeros(5 * 8 + 1, np.uint8)
    odd_index = iraw[1:].view(np.int64)
    odd_index[:] = [11, 0, 11, 3, 7]
    for src in (base.astype(">f8"), misaligned, base.astype(np.float16), base[::2]):
        for index in (np.array([5, 0, 5, 3, 1]), np.array([5, 0, 5, 3, 1], ">i4"), odd_index % 6):
            want = src[index.astype(np.intp)].astype(np.float32)
            got = np.empty((5, 4), np.float32)
            with fastnn.use_backend(backend):
                fastnn.ops.gather_rows(src, index, got)
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8])
def test_src_and_index_are_never_written(backend, dtype, tmp_path):
    """The caller's arrays byte for byte, a writable one and a read-only memmap
    (the way a data set larger than memory is opened)."""
    rng = np.random.default_rng(4)
    data = _source(rng, (64, 28, 28), dtype)
    path = tmp_path / "x.npy"
    np.save(path, data)
    mm = np.load(path, mmap_mode="r")
    assert isinstance(mm, np.memmap) and not mm.flags.writeable
    index = rng.permutation(64)[:48]
    index_before = index.copy()
    for src in (data, mm):
        before = np.array(src).tobytes()
        for out_dtype in OUT_DTYPES:
            out = np.empty((48, 28, 28), out_dtype)
            with fastnn.use_backend(backend), _parallel(backend):
                fastnn.ops.gather_rows(src, index, out)
            np.testing.assert_array_equal(out, data[index].astype(out_dtype))
        assert np.array(src).tobytes() == before
        assert index.tobytes() == index_before.tobytes()
    del mm
    assert path.read_bytes() == _npy_bytes(data, tmp_path)


def _npy_bytes(a, folder):
    p = folder / "again.npy"
    np.save(p, a)
    return p.read_bytes()


@pytest.mark.parametrize("backend", CPU)
def test_bad_calls_are_clear_errors_through_ops(backend):
    src = np.zeros((10, 3), np.uint8)
    out = np.full((2, 3), 5, np.float32)
    with fastnn.use_backend(backend):
        for index, exc, match in ((np.array([1, 10]), ValueError, r"\[0, 10\)"),
                                  (np.array([-1, 2]), ValueError, "negative"),
                                  (np.array([1.0, 2.0]), TypeError, "integer dtype")):
            with pytest.raises(exc, match=match):
                fastnn.ops.gather_rows(src, index, out)
            assert (out == 5).all()


@pytest.mark.slow
@pytest.mark.parametrize("backend", CPU)
def test_row_numbers_past_2_31(backend, tmp_path):
    """A 1-D uint8 memmap of 2**32 + 16 rows (a sparse file: only the pages
    written take disk space): row offsets are 64-bit, uint32 indices above
    2**31 are read unsigned."""
    n = 2**32 + 16
    mm = np.memmap(tmp_path / "big.u8", np.uint8, "w+", shape=(n,))
    rows = np.array([n - 1, 3, 2**31 + 1, 2**32 - 1, 2**31 - 1])
    mm[rows] = [200, 7, 9, 11, 13]
    mm.flush()
    ro = np.memmap(tmp_path / "big.u8", np.uint8, "r", shape=(n,))
    out = np.empty(5, np.float64)
    with fastnn.use_backend(backend):
        fastnn.ops.gather_rows(ro, rows, out)
        np.testing.assert_array_equal(out, [200, 7, 9, 11, 13])
        small = rows[1:].astype(np.uint32)
        out32 = np.empty(4, np.float32)
        fastnn.ops.gather_rows(ro, small, out32)
        np.testing.assert_array_equal(out32, [7, 9, 11, 13])
    del mm, ro


# ------------------------------------------------------------------ cython: fit's one-call batch

def _cython_data():
    pytest.importorskip("fastnn.kernels.cython_cpu")
    from fastnn.kernels import cython_cpu
    return cython_cpu._cy_data


@pytest.mark.parametrize("span", [0, 64, 8192, 1 << 20])
def test_prefetch_distance_changes_no_bit(span):
    """The prefetch ahead (none, one line, the default, more than the data)
    moves no value: rows of 13 bytes to 24 KB, float32 from every kind of
    source, serial and in chunks."""
    mod = _cython_data()
    rng = np.random.default_rng(5)
    old = mod._set_prefetch(span)
    try:
        for row, src_dtype in ((13, np.uint8), (784, np.float32), (784, np.uint8),
                               (6000, np.float64), (97, np.bool_), (3, np.int64)):
            src = _source(rng, (50, row), src_dtype)
            index = rng.integers(0, 50, 37)
            want = np.empty((37, row), np.float32)
            with np.errstate(all="ignore"):
                ref.gather_rows(src, index, want)
                got = np.empty_like(want)
                mod.gather_rows(src, index, got)
                np.testing.assert_array_equal(_bits(got), _bits(want))
                with _parallel("cython"):
                    got[...] = 0
                    mod.gather_rows(src, index, got)
            np.testing.assert_array_equal(_bits(got), _bits(want))
    finally:
        mod._set_prefetch(old)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_gather_batch_is_gather_rows_and_take(out_dtype):
    """``gather_batch(x, order, start, stop, xb, y, yb)``: ``xb`` as
    ``gather_rows(x, order[start:stop], xb)`` and ``yb`` as ``y[order[start:stop]]``,
    bit for bit, for the targets it copies itself (int64 or int32 labels, float
    targets, one or more columns) and those it leaves to ``np.take`` (rows that
    are not contiguous); nothing it reads is written."""
    mod = _cython_data()
    rng = np.random.default_rng(6)
    n = 61
    xs = [_source(rng, (n, 5), np.float32), _source(rng, (n, 2, 3), np.uint8),
          _source(rng, (n, 4), np.float16), _source(rng, (n, 9), np.float64)[:, ::3]]
    wide = rng.standard_normal((n, 6)).astype(out_dtype)
    ys = [rng.integers(0, 10, n), rng.standard_normal((n, 1)).astype(out_dtype),
          rng.standard_normal((n, 3)).astype(out_dtype), rng.integers(0, 10, n).astype(np.int32),
          wide[:, ::2], None]
    orders = [rng.permutation(n), rng.permutation(n).astype(np.int32),
              np.array(rng.permutation(n), ">i8")]
    for x in xs:
        x_bytes = x.tobytes()
        for y in ys:
            for order in orders:
                order_bytes = order.tobytes()
                for start, stop in ((0, 16), (48, 61), (60, 61), (5, 5 + 33)):
                    k = stop - start
                    index = order[start:stop].astype(np.intp)
                    want = np.empty((k,) + x.shape[1:], out_dtype)
                    with np.errstate(all="ignore"):
                        ref.gather_rows(x, index, want)
                    xb = np.full_like(want, 7)
                    yb = None
                    if y is not None:
                        ydt = y.dtype     # fit's targets are in the loss kernel's form
                        yb = np.full((k,) + y.shape[1:], 3, ydt)
                    with np.errstate(all="ignore"):
                        mod.gather_batch(x, order, start, stop, xb, y, yb)
                    np.testing.assert_array_equal(_bits(xb), _bits(want))
                    if y is not None:
                        np.testing.assert_array_equal(yb, y[index].astype(ydt))
                    assert order.tobytes() == order_bytes
        assert x.tobytes() == x_bytes
