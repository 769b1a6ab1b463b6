"""gather_rows: reference vs cython vs numba vs a plain memcpy of the same bytes,
and the parallel threshold (issue 17).

    python benchmarks/gather_rows.py            # the speed table
    python benchmarks/gather_rows.py --threshold  # serial vs 2 threads by size

Batches of ``k`` rows of 784 features are gathered from a 100,000-row array
(314 MB in float32), in the order of one permutation walked batch by batch, as
``fit`` reads a shuffled epoch: every row comes from memory, not from cache.
"memcpy" copies the same number of bytes from one contiguous block that stays
in cache: the floor of a gather with no misses. Times are the 20th and 50th
percentile of 400 calls, in microseconds, on one thread unless said; the
load average is printed with them (a shared machine's figures are provisional).
"""

import argparse
import os
import time

import numpy as np

import fastnn
from fastnn import _bench
from fastnn.kernels import reference

N, M = 100_000, 784


def _walk(perm, k):
    pos = [0]

    def nxt():
        p = pos[0]
        if p + k > perm.size:
            p = 0
        pos[0] = p + k
        return perm[p:p + k]
    return nxt


def _time(fn, nxt, reps=400, before=None):
    ts = []
    for _ in range(reps):
        if before is not None:
            before()
        idx = nxt()
        t = time.perf_counter()
        fn(idx)
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 5] * 1e6, ts[len(ts) // 2] * 1e6


def _sources(rng):
    return {"float32": rng.standard_normal((N, M), dtype=np.float32),
            "uint8": rng.integers(0, 256, (N, M), dtype=np.uint8)}


def table(rng, backends):
    srcs = _sources(rng)
    perm = rng.permutation(N)
    fastnn.set_num_threads(1)
    kernels = {"reference": reference.gather_rows}
    for name in backends:
        kernels[name] = fastnn._backend.load(name).gather_rows
    print(f"{_bench.machine_line()}\nload average before: {os.getloadavg()}")
    print("rows  source   " + "".join(f"{k:>22}" for k in kernels) + f"{'memcpy':>22}")
    for k in (128, 32):
        out = np.empty((k, M), np.float32)
        for sname, src in srcs.items():
            flat = np.ascontiguousarray(src[:k])
            same = np.empty_like(flat)
            cells = []
            for kname, fn in kernels.items():
                fn(src, perm[:k], out)   # compile / warm up
                p20, p50 = _time(lambda idx, fn=fn: fn(src, idx, out), _walk(perm, k))
                cells.append(f"{p20:8.1f} ({p50:6.1f}) us")
            p20, p50 = _time(lambda idx: np.copyto(same, flat), _walk(perm, k))
            cells.append(f"{p20:8.1f} ({p50:6.1f}) us")
            print(f"{k:4d}  {sname:7s}  " + "".join(f"{c:>22}" for c in cells))
    print(f"load average after: {os.getloadavg()}")


def threshold(rng):
    """Cython's gather on 1 and 2 threads by bytes moved, back to back and right
    after a 256x256 SGEMM (as in a training step, where the OpenMP worker sleeps)."""
    from fastnn.kernels import cython_cpu

    mod = cython_cpu._cy_data
    srcs = _sources(rng)
    perm = rng.permutation(N)
    a = np.ones((256, 256), np.float32)
    gemm = lambda: a @ a   # noqa: E731
    old = mod._set_parallel_min(0)
    print(f"{_bench.machine_line()}\nload average before: {os.getloadavg()}")
    print("source   rows   bytes moved   1 thread: b2b / after GEMM   2 threads: b2b / after GEMM")
    try:
        for sname, src in srcs.items():
            for k in (32, 64, 128, 256, 512, 1024, 2048, 4096):
                out = np.empty((k, M), np.float32)
                cells = []
                for threads in (1, 2):
                    mod.set_num_threads(threads)
                    fn = lambda idx: mod.gather_rows(src, idx, out)   # noqa: E731
                    cells += [_time(fn, _walk(perm, k), 200)[0],
                              _time(fn, _walk(perm, k), 200, before=gemm)[0]]
                moved = k * M * (src.itemsize + 4)
                print(f"{sname:7s} {k:5d} {moved:12d}   {cells[0]:9.1f} / {cells[1]:9.1f}"
                      f"        {cells[2]:9.1f} / {cells[3]:9.1f}")
    finally:
        mod._set_parallel_min(old)
        mod.set_num_threads(fastnn.get_num_threads())
    print(f"load average after: {os.getloadavg()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threshold", action="store_true")
    parser.add_argument("--backends", default="cython,numba")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    if args.threshold:
        threshold(rng)
    else:
        available = [b for b in args.backends.split(",") if fastnn.backends()[b].available]
        table(rng, available)


if __name__ == "__main__":
    main()
