"""Print every performance goal of issues 4, 5, 6 and 8, what this machine
measures, and whether it holds. It reports; it never fails (exit code 0).

    python benchmarks/goals.py                 # every goal, every CPU backend
    python benchmarks/goals.py --quick         # fewer repeats, no cold start-up
    python benchmarks/goals.py --backends numba --only adam,pools

Ratios are measured against the NumPy baseline in the same run, round robin
(``fastnn._bench.measure``), as the median of the repeats; the thread-pool
and start-up goals run in fresh processes, PyTorch in its own process.
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastnn  # noqa: E402
from _common import _bench, benchmark_backends, find_case, machine_line  # noqa: E402

F32 = "float32"


class Goal:
    """One goal for one backend: ``measured`` against ``target`` (``>=`` or ``<=``)."""

    def __init__(self, issue, what, backend, measured, op, target, unit="x", note=""):
        self.issue, self.what, self.backend = issue, what, backend
        self.measured, self.op, self.target, self.unit, self.note = (
            measured, op, target, unit, note)

    @property
    def holds(self):
        if self.measured is None or self.op is None:
            return None
        return self.measured >= self.target if self.op == ">=" else self.measured <= self.target

    def row(self):
        if self.measured is None:
            measured, verdict = "-", "n/a"
        else:
            measured = (f"{self.measured:.2f}{self.unit}" if self.unit != "s"
                        else f"{self.measured:.2f} s")
            verdict = "report" if self.op is None else ("yes" if self.holds else "NO")
        if self.op is None:
            target = "-"
        else:
            target = f"{self.op} {self.target:g}{'' if self.unit == 's' else self.unit}" + (
                " s" if self.unit == "s" else "")
        return [self.issue, self.what, self.backend, measured, target, verdict, self.note]


def _print_table(goals, file=sys.stdout):
    header = ["issue", "goal", "backend", "measured", "target", "holds", "note"]
    rows = [header] + [g.row() for g in goals]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header) - 1)]
    for r in rows:
        cells = [str(c).ljust(w) for c, w in zip(r[:-1], widths)]
        print("  ".join(cells) + ("  " + r[-1] if r[-1] else ""), file=file)


def _times(case, backends, repeats):
    """{backend: KernelResult} of one case, NumPy included."""
    rows = _bench.run_case(case, backends, repeats=repeats, min_time=0.05, max_time=4.0)
    return {r.backend: r for r in rows}


def _ref_note(case, b):
    return "runs the NumPy reference" if _bench.runs_reference(case, b) else ""


def kernel_goals(backends, repeats, want):
    """Issues 4 (numba) and 5 (cython): kernels against NumPy and their probes."""
    goals = []
    cpu = [b for b in backends if b in ("cython", "numba")]
    issue = {"numba": "4", "cython": "5"}

    def speedup(case, target, owners, label=None):
        res = _times(case, cpu, repeats)
        for b in cpu:
            note = _ref_note(case, b)
            r = res.get(b)
            goals.append(Goal(issue[b] if b in owners else f"({issue[b]})",
                              label or f"{case.name} {case.shape} {case.dtype} vs NumPy", b,
                              None if r is None else r.speedup, ">=", target,
                              note=note or ("" if b in owners else "not a goal of this issue")))
        return res

    def over_probe(case, target, owners, res=None):
        res = res or _times(case, cpu, repeats)
        for b in cpu:
            r = res.get(b)
            if case.probe == "floor":
                value = None if r is None or r.probe_ratio is None else 1 / r.probe_ratio
                what = f"{case.name} {case.shape} {case.dtype} time / bandwidth floor"
            else:
                value = None if r is None else r.probe_ratio
                what = (f"{case.name} {case.shape} {case.dtype} time / "
                        f"{'GEMM + sum' if case.kernel == 'dense_backward' else 'GEMM'}")
            goals.append(Goal(issue[b] if b in owners else f"({issue[b]})", what, b, value,
                              "<=", target, note=_ref_note(case, b) or (
                                  "" if b in owners else "not a goal of this issue")))
        return res

    both = ("numba", "cython")
    if want("adam"):
        case = find_case("adam_step", "", (10_000_000,), F32)
        res = speedup(case, 12, both)
        over_probe(case, 1.25, both, res)
    if want("rmsprop") or want("sgd"):
        speedup(find_case("rmsprop_step", "", (10_000_000,), F32), 10, both)
        speedup(find_case("sgd_step", "momentum", (10_000_000,), F32), 10, both)
    if want("dense"):
        for dims, owners in (((128, 784, 256), both), ((1024, 1024, 1024), both),
                             ((32, 784, 256), ("cython",))):
            over_probe(find_case("dense_forward", "relu", dims, F32), 1.05, owners)
            over_probe(find_case("backprop_delta", "relu", dims, F32), 1.05, owners)
            over_probe(find_case("dense_backward", "", dims, F32), 1.05, ("cython",))
    if want("elementwise") or want("activation"):
        for dtype in ("float32", "float64"):
            for kernel in ("activation_forward", "activation_backward"):
                for act in ("relu", "identity", "leaky_relu"):
                    speedup(find_case(kernel, act, (1024, 1024), dtype), 3, ("numba",))
        for kernel in ("activation_forward", "activation_backward"):
            for act in ("sigmoid", "tanh", "gelu", "silu", "softplus"):
                speedup(find_case(kernel, act, (1024, 1024), F32), 2, both)
    if want("softmax"):
        for dims in ((128, 10), (1024, 10), (128, 1000), (1024, 1000)):
            speedup(find_case("softmax_cross_entropy", "", dims, F32), 2, ("cython",))
    return goals


def pools_goals(backends):
    """Issues 4 and 5: GEMM, a parallel kernel, GEMM in a loop within 1.1x of the parts."""
    goals = []
    for b in backends:
        if b not in ("cython", "numba"):
            continue
        for kernel in ("activation_forward", "adam_step"):
            what = ("GEMM 128x784x256 + relu 1M + GEMM, loop / parts" if kernel ==
                    "activation_forward" else "GEMM 128x784x256 + adam 1M + GEMM, loop / parts")
            try:
                r = _bench.thread_pools(b, kernel)
            except Exception as exc:   # report, never fail
                goals.append(Goal({"numba": "4", "cython": "5"}[b], what, b, None, "<=", 1.1,
                                  note=f"failed: {exc}"))
                continue
            note = (f"GEMM {_bench.fmt_time(r['gemm'])}, kernel {_bench.fmt_time(r['kernel'])}, "
                    f"loop {_bench.fmt_time(r['combo'])}")
            if not r["native"]:
                note += "; the kernel runs the NumPy reference"
            goals.append(Goal({"numba": "4", "cython": "5"}[b], what, b, r["ratio"], "<=", 1.1,
                              note=note))
    return goals


def startup_goals(backends, cold=True):
    """Issue 4: warm start-up of a whole step's kernels under 3 s (cold reported);
    issue 5: import + first dense_forward on cython under 0.5 s."""
    goals = []
    if "numba" in backends:
        with tempfile.TemporaryDirectory(prefix="fastnn-numba-cache-") as cache:
            results = {}
            for mode in ("cold", "warm"):
                try:
                    results[mode] = _bench.startup("numba", "kernels", cache)
                except Exception as exc:
                    results[mode] = exc
            for mode in ("cold", "warm") if cold else ("warm",):
                r = results[mode]
                if isinstance(r, Exception):
                    goals.append(Goal("4", f"import + first training step's kernels, {mode}",
                                      "numba", None, "<=", 3, "s", note=f"failed: {r}"))
                    continue
                value = r["import"] + r["load"] + r["first"]
                goals.append(Goal("4", f"import + first training step's kernels, {mode} cache",
                                  "numba", value, "<=" if mode == "warm" else None, 3, "s",
                                  note=f"process total {r['total']:.2f} s"))
    if "cython" in backends:
        try:
            r = _bench.startup("cython", "dense_forward")
            goals.append(Goal("5", "import fastnn + first dense_forward", "cython",
                              r["import"] + r["load"] + r["first"], "<=", 0.5, "s",
                              note=f"process total {r['total']:.2f} s (interpreter start "
                                   f"included)"))
        except Exception as exc:
            goals.append(Goal("5", "import fastnn + first dense_forward", "cython", None,
                              "<=", 0.5, "s", note=f"failed: {exc}"))
    return goals


def training_goals(backends, repeats, n):
    """Issue 6: fastnn.Sequential samples/s against plain NumPy and PyTorch."""
    goals = []
    rows, skipped = _bench.run_training(
        [b for b in backends if b != "cuda"], n=n, repeats=repeats, kernel_steps=True)
    by = {(r.batch, r.contender): r for r in rows}
    targets = {128: (1.5, 1.5), 32: (2.0, 1.7)}
    default = fastnn.get_backend()
    for b in backends:
        if b in ("numpy", "cuda"):
            continue
        for batch, (t_np, t_torch) in targets.items():
            r = by.get((batch, f"fastnn[{b}]"))
            k = by.get((batch, f"kernel step[{b}]"))
            ceil = by.get((batch, "GEMMs only"))
            note = []
            if k is not None and k.vs_numpy:
                note.append(f"kernels alone {k.vs_numpy:.2f}x NumPy")
            if ceil is not None and ceil.vs_numpy:
                note.append(f"GEMMs-only ceiling {ceil.vs_numpy:.2f}x NumPy")
            if b == default:
                note.append("default backend")
            if r is None:
                note.insert(0, "fastnn.Sequential not measured")
            goals.append(Goal("6", f"training batch {batch} samples/s vs plain NumPy", b,
                              r.vs_numpy if r else None, ">=", t_np, note="; ".join(note)))
            goals.append(Goal("6", f"training batch {batch} samples/s vs PyTorch", b,
                              r.vs_torch if r else None, ">=", t_torch,
                              note="" if by.get((batch, "pytorch")) else "PyTorch not measured"))
    return goals, skipped, rows


def gpu_goals(backends):
    """Issue 8: on a real GPU, Adam's share of memory bandwidth, dense_forward
    over cuBLAS; without one, say so."""
    info = fastnn.backends()["cuda"]
    if not info.available or "cuda" not in backends:
        reason = info.reason or "not selected"
        print(f"issue 8 (cuda): no GPU ({reason})")
        return []
    from numba import cuda

    if getattr(cuda, "simulator", None) is not None and os.environ.get("NUMBA_ENABLE_CUDASIM"):
        print("issue 8 (cuda): no GPU (the CUDA simulator is on; its times mean nothing)")
        return []
    goals = []
    try:
        import cupy
    except ImportError:
        cupy = None
    be = fastnn._backend.load("cuda")
    case = find_case("adam_step", "", (10_000_000,), F32)
    adam = _bench.bind(case, "cuda")
    t = _bench.measure({"adam": adam}, repeats=20, min_time=0.05)["adam"]
    bytes_moved = 7 * 4 * 10_000_000
    dev = cuda.get_current_device()
    try:
        peak = 2 * dev.MEMORY_CLOCK_RATE * 1e3 * dev.GLOBAL_MEMORY_BUS_WIDTH / 8
    except Exception:
        peak = None
    if cupy is not None:   # the practical peak: a device-to-device copy
        a = cupy.empty(50_000_000, cupy.float32)
        bcopy = cupy.empty_like(a)

        def copy():
            bcopy[...] = a
            cupy.cuda.Device().synchronize()
        tc = _bench.measure({"copy": copy}, repeats=20, min_time=0.05)["copy"]
        copy_bw = 2 * a.nbytes / tc
    else:
        copy_bw = None
    ref_bw = copy_bw or peak
    if ref_bw:
        goals.append(Goal("8", "adam_step 10M float32, share of memory bandwidth", "cuda",
                          100 * bytes_moved / t / ref_bw, ">=", 80, "%",
                          note=f"{bytes_moved / t / 1e9:.0f} GB/s; "
                               f"{'copy' if copy_bw else 'spec'} {ref_bw / 1e9:.0f} GB/s" + (
                                   f", spec {peak / 1e9:.0f} GB/s" if peak and copy_bw else "")))
    if cupy is not None:
        for dims in ((128, 784, 256), (1024, 1024, 1024), (1024, 4096, 4096)):
            c = find_case("dense_forward", "relu", dims, F32)
            args = c.make(__import__("numpy").random.default_rng(0))
            x, w = cupy.asarray(args[0]), cupy.asarray(args[1])
            out = cupy.empty((dims[0], dims[2]), cupy.float32)

            def gemm():
                cupy.matmul(x, w, out=out)
                cupy.cuda.Device().synchronize()
            times = _bench.measure({"k": _bench.bind(c, "cuda"), "gemm": gemm}, repeats=20,
                                   min_time=0.05)
            goals.append(Goal("8", f"dense_forward relu {c.shape} float32 time / cuBLAS",
                              "cuda", times["k"] / times["gemm"], "<=", 1.1))
    # a whole MNIST-shaped epoch, batch 128, against PyTorch CUDA (reported, no target)
    x, y = _bench._training_data(8192)
    fns = {"kernels": _bench.KernelMLP("cuda", 128).epoch_fn(x, y)}
    if _bench.sequential_available()[0]:
        fns["fastnn"] = _bench.sequential_epoch_fn("cuda", x, y, 128)
    times = _bench.measure(fns, repeats=7, min_time=0, max_time=60)
    try:
        tt = _bench.torch_epochs([128], 8192, 7, device="cuda")["epoch_s"][128]
        t_torch = sorted(tt)[len(tt) // 2]
    except Exception as exc:
        t_torch, why = None, str(exc)
    for name, t in times.items():
        goals.append(Goal("8", f"epoch 784-256-128-10 b128 on the GPU ({name}) / PyTorch CUDA",
                          "cuda", None if t_torch is None else t_torch / t, None, 1,
                          note=f"{8192 / t:,.0f} samples/s" + (
                              "" if t_torch else f"; PyTorch CUDA not measured: {why}")))
    del be
    return goals


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats, no cold start-up, a shorter training epoch")
    parser.add_argument("--backends", default=None, help="comma-separated (default: all)")
    parser.add_argument("--only", default=None,
                        help="comma-separated groups: adam, rmsprop, sgd, dense, elementwise, "
                             "softmax, pools, startup, training, gpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="fastnn.set_num_threads(n) first (default: all cores); on a busy "
                             "machine 1 thread gives steadier ratios (no spinning BLAS threads)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        fastnn.set_num_threads(args.threads)
        # the fresh processes (thread pools, start-up) read these
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    backends = benchmark_backends()
    if args.backends:
        backends = [b for b in backends if b in args.backends.split(",")]
    only = [s.strip() for s in args.only.split(",")] if args.only else None

    def want(group):
        return only is None or group in only

    repeats = 5 if args.quick else 11
    print(f"machine: {machine_line()}")
    print(f"backends: {', '.join(backends)}; threads: {fastnn.get_num_threads()}")
    load = _bench.load_average()
    if load is not None and load > (os.cpu_count() or 1) * 0.75:
        print(f"note: load average {load:.1f} on {os.cpu_count()} cores: other processes are "
              f"running, times are noisy")
    print()
    goals, notes = [], []
    goals += kernel_goals(backends, repeats, want)
    if want("pools"):
        goals += pools_goals(backends)
    if want("startup"):
        goals += startup_goals(backends, cold=not args.quick)
    if want("training"):
        g, skipped, _ = training_goals(backends, repeats, 2048 if args.quick else 8192)
        goals += g
        notes += skipped
    if want("gpu"):
        goals += gpu_goals(backends)
    print()
    _print_table(goals)
    held = sum(1 for g in goals if g.holds and not g.issue.startswith("("))
    counted = sum(1 for g in goals if g.holds is not None and not g.issue.startswith("("))
    print(f"\n{held} of {counted} goals hold (rows with the issue in parentheses are "
          f"reported for comparison, not counted)")
    for n in notes:
        print(f"note: {n}")
    return 0


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise
    except Exception as exc:   # it reports; it never fails the caller
        print(f"goals.py stopped early: {type(exc).__name__}: {exc}")
    sys.exit(0)
