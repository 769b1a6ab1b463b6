"""Convolution and max-pooling kernels of the numba backend (NHWC).

A convolution is GEMMs through NumPy's BLAS (the dense kernels' BLAS, called
from Python on views: one thread pool for every GEMM of a model), and numba
loops around them:

* ``conv2d_forward``: im2col of a chunk of GEMM rows (output pixels) into
  this thread's workspace, one GEMM of the chunk into ``preact`` (or
  ``out``), then bias + activation over the chunk while it is in cache (the
  dense kernels' epilogue loop, ``bias_act``). A 1x1 kernel at stride 1
  without padding needs no im2col. A kernel with few taps
  (``kh*kw*c <= _DIRECT_MAX_TAPS``, such as a first layer on one channel) is
  one direct loop instead: per output pixel, the window gathered, each filter's
  sum over the taps (a loop of constant length, unrolled, so the filter loop
  vectorizes with its sums in registers), bias and activation, written once.
* ``conv2d_backward``: ``dw`` is the sum over chunks of ``cols.T @ dz``;
  ``db`` summed in float64 over the rows of ``dz`` while the chunk is in
  cache.
* ``conv2d_backprop``: ``dcols = dz @ w.T`` per chunk of whole images, then
  col2im (each row's ``kh`` contiguous blocks added at their place) and, once
  an image is complete, the derivative of the activation below multiplied
  into it while it is in cache.
* ``maxpool2d_forward``: one pass over the output rows, window offsets in
  row-major order, vectorized along the channels (a pool of up to
  ``_POOL_UNROLL_MAX`` elements has a loop of its own with the window
  unrolled: pool1 of the convnet 1.6 -> 1.2 ms on one thread, about its
  memory traffic); ``maxpool2d_backward``: per
  input row, the ``dy`` of each window offset's winners added in the
  reference's order, then the derivative of the activation below multiplied
  in: every input element written once.

im2col copies a window row as one contiguous block of ``x``; with few taps it
copies tap by tap through a table of the taps' offsets (the block copies of one
channel cost more than their elements).

Workspace: the contract has no workspace argument; the im2col columns, the
GEMM chunk of ``conv2d_backprop``, the float64 sums of ``db``, the direct
loop's window copies and the taps' offsets live in buffers of the calling
thread (``threading.local``), grown on demand and reused, so a training step
allocates nothing after its first batch. A chunk holds at most
``_CHUNK_BYTES`` of columns: few BLAS calls (each one wakes the BLAS's
threads), a workspace that stays in the L3 cache between the im2col that
writes it and the GEMM that reads it, bounded for large images.

Threads: the GEMMs use the BLAS's threads; our loops run serially below the
thresholds of ``PARALLEL_MIN`` (elements of work) and as ``prange`` chunks
above them (waking the workers after a BLAS call costs ~50 us here, see
``_runtime``).
"""

import threading

import numpy as np

from ._runtime import (PARALLEL_MIN, _Kernel, _chunk, _entry, _launch, _named, _scalar,
                       _specialised)
from ._math import _ACT, _c
from . import _runtime
from .elementwise import _act_kernels, _derivative_source, _threshold
from .dense import backprop_delta

# ------------------------------------------------------------ workspace

#: Bytes of im2col columns (or ``dz @ w.T`` rows) per chunk: written and read
#: back in the L3 cache, in few BLAS calls (each wakes the BLAS's threads).
#: conv2 of Keras' convnet at batch 128 (17.8 MB of columns), 2 threads, time
#: over its GEMM alone, median of 15 alternating calls, three runs at load
#: ~1.2: 4 MB 1.08-1.15x forward, 1.03-1.21x backward, 1.24-1.39x backprop;
#: 8 MB 1.22-1.29x, 1.10-1.24x, 1.29-1.36x; one chunk (32 MB) 1.27-1.36x,
#: 1.29-1.41x, 1.42-1.44x. (At load 6 small chunks lost: 1 MB 8.9x, 4 MB 2.6x,
#: one chunk 1.2x; and in this machine's slow phases, when every kernel runs
#: at half speed, one chunk still wins.)
_CHUNK_BYTES = 1 << 22
#: Kernels with at most this many taps (``kh*kw*c``) run conv2d_forward as a
#: direct loop (when ``_DIRECT_FWD``; tests switch it off to compare with the
#: im2col path) and im2col tap by tap. Keras' first layer (3x3 on one channel,
#: batch 128, one thread, CPU time): the direct loop 2.0 ms, im2col + GEMM +
#: epilogue 2.2 ms, the GEMM alone 0.9 ms, the reference 4.7 ms. Its
#: conv2d_backward stays a GEMM: a direct loop summing into ``dw`` took 8.7 ms
#: against 3.5 ms.
_DIRECT_MAX_TAPS = 16
_DIRECT_FWD = True

_local = threading.local()


def _workspace(slot, dtype, size):
    """This thread's scratch array ``slot`` of ``dtype``, at least ``size``
    elements (1-D; its first ``size`` are returned), grown on demand."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    key = (slot, np.dtype(dtype))
    buf = buffers.get(key)
    if buf is None or buf.size < size:
        buf = buffers[key] = np.empty(size, dtype)
    return buf[:size]


def _chunk_rows(m, k, itemsize, whole=1):
    """Rows per chunk: ``_CHUNK_BYTES`` of ``k`` columns, a multiple of
    ``whole`` (rows of one image) where one fits, at most ``m``."""
    rows = max(1, _CHUNK_BYTES // (k * itemsize))
    if rows >= whole:
        rows -= rows % whole
    return max(1, min(rows, m))


# ------------------------------------------------------------ loop bodies
#
# A GEMM row r is the output pixel (n, p, q) with r = (n*P + p)*Q + q. The
# bodies decode their first row once and then step (n, p, q) along (integer
# division per row cost more than a window's copy at small channel counts).

@_scalar
def _decode(r, p, q):
    """``(n, p, q)`` of GEMM row ``r``."""
    nq = r // q
    nn = nq // p
    return nn, nq - nn * p, r - nq * q


@_scalar
def _next(nn, pp, qq, p, q):
    """The pixel after ``(nn, pp, qq)`` in row-major order."""
    qq += 1
    if qq == q:
        qq = 0
        pp += 1
        if pp == p:
            pp = 0
            nn += 1
    return nn, pp, qq


def _im2col_rows(lo, hi, x, cols, r0, kh, kw, sh, sw, top, left, p, q):
    """``cols[t]`` = the window of GEMM row ``r0 + t`` for ``lo <= t < hi``,
    in (i, j, c) order, 0 in the padding. A window row is one contiguous block
    of ``x`` (clipped at the left and right edges)."""
    h, wd, c = x.shape[1], x.shape[2], x.shape[3]
    xf = x.reshape(-1)
    kwc = kw * c
    nn, pp, qq = _decode(r0 + lo, p, q)
    for t in range(lo, hi):
        row = cols[t]
        y0 = pp * sh - top
        x0 = qq * sw - left
        j0 = max(0, -x0)
        j1 = min(kw, wd - x0)
        for i in range(kh):
            seg = row[i * kwc:(i + 1) * kwc]
            yy = y0 + i
            if yy < 0 or yy >= h:
                for e in range(kwc):
                    seg[e] = 0
                continue
            for e in range(j0 * c):
                seg[e] = 0
            base = ((nn * h + yy) * wd + x0 + j0) * c
            src = xf[base:base + (j1 - j0) * c]
            dst = seg[j0 * c:j1 * c]
            for e in range(src.size):
                dst[e] = src[e]
            for e in range(j1 * c, kwc):
                seg[e] = 0
        nn, pp, qq = _next(nn, pp, qq, p, q)


_IM2COL = _Kernel(_im2col_rows, align=1)


def _im2col_taps_kernel(taps):
    """im2col for a kernel with ``taps`` taps (few): each row gathered tap by
    tap through the taps' offsets (a loop of constant length, unrolled), the
    window copied with its zeros where it reaches into the padding."""

    def im2col_taps(lo, hi, x, cols, r0, tab, kh, kw, sh, sw, top, left, p, q):
        xf = x.reshape(-1)
        nn, pp, qq = _decode(r0 + lo, p, q)
        for t in range(lo, hi):
            row = cols[t]
            corner = _corner(x, nn, pp, qq, kh, kw, sh, sw, top, left)
            if corner >= 0:
                for k in range(taps):
                    row[k] = xf[corner + tab[k]]
            else:
                _padded_window(xf, x, row, nn, pp, qq, kh, kw, sh, sw, top, left)
            nn, pp, qq = _next(nn, pp, qq, p, q)

    return _Kernel(_named(im2col_taps, str(taps)), align=1)


def _im2col_taps(taps):
    return _specialised(("im2col_taps", taps), _im2col_taps_kernel, taps)


def _row_sums64(lo, hi, a, acc):
    """``acc += a[lo:hi].sum(0)``, accumulated in float64."""
    a = a[lo:hi]
    for r in range(a.shape[0]):
        row = a[r]
        for j in range(acc.size):
            acc[j] += np.float64(row[j])


_ROW_SUMS64 = _entry(_scalar(_row_sums64))


@_scalar
def _corner(x, nn, pp, qq, kh, kw, sh, sw, top, left):
    """Flat index in ``x`` of the window's corner at output pixel ``(nn, pp, qq)``,
    or -1 when the window reaches into the padding."""
    h, wd, c = x.shape[1], x.shape[2], x.shape[3]
    y0 = pp * sh - top
    x0 = qq * sw - left
    if y0 >= 0 and y0 + kh <= h and x0 >= 0 and x0 + kw <= wd:
        return ((nn * h + y0) * wd + x0) * c
    return -1


@_scalar
def _padded_window(xf, x, win, nn, pp, qq, kh, kw, sh, sw, top, left):
    """``win[(i, j, c)] = xpad[n, p*sh + i, q*sw + j, c]`` at output pixel
    ``(nn, pp, qq)``, for a window that reaches into the padding (zeros there)."""
    h, wd, c = x.shape[1], x.shape[2], x.shape[3]
    y0 = pp * sh - top
    x0 = qq * sw - left
    kwc = kw * c
    j0 = max(0, -x0)
    j1 = min(kw, wd - x0)
    for i in range(kh):
        yy = y0 + i
        if yy < 0 or yy >= h:
            for e in range(i * kwc, (i + 1) * kwc):
                win[e] = 0
            continue
        for e in range(i * kwc, (i * kw + j0) * c):
            win[e] = 0
        base = ((nn * h + yy) * wd + x0 + j0) * c - (i * kw + j0) * c
        for e in range((i * kw + j0) * c, (i * kw + j1) * c):
            win[e] = xf[base + e]
        for e in range((i * kw + j1) * c, (i + 1) * kwc):
            win[e] = 0


def _tap_table(tab, kh, kw, c, wd):
    """``tab[(i, j, ch)]`` = offset of the tap in ``x`` from the window's corner."""
    t = 0
    for i in range(kh):
        for j in range(kw):
            for ch in range(c):
                tab[t] = (i * wd + j) * c + ch
                t += 1


_TAP_TABLE = _entry(_scalar(_tap_table))


class _DirectConv:
    """conv2d_forward of a kernel with ``taps`` taps and activation ``act`` as
    one loop over the output rows: for each filter the sum over the taps (a
    loop of constant length: unrolled, so the filter loop is vectorized with
    the sums in registers), then bias and activation. Named
    ``direct_conv__relu__9``."""

    def __init__(self, act, taps):
        f = _ACT[act][0]

        def direct_conv(lo, hi, x, w, b, z, out, wins, tab, step, kh, kw, sh, sw, top, left,
                        p, q):
            win = wins[lo // step]
            xf = x.reshape(-1)
            o = b.size
            zero = _c(b[0], 0.0)
            nn, pp, qq = _decode(lo, p, q)
            for r in range(lo, hi):
                corner = _corner(x, nn, pp, qq, kh, kw, sh, sw, top, left)
                if corner >= 0:
                    for t in range(taps):
                        win[t] = xf[corner + tab[t]]
                else:
                    _padded_window(xf, x, win, nn, pp, qq, kh, kw, sh, sw, top, left)
                zr, orow = z[r], out[r]
                for e in range(o):
                    acc = zero
                    for t in range(taps):
                        acc += win[t] * w[t, e]
                    v = acc + b[e]
                    zr[e] = v
                    orow[e] = f(v)
                nn, pp, qq = _next(nn, pp, qq, p, q)

        def direct_conv_inplace(lo, hi, x, w, b, out, wins, tab, step, kh, kw, sh, sw, top,
                                left, p, q):
            win = wins[lo // step]
            xf = x.reshape(-1)
            o = b.size
            zero = _c(b[0], 0.0)
            nn, pp, qq = _decode(lo, p, q)
            for r in range(lo, hi):
                corner = _corner(x, nn, pp, qq, kh, kw, sh, sw, top, left)
                if corner >= 0:
                    for t in range(taps):
                        win[t] = xf[corner + tab[t]]
                else:
                    _padded_window(xf, x, win, nn, pp, qq, kh, kw, sh, sw, top, left)
                orow = out[r]
                for e in range(o):
                    acc = zero
                    for t in range(taps):
                        acc += win[t] * w[t, e]
                    orow[e] = f(acc + b[e])
                nn, pp, qq = _next(nn, pp, qq, p, q)

        tag = str(taps)
        self.keep = _Kernel(_named(direct_conv, act, tag), align=1)
        self.inplace = _Kernel(_named(direct_conv_inplace, act, tag), align=1)


def _direct_conv(act, taps):
    return _specialised(("direct_conv", act, taps), _DirectConv, act, taps)


def _scratch(x, kh, kw):
    """This thread's window copies, one row per parallel chunk
    (``_runtime._num_threads`` of them), and the taps' offsets in ``x``."""
    taps = kh * kw * x.shape[3]
    slots = max(1, _runtime._num_threads)
    wins = _workspace("window", x.dtype, slots * taps).reshape(slots, taps)
    return wins, _taps(x, kh, kw), slots


def _taps(x, kh, kw):
    """The taps' offsets in ``x`` from a window's corner (this thread's workspace)."""
    tab = _workspace("taps", np.int64, kh * kw * x.shape[3])
    _TAP_TABLE(tab, kh, kw, x.shape[3], x.shape[2])
    return tab


class _ConvActKernels:
    """The loops of conv2d_backprop and maxpool2d_backward that an activation
    specialises, each named after it (``col2im__relu``)."""

    def __init__(self, act):
        d = _ACT[act][1]
        derivative = act != "identity"

        def col2im(lo, hi, dcols, r0, r1, out, s, kh, kw, sh, sw, top, left, p, q):
            # images n0+lo..n0+hi of the chunk of GEMM rows r0..r1: their rows
            # added at their place; an image's first row zeroes it, its last
            # multiplies the derivative in (the image is in cache)
            hh, wd, c = out.shape[1], out.shape[2], out.shape[3]
            pq = p * q
            kwc = kw * c
            n0 = r0 // pq
            for t in range(lo, hi):
                nn = n0 + t
                first = nn * pq
                a = max(first, r0)
                end = min(first + pq, r1)
                img = out[nn].reshape(-1)
                if a == first:
                    for e in range(img.size):
                        img[e] = 0
                _, pp, qq = _decode(a, p, q)
                for r in range(a, end):
                    drow = dcols[r - r0]
                    y0 = pp * sh - top
                    x0 = qq * sw - left
                    j0 = max(0, -x0)
                    j1 = min(kw, wd - x0)
                    for i in range(kh):
                        yy = y0 + i
                        if yy < 0 or yy >= hh:
                            continue
                        base = (yy * wd + x0 + j0) * c
                        dst = img[base:base + (j1 - j0) * c]
                        src = drow[i * kwc + j0 * c:i * kwc + j1 * c]
                        for e in range(dst.size):
                            dst[e] += src[e]
                    _, pp, qq = _next(0, pp, qq, p, q)
                if derivative and end == first + pq:
                    sf = s[nn].reshape(-1)
                    for e in range(img.size):
                        img[e] = img[e] * d(sf[e])

        def pool_backward(lo, hi, dy, argmax, s, out, ph, pw, sh, sw):
            # input rows lo..hi of (n*h): the row zeroed, then for each window
            # offset (i, j) in increasing order (the reference's order) the
            # dy of the windows whose argmax is it added at their place, then
            # the row times act'(s): one write of the row, in cache
            p, q, c = dy.shape[1], dy.shape[2], dy.shape[3]
            hh = out.shape[1]
            for t in range(lo, hi):
                nn = t // hh
                yy = t - nn * hh
                orow = out[nn, yy].reshape(-1)
                for e in range(orow.size):
                    orow[e] = 0
                for i in range(ph):
                    py = yy - i
                    if py < 0 or py % sh != 0 or py // sh >= p:
                        continue
                    pp = py // sh
                    for j in range(pw):
                        k = np.int32(i * pw + j)
                        for qq in range(q):
                            dst = orow[(qq * sw + j) * c:(qq * sw + j + 1) * c]
                            arow = argmax[nn, pp, qq]
                            drow = dy[nn, pp, qq]
                            for e in range(c):
                                g = drow[e] if arow[e] == k else _c(drow[e], 0.0)
                                dst[e] += g
                if derivative:
                    srow = s[nn, yy].reshape(-1)
                    for e in range(orow.size):
                        orow[e] = orow[e] * d(srow[e])

        self.col2im = _Kernel(_named(col2im, act), align=1)
        self.pool_backward = _Kernel(_named(pool_backward, act), align=1)


def _conv_kernels(act):
    return _specialised(("conv", act), _ConvActKernels, act)


def _pool_forward_rows(lo, hi, x, out, argmax, ph, pw, sh, sw):
    """Output rows ``lo..hi`` of ``(n*p)``: window maxima, the first on ties,
    a NaN wins (the first NaN); ``argmax`` the winner's ``i*pw + j``."""
    p, q, c = out.shape[1], out.shape[2], out.shape[3]
    for t in range(lo, hi):
        nn = t // p
        pp = t - nn * p
        for qq in range(q):
            orow = out[nn, pp, qq]
            arow = argmax[nn, pp, qq]
            x0 = x[nn, pp * sh, qq * sw]
            for e in range(c):
                orow[e] = x0[e]
                arow[e] = 0
            for i in range(ph):
                for j in range(pw):
                    k = np.int32(i * pw + j)
                    if k == 0:
                        continue
                    s = x[nn, pp * sh + i, qq * sw + j]
                    for e in range(c):
                        v = s[e]
                        cur = orow[e]
                        # v wins where it is greater, or NaN while cur is not
                        take = (not (v <= cur)) & (cur == cur)
                        orow[e] = v if take else cur
                        arow[e] = k if take else arow[e]


_POOL_FORWARD = _Kernel(_pool_forward_rows, align=1)

#: Pools up to this many elements get a loop of their own (see _pool_kernel).
_POOL_UNROLL_MAX = 9


def _pool_kernel(ph, pw):
    """maxpool2d_forward for a ``ph x pw`` pool: the window's loops have
    constant lengths, so LLVM unrolls them and one loop along the channels
    takes each output pixel (the general loop runs ``ph*pw`` loops of the
    channels per pixel). Named ``pool_forward__2x2``."""

    def pool_forward(lo, hi, x, out, argmax, sh, sw):
        p, q, c = out.shape[1], out.shape[2], out.shape[3]
        for t in range(lo, hi):
            nn = t // p
            pp = t - nn * p
            for qq in range(q):
                orow = out[nn, pp, qq]
                arow = argmax[nn, pp, qq]
                y0, x0 = pp * sh, qq * sw
                for e in range(c):
                    best = x[nn, y0, x0, e]
                    k = np.int32(0)
                    for i in range(ph):
                        for j in range(pw):
                            v = x[nn, y0 + i, x0 + j, e]
                            # v wins where it is greater, or NaN while best is not
                            take = (not (v <= best)) & (best == best)
                            best = v if take else best
                            k = np.int32(i * pw + j) if take else k
                    orow[e] = best
                    arow[e] = k

    return _Kernel(_named(pool_forward, f"{ph}x{pw}"), align=1)


# ------------------------------------------------------------ the kernels

def _im2col(x, cols, r0, kh, kw, sh, sw, top, left, p, q):
    """GEMM rows ``r0 .. r0 + len(cols)`` of the im2col matrix into ``cols``:
    tap by tap for kernels with few taps, else block by block."""
    m, taps = cols.shape
    t = max(1, PARALLEL_MIN["cheap"] // taps)
    if taps <= _DIRECT_MAX_TAPS:
        _launch(_im2col_taps(taps), m, t, x, cols, r0, _taps(x, kh, kw), kh, kw, sh, sw, top,
                left, p, q)
    else:
        _launch(_IM2COL, m, t, x, cols, r0, kh, kw, sh, sw, top, left, p, q)


def _geometry(stride, padding):
    sh, sw = stride
    top, bottom, left, right = padding
    return int(sh), int(sw), int(top), int(left)


def _plain(kh, kw, sh, sw, padding):
    """A 1x1 kernel at stride 1 without padding: ``x`` is its own im2col."""
    return kh == 1 and kw == 1 and sh == 1 and sw == 1 and not any(padding)


def conv2d_forward(x, w, b, act, out, preact=None, stride=(1, 1), padding=(0, 0, 0, 0)):
    """2-D convolution (cross-correlation), NHWC, fused with bias and activation:
    ``out = act(z)``, ``z[n,p,q,o] = b[o] + sum_{i,j,c} xpad[n, p*sh+i, q*sw+j, c] * w[i,j,c,o]``.

    im2col of a chunk of output rows into this thread's workspace, one GEMM
    of the chunk (NumPy's BLAS), then bias + activation over the chunk; a
    kernel with few taps is one direct loop (see the module's docstring).

    Parameters
    ----------
    x : ndarray (n, h, w, c). IN
    w : ndarray (kh, kw, c, o). IN
    b : ndarray (o,). IN
    act : str
    out : ndarray (n, p, q, o). OUT
    preact : ndarray (n, p, q, o) or None. OUT: receives ``z``.
    stride : (int, int)
    padding : (int, int, int, int)
        ``(top, bottom, left, right)`` zeros.
    """
    kh, kw, c, o = w.shape
    n, p, q = out.shape[:3]
    sh, sw, top, left = _geometry(stride, padding)
    m, taps = n * p * q, kh * kw * c
    z = out if preact is None else preact
    z2, out2, w2 = z.reshape(m, o), out.reshape(m, o), w.reshape(taps, o)
    if taps <= _DIRECT_MAX_TAPS and _DIRECT_FWD:
        k = _direct_conv(act, taps)
        wins, tab, slots = _scratch(x, kh, kw)
        step = _chunk(m, slots, 1)
        t = max(1, PARALLEL_MIN["cheap"] // (o * taps))
        if preact is None:
            _launch(k.inplace, m, t, x, w2, b, out2, wins, tab, step, kh, kw, sh, sw, top,
                    left, p, q)
        else:
            _launch(k.keep, m, t, x, w2, b, z2, out2, wins, tab, step, kh, kw, sh, sw, top,
                    left, p, q)
        return
    k = _act_kernels(act)
    t_act = max(1, _threshold(act) // o)
    if _plain(kh, kw, sh, sw, padding):
        np.matmul(x.reshape(m, c), w2, out=z2)
        if preact is None:
            _launch(k.bias_act_inplace, m, t_act, out2, b)
        else:
            _launch(k.bias_act, m, t_act, z2, b, out2)
        return
    rows = _chunk_rows(m, taps, x.itemsize)
    ws = _workspace("cols", x.dtype, rows * taps)
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        cols = ws[:(r1 - r0) * taps].reshape(r1 - r0, taps)
        _im2col(x, cols, r0, kh, kw, sh, sw, top, left, p, q)
        zc = z2[r0:r1]
        np.matmul(cols, w2, out=zc)
        if preact is None:
            _launch(k.bias_act_inplace, r1 - r0, t_act, zc, b)
        else:
            _launch(k.bias_act, r1 - r0, t_act, zc, b, out2[r0:r1])


def conv2d_backward(x, dz, dw, db, stride=(1, 1), padding=(0, 0, 0, 0)):
    """Parameter gradients of a convolution (overwritten, not accumulated):
    ``dw[i,j,c,o] = sum_{n,p,q} xpad[n, p*sh+i, q*sw+j, c] * dz[n,p,q,o]``,
    ``db[o] = sum_{n,p,q} dz[n,p,q,o]`` (in float64, rounded once).

    ``dw`` is the sum over chunks of GEMM rows of ``cols.T @ dz`` (NumPy's
    BLAS; no im2col for a 1x1 kernel at stride 1 without padding), ``db``
    summed over each chunk of ``dz`` after its GEMM, in float64.

    Parameters
    ----------
    x : ndarray (n, h, w, c). IN
    dz : ndarray (n, p, q, o). IN
    dw : ndarray (kh, kw, c, o). OUT
    db : ndarray (o,). OUT
    stride, padding
        As in :func:`conv2d_forward`.
    """
    kh, kw, c, o = dw.shape
    n, p, q = dz.shape[:3]
    sh, sw, top, left = _geometry(stride, padding)
    m, taps = n * p * q, kh * kw * c
    dz2, dw2 = dz.reshape(m, o), dw.reshape(taps, o)
    acc_db = _workspace("db", np.float64, o)
    acc_db[:] = 0
    if _plain(kh, kw, sh, sw, padding):
        np.matmul(x.reshape(m, c).T, dz2, out=dw2)
        _ROW_SUMS64(0, m, dz2, acc_db)
        db[:] = acc_db
        return
    rows = _chunk_rows(m, taps, x.itemsize)
    ws = _workspace("cols", x.dtype, rows * taps)
    part = _workspace("dw", dw.dtype, taps * o).reshape(taps, o) if rows < m else None
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        cols = ws[:(r1 - r0) * taps].reshape(r1 - r0, taps)
        _im2col(x, cols, r0, kh, kw, sh, sw, top, left, p, q)
        dzc = dz2[r0:r1]
        if r0 == 0:
            np.matmul(cols.T, dzc, out=dw2)
        else:
            np.matmul(cols.T, dzc, out=part)
            dw2 += part
        _ROW_SUMS64(0, r1 - r0, dzc, acc_db)
    db[:] = acc_db


def conv2d_backprop(dz, w, z, y, act, out, stride=(1, 1), padding=(0, 0, 0, 0)):
    """Delta of the layer below a convolution: the transposed convolution of
    ``dz`` cropped to the unpadded input, times the derivative of the
    activation below: ``out[n,h,w,c] = act'(z or y) * sum dz[n,p,q,o] * w[i,j,c,o]``
    over ``p*sh + i - top == h``, ``q*sw + j - left == w``.

    ``dz @ w.T`` per chunk of whole images (NumPy's BLAS) into this thread's
    workspace, then col2im with the derivative multiplied into each image once
    it is complete. A 1x1 kernel at stride 1 without padding is
    ``backprop_delta`` on the images as rows.

    Parameters
    ----------
    dz : ndarray (n, p, q, o). IN
    w : ndarray (kh, kw, c, o). IN
    z, y : ndarray (n, h, w, c) or None. IN (see ``backprop_delta``)
    act : str
    out : ndarray (n, h, w, c). OUT
    stride, padding
        As in :func:`conv2d_forward`.
    """
    kh, kw, c, o = w.shape
    n, p, q = dz.shape[:3]
    sh, sw, top, left = _geometry(stride, padding)
    m, taps = n * p * q, kh * kw * c
    dz2, w2 = dz.reshape(m, o), w.reshape(taps, o)
    if _plain(kh, kw, sh, sw, padding):
        # out is (n*p*q, c) itself: one GEMM and the derivative in place
        backprop_delta(dz2, w2, None if z is None else z.reshape(m, c),
                       None if y is None else y.reshape(m, c), act, out.reshape(m, c))
        return
    s = out if act == "identity" else _derivative_source(act, z, y)
    k = _conv_kernels(act)
    pq = p * q
    rows = _chunk_rows(m, taps, out.itemsize, whole=pq)
    ws = _workspace("cols", out.dtype, rows * taps)
    img_work = pq * taps
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        dcols = ws[:(r1 - r0) * taps].reshape(r1 - r0, taps)
        np.matmul(dz2[r0:r1], w2.T, out=dcols)
        images = (r1 - 1) // pq - r0 // pq + 1
        t = max(1, PARALLEL_MIN["cheap"] // img_work)
        _launch(k.col2im, images, t, dcols, r0, r1, out, s, kh, kw, sh, sw, top, left, p, q)


def maxpool2d_forward(x, out, argmax, pool=(2, 2), stride=None):
    """Max pooling without padding, NHWC: ``out[n,p,q,c] = max_{i<ph, j<pw}
    x[n, p*sh+i, q*sw+j, c]``, ``argmax`` the winner's ``i*pw + j`` (the first
    on ties; a NaN wins, the first NaN of the window).

    One pass over the output rows, vectorized along the channels (pools of
    up to ``_POOL_UNROLL_MAX`` elements: the window unrolled).

    Parameters
    ----------
    x : ndarray (n, h, w, c). IN
    out : ndarray (n, p, q, c). OUT
    argmax : int32 ndarray (n, p, q, c). OUT
    pool : (int, int)
    stride : (int, int) or None
        None: ``pool``.
    """
    ph, pw = pool
    sh, sw = pool if stride is None else stride
    n, p = out.shape[:2]
    t = max(1, PARALLEL_MIN["cheap"] // (x.size // (n * p)))
    if ph * pw <= _POOL_UNROLL_MAX:
        k = _specialised(("pool_forward", int(ph), int(pw)), _pool_kernel, int(ph), int(pw))
        _launch(k, n * p, t, x, out, argmax, int(sh), int(sw))
    else:
        _launch(_POOL_FORWARD, n * p, t, x, out, argmax, int(ph), int(pw), int(sh), int(sw))


def maxpool2d_backward(dy, argmax, z, y, act, out, pool=(2, 2), stride=None):
    """Gradient through max pooling times the derivative of the activation
    below the pool: ``out = act'(z or y) * g``, ``g`` the sum of the ``dy`` of
    the windows whose ``argmax`` chose the position (0 where none did).

    One pass over the input: every element gathered and written once.

    Parameters
    ----------
    dy : ndarray (n, p, q, c). IN
    argmax : int32 ndarray (n, p, q, c). IN
    z, y : ndarray (n, h, w, c) or None. IN (see ``backprop_delta``)
    act : str
    out : ndarray (n, h, w, c). OUT
    pool, stride
        As in :func:`maxpool2d_forward`.
    """
    ph, pw = pool
    sh, sw = pool if stride is None else stride
    n, h = out.shape[:2]
    s = out if act == "identity" else _derivative_source(act, z, y)
    k = _conv_kernels(act)
    t = max(1, _threshold(act, derivative=True) // (out.size // (n * h)))
    _launch(k.pool_backward, n * h, t, dy, argmax, s, out, int(ph), int(pw), int(sh), int(sw))
