"""How ``fit``, ``evaluate`` and ``predict`` read a memmap (issue 17): the
rows of the coming batches staged by a thread with ``pread`` (``_batches.Stager``)
give the same batches as reading through the mapping, for every shuffle mode,
layout and failure; a memmap is checked for NaN and inf as the first epoch
reads it, and a bad row leaves the model as it was."""

import threading
import time

import numpy as np
import pytest

import fastnn as fn
from fastnn import _batches
from conftest import BACKENDS

CPU_BACKENDS = [p for p in BACKENDS if p.values[0] in ("numpy", "cython", "numba")]


def _model(d, dtype="float32", seed=0):
    model = fn.Sequential([fn.Dense(9, "tanh"), fn.Dense(3)], input_dim=d, dtype=dtype,
                          seed=seed)
    model.compile("softmax_cross_entropy", fn.Adam(1e-2))
    return model


def _files(tmp_path, n=300, d=12, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(dtype)
    y = rng.integers(0, 3, n)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    return np.load(tmp_path / "x.npy", mmap_mode="r"), y


def _spy_take(monkeypatch):
    """Counts the batches served from the staging buffers and through the mapping."""
    served = {"staged": 0, "mapped": 0}
    original = _batches.Stager.take

    def take(self, lo, hi):
        got = original(self, lo, hi)
        served["staged" if got is not None else "mapped"] += 1
        return got
    monkeypatch.setattr(_batches.Stager, "take", take)
    return served


def _same_as_the_array(xm, y, seed, epochs=2, shuffle="batch"):
    """Train on the memmap and on a copy of it in memory: the same parameters."""
    model, ref = _model(xm.shape[1]), _model(xm.shape[1])
    model.fit(xm, y, epochs=epochs, batch_size=16, shuffle=shuffle, seed=seed, verbose=0)
    ref.fit(np.array(xm), y, epochs=epochs, batch_size=16, shuffle=shuffle, seed=seed, verbose=0)
    np.testing.assert_array_equal(model.params, ref.params)


def _stage_threads():
    return [t for t in threading.enumerate() if t.name == "fastnn-stage"]


def _no_stage_threads(wait=2.0):
    deadline = time.monotonic() + wait
    while _stage_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    return not _stage_threads()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shuffle", ["batch", False, True])
def test_staged_memmap_trains_as_the_array(tmp_path, monkeypatch, backend, shuffle):
    # small buffers and two slots: segments end mid-block, slots are reused;
    # a batch over more than 150 rows counts as random
    monkeypatch.setattr(_batches, "STAGE_BYTES", 20 * 12 * 4)
    monkeypatch.setattr(_batches, "STAGE_SLOTS", 2)
    monkeypatch.setattr(_batches, "STAGE_SPAN_MAX", 150 * 12 * 4)
    xm, y = _files(tmp_path)
    served = _spy_take(monkeypatch)
    with fn.use_backend(backend):
        model, ref = _model(12), _model(12)
        h = model.fit(xm, y, epochs=2, batch_size=16, shuffle=shuffle, seed=5, verbose=0,
                      validation_data=(xm, y))
        ref.fit(np.array(xm), y, epochs=2, batch_size=16, shuffle=shuffle, seed=5, verbose=0,
                validation_data=(np.array(xm), y))
        np.testing.assert_array_equal(model.params, ref.params)
        assert h.history["val_loss"] == ref.history.history["val_loss"]
        np.testing.assert_array_equal(model.predict(xm, batch_size=32),
                                      ref.predict(np.array(xm), batch_size=32))
        assert model.evaluate(xm, y, batch_size=40) == ref.evaluate(np.array(xm), y,
                                                                    batch_size=40)
    batches = 2 * -(-300 // 16)
    if shuffle is True:      # random rows: the training batches read through the mapping
        assert served["mapped"] >= batches
    else:                    # they came from the buffers (and so did the in-order ones)
        assert served["staged"] >= batches
    assert _no_stage_threads()


@pytest.mark.parametrize("layout", ["rows", "columns", "offset", "float64 to float32", "uint8"])
def test_staged_views_and_dtypes(tmp_path, layout):
    """A slice of rows, a slice of columns (rows not contiguous), a memmap at an
    offset in its file, and a dtype converted per batch read the same rows."""
    rng = np.random.default_rng(1)
    n, d = 260, 10
    if layout == "offset":
        raw = rng.standard_normal(n * d + 7).astype(np.float32)
        raw.tofile(tmp_path / "raw.bin")
        xm = np.memmap(tmp_path / "raw.bin", np.float32, "r", offset=7 * 4, shape=(n, d))
    elif layout == "uint8":
        np.save(tmp_path / "x.npy", rng.integers(0, 256, (n, d), dtype=np.uint8))
        xm = np.load(tmp_path / "x.npy", mmap_mode="r")
    else:
        dtype = np.float64 if layout == "float64 to float32" else np.float32
        np.save(tmp_path / "x.npy", rng.standard_normal((n + 30, d + 4)).astype(dtype))
        xm = np.load(tmp_path / "x.npy", mmap_mode="r")
        xm = xm[30:, 4:] if layout == "columns" else xm[30:, :d]
    assert isinstance(xm, np.memmap) and _batches.Stager.of(xm) is not None
    y = rng.integers(0, 3, n)
    model, ref = _model(d), _model(d)
    for shuffle in ("batch", False):
        model.fit(xm, y, epochs=1, batch_size=16, shuffle=shuffle, seed=2, verbose=0)
        ref.fit(np.array(xm), y, epochs=1, batch_size=16, shuffle=shuffle, seed=2, verbose=0)
    np.testing.assert_array_equal(model.params, ref.params)
    np.testing.assert_array_equal(model.predict(xm), ref.predict(np.array(xm)))


def test_failed_reads_fall_back_to_the_mapping(tmp_path, monkeypatch):
    """A read error ends the thread; the batches it had not staged are read
    through the mapping, with the same results."""
    import os

    monkeypatch.setattr(_batches, "STAGE_BYTES", 32 * 12 * 4)
    xm, y = _files(tmp_path)
    calls = {"n": 0}
    real = os.preadv

    def flaky(fd, buffers, offset):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(5, "Input/output error")
        return real(fd, buffers, offset)
    monkeypatch.setattr(_batches.os, "preadv", flaky)
    served = _spy_take(monkeypatch)
    _same_as_the_array(xm, y, seed=1)
    assert served["staged"] >= 3 and served["mapped"] > 0
    assert _no_stage_threads()


def test_stopping_early_ends_the_thread(tmp_path):
    xm, y = _files(tmp_path, n=2000)

    class Stop(fn.callbacks.Callback):
        def on_batch_end(self, batch, logs=None):
            if batch == 3:
                self.model.stop_training = True

    model = _model(12)
    model.fit(xm, y, epochs=3, batch_size=16, shuffle="batch", verbose=0, callbacks=[Stop()])
    assert model.optimizer.iterations == 4
    assert _no_stage_threads()


def test_windows_cover_each_batch(tmp_path):
    """Every batch's rows lie in the windows it is given, each window is read
    once, and no batch needs more windows than there are buffers: for
    shuffle="batch" with a short block at a random place (batches straddle it),
    and in order; shuffle=True is not staged."""
    n = 1000
    xm, _ = _files(tmp_path, n=n)
    st = _batches.Stager.of(xm)
    rng = np.random.default_rng(0)
    straddled = 0
    for shuffle, batch in (("batch", 8), ("batch", 13), ("batch", 3), (False, 24), (True, 8)):
        for _ in range(5):
            order = _batches.epoch_order(rng, n, shuffle, batch)
            spans = [(s, min(s + batch, n)) for s in range(0, n, batch)]
            plan = st._plan(order, spans)
            if shuffle is True:
                assert plan is None
                continue
            assert len(plan.ids) == len(set(plan.ids)) == -(-n // plan.window)
            _assert_windows_cover(plan, order, spans)
            straddled += sum(a < b for a, b in zip(plan.first, plan.last))
    assert straddled > 0


def _assert_windows_cover(plan, order, spans):
    """Each span's rows lie in the windows the plan gives it, all of them, in
    at most as many windows as there are buffers."""
    w = plan.window
    for i, (lo, hi) in enumerate(spans):
        rows = np.arange(lo, hi) if order is None else order[lo:hi]
        covered = 0
        for s in range(plan.first[i], plan.last[i] + 1):
            p0, p1 = max(lo, plan.pos[s]), min(hi, plan.ends[s])
            part = rows[p0 - lo:p1 - lo]
            assert part.size and (part // w == plan.ids[s]).all()
            covered += part.size
        assert covered == hi - lo
        assert plan.last[i] - plan.first[i] < _batches.STAGE_SLOTS


def test_windows_cover_a_ranks_parts_of_each_batch(tmp_path):
    """A rank of a distributed fit takes its part of each batch (the spans of
    ``fastnn.distributed.split``; none at all of a short last batch on 3
    ranks): the windows are the global batch's blocks and cover each part."""
    from fastnn.distributed import split

    n, batch = 1000, 24
    xm, _ = _files(tmp_path, n=n)
    st = _batches.Stager.of(xm)
    rng = np.random.default_rng(1)
    for shuffle in ("batch", False):
        order = _batches.epoch_order(rng, n, shuffle, batch)
        for size in (2, 3):
            for rank in range(size):
                spans = []
                for start in range(0, n, batch):
                    lo, hi = split(min(batch, n - start), rank, size)
                    if hi > lo:
                        spans.append((start + lo, start + hi))
                plan = st._plan(order, spans, batch)
                assert plan is not None
                if shuffle:
                    assert plan.window == _batches.SHUFFLE_BLOCK_BATCHES * batch
                _assert_windows_cover(plan, order, spans)


# ------------------------------------------------------- checked as read

def _bad_memmap(tmp_path, bad_row, value=np.nan, dtype=np.float32):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 12)).astype(dtype)
    x[bad_row, 5] = value
    np.save(tmp_path / "bad.npy", x)
    return np.load(tmp_path / "bad.npy", mmap_mode="r"), rng.integers(0, 3, 500)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shuffle", [True, "batch", False])
def test_bad_row_of_a_memmap_leaves_the_model_as_it_was(tmp_path, backend, shuffle):
    xm, y = _bad_memmap(tmp_path, bad_row=431, value=np.inf)
    good = np.array(xm)
    good[431, 5] = 0.0
    with fn.use_backend(backend):
        model, ref = _model(12), _model(12)
        for m in (model, ref):      # state carried from an earlier fit
            m.fit(good, y, epochs=1, batch_size=32, verbose=0)
        before = (model.get_weights(), model.optimizer.iterations,
                  {k: np.array(a) for k, a in model.optimizer._state_arrays().items()},
                  model.history)
        with pytest.raises(ValueError, match=r"NaN or inf, in row 431") as err:
            model.fit(xm, y, epochs=2, batch_size=32, shuffle=shuffle, verbose=0)
        assert isinstance(err.value, _batches.NotFinite)
        for a, b in zip(model.get_weights(), before[0]):
            np.testing.assert_array_equal(a, b)
        assert model.optimizer.iterations == before[1]
        for k, a in model.optimizer._state_arrays().items():
            np.testing.assert_array_equal(a, before[2][k])
        assert model.history is before[3]
        # the model goes on exactly as one that never saw the bad file
        model.fit(good, y, epochs=1, batch_size=32, verbose=0)
        ref.fit(good, y, epochs=1, batch_size=32, verbose=0)
        np.testing.assert_array_equal(model.params, ref.params)
    assert _no_stage_threads()


def test_memmap_checked_as_read_not_before(tmp_path, monkeypatch):
    """No pass over a memmap before training: the first epoch's batches are the
    check (a pass would read a file on a disk twice)."""
    xm, y = _bad_memmap(tmp_path, bad_row=499)
    passes = []
    real = fn.model._check_finite
    monkeypatch.setattr(fn.model, "_check_finite",
                        lambda a, name: (passes.append(name), real(a, name)))
    model = _model(12)
    with pytest.raises(ValueError, match="row 499"):
        model.fit(xm, y, epochs=1, batch_size=50, shuffle=False, verbose=0)
    assert passes == ["y"]
    assert model.optimizer.iterations == 0
    # an array in memory is checked before anything runs, as before
    with pytest.raises(ValueError, match="row 499"):
        model.fit(np.array(xm), y, epochs=1, batch_size=50, verbose=0)
    assert passes[-1] == "x"
    # check_finite=False trains on it (the caller asked)
    model.fit(xm, y, epochs=1, batch_size=50, verbose=0, check_finite=False)
    assert model.optimizer.iterations == 10


def test_overflow_to_the_models_dtype_is_named(tmp_path):
    xm, y = _bad_memmap(tmp_path, bad_row=17, value=1e300, dtype=np.float64)
    with pytest.raises(ValueError, match="row 17 does not fit the model's dtype float32"):
        _model(12).fit(xm, y, epochs=1, batch_size=32, verbose=0)


def test_check_rows_sum_overflow_is_not_an_error():
    """Finite values whose sum overflows pass (the exact check decides)."""
    xb = np.full((4, 3), 3e38, np.float32)
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.add.reduce(xb.reshape(-1)))
    _batches.check_rows(xb, np.arange(4), xb)
    xb[2, 1] = np.nan
    with pytest.raises(_batches.NotFinite, match="row 7"):
        _batches.check_rows(np.zeros((9, 3), np.float32) + np.nan, np.arange(5, 9), xb)


@pytest.mark.parametrize("how", ["buffered", "direct refused at open", "direct refused at read"])
def test_reads_through_the_page_cache(tmp_path, monkeypatch, how):
    """Without O_DIRECT (a file system without it, or one that refuses it when
    reading) the windows are read through the page cache, with the same rows."""
    import os

    xm, y = _files(tmp_path, n=700, d=9)
    if how == "buffered":
        monkeypatch.setattr(_batches, "STAGE_DIRECT", False)
    else:
        direct = getattr(os, "O_DIRECT", None)
        if direct is None:
            pytest.skip("no O_DIRECT here")
        real_open, real_preadv = os.open, os.preadv
        fds = set()

        def open_(path, flags, *a):
            if flags & direct and how == "direct refused at open":
                raise OSError(22, "Invalid argument")
            fd = real_open(path, flags, *a)
            if flags & direct:
                fds.add(fd)
            return fd

        def preadv(fd, buffers, offset):
            if fd in fds:
                raise OSError(22, "Invalid argument")
            return real_preadv(fd, buffers, offset)

        def close(fd, real_close=os.close):
            fds.discard(fd)
            real_close(fd)
        monkeypatch.setattr(_batches.os, "open", open_)
        monkeypatch.setattr(_batches.os, "close", close)
        monkeypatch.setattr(_batches.os, "preadv", preadv)
    served = _spy_take(monkeypatch)
    _same_as_the_array(xm, y, seed=7)
    # (one batch read through the mapping: fit's check of its plan, before the epochs)
    assert served["mapped"] == 1 and served["staged"] == 2 * -(-700 // 16)


def test_copy_on_write_memmap_is_read_through_the_mapping(tmp_path):
    """A mode="c" memmap may hold changes that are not in its file: its rows
    are read through the mapping, changes included."""
    xm, y = _files(tmp_path, n=200)
    xc = np.load(tmp_path / "x.npy", mmap_mode="c")
    xc[:, 0] = 5.0                      # in this process only, not in the file
    assert _batches.Stager.of(xc) is None and _batches.Stager.of(xm) is not None
    _same_as_the_array(xc, y, seed=2, epochs=1)


def test_without_preadv_the_mapping_is_read(tmp_path, monkeypatch):
    """Where os.preadv is missing (Windows, macOS) nothing is staged, and the
    memmap trains as before."""
    xm, y = _files(tmp_path, n=150)
    monkeypatch.delattr(_batches.os, "preadv")
    assert _batches.Stager.of(xm) is None
    _same_as_the_array(xm, y, seed=3)


def test_changes_through_a_shared_mapping_are_read(tmp_path, monkeypatch):
    """A mode="r+" memmap written in this process and not flushed: the staged
    reads (O_DIRECT included) see the changes, as the mapping does."""
    xm, y = _files(tmp_path, n=400)
    xw = np.load(tmp_path / "x.npy", mmap_mode="r+")
    xw[:, 0] = 7.0                       # dirty pages of the shared mapping
    served = _spy_take(monkeypatch)
    _same_as_the_array(xw, y, seed=4)
    assert served["staged"] >= 2 * -(-400 // 16)
    _same_as_the_array(xm, y, seed=4)    # a read-only map of the file sees them too
