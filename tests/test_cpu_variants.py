"""Per-CPU variants of the Cython extensions (setup.py, kernels/cython_cpu.py).

On x86-64 every ``_cy_*`` module is built for baseline x86-64, x86-64-v3 and
x86-64-v4. Every variant this machine can run is checked here against the
reference (the parity tolerance) and against the baseline: bit for bit,
except where the math of ``_cy_math.pxd`` (exp, tanh, log1p polynomials)
fuses its multiply-adds on a variant with FMA (v3, v4): there within the
parity tolerance (a few ulp of the math, more where a derivative cancels). The variants are otherwise the same arithmetic in wider vectors
(``-ffp-contract=off``: no fused multiply-add that the source does not write,
no reordered sums), so any other difference is a bug. Each kernel runs with every activation, both dtypes, odd
shapes, non-finite values, on the serial and on the forced parallel path.

The selection at import (the best variant the CPU runs, or
``FASTNN_CPU_VARIANT``) is checked in fresh processes.
"""

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastnn
from fastnn.kernels import reference as ref
from conftest import DTYPES, WINO4_REL, assert_close, tolerance

cy = pytest.importorskip("fastnn.kernels.cython_cpu", reason="the Cython extensions are not built")

NAMES = ("_cy_elementwise", "_cy_dense", "_cy_loss", "_cy_optim", "_cy_conv")
RUNNABLE = [v for v in cy.VARIANTS if v in cy.cpu_levels() and v in cy.built_variants()]


def _modules(variant):
    """``{name: module}`` of one variant's four extensions."""
    mods = {}
    for n in NAMES:
        if variant != "baseline":
            mods[n] = importlib.import_module(f"fastnn.kernels.{n}_{variant}")
            continue
        loaded = sys.modules.get(f"fastnn.kernels.{n}")
        if loaded is not None and loaded.__name__ == f"fastnn.kernels.{n}":
            mods[n] = loaded
        else:   # the name is registered as the chosen variant: load the baseline's file
            spec = _baseline_spec(n)
            mods[n] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mods[n])
    return mods


def _baseline_spec(n):
    """The spec of the baseline extension ``n`` even when ``fastnn.kernels.n``
    is registered as another variant."""
    import importlib.machinery

    package_dir = os.path.dirname(cy.__file__)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(package_dir, n + suffix)
        if os.path.exists(path):
            return importlib.util.spec_from_file_location(f"fastnn.kernels.{n}", path)
    # the backend imported, so its baseline extensions are installed beside it
    raise AssertionError(f"no baseline extension {n} next to {cy.__file__}")


class _Variant:
    """The contract's kernels of one variant's modules."""

    def __init__(self, mods):
        self.mods = mods
        e, d, lo, o, cv = (mods[n] for n in NAMES)
        self.activation_forward, self.activation_backward = e.activation_forward, e.activation_backward
        self.dense_forward, self.backprop_delta, self.dense_backward = (
            d.dense_forward, d.backprop_delta, d.dense_backward)
        self.softmax_cross_entropy, self.sigmoid_binary_cross_entropy, self.mse, self.softmax = (
            lo.softmax_cross_entropy, lo.sigmoid_binary_cross_entropy, lo.mse, lo.softmax)
        self.sgd_step, self.adam_step, self.rmsprop_step = o.sgd_step, o.adam_step, o.rmsprop_step
        for name in ("conv2d_forward", "conv2d_backward", "conv2d_backprop", "maxpool2d_forward",
                     "maxpool2d_backward", "dropout_forward", "dropout_backward"):
            setattr(self, name, getattr(cv, name))

    def parallel(self, on):
        """Force every loop onto its parallel path (2 threads, thresholds 1), or restore."""
        for name, mod in self.mods.items():
            if on:
                self._saved = getattr(self, "_saved", {})
                self._saved[name] = mod._set_parallel_min(*((1,) if name == "_cy_optim" else (1, 1)))
                mod.set_num_threads(2)
            else:
                old = self._saved[name]
                mod._set_parallel_min(*(old if isinstance(old, tuple) else (old,)))
                mod.set_num_threads(fastnn.get_num_threads())


def _battery(k, dtype, seed=0):
    """Every kernel of the contract once (every activation), into fresh
    outputs; returns ``{name: array or float}``."""
    rng = np.random.default_rng(seed)
    B, I, O, C = 37, 29, 67, 11

    def a(*shape, scale=1.0, special=False):
        x = (rng.standard_normal(shape) * scale).astype(dtype)
        if special:
            flat = x.reshape(-1)
            flat[rng.integers(0, flat.size, 6)] = np.array([np.nan, np.inf, -np.inf, 88.0, -104.0,
                                                             0.0], dtype)
        return x

    r = {}
    x, w, b = a(B, I), a(I, O, scale=0.3), a(O)
    z, dy = a(B, O, scale=3, special=True), a(B, O)
    # x @ w by the cython backend's own loop for a narrow w (4,100 columns of x)
    xn, wn, bn = a(9, 4100), a(4100, 10, scale=0.03), a(10)
    out = np.empty((9, 10), dtype)
    k.dense_forward(xn, wn, bn, "relu", out)
    r["dense_forward.narrow"] = out
    with np.errstate(all="ignore"):
        for act in ref.ACTIVATIONS:
            out, pre = np.empty((B, O), dtype), np.empty((B, O), dtype)
            k.dense_forward(x, w, b, act, out, pre)
            r[f"dense_forward[{act}]"], r[f"preact[{act}]"] = out, pre
            y = np.empty_like(z)
            k.activation_forward(act, z, y)
            r[f"activation_forward[{act}]"] = y
            g = np.empty_like(z)
            k.activation_backward(act, dy, z, y, g)
            r[f"activation_backward[{act}]"] = g
            delta = np.empty((B, I), dtype)
            zl = a(B, I, scale=2)
            yl = np.empty_like(zl)
            ref.activation_forward(act, zl, yl)
            k.backprop_delta(dy, w, zl, yl, act, delta)
            r[f"backprop_delta[{act}]"] = delta
        dw, db = np.empty((I, O), dtype), np.empty(O, dtype)
        k.dense_backward(x, dy, dw, db)
        r["dense_backward.dw"], r["dense_backward.db"] = dw, db
        logits, labels = a(B, C, scale=4, special=True), rng.integers(0, C, B)
        grad = np.empty_like(logits)
        r["sce.loss"] = k.softmax_cross_entropy(logits, labels, grad)
        r["sce.grad"] = grad
        t = (rng.random((B, C)) > 0.5).astype(dtype)
        grad = np.empty_like(logits)
        r["bce.loss"] = k.sigmoid_binary_cross_entropy(logits, t, grad)
        r["bce.grad"] = grad
        grad = np.empty_like(z)
        r["mse.loss"] = k.mse(z, dy, grad)
        r["mse.grad"] = grad
        sm = np.empty_like(logits)
        k.softmax(logits, sm)
        r["softmax"] = sm
        n = 1001
        g0, p0 = a(n), a(n)
        p, buf = p0.copy(), np.zeros(n, dtype)
        for _ in range(3):
            k.sgd_step(p, g0, buf, 0.01, 0.9, True, 1e-4, 1e-5)
        r["sgd.p"] = p
        p, m, v, vmax = p0.copy(), np.zeros(n, dtype), np.zeros(n, dtype), np.zeros(n, dtype)
        for t_ in range(1, 4):
            k.adam_step(p, g0, m, v, t_, 1e-3, 0.9, 0.999, 1e-8, 1e-2, True, 1e-5, vmax)
        r["adam.p"], r["adam.v"] = p, v
        p, sq, cm, buf = p0.copy(), np.zeros(n, dtype), np.zeros(n, dtype), np.zeros(n, dtype)
        for _ in range(3):
            k.rmsprop_step(p, g0, sq, buf, 1e-2, 0.99, 1e-8, 0.9, cm, 1e-4, 1e-5)
        r["rmsprop.p"] = p
        _conv_battery(k, a, dtype, r)
    return r


def _conv_battery(k, a, dtype, r):
    """The convolution, pooling and dropout kernels: the register-blocked path
    (K = 9), the GEMM path with padding and strides, Winograd F(2x2, 3x3) (a
    6x5 output) and F(4x4, 3x3) (9x8), overlapping pools."""
    for tag, (n, h, w, c, o, kh, kw, stride, pads) in (
            ("direct", (3, 12, 11, 1, 20, 3, 3, (1, 1), (0, 0, 0, 0))),
            ("gemm", (2, 9, 10, 6, 11, 3, 2, (2, 1), (1, 1, 0, 1))),
            ("winograd", (2, 6, 5, 16, 17, 3, 3, (1, 1), (1, 1, 1, 1))),
            ("winograd4", (2, 9, 8, 16, 17, 3, 3, (1, 1), (1, 1, 1, 1)))):
        p = (h + pads[0] + pads[1] - kh) // stride[0] + 1
        q = (w + pads[2] + pads[3] - kw) // stride[1] + 1
        x, wk, b = a(n, h, w, c), a(kh, kw, c, o, scale=0.3), a(o)
        for act in ref.ACTIVATIONS:
            out, pre = np.empty((n, p, q, o), dtype), np.empty((n, p, q, o), dtype)
            k.conv2d_forward(x, wk, b, act, out, pre, stride, pads)
            r[f"conv2d_forward.{tag}[{act}]"], r[f"conv2d_forward.{tag}.z[{act}]"] = out, pre
            zb = a(n, h, w, c, scale=2)
            yb = np.empty_like(zb)
            ref.activation_forward(act, zb, yb)
            dx = np.empty_like(x)
            k.conv2d_backprop(a(n, p, q, o), wk, zb, yb, act, dx, stride, pads)
            r[f"conv2d_backprop.{tag}[{act}]"] = dx
        dw, db = np.empty_like(wk), np.empty_like(b)
        k.conv2d_backward(x, a(n, p, q, o), dw, db, stride, pads)
        r[f"conv2d_backward.{tag}.dw"], r[f"conv2d_backward.{tag}.db"] = dw, db
    x = a(3, 9, 8, 37, special=True)      # 37 channels: two vectors of 16 and a tail
    for pool, stride in (((2, 2), None), ((3, 2), (2, 1))):
        p, q = (9 - pool[0]) // (stride or pool)[0] + 1, (8 - pool[1]) // (stride or pool)[1] + 1
        out, am = np.empty((3, p, q, 37), dtype), np.empty((3, p, q, 37), np.int32)
        k.maxpool2d_forward(x, out, am, pool, stride)
        r[f"maxpool2d_forward{pool}"], r[f"maxpool2d_forward.argmax{pool}"] = out, am
        for act in ("relu", "tanh", "leaky_relu"):
            zb = a(3, 9, 8, 37, scale=2)
            yb = np.empty_like(zb)
            ref.activation_forward(act, zb, yb)
            g = np.empty_like(x)
            k.maxpool2d_backward(a(3, p, q, 37), am, zb, yb, act, g, pool, stride)
            r[f"maxpool2d_backward{pool}[{act}]"] = g
    d = np.empty_like(x)
    k.dropout_forward(x, 0.4, 2**64 - 3, d)
    r["dropout_forward"] = d
    d2 = x.copy()
    k.dropout_backward(d2, 0.4, 2**64 - 3, d2)
    r["dropout_backward"] = d2


TRANSCENDENTAL = ("sigmoid", "tanh", "gelu", "silu", "softplus")


def _uses_fused_math(key):
    """Outputs computed through the exp/tanh/log1p polynomials."""
    return key.startswith(("sce.", "bce.", "softmax")) or any(f"[{a}]" in key
                                                             for a in TRANSCENDENTAL)


def _same_bits(a, b):
    if isinstance(a, float):
        return a == b or (np.isnan(a) and np.isnan(b))
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


@pytest.mark.skipif(not RUNNABLE, reason="no variant runnable here")
@pytest.mark.parametrize("path", ["serial", "parallel"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("variant", RUNNABLE)
def test_variant_equals_baseline_bit_for_bit_and_the_reference(variant, dtype, path):
    base, var = _Variant(_modules("baseline")), _Variant(_modules(variant))
    if path == "parallel":
        base.parallel(True)
        var.parallel(True)
    try:
        got, expected = _battery(var, dtype), _battery(base, dtype)
    finally:
        if path == "parallel":
            # in the reverse order: the baseline's modules are loaded twice from one
            # file, so both share its C globals (the thresholds) and the second
            # saved what the first had set
            var.parallel(False)
            base.parallel(False)
    fused = variant != "baseline"            # v3 and v4 have FMA
    differ = [key for key in expected if not (fused and _uses_fused_math(key))
              and not _same_bits(got[key], expected[key])]
    assert not differ, f"{variant} differs from the baseline in {differ}"
    for key in expected:
        if fused and _uses_fused_math(key) and not isinstance(expected[key], float):
            np.testing.assert_array_equal(np.isnan(got[key]), np.isnan(expected[key]), key)
            assert_close(got[key], expected[key], dtype, err_msg=f"{variant} vs baseline: {key}")
    reference = _battery(ref, dtype)
    for key, value in reference.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-4, nan_ok=True), key
        elif ".winograd4" in key:
            rtol, atol = tolerance(dtype, 67)
            atol = max(atol, WINO4_REL[np.dtype(dtype)] * _wino4_scale(key, reference))
            np.testing.assert_allclose(got[key], value, rtol=rtol, atol=atol,
                                       err_msg=f"{variant}: {key}")
        else:
            assert_close(got[key], value, dtype, reduction=67, err_msg=f"{variant}: {key}")


def _wino4_scale(key, reference):
    """The largest value of the convolution's own output behind ``key`` (before
    the activation or its derivative): F(4x4, 3x3)'s rounding follows it."""
    if key.startswith("conv2d_forward."):
        return float(np.abs(reference[key.replace(".winograd4[", ".winograd4.z[")]).max())
    if key.startswith("conv2d_backprop."):
        return float(np.abs(reference["conv2d_backprop.winograd4[identity]"]).max())
    return float(np.abs(reference[key]).max())


def _probe(env_variant, code="", **env):
    script = textwrap.dedent("""
        import json, fastnn
        info = fastnn.backends()["cython"]
        out = {"available": info.available, "reason": info.reason}
        if info.available:
            from fastnn.kernels import cython_cpu as c, _cy_dense
            out.update(variant=c.CPU_VARIANT, info=c.info(), alias=_cy_dense.__name__,
                       ops=fastnn.ops.dense_forward.__module__)
        print("RESULT" + json.dumps(out))
    """) + code
    environ = dict(os.environ, **env)
    environ.pop("FASTNN_CPU_VARIANT", None)
    if env_variant is not None:
        environ["FASTNN_CPU_VARIANT"] = env_variant
    proc = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1][6:])


def test_default_is_the_best_variant_this_cpu_runs():
    got = _probe(None)
    assert got["available"], got["reason"]
    assert got["variant"] == RUNNABLE[-1]
    suffix = "" if RUNNABLE[-1] == "baseline" else f"_{RUNNABLE[-1]}"
    assert got["alias"] == f"fastnn.kernels._cy_dense{suffix}"
    assert got["info"]["cpu_variant"].startswith({"baseline": "x86-64 baseline", "v3": "x86-64-v3",
                                                  "v4": "x86-64-v4"}[RUNNABLE[-1]]) \
        or "baseline" in got["info"]["cpu_variant"]


@pytest.mark.parametrize("variant", RUNNABLE)
def test_environment_variable_forces_a_variant(variant):
    got = _probe(variant)
    assert got["available"], got["reason"]
    assert got["variant"] == variant
    assert "forced by FASTNN_CPU_VARIANT" in got["info"]["cpu_variant"]
    assert got["info"]["extensions"].split(", ")[0].endswith(
        "_cy_elementwise" + ("" if variant == "baseline" else f"_{variant}"))


def test_unknown_variant_makes_the_backend_unavailable_with_the_reason():
    got = _probe("v9")
    assert not got["available"]
    assert "FASTNN_CPU_VARIANT" in got["reason"] and "baseline, v3, v4" in got["reason"]


def test_a_variant_the_cpu_cannot_run_is_refused(monkeypatch):
    monkeypatch.setattr(cy, "cpu_levels", lambda: ("baseline",))
    monkeypatch.setenv("FASTNN_CPU_VARIANT", "v4")
    with pytest.raises(ImportError, match="this CPU cannot run it"):
        cy._choose()
    monkeypatch.delenv("FASTNN_CPU_VARIANT")
    assert cy._choose() == ("baseline", False)


def test_cpu_levels_from_cpuinfo_flags(monkeypatch):
    v3 = set(cy._LINUX_FLAGS["v3"])
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    for flags, expected in ((set(), ("baseline",)), (v3 - {"fma"}, ("baseline",)),
                            (v3, ("baseline", "v3")),
                            (v3 | set(cy._LINUX_FLAGS["v4"]), ("baseline", "v3", "v4")),
                            (set(cy._LINUX_FLAGS["v4"]), ("baseline",))):
        monkeypatch.setattr(cy, "_cpuinfo_flags", lambda flags=flags: flags)
        assert cy.cpu_levels() == expected, flags
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert cy.cpu_levels() == ("baseline",)
