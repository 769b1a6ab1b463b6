"""Batches for ``fit``, ``evaluate`` and ``predict``, without copying the data set.

A batch is either a slice of the caller's array (when it is already in the
model's dtype, C-contiguous, on the host and read in order) or gathered row by
row from it into a buffer of the step (``gather_rows``, which converts the
dtype in the same pass). So ``fit`` never copies the whole training set:
shuffling is one permutation of indices per epoch, and a NumPy memmap is read
only where the current batch lies.

Random access on a disk: a shuffled epoch over a memmap reads every row once,
but in random order; on a spinning disk or a network file system each row is
then a seek (milliseconds), on an SSD a 4 KiB page read (tens of
microseconds), and the page cache helps only once the file fits in memory.
``shuffle="batch"`` trades randomness for sequential reads: the rows are cut
into blocks of ``SHUFFLE_BLOCK_BATCHES`` batches, the order of the blocks is
shuffled and then the rows within each block, so every read is a run of
contiguous rows while every batch still mixes rows from ``SHUFFLE_BLOCK_BATCHES``
batches' worth of data.

Staged reads: for a memmap of a file, a thread reads the rows of the coming
batches with ``pread`` into a ring of ``STAGE_SLOTS`` buffers (a window of
rows each: a block of ``shuffle="batch"``, about ``STAGE_BYTES`` in order),
in the order the epoch will use them, with ``O_DIRECT`` where the file system
has it, and the batches are gathered from there: the disk works while the
network trains, and the mapping is not touched (no page faults, which cost
more than the copy on a VM, and no file pages resident). Batches whose rows
spread wider (``shuffle=True``) are random reads: they are gathered through
the mapping, as is a copy-on-write memmap (``mode="c"``). Measured (MLP at
batch 128, ``shuffle="batch"``, the file evicted from the page cache first):
before, through the mapping after a finite-check pass over the file, 40-82 %
of the in-memory rate; staged through the page cache 83-85 % (512 MB and 2 GB,
fresh processes); ``O_DIRECT`` then took half the system time and 5-15 %
more samples/s than reading through the page cache, alternating in one
process.

Not done: gathering the next batch on a thread while the step runs (a
native thread, no GIL, two input buffers; tried and measured). On 2 cores the
step's BLAS threads leave no core idle (OpenBLAS's workers spin between
GEMMs): at idle priority the thread never ran before the step ended, so the
wait cost more than the gather (148 us against ~50); at normal priority it
woke on the training loop's core and preempted it; kept off that core, it
slowed the step's GEMMs by what it saved (MLP, batch 128, 100,000 shuffled
rows, alternating in one process: wall 119,000 samples/s both ways, 95.9 %
of the step-only rate against 93.9 % only because the steps got slower). A
machine with a core the BLAS leaves free would hide the gather (~45 us of
random rows from memory in a ~1 ms step at batch 128).

Finite check of a memmap: ``fit(check_finite=True)`` checks an array in memory
in one pass before training (~15 GB/s), but a pass over a file on a disk
costs as long as reading it, and a file larger than memory would then be read
twice per ``fit``. So a memmap's rows are checked as the first epoch gathers
them, each batch before its step; a bad row raises ``NotFinite`` and ``fit``
puts the model back as it was before the call (``Snapshot``).
"""

import math
import mmap
import os
import threading

import numpy as np

#: ``shuffle="batch"``: the rows of this many consecutive batches form a block.
SHUFFLE_BLOCK_BATCHES = 8
#: the shuffle modes ``fit`` accepts
SHUFFLE_MODES = (True, False, "batch")


def check_shuffle(shuffle):
    """``True``, ``False`` or ``"batch"`` (numpy booleans accepted)."""
    if isinstance(shuffle, (bool, np.bool_)):
        return bool(shuffle)
    if isinstance(shuffle, str) and shuffle == "batch":
        return "batch"
    raise TypeError(f"shuffle must be a bool or 'batch', got {shuffle!r}")


def epoch_order(rng, n, shuffle, batch):
    """The row order of one epoch: None (in order), a permutation of ``n``, or
    for ``"batch"`` a permutation of blocks of ``SHUFFLE_BLOCK_BATCHES * batch``
    contiguous rows, shuffled within each block."""
    if shuffle is False:
        return None
    if shuffle is True:
        return rng.permutation(n)
    block = SHUFFLE_BLOCK_BATCHES * batch
    starts = rng.permutation(-(-n // block)) * block
    order = np.empty(n, np.intp)
    at = 0
    for s in starts:
        stop = min(s + block, n)
        rows = rng.permutation(stop - s)
        rows += s
        order[at:at + rows.size] = rows
        at += rows.size
    return order


#: Pages of a memmap read through the mapping count in the process' resident
#: memory until the kernel drops them, so a 2 GB memmap read once would hold
#: 2 GB of resident memory; after this many bytes of rows read, they are
#: handed back (madvise MADV_DONTNEED: they stay in the page cache, and a
#: later read maps them again without touching the disk).
RELEASE_BYTES = 64 << 20
#: A page fault on a file mapping maps more than the page: its neighbours
#: already in the page cache (fault-around) or the whole large folio the page
#: cache holds it in (up to 2 MiB on recent kernels). Measured here: 64 random
#: rows of 2 KiB from a 64 MiB memmap left 54 MiB mapped. So a row gathered
#: from a random place counts as this many bytes resident.
FAULT_AROUND = 2 << 20


class Pages:
    """Hands back the pages of a read-only (or shared) memmap every
    ``RELEASE_BYTES`` read; does nothing for other arrays and for copy-on-write
    memmaps (``mode="c"``, whose written pages would be lost)."""

    def __init__(self, a):
        m = getattr(a, "_mmap", None) if isinstance(a, np.memmap) else None
        ok = (m is not None and getattr(a, "mode", "c") in ("r", "r+")
              and hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED"))
        self.mmap = m if ok else None
        self.unread = RELEASE_BYTES

    def read(self, nbytes):
        """Count ``nbytes`` read; hand the pages back when enough were."""
        if self.mmap is None:
            return
        self.unread -= nbytes
        if self.unread <= 0:
            self.unread = RELEASE_BYTES
            self.mmap.madvise(mmap.MADV_DONTNEED)


class NotFinite(ValueError):
    """A batch of a memmap checked as read holds NaN or inf."""


class Snapshot:
    """The state ``fit`` changes (parameters, optimizer state and step, its
    rate, the model's generator and history), taken before training a memmap
    checked as read, so that a bad row leaves the model as it was."""

    def __init__(self, model, be):
        to_host = model._space[3]
        self.model, self.be = model, be
        self.arrays = [model._params] + list(model.optimizer._state_arrays().values())
        self.copies = [np.array(to_host(a)) for a in self.arrays]
        opt = model.optimizer
        self.opt = (opt._t, opt._lr, opt._schedule)
        self.rng = model._rng.bit_generator.state
        self.history = getattr(model, "history", None)

    def restore(self):
        """Write the state back, in place (the buffers the plans hold)."""
        model, opt = self.model, self.model.optimizer
        for a, c in zip(self.arrays, self.copies):
            if isinstance(a, np.ndarray):
                a[...] = c
            else:
                self.be.copy_from_host(a, c)
        opt._t, opt._lr, opt._schedule = self.opt
        model._rng.bit_generator.state = self.rng
        model.history = self.history
        model.stop_training = False


def check_rows(x, index, xb):
    """Raise ``NotFinite`` naming the first bad row when the gathered batch
    ``xb`` (rows ``index`` of ``x``, or ``x[index]`` directly) holds NaN or inf.
    One sum over the batch (NaN and inf propagate; a finite sum proves every
    value finite), the exact check only when it is not finite."""
    if xb.dtype.kind != "f":
        return
    with np.errstate(over="ignore", invalid="ignore"):
        if math.isfinite(np.add.reduce(xb.reshape(-1))):
            return
    ok = np.isfinite(xb.reshape(xb.shape[0], -1)).all(axis=1)
    if ok.all():
        return                 # the sum overflowed: every value is finite
    rows = np.asarray(index)[~ok]
    row = int(rows.min())
    if x.dtype.kind == "f" and np.isfinite(x[row]).all():
        raise NotFinite(f"x row {row} does not fit the model's dtype {xb.dtype} (it overflows "
                        f"to inf); scale the data")
    raise NotFinite(f"x holds NaN or inf, in row {row} (checked as the first epoch read it: the "
                    f"model is left as it was); fix the data (or fit(check_finite=False) to "
                    f"train on it anyway)")


#: Staged reads of a memmap: the size of one buffer (a segment of rows read
#: with one ``pread``), and how many buffers (the reading thread is at most
#: this many segments ahead of the batch being trained).
STAGE_BYTES = 8 << 20
STAGE_SLOTS = 3
#: a batch whose rows lie further apart than this is random access: read
#: through the mapping instead
STAGE_SPAN_MAX = 64 << 20
#: read with O_DIRECT where the file system has it, from and to multiples of
#: DIRECT_ALIGN bytes (the logical block size of the disks it is used on)
STAGE_DIRECT = True
DIRECT_ALIGN = 4096
#: the thread ends when no batch is taken for this long (a loop left early)
STAGE_IDLE_S = 60.0


class Stager:
    """Reads the rows of the coming batches of a file-backed memmap with
    ``pread`` into a ring of buffers, on a thread, so the batches are gathered
    from memory: the disk works while the network trains, and the mapping is
    never touched (no page faults, no resident file pages).

    The rows are read in windows of ``W`` rows (``[k*W, (k+1)*W)``): for
    ``shuffle="batch"`` the blocks of ``epoch_order`` (each block's rows are
    used together, so each window is read once), in order about
    ``STAGE_BYTES``. ``epoch(order, spans)`` starts the thread for batches
    ``order[lo:hi]`` (rows ``lo:hi`` when ``order`` is None) taken in the order
    of ``spans``; an order that visits a window more than once (``shuffle=True``)
    is random access and is not staged. ``take(lo, hi)`` gives the batch's
    pieces ``[(rows, first, p0, p1)]``: positions ``p0:p1`` of the batch have
    their rows in ``rows`` (row ``r`` of ``x`` at ``rows[r - first]``); a
    batch straddles two or three windows where a short block lies. None (a
    batch out of the expected order, or a failed read) means: read through
    the mapping. Reading is an optimisation only: an error ends the thread and
    the batches fall back.
    """

    def __init__(self, x, path, base):
        self.x, self.path, self.base = x, path, base
        self.stride = x.strides[0]
        self.extent = x[:1].nbytes if x[:1].flags.c_contiguous else self.stride
        self.state = None
        self.slots = None

    @classmethod
    def of(cls, x):
        """A Stager for ``x`` when it is a memmap of a file with rows at a
        positive stride, else None."""
        m = getattr(x, "_mmap", None) if isinstance(x, np.memmap) else None
        path = getattr(x, "filename", None)
        # a copy-on-write map ("c") may hold changes that are not in the file;
        # no os.preadv (Windows, macOS): read through the mapping
        if (m is None or path is None or getattr(x, "mode", "c") not in ("r", "r+", "w+")
                or not hasattr(os, "preadv")
                or x.ndim == 0 or x.shape[0] < 2 or x.strides[0] <= 0):
            return None
        try:
            start = np.frombuffer(m, np.uint8, count=1).ctypes.data
        except (TypeError, ValueError, BufferError):
            return None
        offset = int(getattr(x, "offset", 0))
        base = x.ctypes.data - start + offset - offset % mmap.ALLOCATIONGRANULARITY
        return cls(x, os.fspath(path), base)

    def epoch(self, order, spans, batch=None):
        self.close()
        spans = list(spans)
        st = self._plan(order, spans, batch)
        if st is None:
            return
        # room for a window read from and to DIRECT_ALIGN boundaries, aligned
        need = (st.window - 1) * self.stride + self.extent + 3 * DIRECT_ALIGN
        if self.slots is None or self.slots[0].size < need or len(self.slots) != STAGE_SLOTS:
            self.slots = [np.empty(need, np.uint8) for _ in range(STAGE_SLOTS)]
        st.free = threading.Semaphore(len(self.slots))
        self.state = st
        threading.Thread(target=self._run, args=(st, self.slots), daemon=True,
                         name="fastnn-stage").start()

    def _plan(self, order, spans, batch=None):
        """The windows to read and which of them each span needs, or None.
        ``batch``: the batch ``order`` was drawn for (its blocks are
        ``SHUFFLE_BLOCK_BATCHES`` batches), by default the first span's size;
        a rank of a distributed ``fit`` takes a part of each batch."""
        n = self.x.shape[0]
        if not spans or spans[-1][1] > n:
            return None
        batch = max(1, spans[0][1] - spans[0][0] if batch is None else batch)
        if order is None:
            window = batch * max(SHUFFLE_BLOCK_BATCHES, STAGE_BYTES // (batch * self.stride))
            pos = np.arange(0, spans[-1][1], window)
            ids = pos // window
        else:
            window = SHUFFLE_BLOCK_BATCHES * batch
            wid = order // window
            pos = np.concatenate(([0], np.flatnonzero(wid[1:] != wid[:-1]) + 1))
            ids = wid[pos]
            if pos.size > -(-n // window):     # a window visited twice: random
                return None
        if (window - 1) * self.stride + self.extent > STAGE_SPAN_MAX:
            return None
        lo = np.array([a for a, _ in spans], np.intp)
        hi = np.array([b for _, b in spans], np.intp)
        first = np.searchsorted(pos, lo, "right") - 1
        last = np.searchsorted(pos, hi - 1, "right") - 1
        if (last - first).max(initial=0) + 1 > STAGE_SLOTS:
            return None
        ends = np.append(pos[1:], spans[-1][1])
        return _StageState(spans, window, ids.tolist(), pos.tolist(), ends.tolist(),
                           first.tolist(), last.tolist())

    def take(self, lo, hi):
        st = self.state
        if st is None:
            return None
        at = st.at
        if at < len(st.spans) and st.spans[at] == (lo, hi):
            st.at = at + 1
        elif at > 0 and st.spans[at - 1] == (lo, hi):   # asked twice (a check)
            at -= 1
        else:
            return None
        s0, s1 = st.first[at], st.last[at]
        while st.released < s0:              # the slots of the windows done with
            st.released += 1
            st.free.release()
        if st.filled <= s1:
            with st.cond:
                while st.filled <= s1 and not st.failed:
                    st.cond.wait()
            if st.filled <= s1:
                return None
        x, w, k = self.x, st.window, len(self.slots)
        pieces = []
        for s in range(s0, s1 + 1):
            first = st.ids[s] * w
            rows = np.ndarray((min(w, x.shape[0] - first),) + x.shape[1:], x.dtype,
                              self.slots[s % k], st.offsets[s], x.strides)
            pieces.append((rows, first, max(lo, st.pos[s]), min(hi, st.ends[s])))
        return pieces

    def close(self):
        st, self.state = self.state, None
        if st is not None:
            st.stopped = True
            st.free.release()

    def _open(self, direct):
        flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0)
        return os.open(self.path, flags)

    def _run(self, st, slots):
        """Read the windows in turn into the free buffers. With ``O_DIRECT``
        where the file system has it (the disk writes into the buffer: no copy
        out of the page cache, which cost the training 5-15 % of its samples/s
        on these 2 cores), else through the page cache."""
        direct = STAGE_DIRECT and hasattr(os, "O_DIRECT")
        try:
            fd = self._open(direct)
        except OSError:
            direct = False
            try:
                fd = self._open(False)
            except OSError:
                st.fail()
                return
        n, w = self.x.shape[0], st.window
        try:
            for s, wid in enumerate(st.ids):
                if not st.free.acquire(timeout=STAGE_IDLE_S) or st.stopped:
                    break   # close() releases it at once
                a, b = wid * w, min(n, (wid + 1) * w)
                start = self.base + a * self.stride
                end = self.base + (b - 1) * self.stride + self.extent
                slot = slots[s % len(slots)]
                at = -slot.ctypes.data % DIRECT_ALIGN   # an aligned place in the buffer
                try:
                    got = self._read(fd, slot, at, start, end, direct)
                except OSError:
                    if not direct:
                        raise
                    # O_DIRECT refused here: read through the page cache
                    plain = self._open(False)
                    os.close(fd)
                    fd, direct = plain, False
                    got = self._read(fd, slot, at, start, end, False)
                st.offsets[s] = got
                with st.cond:
                    st.filled = s + 1
                    st.cond.notify()
        except Exception:   # reading ahead is an optimisation: the batches fall back
            pass
        finally:
            os.close(fd)
            st.fail()

    @staticmethod
    def _read(fd, slot, at, start, end, direct):
        """Read file bytes ``[start, end)`` into ``slot`` (from ``slot[at]``, which
        is aligned, and from an aligned file offset when ``direct``); returns
        where in ``slot`` byte ``start`` landed."""
        lo = start - start % DIRECT_ALIGN if direct else start
        hi = -(-end // DIRECT_ALIGN) * DIRECT_ALIGN if direct else end
        view = memoryview(slot)[at:at + hi - lo]
        done, need = 0, end - lo
        while done < need:
            got = os.preadv(fd, [view[done:]], lo + done)
            if got <= 0:
                raise OSError("short read")
            done += got
        return at + start - lo


class _StageState:
    def __init__(self, spans, window, ids, pos, ends, first, last):
        self.spans, self.window = spans, window
        self.ids, self.pos, self.ends = ids, pos, ends   # per window read
        self.first, self.last = first, last               # per span: its windows
        self.offsets = [0] * len(ids)   # where each window's first row is in its buffer
        self.at, self.filled, self.released = 0, 0, 0
        self.stopped = self.failed = False
        self.free = None
        self.cond = threading.Condition()

    def fail(self):
        """The thread has ended: no window past ``filled`` will come."""
        with self.cond:
            self.failed = True
            self.cond.notify_all()


class Source:
    """Where the batches of one array (and its targets) come from.

    Parameters
    ----------
    be : Backend
    x : ndarray (n, ...)
        The caller's array, any real dtype (a memmap too); never written.
    y : ndarray or None
        Targets in the loss kernel's form (host), or None (predict).
    dtype : numpy dtype
        The model's.
    host : bool
        Whether the backend keeps arrays in host memory.
    """

    def __init__(self, be, x, y, dtype, host):
        self.be, self.x, self.y, self.host = be, x, y, host
        self.n = x.shape[0]
        self.direct = host and x.dtype == dtype and x.flags.c_contiguous
        self.gather = be.gather_rows
        self.copy_from_host = be.copy_from_host
        self._ramp = None
        self.pages = Pages(x)
        self.row_bytes = x[:1].nbytes
        self.stager = Stager.of(x) if host else None
        #: check every batch for NaN and inf before it is used (``check_rows``)
        self.check = False
        # the backend's one-call batch (x rows and targets; cython) where
        # nothing else is to be done per batch: data in memory, on the host,
        # and the backend's own gather_rows (not one set on it: a spy, a patch)
        fast = getattr(be.module, "gather_batch", None)
        self.gather_batch = (fast if host and self.stager is None and self.pages.mmap is None
                             and be.gather_rows is getattr(be.module, "gather_rows", None)
                             else None)

    def in_order(self, start, stop):
        """Indices ``start:stop`` (a view of one cached ``arange``)."""
        if self._ramp is None:
            self._ramp = np.arange(self.n, dtype=np.intp)
        return self._ramp[start:stop]

    def epoch(self, order, batch, spans=None):
        """Batches of ``batch`` rows, ``order[lo:hi]`` (rows ``lo:hi`` when
        ``order`` is None) for ``lo`` = 0, batch, ..., come next, or the
        ``(lo, hi)`` of ``spans`` (a rank's parts of those batches): a memmap's
        file is read ahead."""
        if self.stager is not None:
            if spans is None:
                spans = [(s, min(s + batch, self.n)) for s in range(0, self.n, batch)]
            self.stager.epoch(order, spans, batch)

    def close(self):
        """Stop reading ahead (the thread also ends by itself when idle)."""
        if self.stager is not None:
            self.stager.close()

    def batch(self, plan, order, start, stop):
        """``(xb, yb)`` for rows ``order[start:stop]`` (or ``start:stop`` when
        ``order`` is None), in ``plan``'s buffers unless a slice will do."""
        if self.gather_batch is not None and order is not None and not self.check:
            xb, yb, _ = plan.inputs()
            self.gather_batch(self.x, order, start, stop, xb, self.y, yb)
            return xb, yb
        pieces = None if self.stager is None else self.stager.take(start, stop)
        if pieces is None:
            self.pages.read((stop - start) * (self.row_bytes if order is None else
                                              max(self.row_bytes, FAULT_AROUND)))
        if order is None and self.direct and (pieces is None or len(pieces) == 1):
            if pieces is None:
                xb = self.x[start:stop]
            else:
                rows, first = pieces[0][:2]
                xb = rows[start - first:stop - first]
            if self.check:
                check_rows(self.x, self.in_order(start, stop), xb)
            return xb, None if self.y is None else self.y[start:stop]
        index = self.in_order(start, stop) if order is None else order[start:stop]
        xb, yb, ystage = plan.inputs()
        if pieces is None:
            self.gather(self.x, index, xb)
        else:
            for rows, first, p0, p1 in pieces:
                self.gather(rows, index[p0 - start:p1 - start] - first,
                            xb[p0 - start:p1 - start])
        if self.check:
            check_rows(self.x, index, xb)
        if self.y is not None:
            if order is None:
                if self.host:
                    return xb, self.y[start:stop]
                self.copy_from_host(yb, self.y[start:stop])
            # the method, not np.take (1.2 us less a batch); indices are in range,
            # so "clip" changes nothing and skips mode="raise"'s temporary
            elif self.host:
                self.y.take(index, 0, yb, "clip")
            else:
                self.y.take(index, 0, ystage, "clip")
                self.copy_from_host(yb, ystage)
        return xb, yb
