"""Data-parallel training (fastnn.distributed) against one process, on one machine.

For the 784-256-128-10 ReLU MLP and Keras' MNIST convnet (float32, Adam,
global batch 128 by default, the bundled MNIST subset cut to whole batches):

* ``1 process x T threads``: plain ``fit`` (T = the ranks' threads together);
* ``1 process x 1 thread``: the compute rate of one core (for the cost model);
* ``N ranks x 1 thread``, once per gradient reduction (``buffer``: one
  blocking ``Allreduce`` of the flat buffer per step; ``layers``: a
  non-blocking ``Iallreduce`` per layer as the backward pass writes it).

Samples/s are the median over the epochs after the first (plan checks and
first-touch costs fall in the first), wall clock, gathering included. The
time of one gradient reduction is measured on its own after training: the
median of 200 reductions of the model's gradient buffer (after a barrier,
all ranks together), next to the step time ``batch / samples_per_s``.
Every configuration runs in its own process(es), the configurations
alternate, ``--repeats`` rounds, medians reported.

    python benchmarks/distributed_bench.py                  # both models, 2 ranks, 3 rounds
    python benchmarks/distributed_bench.py --models mlp --batch 32 --ranks 2 --repeats 5

On a shared machine the figures move with the load: the report prints the
load average at the start and the end. Needs the ``mpi`` extra.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("mlp", "convnet")


# ------------------------------------------------------------------ in the worker

def _model(name, fn):
    if name == "mlp":
        layers = [fn.Dense(256, "relu"), fn.Dense(128, "relu"), fn.Dense(10)]
        m = fn.Sequential(layers, input_dim=784, seed=0)
        m.compile("softmax_cross_entropy", fn.Adam(1e-3))
    else:
        layers = [fn.Conv2D(32, 3, "relu"), fn.MaxPool2D(2), fn.Conv2D(64, 3, "relu"),
                  fn.MaxPool2D(2), fn.Flatten(), fn.Dropout(0.5), fn.Dense(10, "softmax")]
        m = fn.Sequential(layers, input_shape=(28, 28, 1), seed=0)
        m.compile("sparse_categorical_crossentropy", fn.Adam(1e-3))
    return m


def _time_reductions(comm, grads, model, calls=200):
    """Median seconds of one reduction of ``grads``, both ways."""
    import math

    from mpi4py import MPI

    mpi_type = MPI.FLOAT if grads.dtype.itemsize == 4 else MPI.DOUBLE
    spans, off = [], 0
    for layer in model.layers:
        size = sum(math.prod(s) for s in layer.param_shapes())
        if size:
            spans.append((off, off + size))
        off += size
    bufs = [[grads[lo:hi], mpi_type] for lo, hi in reversed(spans)]
    out = {}
    for mode in ("buffer", "layers"):
        times = []
        for _ in range(calls):
            comm.Barrier()
            t = time.perf_counter()
            if mode == "buffer":
                comm.Allreduce(MPI.IN_PLACE, [grads, mpi_type], MPI.SUM)
            else:
                MPI.Request.Waitall([comm.Iallreduce(MPI.IN_PLACE, b, MPI.SUM) for b in bufs])
            times.append(time.perf_counter() - t)
        out[mode] = statistics.median(times)
    return out


def worker(args):
    import fastnn as fn

    rank, size = 0, 1
    if args.distributed:
        rank, size = fn.distributed.init(threads=args.threads, reduce=args.reduce)
    else:
        fn.set_num_threads(args.threads)
    shape = "flat" if args.model == "mlp" else "image"
    (x, y), _ = fn.datasets.load_mnist_small(shape=shape)
    n = (x.shape[0] // args.batch) * args.batch
    x, y = x[:n], y[:n]
    model = _model(args.model, fn)
    h = model.fit(x, y, epochs=args.epochs, batch_size=args.batch, verbose=0, seed=1)
    rates = h.history["samples_per_s"][1:] or h.history["samples_per_s"]
    steps = h.history["step_samples_per_s"][1:] or h.history["step_samples_per_s"]
    result = {"model": args.model, "ranks": size, "threads": fn.get_num_threads(),
              "reduce": args.reduce if args.distributed else None, "batch": args.batch,
              "params": int(model.param_count), "samples_per_s": statistics.median(rates),
              "step_samples_per_s": statistics.median(steps),
              "backend": fn.get_backend()}
    if args.distributed:
        result["reduction_s"] = _time_reductions(fn.distributed.communicator(), model.grads,
                                                 model)
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------ the driver

def _mpiexec():
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        return str(here)
    import shutil

    return shutil.which("mpiexec") or "mpiexec"


def _run(cmd, timeout):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")


def _configs(args, model):
    me = [sys.executable, os.path.abspath(__file__), "--worker", "--model", model,
          "--batch", str(args.batch), "--epochs", str(args.epochs)]
    yield ("1 process", args.ranks), me + ["--threads", str(args.ranks)]
    yield ("1 process", 1), me + ["--threads", "1"]
    for reduce in ("buffer", "layers"):
        yield ((f"{args.ranks} ranks, {reduce}", 1),
               [_mpiexec(), "-n", str(args.ranks)] + me + ["--threads", "1", "--distributed",
                                                           "--reduce", reduce])


def _load():
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the raw results here")
    # the worker's options
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="mlp", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--distributed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--reduce", default="buffer", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    print(f"distributed_bench: batch {args.batch} (global), {args.ranks} ranks, "
          f"{args.repeats} rounds; start {_load()}", flush=True)
    results = {}
    for _ in range(args.repeats):
        for model in args.models.split(","):
            for key, cmd in _configs(args, model):
                r = _run(cmd, timeout=1800)
                results.setdefault((model,) + key, []).append(r)
                print(f"  {model:8s} {key[0]:>18s} x {key[1]} thread(s): "
                      f"{r['samples_per_s']:9,.0f} samples/s", flush=True)
    print(f"end {_load()}\n")
    print(f"{'model':8s} {'configuration':>24s} {'samples/s':>10s} {'vs 1 process':>12s} "
          f"{'step ms':>8s} {'reduction ms':>13s}")
    for model in args.models.split(","):
        base = statistics.median(r["samples_per_s"]
                                 for r in results[(model, "1 process", args.ranks)])
        for key in [k for k in results if k[0] == model]:
            rs = results[key]
            rate = statistics.median(r["samples_per_s"] for r in rs)
            step_ms = 1e3 * args.batch / rate
            red = ""
            if "reduction_s" in rs[0]:
                mode = key[1].split(", ")[1]
                red = f"{1e3 * statistics.median(r['reduction_s'][mode] for r in rs):.3f}"
            label = f"{key[1]} x {key[2]} thr"
            print(f"{model:8s} {label:>24s} {rate:10,.0f} {rate / base:12.2f} {step_ms:8.2f} "
                  f"{red:>13s}")
        print(f"{model:8s} params {results[(model, '1 process', 1)][0]['params']:,}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"key": list(k), "runs": v} for k, v in results.items()], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
