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
"""

import mmap

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

    def in_order(self, start, stop):
        """Indices ``start:stop`` (a view of one cached ``arange``)."""
        if self._ramp is None:
            self._ramp = np.arange(self.n, dtype=np.intp)
        return self._ramp[start:stop]

    def batch(self, plan, order, start, stop):
        """``(xb, yb)`` for rows ``order[start:stop]`` (or ``start:stop`` when
        ``order`` is None), in ``plan``'s buffers unless a slice will do."""
        self.pages.read((stop - start) * (self.row_bytes if order is None else
                                          max(self.row_bytes, FAULT_AROUND)))
        if order is None and self.direct:
            return self.x[start:stop], None if self.y is None else self.y[start:stop]
        index = self.in_order(start, stop) if order is None else order[start:stop]
        xb, yb, ystage = plan.inputs()
        self.gather(self.x, index, xb)
        if self.y is not None:
            if order is None:
                if self.host:
                    return xb, self.y[start:stop]
                self.copy_from_host(yb, self.y[start:stop])
            elif self.host:
                np.take(self.y, index, axis=0, out=yb)
            else:
                np.take(self.y, index, axis=0, out=ystage)
                self.copy_from_host(yb, ystage)
        return xb, yb
