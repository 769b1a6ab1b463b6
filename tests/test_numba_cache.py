"""numba's disk cache shared by processes (issue 13, item 1).

Processes that share one ``NUMBA_CACHE_DIR`` each compile some kernels and
cache them; a later process loads several of them from the cache. numba names
a compiled function's symbol after its module, qualified name, argument types
and a per-process counter: two different loop bodies with the same qualified
name (closures made by one factory) compiled in two fresh processes got the
same symbol, and a process that loaded both ran whichever was loaded first
(leaky_relu ran relu's loop, AdamW ran Adam's). So every specialised loop and
parallel driver has a name of its own, and the loop numba compiles for each
prange (named after an object's address) takes the body as an argument, so
its symbol names it too (``kernels/numba_cpu/_runtime.py``).

The test does what found it: one fresh cache folder; one process per case,
one after the other (concurrent writers of one index file would drop each
other's entries), each running its kernels on the parallel path; then one
process that loads every case from the cache and compares each with the
reference.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("numba")

from fastnn.kernels import reference as ref  # noqa: E402

#: Runs the cases named in argv[1:] on the parallel path (float32) and prints
#: ``{case: [[what, normwise relative difference from the reference], ...]}``.
WORKER = textwrap.dedent(r"""
    import json, sys, zlib
    import numpy as np
    import fastnn
    from fastnn.kernels import numba_cpu as nb, reference as ref

    F = np.float32
    MIN = nb.PARALLEL_MIN
    N = max(MIN.values())             # the smallest size on the parallel path
    assert nb.info()["numba_threads"] > 1

    def rel(a, b):                    # normwise: max |a - b| / max |b|
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))

    def both(kernel, arrays, scalars, outputs):
        mine = {k: v.copy() for k, v in arrays.items()}
        theirs = {k: v.copy() for k, v in arrays.items()}
        r1 = getattr(nb, kernel)(**mine, **scalars)
        r0 = getattr(ref, kernel)(**theirs, **scalars)
        out = [[f"{kernel}.{k}", rel(mine[k], theirs[k])] for k in outputs]
        if r0 is not None:
            out.append([f"{kernel}.loss", rel(r1, r0)])
        return out

    def act(name, rng):
        z = (rng.standard_normal(N) * 3).astype(F)
        y = np.empty_like(z)
        ref.activation_forward(name, z, y)
        dy = rng.standard_normal(N).astype(F)
        return (both("activation_forward", dict(z=z, out=np.empty_like(z)), dict(act=name),
                     ["out"])
                + both("activation_backward", dict(dy=dy, z=z, y=y, out=np.empty_like(z)),
                       dict(act=name), ["out"]))

    def dense(name, rng):
        cols = 16
        rows = max(MIN.values()) // cols
        x = rng.standard_normal((rows, 4)).astype(F)
        w = rng.standard_normal((4, cols)).astype(F)
        b = rng.standard_normal(cols).astype(F)
        z = x @ w + b
        y = np.empty_like(z)
        ref.activation_forward(name, z, y)
        dy = rng.standard_normal((rows, cols)).astype(F)
        w2 = rng.standard_normal((cols, cols)).astype(F)
        return (both("dense_forward", dict(x=x, w=w, b=b, out=np.empty_like(z),
                                           preact=np.empty_like(z)), dict(act=name),
                     ["out", "preact"])
                + both("dense_forward", dict(x=x, w=w, b=b, out=np.empty_like(z)),
                       dict(act=name, preact=None), ["out"])
                + both("backprop_delta", dict(dy=dy, w=w2, z=z, y=y, out=np.empty_like(z)),
                       dict(act=name), ["out"]))

    def optimizer(kind, variant, rng):
        p, g = (rng.standard_normal(N).astype(F) for _ in range(2))
        state = lambda: np.abs(rng.standard_normal(N)).astype(F)
        if kind == "sgd":
            momentum = 0.0 if variant == "plain" else 0.9
            return both("sgd_step", dict(p=p, g=g, buf=state()),
                        dict(lr=0.1, momentum=momentum, nesterov=variant == "nesterov",
                             weight_decay=0.0, l1=0.0), ["p", "buf"])
        if kind == "adam":
            arrays = dict(p=p, g=g, m=state(), v=state())
            if variant == "amsgrad":
                arrays["vmax"] = state()
            return both("adam_step", arrays,
                        dict(step=3, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                             weight_decay=0.1 if variant == "adamw" else 0.0,
                             decoupled=variant == "adamw", l1=0.0,
                             **({} if variant == "amsgrad" else {"vmax": None})),
                        list(arrays)[:1] + list(arrays)[2:])
        arrays = dict(p=p, g=g, sq=state() + 1, buf=state())
        if variant == "centered":
            arrays["centered_mean"] = rng.standard_normal(N).astype(F) * 0.1
        return both("rmsprop_step", arrays,
                    dict(lr=1e-2, rho=0.99, eps=1e-8,
                         momentum=0.9 if variant == "momentum" else 0.0,
                         weight_decay=0.0, l1=0.0,
                         **({} if variant == "centered" else {"centered_mean": None})),
                    [k for k in arrays if k != "g"])

    def loss(name, rng):
        classes = 16
        rows = max(MIN.values()) // classes
        z = (rng.standard_normal((rows, classes)) * 3).astype(F)
        if name == "softmax":
            return both("softmax", dict(z=z, out=np.empty_like(z)), {}, ["out"])
        if name == "dense_backward":
            x = rng.standard_normal((64, 4)).astype(F)
            dz = rng.standard_normal((64, max(MIN.values()) // 64)).astype(F)
            return both("dense_backward", dict(x=x, dz=dz, dw=np.empty((4, dz.shape[1]), F),
                                               db=np.empty(dz.shape[1], F)), {}, ["dw", "db"])
        if name == "softmax_cross_entropy":
            labels = rng.integers(0, classes, rows)
            return both(name, dict(logits=z, labels=labels, grad=np.empty_like(z)), {},
                        ["grad"])
        t = rng.uniform(0, 1, z.shape).astype(F)
        if name == "mse":
            return both(name, dict(pred=z, target=t, grad=np.empty_like(z)), {}, ["grad"])
        return both(name, dict(logits=z, targets=t, grad=np.empty_like(z)), {}, ["grad"])

    def conv(name, rng):
        # conv1's direct loop (9 taps), conv2's delta (col2im with the
        # derivative) and the pooling's backward pass: specialised on the
        # activation, each on its parallel path at these sizes
        x = rng.standard_normal((8, 28, 28, 1)).astype(F)
        w1 = rng.standard_normal((3, 3, 1, 32)).astype(F)
        b1 = rng.standard_normal(32).astype(F)
        dz = rng.standard_normal((64, 11, 11, 64)).astype(F)
        w2 = rng.standard_normal((3, 3, 32, 64)).astype(F)
        z = rng.standard_normal((64, 13, 13, 32)).astype(F)
        y = np.empty_like(z)
        ref.activation_forward(name, z, y)
        a = rng.standard_normal((64, 26, 26, 32)).astype(F)
        ay = np.empty_like(a)
        ref.activation_forward(name, a, ay)
        pooled = np.empty((64, 13, 13, 32), F)
        argmax = np.empty(pooled.shape, np.int32)
        ref.maxpool2d_forward(ay, pooled, argmax)
        dp = rng.standard_normal(pooled.shape).astype(F)
        return (both("conv2d_forward", dict(x=x, w=w1, b=b1, out=np.empty((8, 26, 26, 32), F)),
                     dict(act=name), ["out"])
                + both("conv2d_backprop", dict(dz=dz, w=w2, z=z, y=y, out=np.empty_like(z)),
                       dict(act=name), ["out"])
                + both("maxpool2d_backward", dict(dy=dp, argmax=argmax, z=a, y=ay,
                                                  out=np.empty_like(a)),
                       dict(act=name), ["out"]))

    report = {}
    for case in sys.argv[1:]:
        family, name = case.split(":")
        rng = np.random.default_rng(zlib.crc32(case.encode()))
        if family == "act":
            report[case] = act(name, rng)
        elif family == "dense":
            report[case] = dense(name, rng)
        elif family == "loss":
            report[case] = loss(name, rng)
        elif family == "conv":
            report[case] = conv(name, rng)
        else:
            report[case] = optimizer(family, name, rng)
    print("REPORT" + json.dumps(report))
""")

KERNEL_ACTIVATIONS = [a for a in ref.ACTIVATIONS if a != "identity"]   # identity: a copy
OPTIMIZERS = ["sgd:plain", "sgd:momentum", "sgd:nesterov", "adam:adam", "adam:adamw",
              "adam:amsgrad", "rmsprop:plain", "rmsprop:centered", "rmsprop:momentum"]
LOSSES = ["loss:softmax_cross_entropy", "loss:sigmoid_binary_cross_entropy", "loss:mse",
          "loss:softmax", "loss:dense_backward"]
#: the convolution and pooling loops specialised on the activation
CONVS = ["conv:relu", "conv:leaky_relu"]


#: Run before WORKER. numba names the function it compiles for each prange
#: loop ``__numba_parfor_gufunc_<hash(parfor)>`` (an object's address) plus a
#: per-process counter and the argument types. Two processes put that object at
#: one address now and then (more often with address-space randomisation off);
#: with these names pinned to one value they always do, so a loop whose symbol
#: does not say what it computes shows every time instead of once in many CI
#: runs. Counts the loops it named: the compiling processes must have compiled
#: some (else the pin did not take, numba changed), the loading process none
#: (else it did not load them from the cache).
PIN = textwrap.dedent(r"""
    import numba.parfors.parfor_lowering as _lowering
    _pinned = []
    def _pinned_hash(obj):
        _pinned.append(obj)
        return 0
    _lowering.hash = _pinned_hash
""")
PINNED = '\nprint("PINNED", len(_pinned))\n'


def _run(cases, cache):
    """Runs WORKER, its prange names pinned (PIN): (report, loops compiled)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    env.pop("FASTNN_NUM_THREADS", None)
    proc = subprocess.run([sys.executable, "-c", PIN + WORKER + PINNED, *cases], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    report = [ln for ln in lines if ln.startswith("REPORT")][-1]
    pinned = [ln for ln in lines if ln.startswith("PINNED")][-1]
    return json.loads(report[len("REPORT"):]), int(pinned.split()[1])


def _shared_cache(cases, tmp_path):
    """Each case compiled and cached in a process of its own, one after the
    other, then all of them loaded from the cache in one process (so every
    pair of cases meets there): the differences from the reference that are
    too large, by case."""
    cache = tmp_path / "numba-cache"
    for case in cases:
        _, compiled = _run([case], cache)
        assert compiled > 0, f"{case}: no prange loop compiled (did the pin take?)"
    assert any(f.endswith(".nbi") for _, _, files in os.walk(cache) for f in files)
    report, compiled = _run(cases, cache)
    assert compiled == 0, f"{compiled} prange loops compiled again instead of loaded"
    # float32: the optimizers equal the reference, the rest differ by rounding
    # (1e-7); the wrong variant differs by 1e-3 (AdamW's decay) or more
    return {case: [(what, diff) for what, diff in results if diff > 1e-4]
            for case, results in report.items() if any(diff > 1e-4 for _, diff in results)}


def _parallel_path():
    from fastnn.kernels import numba_cpu as nb

    if nb.info()["numba_threads"] < 2:
        pytest.skip("one core: no parallel path")


def test_shared_cache_relu_leaky_relu_adam_adamw(tmp_path):
    """The issue's two reproductions: relu and leaky_relu, Adam and AdamW."""
    _parallel_path()
    wrong = _shared_cache(["act:relu", "act:leaky_relu", "adam:adam", "adam:adamw"], tmp_path)
    assert not wrong, wrong


@pytest.mark.slow
def test_shared_cache_every_specialised_kernel(tmp_path):
    """Every activation (elementwise forward and backward, the dense epilogues
    and backprop_delta), every optimizer variant, the losses, softmax and
    dense_backward, and the convolution and pooling loops of two activations:
    each cached by its own process, all loaded by one.

    Before the named loop bodies 9 of these 28 cases were wrong, among them
    tanh', leaky_relu, SGD with momentum, AdamW, centered RMSprop; before the
    body became an argument of the prange loop (its type named in the loop's
    symbol) one CI run in several found leaky_relu' computing relu', and with
    the loops' names pinned (PIN) every run did. 4 min on 2 loaded cores."""
    _parallel_path()
    cases = ([f"act:{a}" for a in KERNEL_ACTIVATIONS] + [f"dense:{a}" for a in KERNEL_ACTIVATIONS]
             + OPTIMIZERS + LOSSES + CONVS)
    wrong = _shared_cache(cases, tmp_path)
    assert not wrong, wrong


STALE = textwrap.dedent(r"""
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from kcopy import numba_cpu as nb
    assert nb.__file__.startswith(sys.argv[1]), nb.__file__
    z = np.array([-1.0, 2.0], np.float32)
    out = np.empty_like(z)
    nb.activation_forward("leaky_relu", z, out)
    print("OUT", float(out[0]), float(out[1]))
""")


def test_a_change_in_any_file_of_the_package_recompiles(tmp_path):
    """numba checks a cached function against its own source file only; the
    kernels call helpers from the package's other files (``_math.py``), so
    those count too: a copy of the package compiles and caches leaky_relu,
    its slope is then changed in ``_math.py``, and the next process computes
    with the new slope."""
    import shutil as sh

    import fastnn.kernels as k

    root = tmp_path / "root"
    pkg = root / "kcopy"
    sh.copytree(os.path.join(os.path.dirname(k.__file__), "numba_cpu"), pkg / "numba_cpu",
                ignore=sh.ignore_patterns("__pycache__"))
    sh.copy(os.path.join(os.path.dirname(k.__file__), "reference.py"), pkg / "reference.py")
    (pkg / "__init__.py").write_text("")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))

    def run():
        proc = subprocess.run([sys.executable, "-c", STALE, str(root)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return [float(v) for v in proc.stdout.split("OUT")[-1].split()]

    assert run() == pytest.approx([-0.01, 2.0])
    math_py = pkg / "numba_cpu" / "_math.py"
    source = math_py.read_text()
    assert "\nLEAKY_SLOPE = 0.01\n" in source
    math_py.write_text(source.replace("\nLEAKY_SLOPE = 0.01\n", "\nLEAKY_SLOPE = 0.5\n"))
    assert run() == pytest.approx([-0.5, 2.0])


SERIAL = textwrap.dedent(r"""
    import numpy as np
    from fastnn.kernels import numba_cpu as nb, reference as ref
    rng = np.random.default_rng(3)
    x = rng.standard_normal((9, 5)).astype(np.float32)
    w = rng.standard_normal((5, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    got, want = np.empty((9, 4), np.float32), np.empty((9, 4), np.float32)
    nb.dense_forward(x, w, b, "gelu", got)
    ref.dense_forward(x, w, b, "gelu", want)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    labels = rng.integers(0, 4, 9)
    g1, g2 = np.empty_like(got), np.empty_like(got)
    assert abs(nb.softmax_cross_entropy(want, labels, g1)
               - ref.softmax_cross_entropy(want, labels, g2)) < 1e-6
    p, g = rng.standard_normal(50).astype(np.float32), rng.standard_normal(50).astype(np.float32)
    s = [p.copy(), np.zeros(50, np.float32), np.zeros(50, np.float32)]
    t = [p.copy(), np.zeros(50, np.float32), np.zeros(50, np.float32)]
    nb.adam_step(*s[:1], g, *s[1:], 1, 1e-3, 0.9, 0.999, 1e-8, 0.1, True, 0.0, None)
    ref.adam_step(*t[:1], g, *t[1:], 1, 1e-3, 0.9, 0.999, 1e-8, 0.1, True, 0.0, None)
    np.testing.assert_array_equal(s[0], t[0])
    print("ok")
""")


def test_a_second_process_loads_the_serial_kernels_from_the_cache(tmp_path):
    """Small arrays (the serial entry points): a second process sharing the
    cache loads what the first compiled, adds nothing to it, and computes what
    the reference computes (a cached entry's environment failed to load once:
    dense_forward raised in every process after the first)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))

    def run():
        proc = subprocess.run([sys.executable, "-c", SERIAL], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.split() == ["ok"]
        return sorted(f for _, _, files in os.walk(tmp_path / "cache") for f in files)

    first = run()
    assert any(f.endswith(".nbc") for f in first)
    assert run() == first, "the second process compiled again"
