"""Speed of the Cython backend's per-CPU variants (baseline x86-64, x86-64-v3,
x86-64-v4) against the NumPy baseline, in one process, rounds interleaved so
that a busy machine slows every variant alike.

    python benchmarks/cpu_variants.py                 # all cores
    python benchmarks/cpu_variants.py --threads 1 --rounds 15

Cases: Adam over 10 M float32 (memory-bound) and over 235 k (in cache),
dense_forward 128x784x256 (relu: GEMM-bound; gelu: epilogue), sigmoid over
1 M float32. Prints the best and the median time of each, and the speed-up of
the best time over NumPy's.
"""

import argparse
import importlib
import importlib.machinery
import importlib.util
import os
import time

import numpy as np

import fastnn
from fastnn.kernels import cython_cpu
from fastnn.kernels import reference as ref


def _variant_modules(variant):
    suffix = "" if variant == "baseline" else f"_{variant}"
    if variant == "baseline" and cython_cpu.CPU_VARIANT != "baseline":
        # fastnn.kernels._cy_* names the chosen variant: load the baseline's files
        mods = {}
        for n in ("_cy_optim", "_cy_dense", "_cy_elementwise"):
            for ext in importlib.machinery.EXTENSION_SUFFIXES:
                path = os.path.join(os.path.dirname(cython_cpu.__file__), n + ext)
                if os.path.exists(path):
                    spec = importlib.util.spec_from_file_location(f"fastnn.kernels.{n}", path)
                    mods[n] = importlib.util.module_from_spec(spec)
                    spec.loader.exec_module(mods[n])
                    break
        return mods
    return {n: importlib.import_module(f"fastnn.kernels.{n}{suffix}")
            for n in ("_cy_optim", "_cy_dense", "_cy_elementwise")}


def _time(fn, number):
    t = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t) / number


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="default: all cores")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args(argv)
    if args.threads:
        fastnn.set_num_threads(args.threads)
    threads = fastnn.get_num_threads()
    variants = [v for v in cython_cpu.VARIANTS
                if v in cython_cpu.cpu_levels() and v in cython_cpu.built_variants()]
    rng = np.random.default_rng(0)
    big, small = 10_000_000, 235_146
    adam_big = [rng.standard_normal(big).astype(np.float32) for _ in range(2)] + \
        [np.zeros(big, np.float32), np.zeros(big, np.float32)]
    adam_small = [rng.standard_normal(small).astype(np.float32) for _ in range(2)] + \
        [np.zeros(small, np.float32), np.zeros(small, np.float32)]
    x = rng.standard_normal((128, 784)).astype(np.float32)
    w = (rng.standard_normal((784, 256)) * 0.05).astype(np.float32)
    b = rng.standard_normal(256).astype(np.float32)
    out = np.empty((128, 256), np.float32)
    z = (rng.standard_normal(1_000_000) * 4).astype(np.float32)
    y = np.empty_like(z)

    def cases(k_opt, k_dense, k_ew):
        def adam(arrs):
            p, g, m, v = arrs
            return lambda: k_opt.adam_step(p, g, m, v, 1, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, 0.0, None)
        return {
            "adam 10M f32": (adam(adam_big), 3),
            "adam 235k f32": (adam(adam_small), 50),
            "dense_forward 128x784x256 relu": (lambda: k_dense.dense_forward(x, w, b, "relu", out), 30),
            "dense_forward 128x784x256 gelu": (lambda: k_dense.dense_forward(x, w, b, "gelu", out), 30),
            "sigmoid 1M f32": (lambda: k_ew.activation_forward("sigmoid", z, y), 20),
        }

    contenders = {"numpy": cases(ref, ref, ref)}
    for v in variants:
        mods = _variant_modules(v)
        for mod in mods.values():
            mod.set_num_threads(threads)
        contenders[v] = cases(mods["_cy_optim"], mods["_cy_dense"], mods["_cy_elementwise"])
    times = {c: {k: [] for k in cs} for c, cs in contenders.items()}
    for _ in range(args.rounds):
        for c, cs in contenders.items():
            for k, (fn, number) in cs.items():
                fn()
                times[c][k].append(_time(fn, number))
    print(f"threads={threads}, rounds={args.rounds}, chosen variant: {cython_cpu.CPU_VARIANT}; "
          f"ms best / median (speed-up of the best over NumPy's best)")
    width = max(len(k) for k in times["numpy"])
    print(" " * width + "".join(f"{c:>26s}" for c in contenders))
    for k in times["numpy"]:
        base = min(times["numpy"][k])
        row = ""
        for c in contenders:
            best, med = min(times[c][k]), float(np.median(times[c][k]))
            row += f"{best * 1e3:9.3f} /{med * 1e3:8.3f} ({base / best:4.1f}x)"
        print(f"{k:{width}s}{row}")


if __name__ == "__main__":
    main()
