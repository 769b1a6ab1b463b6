"""The ``numba.cuda`` kernels of the convolutional layers behind ``fastnn.kernels.cuda``.

NHWC images, as in the contract (``kernels/reference.py``). Imported only by
``fastnn.kernels.cuda`` once it has found numba-cuda and a GPU (or the
simulator); nothing here allocates or copies: ``cuda.py`` stages the arrays,
keeps the per-thread workspace, chooses launch shapes and runs the GEMMs
(cuBLAS, or the tiled kernel of ``_cuda_kernels``) between these kernels.

What each kernel is for:

* ``im2col``: the columns ``(n*p*q, kh*kw*c)`` of a convolution in the
  workspace, so that ``conv2d_forward`` is one GEMM with the bias +
  activation epilogue and ``conv2d_backward``'s ``dw`` one GEMM;
* ``col2im_delta``: ``conv2d_backprop``'s gather of the GEMM's
  ``dz @ w.T`` columns back onto the input (overlapping windows summed,
  padding cropped), times the derivative of the layer below, one thread per
  input element, so no atomics and the sum order of the reference;
* ``column_partials`` + ``column_finish``: ``db``, a column sum in float64
  (the contract's rounding) over many row blocks, then one rounding;
* ``maxpool_forward`` / ``maxpool_backward``: a thread per output / input
  element (the backward pass gathers from the windows that contain its
  element, in the reference's order, and multiplies by the derivative);
* ``dropout``: the splitmix64 mask computed in the loop that applies it.

Launch conventions: every kernel but ``column_partials`` is a 1-D
grid-stride loop of ``BLOCK`` threads per block over flat (C-order) arrays,
whose index arithmetic is in int64; ``column_partials`` runs ``(CW, RW)``
threads per block on a ``(ceil(cols/CW), parts)`` grid. Everything computes
in the arrays' dtype (constants of that dtype, see ``_cuda_kernels``) except
the ``db`` sums (float64 by contract) and the dropout hash (uint64).
"""

import functools

import numpy as np
from numba import cuda

from . import _cuda_kernels as K
from ._cuda_kernels import CW, RW, SIMULATOR

#: splitmix64 constants (the contract's dropout mask), uint64.
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
S27, S30, S31, S40 = np.uint64(27), np.uint64(30), np.uint64(31), np.uint64(40)

_built = {}


def _quiet(fn):
    """``fn`` under ``np.errstate(all="ignore")``, as ``_cuda_kernels._quiet``.
    Defined again here because the simulator swaps its fake ``cuda`` module
    into the globals of the function it launches: the wrapper must live in
    this module for the kernels' own ``cuda`` to be swapped."""
    @functools.wraps(fn)
    def quiet(*args):
        with np.errstate(all="ignore"):
            return fn(*args)
    return quiet


#: The decorator of every kernel (``cuda.jit``; quiet under the simulator).
kernel = (lambda fn: cuda.jit(_quiet(fn))) if SIMULATOR else cuda.jit


def kernels(dtype):
    """The convolution kernel set for ``dtype`` (float32 or float64), built on first use."""
    ks = _built.get(dtype)
    if ks is None:
        ks = _built[dtype] = build(np.dtype(dtype))
    return ks


def build(dtype):
    """Compile-on-first-call kernels for ``dtype`` with constants of that dtype,
    around the activation derivatives of ``_cuda_kernels.kernels(dtype)``.

    Returns
    -------
    _cuda_kernels.KernelSet
    """
    F = dtype.type
    F64 = cuda.float64
    ZERO = F(0)
    ZERO64 = np.float64(0)
    base = K.kernels(dtype)
    store_delta = base.store_delta

    # Index arithmetic: a grid-stride loop splits its start and its stride
    # into NHWC digits once per thread (``split``) and then advances the
    # digits with carries (``step``), so the loop body does no integer
    # division (int64 floor division is a long instruction sequence on a GPU).

    @cuda.jit(device=True)
    def split(e, r1, r2, r3):
        """Digits ``(a, b, c, d)`` of ``e = ((a*r1 + b)*r2 + c)*r3 + d``
        (``b < r1``, ``c < r2``, ``d < r3``; ``a`` unbounded)."""
        t = e // r3
        d = e - t * r3
        u = t // r2
        c = t - u * r2
        a = u // r1
        return a, u - a * r1, c, d

    @cuda.jit(device=True)
    def step(a, b, c, d, sa, sb, sc, sd, r1, r2, r3):
        """The digits of ``(a, b, c, d) + (sa, sb, sc, sd)`` (both in the radices
        of ``split``; a sum of two digits carries at most one)."""
        d += sd
        if d >= r3:
            d -= r3
            c += 1
        c += sc
        if c >= r2:
            c -= r2
            b += 1
        b += sb
        if b >= r1:
            b -= r1
            a += 1
        return a + sa, b, c, d

    @kernel
    def im2col(x, cols, h, w, c, p, q, kh, kw, sh, sw, top, left):
        """``cols[r, t] = xpad[n, pp*sh + i, qq*sw + j, ch]`` (0 in the padding)
        for row ``r = (n*p + pp)*q + qq`` and column ``t = (i*kw + j)*c + ch``
        of the flat ``(n*p*q, kh*kw*c)`` matrix; ``x`` flat NHWC. Consecutive
        threads write consecutive columns and read along ``(j, ch)``, contiguous
        in ``x``."""
        start, stride = cuda.grid(1), cuda.gridsize(1)
        k = kh * kw * c
        r = start // k
        _, i, j, ch = split(start - r * k, kh, kw, c)
        n, pp, qq, _ = split(r, p, q, 1)
        r = stride // k
        _, si, sj, sch = split(stride - r * k, kh, kw, c)
        sn, spp, sqq, _ = split(r, p, q, 1)
        for e in range(start, cols.size, stride):
            hh = pp * sh + i - top
            ww = qq * sw + j - left
            v = ZERO
            if hh >= 0 and hh < h and ww >= 0 and ww < w:
                v = x[((n * h + hh) * w + ww) * c + ch]
            cols[e] = v
            carry, i, j, ch = step(0, i, j, ch, 0, si, sj, sch, kh, kw, c)
            n, pp, qq, _ = step(n, pp, qq, 0, sn, spp, sqq, carry, p, q, 1)

    @cuda.jit(device=True)
    def conv_gather(cols, n, hh, ww, ch, c, p, q, kh, kw, sh, sw, top, left):
        """``sum cols[(n,pp,qq), (i,j,ch)]`` over ``(i, pp)`` with
        ``pp*sh + i == hh + top`` and ``(j, qq)`` with ``qq*sw + j == ww + left``,
        ``i`` then ``j`` ascending (the reference's order); ``cols`` flat
        ``(n*p*q, kh*kw*c)``. Two divisions: the first ``pp``, ``i`` (and
        ``qq``, ``j``); the next ones step by ``sh`` (``sw``)."""
        k = kh * kw * c
        acc = ZERO
        a = hh + top
        pp = a // sh
        i = a - pp * sh
        b = ww + left
        qq0 = b // sw
        j0 = b - qq0 * sw
        while i < kh and pp >= 0:
            if pp < p:
                row = (n * p + pp) * q
                j = j0
                qq = qq0
                while j < kw and qq >= 0:
                    if qq < q:
                        acc += cols[(row + qq) * k + (i * kw + j) * c + ch]
                    j += sw
                    qq -= 1
            i += sh
            pp -= 1
        return acc

    @cuda.jit(device=True)
    def pool_gather(dy, argmax, n, hh, ww, ch, c, p, q, ph, pw, sh, sw):
        """``sum dy[n,pp,qq,ch]`` over the windows ``(pp, qq)`` that contain
        ``(hh, ww)`` at ``(i, j) = (hh - pp*sh, ww - qq*sw)`` and chose it
        (``argmax == i*pw + j``), ``i`` then ``j`` ascending, as ``conv_gather``."""
        acc = ZERO
        pp = hh // sh
        i = hh - pp * sh
        qq0 = ww // sw
        j0 = ww - qq0 * sw
        while i < ph and pp >= 0:
            if pp < p:
                row = (n * p + pp) * q
                j = j0
                qq = qq0
                while j < pw and qq >= 0:
                    if qq < q:
                        o = (row + qq) * c + ch
                        if argmax[o] == i * pw + j:
                            acc += dy[o]
                    j += sw
                    qq -= 1
            i += sh
            pp -= 1
        return acc

    @kernel
    def col2im_delta(dcols, h, w, c, p, q, kh, kw, sh, sw, top, left, act, z, y, out):
        """``out[n,hh,ww,ch] = act'(z or y) * sum dcols[(n,pp,qq), (i,j,ch)]`` over
        the windows with ``pp*sh + i - top == hh`` and ``qq*sw + j - left == ww``
        (``conv_gather``); ``dcols`` is the flat ``(n*p*q, kh*kw*c)`` product
        ``dz @ w.T``, ``out``, ``z``, ``y`` flat NHWC (the unused one of ``z``,
        ``y`` may be any array)."""
        start, stride = cuda.grid(1), cuda.gridsize(1)
        n, hh, ww, ch = split(start, h, w, c)
        sn, shh, sww, sch = split(stride, h, w, c)
        for e in range(start, out.size, stride):
            acc = conv_gather(dcols, n, hh, ww, ch, c, p, q, kh, kw, sh, sw, top, left)
            store_delta(acc, act, z, y, out, e)
            n, hh, ww, ch = step(n, hh, ww, ch, sn, shh, sww, sch, h, w, c)

    @kernel
    def column_partials(a, rows, cols, partials):
        """``partials[by, j] = sum a[r, j]`` in float64 over the rows ``r`` of
        row block ``by = blockIdx.y`` (rows ``by*RW + ty`` strided by
        ``gridDim.y*RW``); ``a`` flat ``(rows, cols)``, ``partials`` flat
        ``(gridDim.y, cols)`` float64. Threads along x read consecutive columns."""
        sh = cuda.shared.array((RW, CW), F64)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        j = cuda.blockIdx.x * CW + tx
        s = ZERO64
        if j < cols:
            for r in range(cuda.blockIdx.y * RW + ty, rows, cuda.gridDim.y * RW):
                s += F64(a[r * cols + j])
        sh[ty, tx] = s
        cuda.syncthreads()
        half = RW // 2
        while half > 0:
            if ty < half:
                sh[ty, tx] += sh[ty + half, tx]
            cuda.syncthreads()
            half //= 2
        if ty == 0 and j < cols:
            partials[cuda.blockIdx.y * cols + j] = sh[0, tx]

    @kernel
    def column_finish(partials, parts, out):
        """``out[j] = sum_b partials[b, j]``, summed in float64 and rounded once
        to ``out``'s dtype (``partials`` flat ``(parts, out.size)``)."""
        start, stride = cuda.grid(1), cuda.gridsize(1)
        cols = out.size
        for j in range(start, cols, stride):
            s = ZERO64
            for b in range(parts):
                s += partials[b * cols + j]
            out[j] = F(s)

    @kernel
    def maxpool_forward(x, out, argmax, h, w, c, p, q, ph, pw, sh, sw):
        """``out[n,pp,qq,ch] = max_{i<ph, j<pw} x[n, pp*sh+i, qq*sw+j, ch]`` and
        ``argmax = i*pw + j`` of the first maximum in row-major window order; a
        NaN is the maximum (the first NaN wins). Flat NHWC arrays, ``argmax``
        int32."""
        start, stride = cuda.grid(1), cuda.gridsize(1)
        n, pp, qq, ch = split(start, p, q, c)
        sn, spp, sqq, sch = split(stride, p, q, c)
        for e in range(start, out.size, stride):
            origin = ((n * h + pp * sh) * w + qq * sw) * c + ch
            best = x[origin]
            arg = 0
            for i in range(ph):
                for j in range(pw):
                    v = x[origin + (i * w + j) * c]
                    # v > best, or v NaN while best is not (as the reference)
                    if not (v <= best) and best == best:
                        best = v
                        arg = i * pw + j
            out[e] = best
            argmax[e] = arg
            n, pp, qq, ch = step(n, pp, qq, ch, sn, spp, sqq, sch, p, q, c)

    @kernel
    def maxpool_backward(dy, argmax, h, w, c, p, q, ph, pw, sh, sw, act, z, y, out):
        """``out[n,hh,ww,ch] = act'(z or y) * sum dy[n,pp,qq,ch]`` over the windows
        ``(pp, qq)`` whose ``argmax`` is ``i*pw + j`` with ``pp*sh + i == hh``,
        ``qq*sw + j == ww`` (``pool_gather``; 0 where no window chose the element).
        Flat NHWC arrays."""
        start, stride = cuda.grid(1), cuda.gridsize(1)
        n, hh, ww, ch = split(start, h, w, c)
        sn, shh, sww, sch = split(stride, h, w, c)
        for e in range(start, out.size, stride):
            acc = pool_gather(dy, argmax, n, hh, ww, ch, c, p, q, ph, pw, sh, sw)
            store_delta(acc, act, z, y, out, e)
            n, hh, ww, ch = step(n, hh, ww, ch, sn, shh, sww, sch, h, w, c)

    @kernel
    def dropout(x, out, seed, threshold, scale, copy):
        """Inverted dropout over flat arrays (``out`` may be ``x``): element
        ``e`` is kept iff ``splitmix64(seed + (e+1)*GOLDEN) >> 40 >= threshold``
        (uint64, wrapping); ``out = x*scale`` where kept, ``+0.0`` where
        dropped; ``copy`` (rate 0): ``out = x``."""
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for e in range(start, out.size, stride):
            if copy:
                out[e] = x[e]
                continue
            s = np.uint64(e + 1) * GOLDEN + seed
            s ^= s >> S30
            s *= MIX1
            s ^= s >> S27
            s *= MIX2
            s ^= s >> S31
            if (s >> S40) >= threshold:
                out[e] = x[e] * scale
            else:
                out[e] = ZERO

    return K.KernelSet(dtype, im2col=im2col, col2im_delta=col2im_delta,
                       column_partials=column_partials, column_finish=column_finish,
                       maxpool_forward=maxpool_forward, maxpool_backward=maxpool_backward,
                       dropout=dropout)
