"""The one gate in front of every kernel.

Kernels trust their inputs (no bounds checks in the hot loops), so every call
that reaches a backend passes through here first: per call through
``fastnn.ops``, or once for the buffers a model owns. Each check raises a
``TypeError`` (wrong kind of object or dtype) or a ``ValueError`` (wrong shape,
layout, range or aliasing) that names the argument and what was expected, and
nothing is written before all checks of a call have passed.

Arrays may be NumPy arrays or, for the cuda backend, device arrays exposing
``__cuda_array_interface__``; both are described by :class:`ArrayInfo`.
Non-finite values are never rejected: kernels compute them as IEEE does.
"""

import numbers
from collections import namedtuple

import numpy as np

from .kernels.reference import ACTIVATIONS, Y_ACTIVATIONS

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

ArrayInfo = namedtuple("ArrayInfo", "shape dtype c_contiguous writeable start end")


def _c_contiguous(shape, strides, itemsize):
    if strides is None:
        return True
    expected = itemsize
    for dim, stride in zip(reversed(shape), reversed(strides)):
        if dim > 1 and stride != expected:
            return False
        expected *= dim
    return True


def array_info(name, a):
    """Describe ``a`` (NumPy or CUDA array) or raise ``TypeError``."""
    if isinstance(a, np.ndarray):
        start = a.__array_interface__["data"][0]
        return ArrayInfo(a.shape, a.dtype, a.flags.c_contiguous, a.flags.writeable,
                         start, start + a.nbytes)
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is not None:
        dtype = np.dtype(cai["typestr"])
        shape = tuple(cai["shape"])
        start, readonly = cai["data"]
        nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        return ArrayInfo(shape, dtype, _c_contiguous(shape, cai.get("strides"), dtype.itemsize),
                         not readonly, start, start + nbytes)
    raise TypeError(f"{name} must be a numpy.ndarray (or a CUDA device array on the cuda "
                    f"backend), got {type(a).__name__}")


def _overlap(a, b):
    return a.start < b.end and b.start < a.end and a.start != a.end and b.start != b.end


def _identical(a, b):
    return a.start == b.start and a.shape == b.shape


class Call:
    """Collects the arrays of one kernel call and checks them together."""

    def __init__(self):
        self.dtype = None
        self.dtype_from = None
        self.inputs = {}
        self.outputs = {}

    def float_array(self, name, a, shape, *, out=False):
        """Check a floating array: dtype float32/float64 shared by the call,
        the given shape (ints, or None for "any size >= 1"), C-contiguity and,
        for outputs, writability. Returns the resolved shape."""
        info = array_info(name, a)
        if info.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must have dtype float32 or float64, got {info.dtype}")
        if self.dtype is None:
            self.dtype, self.dtype_from = info.dtype, name
        elif info.dtype != self.dtype:
            raise TypeError(f"{name} has dtype {info.dtype} but {self.dtype_from} has "
                            f"{self.dtype}: all arrays of a call share one dtype "
                            f"(fastnn never casts)")
        self._shape(name, info, shape)
        if not info.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (numpy.ascontiguousarray makes a copy)")
        if isinstance(a, np.ndarray) and not a.flags.aligned:
            raise ValueError(f"{name} must be aligned to its dtype's size (a misaligned view "
                             f"of a byte buffer; numpy.ascontiguousarray(..).copy() aligns it)")
        if out:
            if not info.writeable:
                raise ValueError(f"{name} is an output and must be writable")
            self.outputs[name] = info
        else:
            self.inputs[name] = info
        return info.shape

    @staticmethod
    def _shape(name, info, shape):
        if len(info.shape) != len(shape):
            raise ValueError(f"{name} must be {len(shape)}-D with shape "
                             f"{_fmt(shape)}, got shape {info.shape}")
        for got, want in zip(info.shape, shape):
            if got == 0:
                raise ValueError(f"{name} must not be empty, got shape {info.shape}")
            if want is not None and got != want:
                raise ValueError(f"{name} must have shape {_fmt(shape)}, got {info.shape}")

    def labels(self, name, a, batch, classes):
        """Integer class indices of shape ``(batch,)`` with values in ``[0, classes)``."""
        info = array_info(name, a)
        if info.dtype.kind not in "iu":
            raise TypeError(f"{name} must have an integer dtype, got {info.dtype}")
        self._shape(name, info, (batch,))
        if not info.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
        host = np.asarray(a) if isinstance(a, np.ndarray) else _to_host(a)
        lo, hi = host.min(), host.max()
        if lo < 0 or hi >= classes:
            raise ValueError(f"{name} must hold class indices in [0, {classes}), got values "
                             f"in [{lo}, {hi}]")
        self.inputs[name] = info

    def no_overlap(self, allow_identical=False):
        """Outputs must not overlap inputs or each other. With
        ``allow_identical`` an output may be exactly an input (elementwise
        kernels work in place), but may not partly overlap it."""
        outs = list(self.outputs.items())
        for i, (oname, o) in enumerate(outs):
            for iname, inp in self.inputs.items():
                if not _overlap(o, inp):
                    continue
                if not allow_identical:
                    raise ValueError(f"{oname} overlaps the input {iname}: the output of a "
                                     f"kernel with a GEMM or a reduction must not share "
                                     f"memory with its inputs")
                if not _identical(o, inp):
                    raise ValueError(f"{oname} partly overlaps the input {iname}: an "
                                     f"output may be an input exactly (in place), not "
                                     f"overlap part of one")
            for pname, prev in outs[:i]:
                if _overlap(o, prev):
                    raise ValueError(f"{oname} overlaps the output {pname}: outputs must "
                                     f"not share memory")


def _to_host(a):
    import numba.cuda  # only reached with device arrays, when numba is loaded

    return numba.cuda.as_cuda_array(a).copy_to_host()


def _fmt(shape):
    return "(" + ", ".join("n" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


# ------------------------------------------------------------ scalar checks

def activation(name, act):
    if not isinstance(act, str):
        raise TypeError(f"{name} must be an activation name (str), got {type(act).__name__}")
    if act not in ACTIVATIONS:
        raise ValueError(f"{name} must be one of {', '.join(ACTIVATIONS)}; got {act!r}")
    return act


def real(name, value, *, low=None, high=None, low_open=False, high_open=True):
    """A finite real number within ``[low, high)`` (bounds as given)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not np.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (v < low or (low_open and v == low)):
        op = ">" if low_open else ">="
        raise ValueError(f"{name} must be {op} {low}, got {value}")
    if high is not None and (v > high or (high_open and v == high)):
        op = "<" if high_open else "<="
        raise ValueError(f"{name} must be {op} {high}, got {value}")
    return v


def boolean(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def integer(name, value, *, low=None):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


# ------------------------------------------------------------ per-kernel gates

def _derivative_inputs(c, act, z, y, shape):
    """``y`` is required for Y_ACTIVATIONS, ``z`` for the others; the unused one
    may be None (and is checked if given)."""
    need = "y" if act in Y_ACTIVATIONS else "z"
    for name, a in (("z", z), ("y", y)):
        if a is None:
            if name == need:
                raise ValueError(f"{name} is required: the derivative of {act} is computed "
                                 f"from {'the output y' if need == 'y' else 'the pre-activation z'}")
            continue
        c.float_array(name, a, shape)


#: BLAS takes 32-bit dimensions.
_BLAS_MAX = 2**31 - 1


def _blas_dims(**dims):
    for name, n in dims.items():
        if n > _BLAS_MAX:
            raise ValueError(f"{name} is {n}: a GEMM dimension must be below 2**31 (BLAS "
                             f"takes 32-bit sizes)")


def dense_forward(x, w, b, act, out, preact=None):
    activation("act", act)
    c = Call()
    batch, n_in = c.float_array("x", x, (None, None))
    _, n_out = c.float_array("w", w, (n_in, None))
    _blas_dims(batch=batch, n_in=n_in, n_out=n_out)
    c.float_array("b", b, (n_out,))
    c.float_array("out", out, (batch, n_out), out=True)
    if preact is not None:
        c.float_array("preact", preact, (batch, n_out), out=True)
    c.no_overlap()


def activation_forward(act, z, out):
    activation("act", act)
    c = Call()
    shape = c.float_array("z", z, (None,) * max(_ndim("z", z), 1))
    c.float_array("out", out, shape, out=True)
    c.no_overlap(allow_identical=True)


def _ndim(name, a):
    return len(array_info(name, a).shape)


def activation_backward(act, dy, z, y, out):
    activation("act", act)
    c = Call()
    shape = c.float_array("dy", dy, (None,) * max(_ndim("dy", dy), 1))
    _derivative_inputs(c, act, z, y, shape)
    c.float_array("out", out, shape, out=True)
    c.no_overlap(allow_identical=True)


def backprop_delta(dy, w, z, y, act, out):
    activation("act", act)
    c = Call()
    batch, n_out = c.float_array("dy", dy, (None, None))
    n_in, _ = c.float_array("w", w, (None, n_out))
    _blas_dims(batch=batch, n_in=n_in, n_out=n_out)
    _derivative_inputs(c, act, z, y, (batch, n_in))
    c.float_array("out", out, (batch, n_in), out=True)
    c.no_overlap()


def dense_backward(x, dz, dw, db):
    c = Call()
    batch, n_in = c.float_array("x", x, (None, None))
    _, n_out = c.float_array("dz", dz, (batch, None))
    _blas_dims(batch=batch, n_in=n_in, n_out=n_out)
    c.float_array("dw", dw, (n_in, n_out), out=True)
    c.float_array("db", db, (n_out,), out=True)
    c.no_overlap()


def softmax_cross_entropy(logits, labels, grad):
    c = Call()
    batch, classes = c.float_array("logits", logits, (None, None))
    c.labels("labels", labels, batch, classes)
    c.float_array("grad", grad, (batch, classes), out=True)
    c.no_overlap()


def sigmoid_binary_cross_entropy(logits, targets, grad):
    c = Call()
    shape = c.float_array("logits", logits, (None,) * max(_ndim("logits", logits), 1))
    c.float_array("targets", targets, shape)
    c.float_array("grad", grad, shape, out=True)
    if isinstance(targets, np.ndarray) and np.any((targets < 0) | (targets > 1)):
        raise ValueError("targets must lie in [0, 1]")
    c.no_overlap()


def mse(pred, target, grad):
    c = Call()
    shape = c.float_array("pred", pred, (None,) * max(_ndim("pred", pred), 1))
    c.float_array("target", target, shape)
    c.float_array("grad", grad, shape, out=True)
    c.no_overlap(allow_identical=True)   # grad may be pred or target (elementwise)


def softmax(z, out):
    c = Call()
    shape = c.float_array("z", z, (None, None))
    c.float_array("out", out, shape, out=True)
    c.no_overlap(allow_identical=True)


def _optimizer_arrays(p, g, states):
    c = Call()
    (n,) = c.float_array("p", p, (None,), out=True)
    c.float_array("g", g, (n,))
    for name, a in states:
        if a is not None:
            c.float_array(name, a, (n,), out=True)
    c.no_overlap()


def _regularisation(lr, weight_decay, l1):
    real("lr", lr, low=0, high=None)
    real("weight_decay", weight_decay, low=0, high=None)
    real("l1", l1, low=0, high=None)


def sgd_step(p, g, buf, lr, momentum, nesterov, weight_decay, l1):
    _regularisation(lr, weight_decay, l1)
    momentum = real("momentum", momentum, low=0, high=None)
    if boolean("nesterov", nesterov) and momentum == 0:
        raise ValueError("nesterov requires momentum > 0")
    if momentum > 0 and buf is None:
        raise ValueError("buf is required when momentum > 0 (a zero-initialised array like p)")
    _optimizer_arrays(p, g, [("buf", buf)])


def adam_step(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, decoupled, l1, vmax):
    _regularisation(lr, weight_decay, l1)
    integer("step", step, low=1)
    real("beta1", beta1, low=0, high=1)
    real("beta2", beta2, low=0, high=1)
    real("eps", eps, low=0, low_open=True, high=None)
    boolean("decoupled", decoupled)
    for name, a in (("m", m), ("v", v)):
        if a is None:
            raise TypeError(f"{name} must be a numpy.ndarray, got NoneType")
    _optimizer_arrays(p, g, [("m", m), ("v", v), ("vmax", vmax)])


def rmsprop_step(p, g, sq, buf, lr, rho, eps, momentum, centered_mean, weight_decay, l1):
    _regularisation(lr, weight_decay, l1)
    real("rho", rho, low=0, high=1)
    real("eps", eps, low=0, low_open=True, high=None)
    momentum = real("momentum", momentum, low=0, high=None)
    if sq is None:
        raise TypeError("sq must be a numpy.ndarray, got NoneType")
    if momentum > 0 and buf is None:
        raise ValueError("buf is required when momentum > 0 (a zero-initialised array like p)")
    _optimizer_arrays(p, g, [("sq", sq), ("buf", buf), ("centered_mean", centered_mean)])


# ------------------------------------------------------------ convolutional kernels (issue 15)
#
# NHWC images. The output size of a convolution or pool follows from the
# input, the kernel (or pool), the stride and the padding; a combination that
# leaves no output row or column is refused here, naming it.

def _int_tuple(name, value, length, what, low):
    """A tuple or list of ``length`` ints (NumPy integers too, not bools), each >= ``low``."""
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{name} must be a tuple or list of {length} ints ({what}), got "
                        f"{type(value).__name__}")
    if len(value) != length:
        raise ValueError(f"{name} must have {length} entries ({what}), got {len(value)}: "
                         f"{tuple(value)!r}")
    for v in value:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must hold ints ({what}), got {type(v).__name__} in "
                            f"{tuple(value)!r}")
        if v < low:
            raise ValueError(f"{name} must hold ints >= {low} ({what}), got {tuple(value)!r}")
    return tuple(int(v) for v in value)


def _stride(name, value):
    return _int_tuple(name, value, 2, "the steps (sh, sw)", 1)


def _padding(value, kh, kw):
    """``(top, bottom, left, right)``, ints >= 0, each below the kernel extent on its axis."""
    pads = _int_tuple("padding", value, 4, "zeros (top, bottom, left, right)", 0)
    top, bottom, left, right = pads
    if max(top, bottom) >= kh or max(left, right) >= kw:
        raise ValueError(f"padding {pads} must be below the kernel extent on each axis "
                         f"(top, bottom < kh = {kh}; left, right < kw = {kw}): a window of "
                         f"padding only")
    return pads


def _output_size(image, kernel, h, w, kh, kw, stride, pads=(0, 0, 0, 0)):
    """``(p, q)`` of a convolution or pool; ``ValueError`` naming the arrays
    ``image`` and ``kernel`` when either is below 1."""
    top, bottom, left, right = pads
    p = (h + top + bottom - kh) // stride[0] + 1
    q = (w + left + right - kw) // stride[1] + 1
    if p < 1 or q < 1:
        padded = f" padded to {h + top + bottom}x{w + left + right}" if any(pads) else ""
        raise ValueError(f"the {h}x{w} image of {image}{padded} is smaller than the {kh}x{kw} "
                         f"window of {kernel}, so there is no output (p = {p}, q = {q}; "
                         f"padding {pads}, stride {stride})")
    return p, q


def _int32_array(c, name, a, shape, *, out=False):
    """An int32, C-contiguous array of ``shape`` (readable input, or writable output)."""
    info = array_info(name, a)
    if info.dtype != np.dtype(np.int32):
        raise TypeError(f"{name} must have dtype int32, got {info.dtype}")
    c._shape(name, info, shape)
    if not info.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (numpy.ascontiguousarray makes a copy)")
    if isinstance(a, np.ndarray) and not a.flags.aligned:
        raise ValueError(f"{name} must be aligned to its dtype's size")
    if out:
        if not info.writeable:
            raise ValueError(f"{name} is an output and must be writable")
        c.outputs[name] = info
    else:
        c.inputs[name] = info
    return a


def _argmax_values(a, windows):
    """Window indices must lie in ``[0, windows)``: a backend scatters through them."""
    host = a if isinstance(a, np.ndarray) else _to_host(a)
    lo, hi = host.min(), host.max()
    if lo < 0 or hi >= windows:
        raise ValueError(f"argmax must hold window indices in [0, {windows}) (i*pw + j, from "
                         f"maxpool2d_forward), got values in [{lo}, {hi}]")


def _conv_gemm_dims(n, p, q, kh, kw, c, o):
    _blas_dims(**{"batch*p*q": n * p * q, "kh*kw*c": kh * kw * c, "filters": o})


def conv2d_forward(x, w, b, act, out, preact=None, stride=(1, 1), padding=(0, 0, 0, 0)):
    activation("act", act)
    c = Call()
    n, h, wd, ch = c.float_array("x", x, (None,) * 4)
    kh, kw, _, o = c.float_array("w", w, (None, None, ch, None))
    c.float_array("b", b, (o,))
    stride = _stride("stride", stride)
    pads = _padding(padding, kh, kw)
    p, q = _output_size("x", "w", h, wd, kh, kw, stride, pads)
    _conv_gemm_dims(n, p, q, kh, kw, ch, o)
    c.float_array("out", out, (n, p, q, o), out=True)
    if preact is not None:
        c.float_array("preact", preact, (n, p, q, o), out=True)
    c.no_overlap()


def conv2d_backward(x, dz, dw, db, stride=(1, 1), padding=(0, 0, 0, 0)):
    c = Call()
    n, h, wd, ch = c.float_array("x", x, (None,) * 4)
    kh, kw, _, o = c.float_array("dw", dw, (None, None, ch, None), out=True)
    c.float_array("db", db, (o,), out=True)
    stride = _stride("stride", stride)
    pads = _padding(padding, kh, kw)
    p, q = _output_size("x", "dw", h, wd, kh, kw, stride, pads)
    _conv_gemm_dims(n, p, q, kh, kw, ch, o)
    c.float_array("dz", dz, (n, p, q, o))
    c.no_overlap()


def conv2d_backprop(dz, w, z, y, act, out, stride=(1, 1), padding=(0, 0, 0, 0)):
    activation("act", act)
    c = Call()
    kh, kw, ch, o = c.float_array("w", w, (None,) * 4)
    n, p, q, _ = c.float_array("dz", dz, (None, None, None, o))
    stride = _stride("stride", stride)
    pads = _padding(padding, kh, kw)
    _, h, wd, _ = c.float_array("out", out, (n, None, None, ch), out=True)
    top, bottom, left, right = pads
    pp = (h + top + bottom - kh) // stride[0] + 1
    qq = (wd + left + right - kw) // stride[1] + 1
    if (pp, qq) != (p, q):
        raise ValueError(f"out has shape {(n, h, wd, ch)}: a {h}x{wd} input with a {kh}x{kw} "
                         f"kernel, stride {stride} and padding {pads} gives a "
                         f"{max(pp, 0)}x{max(qq, 0)} output, but dz is {p}x{q}")
    _conv_gemm_dims(n, p, q, kh, kw, ch, o)
    _derivative_inputs(c, act, z, y, (n, h, wd, ch))
    c.no_overlap()


def _pool(pool, stride):
    pool = _int_tuple("pool", pool, 2, "the window (ph, pw)", 1)
    return pool, (pool if stride is None else _stride("stride", stride))


def _pool_fits(pool, h, w, name):
    if pool[0] > h or pool[1] > w:
        raise ValueError(f"pool {pool} is larger than the {h}x{w} image of {name}: max "
                         f"pooling has no padding, so there is no output")


def maxpool2d_forward(x, out, argmax, pool=(2, 2), stride=None):
    c = Call()
    n, h, wd, ch = c.float_array("x", x, (None,) * 4)
    pool, stride = _pool(pool, stride)
    _pool_fits(pool, h, wd, "x")
    p, q = _output_size("x", "pool", h, wd, pool[0], pool[1], stride)
    c.float_array("out", out, (n, p, q, ch), out=True)
    _int32_array(c, "argmax", argmax, (n, p, q, ch), out=True)
    c.no_overlap()


def maxpool2d_backward(dy, argmax, z, y, act, out, pool=(2, 2), stride=None):
    activation("act", act)
    c = Call()
    n, p, q, ch = c.float_array("dy", dy, (None,) * 4)
    pool, stride = _pool(pool, stride)
    _, h, wd, _ = c.float_array("out", out, (n, None, None, ch), out=True)
    _pool_fits(pool, h, wd, "out (the pool's input)")
    pp, qq = _output_size("out", "pool", h, wd, pool[0], pool[1], stride)
    if (pp, qq) != (p, q):
        raise ValueError(f"out has shape {(n, h, wd, ch)}: a {h}x{wd} input with pool {pool} "
                         f"and stride {stride} gives a {pp}x{qq} output, but dy is {p}x{q}")
    _int32_array(c, "argmax", argmax, (n, p, q, ch))
    _derivative_inputs(c, act, z, y, (n, h, wd, ch))
    c.no_overlap()
    _argmax_values(argmax, pool[0] * pool[1])


def _rate(rate):
    if isinstance(rate, (bool, np.bool_)) or not isinstance(rate, numbers.Real):
        raise TypeError(f"rate must be a real number, got {type(rate).__name__}")
    r = float(rate)
    if not (0.0 <= r < 1.0):
        raise ValueError(f"rate must be in [0, 1), got {rate} (a rate of 1 would drop every "
                         f"element and scale by 1/0)")
    return r


def _seed(seed):
    seed = integer("seed", seed, low=0)
    if seed >= 2**64:
        raise ValueError(f"seed must be below 2**64 (a uint64), got {seed}")
    return seed


def _dropout(name, a, rate, seed, out):
    _rate(rate)
    _seed(seed)
    c = Call()
    shape = c.float_array(name, a, (None,) * max(_ndim(name, a), 1))
    c.float_array("out", out, shape, out=True)
    c.no_overlap(allow_identical=True)


def dropout_forward(x, rate, seed, out):
    _dropout("x", x, rate, seed, out)


def dropout_backward(dy, rate, seed, out):
    _dropout("dy", dy, rate, seed, out)


# ------------------------------------------------------------ data movement (issue 17)

def _rows_contiguous(a):
    """Whether every row of the ndarray ``a`` (all axes after the first) is one
    C-contiguous block; the first axis may have any stride."""
    expected = a.itemsize
    for dim, stride in zip(reversed(a.shape[1:]), reversed(a.strides[1:])):
        if dim > 1 and stride != expected:
            return False
        expected *= dim
    return True


def _index_range(index, n):
    """Every value of the integer array ``index`` in ``[0, n)``: one pass (the
    maximum of the values read as unsigned, where a negative one is huge); the
    message's minimum and maximum are computed only on failure."""
    host = index if isinstance(index, np.ndarray) else _to_host(index)
    unsigned = host.view(host.dtype.str.replace("i", "u"))
    if int(unsigned.max()) < n:
        return
    lo, hi = int(host.min()), int(host.max())
    raise ValueError(f"index must hold row numbers of src in [0, {n}), got values in "
                     f"[{lo}, {hi}]" + (" (negative indices do not count from the end)"
                                        if lo < 0 else ""))


def gather_rows(src, index, out):
    c = Call()
    s = array_info("src", src)
    if s.dtype.kind not in "biuf":
        raise TypeError(f"src must have a real dtype (bool, integer or floating), got {s.dtype}")
    if not s.shape or 0 in s.shape:
        raise ValueError(f"src must be at least 1-D and not empty, got shape {s.shape}")
    if isinstance(src, np.ndarray):
        if not _rows_contiguous(src):
            raise ValueError("src must be C-contiguous within each row (the axes after the "
                             "first; the rows themselves may lie at any stride): "
                             "numpy.ascontiguousarray(src) makes a copy")
    elif not s.c_contiguous:
        raise ValueError("src must be C-contiguous (a device array)")
    i = array_info("index", index)
    if i.dtype.kind not in "iu":
        raise TypeError(f"index must have an integer dtype, got {i.dtype}")
    if len(i.shape) != 1:
        raise ValueError(f"index must be 1-D, got shape {i.shape}")
    if i.shape[0] == 0:
        raise ValueError("index must not be empty (at least one row to gather)")
    c.float_array("out", out, (i.shape[0],) + tuple(s.shape[1:]), out=True)
    o = c.outputs["out"]
    for name, a, info in (("src", src, s), ("index", index, i)):
        if isinstance(a, np.ndarray) and isinstance(out, np.ndarray):
            shared = np.may_share_memory(out, a)
        else:
            shared = _overlap(o, info)
        if shared:
            raise ValueError(f"out overlaps {name}: gather_rows writes out while it reads "
                             f"{name}, so they must not share memory")
    _index_range(index, s.shape[0])
