"""The reference's convolution, pooling and dropout kernels against independent checks.

* Direct formulas: plain Python loops over every index of DESIGN.md's sums
  (tiny shapes), for the convolution, its two gradients, max pooling and its
  scatter; ``np.einsum`` over explicitly gathered windows as a second formula.
* Central finite differences in float64 of scalar losses through the forward
  kernels, for ``conv2d_backward``, ``conv2d_backprop`` and
  ``maxpool2d_backward`` with their fused activation derivatives (inputs kept
  away from relu's kink and from ties).
* Dropout: the hash against a pure-Python-int splitmix64, the kept fraction
  against ``1 - rate`` (4 standard deviations, a million elements), and the
  mask's properties (same seed, other seed, both dtypes, in place, backward).
"""

import itertools
import math

import numpy as np
import pytest

from fastnn.kernels import reference as ref
from conftest import DTYPES, assert_close

F64 = np.float64


def _out_size(size, k, s, before=0, after=0):
    return (size + before + after - k) // s + 1


# ------------------------------------------------------------ direct formulas (loops)

def conv_direct(x, w, b, stride, pad):
    """``z[n,p,q,o] = b[o] + sum_{i,j,c} xpad[n, p*sh+i, q*sw+j, c] * w[i,j,c,o]``,
    reading ``x`` with explicit bounds (no padded copy)."""
    n, h, wd, c = x.shape
    kh, kw, _, o = w.shape
    (sh, sw), (top, bottom, left, right) = stride, pad
    p, q = _out_size(h, kh, sh, top, bottom), _out_size(wd, kw, sw, left, right)
    z = np.zeros((n, p, q, o))
    for a, pp, qq, oo in itertools.product(range(n), range(p), range(q), range(o)):
        s = float(b[oo])
        for i, j, cc in itertools.product(range(kh), range(kw), range(c)):
            r, col = pp * sh + i - top, qq * sw + j - left
            if 0 <= r < h and 0 <= col < wd:
                s += float(x[a, r, col, cc]) * float(w[i, j, cc, oo])
        z[a, pp, qq, oo] = s
    return z


def conv_dw_direct(x, dz, kh, kw, stride, pad):
    n, h, wd, c = x.shape
    _, p, q, o = dz.shape
    (sh, sw), (top, _, left, _) = stride, pad
    dw = np.zeros((kh, kw, c, o))
    for i, j, cc, oo in itertools.product(range(kh), range(kw), range(c), range(o)):
        s = 0.0
        for a, pp, qq in itertools.product(range(n), range(p), range(q)):
            r, col = pp * sh + i - top, qq * sw + j - left
            if 0 <= r < h and 0 <= col < wd:
                s += float(x[a, r, col, cc]) * float(dz[a, pp, qq, oo])
        dw[i, j, cc, oo] = s
    return dw, dz.sum(axis=(0, 1, 2), dtype=F64)


def conv_dx_direct(dz, w, h, wd, stride, pad):
    """``dx[n,h,w,c] = sum dz[n,p,q,o]*w[i,j,c,o]`` over ``p*sh+i-top == h``,
    ``q*sw+j-left == w``: a scatter from every (p, q, i, j)."""
    n, p, q, o = dz.shape
    kh, kw, c, _ = w.shape
    (sh, sw), (top, _, left, _) = stride, pad
    dx = np.zeros((n, h, wd, c))
    for a, pp, qq, i, j in itertools.product(range(n), range(p), range(q), range(kh), range(kw)):
        r, col = pp * sh + i - top, qq * sw + j - left
        if 0 <= r < h and 0 <= col < wd:
            for cc, oo in itertools.product(range(c), range(o)):
                dx[a, r, col, cc] += float(dz[a, pp, qq, oo]) * float(w[i, j, cc, oo])
    return dx


def conv_einsum(x, w, b, stride, pad):
    """A second formula: gather every window by fancy indexing, then one einsum."""
    kh, kw, _, _ = w.shape
    (sh, sw), (top, bottom, left, right) = stride, pad
    xpad = np.pad(x.astype(F64), ((0, 0), (top, bottom), (left, right), (0, 0)))
    p = (xpad.shape[1] - kh) // sh + 1
    q = (xpad.shape[2] - kw) // sw + 1
    rows = (np.arange(p) * sh)[:, None] + np.arange(kh)[None, :]     # (p, kh)
    cols = (np.arange(q) * sw)[:, None] + np.arange(kw)[None, :]     # (q, kw)
    win = xpad[:, rows[:, None, :, None], cols[None, :, None, :], :]  # (n, p, q, kh, kw, c)
    return np.einsum("npqijc,ijco->npqo", win, w.astype(F64)) + b


def pool_direct(x, pool, stride):
    """Window maxima by Python comparisons: NaN wins, the first NaN or the first
    of equal maxima is chosen."""
    n, h, wd, c = x.shape
    ph, pw = pool
    sh, sw = pool if stride is None else stride
    p, q = _out_size(h, ph, sh), _out_size(wd, pw, sw)
    out, arg = np.zeros((n, p, q, c)), np.zeros((n, p, q, c), np.int64)
    for a, pp, qq, cc in itertools.product(range(n), range(p), range(q), range(c)):
        best, where = None, None
        for i, j in itertools.product(range(ph), range(pw)):
            v = float(x[a, pp * sh + i, qq * sw + j, cc])
            if best is None or (not math.isnan(best) and (math.isnan(v) or v > best)):
                best, where = v, i * pw + j
        out[a, pp, qq, cc], arg[a, pp, qq, cc] = best, where
    return out, arg


def pool_back_direct(dy, argmax, h, wd, pool, stride):
    n, p, q, c = dy.shape
    ph, pw = pool
    sh, sw = pool if stride is None else stride
    g = np.zeros((n, h, wd, c))
    for a, pp, qq, cc in itertools.product(range(n), range(p), range(q), range(c)):
        i, j = divmod(int(argmax[a, pp, qq, cc]), pw)
        g[a, pp * sh + i, qq * sw + j, cc] += float(dy[a, pp, qq, cc])
    return g


def derivative(act, z):
    """``act'(z)`` by the reference, for the fused epilogues."""
    y = np.empty_like(z)
    ref.activation_forward(act, z, y)
    d = np.empty_like(z)
    ref.activation_backward(act, np.ones_like(z), z, y, d)
    return y, d


# ------------------------------------------------------------ geometries

#: (x shape, kernel (kh, kw), stride, padding): stride and padding cases, asymmetric
#: "same" pads, kernels as large as the input, batch 1, one channel, 1x1 outputs,
#: stride larger than the kernel.
GEOMETRIES = [
    ((2, 5, 6, 3), (3, 3), (1, 1), (0, 0, 0, 0)),
    ((2, 5, 6, 3), (3, 2), (2, 3), (1, 2, 0, 1)),
    ((1, 4, 4, 1), (2, 2), (1, 1), (0, 1, 0, 1)),          # "same" for k=2: the extra at the end
    ((1, 6, 5, 2), (3, 3), (2, 2), ref.keras_padding("same", (6, 5), (3, 3), (2, 2))),
    ((2, 7, 4, 2), (4, 3), (3, 2), ref.keras_padding("same", (7, 4), (4, 3), (3, 2))),
    ((1, 3, 3, 2), (3, 3), (1, 1), (0, 0, 0, 0)),          # kernel = input: 1x1 output
    ((2, 3, 4, 1), (3, 4), (2, 5), (0, 0, 0, 0)),          # kernel = input, stride past it
    ((1, 1, 1, 1), (1, 1), (1, 1), (0, 0, 0, 0)),          # everything 1
    ((1, 7, 7, 2), (2, 2), (3, 3), (0, 0, 0, 0)),          # stride > kernel: uncovered rows
    ((3, 2, 2, 2), (3, 3), (1, 1), (1, 0, 1, 0)),          # padding needed for any output
    ((1, 5, 3, 2), (1, 1), (1, 1), (0, 0, 0, 0)),          # 1x1 kernel: no im2col copy
    ((2, 6, 6, 2), (1, 1), (2, 2), (0, 0, 0, 0)),
]


def _geometry_id(g):
    return "x{}-k{}-s{}-p{}".format(*("x".join(map(str, t)) for t in g))


def _conv_arrays(rng, xshape, k, dtype, o=3):
    n, h, wd, c = xshape
    x = rng.standard_normal(xshape).astype(dtype)
    w = rng.standard_normal((k[0], k[1], c, o)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype)
    return x, w, b


def _pq(xshape, k, stride, pad):
    return (_out_size(xshape[1], k[0], stride[0], pad[0], pad[1]),
            _out_size(xshape[2], k[1], stride[1], pad[2], pad[3]))


# ------------------------------------------------------------ padding helpers

def test_same_padding_matches_keras_rule():
    for size, k, s in itertools.product(range(1, 12), range(1, 6), range(1, 5)):
        before, after = ref.same_padding(size, k, s)
        out = -(-size // s)
        assert ref.conv_output_size(size, k, s, before, after) == out
        total = max((out - 1) * s + k - size, 0)
        assert (before, after) == (total // 2, total - total // 2)
        assert 0 <= before <= after < k
    assert ref.same_padding(28, 3, 1) == (1, 1)
    assert ref.same_padding(28, 2, 2) == (0, 0)
    assert ref.same_padding(5, 4, 1) == (1, 2)     # the extra at the bottom/right
    assert ref.keras_padding("valid", (28, 28), (3, 3), (1, 1)) == (0, 0, 0, 0)
    assert ref.keras_padding("same", (6, 5), (3, 4), (2, 1)) == (0, 1, 1, 2)
    with pytest.raises(ValueError, match="padding must be 'valid' or 'same'"):
        ref.keras_padding("full", (6, 5), (3, 3), (1, 1))


# ------------------------------------------------------------ convolution

@pytest.mark.parametrize("geometry", GEOMETRIES, ids=_geometry_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_forward_direct(geometry, dtype):
    xshape, k, stride, pad = geometry
    rng = np.random.default_rng(1)
    x, w, b = _conv_arrays(rng, xshape, k, dtype)
    p, q = _pq(xshape, k, stride, pad)
    out = np.full((xshape[0], p, q, 3), np.nan, dtype)
    pre = np.full_like(out, np.nan)
    ref.conv2d_forward(x, w, b, "tanh", out, pre, stride, pad)
    z = conv_direct(x, w, b, stride, pad)
    red = k[0] * k[1] * xshape[3]
    assert_close(pre, z, dtype, red)
    assert_close(out, np.tanh(z), dtype, red)
    assert_close(z, conv_einsum(x, w, b, stride, pad), np.float64, red)
    # without preact, out holds act(z); identity gives z itself
    out2 = np.empty_like(out)
    ref.conv2d_forward(x, w, b, "identity", out2, None, stride, pad)
    assert_close(out2, z, dtype, red)


def test_conv2d_forward_closed_forms():
    # a box filter of ones over a ramp: window sums by hand
    x = np.arange(16, dtype=F64).reshape(1, 4, 4, 1)
    w = np.ones((2, 2, 1, 1))
    out = np.empty((1, 3, 3, 1))
    ref.conv2d_forward(x, w, np.array([0.5]), "identity", out)
    np.testing.assert_array_equal(out[0, :, :, 0], [[10.5, 14.5, 18.5], [26.5, 30.5, 34.5],
                                                     [42.5, 46.5, 50.5]])
    # "same" with zeros around: the corner window sees 4 of its 9 elements
    out = np.empty((1, 4, 4, 1))
    ref.conv2d_forward(np.ones((1, 4, 4, 1)), np.ones((3, 3, 1, 1)), np.zeros(1), "relu", out,
                       padding=(1, 1, 1, 1))
    np.testing.assert_array_equal(out[0, :, :, 0], [[4, 6, 6, 4], [6, 9, 9, 6], [6, 9, 9, 6],
                                                     [4, 6, 6, 4]])
    # a 1x1 kernel is a per-pixel dense layer (cross-correlation: no kernel flip)
    rng = np.random.default_rng(0)
    x, w1 = rng.standard_normal((2, 3, 3, 4)), rng.standard_normal((1, 1, 4, 5))
    out = np.empty((2, 3, 3, 5))
    ref.conv2d_forward(x, w1, np.zeros(5), "identity", out)
    np.testing.assert_allclose(out, x @ w1[0, 0], rtol=1e-13)
    # not a flipped kernel: a one at w[0, 0] picks the window's top-left element
    w = np.zeros((2, 2, 1, 1))
    w[0, 0] = 1
    out = np.empty((1, 3, 3, 1))
    ref.conv2d_forward(np.arange(16, dtype=F64).reshape(1, 4, 4, 1), w, np.zeros(1), "identity", out)
    np.testing.assert_array_equal(out[0, :, :, 0], [[0, 1, 2], [4, 5, 6], [8, 9, 10]])


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=_geometry_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_backward_direct(geometry, dtype):
    xshape, k, stride, pad = geometry
    rng = np.random.default_rng(2)
    x, _, _ = _conv_arrays(rng, xshape, k, dtype)
    p, q = _pq(xshape, k, stride, pad)
    dz = rng.standard_normal((xshape[0], p, q, 3)).astype(dtype)
    dw = np.full((k[0], k[1], xshape[3], 3), np.nan, dtype)
    db = np.full(3, np.nan, dtype)
    ref.conv2d_backward(x, dz, dw, db, stride, pad)
    want_dw, want_db = conv_dw_direct(x, dz, k[0], k[1], stride, pad)
    assert_close(dw, want_dw, dtype, xshape[0] * p * q)
    assert_close(db, want_db, dtype, xshape[0] * p * q)


def test_conv2d_backward_db_sums_in_float64():
    """float32 db: summed in float64 and rounded once (a float32 running sum of
    2**24 + many ones would lose every one)."""
    dz = np.ones((1, 1, 4097, 1), np.float32)
    dz[0, 0, 0, 0] = 2.0**24
    x = np.zeros((1, 1, 4097, 1), np.float32)
    dw, db = np.empty((1, 1, 1, 1), np.float32), np.empty(1, np.float32)
    ref.conv2d_backward(x, dz, dw, db)
    assert db[0] == np.float32(2.0**24 + 4096)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=_geometry_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_backprop_direct(geometry, dtype):
    xshape, k, stride, pad = geometry
    rng = np.random.default_rng(3)
    _, w, _ = _conv_arrays(rng, xshape, k, dtype)
    p, q = _pq(xshape, k, stride, pad)
    dz = rng.standard_normal((xshape[0], p, q, 3)).astype(dtype)
    z = rng.standard_normal(xshape).astype(dtype)
    y, d = derivative("silu", z)
    out = np.full(xshape, np.nan, dtype)
    ref.conv2d_backprop(dz, w, z, None, "silu", out, stride, pad)
    dx = conv_dx_direct(dz, w, xshape[1], xshape[2], stride, pad)
    assert_close(out, dx * d, dtype, k[0] * k[1] * 3)
    # positions no window covers get exactly 0 (identity: the delta itself)
    out_id = np.full(xshape, np.nan, dtype)
    ref.conv2d_backprop(dz, w, None, y, "identity", out_id, stride, pad)
    assert_close(out_id, dx, dtype, k[0] * k[1] * 3)
    covered = conv_dx_direct(np.ones_like(dz, dtype=F64), np.ones_like(w, dtype=F64),
                             xshape[1], xshape[2], stride, pad) > 0
    assert np.all(out_id[~covered] == 0)


def test_conv2d_backprop_is_the_adjoint():
    """<conv(x), dz> == <x, convT(dz)> for any x, dz: the transposed
    convolution is the adjoint of the forward one (stride, asymmetric pads)."""
    rng = np.random.default_rng(4)
    stride, pad = (2, 3), (1, 0, 2, 1)
    x, w = rng.standard_normal((2, 7, 8, 3)), rng.standard_normal((3, 4, 3, 2))
    p, q = _pq(x.shape, (3, 4), stride, pad)
    z = np.empty((2, p, q, 2))
    ref.conv2d_forward(x, w, np.zeros(2), "identity", z, None, stride, pad)
    dz = rng.standard_normal(z.shape)
    dx = np.empty_like(x)
    ref.conv2d_backprop(dz, w, None, np.zeros_like(x), "identity", dx, stride, pad)
    assert math.isclose(np.vdot(z, dz), np.vdot(x, dx), rel_tol=1e-12)


# ------------------------------------------------------------ finite differences (float64)

def _central(f, a, eps=1e-6):
    """Central differences of the scalar ``f()`` with respect to every element of ``a``."""
    g = np.empty_like(a)
    flat, gf = a.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        keep = flat[i]
        flat[i] = keep + eps
        up = f()
        flat[i] = keep - eps
        down = f()
        flat[i] = keep
        gf[i] = (up - down) / (2 * eps)
    return g


def _away_from_kinks(z, margin=0.05):
    """Push values within ``margin`` of 0 (relu's and leaky_relu's kink) out of it."""
    return np.where(np.abs(z) < margin, np.copysign(margin, z) + z, z)


FD_GEOMETRIES = [GEOMETRIES[1], GEOMETRIES[3], GEOMETRIES[6], GEOMETRIES[8], GEOMETRIES[9]]


@pytest.mark.parametrize("geometry", FD_GEOMETRIES, ids=_geometry_id)
def test_conv2d_backward_finite_differences(geometry):
    """L = sum(G * conv(x, w, b)): dL/dw and dL/db by conv2d_backward(dz=G)."""
    xshape, k, stride, pad = geometry
    rng = np.random.default_rng(5)
    x, w, b = _conv_arrays(rng, xshape, k, F64)
    p, q = _pq(xshape, k, stride, pad)
    G = rng.standard_normal((xshape[0], p, q, 3))
    z = np.empty_like(G)

    def loss():
        ref.conv2d_forward(x, w, b, "identity", z, None, stride, pad)
        return float(np.sum(G * z))

    dw, db = np.empty_like(w), np.empty_like(b)
    ref.conv2d_backward(x, G, dw, db, stride, pad)
    np.testing.assert_allclose(dw, _central(loss, w), rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(db, _central(loss, b), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("geometry", FD_GEOMETRIES, ids=_geometry_id)
@pytest.mark.parametrize("act", ref.ACTIVATIONS)
def test_conv2d_backprop_finite_differences(geometry, act):
    """L = sum(G * act2(conv(act(zb), w, b))) for the layer below's
    pre-activation zb: backprop(dz = G * act2'(z)) gives dL/dzb, fused with
    act'; the forward conv's own activation (gelu) goes through
    activation_backward."""
    xshape, k, stride, pad = geometry
    rng = np.random.default_rng(6)
    _, w, b = _conv_arrays(rng, xshape, k, F64)
    zb = _away_from_kinks(rng.standard_normal(xshape))
    p, q = _pq(xshape, k, stride, pad)
    G = rng.standard_normal((xshape[0], p, q, 3))
    xb, out, pre = np.empty_like(zb), np.empty_like(G), np.empty_like(G)

    def loss():
        ref.activation_forward(act, zb, xb)
        ref.conv2d_forward(xb, w, b, "gelu", out, pre, stride, pad)
        return float(np.sum(G * out))

    loss()
    dz = np.empty_like(G)
    ref.activation_backward("gelu", G, pre, None, dz)
    yb = np.empty_like(zb)
    ref.activation_forward(act, zb, yb)
    got = np.empty_like(zb)
    ref.conv2d_backprop(dz, w, zb, yb, act, got, stride, pad)
    np.testing.assert_allclose(got, _central(loss, zb), rtol=1e-6, atol=1e-8)


POOLS = [((2, 2), None), ((2, 2), (1, 1)), ((3, 2), (2, 1)), ((2, 3), (3, 3)), ((3, 3), (2, 2)),
         ((1, 1), None), ((4, 5), None)]


def _pool_id(case):
    pool, stride = case
    return f"pool{pool[0]}x{pool[1]}-stride{'None' if stride is None else '%dx%d' % stride}"


@pytest.mark.parametrize("pool_case", POOLS, ids=_pool_id)
@pytest.mark.parametrize("act", ref.ACTIVATIONS)
def test_maxpool2d_backward_finite_differences(pool_case, act):
    """L = sum(G * maxpool(act(zb))): maxpool2d_backward(dy=G) fused with act'
    gives dL/dzb. Values are distinct after the activation (no ties) and away
    from relu's kink."""
    pool, stride = pool_case
    rng = np.random.default_rng(7)
    xshape = (2, 5, 5, 2)
    # distinct magnitudes >= 0.3 apart after any of the activations near the origin;
    # negative ones for relu all map to 0 (a tie whose derivative is 0 either way)
    zb = rng.permutation(np.linspace(-3, 3, math.prod(xshape))).reshape(xshape)
    zb = _away_from_kinks(zb, 0.05)
    if act in ("gelu", "silu"):   # not monotone below their minima: stay above them
        zb = zb + 3.2
    sh, sw = pool if stride is None else stride
    p, q = _out_size(5, pool[0], sh), _out_size(5, pool[1], sw)
    G = rng.standard_normal((2, p, q, 2))
    xb, out, arg = np.empty_like(zb), np.empty_like(G), np.empty(G.shape, np.int32)

    def loss():
        ref.activation_forward(act, zb, xb)
        ref.maxpool2d_forward(xb, out, arg, pool, stride)
        return float(np.sum(G * out))

    loss()
    y, _ = derivative(act, zb)
    got = np.empty_like(zb)
    ref.maxpool2d_backward(G, arg, zb, y, act, got, pool, stride)
    np.testing.assert_allclose(got, _central(loss, zb, 1e-7), rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------ max pooling

@pytest.mark.parametrize("pool_case", POOLS, ids=_pool_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_maxpool2d_direct(pool_case, dtype):
    pool, stride = pool_case
    rng = np.random.default_rng(8)
    x = np.round(rng.standard_normal((2, 6, 7, 3)) * 2).astype(dtype)   # many ties
    sh, sw = pool if stride is None else stride
    p, q = _out_size(6, pool[0], sh), _out_size(7, pool[1], sw)
    out, arg = np.full((2, p, q, 3), np.nan, dtype), np.full((2, p, q, 3), -7, np.int32)
    ref.maxpool2d_forward(x, out, arg, pool, stride)
    want, want_arg = pool_direct(x, pool, stride)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(arg, want_arg)
    dy = rng.standard_normal(out.shape).astype(dtype)
    g = np.full(x.shape, np.nan, dtype)
    ref.maxpool2d_backward(dy, arg, None, np.ones_like(x), "identity", g, pool, stride)
    assert_close(g, pool_back_direct(dy, arg, 6, 7, pool, stride), dtype, pool[0] * pool[1])


def test_maxpool_ties_choose_the_first():
    x = np.array([[3, 3], [3, 3]], F64).reshape(1, 2, 2, 1)
    out, arg = np.empty((1, 1, 1, 1)), np.empty((1, 1, 1, 1), np.int32)
    ref.maxpool2d_forward(x, out, arg)
    assert out.item() == 3 and arg.item() == 0
    x = np.array([[1, 5], [5, 2]], F64).reshape(1, 2, 2, 1)
    ref.maxpool2d_forward(x, out, arg)
    assert arg.item() == 1                     # (0, 1) before (1, 0): row-major
    x = np.array([[-0.0, 0.0], [1e-300, 1e-300]], F64).reshape(1, 2, 2, 1)
    ref.maxpool2d_forward(x, out, arg)
    assert arg.item() == 2
    x = np.array([[0.0, -0.0], [-1, -1]], F64).reshape(1, 2, 2, 1)
    ref.maxpool2d_forward(x, out, arg)
    assert arg.item() == 0 and not np.signbit(out.item())   # -0.0 == 0.0: a tie
    for dtype in DTYPES:   # out is the chosen element itself, its sign too
        x = np.array([[-1, -0.0], [0.0, -0.0]], dtype).reshape(1, 2, 2, 1)
        o, a = np.empty((1, 1, 1, 1), dtype), np.empty((1, 1, 1, 1), np.int32)
        ref.maxpool2d_forward(x, o, a)
        assert a.item() == 1 and np.signbit(o.item())


def test_maxpool_nan_propagates_and_is_chosen():
    x = np.array([[1, 2, np.nan, np.inf], [np.inf, np.nan, 5, np.nan]], F64).reshape(1, 2, 4, 1)
    out, arg = np.empty((1, 1, 2, 1)), np.empty((1, 1, 2, 1), np.int32)
    ref.maxpool2d_forward(x, out, arg)
    assert np.isnan(out).all()
    np.testing.assert_array_equal(arg.ravel(), [3, 0])   # the first NaN of each window
    out1, arg1 = np.empty((1, 1, 1, 1)), np.empty((1, 1, 1, 1), np.int32)
    ref.maxpool2d_forward(np.array([[-np.inf, -np.inf], [-np.inf, -np.inf]]).reshape(1, 2, 2, 1),
                          out1, arg1)
    assert out1.item() == -np.inf and arg1.item() == 0
    # the gradient flows to the NaN's place
    g = np.empty_like(x)
    ref.maxpool2d_backward(np.array([2.0, 3.0]).reshape(1, 1, 2, 1), arg, None, np.ones_like(x),
                           "identity", g)
    want = np.zeros((2, 4))
    want[1, 1], want[0, 2] = 2, 3
    np.testing.assert_array_equal(g[0, :, :, 0], want)


def test_maxpool_overlapping_windows_sum_and_uncovered_get_zero():
    # a constant image: every window chooses its top-left element (first on ties)
    x = np.ones((1, 4, 5, 1))
    out, arg = np.empty((1, 3, 2, 1)), np.empty((1, 3, 2, 1), np.int32)
    ref.maxpool2d_forward(x, out, arg, (2, 2), (1, 3))
    assert (arg == 0).all()
    # a peak shared by the overlapping windows: all four choose it, the gradient sums
    x = np.zeros((1, 3, 3, 1))
    x[0, 1, 1, 0] = 9
    out, arg = np.empty((1, 2, 2, 1)), np.empty((1, 2, 2, 1), np.int32)
    ref.maxpool2d_forward(x, out, arg, (2, 2), (1, 1))
    np.testing.assert_array_equal(arg.ravel(), [3, 2, 1, 0])
    g = np.full_like(x, np.nan)
    ref.maxpool2d_backward(np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 2, 2, 1), arg, None,
                           np.ones_like(x), "identity", g, (2, 2), (1, 1))
    want = np.zeros((3, 3))
    want[1, 1] = 10
    np.testing.assert_array_equal(g[0, :, :, 0], want)
    # "valid" pooling leaves the last row and column out (and stride 3 > pool 2 a gap): 0 there
    x = np.arange(35, dtype=F64).reshape(1, 5, 7, 1)
    out, arg = np.empty((1, 2, 2, 1)), np.empty((1, 2, 2, 1), np.int32)
    ref.maxpool2d_forward(x, out, arg, (2, 2), (3, 3))
    g = np.full_like(x, np.nan)
    ref.maxpool2d_backward(np.ones((1, 2, 2, 1)), arg, x, None, "softplus", g, (2, 2), (3, 3))
    chosen = np.zeros((5, 7), bool)
    chosen[[1, 1, 4, 4], [1, 4, 1, 4]] = True
    assert (g[0, :, :, 0][~chosen] == 0).all()
    np.testing.assert_allclose(g[0, :, :, 0][chosen], 1 / (1 + np.exp(-x[0, :, :, 0][chosen])))


def test_maxpool_backward_with_non_finite_dy_touches_only_the_chosen():
    x = np.arange(16, dtype=F64).reshape(1, 4, 4, 1)
    out, arg = np.empty((1, 2, 2, 1)), np.empty((1, 2, 2, 1), np.int32)
    ref.maxpool2d_forward(x, out, arg)
    dy = np.array([np.inf, np.nan, -np.inf, 1.0]).reshape(1, 2, 2, 1)
    g = np.empty_like(x)
    ref.maxpool2d_backward(dy, arg, None, np.ones_like(x), "identity", g)
    chosen = np.zeros((4, 4), bool)
    chosen[[1, 1, 3, 3], [1, 3, 1, 3]] = True
    assert (g[0, :, :, 0][~chosen] == 0).all()
    np.testing.assert_array_equal(g[0, :, :, 0][chosen], [np.inf, np.nan, -np.inf, 1.0])


# ------------------------------------------------------------ dropout

M64 = (1 << 64) - 1


def splitmix64(z):
    """The splitmix64 finaliser on Python ints, masked to 64 bits."""
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & M64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & M64
    z ^= z >> 31
    return z


def kept_python(i, seed, rate):
    threshold = math.floor(rate * 2**24 + 0.5)
    return splitmix64((seed + (i + 1) * 0x9E3779B97F4A7C15) & M64) >> 40 >= threshold


def _mask(shape, rate, seed, dtype=F64):
    out = np.empty(shape, dtype)
    ref.dropout_forward(np.ones(shape, dtype), rate, seed, out)
    return out != 0


def test_splitmix64_known_values():
    # the first outputs of Vigna's splitmix64 generator from state 0 (its state
    # advances by the golden gamma; the output is the finaliser of the state)
    assert splitmix64(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF
    assert splitmix64((2 * 0x9E3779B97F4A7C15) & M64) == 0x6E789E6AA1B965F4


@pytest.mark.parametrize("rate,seed", [(0.5, 0), (0.3, 123456789), (0.9, M64), (0.01, 2**63 + 5),
                                       (0.75, 0x9E3779B97F4A7C15)])
def test_dropout_hash_matches_pure_python(rate, seed):
    n = 3000
    idx = list(range(n))
    # also indices around the reference's block boundaries and far away (wrap-around)
    big = ref._DROPOUT_BLOCK
    idx_far = [big - 1, big, big + 1, 2 * big + 7, 5 * big - 1]
    mask = _mask(5 * big, rate, seed)
    want = np.array([kept_python(i, seed, rate) for i in idx])
    np.testing.assert_array_equal(mask[:n], want)
    assert [bool(mask[i]) for i in idx_far] == [kept_python(i, seed, rate) for i in idx_far]


@pytest.mark.parametrize("rate", [0.05, 0.25, 0.5, 0.75, 0.9])
def test_dropout_kept_fraction(rate):
    n = 1_000_000
    kept = _mask(n, rate, 20240601).mean()
    sd = math.sqrt(rate * (1 - rate) / n)
    assert abs(kept - (1 - rate)) < 4 * sd, (kept, 1 - rate, sd)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_values_scale_and_backward(dtype):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((7, 11, 13)).astype(dtype)
    rate, seed = 0.4, 77
    out = np.full_like(x, np.nan)
    ref.dropout_forward(x, rate, seed, out)
    keep = np.array([kept_python(i, seed, rate) for i in range(x.size)]).reshape(x.shape)
    scale = dtype(1.0 / (1.0 - rate))           # in float64, rounded once to the dtype
    np.testing.assert_array_equal(out[keep], x[keep] * scale)
    assert (out[~keep] == 0).all() and not np.signbit(out[~keep]).any()
    # the backward pass uses the same mask and scale
    dy = rng.standard_normal(x.shape).astype(dtype)
    g = np.full_like(dy, np.nan)
    ref.dropout_backward(dy, rate, seed, g)
    np.testing.assert_array_equal(g[keep], dy[keep] * scale)
    assert (g[~keep] == 0).all()


def test_dropout_mask_properties():
    shape = (64, 100)
    a = _mask(shape, 0.5, 1)
    assert np.array_equal(a, _mask(shape, 0.5, 1))                  # same seed, same mask
    assert not np.array_equal(a, _mask(shape, 0.5, 2))              # another seed, another
    assert np.array_equal(a, _mask(shape, 0.5, 1, np.float32))      # either dtype
    assert np.array_equal(a.ravel(), _mask(a.size, 0.5, 1))         # flat C order: shape-free
    assert (_mask(shape, 0.2, 1) >= _mask(shape, 0.6, 1)).all()     # nested in the rate
    # a rate that rounds T to 0 keeps everything (and still scales)
    assert _mask(shape, 1e-9, 1).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_rate_zero_and_in_place(dtype):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((5, 6)).astype(dtype)
    x[0, 0], x[0, 1] = np.nan, -0.0
    out = np.empty_like(x)
    ref.dropout_forward(x, 0.0, 3, out)
    np.testing.assert_array_equal(out, x)
    assert np.signbit(out[0, 1])                                   # a copy, bit for bit
    expected = np.empty_like(x)
    ref.dropout_forward(x, 0.3, 3, expected)
    y = x.copy()
    ref.dropout_forward(y, 0.3, 3, y)                              # in place
    np.testing.assert_array_equal(y, expected)
    y = x.copy()
    ref.dropout_backward(y, 0.3, 3, y)
    np.testing.assert_array_equal(y, expected)


def test_dropout_drops_non_finite_to_positive_zero():
    x = np.array([np.inf, -np.inf, np.nan, -1.0] * 500)
    out = np.empty_like(x)
    with np.errstate(all="ignore"):
        ref.dropout_forward(x, 0.5, 5, out)
    keep = np.array([kept_python(i, 5, 0.5) for i in range(x.size)])
    assert (out[~keep] == 0).all() and not np.signbit(out[~keep]).any()
    np.testing.assert_array_equal(out[keep], x[keep] * 2.0)


def test_dropout_threshold_rounding():
    assert ref.dropout_threshold(0.0) == 0
    assert ref.dropout_threshold(0.5) == 2**23
    assert ref.dropout_threshold(1 - 2**-30) == 2**24              # everything dropped
    assert ref.dropout_threshold(2**-25) == 1                      # ties round up (+0.5)
    assert ref.dropout_threshold(2**-25 - 2**-60) == 0
