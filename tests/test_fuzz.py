"""Every kernel fuzzed through the public gate (``fastnn.ops``) with hypothesis.

Each example draws a valid call of one kernel (shapes, float32/float64,
values with NaN, inf, huge and subnormal numbers, hyper-parameters, optional
arrays) and then zero to three mutations of it: another dtype (float16,
integers, complex, big-endian, the other float), a wrong or empty shape, a
strided or transposed view, an output aliasing an input exactly (same object
or another view of the same bytes) or partly, two outputs overlapping, a
read-only output, a misaligned array, a missing or extra optional array, a
list instead of an array, odd hyper-parameters (NaN, inf, negative, bool,
NumPy scalars, strings), an unknown activation, out-of-range labels or
targets.

Every array of a call is a view into one byte arena, separated by guard
bytes of random content. Then:

* the gate (``fastnn._validate``) decides alone whether the call is valid;
* a call it rejects raises ``TypeError``/``ValueError`` through ``fastnn.ops``
  too, and leaves every byte of the arena as it was (nothing written at all);
* a call it accepts runs without an exception, returns a float for the
  losses and None otherwise, and writes no byte outside its outputs (the
  guards, the gaps, the inputs are compared byte for byte); where all inputs
  are finite and moderate the outputs also match the reference run on
  copies with the same aliasing (loose tolerance: the parity suite is the
  precise check).

Each CPU backend runs with its own thresholds and, for cython and numba, once
more with every loop forced onto its parallel path (two threads, thresholds
1), so that chunk boundaries of tiny arrays are exercised.

``FASTNN_FUZZ_EXAMPLES`` sets the examples per (kernel, backend, mode)
(default 12; e.g. 300 for a longer local run); ``FASTNN_FUZZ_ALIGNED=1``
leaves misaligned arrays out (the sanitizer run, where each misaligned load is
an UBSan report).
"""

import contextlib
import math
import os
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastnn
from fastnn import _validate, ops
from fastnn.kernels import reference as ref

EXAMPLES = int(os.environ.get("FASTNN_FUZZ_EXAMPLES", "12"))
#: FASTNN_FUZZ_ALIGNED=1 leaves out misaligned arrays (scripts/sanitize.sh: UBSan reports
#: every misaligned load, and the gate lets such arrays through; it checks them apart)
ALIGNED_ONLY = os.environ.get("FASTNN_FUZZ_ALIGNED") == "1"
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
GUARD = 64      # guard bytes before each array
LOSSES = ("softmax_cross_entropy", "sigmoid_binary_cross_entropy", "mse")


# ------------------------------------------------------------------ call descriptions

@dataclass
class Arr:
    """An array argument before it is placed in the arena."""

    shape: tuple
    dtype: np.dtype
    out: bool = False
    kind: str = "float"          # float, nonneg, unit (targets in [0, 1]), labels
    classes: int = 0             # labels: values in [0, classes)
    values: str = "normal"       # normal, special (NaN/inf/huge/subnormal), bad (labels/targets out of range)
    layout: str = "c"            # c, step2 (every other element), transpose
    misalign: int = 0            # bytes
    readonly: bool = False
    as_list: bool = False
    alias_of: str = None         # place at this array's bytes ...
    alias_offset: int = 0        # ... shifted by this many bytes
    same_object: bool = False    # the very same ndarray object as alias_of


@dataclass
class Call:
    kernel: str
    order: tuple                 # positional parameter names
    arrays: dict                 # name -> Arr or None
    scalars: dict                # name -> value
    outputs: tuple               # names of the arrays the kernel writes
    mutations: list = field(default_factory=list)


FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
LABEL_DTYPES = tuple(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.int32, np.int64,
                                           np.uint32, np.uint64, np.intp))
#: gather_rows' sources besides the floats: any real dtype, converted into out's
GATHER_SOURCES = tuple(np.dtype(t) for t in (np.bool_, np.uint8, np.int8, np.uint16, np.int16,
                                             np.int32, np.uint64, np.int64, np.float16, ">f4"))


def _dim(draw):
    """Mostly tiny, sometimes past a vector width or two, rarely wider."""
    return draw(st.one_of(st.integers(1, 5), st.integers(6, 40), st.integers(41, 130)))


def _act(draw):
    return draw(st.sampled_from(ref.ACTIVATIONS))


def _values(draw):
    return draw(st.sampled_from(("normal", "normal", "normal", "special")))


def _spec(draw, kernel):
    dt = draw(st.sampled_from(FLOATS))
    F = lambda *shape, **kw: Arr(tuple(shape), dt, values=_values(draw), **kw)  # noqa: E731
    B, I, O = _dim(draw), _dim(draw), _dim(draw)
    if kernel == "dense_forward":
        act = _act(draw)
        arrays = dict(x=F(B, I), w=F(I, O), b=F(O), out=F(B, O, out=True),
                      preact=draw(st.sampled_from([None, F(B, O, out=True)])))
        return Call(kernel, ("x", "w", "b", "act", "out", "preact"), arrays, {"act": act},
                    ("out", "preact"))
    if kernel in ("activation_forward", "activation_backward", "sigmoid_binary_cross_entropy",
                  "mse"):
        ndim = draw(st.integers(1, 3))
        shape = tuple(_dim(draw) if i == ndim - 1 else draw(st.integers(1, 6))
                      for i in range(ndim))
        if kernel == "activation_forward":
            return Call(kernel, ("act", "z", "out"), dict(z=F(*shape), out=F(*shape, out=True)),
                        {"act": _act(draw)}, ("out",))
        if kernel == "activation_backward":
            act = _act(draw)
            need_y = act in ref.Y_ACTIVATIONS
            z = F(*shape) if (not need_y or draw(st.booleans())) else None
            y = F(*shape) if (need_y or draw(st.booleans())) else None
            return Call(kernel, ("act", "dy", "z", "y", "out"),
                        dict(dy=F(*shape), z=z, y=y, out=F(*shape, out=True)), {"act": act},
                        ("out",))
        if kernel == "sigmoid_binary_cross_entropy":
            return Call(kernel, ("logits", "targets", "grad"),
                        dict(logits=F(*shape), targets=Arr(shape, dt, kind="unit"),
                             grad=F(*shape, out=True)), {}, ("grad",))
        return Call(kernel, ("pred", "target", "grad"),
                    dict(pred=F(*shape), target=F(*shape), grad=F(*shape, out=True)), {},
                    ("grad",))
    if kernel == "backprop_delta":
        act = _act(draw)
        need_y = act in ref.Y_ACTIVATIONS
        z = F(B, I) if (not need_y or draw(st.booleans())) else None
        y = F(B, I) if (need_y or draw(st.booleans())) else None
        return Call(kernel, ("dy", "w", "z", "y", "act", "out"),
                    dict(dy=F(B, O), w=F(I, O), z=z, y=y, out=F(B, I, out=True)), {"act": act},
                    ("out",))
    if kernel == "dense_backward":
        return Call(kernel, ("x", "dz", "dw", "db"),
                    dict(x=F(B, I), dz=F(B, O), dw=F(I, O, out=True), db=F(O, out=True)), {},
                    ("dw", "db"))
    if kernel == "softmax_cross_entropy":
        ldt = draw(st.sampled_from(LABEL_DTYPES))
        C = min(O, 127)
        return Call(kernel, ("logits", "labels", "grad"),
                    dict(logits=F(B, C), labels=Arr((B,), ldt, kind="labels", classes=C),
                         grad=F(B, C, out=True)), {}, ("grad",))
    if kernel == "softmax":
        return Call(kernel, ("z", "out"), dict(z=F(B, O), out=F(B, O, out=True)), {}, ("out",))
    if kernel in ref.CONV_KERNELS:
        return _conv_spec(draw, kernel, dt, F)
    if kernel == "gather_rows":
        n, k = draw(st.integers(1, 40)), draw(st.integers(1, 40))
        row = tuple(draw(st.integers(1, 6)) for _ in range(draw(st.integers(0, 2))))
        sdt = draw(st.sampled_from(FLOATS + GATHER_SOURCES))
        return Call(kernel, ("src", "index", "out"),
                    dict(src=Arr((n,) + row, sdt, values=_values(draw)),
                         index=Arr((k,), draw(st.sampled_from(LABEL_DTYPES)), kind="labels",
                                   classes=n),
                         out=F(k, *row, out=True)), {}, ("out",))
    n = draw(st.one_of(st.integers(1, 40), st.integers(41, 300)))
    P = lambda **kw: F(n, **kw)  # noqa: E731
    reg = dict(lr=draw(st.sampled_from([0.0, 1e-3, 0.1])),
               weight_decay=draw(st.sampled_from([0.0, 1e-2])),
               l1=draw(st.sampled_from([0.0, 1e-4])))
    if kernel == "sgd_step":
        momentum = draw(st.sampled_from([0.0, 0.9]))
        nesterov = momentum > 0 and draw(st.booleans())
        buf = P(out=True) if momentum > 0 or draw(st.booleans()) else None
        return Call(kernel, ("p", "g", "buf", "lr", "momentum", "nesterov", "weight_decay", "l1"),
                    dict(p=P(out=True), g=P(), buf=buf),
                    dict(reg, momentum=momentum, nesterov=nesterov), ("p", "buf"))
    if kernel == "adam_step":
        vmax = Arr((n,), dt, out=True, kind="nonneg") if draw(st.booleans()) else None
        return Call(kernel, ("p", "g", "m", "v", "step", "lr", "beta1", "beta2", "eps",
                             "weight_decay", "decoupled", "l1", "vmax"),
                    dict(p=P(out=True), g=P(), m=P(out=True),
                         v=Arr((n,), dt, out=True, kind="nonneg"), vmax=vmax),
                    dict(reg, step=draw(st.sampled_from([1, 2, 1000])),
                         beta1=draw(st.sampled_from([0.0, 0.9])),
                         beta2=draw(st.sampled_from([0.0, 0.999])),
                         eps=draw(st.sampled_from([1e-8, 1e-3])), decoupled=draw(st.booleans())),
                    ("p", "m", "v", "vmax"))
    assert kernel == "rmsprop_step"
    momentum = draw(st.sampled_from([0.0, 0.9]))
    buf = P(out=True) if momentum > 0 or draw(st.booleans()) else None
    cm = P(out=True) if draw(st.booleans()) else None
    return Call(kernel, ("p", "g", "sq", "buf", "lr", "rho", "eps", "momentum", "centered_mean",
                         "weight_decay", "l1"),
                dict(p=P(out=True), g=P(), sq=Arr((n,), dt, out=True, kind="nonneg"), buf=buf,
                     centered_mean=cm),
                dict(reg, rho=draw(st.sampled_from([0.0, 0.99])),
                     eps=draw(st.sampled_from([1e-8, 1e-3])), momentum=momentum),
                ("p", "sq", "buf", "centered_mean"))


def _conv_spec(draw, kernel, dt, F):
    """A valid call of a convolution, pooling or dropout kernel: small NHWC
    images, windows of 1 to 3, strides of 1 to 3, pads below the window."""
    if kernel in ("dropout_forward", "dropout_backward"):
        ndim = draw(st.integers(1, 4))
        shape = tuple(_dim(draw) if i == ndim - 1 else draw(st.integers(1, 6))
                      for i in range(ndim))
        first = "x" if kernel == "dropout_forward" else "dy"
        scalars = dict(rate=draw(st.sampled_from([0.0, 0.1, 0.5, 0.9])),
                       seed=draw(st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 2**64 - 1]))))
        return Call(kernel, (first, "rate", "seed", "out"),
                    {first: F(*shape), "out": F(*shape, out=True)}, scalars, ("out",))
    n, c, o = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    if kernel.startswith("maxpool"):
        pads = (0, 0, 0, 0)
    else:
        pads = tuple(draw(st.integers(0, k - 1)) for k in (kh, kh, kw, kw))
    h = draw(st.integers(max(1, kh - pads[0] - pads[1]), 9))
    w = draw(st.integers(max(1, kw - pads[2] - pads[3]), 9))
    p = (h + pads[0] + pads[1] - kh) // stride[0] + 1
    q = (w + pads[2] + pads[3] - kw) // stride[1] + 1
    geometry = dict(stride=stride, padding=pads)
    if kernel == "conv2d_forward":
        return Call(kernel, ("x", "w", "b", "act", "out", "preact", "stride", "padding"),
                    dict(x=F(n, h, w, c), w=F(kh, kw, c, o), b=F(o), out=F(n, p, q, o, out=True),
                         preact=draw(st.sampled_from([None, F(n, p, q, o, out=True)]))),
                    dict(geometry, act=_act(draw)), ("out", "preact"))
    if kernel == "conv2d_backward":
        return Call(kernel, ("x", "dz", "dw", "db", "stride", "padding"),
                    dict(x=F(n, h, w, c), dz=F(n, p, q, o), dw=F(kh, kw, c, o, out=True),
                         db=F(o, out=True)), geometry, ("dw", "db"))
    act = _act(draw)
    need_y = act in ref.Y_ACTIVATIONS
    z = F(n, h, w, c) if (not need_y or draw(st.booleans())) else None
    y = F(n, h, w, c) if (need_y or draw(st.booleans())) else None
    if kernel == "conv2d_backprop":
        return Call(kernel, ("dz", "w", "z", "y", "act", "out", "stride", "padding"),
                    dict(dz=F(n, p, q, o), w=F(kh, kw, c, o), z=z, y=y,
                         out=F(n, h, w, c, out=True)), dict(geometry, act=act), ("out",))
    pool = dict(pool=(kh, kw), stride=draw(st.sampled_from([None, stride])))
    if pool["stride"] is None:
        p, q = (h - kh) // kh + 1, (w - kw) // kw + 1
    if kernel == "maxpool2d_forward":
        return Call(kernel, ("x", "out", "argmax", "pool", "stride"),
                    dict(x=F(n, h, w, c), out=F(n, p, q, c, out=True),
                         argmax=Arr((n, p, q, c), np.dtype(np.int32), out=True)),
                    pool, ("out", "argmax"))
    assert kernel == "maxpool2d_backward"
    # argmax is an input of window indices: filled like labels, in [0, kh*kw)
    return Call(kernel, ("dy", "argmax", "z", "y", "act", "out", "pool", "stride"),
                dict(dy=F(n, p, q, c),
                     argmax=Arr((n, p, q, c), np.dtype(np.int32), kind="labels", classes=kh * kw),
                     z=z, y=y, out=F(n, h, w, c, out=True)), dict(pool, act=act), ("out",))


# ------------------------------------------------------------------ mutations

ODD_DTYPES = tuple(np.dtype(t) for t in (np.float16, np.int32, np.int64, np.complex64, np.bool_,
                                         ">f4", ">f8", np.longdouble))
ODD_SCALARS = (float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1.0, 2.0, 1e300, True, None,
               "0.1", np.float32(0.5), np.float64(1e-3), np.int64(3), np.int8(-1), 1 << 70,
               complex(1, 1))


def _mutate(draw, call):
    present = [k for k, a in call.arrays.items() if a is not None]
    outs = [k for k in call.outputs if call.arrays.get(k) is not None]
    ins = [k for k in present if k not in outs]
    what = draw(st.sampled_from((
        "dtype", "shape", "layout", "alias_exact", "alias_partial", "alias_outputs", "readonly",
        "misalign", "misalign", "none", "list", "scalar", "act", "values")))
    a = call.arrays
    if what == "dtype" and present:
        k = draw(st.sampled_from(present))
        dt = a[k].dtype
        choices = [d for d in ODD_DTYPES + FLOATS if d != dt]
        a[k] = replace(a[k], dtype=draw(st.sampled_from(choices)))
    elif what == "shape" and present:
        k = draw(st.sampled_from(present))
        shape = list(a[k].shape)
        how = draw(st.sampled_from(("grow", "shrink", "zero", "add_dim", "drop_dim")))
        if not shape:
            how = "add_dim"
        i = draw(st.integers(0, max(0, len(shape) - 1)))
        if how == "grow":
            shape[i] += 1
        elif how == "shrink":
            shape[i] = max(0, shape[i] - 1)
        elif how == "zero":
            shape[i] = 0
        elif how == "add_dim":
            shape.insert(i, draw(st.integers(1, 3)))
        elif len(shape) > 1:
            i = min(i, len(shape) - 2)
            shape[i:i + 2] = [shape[i] * shape[i + 1]]
        else:
            shape = []
        a[k] = replace(a[k], shape=tuple(shape))
    elif what == "layout" and present:
        k = draw(st.sampled_from(present))
        layouts = ["step2"] + (["transpose"] if len(a[k].shape) >= 2 else [])
        a[k] = replace(a[k], layout=draw(st.sampled_from(layouts)))
    elif what == "alias_exact" and outs and ins:
        o, i = draw(st.sampled_from(outs)), draw(st.sampled_from(ins))
        a[o] = replace(a[o], alias_of=i, alias_offset=0, same_object=draw(st.booleans()))
    elif what == "alias_partial" and outs and ins:
        o, i = draw(st.sampled_from(outs)), draw(st.sampled_from(ins))
        shift = draw(st.sampled_from((1, 4, 8, -8, -4)))
        a[o] = replace(a[o], alias_of=i, alias_offset=shift * a[i].dtype.itemsize // 4)
    elif what == "alias_outputs" and len(outs) >= 2:
        o1, o2 = draw(st.permutations(outs))[:2]
        shift = draw(st.sampled_from((0, 0, 4, 8)))
        a[o2] = replace(a[o2], alias_of=o1, alias_offset=shift, same_object=shift == 0 and draw(st.booleans()))
    elif what == "readonly" and outs:
        k = draw(st.sampled_from(outs))
        a[k] = replace(a[k], readonly=True)
    elif what == "misalign" and present and not ALIGNED_ONLY:
        k = draw(st.sampled_from(present))
        a[k] = replace(a[k], misalign=draw(st.integers(1, max(1, a[k].dtype.itemsize - 1))))
    elif what == "none":
        k = draw(st.sampled_from(sorted(a)))
        if a[k] is None:
            like = next((v for v in a.values() if v is not None), None)
            if like is None:    # every array already None
                return
            shape = like.shape if len(like.shape) and k not in ("z", "y") else like.shape
            a[k] = Arr(shape, like.dtype, out=k in call.outputs)
        else:
            a[k] = None
    elif what == "list" and present:
        k = draw(st.sampled_from(present))
        a[k] = replace(a[k], as_list=True)
    elif what == "scalar" and call.scalars:
        k = draw(st.sampled_from(sorted(call.scalars)))
        call.scalars[k] = draw(st.sampled_from(ODD_SCALARS + ("relu", "softmax", "")))
    elif what == "act" and "act" in call.scalars:
        call.scalars["act"] = draw(st.sampled_from(("Relu", "softmax", "", None, 3, b"relu")))
    elif what == "values" and present:
        k = draw(st.sampled_from(present))
        a[k] = replace(a[k], values="bad")
    else:
        return
    call.mutations.append(what)


@st.composite
def calls(draw, kernel):
    call = _spec(draw, kernel)
    for _ in range(draw(st.sampled_from((0, 0, 1, 1, 2, 3)))):
        _mutate(draw, call)
    return call, draw(st.integers(0, 2**32 - 1))


# ------------------------------------------------------------------ the arena

def _fill(arr, spec, rng):
    if arr.size == 0 or arr.dtype.kind not in "fiucb" or arr.dtype.kind == "c":
        if arr.dtype.kind == "c" and arr.size:
            arr[...] = rng.standard_normal(arr.shape)
        return
    if spec.kind == "labels":
        hi = max(spec.classes, 1)
        vals = rng.integers(0, hi, arr.shape)
        if spec.values == "bad":
            vals.flat[rng.integers(0, vals.size)] = rng.choice([-1, hi, hi + 100])
        arr[...] = vals.astype(arr.dtype, casting="unsafe")
        return
    if arr.dtype.kind in "iub":
        arr[...] = rng.integers(-3, 4, arr.shape).astype(arr.dtype, casting="unsafe")
        return
    if spec.kind == "unit":
        vals = rng.random(arr.shape)
        if spec.values == "bad":
            vals.flat[rng.integers(0, vals.size)] = rng.choice([-0.5, 1.5, np.inf])
    else:
        vals = rng.standard_normal(arr.shape) * rng.choice([1e-3, 1.0, 30.0])
        if spec.kind == "nonneg":
            vals = np.abs(vals)
        if spec.values in ("special", "bad"):
            fi = np.finfo(arr.dtype) if arr.dtype.kind == "f" else np.finfo(np.float64)
            special = np.array([np.nan, np.inf, -np.inf, fi.max, -fi.max, fi.tiny / 4, -0.0, 0.0,
                                float(fi.max) / 4])
            mask = rng.random(arr.shape) < 0.3
            vals = np.where(mask, rng.choice(special, arr.shape), vals)
            if spec.kind == "nonneg":
                vals = np.abs(vals)
    with np.errstate(all="ignore"):
        arr[...] = vals.astype(arr.dtype) if arr.dtype.kind == "f" else vals


def _base_shape(spec):
    shape = spec.shape
    if spec.layout == "step2" and shape:
        return shape[:-1] + (shape[-1] * 2,)
    if spec.layout == "transpose":
        return shape[::-1]
    return shape


def _view(arena, offset, spec):
    base_shape = _base_shape(spec)
    base = np.ndarray(base_shape, spec.dtype, buffer=arena, offset=offset)
    if spec.layout == "step2" and spec.shape:
        return base[..., ::2]
    if spec.layout == "transpose":
        return base.T
    return base


def _nbytes(spec):
    return int(np.prod(_base_shape(spec), dtype=np.int64)) * spec.dtype.itemsize


def _place(call, seed):
    """Lay every array of ``call`` out in one arena with random guard bytes.
    Returns (arena, arrays by name, ranges by name)."""
    rng = np.random.default_rng(seed)
    specs = {k: v for k, v in call.arrays.items() if v is not None}
    own = [k for k, s in specs.items() if s.alias_of is None or specs.get(s.alias_of) is None
           or specs[s.alias_of].alias_of is not None]
    offsets, pos = {}, GUARD
    for k in own:
        pos += specs[k].misalign
        offsets[k] = pos
        pos += _nbytes(specs[k])
        pos = (pos + 15) // 16 * 16 + GUARD     # 16-aligned starts plus the guard
    tail = max([_nbytes(s) for s in specs.values()] + [0]) + 2 * GUARD
    arena = rng.integers(0, 256, pos + tail, dtype=np.uint8)
    arrays = {}
    for k in own:
        arrays[k] = _view(arena, offsets[k], specs[k])
        _fill(arrays[k], specs[k], rng)
    for k, s in specs.items():
        if k in arrays:
            continue
        target = s.alias_of
        if s.same_object and s.alias_offset == 0 and arrays[target].dtype == s.dtype \
                and arrays[target].shape == s.shape:
            arrays[k] = arrays[target]
        else:
            off = max(0, offsets[target] + s.alias_offset)
            arrays[k] = _view(arena, off, replace(s, layout="c"))
    for k, s in specs.items():
        if s.readonly and arrays[k] is not arrays.get(s.alias_of):
            arrays[k].setflags(write=False)
    args = {}
    for k, arr in arrays.items():
        args[k] = arr.tolist() if specs[k].as_list else arr
    for k in call.arrays:
        args.setdefault(k, None)
    return arena, args


def _byte_range(arena, a):
    start = a.__array_interface__["data"][0] - arena.__array_interface__["data"][0]
    return start, start + a.nbytes


# ------------------------------------------------------------------ modes

@contextlib.contextmanager
def _forced_parallel(backend):
    """Every loop of ``backend`` on its parallel path: two threads, thresholds 1."""
    restore = []
    if backend == "cython":
        from fastnn.kernels import cython_cpu   # the extensions of the loaded CPU variant

        for mod in cython_cpu._EXTENSIONS:
            ones = (1,) if "_cy_optim" in mod.__name__ or "_cy_data" in mod.__name__ else (1, 1)
            old = mod._set_parallel_min(*ones)
            restore.append(lambda mod=mod, old=old: mod._set_parallel_min(*(
                old if isinstance(old, tuple) else (old,))))
            mod.set_num_threads(2)
            restore.append(lambda mod=mod: mod.set_num_threads(fastnn.get_num_threads()))
    elif backend == "numba":
        from fastnn.kernels import numba_cpu as nb
        old = dict(nb.PARALLEL_MIN)
        nb.PARALLEL_MIN.update({k: 1 for k in nb.PARALLEL_MIN})
        restore.append(lambda: nb.PARALLEL_MIN.update(old))
        nb.set_num_threads(2)
        restore.append(lambda: nb.set_num_threads(fastnn.get_num_threads()))
    try:
        yield
    finally:
        for undo in reversed(restore):
            undo()


CPU = [name for name, info in fastnn.backends().items() if name != "cuda" and info.available]
CASES = [pytest.param(b, m, id=f"{b}-{m}") for b in CPU
         for m in (("default", "parallel") if b in ("cython", "numba") else ("default",))]


# ------------------------------------------------------------------ the check

def _moderate(args, call):
    for k, s in call.arrays.items():
        a = args.get(k)
        if isinstance(a, np.ndarray) and a.dtype.kind == "f" and s.kind != "labels":
            if not np.all(np.isfinite(a)) or np.abs(a).max(initial=0) > 1e3:
                return False
    return all(not isinstance(v, float) or math.isfinite(v) for v in call.scalars.values())


def _reference_on_copies(call, args):
    """Run the reference on copies of the arrays that keep the call's aliasing."""
    copies, by_memory = {}, {}
    for k, a in args.items():
        if isinstance(a, np.ndarray):
            key = (a.__array_interface__["data"][0], a.shape, a.dtype.str)
            if key not in by_memory:
                by_memory[key] = np.array(a)
            copies[k] = by_memory[key]
        else:
            copies[k] = a
    params = [copies[n] if n in copies else call.scalars[n] for n in call.order]
    with np.errstate(all="ignore"):
        result = getattr(ref, call.kernel)(*params)
    return result, copies


def _check(kernel, backend, call, seed):
    arena, args = _place(call, seed)
    params = [args[n] if n in call.arrays else call.scalars[n] for n in call.order]
    before = arena.copy()
    what = f"{kernel} on {backend}, mutations {call.mutations}"
    try:
        getattr(_validate, kernel)(*params)
        gate_error = None
    except (TypeError, ValueError) as exc:
        gate_error = exc
    assert np.array_equal(arena, before), f"{what}: the gate wrote into an array"
    if gate_error is not None:
        with pytest.raises(type(gate_error)):
            getattr(ops, kernel)(*params)
        changed = np.flatnonzero(arena != before)
        assert changed.size == 0, f"{what}: rejected ({gate_error}) but wrote bytes {changed[:8]}"
        return "rejected"
    expected = _reference_on_copies(call, args) if _moderate(args, call) else None
    with np.errstate(all="ignore"):
        result = getattr(ops, kernel)(*params)
    if kernel in LOSSES:
        assert type(result) is float, f"{what}: returned {type(result)}"
    else:
        assert result is None, f"{what}: returned {result!r}"
    allowed = np.zeros(arena.size, bool)
    for k in call.outputs:
        a = args.get(k)
        if a is not None:
            lo, hi = _byte_range(arena, a)
            allowed[lo:hi] = True
    stray = np.flatnonzero((arena != before) & ~allowed)
    assert stray.size == 0, f"{what}: wrote outside its outputs at arena bytes {stray[:8]}"
    if expected is not None:
        ref_result, copies = expected
        dt = next(a.dtype for k, a in args.items() if isinstance(a, np.ndarray)
                  and call.arrays[k].kind != "labels")
        loose = (1e-3, 1e-4) if dt == np.float32 else (1e-9, 1e-10)
        width = max(max(a.shape, default=1) for a in args.values() if isinstance(a, np.ndarray))
        for k in call.outputs:
            if args.get(k) is not None:
                np.testing.assert_allclose(args[k], copies[k], rtol=loose[0],
                                           atol=loose[1] * width, equal_nan=True,
                                           err_msg=f"{what}: {k}")
        if kernel in LOSSES:
            assert math.isclose(result, ref_result, rel_tol=loose[0], abs_tol=loose[1] * width) \
                or (math.isnan(result) and math.isnan(ref_result)), f"{what}: loss"
    return "accepted"


@pytest.mark.parametrize("kernel", ref.CONTRACT)
@pytest.mark.parametrize("backend,mode", CASES)
def test_fuzz_through_the_gate(kernel, backend, mode):
    outcomes = []

    @FUZZ
    @given(calls(kernel))
    def run(drawn):
        call, seed = drawn
        outcomes.append((_check(kernel, backend, call, seed), tuple(call.mutations)))

    with fastnn.use_backend(backend):
        if mode == "parallel":
            with _forced_parallel(backend):
                run()
        else:
            run()
    assert outcomes
    if os.environ.get("FASTNN_FUZZ_STATS"):
        import collections
        accepted = collections.Counter(m for o, m in outcomes if o == "accepted")
        print(f"\n{kernel} {backend}-{mode}: {len(outcomes)} calls, "
              f"{sum(accepted.values())} accepted; accepted mutations: {dict(accepted)}")
