"""Training throughput of the 784-256-128-10 ReLU MLP, float32, Adam (lr 1e-3).

Samples/s of one epoch (full batches, no shuffling) at batch 32 and 128 for:

* ``fastnn[b]``: ``Sequential.fit`` on each available CPU backend ``b``;
* ``numpy``: a plain NumPy implementation of the same step (hand-written,
  preallocated buffers, ``out=`` and in-place operations throughout);
* ``GEMMs only``: the eight GEMMs of a step (3 forward, 3 weight gradients,
  2 deltas) into preallocated outputs, nothing else -- the ceiling;
* ``pytorch``: ``torch.optim.Adam(fused=True)``, ``nn.Linear``/``ReLU``,
  ``CrossEntropyLoss`` (when torch is importable).

Each backend runs in its own process together with the NumPy step and the
GEMM loop, interleaved round robin, so the ratio to NumPy is taken in the
same process at the same moment; PyTorch runs in its own process (our
thread pools would slow it). The rounds alternate between processes and the
medians are reported. ``--profile`` adds a breakdown of one fastnn step:
GEMM time (the GEMM loop), our kernels (time inside the backend's kernels
minus the GEMMs) and Python/model overhead (the step minus the kernels).

    python benchmarks/train_throughput.py                 # all CPU backends, torch if present
    python benchmarks/train_throughput.py --backends cython --batches 32 --profile

On a shared machine the figures move with the load; the table prints the
load average at the start and the end.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

LAYERS = (784, 256, 128, 10)
LR = 1e-3


# ------------------------------------------------------------------ in the worker

def _data(n, dtype, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.random((n, LAYERS[0]), dtype=np.float32).astype(dtype)
    y = rng.integers(0, LAYERS[-1], n).astype(np.int64)
    return x, y


class NumpyMLP:
    """The same training step in plain NumPy: relu MLP, softmax cross-entropy,
    Adam on one flat parameter buffer; every array allocated once."""

    def __init__(self, batch, dtype, seed=0):
        import numpy as np

        self.np = np
        rng = np.random.default_rng(seed)
        pairs = list(zip(LAYERS[:-1], LAYERS[1:]))
        n = sum(i * o + o for i, o in pairs)
        self.p = np.zeros(n, dtype)
        self.g = np.zeros(n, dtype)
        self.m, self.v, self.tmp = (np.zeros(n, dtype) for _ in range(3))
        self.w, self.b, self.dw, self.db = [], [], [], []
        off = 0
        for i, o in pairs:
            self.p[off:off + i * o] = rng.standard_normal(i * o) * math.sqrt(2 / i)
            for flat, ws, bs in ((self.p, self.w, self.b), (self.g, self.dw, self.db)):
                ws.append(flat[off:off + i * o].reshape(i, o))
                bs.append(flat[off + i * o:off + i * o + o])
            off += i * o + o
        self.a = [np.empty((batch, o), dtype) for _, o in pairs]
        self.d = [np.empty((batch, o), dtype) for _, o in pairs]
        self.mask = [np.empty((batch, o), bool) for _, o in pairs]
        self.rowmax = np.empty((batch, 1), dtype)
        self.rowsum = np.empty((batch, 1), dtype)
        self.rows = np.arange(batch)
        self.batch, self.t = batch, 0

    def step(self, x, y):
        np = self.np
        a, d, w, b = self.a, self.d, self.w, self.b
        inp = x
        last = len(w) - 1
        for k in range(len(w)):
            np.matmul(inp, w[k], out=a[k])
            a[k] += b[k]
            if k < last:
                np.maximum(a[k], 0, out=a[k])
            inp = a[k]
        z, g = a[-1], d[-1]
        np.max(z, axis=1, keepdims=True, out=self.rowmax)
        np.subtract(z, self.rowmax, out=g)
        picked = g[self.rows, y]
        np.exp(g, out=g)
        np.sum(g, axis=1, keepdims=True, out=self.rowsum)
        loss = float(np.mean(np.log(self.rowsum[:, 0]) - picked))
        g /= self.rowsum
        g[self.rows, y] -= 1
        g *= 1.0 / self.batch
        for k in range(last, -1, -1):
            below = x if k == 0 else a[k - 1]
            np.matmul(below.T, d[k], out=self.dw[k])
            np.sum(d[k], axis=0, out=self.db[k])
            if k > 0:
                np.matmul(d[k], w[k].T, out=d[k - 1])
                np.greater(a[k - 1], 0, out=self.mask[k - 1])
                d[k - 1] *= self.mask[k - 1]
        self.t += 1
        b1, b2, eps = 0.9, 0.999, 1e-8
        bc1, bc2 = 1 - b1 ** self.t, math.sqrt(1 - b2 ** self.t)
        m, v, tmp, gr = self.m, self.v, self.tmp, self.g
        m *= b1
        np.multiply(gr, 1 - b1, out=tmp)
        m += tmp
        v *= b2
        np.multiply(gr, gr, out=tmp)
        tmp *= 1 - b2
        v += tmp
        np.sqrt(v, out=tmp)
        tmp *= 1 / bc2
        tmp += eps
        np.divide(m, tmp, out=tmp)
        tmp *= LR / bc1
        self.p -= tmp
        return loss


def _epoch_fn(step, x, y, batch):
    starts = range(0, x.shape[0] - batch + 1, batch)

    def epoch():
        for s in starts:
            step(x[s:s + batch], y[s:s + batch])
    return epoch


def _gemm_epoch_fn(x, batch):
    """The GEMMs-only epoch (the ceiling): the one ``python -m fastnn bench`` times."""
    from fastnn._bench import gemm_ceiling_fn

    return gemm_ceiling_fn(x, batch, layers=LAYERS)


def _fastnn_model(backend, dtype):
    import fastnn as fn

    with fn.use_backend(backend):
        model = fn.Sequential([fn.Dense(LAYERS[1], "relu"), fn.Dense(LAYERS[2], "relu"),
                               fn.Dense(LAYERS[3])], input_dim=LAYERS[0], dtype=dtype, seed=0)
        model.compile("softmax_cross_entropy", fn.Adam(lr=LR))
    return model


def _fastnn_epoch_fn(backend, model, x, y, batch):
    import fastnn as fn

    def epoch():
        with fn.use_backend(backend):
            model.fit(x, y, epochs=1, batch_size=batch, shuffle=False, verbose=0)
    return epoch


def _interleaved(fns, repeats):
    """Median seconds of each zero-argument callable, sampled round robin."""
    import gc

    for f in fns.values():
        f()                      # warm up (numba compiles, buffers are made)
    samples = {k: [] for k in fns}
    gc.disable()
    try:
        for _ in range(repeats):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                samples[k].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return {k: statistics.median(v) for k, v in samples.items()}


def _profile(backend, x, y, batch, dtype, repeats):
    """Breakdown of a fastnn step: each backend kernel wrapped with timers during
    ``fit``, interleaved with the GEMMs-only loop; the fastest of ``repeats``
    epochs (the least disturbed by other load) is reported."""
    from fastnn import _backend
    from fastnn.kernels.reference import CONTRACT

    be = _backend.load(backend)
    totals = {}
    originals = {}
    for name in CONTRACT + ("count_correct",):
        original = getattr(be, name)
        originals[name] = original
        totals[name] = 0.0

        def timed(*args, _name=name, _f=original):
            t0 = time.perf_counter()
            r = _f(*args)
            totals[_name] += time.perf_counter() - t0
            return r

        setattr(be, name, timed)
    # what a timer pair costs around a call (subtracted from the overhead)
    probe = {"n": 0.0}

    def noop():
        return None

    def timed_noop():
        t0 = time.perf_counter()
        r = noop()
        probe["n"] += time.perf_counter() - t0
        return r

    t0 = time.perf_counter()
    for _ in range(10000):
        timed_noop()
    timer_cost = (time.perf_counter() - t0) / 10000 - probe["n"] / 10000
    gemm = _gemm_epoch_fn(x, batch)
    steps = x.shape[0] // batch
    best = None
    try:
        model = _fastnn_model(backend, dtype)   # its step closure captures the timed kernels
        epoch = _fastnn_epoch_fn(backend, model, x, y, batch)
        epoch()
        gemm()
        gemm_best = float("inf")
        for _ in range(repeats):
            for k in totals:
                totals[k] = 0.0
            t0 = time.perf_counter()
            epoch()
            wall = time.perf_counter() - t0
            if best is None or wall < best[0]:
                best = (wall, dict(totals))
            t0 = time.perf_counter()
            gemm()
            gemm_best = min(gemm_best, time.perf_counter() - t0)
    finally:
        for name, f in originals.items():
            setattr(be, name, f)
    wall, kernels = best
    calls_per_step = 3 * (len(LAYERS) - 1) + 1  # forward, backward, deltas-1, loss, adam, count
    return {"kernels": {k: v / steps for k, v in kernels.items() if v},
            "wrapped_step": wall / steps, "gemm_step": gemm_best / steps,
            "timer_cost": timer_cost * calls_per_step}


def worker(backend, batch, n, repeats, dtype, profile):
    import fastnn as fn

    x, y = _data(n, dtype)
    fns = {"numpy": _epoch_fn(NumpyMLP(batch, dtype).step, x, y, batch),
           "gemm": _gemm_epoch_fn(x, batch)}
    if backend != "numpy-only":
        model = _fastnn_model(backend, dtype)
        fns["fastnn"] = _fastnn_epoch_fn(backend, model, x, y, batch)
    times = _interleaved(fns, repeats)
    steps = n // batch
    out = {"backend": backend, "batch": batch, "threads": fn.get_num_threads(),
           "sps": {k: steps * batch / t for k, t in times.items()},
           "step_s": {k: t / steps for k, t in times.items()},
           "fallbacks": list(fn.backends()[backend].fallbacks) if backend in fn.backends()
           else []}
    if profile:
        out["profile"] = _profile(backend, x, y, batch, dtype, repeats)
    return out


TORCH_WORKER = r"""
import json, statistics, sys, time
cfg = json.loads(sys.argv[1])
import torch
torch.set_num_threads(cfg["threads"])
torch.manual_seed(0)
L = cfg["layers"]
dtype = getattr(torch, cfg["dtype"])
x = torch.rand(cfg["n"], L[0], dtype=dtype)
y = torch.randint(0, L[-1], (cfg["n"],))
b = cfg["batch"]
model = torch.nn.Sequential(torch.nn.Linear(L[0], L[1]), torch.nn.ReLU(),
                            torch.nn.Linear(L[1], L[2]), torch.nn.ReLU(),
                            torch.nn.Linear(L[2], L[3])).to(dtype)
opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], fused=True)
loss_fn = torch.nn.CrossEntropyLoss()
batches = [(x[s:s + b], y[s:s + b]) for s in range(0, cfg["n"] - b + 1, b)]
def epoch():
    for xb, yb in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(xb), yb).backward()
        opt.step()
epoch()
times = []
for _ in range(cfg["repeats"]):
    t0 = time.perf_counter(); epoch(); times.append(time.perf_counter() - t0)
t = statistics.median(times)
print("RESULT " + json.dumps({"sps": len(batches) * b / t, "version": torch.__version__,
                              "threads": torch.get_num_threads()}))
"""


# ------------------------------------------------------------------ the driver

def _run(cmd, timeout=900):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
    raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({proc.returncode}):\n{tail}")


def _torch_available():
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def _cpu_backends(names):
    import fastnn as fn

    info = fn.backends()
    out = []
    for name in names:
        if name not in info:
            sys.exit(f"unknown backend {name!r}")
        if info[name].available:
            out.append(name)
        else:
            print(f"# {name}: unavailable ({info[name].reason}); skipped")
    return out


def _loadavg():
    try:
        return "/".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "?"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="numpy,cython,numba")
    parser.add_argument("--batches", default="32,128")
    parser.add_argument("--n", type=int, default=3840, help="samples per epoch")
    parser.add_argument("--rounds", type=int, default=3,
                        help="process rounds, alternating contenders")
    parser.add_argument("--repeats", type=int, default=5, help="epochs per contender per round")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of every pool (fastnn.set_num_threads, torch); "
                             "default: all cores")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--profile", action="store_true", help="breakdown of one fastnn step")
    parser.add_argument("--worker", nargs=2, metavar=("BACKEND", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.threads is not None:
        import fastnn

        fastnn.set_num_threads(args.threads)
    if args.worker:
        res = worker(args.worker[0], int(args.worker[1]), args.n, args.repeats, args.dtype,
                     args.profile)
        print("RESULT " + json.dumps(res))
        return 0

    import fastnn as fn

    backends = _cpu_backends([b for b in args.backends.split(",") if b])
    batches = [int(b) for b in args.batches.split(",")]
    torch_ok = _torch_available() and not args.no_torch
    if not torch_ok and not args.no_torch:
        print("# PyTorch is not installed (`pip install torch==2.13.0`); skipped")
    threads = fn.get_num_threads()
    print(f"# fastnn {fn.__version__}, {args.dtype}, {'-'.join(map(str, LAYERS))} relu MLP, Adam; "
          f"{args.n} samples/epoch, {args.rounds} rounds x {args.repeats} epochs; "
          f"{threads} threads; load average at start {_loadavg()}")
    results = {}     # (batch, contender) -> list of samples/s
    same_process = {}  # (batch, backend) -> list of fastnn/numpy ratios
    profiles = {}
    torch_meta = None
    me = os.path.abspath(__file__)
    for r in range(args.rounds):
        for batch in batches:
            order = backends if r % 2 == 0 else backends[::-1]
            jobs = [("fastnn", b) for b in order]
            if torch_ok:
                jobs.insert(r % (len(jobs) + 1), ("torch", None))
            for kind, b in jobs:
                if kind == "torch":
                    cfg = {"layers": LAYERS, "n": args.n, "batch": batch, "lr": LR,
                           "repeats": args.repeats, "threads": threads, "dtype": args.dtype}
                    try:
                        res = _run([sys.executable, "-c", TORCH_WORKER, json.dumps(cfg)])
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        print(f"# pytorch failed: {exc}")
                        torch_ok = False
                        continue
                    torch_meta = res
                    results.setdefault((batch, "pytorch"), []).append(res["sps"])
                    continue
                cmd = [sys.executable, me, "--worker", b, str(batch), "--n", str(args.n),
                       "--repeats", str(args.repeats), "--dtype", args.dtype,
                       "--threads", str(threads)]
                if args.profile and r == 0:
                    cmd.append("--profile")
                res = _run(cmd)
                sps = res["sps"]
                results.setdefault((batch, f"fastnn[{b}]"), []).append(sps["fastnn"])
                results.setdefault((batch, "numpy"), []).append(sps["numpy"])
                results.setdefault((batch, "GEMMs only"), []).append(sps["gemm"])
                same_process.setdefault((batch, b), []).append(
                    (sps["fastnn"] / sps["numpy"], sps["fastnn"] / sps["gemm"]))
                if "profile" in res:
                    profiles[(batch, b)] = (res["profile"], res["step_s"])
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"# load average at the end {_loadavg()}")
    print()
    print(f"{'batch':>5}  {'contender':<16} {'samples/s':>10}  {'vs numpy':>8}  "
          f"{'vs torch':>8}  {'of GEMMs':>8}")
    for batch in batches:
        rows = [("numpy", None), *[(f"fastnn[{b}]", b) for b in backends],
                ("pytorch", None), ("GEMMs only", None)]
        for name, b in rows:
            if (batch, name) not in med:
                continue
            sps = med[(batch, name)]
            if b is not None:
                ratios = same_process[(batch, b)]
                vs_np = statistics.median(r[0] for r in ratios)
                of_gemm = statistics.median(r[1] for r in ratios)
            else:
                vs_np = sps / med[(batch, "numpy")]
                of_gemm = sps / med[(batch, "GEMMs only")]
            vs_t = sps / med[(batch, "pytorch")] if (batch, "pytorch") in med else float("nan")
            print(f"{batch:>5}  {name:<16} {sps:>10,.0f}  {vs_np:>7.2f}x  {vs_t:>7.2f}x  "
                  f"{of_gemm:>7.0%}")
    print()
    print("vs numpy: median of same-process ratios (fastnn rows); vs torch: ratio of the "
          "medians; of GEMMs: share of the GEMMs-only rate (the ceiling).")
    if torch_meta:
        print(f"pytorch {torch_meta['version']}, {torch_meta['threads']} threads, "
              f"Adam(fused=True), own process")
    for (batch, b), (prof, step_s) in sorted(profiles.items()):
        _print_profile(batch, b, prof, step_s)
    return 0


def _print_profile(batch, backend, prof, step_s):
    us = 1e6
    step = prof["wrapped_step"] - prof["timer_cost"]
    gemm = prof["gemm_step"]
    kernels = prof["kernels"]
    inside = sum(v for k, v in kernels.items() if k != "count_correct")
    acc = kernels.get("count_correct", 0.0)
    rest = step - inside - acc
    print()
    print(f"profile of one fastnn step, batch {batch}, backend {backend}: {step * us:.0f} us "
          f"(fastest epoch with kernel timers, {prof['timer_cost'] * us:.1f} us of timers "
          f"removed; median step without timers {step_s['fastnn'] * us:.0f} us)")
    for label, v, note in (
            ("GEMMs (the GEMMs-only loop)", gemm, ""),
            ("our kernels beyond the GEMMs", inside - gemm, "   (bias, activations, "
                                                             "reductions, loss, Adam)"),
            ("accuracy count (count_correct)", acc, ""),
            ("Python / model overhead", rest, "")):
        print(f"  {label:<34} {v * us:8.1f} us  {v / step:6.1%}{note}")
    print("  time inside each kernel per step (GEMMs included):")
    for k, v in sorted(kernels.items(), key=lambda kv: -kv[1]):
        print(f"    {k:<28} {v * us:8.1f} us")


if __name__ == "__main__":
    sys.exit(main())
