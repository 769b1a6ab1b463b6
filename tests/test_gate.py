"""The compiled gate of ``fastnn.ops`` (``fastnn._gate``, ``kernels/_cy_gate.pyx``)
against its definition, the Python gate (``fastnn._validate``).

The compiled checks may send any call on to the Python gate, but must never
accept one the Python gate rejects; and they must accept the ordinary valid
calls, or ``fastnn.ops`` pays the Python gate's 8-20 us on every call.
"""

import contextlib
import inspect
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastnn
from fastnn import _gate, _validate
from fastnn.kernels import reference as ref

from test_fuzz import calls, _place
from test_validate import valid

compiled = pytest.mark.skipif(_gate._cy_gate is None,
                              reason="fastnn.kernels._cy_gate is not built")


def test_every_kernel_is_described():
    """A contract kernel without a description takes the Python gate on every
    call: add its lines to ``fastnn._gate.SPECS``."""
    assert set(ref.CONTRACT) - set(_gate.PYTHON_GATE) <= set(_gate.SPECS)
    for kernel in ref.CONTRACT:
        if kernel in _gate.SPECS:     # parameters in the signature's order
            _gate.compile_spec(kernel, _gate.SPECS[kernel])


@compiled
def test_codes_agree_with_the_compiled_module():
    codes = _gate._cy_gate.CODES
    assert codes["kinds"] == _gate._KINDS
    assert list(codes["flags"].values()) == [_gate._F_OUT, _gate._F_NONE, _gate._F_IF_Z,
                                             _gate._F_IF_Y, _gate._F_IF_POS, _gate._F_LIKE,
                                             _gate._F_UNIT, _gate._F_BELOW, _gate._F_ROWS,
                                             _gate._F_TAIL]
    assert list(codes["rules"].values()) == [_gate._R_BLAS, _gate._R_NEEDS_POS,
                                             _gate._R_OUTSIZE, _gate._R_LESS]


def test_a_description_must_follow_the_signature():
    with pytest.raises(ValueError, match="the kernel"):
        _gate.compile_spec("softmax", "out float B C out\nz float B C")
    with pytest.raises(ValueError, match="cannot read"):
        _gate.compile_spec("softmax", "z float B C sideways\nout float B C out")


# ------------------------------------------------------------------ valid calls go fast

def _conv_valid(kernel, dtype):
    rng = np.random.default_rng(1)

    def a(*shape):
        return rng.standard_normal(shape).astype(dtype)

    n, h, w, c, o, kh, kw = 2, 7, 6, 3, 4, 3, 2
    stride, padding = (2, 1), [1, 0, 1, 1]
    p, q = (h + 1 - kh) // 2 + 1, (w + 2 - kw) // 1 + 1
    if kernel == "conv2d_forward":
        return (a(n, h, w, c), a(kh, kw, c, o), a(o), "gelu", a(n, p, q, o), a(n, p, q, o),
                stride, padding)
    if kernel == "conv2d_backward":
        return a(n, h, w, c), a(n, p, q, o), a(kh, kw, c, o), a(o), stride, padding
    if kernel == "conv2d_backprop":
        return a(n, p, q, o), a(kh, kw, c, o), None, a(n, h, w, c), "relu", a(n, h, w, c), \
            stride, padding
    if kernel == "maxpool2d_forward":
        return a(n, h, w, c), a(n, 3, 3, c), np.zeros((n, 3, 3, c), np.int32), (2, 2), None
    if kernel == "maxpool2d_backward":
        argmax = rng.integers(0, 6, (n, 2, 5, c)).astype(np.int32)
        return a(n, 2, 5, c), argmax, a(n, h, w, c), None, "silu", a(n, h, w, c), (3, 2), [3, 1]
    if kernel == "dropout_forward":
        return a(3, 5), 0.25, 2**64 - 1, a(3, 5)
    assert kernel == "dropout_backward"
    x = a(4, 2, 3)
    return x, 0.0, 7, x


def _valid_calls(kernel):
    """Positional valid calls of ``kernel`` in float32 and float64, with the
    optional arrays given and (where allowed) None."""
    params = list(inspect.signature(getattr(ref, kernel)).parameters)
    out = []
    for dtype in (np.float32, np.float64):
        if kernel in ref.CONV_KERNELS:
            args = list(_conv_valid(kernel, dtype))
        else:
            kw = valid(kernel)
            args = [a.astype(dtype) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a
                    for a in (kw[p] for p in params)]
        out.append(tuple(args))
        if kernel in ("dense_forward", "adam_step"):
            args[-1] = None
            out.append(tuple(args))
    return out


DESCRIBED = [k for k in ref.CONTRACT if k not in _gate.PYTHON_GATE]


@compiled
@pytest.mark.parametrize("kernel", DESCRIBED)
def test_valid_calls_take_the_fast_path(kernel):
    op = _gate.OPS[kernel]
    assert op.compiled
    for args in _valid_calls(kernel):
        getattr(_validate, kernel)(*args)           # the definition accepts it
        assert op.accepts(*args), f"{kernel}: a valid call left to the Python gate"


@compiled
def test_fast_path_cases():
    """Calls the compiled checks treat specially, each way."""
    op = _gate.OPS["activation_forward"]
    z = np.ones((2, 3), np.float32)
    assert op.accepts("relu", z, z)                          # in place
    assert not op.accepts("relu", z, z[::-1])                # a view the other way round
    assert not op.accepts("relu", z.astype(">f4"), z)        # big-endian: the Python gate decides
    assert op.accepts(np.str_("relu"), z, z.copy())         # a str subclass, as the gate
    assert not op.accepts(b"relu", z, z.copy())
    sgd = _gate.OPS["sgd_step"]
    p, g = np.ones(4), np.ones(4)
    assert sgd.accepts(p, g, None, 0.1, 0.0, False, 0, 0)    # ints as reals
    assert not sgd.accepts(p, g, None, 0.1, 0.9, False, 0.0, 0.0)   # momentum needs buf
    assert not sgd.accepts(p, g, None, 0.1, 0.0, True, 0.0, 0.0)    # nesterov needs momentum
    assert sgd.accepts(p, g, None, np.float64(0.1), 0.0, False, 0.0, 0.0)
    assert not sgd.accepts(p, g, None, np.float32(0.1), 0.0, False, 0.0, 0.0)  # -> Python
    ce = _gate.OPS["softmax_cross_entropy"]
    logits, grad = np.zeros((3, 4), np.float32), np.zeros((3, 4), np.float32)
    for dt in (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64):
        assert ce.accepts(logits, np.array([0, 3, 1], dt), grad), dt
        assert not ce.accepts(logits, np.array([0, 4, 1], dt), grad), dt
    assert not ce.accepts(logits, np.array([0, -1, 1]), grad)
    assert not ce.accepts(logits, np.array([0, 2**40, 1]), grad)
    assert not ce.accepts(logits, np.array([0, 2**63 + 5, 1], np.uint64), grad)
    wide = np.zeros((3, 300), np.float32)      # more classes than an int8 holds
    assert ce.accepts(wide, np.array([0, 127, 5], np.int8), np.zeros_like(wide))
    assert not ce.accepts(wide, np.array([0, -1, 5], np.int8), np.zeros_like(wide))
    assert ce.accepts(wide, np.array([0, 255, 5], np.uint8), np.zeros_like(wide))
    assert not ce.accepts(wide, np.array([0, -128, 5], np.int8), np.zeros_like(wide))
    bce = _gate.OPS["sigmoid_binary_cross_entropy"]
    t = np.array([[0.0], [1.0], [np.nan]], np.float32)
    assert bce.accepts(np.zeros((3, 1), np.float32), t, np.zeros((3, 1), np.float32))
    t[0] = -0.0
    assert bce.accepts(np.zeros((3, 1), np.float32), t, np.zeros((3, 1), np.float32))
    t[0] = 1.0000001
    assert not bce.accepts(np.zeros((3, 1), np.float32), t, np.zeros((3, 1), np.float32))


# ------------------------------------------------------------------ never more lenient

FAST = settings(max_examples=int(os.environ.get("FASTNN_GATE_EXAMPLES", "60")), deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


@compiled
@pytest.mark.parametrize("kernel", DESCRIBED)
def test_fast_path_never_accepts_what_the_gate_rejects(kernel):
    op = _gate.OPS[kernel]
    seen = {"fast": 0, "python only": 0, "rejected": 0}

    @FAST
    @given(calls(kernel))
    def run(drawn):
        call, seed = drawn
        _, args = _place(call, seed)
        params = [args[n] if n in call.arrays else call.scalars[n] for n in call.order]
        try:
            getattr(_validate, kernel)(*params)
            verdict = None
        except (TypeError, ValueError, OverflowError) as exc:
            verdict = exc
        fast = op.accepts(*params)
        assert not (fast and verdict is not None), (
            f"{kernel}: the compiled checks accept what the gate rejects ({verdict}); "
            f"mutations {call.mutations}")
        seen["fast" if fast else "rejected" if verdict else "python only"] += 1

    run()
    assert seen["fast"] > 0 and seen["rejected"] > 0, seen


@compiled
def test_gemm_limit_is_read_per_call(monkeypatch):
    """The BLAS dimension limit is the Python gate's, read at each call (a test
    lowers it to reach the error)."""
    args = tuple(valid("dense_forward").values())
    op = _gate.OPS["dense_forward"]
    assert op.accepts(*args)
    monkeypatch.setattr(_validate, "_BLAS_MAX", 3)
    assert not op.accepts(*args)


# ------------------------------------------------------------------ without the compiled module

def test_python_gate_alone_when_not_built(tmp_path):
    """``fastnn.ops`` works and checks as strictly with ``_cy_gate`` missing."""
    code = """
import sys
sys.modules["fastnn.kernels._cy_gate"] = None       # as if not built
import numpy as np, fastnn as fn
from fastnn import _gate
assert _gate._cy_gate is None
z = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
out = np.empty_like(z)
fn.ops.activation_forward("relu", z, out)
assert (out == np.maximum(z, 0)).all()
try:
    fn.ops.activation_forward("relu", z, out.astype(np.float64))
except TypeError as exc:
    assert "dtype" in str(exc)
else:
    raise AssertionError("not rejected")
loss = fn.ops.softmax_cross_entropy(z, np.array([0, 2]), np.empty_like(z))
assert type(loss) is float
with fn.use_backend("numpy"):
    fn.ops.activation_forward(act="tanh", z=z, out=out)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_ops_keyword_and_default_arguments():
    x = np.ones((2, 3), np.float32)
    w = np.ones((3, 4), np.float32)
    b = np.zeros(4, np.float32)
    out = np.empty((2, 4), np.float32)
    fastnn.ops.dense_forward(x, w, b, out=out, act="relu")
    assert (out == 3).all()
    with pytest.raises(TypeError, match="unexpected keyword"):
        fastnn.ops.dense_forward(x, w, b, "relu", out, bias=None)
    with pytest.raises(TypeError, match="missing"):
        fastnn.ops.dense_forward(x, w, b, "relu")


# ------------------------------------------------------------------ C entries

def _entries(backend):
    if _gate._cy_gate is None:
        return []
    with fastnn.use_backend(backend):
        table = _gate._cy_gate.current_kernels()
    return [k for i, k in enumerate(ref.CONTRACT) if table.has_entry(i)]


CYTHON = fastnn.backends()["cython"].available


@pytest.mark.skipif(not CYTHON, reason="the cython backend is not built")
def test_cython_kernels_have_c_entries():
    from fastnn.kernels import cython_cpu

    assert set(_entries("cython")) == set(cython_cpu.ENTRIES)
    assert {"activation_forward", "activation_backward", "softmax_cross_entropy", "adam_step",
            "sgd_step", "rmsprop_step", "softmax", "mse",
            "sigmoid_binary_cross_entropy"} <= set(cython_cpu.ENTRIES)
    assert _entries("numpy") == []


@pytest.mark.skipif(not CYTHON, reason="the cython backend is not built")
@pytest.mark.parametrize("mode", ["default", "parallel"])
@pytest.mark.parametrize("kernel", ref.CONTRACT)
def test_c_entries_compute_what_the_kernels_compute(kernel, mode):
    """fastnn.ops through a C entry writes the same bytes and returns the same
    loss as the backend's kernel called with the same arguments."""
    from test_fuzz import _forced_parallel

    if kernel not in _entries("cython"):
        pytest.skip(f"no C entry for {kernel}")
    be = fastnn._backend.load("cython")
    op = _gate.OPS[kernel]
    compared = []

    @FAST
    @given(calls(kernel))
    def run(drawn):
        call, seed = drawn
        arena_a, args_a = _place(call, seed)
        arena_b, args_b = _place(call, seed)
        params_a = [args_a[n] if n in call.arrays else call.scalars[n] for n in call.order]
        params_b = [args_b[n] if n in call.arrays else call.scalars[n] for n in call.order]
        if not op.accepts(*params_a):
            return
        with np.errstate(all="ignore"):
            got = getattr(fastnn.ops, kernel)(*params_a)
            want = getattr(be, kernel)(*params_b)
        assert arena_a.tobytes() == arena_b.tobytes(), f"{kernel}: {call.mutations}"
        assert (got is None and want is None) or got == want or (got != got and want != want)
        compared.append(call)

    with fastnn.use_backend("cython"), (_forced_parallel("cython") if mode == "parallel"
                                        else contextlib.nullcontext()):
        run()
    assert compared
