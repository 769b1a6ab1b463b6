"""The gate: every class of bad input, for every kernel, raises the right
error naming the argument, and leaves every array byte-for-byte unchanged."""

import numpy as np
import pytest

import fastnn
from fastnn.kernels import reference as ref

F = np.float32


def valid(kernel):
    """Valid keyword arguments of ``kernel`` (float32, batch 3, in 4, out 5)."""
    rng = np.random.default_rng(0)

    def a(*shape):
        return rng.standard_normal(shape).astype(F)

    if kernel == "dense_forward":
        return dict(x=a(3, 4), w=a(4, 5), b=a(5), act="relu", out=a(3, 5), preact=a(3, 5))
    if kernel == "activation_forward":
        return dict(act="gelu", z=a(3, 5), out=a(3, 5))
    if kernel == "activation_backward":
        return dict(act="silu", dy=a(3, 5), z=a(3, 5), y=a(3, 5), out=a(3, 5))
    if kernel == "backprop_delta":
        return dict(dy=a(3, 5), w=a(4, 5), z=a(3, 4), y=a(3, 4), act="softplus", out=a(3, 4))
    if kernel == "dense_backward":
        return dict(x=a(3, 4), dz=a(3, 5), dw=a(4, 5), db=a(5))
    if kernel == "softmax_cross_entropy":
        return dict(logits=a(3, 5), labels=np.array([0, 4, 2]), grad=a(3, 5))
    if kernel == "sigmoid_binary_cross_entropy":
        return dict(logits=a(3, 1), targets=np.array([[0], [1], [0.5]], F), grad=a(3, 1))
    if kernel == "mse":
        return dict(pred=a(3, 2), target=a(3, 2), grad=a(3, 2))
    if kernel == "softmax":
        return dict(z=a(3, 5), out=a(3, 5))
    if kernel == "sgd_step":
        return dict(p=a(6), g=a(6), buf=a(6), lr=0.1, momentum=0.9, nesterov=True,
                    weight_decay=0.01, l1=0.0)
    if kernel == "adam_step":
        return dict(p=a(6), g=a(6), m=a(6), v=np.abs(a(6)), step=3, lr=1e-3, beta1=0.9,
                    beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False, l1=0.0,
                    vmax=np.abs(a(6)) + 1)
    if kernel == "rmsprop_step":
        return dict(p=a(6), g=a(6), sq=np.abs(a(6)) + 1, buf=a(6), lr=1e-2, rho=0.99, eps=1e-8,
                    momentum=0.9, centered_mean=a(6) * 0.1, weight_decay=0.0, l1=0.0)
    # convolutions: x (3, 6, 5, 2), w (3, 2, 2, 4), stride (1, 2), padding (1, 1, 0, 1):
    # p = (6 + 2 - 3) // 1 + 1 = 6, q = (5 + 1 - 2) // 2 + 1 = 3 (a kernel one row
    # taller changes p, so a grown w is a shape error)
    conv = dict(stride=(1, 2), padding=(1, 1, 0, 1))
    if kernel == "conv2d_forward":
        return dict(x=a(3, 6, 5, 2), w=a(3, 2, 2, 4), b=a(4), act="gelu", out=a(3, 6, 3, 4),
                    preact=a(3, 6, 3, 4), **conv)
    if kernel == "conv2d_backward":
        return dict(x=a(3, 6, 5, 2), dz=a(3, 6, 3, 4), dw=a(3, 2, 2, 4), db=a(4), **conv)
    if kernel == "conv2d_backprop":
        return dict(dz=a(3, 6, 3, 4), w=a(3, 2, 2, 4), z=a(3, 6, 5, 2), y=a(3, 6, 5, 2),
                    act="softplus", out=a(3, 6, 5, 2), **conv)
    # pooling: x (3, 5, 4, 2), pool (2, 2): out (3, 2, 2, 2)
    if kernel == "maxpool2d_forward":
        return dict(x=a(3, 5, 4, 2), out=a(3, 2, 2, 2), argmax=np.zeros((3, 2, 2, 2), np.int32),
                    pool=(2, 2), stride=None)
    if kernel == "maxpool2d_backward":
        return dict(dy=a(3, 2, 2, 2), argmax=rng.integers(0, 4, (3, 2, 2, 2)).astype(np.int32),
                    z=a(3, 5, 4, 2), y=a(3, 5, 4, 2), act="relu", out=a(3, 5, 4, 2),
                    pool=(2, 2), stride=None)
    if kernel == "dropout_forward":
        return dict(x=a(3, 5), rate=0.5, seed=7, out=a(3, 5))
    if kernel == "dropout_backward":
        return dict(dy=a(3, 5), rate=0.5, seed=7, out=a(3, 5))
    if kernel == "gather_rows":
        return dict(src=a(8, 4), index=np.array([7, 0, 7]), out=a(3, 4))
    raise AssertionError(kernel)


ARRAYS = {k: [n for n, v in valid(k).items() if isinstance(v, np.ndarray)] for k in ref.CONTRACT}
OUTPUTS = {
    "dense_forward": ["out", "preact"], "activation_forward": ["out"],
    "activation_backward": ["out"], "backprop_delta": ["out"], "dense_backward": ["dw", "db"],
    "softmax_cross_entropy": ["grad"], "sigmoid_binary_cross_entropy": ["grad"], "mse": ["grad"],
    "softmax": ["out"], "sgd_step": ["p", "buf"], "adam_step": ["p", "m", "v", "vmax"],
    "rmsprop_step": ["p", "sq", "buf", "centered_mean"],
    "conv2d_forward": ["out", "preact"], "conv2d_backward": ["dw", "db"],
    "conv2d_backprop": ["out"], "maxpool2d_forward": ["out", "argmax"],
    "maxpool2d_backward": ["out"], "dropout_forward": ["out"], "dropout_backward": ["out"],
    "gather_rows": ["out"],
}
FLOAT_ARRAYS = {k: [n for n in v if n not in ("labels", "argmax", "src", "index")]
                for k, v in ARRAYS.items()}
#: gather_rows converts (any real src into out's float dtype), takes any number of
#: source rows and reads its index at any stride: left out of those generic cases
#: (its own tests are below)
SAME_DTYPE_ARRAYS = {k: [] if k == "gather_rows" else v for k, v in FLOAT_ARRAYS.items()}
SHAPED_ARRAYS = {k: [n for n in v if (k, n) != ("gather_rows", "src")] for k, v in ARRAYS.items()}
CONTIGUOUS_ARRAYS = {k: [n for n in v if (k, n) != ("gather_rows", "index")]
                     for k, v in ARRAYS.items()}


def check_rejected(kernel, args, exc, match):
    """Call ``fastnn.ops.kernel(**args)``; it must raise ``exc`` matching
    ``match`` and leave every array argument unchanged."""
    before = {k: v.copy() for k, v in args.items() if isinstance(v, np.ndarray)}
    with pytest.raises(exc, match=match):
        getattr(fastnn.ops, kernel)(**args)
    for k, v in before.items():
        assert args[k].tobytes() == v.tobytes(), f"{kernel}: {k} was written by a failed call"


@pytest.mark.parametrize("kernel", ref.CONTRACT)
def test_valid_arguments_pass(kernel):
    getattr(fastnn.ops, kernel)(**valid(kernel))


def _cases(table):
    return [(k, n) for k in ref.CONTRACT for n in table[k]]


@pytest.mark.parametrize("kernel,name", _cases(ARRAYS))
def test_not_an_array(kernel, name):
    args = valid(kernel)
    args[name] = args[name].tolist()
    check_rejected(kernel, args, TypeError, name)


@pytest.mark.parametrize("kernel,name", _cases(FLOAT_ARRAYS))
@pytest.mark.parametrize("bad", [np.int32, np.float16, np.complex64])
def test_wrong_dtype(kernel, name, bad):
    args = valid(kernel)
    args[name] = args[name].astype(bad)
    check_rejected(kernel, args, TypeError, name)


@pytest.mark.parametrize("kernel,name", _cases(SAME_DTYPE_ARRAYS))
def test_mixed_dtypes(kernel, name):
    args = valid(kernel)
    args[name] = args[name].astype(np.float64)
    check_rejected(kernel, args, TypeError, "dtype")


@pytest.mark.parametrize("kernel,name", _cases(SHAPED_ARRAYS))
def test_wrong_shape(kernel, name):
    args = valid(kernel)
    a = args[name]
    args[name] = np.concatenate([a, a[:1]])  # one row / element too many
    check_rejected(kernel, args, ValueError, "shape")


@pytest.mark.parametrize("kernel,name", _cases(ARRAYS))
def test_wrong_ndim(kernel, name):
    args = valid(kernel)
    args[name] = args[name][..., None]
    # elementwise kernels take any ndim: the next array is then the wrong shape
    check_rejected(kernel, args, ValueError, r"must be \d-D|must have shape")


@pytest.mark.parametrize("kernel,name", _cases(CONTIGUOUS_ARRAYS))
def test_not_contiguous(kernel, name):
    args = valid(kernel)
    a = args[name]
    strided = np.repeat(a, 2, axis=-1)[..., ::2]
    assert not strided.flags.c_contiguous and strided.shape == a.shape
    args[name] = strided
    check_rejected(kernel, args, ValueError, f"{name} must be C-contiguous")


@pytest.mark.parametrize("kernel,name", _cases(OUTPUTS))
def test_read_only_output(kernel, name):
    args = valid(kernel)
    args[name].flags.writeable = False
    check_rejected(kernel, args, ValueError, f"{name} is an output and must be writable")


@pytest.mark.parametrize("kernel,name", _cases(ARRAYS))
def test_empty(kernel, name):
    args = valid(kernel)
    a = args[name]
    args[name] = a[:0]
    check_rejected(kernel, args, ValueError, name)


# ------------------------------------------------------------ aliasing

@pytest.mark.parametrize("kernel,out,inp", [
    ("dense_forward", "out", "preact"), ("backprop_delta", "out", "z"),
    ("backprop_delta", "out", "y"), ("softmax_cross_entropy", "grad", "logits"),
    ("sigmoid_binary_cross_entropy", "grad", "logits"),   # mse's grad may be pred: in place
    ("sgd_step", "buf", "g"), ("adam_step", "m", "v"), ("adam_step", "vmax", "g"),
    ("rmsprop_step", "centered_mean", "sq"),
    ("conv2d_forward", "out", "preact"),
    ("conv2d_backprop", "out", "z"), ("conv2d_backprop", "out", "y"),
    ("maxpool2d_backward", "out", "z"), ("maxpool2d_backward", "out", "y"),
])
def test_outputs_must_not_alias(kernel, out, inp):
    args = valid(kernel)
    args[out] = args[inp]
    check_rejected(kernel, args, ValueError, "overlap")


def test_gemm_output_must_not_alias_input():
    x = np.ones((4, 4), F)
    check_rejected("dense_forward", dict(x=x, w=np.ones((4, 4), F), b=np.ones(4, F), act="relu",
                                         out=x), ValueError, "out overlaps the input x")
    check_rejected("dense_backward", dict(x=np.ones((4, 4), F), dz=x, dw=x, db=np.ones(4, F)),
                   ValueError, "dw overlaps the input dz")


def test_elementwise_in_place_allowed_partial_overlap_rejected():
    buf = np.arange(12, dtype=F)
    z = buf[:10]
    fastnn.ops.activation_forward("relu", z, z)  # exactly in place: fine
    check_rejected("activation_forward", dict(act="relu", z=buf[:10], out=buf[2:12]),
                   ValueError, "partly overlaps")
    dy = np.ones((2, 3), F)
    fastnn.ops.activation_backward("tanh", dy, None, np.zeros((2, 3), F), dy)
    np.testing.assert_array_equal(dy, 1)


def test_two_outputs_must_not_overlap():
    args = valid("dense_backward")
    flat = np.zeros(20 + 5, F)
    args["dw"], args["db"] = flat[:20].reshape(4, 5), flat[18:23]
    check_rejected("dense_backward", args, ValueError, "db overlaps the output dw")


# ------------------------------------------------------------ names, labels, hyper-parameters

@pytest.mark.parametrize("kernel", ["dense_forward", "activation_forward",
                                    "activation_backward", "backprop_delta", "conv2d_forward",
                                    "conv2d_backprop", "maxpool2d_backward"])
def test_activation_names(kernel):
    args = valid(kernel)
    args["act"] = "swish"
    check_rejected(kernel, args, ValueError, "act must be one of identity, relu")
    args["act"] = 3
    check_rejected(kernel, args, TypeError, "act must be an activation name")


@pytest.mark.parametrize("act,missing", [("relu", "y"), ("tanh", "y"), ("gelu", "z"),
                                         ("leaky_relu", "z")])
def test_derivative_input_required(act, missing):
    args = valid("activation_backward")
    args["act"], args[missing] = act, None
    check_rejected("activation_backward", args, ValueError, f"{missing} is required")
    for kernel in ("backprop_delta", "conv2d_backprop", "maxpool2d_backward"):
        args = valid(kernel)
        args["act"], args[missing] = act, None
        check_rejected(kernel, args, ValueError, f"{missing} is required")


@pytest.mark.parametrize("labels,exc,match", [
    (np.array([0, 5, 1]), ValueError, r"labels must hold class indices in \[0, 5\)"),
    (np.array([0, -1, 1]), ValueError, "labels must hold class indices"),
    (np.array([0.0, 1.0, 2.0]), TypeError, "labels must have an integer dtype"),
    (np.array([True, False, True]), TypeError, "labels must have an integer dtype"),
    (np.array([0, 1]), ValueError, "labels must have shape"),
])
def test_bad_labels(labels, exc, match):
    args = valid("softmax_cross_entropy")
    args["labels"] = labels
    check_rejected("softmax_cross_entropy", args, exc, match)


def test_bce_targets_in_unit_interval():
    args = valid("sigmoid_binary_cross_entropy")
    args["targets"] = np.array([[0], [1.5], [0]], F)
    check_rejected("sigmoid_binary_cross_entropy", args, ValueError, r"targets must lie in \[0, 1\]")


@pytest.mark.parametrize("kernel,name,value,exc", [
    ("sgd_step", "lr", -0.1, ValueError), ("sgd_step", "lr", float("nan"), ValueError),
    ("sgd_step", "lr", "0.1", TypeError), ("sgd_step", "momentum", -0.5, ValueError),
    ("sgd_step", "weight_decay", -1.0, ValueError), ("sgd_step", "l1", -1e-3, ValueError),
    ("sgd_step", "nesterov", 1, TypeError),
    ("adam_step", "beta1", 1.0, ValueError), ("adam_step", "beta2", -0.1, ValueError),
    ("adam_step", "eps", 0.0, ValueError), ("adam_step", "step", 0, ValueError),
    ("adam_step", "step", 1.5, TypeError), ("adam_step", "step", True, TypeError),
    ("adam_step", "lr", float("inf"), ValueError), ("adam_step", "decoupled", "yes", TypeError),
    ("rmsprop_step", "rho", 1.0, ValueError), ("rmsprop_step", "eps", -1e-8, ValueError),
    ("rmsprop_step", "momentum", -0.9, ValueError),
])
def test_hyper_parameter_ranges(kernel, name, value, exc):
    args = valid(kernel)
    args[name] = value
    check_rejected(kernel, args, exc, name)


def test_momentum_needs_buffer_and_nesterov_needs_momentum():
    args = valid("sgd_step")
    args["buf"] = None
    check_rejected("sgd_step", args, ValueError, "buf is required when momentum > 0")
    args = valid("sgd_step")
    args["momentum"] = 0.0
    check_rejected("sgd_step", args, ValueError, "nesterov requires momentum > 0")
    args = valid("rmsprop_step")
    args["buf"] = None
    check_rejected("rmsprop_step", args, ValueError, "buf is required when momentum > 0")


def test_optional_state_may_be_none():
    args = valid("sgd_step")
    args.update(buf=None, momentum=0.0, nesterov=False)
    fastnn.ops.sgd_step(**args)
    args = valid("adam_step")
    args["vmax"] = None
    fastnn.ops.adam_step(**args)
    args = valid("rmsprop_step")
    args.update(buf=None, momentum=0.0, centered_mean=None)
    fastnn.ops.rmsprop_step(**args)


def test_non_finite_values_are_not_rejected():
    z = np.array([[np.nan, np.inf, -np.inf]], F)
    out = np.empty_like(z)
    fastnn.ops.activation_forward("relu", z, out)
    p = np.array([np.nan, 1.0], F)
    fastnn.ops.sgd_step(p, np.array([1.0, np.inf], F), None, 0.1, 0.0, False, 0.0, 0.0)
    assert np.isnan(p[0]) and p[1] == -np.inf


def _misaligned(a):
    raw = np.zeros(a.nbytes + 1, np.uint8)
    m = raw[1:].view(a.dtype).reshape(a.shape)
    m[...] = a
    assert not m.flags.aligned
    return m


@pytest.mark.parametrize("kernel,name", _cases(FLOAT_ARRAYS))
def test_misaligned(kernel, name):
    """Kernels read whole elements: an array not aligned to its dtype is refused."""
    args = valid(kernel)
    args[name] = _misaligned(args[name])
    check_rejected(kernel, args, ValueError, f"{name} must be aligned")


@pytest.mark.parametrize("kernel", ["dense_forward", "backprop_delta", "dense_backward",
                                    "conv2d_forward", "conv2d_backward", "conv2d_backprop"])
def test_gemm_dimensions_fit_blas(kernel, monkeypatch):
    from fastnn import _validate

    monkeypatch.setattr(_validate, "_BLAS_MAX", 3)
    check_rejected(kernel, valid(kernel), ValueError, "GEMM dimension must be below 2\\*\\*31")


# ------------------------------------------------------------ convolution, pooling, dropout

CONV = ["conv2d_forward", "conv2d_backward", "conv2d_backprop"]
POOL = ["maxpool2d_forward", "maxpool2d_backward"]


@pytest.mark.parametrize("kernel", CONV + POOL)
@pytest.mark.parametrize("stride,exc", [
    ((0, 1), ValueError), ((1, -2), ValueError), ((1,), ValueError), ((1, 1, 1), ValueError),
    ((1.0, 1), TypeError), ((True, 1), TypeError), (2, TypeError), ("11", TypeError),
    (np.array([1, 1]), TypeError),
])
def test_bad_stride(kernel, stride, exc):
    args = valid(kernel)
    args["stride"] = stride
    check_rejected(kernel, args, exc, "stride")


@pytest.mark.parametrize("kernel", CONV)
@pytest.mark.parametrize("padding,exc,match", [
    ((3, 0, 0, 0), ValueError, r"padding \(3, 0, 0, 0\) must be below the kernel extent"),
    ((0, 3, 0, 0), ValueError, "below the kernel extent"),
    ((0, 0, 2, 0), ValueError, "kw = 2"),
    ((0, 0, 0, 2), ValueError, "below the kernel extent"),
    ((-1, 0, 0, 0), ValueError, "padding must hold ints >= 0"),
    ((1, 1, 1), ValueError, "padding must have 4 entries"),
    ((1, 1, 0.0, 0), TypeError, "padding must hold ints"),
    ("same", TypeError, "padding must be a tuple or list"),
    (None, TypeError, "padding"),
])
def test_bad_padding(kernel, padding, exc, match):
    args = valid(kernel)
    args["padding"] = padding
    check_rejected(kernel, args, exc, match)


def test_stride_and_padding_accept_lists_and_numpy_ints():
    args = valid("conv2d_forward")
    args.update(stride=[np.int64(1), np.int32(2)], padding=[np.uint8(1), 1, 0, 1])
    fastnn.ops.conv2d_forward(**args)
    args = valid("maxpool2d_forward")
    args.update(pool=[2, 2], stride=[np.int64(2), 2])
    fastnn.ops.maxpool2d_forward(**args)


def test_conv_without_output():
    """A kernel larger than the padded image, or a pad that still leaves none."""
    x = np.ones((1, 2, 5, 1), F)
    w = np.ones((3, 3, 1, 1), F)
    args = dict(x=x, w=w, b=np.zeros(1, F), act="relu", out=np.ones((1, 1, 3, 1), F))
    check_rejected("conv2d_forward", args, ValueError,
                   r"the 2x5 image of x is smaller than the 3x3 window of w, so there is no "
                   r"output \(p = 0")
    check_rejected("conv2d_backward", dict(x=x, dz=np.ones((1, 1, 3, 1), F),
                                           dw=np.ones((3, 3, 1, 1), F), db=np.ones(1, F)),
                   ValueError, "window of dw, so there is no output")
    # backprop: out's image is the input; too small for the kernel, it cannot match dz
    check_rejected("conv2d_backprop", dict(dz=np.ones((1, 1, 3, 1), F), w=w, z=None,
                                           y=np.ones((1, 2, 5, 1), F), act="relu",
                                           out=np.ones((1, 2, 5, 1), F)),
                   ValueError, r"out has shape \(1, 2, 5, 1\).* gives a 0x3 output, but dz is 1x3")
    # one row of padding makes it fit
    args.update(padding=(1, 0, 0, 0))
    fastnn.ops.conv2d_forward(**args)


def test_conv_backprop_out_must_give_back_dz():
    args = valid("conv2d_backprop")
    for name in ("out", "z", "y"):
        args[name] = np.zeros((3, 8, 5, 2), F)   # p would be 8
    check_rejected("conv2d_backprop", args, ValueError, "gives a 8x3 output, but dz is 6x3")
    # several input sizes give the same output at stride 2: out's shape picks one
    dz = np.ones((1, 2, 2, 1), F)
    w = np.ones((3, 3, 1, 1), F)
    for h in (5, 6):
        out = np.empty((1, h, h, 1), F)
        fastnn.ops.conv2d_backprop(dz, w, None, np.ones_like(out), "identity", out, (2, 2))
        assert out[0, -1, -1, 0] == (1 if h == 5 else 0)


@pytest.mark.parametrize("kernel", POOL)
def test_pool_larger_than_input(kernel):
    args = valid(kernel)
    args["pool"] = (6, 2)
    check_rejected(kernel, args, ValueError, r"pool \(6, 2\) is larger than the 5x4 image")
    args["pool"] = (0, 2)
    check_rejected(kernel, args, ValueError, "pool must hold ints >= 1")
    args["pool"] = 2
    check_rejected(kernel, args, TypeError, "pool must be a tuple or list")


def test_pool_backward_out_must_give_back_dy():
    args = valid("maxpool2d_backward")
    for name in ("out", "z", "y"):
        args[name] = np.zeros((3, 6, 4, 2), F)   # p would be 3
    check_rejected("maxpool2d_backward", args, ValueError, "gives a 3x2 output, but dy is 2x2")
    args = valid("maxpool2d_backward")
    args["stride"] = (1, 1)   # p, q would be 4, 3
    check_rejected("maxpool2d_backward", args, ValueError, "gives a 4x3 output")


@pytest.mark.parametrize("kernel,out", [("maxpool2d_forward", True), ("maxpool2d_backward", False)])
def test_argmax_int32(kernel, out):
    for bad in (np.int64, np.uint32, np.float32, np.int16):
        args = valid(kernel)
        args["argmax"] = args["argmax"].astype(bad)
        check_rejected(kernel, args, TypeError, "argmax must have dtype int32")
    args = valid(kernel)
    args["argmax"] = _misaligned(args["argmax"])
    check_rejected(kernel, args, ValueError, "argmax must be aligned")
    if not out:   # an input may be read-only
        args = valid(kernel)
        args["argmax"].flags.writeable = False
        getattr(fastnn.ops, kernel)(**args)


@pytest.mark.parametrize("value", [4, -1, 2**31 - 1])
def test_argmax_values_in_the_window(value):
    args = valid("maxpool2d_backward")
    args["argmax"][1, 0, 1, 1] = value
    check_rejected("maxpool2d_backward", args, ValueError,
                   r"argmax must hold window indices in \[0, 4\)")
    args = valid("maxpool2d_backward")
    args.update(pool=(2, 1), stride=(2, 2))   # windows of 2: index 2 is out of range
    args["argmax"][...] = 2
    check_rejected("maxpool2d_backward", args, ValueError, r"in \[0, 2\)")


def test_pool_outputs_must_not_overlap():
    args = valid("maxpool2d_forward")
    buf = np.zeros(48, np.int32)
    args["argmax"] = buf[:24].reshape(3, 2, 2, 2)
    args["out"] = buf[20:44].view(F).reshape(3, 2, 2, 2)
    check_rejected("maxpool2d_forward", args, ValueError, "overlaps the output")
    args = valid("maxpool2d_forward")
    args["out"] = args["x"].reshape(-1)[:24].reshape(3, 2, 2, 2)
    check_rejected("maxpool2d_forward", args, ValueError, "out overlaps the input x")
    args = valid("maxpool2d_backward")
    args["argmax"] = args["out"].reshape(-1)[:24].view(np.int32).reshape(3, 2, 2, 2)
    args["argmax"][...] = 0
    check_rejected("maxpool2d_backward", args, ValueError, "out overlaps the input argmax")


def test_conv_outputs_must_not_overlap_inputs():
    args = valid("conv2d_forward")
    buf = np.zeros(400, F)
    args["x"] = buf[:180].reshape(3, 6, 5, 2)
    args["out"] = buf[100:316].reshape(3, 6, 3, 4)
    check_rejected("conv2d_forward", args, ValueError, "out overlaps the input x")
    args = valid("conv2d_backward")
    args["dw"] = args["dz"].reshape(-1)[:48].reshape(3, 2, 2, 4)
    check_rejected("conv2d_backward", args, ValueError, "dw overlaps the input dz")
    args = valid("conv2d_backward")
    args["db"] = args["dw"].reshape(-1)[4:8]
    check_rejected("conv2d_backward", args, ValueError, "overlaps the output dw")
    args = valid("conv2d_backprop")
    args["out"] = args["z"]    # the fused epilogue reads z: not in place
    check_rejected("conv2d_backprop", args, ValueError, "out overlaps the input z")


@pytest.mark.parametrize("kernel", ["dropout_forward", "dropout_backward"])
@pytest.mark.parametrize("rate,exc,match", [
    (1.0, ValueError, r"rate must be in \[0, 1\), got 1.0 \(a rate of 1"),
    (1, ValueError, r"rate must be in \[0, 1\)"), (-0.1, ValueError, "rate must be in"),
    (float("nan"), ValueError, "rate must be in"), (float("inf"), ValueError, "rate"),
    ("0.5", TypeError, "rate must be a real number"), (True, TypeError, "rate"),
    (None, TypeError, "rate"), (complex(0.5, 0), TypeError, "rate"),
])
def test_dropout_rate(kernel, rate, exc, match):
    args = valid(kernel)
    args["rate"] = rate
    check_rejected(kernel, args, exc, match)


@pytest.mark.parametrize("kernel", ["dropout_forward", "dropout_backward"])
@pytest.mark.parametrize("seed,exc,match", [
    (-1, ValueError, "seed must be >= 0"), (2**64, ValueError, r"seed must be below 2\*\*64"),
    (1.5, TypeError, "seed must be an integer"), (True, TypeError, "seed"),
    (None, TypeError, "seed"), ("7", TypeError, "seed"),
])
def test_dropout_seed(kernel, seed, exc, match):
    args = valid(kernel)
    args["seed"] = seed
    check_rejected(kernel, args, exc, match)


@pytest.mark.parametrize("kernel", ["dropout_forward", "dropout_backward"])
def test_dropout_accepted_values_and_in_place(kernel):
    first = "x" if kernel == "dropout_forward" else "dy"
    for rate, seed in ((0.0, 0), (np.float32(0.25), np.uint64(2**64 - 1)), (0.999, 2**64 - 1),
                       (np.float64(0.5), np.int8(3))):
        args = valid(kernel)
        args.update(rate=rate, seed=seed)
        getattr(fastnn.ops, kernel)(**args)
    args = valid(kernel)
    expected = np.empty_like(args["out"])
    getattr(ref, kernel)(args[first], 0.5, 7, expected)
    args["out"] = args[first]
    getattr(fastnn.ops, kernel)(**args)
    np.testing.assert_array_equal(args[first], expected)
    buf = np.zeros(20, F)
    args = {first: buf[:15].reshape(3, 5), "rate": 0.5, "seed": 7,
            "out": buf[5:20].reshape(3, 5)}
    check_rejected(kernel, args, ValueError, "partly overlaps")


# ------------------------------------------------------------ gather_rows (issue 17)

def _gather(src=None, index=None, out=None):
    args = valid("gather_rows")
    for k, v in (("src", src), ("index", index), ("out", out)):
        if v is not None:
            args[k] = v
    return args


@pytest.mark.parametrize("index,exc,match", [
    (np.array([0.0, 1.0, 2.0]), TypeError, "index must have an integer dtype, got float64"),
    (np.array([True, False, True]), TypeError, "index must have an integer dtype, got bool"),
    (np.array([0, 8, 1]), ValueError, r"index must hold row numbers of src in \[0, 8\), got "
                                      r"values in \[0, 8\]"),
    (np.array([0, -1, 1]), ValueError, r"in \[0, 8\), got values in \[-1, 1\] \(negative "
                                       r"indices do not count from the end\)"),
    (np.array([0, 2**40, 1]), ValueError, "index must hold row numbers"),
    (np.array([0, 255, 1], np.uint8), ValueError, r"got values in \[0, 255\]"),
    (np.array([0, -128, 1], np.int8), ValueError, "negative indices"),
    (np.array([0, 2**63, 1], np.uint64), ValueError, "index must hold row numbers"),
    (np.array([[0, 1, 2]]), ValueError, "index must be 1-D"),
    (np.array([], np.intp), ValueError, "index must not be empty"),
    (np.array([0, 1]), ValueError, r"out must have shape \(2, 4\)"),
])
def test_gather_bad_index(index, exc, match):
    check_rejected("gather_rows", _gather(index=index), exc, match)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32,
                                   np.uint64, np.int64, np.float16, np.float32, np.float64,
                                   np.longdouble, np.bool_, ">f4", ">i2"])
def test_gather_any_real_src_dtype(dtype):
    for out_dtype in (np.float32, np.float64):
        args = _gather(src=np.arange(32).reshape(8, 4).astype(dtype),
                       out=np.empty((3, 4), out_dtype))
        fastnn.ops.gather_rows(**args)
        np.testing.assert_array_equal(args["out"], args["src"][[7, 0, 7]].astype(out_dtype))


@pytest.mark.parametrize("dtype", [np.complex64, object, "U3", "M8[s]"])
def test_gather_src_must_be_real(dtype):
    check_rejected("gather_rows", _gather(src=np.zeros((8, 4), dtype)), TypeError,
                   "src must have a real dtype")


@pytest.mark.parametrize("index_dtype", [np.int8, np.uint8, np.int16, np.uint16, np.int32,
                                         np.uint32, np.int64, np.uint64, ">i8"])
def test_gather_any_integer_index(index_dtype):
    args = _gather(index=np.array([7, 0, 7]).astype(index_dtype))
    fastnn.ops.gather_rows(**args)
    np.testing.assert_array_equal(args["out"], args["src"][[7, 0, 7]])


def test_gather_src_rows_at_any_stride():
    """Rows that are C-contiguous blocks are enough: a slice of rows, of
    columns, reversed rows, a 1-D src (rows of one element); a read-only src."""
    big = np.arange(20 * 6, dtype=F).reshape(20, 6)
    for src in (big[::3], big[2:10, 1:5], big[::-2, :4], big[:, 2], big[:8].copy()):
        src.flags.writeable = False if src.base is None else src.flags.writeable
        out = np.empty((3,) + src.shape[1:], np.float64)
        fastnn.ops.gather_rows(src, np.array([1, 0, 1]), out)
        np.testing.assert_array_equal(out, src[[1, 0, 1]])
    ro = big[:8].copy()
    ro.flags.writeable = False
    fastnn.ops.gather_rows(ro, np.array([7, 0, 7]), np.empty((3, 6), F))
    strided_index = np.array([7, 9, 0, 9, 7, 9])[::2]
    fastnn.ops.gather_rows(ro, strided_index, out := np.empty((3, 6), F))
    np.testing.assert_array_equal(out, ro[[7, 0, 7]])


def test_gather_src_rows_must_be_contiguous():
    fortran = np.asfortranarray(np.ones((8, 4), F))
    check_rejected("gather_rows", _gather(src=fortran), ValueError,
                   "src must be C-contiguous within each row")
    check_rejected("gather_rows", _gather(src=np.ones((8, 3, 4), F)[:, :, ::2].transpose(0, 2, 1),
                                          out=np.ones((3, 2, 3), F)),
                   ValueError, "src must be C-contiguous within each row")
    check_rejected("gather_rows", _gather(src=np.float32(1.0)), TypeError, "src must be")
    check_rejected("gather_rows", _gather(src=np.ones((8, 0), F), out=np.ones((3, 0), F)),
                   ValueError, "src must be at least 1-D and not empty")


def test_gather_out_must_not_overlap_src_or_index():
    buf = np.zeros((12, 4), F)
    check_rejected("gather_rows", _gather(src=buf[:8], out=buf[7:10]), ValueError,
                   "out overlaps src")
    check_rejected("gather_rows", _gather(src=buf[::2], out=buf[1:4]), ValueError,
                   "out overlaps src")
    fastnn.ops.gather_rows(buf[:8], np.array([7, 0, 7]), buf[8:11])     # disjoint: fine
    raw = np.zeros(3 * 4 * 8, np.uint8)
    out = raw.view(np.float64).reshape(3, 4)
    index = raw[:24].view(np.int64)
    index[:] = [1, 2, 3]
    check_rejected("gather_rows", _gather(src=np.ones((8, 4)), index=index, out=out),
                   ValueError, "out overlaps index")
