"""How ``fit``, ``evaluate`` and ``predict`` read the data (issue 17): batches
gathered from the caller's array by index, no copy of the data set, the dtype
converted per batch, memmaps, ``shuffle="batch"``."""

import numpy as np
import pytest

import fastnn as fn
from fastnn import _backend, _batches
from conftest import BACKENDS

CPU_BACKENDS = [p for p in BACKENDS if p.values[0] in ("numpy", "cython", "numba")]


def _data(n=100, d=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0)
    return x, y


def _model(dtype="float64", seed=0):
    model = fn.Sequential([fn.Dense(7, "tanh"), fn.Dense(3)], input_dim=6, dtype=dtype,
                          seed=seed)
    model.compile("softmax_cross_entropy", fn.Adam(1e-2))
    return model


def _spy_gather(monkeypatch, backend):
    be = _backend.load(backend)
    seen = []
    original = be.gather_rows

    def spy(src, index, out):
        seen.append(np.array(index))
        return original(src, index, out)
    monkeypatch.setattr(be, "gather_rows", spy)
    return seen


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shuffle", [True, "batch"])
def test_every_row_once_per_epoch(monkeypatch, backend, shuffle):
    x, y = _data(n=103)
    seen = _spy_gather(monkeypatch, backend)
    with fn.use_backend(backend):
        model = _model()
        model.fit(x, y, epochs=3, batch_size=10, shuffle=shuffle, seed=4, verbose=0)
    per_epoch = 11                  # 10 batches of 10 rows, one of 3
    batches = seen[-3 * per_epoch:]  # before them, at most the plan's check
    assert [len(b) for b in batches] == ([10] * 10 + [3]) * 3
    orders = []
    for e in range(3):
        rows = np.concatenate(batches[e * per_epoch:(e + 1) * per_epoch])
        np.testing.assert_array_equal(np.sort(rows), np.arange(103))
        orders.append(rows)
    assert not np.array_equal(orders[0], orders[1])
    # the seed fixes the permutation
    again = _spy_gather(monkeypatch, backend)
    with fn.use_backend(backend):
        _model().fit(x, y, epochs=3, batch_size=10, shuffle=shuffle, seed=4, verbose=0)
    np.testing.assert_array_equal(np.concatenate(again[-33:]), np.concatenate(batches))


def test_batch_shuffle_reads_contiguous_blocks():
    rng = np.random.default_rng(0)
    n, batch = 1000, 16
    order = _batches.epoch_order(rng, n, "batch", batch)
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
    block = _batches.SHUFFLE_BLOCK_BATCHES * batch
    # every run of `block` positions holds exactly one block of contiguous rows
    starts = np.arange(0, n, block)
    lo = [order[s:s + block].min() for s in starts]
    assert all(order[s:s + block].max() - m < block for s, m in zip(starts, lo))
    assert sorted(lo) == list(range(0, n, block)) and lo != sorted(lo)


def test_shuffled_fit_equals_fit_on_the_permuted_data():
    """The semantics of shuffling are unchanged by gathering: epoch e trains, in
    order, on ``x[rng.permutation(n)]`` drawn from the fit's generator (what the
    copying fit did before issue 17), bit for bit."""
    x, y = _data(n=90)
    a = _model()
    a.fit(x, y, epochs=2, batch_size=16, seed=7, verbose=0)
    b = _model()
    rng = np.random.default_rng(7)
    for _ in range(2):
        perm = rng.permutation(90)
        b.fit(x[perm], y[perm], epochs=1, batch_size=16, shuffle=False, verbose=0)
    np.testing.assert_array_equal(a.params, b.params)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("src", ["float32", "float64", "uint8", "int16"])
def test_callers_arrays_unchanged_and_dtype_converted_per_batch(backend, src):
    rng = np.random.default_rng(1)
    x = (rng.random((64, 6)) * 200).astype(src)
    y = rng.integers(0, 3, 64).astype(np.int32)
    xb, yb = x.tobytes(), y.tobytes()
    with fn.use_backend(backend):
        model = _model(dtype="float32")
        model.fit(x, y, epochs=2, batch_size=8, verbose=0, validation_data=(x, y))
        ref = _model(dtype="float32")
        ref.fit(x.astype(np.float32), y, epochs=2, batch_size=8, verbose=0)
        p1 = model.predict(x)
        p2 = model.predict(x.astype(np.float32))
    assert x.tobytes() == xb and y.tobytes() == yb
    np.testing.assert_array_equal(model.params, ref.params)
    np.testing.assert_array_equal(p1, p2)


def test_read_only_memmap_trains_evaluates_and_predicts(tmp_path):
    x, y = _data(n=200)
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    np.save(tmp_path / "y.npy", y)
    xm = np.load(tmp_path / "x.npy", mmap_mode="r")
    ym = np.load(tmp_path / "y.npy", mmap_mode="r")
    assert isinstance(xm, np.memmap) and not xm.flags.writeable
    model = _model(dtype="float32")
    ref = _model(dtype="float32")
    for shuffle in (True, "batch", False):
        h = model.fit(xm, ym, epochs=1, batch_size=32, shuffle=shuffle, seed=3, verbose=0,
                      validation_data=(xm, ym))
        ref.fit(np.array(xm), np.array(ym), epochs=1, batch_size=32, shuffle=shuffle, seed=3,
                verbose=0)
        assert np.isfinite(h.history["val_loss"][0])
    np.testing.assert_array_equal(model.params, ref.params)
    np.testing.assert_array_equal(model.predict(xm), ref.predict(np.array(xm)))
    assert model.evaluate(xm, ym) == ref.evaluate(np.array(xm), np.array(ym))


def test_fit_allocates_no_copy_of_the_data(tmp_path):
    """tracemalloc sees NumPy's allocations: fit on 20,000 x 784 float32 (63 MB)
    adds a few MB (the model's buffers), not a copy of x."""
    import tracemalloc

    rng = np.random.default_rng(0)
    x = rng.random((20000, 784), dtype=np.float32)
    y = rng.integers(0, 10, 20000)
    model = fn.Sequential([fn.Dense(32, "relu"), fn.Dense(10)], input_dim=784, seed=0)
    model.compile("softmax_cross_entropy", "adam")
    model.fit(x[:256], y[:256], epochs=1, batch_size=128, verbose=0)   # plans made
    for shuffle in (True, "batch"):
        tracemalloc.start()
        model.fit(x, y, epochs=1, batch_size=128, shuffle=shuffle, verbose=0,
                  check_finite=False)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 4e6, peak     # a permutation (160 kB), labels (160 kB), batch buffers


def test_wall_rate_and_step_rate():
    x, y = _data(n=400)
    h = _model().fit(x, y, epochs=2, batch_size=32, verbose=0)
    for wall, step in zip(h.history["samples_per_s"], h.history["step_samples_per_s"]):
        assert 0 < wall <= step


def test_bad_shuffle_argument():
    x, y = _data()
    model = _model()
    for bad in ("yes", 2, None):
        with pytest.raises(TypeError, match="shuffle"):
            model.fit(x, y, shuffle=bad, verbose=0)
    assert model.optimizer.iterations == 0


def _rss_file_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.parametrize("mode,released", [("r", True), ("c", False)])
def test_memmap_pages_are_handed_back(tmp_path, monkeypatch, mode, released):
    """Rows read through a read-only memmap do not stay in the process' resident
    memory (a 2 GB memmap would hold 2 GB): every RELEASE_BYTES read they are
    handed back; a copy-on-write map (mode "c") is left alone."""
    import os
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux's /proc")
    monkeypatch.setattr(_batches, "RELEASE_BYTES", 1 << 20)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.random((32768, 512), dtype=np.float32))   # 64 MB
    y = rng.integers(0, 3, 32768)
    xm = np.load(tmp_path / "x.npy", mmap_mode=mode)
    model = fn.Sequential([fn.Dense(3)], input_dim=512, seed=0)
    model.compile("softmax_cross_entropy", "sgd")
    model.fit(np.array(xm[:512]), y[:512], epochs=1, batch_size=4, verbose=0)  # code loaded
    before = _rss_file_kb()
    model.fit(xm, y, epochs=1, batch_size=4, verbose=0)
    grown = _rss_file_kb() - before
    if released:   # at most the last batch's pages (4 rows, up to a 2 MiB folio each)
        assert grown < 16384, grown
    else:
        assert grown > 50000, grown    # the whole file was read and stays mapped


def _argmax_first(row):
    """NumPy's argmax, written out: the first NaN, else the first largest."""
    for j, v in enumerate(row):
        if v != v:
            return j
    best = 0
    for j, v in enumerate(row):
        if v > row[best]:
            best = j
    return best


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_count_correct_equals_the_host_reference(backend, dtype):
    """Each backend's ``count_correct`` hook (the cython one is compiled)
    against the host reference, and the reference against an argmax written
    out: ties (the first wins), -0.0 against 0.0, infinities, NaN (the first
    NaN wins, as NumPy's argmax), one output (a positive logit), labels of
    another integer width, logits that are not contiguous, no rows."""
    rng = np.random.default_rng(8)
    z = rng.standard_normal((41, 5)).astype(dtype)
    z[0] = [1, 3, 3, 0, 2]
    z[1] = [-0.0, 0.0, -1, -2, -3]
    z[2] = [np.inf, 1, np.inf, 0, 0]
    z[3] = [1, np.nan, 5, np.nan, 0]
    z[4] = [np.nan, 9, 1, 1, 1]
    z[5] = [-np.inf] * 5
    z[6] = [0, 0, 0, 0, np.nan]
    labels = rng.integers(0, 5, 41)
    labels[:7] = [1, 0, 0, 1, 0, 0, 4]
    wanted = sum(_argmax_first(row) == lab for row, lab in zip(z.tolist(), labels))
    assert _backend._count_correct(z, labels) == wanted
    be = _backend.load(backend)
    cases = [(z, labels), (z, labels.astype(np.int32)), (z[::2], labels[::2]),
             (np.asfortranarray(z), labels), (z[:, 1:], labels % 4), (z[:0], labels[:0]),
             (z[:, :1], (labels > 2).astype(dtype).reshape(-1, 1))]
    for logits, lab in cases:
        got = be.count_correct(logits, lab)
        assert type(got) is int
        assert got == _backend._count_correct(logits, lab), (logits.shape, lab.dtype)


def test_cython_fit_batches_in_one_call_as_the_generic_path_does(monkeypatch):
    """The cython backend's batch in one call (x rows and targets) gives the
    generic path's model bit for bit, sees every row once an epoch in the
    permutation the seed fixes, and a gather_rows set on the backend (a spy)
    turns it off."""
    pytest.importorskip("fastnn.kernels.cython_cpu")
    from fastnn.kernels import cython_cpu

    be = _backend.load("cython")
    x, y = _data(n=103)
    seen = []
    original = cython_cpu.gather_batch

    def spy(xs, order, start, stop, xb, ys, yb):
        seen.append(np.array(order[start:stop]))
        return original(xs, order, start, stop, xb, ys, yb)
    monkeypatch.setattr(cython_cpu, "gather_batch", spy)
    with fn.use_backend("cython"):
        fast = _model(dtype="float32")
        fast.fit(x, y, epochs=3, batch_size=10, seed=4, verbose=0)
    assert [len(b) for b in seen] == ([10] * 10 + [3]) * 3
    for e in range(3):
        np.testing.assert_array_equal(np.sort(np.concatenate(seen[e * 11:(e + 1) * 11])),
                                      np.arange(103))
    fast_rows = np.concatenate(seen)
    generic = _spy_gather(monkeypatch, "cython")
    del seen[:]
    with fn.use_backend("cython"):
        slow = _model(dtype="float32")
        slow.fit(x, y, epochs=3, batch_size=10, seed=4, verbose=0)
    assert not seen and len(generic) >= 33
    np.testing.assert_array_equal(np.concatenate(generic[-33:]), fast_rows)
    np.testing.assert_array_equal(fast.params, slow.params)
    assert be.count_correct is cython_cpu.count_correct
