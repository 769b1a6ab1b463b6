"""Every speed goal of fastnn in one script: what this machine measures, the
target, and PASS or FAIL, with the figures behind each ratio. One section per
area; it reports and never fails (exit code 0).

    python benchmarks/goals.py                       # every section below but thresholds
    python benchmarks/goals.py --quick               # fewer repeats and sizes
    python benchmarks/goals.py --section conv        # one section, or a list: conv,training
    python benchmarks/goals.py --section data --big-memmap   # the 2 GB memmap (writes 2 GB
                                                             # under a temporary folder)
    python benchmarks/goals.py --threads 1 --stat min        # a machine shared with others
    python benchmarks/goals.py --smoke               # tiny sizes: checks that it runs;
                                                     # the figures mean nothing

Sections (the issue that set each goal in brackets):

kernels
    Dense kernels against their GEMM alone, through the backend's own BLAS
    (``<= 1.05x``: the cython backend's is ``_cy_dense._gemm``, numba's
    NumPy's ``np.matmul``) [4, 5]; the transcendental and the cheap
    activations, softmax cross-entropy and the optimizers against the NumPy
    reference [4, 5]; Adam against the memory-bandwidth floor, a streaming
    loop with its 4 reads and 3 writes [4, 5]; GEMM, a parallel kernel, GEMM
    in a loop against the parts alone (the thread pools' fight) [4, 5].
conv
    ``conv2d_forward`` (relu) at (128, 13, 13, 32) -> 64 filters 3x3 against
    its GEMM alone (the same M, N, K through the same BLAS, on im2col columns
    that exist already) ``<= 1.15x``; ``conv2d_backward`` and
    ``conv2d_backprop`` against theirs ``<= 1.25x`` [16]. The first
    convolution (one channel, K = 9), pooling and dropout against the NumPy
    reference are reported (no target).
training
    The 784-256-128-10 MLP at batch 32 and 128 against plain NumPy and PyTorch
    [6]; Keras' convnet and seed 003's network at batch 32 and 128: the
    default backend at least 2x PyTorch (both) and 4x the NumPy reference
    (Keras' convnet) [16]; ``fit`` at least 95 % of the bare kernel step on the
    same backend (every network) [14]. PyTorch runs in its own process
    (``Adam(fused=True)``, NCHW for the convnets, the same threads).
data
    A whole shuffled epoch on 100,000 samples at batch 128 and 32: wall-clock
    samples/s at least 95 % of the step-only rate of the same run; the peak
    memory ``fit`` adds over the caller's arrays and the model's own buffers
    under 16 MB for 100,000 and 1,000,000 samples (``tracemalloc``, and the
    resident peak in a fresh process); a float32 memmap trains one epoch with
    the resident size under half the file's size over the interpreter's start
    (the issue's 1 GB for 2 GB) and with ``shuffle="batch"`` at least 80 % of
    the in-memory rate [17]. The default file is 512 MB and is read cold (out
    of the page cache); ``--big-memmap`` uses the issue's 2 GB.
startup
    numba: ``import fastnn`` and the first call of a training step's kernels
    with a warm cache under 3 s (cold reported) [4]; cython: ``import fastnn``
    and a first ``dense_forward`` under 0.5 s [5]. Fresh processes.
gpu
    On a real GPU: Adam's share of the memory bandwidth and ``dense_forward``
    over cuBLAS [8]. Without one it says so; ``benchmarks/cuda_bench.py``
    measures the cuda backend in full (its conv kernels and a convnet epoch
    against PyTorch CUDA too).
thresholds
    Not a goal and not run by default: serial against parallel time by size
    for the cython and numba elementwise and optimizer loops, the measurement
    behind their ``PAR_MIN*`` constants.

Method: every ratio is of two timings taken in this run, interleaved round
robin (a noisy neighbour slows both), each the median of the repeats
(``--stat min``: the minimum, steadier on a shared machine), after an untimed
warm-up call; float32 unless said; ``fastnn.get_num_threads()`` threads
(``--threads``). Rows marked INFO are reported for comparison and not
counted: the other backend of a goal that names one, or a figure with no
target.

Other benchmarks in this folder: ``python -m fastnn bench`` (every kernel,
the per-call overhead, the training tables, data at scale and start-up as a
report and a chart), the pytest-benchmark suites ``bench_*.py`` (``pytest
benchmarks --benchmark-only``), ``cuda_bench.py`` (GPU), ``distributed_bench.py``
(MPI ranks against one process), ``conv_bench.py`` (the cython conv kernels in
detail), ``train_throughput.py --profile`` (where an MLP step's time goes),
``gather_rows.py`` and ``cpu_variants.py``.
"""

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import fastnn  # noqa: E402
from fastnn import _bench  # noqa: E402

F32 = "float32"
OWNER = {"numba": "4", "cython": "5"}


# ======================================================================= sizes

@dataclass
class Sizes:
    """What a run measures; FULL, QUICK and SMOKE below."""

    name: str
    repeats: int
    min_time: float
    dense: tuple            # ((batch, in, out), backends whose goal it is)
    opt_n: int
    elementwise: tuple      # (rows, cols)
    elementwise_dtypes: tuple
    softmax: tuple
    conv_batch: int
    train_n: int            # MLP samples per epoch
    conv_n: int             # convnet samples per epoch
    batches: tuple
    data_n: int             # issue 17's 100,000
    data_epochs: int
    memory_n: tuple         # issue 17's 100,000 and 1,000,000
    memmap_mb: int
    memmap_random: bool     # also a memmap epoch with shuffle=True (random reads)
    fight: bool             # the thread pools' fight (fresh processes)
    startup_cold: bool
    threshold_max: int


BOTH = ("cython", "numba")
FULL = Sizes("full", 9, 0.05,
             (((128, 784, 256), BOTH), ((1024, 1024, 1024), BOTH), ((32, 784, 256), ("cython",))),
             10_000_000, (1024, 1024), ("float32", "float64"),
             ((128, 10), (128, 100), (128, 1000), (1024, 10), (1024, 100), (1024, 1000)),
             128, 8192, 4096, (32, 128), 100_000, 4, (100_000, 1_000_000), 512, True, True,
             True, 22)
QUICK = Sizes("quick", 5, 0.02,
              (((128, 784, 256), BOTH), ((32, 784, 256), ("cython",))),
              10_000_000, (1024, 1024), ("float32",), ((128, 10), (1024, 1000)),
              128, 2048, 512, (32, 128), 100_000, 3, (100_000,), 512, False, True, False, 20)
SMOKE = Sizes("smoke", 3, 0.0,
              (((8, 16, 8), BOTH),), 4096, (16, 16), ("float32",), ((8, 10),),
              4, 128, 64, (32,), 1024, 2, (1024,), 2, False, False, False, 12)


# ======================================================================= goals

class Goal:
    """One measured figure: ``value`` against ``target`` (``op`` ``">="`` or
    ``"<="``; None: no target). ``counted`` False: reported, not a goal here."""

    def __init__(self, section, issue, what, backend, value, op=None, target=None, unit="x",
                 figures="", counted=True):
        self.section, self.issue, self.what, self.backend = section, issue, what, backend
        self.value, self.op, self.target, self.unit = value, op, target, unit
        self.figures, self.counted = figures, counted and op is not None

    @property
    def verdict(self):
        if self.value is None:
            return "N/A"
        if not self.counted:
            return "INFO"
        ok = self.value >= self.target if self.op == ">=" else self.value <= self.target
        return "PASS" if ok else "FAIL"

    def _fmt(self, v):
        if self.unit == "x":
            return f"{v:.2f}x" if v >= 0.1 else f"{v:.2g}x"
        if self.unit == "%":
            return f"{v:.1f}%"
        if self.unit == "MB":
            return f"{v:,.1f} MB"
        return f"{v:.2f} {self.unit}"

    @property
    def measured(self):
        return "-" if self.value is None else self._fmt(self.value)

    @property
    def goal(self):
        return "" if self.op is None else f"{self.op} {self._fmt(self.target)}"

    def line(self):
        target = f" (target {self.goal})" if self.op else ""
        issue = f"#{self.issue}" if self.issue else ""
        return (f"{self.verdict:4s}  {issue:4s} {self.what} [{self.backend}]: "
                f"{self.measured}{target}" + (f"; {self.figures}" if self.figures else ""))


class Run:
    """The options of one run, and the goals measured so far."""

    def __init__(self, sizes, backends, stat, args):
        self.sizes, self.backends, self.stat, self.args = sizes, backends, stat, args
        self.goals = []
        self.notes = []

    @property
    def cpu(self):
        return [b for b in BOTH if b in self.backends]

    def add(self, goal):
        self.goals.append(goal)
        print("  " + goal.line(), flush=True)
        return goal

    def note(self, text):
        self.notes.append(text)
        print(f"  note: {text}", flush=True)

    def timed(self, fns, max_time=3.0):
        """Seconds per call of each callable: round robin over the callables,
        each sample at least ``min_time`` long, the median of the samples (or
        the minimum with ``--stat min``), after one untimed call each."""
        return timed(fns, self.sizes.repeats, self.sizes.min_time, max_time, self.stat)


def timed(fns, repeats=7, min_time=0.02, max_time=3.0, stat="median"):
    """``{name: seconds per call}``: ``fastnn._bench.measure`` for the median;
    the same sampling, keeping the minimum, for ``stat="min"``."""
    if stat == "median":
        return _bench.measure(fns, repeats=repeats, min_time=min_time, max_time=max_time)
    loops, best = {}, {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        t = max(time.perf_counter() - t0, 1e-7)
        loops[name] = max(1, int(min_time / t))
        best[name] = math.inf
    for _ in range(repeats):
        for name, fn in fns.items():
            n = loops[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / n)
    return best


def ms(seconds):
    return _bench.fmt_time(seconds)


def backend_gemm(backend):
    """``(gemm(a, b, c, trans_a, trans_b), label)``: the BLAS GEMM the backend's
    kernels call, bare."""
    if backend == "cython":
        from fastnn.kernels import cython_cpu

        return cython_cpu._cy_dense._gemm, "the cython backend's BLAS (_cy_dense._gemm)"
    return _bench.np_gemm, "NumPy's BLAS (np.matmul)"


def speedups(run, case, backends, extra=None):
    """Times of ``case`` on the NumPy reference and ``backends`` (those that
    run it natively), interleaved with ``extra`` callables."""
    fns = {"numpy": _bench.bind(case, "numpy")}
    for b in backends:
        if not _bench.runs_reference(case, b):
            fns[b] = _bench.bind(case, b)
    fns.update(extra or {})
    return run.timed(fns)


# ======================================================================= kernels

def section_kernels(run):
    """Issues 4 (numba) and 5 (cython)."""
    sz = run.sizes
    cpu = run.cpu
    if not cpu:
        run.note("no CPU backend besides numpy: nothing to measure")
        return
    # dense layer against its GEMM alone, the backend's BLAS
    for dims, owners in sz.dense:
        for b in cpu:
            gemm, label = backend_gemm(b)
            rng = np.random.default_rng(1)
            bsz, din, dout = dims
            x, w = rng.standard_normal((bsz, din), np.float32), rng.standard_normal(
                (din, dout), np.float32)
            dy = rng.standard_normal((bsz, dout), np.float32)
            c1, c2 = np.empty((bsz, dout), np.float32), np.empty((bsz, din), np.float32)
            c3, db = np.empty((din, dout), np.float32), np.empty(dout, np.float32)
            fns = {}
            for kernel in ("dense_forward", "backprop_delta", "dense_backward"):
                variant = "" if kernel == "dense_backward" else "relu"
                fns[kernel] = _bench.bind(_bench.find_case(kernel, variant, dims, F32), b)
            fns["gemm x@w"] = functools.partial(gemm, x, w, c1)
            fns["gemm dy@w.T"] = functools.partial(gemm, dy, w, c2, False, True)
            fns["gemm x.T@dz + sum"] = lambda: (gemm(x, dy, c3, True, False),
                                               np.sum(dy, axis=0, out=db))
            t = run.timed(fns)
            shape = "x".join(map(str, dims))
            for kernel, base in (("dense_forward", "gemm x@w"), ("backprop_delta", "gemm dy@w.T"),
                                 ("dense_backward", "gemm x.T@dz + sum")):
                owned = b in owners and (kernel != "dense_backward" or b == "cython")
                name = kernel + ("" if kernel == "dense_backward" else " relu")
                run.add(Goal("kernels", OWNER[b], f"{name} {shape} time / its GEMM alone", b,
                             t[kernel] / t[base], "<=", 1.05,
                             figures=f"kernel {ms(t[kernel])}, {base} {ms(t[base])} by {label}",
                             counted=owned))
    # optimizers against the NumPy reference and Adam against the bandwidth floor
    n = sz.opt_n
    label = f"{n / 1e6:g} M" if n >= 1_000_000 else f"{n:,}"
    adam = _bench.find_case("adam_step", "", (n,), F32)
    floors = {}
    if "cython" in cpu:
        from fastnn.kernels import cython_cpu

        rng = np.random.default_rng(2)
        arrays = [rng.standard_normal(n, np.float32) for _ in range(4)]
        floors["floor (cython loop)"] = functools.partial(cython_cpu._cy_optim._stream_floor,
                                                          *arrays)
    if _bench.floor_available():
        floors["floor (numba prange)"] = _bench.probe(adam)
    t = speedups(run, adam, cpu, floors)
    floor = min((t[k] for k in floors), default=None)
    for b in cpu:
        if b in t:
            run.add(Goal("kernels", OWNER[b], f"adam_step {label} float32 vs NumPy", b,
                         t["numpy"] / t[b], ">=", 12,
                         figures=f"{ms(t[b])}, NumPy {ms(t['numpy'])}"))
            if floor is not None:
                run.add(Goal("kernels", OWNER[b], f"adam_step {label} float32 time / memory "
                             "floor (4 reads, 3 writes)", b, t[b] / floor, "<=", 1.25,
                             figures=f"{ms(t[b])}; " + ", ".join(f"{k} {ms(t[k])}"
                                                                 for k in floors)))
    for kernel, variant in (("rmsprop_step", ""), ("sgd_step", "momentum")):
        case = _bench.find_case(kernel, variant, (n,), F32)
        t = speedups(run, case, cpu)
        for b in cpu:
            if b in t:
                run.add(Goal("kernels", OWNER[b], f"{case.name} {label} float32 vs NumPy", b,
                             t["numpy"] / t[b], ">=", 10,
                             figures=f"{ms(t[b])}, NumPy {ms(t['numpy'])}"))
    # activations over 1 M elements
    dims = sz.elementwise
    shape = "x".join(map(str, dims))
    for dtype in sz.elementwise_dtypes:
        for act in ("identity", "relu", "leaky_relu") + (
                ("sigmoid", "tanh", "gelu", "silu", "softplus") if dtype == F32 else ()):
            cheap = act in ("identity", "relu", "leaky_relu")
            for kernel in ("activation_forward", "activation_backward"):
                case = _bench.find_case(kernel, act, dims, dtype)
                t = speedups(run, case, cpu)
                for b in cpu:
                    if b in t:
                        run.add(Goal("kernels", OWNER[b], f"{case.name} {shape} {dtype} vs NumPy",
                                     b, t["numpy"] / t[b], ">=", 3 if cheap else 2,
                                     figures=f"{ms(t[b])}, NumPy {ms(t['numpy'])}",
                                     counted=b == "numba" or not cheap))
    # softmax cross-entropy (issue 5)
    for dims in sz.softmax:
        case = _bench.find_case("softmax_cross_entropy", "", dims, F32)
        t = speedups(run, case, cpu)
        for b in cpu:
            if b in t:
                run.add(Goal("kernels", OWNER[b], f"softmax_cross_entropy {case.shape} vs NumPy",
                             b, t["numpy"] / t[b], ">=", 2,
                             figures=f"{ms(t[b])}, NumPy {ms(t['numpy'])}",
                             counted=b == "cython"))
    # the thread pools' fight, fresh processes; in a full run also with OpenBLAS's
    # idle workers asleep at once and with libgomp's default spinning, for comparison
    variants = [({}, "")]
    if sz.name == "full":
        variants += [({"OPENBLAS_THREAD_TIMEOUT": "16"}, ", OPENBLAS_THREAD_TIMEOUT=16"),
                     ({"GOMP_SPINCOUNT": "300000"}, ", GOMP_SPINCOUNT=300000")]
    for b in cpu if sz.fight else ():
        for kernel, what in (("activation_forward", "relu over 1 M"), ("adam_step", "Adam 1 M")):
            for env, label in variants:
                goal = f"loop of GEMM 128x784x256, {what}, GEMM / its parts alone{label}"
                try:
                    r = _with_env(env, _bench.thread_pools, b, kernel)
                except Exception as exc:   # report, never fail
                    run.add(Goal("kernels", OWNER[b], goal, b, None, "<=", 1.1,
                                 figures=f"failed: {exc}", counted=not env))
                    continue
                run.add(Goal("kernels", OWNER[b], goal, b, r["ratio"], "<=", 1.1,
                             figures=f"loop {ms(r['combo'])}, GEMM {ms(r['gemm'])}, kernel "
                                     f"{ms(r['kernel'])} (fresh process)"
                                     + ("" if r["native"] else "; the kernel runs the reference"),
                             counted=not env))


def _with_env(env, fn, *args):
    """``fn(*args)`` with ``env`` in ``os.environ`` (read by the processes it starts)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return fn(*args)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ======================================================================= conv

def section_conv(run):
    """Issue 16: the convolution kernels against their GEMM alone; pooling and
    dropout against the reference."""
    sz = run.sizes
    B = sz.conv_batch
    conv1, conv2 = (B, 28, 28, 1, 32, 3), (B, 13, 13, 32, 64, 3)
    if sz.name == "smoke":
        conv1, conv2 = (B, 8, 8, 1, 4, 3), (B, 6, 6, 4, 8, 3)
    for b in run.cpu:
        gemm, label = backend_gemm(b)
        for dims, targets in ((conv2, {"conv2d_forward": 1.15, "conv2d_backward": 1.25,
                                       "conv2d_backprop": 1.25}),
                              (conv1, {"conv2d_forward": None, "conv2d_backward": None})):
            fns = {}
            for kernel in targets:
                case = _bench.find_case(kernel, "" if kernel == "conv2d_backward" else "relu",
                                        dims, F32)
                fns[kernel + " ref"] = _bench.bind(case, "numpy")
                fns[kernel] = _bench.bind(case, b)
                fns[kernel + " gemm"] = _bench.conv_gemm_fn(kernel, dims, F32, gemm)
            t = run.timed(fns, max_time=4.0)
            n, h, w, c, o, k = dims
            m = n * (h - k + 1) * (w - k + 1)
            for kernel, target in targets.items():
                mnk = (m, o, k * k * c) if kernel != "conv2d_backprop" else (m, k * k * c, o)
                mkn = "(M, N, K) = ({}, {}, {})".format(*mnk)
                what = (f"{kernel}{' relu' if kernel != 'conv2d_backward' else ''} "
                        f"({n}, {h}, {w}, {c}) -> {o} filters {k}x{k}")
                run.add(Goal("conv", "16", f"{what}: time / its GEMM alone", b,
                             t[kernel] / t[kernel + " gemm"], "<=" if target else None,
                             target, figures=f"kernel {ms(t[kernel])}, GEMM {mkn} "
                                             f"{ms(t[kernel + ' gemm'])} by {label}",
                             counted=target is not None))
                run.add(Goal("conv", "16", f"{what} vs NumPy", b,
                             t[kernel + " ref"] / t[kernel],
                             figures=f"{ms(t[kernel])}, NumPy {ms(t[kernel + ' ref'])}"))
    pools = ((B, 26, 26, 32), (B, 11, 11, 64)) if sz.name != "smoke" else ((B, 6, 6, 4),)
    cases = []
    for dims in pools:
        cases += [_bench.find_case("maxpool2d_forward", "", dims, F32),
                  _bench.find_case("maxpool2d_backward", "relu", dims, F32)]
    drop = (B, 1600) if sz.name != "smoke" else (B, 64)
    cases += [_bench.find_case("dropout_forward", "", drop, F32),
              _bench.find_case("dropout_backward", "", drop, F32)]
    for case in cases:
        t = speedups(run, case, run.cpu)
        for b in run.cpu:
            if b in t:
                run.add(Goal("conv", "16", f"{case.name} {case.shape} vs NumPy", b,
                             t["numpy"] / t[b], figures=f"{ms(t[b])}, NumPy {ms(t['numpy'])}"))


# ======================================================================= training

def section_training(run):
    """Issues 6, 14 and 16: the MLP and the two convnets, whole epochs."""
    sz = run.sizes
    backends = ["numpy"] + run.cpu
    rows, skipped = _bench.run_training(backends, batches=sz.batches, n=sz.train_n,
                                        repeats=sz.repeats, networks=tuple(_bench.NETWORKS),
                                        conv_n=sz.conv_n, peers=not run.args.no_torch)
    for s in skipped:
        run.note(s)
    by = {(r.network, r.batch, r.contender): r for r in rows}
    default = fastnn.get_backend()

    def rate(r):
        return f"{r.samples_per_s:,.0f} samples/s" if r else "-"

    for network in _bench.NETWORKS:
        short = _bench.NETWORK_SHORT[network]
        for batch in sz.batches:
            base = by.get((network, batch, "numpy (plain)"))
            torch = by.get((network, batch, "pytorch"))
            ceil = by.get((network, batch, "GEMMs only"))
            for b in run.cpu:
                r = by.get((network, batch, f"fastnn[{b}]"))
                k = by.get((network, batch, f"kernel step[{b}]"))
                figs = (f"fastnn {rate(r)}, NumPy {rate(base)}, PyTorch {rate(torch)}, "
                        f"kernel step {rate(k)}, GEMMs only {rate(ceil)}")
                if network == "mlp":
                    t_np, t_torch = {128: (1.5, 1.5), 32: (2.0, 1.7)}.get(batch, (None, None))
                    run.add(Goal("training", "6", f"{short} batch {batch} samples/s vs plain "
                                 "NumPy", b, r.vs_numpy if r else None,
                                 ">=" if t_np else None, t_np, figures=figs))
                    run.add(Goal("training", "6", f"{short} batch {batch} samples/s vs PyTorch",
                                 b, r.vs_torch if r else None, ">=" if t_torch else None,
                                 t_torch, figures=figs))
                else:
                    mine = b == default
                    run.add(Goal("training", "16", f"{short} batch {batch} samples/s vs "
                                 "PyTorch", b, r.vs_torch if r else None, ">=", 2,
                                 figures=figs + ("" if mine else "; not the default backend"),
                                 counted=mine))
                    run.add(Goal("training", "16", f"{short} batch {batch} samples/s vs the "
                                 "NumPy reference", b, r.vs_numpy if r else None, ">=", 4,
                                 figures=figs + ("" if mine else "; not the default backend"),
                                 counted=mine and network == "convnet"))
                run.add(Goal("training", "14" if network == "mlp" else "16",
                             f"{short} batch {batch}: fit / the bare kernel step", b,
                             None if r is None or r.vs_kernels is None else 100 * r.vs_kernels,
                             ">=", 95, unit="%", figures=f"fit {rate(r)}, kernel step {rate(k)}"))


# ======================================================================= data

def _mlp(dtype="float32"):
    model = fastnn.Sequential([fastnn.Dense(256, "relu"), fastnn.Dense(128, "relu"),
                               fastnn.Dense(10)], input_dim=784, dtype=dtype, seed=0)
    model.compile(loss="softmax_cross_entropy", optimizer=fastnn.Adam(lr=1e-3))
    return model


def _mb(nbytes):
    return None if nbytes is None else nbytes / 2**20


def _steps_alone(result):
    """The step-only samples/s of a fit_process run (the compute rate: on a
    shared machine it moves, and the wall rate with it)."""
    steps = result.get("history", {}).get("step_samples_per_s") or []
    return f"{steps[-1]:,.0f}" if steps else "n/a"


def _drop_cache(path):
    """Evict a file's pages from the page cache (Linux; no root needed for
    clean pages). Returns whether it could."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def _write_memmap(folder, megabytes, seed=0):
    """A float32 ``(rows, 784)`` .npy of about ``megabytes`` MB and its labels,
    written in chunks (never whole in memory). Returns (x path, y path, rows)."""
    rows = max(256, megabytes * 2**20 // (784 * 4))
    xp, yp = os.path.join(folder, "x.npy"), os.path.join(folder, "y.npy")
    x = np.lib.format.open_memmap(xp, mode="w+", dtype=np.float32, shape=(rows, 784))
    rng = np.random.default_rng(seed)
    for s in range(0, rows, 16384):
        x[s:s + 16384] = rng.random((min(16384, rows - s), 784), dtype=np.float32)
    x.flush()
    del x
    np.save(yp, rng.integers(0, 10, rows).astype(np.int64))
    return xp, yp, rows


def section_data(run):
    """Issue 17: data movement, memory that does not grow with the data, memmaps."""
    sz = run.sizes
    be = fastnn.get_backend()
    # wall clock against the steps alone, in this process
    x, y = _bench._training_data(sz.data_n)
    for batch in (128, 32):
        model = _mlp()
        h = model.fit(x, y, epochs=sz.data_epochs, batch_size=batch, verbose=0)  # shuffled
        wall, step = h.history["samples_per_s"], h.history["step_samples_per_s"]
        pairs = list(zip(wall, step))[1:] or list(zip(wall, step))
        pairs.sort(key=lambda p: p[0] / p[1])
        w, s = pairs[len(pairs) // 2]
        run.add(Goal("data", "17", f"{sz.data_n:,} samples batch {batch}, shuffled epoch: "
                     "wall-clock / step-only samples/s", be, 100 * w / s, ">=", 95, unit="%",
                     figures=f"wall {w:,.0f}, steps alone {s:,.0f} samples/s (median of "
                             f"{len(pairs)} epoch(s) after the first)"))
    del x, y
    # peak memory over the caller's arrays and the model's buffers, fresh processes
    for n in sz.memory_n:
        try:
            traced = _bench.fit_process("fastnn", n=n, batch=128, shuffle=True, warmup=True,
                                        trace=True)
            rss = _bench.fit_process("fastnn", n=n, batch=128, shuffle=True, warmup=True)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            run.add(Goal("data", "17", f"fit on {n:,} samples: peak memory added", be, None,
                         "<=", 16, "MB", figures=f"failed: {exc}"))
            continue
        tr = traced["traced"]
        data_mb = _mb(traced["data_bytes"])
        run.add(Goal("data", "17", f"fit on {n:,} x 784 float32 ({data_mb:,.0f} MB): "
                     "tracemalloc peak added by the epoch", be, _mb(tr["peak"] - tr["before"]),
                     "<=", 16, "MB", figures=f"the model's own buffers and state (made by a "
                                             f"warm-up fit on two batches first) "
                                             f"{_mb(tr['model']):,.1f} MB"))
        st = rss["stages"]
        added = _bench.peak_over(rss, "ready")
        run.add(Goal("data", "17", f"fit on {n:,} x 784 float32 ({data_mb:,.0f} MB): "
                     "resident peak added by the epoch", be, _mb(added), "<=", 16, "MB",
                     figures=f"resident {st['data']['VmRSS'] / 2**20:,.0f} MB with the data, "
                             f"{st['ready']['VmRSS'] / 2**20:,.0f} MB with the model; "
                             f"{rss['samples_per_s']:,.0f} samples/s"
                             + ("" if rss["peak_resets"] else
                                "; no /proc/self/clear_refs: not measured")))
    # a memmap larger than it may keep resident
    mb = 2048 if run.args.big_memmap else sz.memmap_mb
    limit = mb / 2
    with tempfile.TemporaryDirectory(prefix="fastnn-goals-memmap-", dir=run.args.tmpdir) as tmp:
        print(f"  writing a {mb:,} MB float32 memmap under {tmp} ...", flush=True)
        xp, yp, rows = _write_memmap(tmp, mb)
        runs, peaks = {}, {}
        plan = [("memmap batch", "memmap", "batch"), ("in memory", "npy", True)]
        if sz.memmap_random:
            plan.insert(1, ("memmap shuffled", "memmap", True))
        # the best of `rounds` fresh processes of each, alternating: on a shared
        # machine one process in a few computes at half speed for a while
        rounds = 1 if sz.name == "smoke" else 3
        cold = True
        for _ in range(rounds):
            for name, data, shuffle in plan:
                if data == "memmap":
                    cold = _drop_cache(xp) and cold
                try:
                    r = _bench.fit_process("fastnn", data=data, path=xp, ypath=yp, n=rows,
                                           batch=128, shuffle=shuffle, warmup=True)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    run.note(f"memmap run '{name}' failed: {exc}")
                    continue
                st = r["stages"]
                peak = max(v.get("VmHWM", 0) for v in st.values()) - st["start"]["VmRSS"]
                peaks[name] = max(peaks.get(name, 0), peak)
                if name not in runs or r["samples_per_s"] > runs[name]["samples_per_s"]:
                    runs[name] = r
        cache = ("read cold (evicted from the page cache first)" if cold else
                 "the page cache could not be emptied: reads may be warm")
        r = runs.get("memmap batch")
        if r is not None:
            st = r["stages"]
            run.add(Goal("data", "17", f"{mb:,} MB float32 memmap, one epoch, shuffle='batch': "
                         "resident peak over the interpreter's start (the largest of "
                         f"{rounds} runs)", be, _mb(peaks["memmap batch"]), "<=", limit, "MB",
                         figures=f"target: half the file (the issue's 1 GB for 2 GB); at the "
                                 f"end {st['end'].get('RssAnon', 0) / 2**20:,.0f} MB anonymous"
                                 f" + {st['end'].get('RssFile', 0) / 2**20:,.0f} MB file pages "
                                 f"resident; {rows:,} rows; {cache}"))
        mem = runs.get("in memory")
        for name in ("memmap batch", "memmap shuffled"):
            r = runs.get(name)
            if r is None or (name == "memmap shuffled" and not sz.memmap_random):
                continue
            what = ("shuffle='batch'" if name == "memmap batch" else
                    "shuffle=True (random reads)")
            run.add(Goal("data", "17", f"{mb:,} MB memmap, {what}: samples/s / the in-memory "
                         "rate (shuffle=True)", be,
                         None if mem is None else 100 * r["samples_per_s"] / mem["samples_per_s"],
                         ">=" if name == "memmap batch" else None, 80, unit="%",
                         figures=f"memmap {r['samples_per_s']:,.0f} (steps alone "
                                 f"{_steps_alone(r)}), in memory {mem['samples_per_s']:,.0f} "
                                 f"(steps alone {_steps_alone(mem)}) samples/s, the best of "
                                 f"{rounds} fresh processes each, alternating; {cache}"
                         if mem else "the in-memory run failed"))


# ======================================================================= start-up

def section_startup(run):
    """Issues 4 and 5, fresh processes."""
    backends = run.backends
    cold = run.sizes.startup_cold
    if "numba" in backends:
        with tempfile.TemporaryDirectory(prefix="fastnn-numba-cache-") as tmp:
            # cold: an empty cache, then warm on what it filled; without cold,
            # the environment's cache (one untimed run fills it if it is empty)
            cache = tmp if cold else os.environ.get("NUMBA_CACHE_DIR")
            results = {}
            for mode in ("cold", "warm") if cold else ("fill", "warm"):
                try:
                    results[mode] = _bench.startup("numba", "kernels", cache)
                except Exception as exc:
                    results[mode] = exc
            for mode in ("cold", "warm") if cold else ("warm",):
                r = results[mode]
                what = f"import fastnn + first call of a training step's kernels, {mode} cache"
                if isinstance(r, Exception):
                    run.add(Goal("startup", "4", what, "numba", None, "<=", 3, "s",
                                 figures=f"failed: {r}"))
                    continue
                run.add(Goal("startup", "4", what, "numba", r["import"] + r["load"] + r["first"],
                             "<=", 3, "s", figures=f"process total {r['total']:.2f} s",
                             counted=mode == "warm"))
    if "cython" in backends:
        what = "import fastnn + first dense_forward"
        try:
            r = min((_bench.startup("cython", "dense_forward") for _ in range(3)),
                    key=lambda r: r["import"] + r["load"] + r["first"])
            run.add(Goal("startup", "5", what, "cython", r["import"] + r["load"] + r["first"],
                         "<=", 0.5, "s", figures=f"best of 3 processes; process total "
                                                 f"{r['total']:.2f} s with the interpreter"))
        except Exception as exc:
            run.add(Goal("startup", "5", what, "cython", None, "<=", 0.5, "s",
                         figures=f"failed: {exc}"))


# ======================================================================= gpu

def section_gpu(run):
    """Issue 8 on a real GPU; ``benchmarks/cuda_bench.py`` measures the rest."""
    info = fastnn.backends()["cuda"]
    if not info.available:
        run.note(f"no GPU ({info.reason}); benchmarks/cuda_bench.py measures the cuda backend "
                 "on one")
        return
    if _bench.cuda_simulated():
        run.note("no GPU: the CUDA simulator is on (NUMBA_ENABLE_CUDASIM), its times mean "
                 "nothing")
        return
    from numba import cuda

    try:
        import cupy
    except ImportError:
        cupy = None
    case = _bench.find_case("adam_step", "", (10_000_000,), F32)
    t = _bench.measure({"adam": _bench.bind(case, "cuda")}, repeats=20, min_time=0.05)["adam"]
    moved = 7 * 4 * 10_000_000
    dev = cuda.get_current_device()
    try:
        peak = 2 * dev.MEMORY_CLOCK_RATE * 1e3 * dev.GLOBAL_MEMORY_BUS_WIDTH / 8
    except Exception:
        peak = None
    copy_bw = None
    if cupy is not None:   # the practical peak: a device-to-device copy
        a = cupy.empty(50_000_000, cupy.float32)
        b = cupy.empty_like(a)

        def copy():
            b[...] = a
            cupy.cuda.Device().synchronize()
        copy_bw = 2 * a.nbytes / _bench.measure({"c": copy}, repeats=20, min_time=0.05)["c"]
    ref_bw = copy_bw or peak
    if ref_bw:
        run.add(Goal("gpu", "8", "adam_step 10 M float32, share of the memory bandwidth", "cuda",
                     100 * moved / t / ref_bw, ">=", 80, "%",
                     figures=f"{moved / t / 1e9:.0f} GB/s of {ref_bw / 1e9:.0f} GB/s "
                             f"({'a device copy' if copy_bw else 'the specification'})"))
    if cupy is None:
        run.note("CuPy is not installed: dense_forward against cuBLAS not measured")
        return
    for dims in ((128, 784, 256), (1024, 1024, 1024)):
        c = _bench.find_case("dense_forward", "relu", dims, F32)
        x, w = (cupy.asarray(a) for a in c.make(np.random.default_rng(0))[:2])
        out = cupy.empty((dims[0], dims[2]), cupy.float32)

        def gemm():
            cupy.matmul(x, w, out=out)
            cupy.cuda.Device().synchronize()
        times = _bench.measure({"k": _bench.bind(c, "cuda"), "gemm": gemm}, repeats=20,
                               min_time=0.05)
        run.add(Goal("gpu", "8", f"dense_forward relu {c.shape} time / cuBLAS", "cuda",
                     times["k"] / times["gemm"], "<=", 1.1,
                     figures=f"{ms(times['k'])}, cuBLAS {ms(times['gemm'])}"))


# ======================================================================= thresholds

NUMBA_THRESHOLDS = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import fastnn
    from fastnn.kernels import numba_cpu as nb
    from fastnn import _bench
    threads, top = fastnn.get_num_threads(), int(sys.argv[1])
    rng = np.random.default_rng(5)
    out = {}
    def pair(k, n, args):
        t = _bench.measure({"serial": lambda: k.run(0, n, *args),
                            "parallel": lambda: k.par(threads, n, k.align, *args)}, repeats=5)
        return t["serial"], t["parallel"]
    for act, label in (("relu", "numba relu forward"), ("sigmoid", "numba sigmoid forward")):
        k = nb.elementwise._act_kernels(act).fwd
        for log2 in range(13, top + 1):
            n = 1 << log2
            out.setdefault(label, []).append(
                (n,) + pair(k, n, (rng.standard_normal(n).astype(np.float32),
                                   np.empty(n, np.float32))))
    k = nb._runtime._specialised(("adam", False, False, False, False), nb.optim._adam_kernel,
                                 False, False, False, False)
    f = np.float32
    for log2 in range(15, top + 2):
        n = 1 << log2
        p, g, m, v = (rng.standard_normal(n).astype(f) for _ in range(4))
        v = np.abs(v)
        args = (p, g, m, v, v, f(1), f(0), f(0), f(0.9), f(0.1), f(0.999), f(0.001), f(0.5),
                f(1e-8), f(1e-3))
        out.setdefault("numba adam", []).append((n,) + pair(k, n, args))
    print("RESULT " + json.dumps(out))
""")


def section_thresholds(run):
    """Serial against parallel by size: the data behind the PAR_MIN constants."""
    top = run.sizes.threshold_max
    threads = fastnn.get_num_threads()
    tables = {}
    if "cython" in run.backends:
        from fastnn.kernels import cython_cpu as cy

        el, opt = cy._cy_elementwise, cy._cy_optim
        saved = el._set_parallel_min(1, 1), opt._set_parallel_min(1)
        try:
            for log2 in range(10, top + 1):
                n = 1 << log2
                rng = np.random.default_rng(log2)
                z, out = rng.standard_normal(n, np.float32), np.empty(n, np.float32)
                p, g, m, v = (rng.standard_normal(n, np.float32) for _ in range(4))
                v = np.abs(v)
                for label, fn in (("cython relu forward",
                                   lambda: cy.activation_forward("relu", z, out)),
                                  ("cython sigmoid forward",
                                   lambda: cy.activation_forward("sigmoid", z, out)),
                                  ("cython adam", lambda: cy.adam_step(
                                      p, g, m, v, 3, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, 0.0,
                                      None))):
                    t = {}
                    for nt in (1, threads):
                        cy.set_num_threads(nt)
                        t[nt] = run.timed({"f": fn}, max_time=0.5)["f"]
                    cy.set_num_threads(threads)
                    tables.setdefault(label, []).append((n, t[1], t[threads]))
        finally:
            el._set_parallel_min(*saved[0])
            opt._set_parallel_min(saved[1])
            cy.set_num_threads(threads)
    if "numba" in run.backends:
        proc = subprocess.run([sys.executable, "-c", NUMBA_THRESHOLDS, str(top)],
                              capture_output=True, text=True, timeout=1200)
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                tables.update(json.loads(line[7:]))
                break
        else:
            run.note(f"numba thresholds failed: {proc.stderr.strip()[-500:]}")
    for label, rows in tables.items():
        cross = next((n for n, s, p in rows if p < s), None)
        print(f"  {label}: serial vs {threads} threads, microseconds per call "
              f"(parallel first faster at n = {cross})")
        for n, s, p in rows:
            print(f"    n = {n:>9,}  serial {s * 1e6:9.1f}  parallel {p * 1e6:9.1f}  "
                  f"ratio {s / p:5.2f}")


# ======================================================================= main

SECTIONS = {
    "kernels": (section_kernels, "issues 4, 5: dense kernels, activations, losses, "
                                 "optimizers, thread pools"),
    "conv": (section_conv, "issue 16: convolution kernels against their GEMM, pooling, "
                           "dropout"),
    "training": (section_training, "issues 6, 14, 16: the MLP and the two convnets"),
    "data": (section_data, "issue 17: data movement, memory, memmaps"),
    "startup": (section_startup, "issues 4, 5: import and first calls, fresh processes"),
    "gpu": (section_gpu, "issue 8: the cuda backend on a real GPU"),
    "thresholds": (section_thresholds, "serial against parallel by size (not a goal)"),
}
DEFAULT_SECTIONS = ("kernels", "conv", "training", "data", "startup", "gpu")


def summary(run):
    print("\nsummary")
    header = ["", "issue", "section", "goal", "backend", "measured", "target"]
    rows = [header] + [[g.verdict, g.issue, g.section, g.what, g.backend, g.measured, g.goal]
                       for g in run.goals]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    counted = [g for g in run.goals if g.counted and g.value is not None]
    passed = sum(g.verdict == "PASS" for g in counted)
    failed = [g for g in counted if g.verdict == "FAIL"]
    missing = sum(g.value is None for g in run.goals)
    print(f"\n{passed} of {len(counted)} goals PASS, {len(failed)} FAIL"
          + (f", {missing} not measured (N/A)" if missing else "")
          + "; INFO rows are reported, not counted.")
    load = _bench.load_average()
    if load is not None:
        print(f"load average {load:.1f} at the end on {os.cpu_count()} cores"
              + (": the machine was shared, the figures are provisional"
                 if load > 0.75 * (os.cpu_count() or 1) else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--section", default=None, metavar="NAMES",
                        help=f"comma-separated: {', '.join(SECTIONS)} (default: all but "
                             "thresholds)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and sizes, no cold start-up, no 1,000,000-sample "
                             "memory run")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, to check that every section runs (the figures mean "
                             "nothing)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated (default: every available one)")
    parser.add_argument("--threads", type=int, default=None,
                        help="fastnn.set_num_threads(n) first, fresh processes too (default: "
                             "all cores)")
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="of the repeats (min is steadier on a shared machine)")
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    parser.add_argument("--big-memmap", action="store_true",
                        help="data section: the issue's 2 GB memmap (written under --tmpdir) "
                             "instead of 512 MB")
    parser.add_argument("--tmpdir", default=None,
                        help="where the data section writes its memmap (default: the system's "
                             "temporary folder)")
    parser.add_argument("--traceback", action="store_true",
                        help="print the traceback of a section that stops")
    args = parser.parse_args(argv)
    names = DEFAULT_SECTIONS if not args.section else tuple(
        s.strip() for s in args.section.split(",") if s.strip())
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from "
                     f"{', '.join(SECTIONS)}")
    if args.threads is not None:
        fastnn.set_num_threads(args.threads)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
            os.environ[var] = str(args.threads)   # the fresh processes read these
    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    backends = _bench.available_backends(args.backends.split(",") if args.backends else None)
    run = Run(sizes, backends, args.stat, args)
    print(f"fastnn goals ({sizes.name}; {args.stat} of {sizes.repeats} round-robin samples): "
          f"{_bench.machine_line()}")
    print(f"backends: {', '.join(backends)}; default {fastnn.get_backend()}; "
          f"{fastnn.get_num_threads()} threads")
    if sizes.name == "smoke":
        print("SMOKE RUN: tiny sizes; the figures below mean nothing")
    started = time.perf_counter()
    for name in names:
        fn, what = SECTIONS[name]
        print(f"\n== {name}: {what}", flush=True)
        t0 = time.perf_counter()
        try:
            fn(run)
        except KeyboardInterrupt:
            raise
        except Exception as exc:   # report, go on with the next section
            run.note(f"section {name} stopped: {type(exc).__name__}: {exc}")
            if args.traceback:
                traceback.print_exc()
        print(f"  ({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
    summary(run)
    print(f"{time.perf_counter() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
