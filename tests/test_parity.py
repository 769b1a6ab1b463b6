"""Parity: every kernel of every available backend against the NumPy reference.

One parametrized suite: a backend joins by registering in ``fastnn._backend``
and being available; it may name the (batch, width) shapes it wants in
``PARITY_SHAPES`` (the CUDA simulator wants small ones). Calls go through
``fastnn.ops`` under ``use_backend``, so the gate is exercised too.
Inputs are drawn by hypothesis (shapes, seeds, activations, hyper-parameters).
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastnn
from fastnn import _backend
from fastnn.kernels import reference as ref
from conftest import BACKENDS, DTYPES, assert_close

DEFAULT_BATCHES = (1, 3, 127)
DEFAULT_WIDTHS = (1, 7, 100)


def _shapes(backend):
    shapes = getattr(_backend.load(backend).module, "PARITY_SHAPES", None)
    if shapes is None:
        return [(b, w) for b in DEFAULT_BATCHES for w in DEFAULT_WIDTHS]
    return list(shapes)


def _widths(backend):
    return sorted({w for _, w in _shapes(backend)})


@st.composite
def case(draw, backend):
    """A seeded generator, a (batch, width) pair, a second width and a dtype."""
    batch, width = draw(st.sampled_from(_shapes(backend)))
    width2 = draw(st.sampled_from(_widths(backend)))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed), batch, width, width2, np.dtype(dtype)


def _normal(rng, shape, dtype, scale=1.0):
    return np.ascontiguousarray(rng.standard_normal(shape) * scale, dtype=dtype)


def _run(backend, kernel, args, outputs):
    """Run ``kernel`` on the reference and on ``backend`` (through the gate)
    with separate copies of ``args``; return both results and output arrays."""
    ref_args = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    be_args = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    ref_ret = getattr(ref, kernel)(**ref_args)
    with fastnn.use_backend(backend):
        be_ret = getattr(fastnn.ops, kernel)(**be_args)
    for name in outputs:
        assert be_args[name] is not None
    return ref_ret, be_ret, ref_args, be_args


def _check(backend, kernel, args, outputs, dtype, reduction=1):
    ref_ret, be_ret, ref_args, be_args = _run(backend, kernel, args, outputs)
    for name in outputs:
        assert_close(be_args[name], ref_args[name], dtype, reduction,
                     err_msg=f"{backend}.{kernel}: {name}")
    if ref_ret is None:
        assert be_ret is None, f"{backend}.{kernel} must return None"
    else:
        assert type(be_ret) is float, f"{backend}.{kernel} must return a Python float"
        assert_close(be_ret, ref_ret, dtype, reduction, err_msg=f"{backend}.{kernel}: loss")
    # inputs are never written
    for name, value in args.items():
        if isinstance(value, np.ndarray) and name not in outputs:
            np.testing.assert_array_equal(be_args[name], value, err_msg=f"input {name} written")


def _act_pair(rng, act, shape, dtype):
    """``z`` and ``y = act(z)`` by the reference."""
    z = _normal(rng, shape, dtype, 3.0)
    y = np.empty_like(z)
    ref.activation_forward(act, z, y)
    return z, y


pytestmark = pytest.mark.parametrize("backend", BACKENDS)
acts = st.sampled_from(ref.ACTIVATIONS)


@given(data=st.data(), act=acts, keep_preact=st.booleans())
def test_dense_forward(backend, data, act, keep_preact):
    rng, batch, n_in, n_out, dtype = data.draw(case(backend))
    args = dict(x=_normal(rng, (batch, n_in), dtype), w=_normal(rng, (n_in, n_out), dtype),
                b=_normal(rng, n_out, dtype), act=act, out=np.empty((batch, n_out), dtype),
                preact=np.empty((batch, n_out), dtype) if keep_preact else None)
    outputs = ("out", "preact") if keep_preact else ("out",)
    _check(backend, "dense_forward", args, outputs, dtype, reduction=n_in)


@given(data=st.data(), act=acts, in_place=st.booleans(), flat=st.booleans())
def test_activation_forward(backend, data, act, in_place, flat):
    rng, batch, width, _, dtype = data.draw(case(backend))
    shape = (batch * width,) if flat else (batch, width)
    z = _normal(rng, shape, dtype, 3.0)
    if in_place:
        expected = np.empty_like(z)
        ref.activation_forward(act, z, expected)
        with fastnn.use_backend(backend):
            fastnn.ops.activation_forward(act, z, z)
        assert_close(z, expected, dtype, err_msg=f"{backend} in-place {act}")
    else:
        _check(backend, "activation_forward", dict(act=act, z=z, out=np.empty_like(z)),
               ("out",), dtype)


@given(data=st.data(), act=acts, in_place=st.booleans(), give_both=st.booleans())
def test_activation_backward(backend, data, act, in_place, give_both):
    rng, batch, width, _, dtype = data.draw(case(backend))
    z, y = _act_pair(rng, act, (batch, width), dtype)
    dy = _normal(rng, (batch, width), dtype)
    if not give_both:  # pass only what the derivative needs
        z, y = (None, y) if act in ref.Y_ACTIVATIONS else (z, None)
    if in_place:
        expected = np.empty_like(dy)
        ref.activation_backward(act, dy, z, y, expected)
        with fastnn.use_backend(backend):
            fastnn.ops.activation_backward(act, dy, z, y, dy)
        assert_close(dy, expected, dtype, err_msg=f"{backend} in-place {act}'")
    else:
        _check(backend, "activation_backward",
               dict(act=act, dy=dy, z=z, y=y, out=np.empty_like(dy)), ("out",), dtype)


@given(data=st.data(), act=acts, give_both=st.booleans())
def test_backprop_delta(backend, data, act, give_both):
    rng, batch, n_in, n_out, dtype = data.draw(case(backend))
    z, y = _act_pair(rng, act, (batch, n_in), dtype)
    if not give_both:
        z, y = (None, y) if act in ref.Y_ACTIVATIONS else (z, None)
    args = dict(dy=_normal(rng, (batch, n_out), dtype), w=_normal(rng, (n_in, n_out), dtype),
                z=z, y=y, act=act, out=np.empty((batch, n_in), dtype))
    _check(backend, "backprop_delta", args, ("out",), dtype, reduction=n_out)


@given(data=st.data())
def test_dense_backward(backend, data):
    rng, batch, n_in, n_out, dtype = data.draw(case(backend))
    args = dict(x=_normal(rng, (batch, n_in), dtype), dz=_normal(rng, (batch, n_out), dtype),
                dw=np.empty((n_in, n_out), dtype), db=np.empty(n_out, dtype))
    _check(backend, "dense_backward", args, ("dw", "db"), dtype, reduction=batch)


@given(data=st.data(), label_dtype=st.sampled_from([np.int64, np.int32, np.uint8, np.intp]),
       scale=st.sampled_from([1.0, 30.0]))
def test_softmax_cross_entropy(backend, data, label_dtype, scale):
    rng, batch, classes, _, dtype = data.draw(case(backend))
    classes = max(classes, 1)
    labels = rng.integers(0, classes, batch).astype(label_dtype)
    args = dict(logits=_normal(rng, (batch, classes), dtype, scale), labels=labels,
                grad=np.empty((batch, classes), dtype))
    _check(backend, "softmax_cross_entropy", args, ("grad",), dtype, reduction=classes)


@given(data=st.data(), scale=st.sampled_from([1.0, 30.0]))
def test_sigmoid_binary_cross_entropy(backend, data, scale):
    rng, batch, width, _, dtype = data.draw(case(backend))
    targets = rng.uniform(0, 1, (batch, width)).astype(dtype)
    targets[rng.uniform(size=targets.shape) < 0.5] = 1  # hard labels too
    args = dict(logits=_normal(rng, (batch, width), dtype, scale), targets=targets,
                grad=np.empty((batch, width), dtype))
    _check(backend, "sigmoid_binary_cross_entropy", args, ("grad",), dtype,
           reduction=batch * width)


@given(data=st.data())
def test_mse(backend, data):
    rng, batch, width, _, dtype = data.draw(case(backend))
    args = dict(pred=_normal(rng, (batch, width), dtype), target=_normal(rng, (batch, width), dtype),
                grad=np.empty((batch, width), dtype))
    _check(backend, "mse", args, ("grad",), dtype, reduction=batch * width)


@given(data=st.data(), in_place=st.booleans(), scale=st.sampled_from([1.0, 30.0]))
def test_softmax(backend, data, in_place, scale):
    rng, batch, classes, _, dtype = data.draw(case(backend))
    z = _normal(rng, (batch, classes), dtype, scale)
    if in_place:
        expected = np.empty_like(z)
        ref.softmax(z, expected)
        with fastnn.use_backend(backend):
            fastnn.ops.softmax(z, z)
        assert_close(z, expected, dtype, reduction=classes)
    else:
        _check(backend, "softmax", dict(z=z, out=np.empty_like(z)), ("out",), dtype,
               reduction=classes)


regs = st.tuples(st.sampled_from([0.0, 1e-2]), st.sampled_from([0.0, 1e-3]))


@given(data=st.data(), reg=regs, momentum=st.sampled_from([0.0, 0.9]), nesterov=st.booleans(),
       lr=st.sampled_from([0.0, 1e-3, 0.1]))
def test_sgd_step(backend, data, reg, momentum, nesterov, lr):
    rng, batch, width, _, dtype = data.draw(case(backend))
    n = batch * width
    nesterov = nesterov and momentum > 0
    args = dict(p=_normal(rng, n, dtype), g=_normal(rng, n, dtype),
                buf=_normal(rng, n, dtype) if momentum > 0 else None, lr=lr, momentum=momentum,
                nesterov=nesterov, weight_decay=reg[0], l1=reg[1])
    _check(backend, "sgd_step", args, ("p", "buf") if momentum > 0 else ("p",), dtype)


@given(data=st.data(), reg=regs, decoupled=st.booleans(), amsgrad=st.booleans(),
       step=st.integers(1, 5000), betas=st.sampled_from([(0.9, 0.999), (0.0, 0.5)]))
def test_adam_step(backend, data, reg, decoupled, amsgrad, step, betas):
    rng, batch, width, _, dtype = data.draw(case(backend))
    n = batch * width
    v = np.abs(_normal(rng, n, dtype))
    args = dict(p=_normal(rng, n, dtype), g=_normal(rng, n, dtype), m=_normal(rng, n, dtype),
                v=v, step=step, lr=1e-3, beta1=betas[0], beta2=betas[1], eps=1e-8,
                weight_decay=reg[0], decoupled=decoupled, l1=reg[1],
                vmax=(v + np.abs(_normal(rng, n, dtype))).astype(dtype) if amsgrad else None)
    outputs = ("p", "m", "v") + (("vmax",) if amsgrad else ())
    _check(backend, "adam_step", args, outputs, dtype)


@given(data=st.data(), reg=regs, momentum=st.sampled_from([0.0, 0.9]), centered=st.booleans())
def test_rmsprop_step(backend, data, reg, momentum, centered):
    rng, batch, width, _, dtype = data.draw(case(backend))
    n = batch * width
    cm = _normal(rng, n, dtype) if centered else None
    sq = np.abs(_normal(rng, n, dtype)) + (cm * cm if centered else 0)
    args = dict(p=_normal(rng, n, dtype), g=_normal(rng, n, dtype), sq=sq.astype(dtype),
                buf=_normal(rng, n, dtype) if momentum > 0 else None, lr=1e-2, rho=0.99,
                eps=1e-8, momentum=momentum, centered_mean=cm, weight_decay=reg[0], l1=reg[1])
    outputs = ("p", "sq") + (("buf",) if momentum > 0 else ()) + (("centered_mean",) if centered else ())
    _check(backend, "rmsprop_step", args, outputs, dtype)


# ------------------------------------------------------------ non-finite values

SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 1e-30, -1e-30, 20.0, -20.0, 88.0, -88.0, 89.0,
           -104.0, 710.0, -750.0, 1e30, -1e30, np.inf, -np.inf, np.nan]


@pytest.mark.parametrize("act", ref.ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_special_values(backend, act, dtype):
    """Extreme and non-finite inputs give what IEEE arithmetic gives in the
    reference (same infinities, NaNs in the same places)."""
    with np.errstate(all="ignore"):
        z = np.array(SPECIAL, dtype=dtype)
        dy = np.ones_like(z)
        expected_y = np.empty_like(z)
        ref.activation_forward(act, z, expected_y)
        expected_dz = np.empty_like(z)
        ref.activation_backward(act, dy, z, expected_y, expected_dz)
        y = np.empty_like(z)
        dz = np.empty_like(z)
        with fastnn.use_backend(backend):
            fastnn.ops.activation_forward(act, z, y)
            fastnn.ops.activation_backward(act, dy, z, expected_y, dz)
    assert_close(y, expected_y, dtype, err_msg=f"{act}({z})")
    assert_close(dz, expected_dz, dtype, err_msg=f"{act}'({z})")


@pytest.mark.parametrize("dtype", DTYPES)
def test_losses_non_finite(backend, dtype):
    """A NaN or inf logit yields the reference's NaN/inf loss and gradient."""
    with np.errstate(all="ignore"):
        logits = np.array([[0.0, 1.0, np.nan], [np.inf, 0.0, 1.0], [1e30, -1e30, 0.0]], dtype)
        labels = np.array([0, 1, 0])
        for kernel, args in (
            ("softmax_cross_entropy", dict(logits=logits, labels=labels)),
            ("sigmoid_binary_cross_entropy", dict(logits=logits, targets=np.ones_like(logits))),
            ("mse", dict(pred=logits, target=np.zeros_like(logits))),
        ):
            args["grad"] = np.empty_like(logits)
            ref_ret, be_ret, ref_args, be_args = _run(backend, kernel, args, ("grad",))
            assert_close(be_args["grad"], ref_args["grad"], dtype, err_msg=kernel)
            assert_close(be_ret, ref_ret, dtype, err_msg=kernel)


# ------------------------------------------------------------ convolution, pooling, dropout

@st.composite
def conv_case(draw, pooling=False):
    """A small NHWC geometry (the CUDA simulator runs it too): batch 1-3, images
    up to 7x7, 1-3 channels in and out, windows 1-3, strides 1-3, pads below
    the window (none for pooling, whose stride may be None)."""
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n, c, o = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    if pooling:
        pads = (0, 0, 0, 0)
        if draw(st.booleans()):
            stride = None
    else:
        pads = tuple(draw(st.integers(0, k - 1)) for k in (kh, kh, kw, kw))
    h = draw(st.integers(max(1, kh - pads[0] - pads[1]), 7))
    w = draw(st.integers(max(1, kw - pads[2] - pads[3]), 7))
    sh, sw = (kh, kw) if stride is None else stride
    p = (h + pads[0] + pads[1] - kh) // sh + 1
    q = (w + pads[2] + pads[3] - kw) // sw + 1
    return rng, dtype, (n, h, w, c, o), (kh, kw), stride, pads, (p, q)


def _below(rng, act, shape, dtype, give_both):
    """``z``, ``y`` of the layer below, or only the one the derivative needs."""
    z, y = _act_pair(rng, act, shape, dtype)
    if not give_both:
        z, y = (None, y) if act in ref.Y_ACTIVATIONS else (z, None)
    return z, y


@given(case=conv_case(), act=acts, keep_preact=st.booleans())
def test_conv2d_forward(backend, case, act, keep_preact):
    rng, dtype, (n, h, w, c, o), (kh, kw), stride, pads, (p, q) = case
    args = dict(x=_normal(rng, (n, h, w, c), dtype), w=_normal(rng, (kh, kw, c, o), dtype),
                b=_normal(rng, o, dtype), act=act, out=np.empty((n, p, q, o), dtype),
                preact=np.empty((n, p, q, o), dtype) if keep_preact else None,
                stride=stride, padding=pads)
    outputs = ("out", "preact") if keep_preact else ("out",)
    _check(backend, "conv2d_forward", args, outputs, dtype, reduction=kh * kw * c)


@given(case=conv_case())
def test_conv2d_backward(backend, case):
    rng, dtype, (n, h, w, c, o), (kh, kw), stride, pads, (p, q) = case
    args = dict(x=_normal(rng, (n, h, w, c), dtype), dz=_normal(rng, (n, p, q, o), dtype),
                dw=np.empty((kh, kw, c, o), dtype), db=np.empty(o, dtype),
                stride=stride, padding=pads)
    _check(backend, "conv2d_backward", args, ("dw", "db"), dtype, reduction=n * p * q)


@given(case=conv_case(), act=acts, give_both=st.booleans())
def test_conv2d_backprop(backend, case, act, give_both):
    rng, dtype, (n, h, w, c, o), (kh, kw), stride, pads, (p, q) = case
    z, y = _below(rng, act, (n, h, w, c), dtype, give_both)
    args = dict(dz=_normal(rng, (n, p, q, o), dtype), w=_normal(rng, (kh, kw, c, o), dtype),
                z=z, y=y, act=act, out=np.empty((n, h, w, c), dtype), stride=stride,
                padding=pads)
    _check(backend, "conv2d_backprop", args, ("out",), dtype, reduction=kh * kw * o)


@given(case=conv_case(pooling=True), ties=st.booleans())
def test_maxpool2d_forward(backend, case, ties):
    rng, dtype, (n, h, w, c, _), pool, stride, _, (p, q) = case
    x = _normal(rng, (n, h, w, c), dtype)
    if ties:  # few distinct values: ties in most windows
        x = np.round(x).astype(dtype)
    args = dict(x=x, out=np.empty((n, p, q, c), dtype), argmax=np.empty((n, p, q, c), np.int32),
                pool=pool, stride=stride)
    ref_ret, be_ret, ref_args, be_args = _run(backend, "maxpool2d_forward", args, ("out", "argmax"))
    assert be_ret is None
    np.testing.assert_array_equal(be_args["out"], ref_args["out"])
    np.testing.assert_array_equal(be_args["argmax"], ref_args["argmax"])


@given(case=conv_case(pooling=True), act=acts, give_both=st.booleans())
def test_maxpool2d_backward(backend, case, act, give_both):
    rng, dtype, (n, h, w, c, _), pool, stride, _, (p, q) = case
    z, y = _below(rng, act, (n, h, w, c), dtype, give_both)
    argmax = rng.integers(0, pool[0] * pool[1], (n, p, q, c)).astype(np.int32)
    args = dict(dy=_normal(rng, (n, p, q, c), dtype), argmax=argmax, z=z, y=y, act=act,
                out=np.empty((n, h, w, c), dtype), pool=pool, stride=stride)
    # overlapping windows (stride < pool) add up to pool_h*pool_w terms
    _check(backend, "maxpool2d_backward", args, ("out",), dtype, reduction=pool[0] * pool[1])


@given(data=st.data(), rate=st.sampled_from([0.0, 1e-9, 0.1, 0.5, 0.9]),
       seed=st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 2**64 - 1])),
       in_place=st.booleans(), forward=st.booleans())
def test_dropout(backend, data, rate, seed, in_place, forward):
    """The same mask and the same rounding on every backend: equal bit for bit."""
    rng, batch, width, width2, dtype = data.draw(case(backend))
    kernel = "dropout_forward" if forward else "dropout_backward"
    x = _normal(rng, (batch, width, width2), dtype)
    expected = np.empty_like(x)
    getattr(ref, kernel)(x, rate, seed, expected)
    got = x.copy() if in_place else np.empty_like(x)
    with fastnn.use_backend(backend):
        getattr(fastnn.ops, kernel)(got if in_place else x, rate, seed, got)
    np.testing.assert_array_equal(got, expected, err_msg=f"{backend}.{kernel}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_and_dropout_non_finite(backend, dtype):
    """NaN wins a pooling window (the first NaN), inf is a maximum like any
    other; dropped elements are +0.0 even for inf and NaN inputs."""
    x = np.array([[1, np.nan, 2, np.nan], [np.inf, 3, -np.inf, 0],
                  [-np.inf, -np.inf, 5, 5], [-np.inf, -np.inf, 5, np.nan]], dtype)[None, :, :, None]
    out, argmax = np.empty((1, 2, 2, 1), dtype), np.empty((1, 2, 2, 1), np.int32)
    with fastnn.use_backend(backend):
        fastnn.ops.maxpool2d_forward(x, out, argmax, (2, 2))
    assert np.isnan(out[0, 0, 0, 0]) and argmax[0, 0, 0, 0] == 1
    assert np.isnan(out[0, 0, 1, 0]) and argmax[0, 0, 1, 0] == 1
    assert out[0, 1, 0, 0] == -np.inf and argmax[0, 1, 0, 0] == 0
    assert np.isnan(out[0, 1, 1, 0]) and argmax[0, 1, 1, 0] == 3
    with np.errstate(all="ignore"):
        z = np.array([np.inf, -np.inf, np.nan, 1.0] * 64, dtype)
        expected, got = np.empty_like(z), np.empty_like(z)
        ref.dropout_forward(z, 0.5, 3, expected)
        with fastnn.use_backend(backend):
            fastnn.ops.dropout_forward(z, 0.5, 3, got)
    np.testing.assert_array_equal(got, expected)
    dropped = expected == 0
    assert dropped.any() and not np.signbit(got[dropped]).any()


GATHER_SOURCES = (np.float32, np.float64, np.uint8, np.int8, np.uint16, np.int16, np.int32,
                  np.uint32, np.int64, np.uint64, np.bool_, np.float16)


def _gather_source(rng, shape, dtype):
    """Values that exercise the conversion: the full integer range, bool bytes
    other than 0 and 1, floats with NaN, infinities, -0.0, huge and tiny ones."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 3, shape).astype(np.uint8).view(np.bool_)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    with np.errstate(all="ignore"):
        a = (rng.standard_normal(shape) * rng.choice([1e-40, 1.0, 1e30], shape)).astype(dtype)
    special = np.array([np.nan, np.inf, -np.inf, -0.0, 1e300, -1e-300], np.float64)
    with np.errstate(all="ignore"):
        a.flat[rng.integers(0, a.size, max(1, a.size // 8))] = rng.choice(special, max(1, a.size // 8))
    return a


@given(data=st.data(), src_dtype=st.sampled_from(GATHER_SOURCES),
       index_dtype=st.sampled_from([np.intp, np.int32, np.uint8]),
       layout=st.sampled_from(["c", "rows_strided", "reversed"]))
def test_gather_rows(backend, data, src_dtype, index_dtype, layout):
    """Bit for bit the reference's result (astype's conversion), for repeated
    and out-of-order indices; src never written."""
    rng, batch, width, width2, dtype = data.draw(case(backend))
    n = int(rng.integers(1, 20))
    base = _gather_source(rng, (2 * n, width, min(width2, 3)), src_dtype)
    src = {"c": base[:n], "rows_strided": base[::2], "reversed": base[::-2]}[layout]
    index = rng.integers(0, n, batch).astype(index_dtype)
    index[: min(batch, 2)] = n - 1     # a repeat (batch > 1), and the last row first
    expected = np.empty((batch,) + src.shape[1:], dtype)
    with np.errstate(all="ignore"):
        ref.gather_rows(src, index, expected)
        np.testing.assert_array_equal(expected, src[index.astype(np.intp)].astype(dtype))
    got = np.full_like(expected, 7)
    before = base.copy()
    with fastnn.use_backend(backend), np.errstate(all="ignore"):
        assert fastnn.ops.gather_rows(src, index, got) is None
    bits = np.uint32 if dtype == np.float32 else np.uint64
    np.testing.assert_array_equal(got.view(bits), expected.view(bits),
                                  err_msg=f"{backend}.gather_rows {src.dtype} -> {dtype}")
    assert base.tobytes() == before.tobytes(), "src was written"
