"""Convolution, pooling and dropout on the cython backend (issue 16): each
kernel at Keras' MNIST convnet's shapes against its GEMM alone and against
the NumPy reference, and whole training steps of the two networks against
the numpy backend and PyTorch.

    python benchmarks/conv_bench.py                   # kernels and training, batches 32 and 128
    python benchmarks/conv_bench.py --only kernels    # or: training
    python benchmarks/conv_bench.py --quick           # fewer repeats
    python benchmarks/conv_bench.py --threads 2 --batches 32,128 --samples 2048

Every figure is a ratio measured in the same run, float32, on ``--threads``
threads (default: all cores): round robin over the callables, the minimum of
the repeats (a machine shared with other jobs slows some repeats, never
speeds one up). The baselines:

* a kernel's GEMM alone: the bare BLAS GEMM of the same ``M, N, K`` as its
  im2col formulation (``conv2d_forward``: ``(batch*p*q, kh*kw*c) @ (kh*kw*c, o)``;
  ``conv2d_backward``: its transpose product into ``dw``; ``conv2d_backprop``:
  ``dz @ w.T``) through the same BLAS on the same threads
  (``_cy_dense._gemm``), on arrays that exist already (no im2col counted);
* the NumPy reference (kernels/reference.py) for every kernel;
* training: ``fastnn.Sequential.fit`` (one epoch, no shuffle, Adam 1e-3) on
  the cython and the numpy backends, and PyTorch in its own process (NCHW,
  ``Adam(fused=True)``, the same layers, ``torch.set_num_threads``), on the
  bundled MNIST images.

The functions are importable (``kernel_rows``, ``training_rows``,
``torch_training``) for a goals script. It reports and never fails.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import fastnn
from fastnn.kernels import reference as ref

F32 = np.float32

#: The two networks: seed 003's and Keras' "simple MNIST convnet".
NETWORKS = ("cnn", "convnet")


def _min_times(fns, repeats=7, min_time=0.05):
    """Seconds per call of each callable: round robin, each repeat at least
    ``min_time`` long, the minimum over the repeats."""
    best = {name: float("inf") for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            fn()            # the call after another callable's is not timed
            n, t0 = 0, time.perf_counter()
            while True:
                fn()
                n += 1
                t = time.perf_counter() - t0
                if t >= min_time:
                    break
            best[name] = min(best[name], t / n)
    return best


def load_average():
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


# ------------------------------------------------------------------ kernels

def kernel_cases(batch, seed=0):
    """``{name: (cython call, reference call, GEMM-alone call or None)}`` at the
    convnet's shapes for one batch size (float32, relu where there is an
    activation)."""
    from fastnn.kernels import _cy_dense
    from fastnn.kernels import cython_cpu as cy

    rng = np.random.default_rng(seed)
    gemm = _cy_dense._gemm
    B = batch
    x1 = rng.random((B, 28, 28, 1), dtype=F32)
    w1 = (rng.standard_normal((3, 3, 1, 32)) * 0.3).astype(F32)
    b1 = np.zeros(32, F32)
    y1, d1 = np.empty((B, 26, 26, 32), F32), rng.standard_normal((B, 26, 26, 32)).astype(F32)
    x2 = rng.random((B, 13, 13, 32), dtype=F32)
    w2 = (rng.standard_normal((3, 3, 32, 64)) * 0.06).astype(F32)
    b2 = np.zeros(64, F32)
    y2, d2 = np.empty((B, 11, 11, 64), F32), rng.standard_normal((B, 11, 11, 64)).astype(F32)
    dw1, db1, dw2, db2 = np.empty_like(w1), np.empty_like(b1), np.empty_like(w2), np.empty_like(b2)
    dx2 = np.empty_like(x2)
    p1, a1 = np.empty((B, 13, 13, 32), F32), np.empty((B, 13, 13, 32), np.int32)
    p2, a2 = np.empty((B, 5, 5, 64), F32), np.empty((B, 5, 5, 64), np.int32)
    ref.maxpool2d_forward(d1, p1, a1, (2, 2))
    ref.maxpool2d_forward(d2, p2, a2, (2, 2))
    g1, g2 = np.empty_like(d1), np.empty_like(d2)
    flat = rng.standard_normal((B, 1600)).astype(F32)
    dropped = np.empty_like(flat)
    # the im2col GEMMs: A (M, K), W (K, N), C (M, N)
    c1, c2 = rng.random((B * 676, 9), dtype=F32), rng.random((B * 121, 288), dtype=F32)
    o1, o2 = np.empty((B * 676, 32), F32), np.empty((B * 121, 64), F32)
    W1, W2 = w1.reshape(9, 32).copy(), w2.reshape(288, 64).copy()
    gw1, gw2 = np.empty_like(W1), np.empty_like(W2)
    a_cols2 = np.empty((B * 121, 288), F32)
    cases = {}

    def case(name, call, gemm_call=None):
        cases[name] = (lambda: call(cy), lambda: call(ref), gemm_call)

    case("conv2d_forward conv1 (relu)",
         lambda k: k.conv2d_forward(x1, w1, b1, "relu", y1, None, (1, 1), (0, 0, 0, 0)),
         lambda: gemm(c1, W1, o1))
    case("conv2d_forward conv2 (relu)",
         lambda k: k.conv2d_forward(x2, w2, b2, "relu", y2, None, (1, 1), (0, 0, 0, 0)),
         lambda: gemm(c2, W2, o2))
    case("conv2d_backward conv1",
         lambda k: k.conv2d_backward(x1, d1, dw1, db1, (1, 1), (0, 0, 0, 0)),
         lambda: gemm(c1, o1, gw1, trans_a=True))
    case("conv2d_backward conv2",
         lambda k: k.conv2d_backward(x2, d2, dw2, db2, (1, 1), (0, 0, 0, 0)),
         lambda: gemm(c2, o2, gw2, trans_a=True))
    case("conv2d_backprop conv2 (identity below)",
         lambda k: k.conv2d_backprop(d2, w2, None, x2, "identity", dx2, (1, 1), (0, 0, 0, 0)),
         lambda: gemm(o2, W2, a_cols2, trans_b=True))
    case("maxpool2d_forward pool1",
         lambda k: k.maxpool2d_forward(d1, p1, a1, (2, 2), None))
    case("maxpool2d_forward pool2",
         lambda k: k.maxpool2d_forward(d2, p2, a2, (2, 2), None))
    case("maxpool2d_backward pool1 (relu below)",
         lambda k: k.maxpool2d_backward(p1, a1, None, d1, "relu", g1, (2, 2), None))
    case("maxpool2d_backward pool2 (relu below)",
         lambda k: k.maxpool2d_backward(p2, a2, None, d2, "relu", g2, (2, 2), None))
    case("dropout_forward (batch, 1600)",
         lambda k: k.dropout_forward(flat, 0.5, 12345, dropped))
    case("dropout_backward in place",
         lambda k: k.dropout_backward(dropped, 0.5, 12345, dropped))
    return cases


def kernel_rows(batches=(32, 128), repeats=7):
    """``[{kernel, batch, cython_s, reference_s, gemm_s}]``: every kernel at the
    convnet's shapes, on the current thread count."""
    rows = []
    for batch in batches:
        for name, (cy_call, ref_call, gemm_call) in kernel_cases(batch).items():
            fns = {"cython": cy_call, "reference": ref_call}
            if gemm_call is not None:
                fns["gemm"] = gemm_call
            t = _min_times(fns, repeats=repeats)
            rows.append({"kernel": name, "batch": batch, "cython_s": t["cython"],
                         "reference_s": t["reference"], "gemm_s": t.get("gemm")})
    return rows


def print_kernel_rows(rows, file=sys.stdout):
    print(f"{'kernel':42s} {'batch':>5s} {'cython':>10s} {'GEMM alone':>10s} "
          f"{'/GEMM':>6s} {'reference':>10s} {'x ref':>7s}", file=file)
    for r in rows:
        gemm = f"{r['gemm_s'] * 1e3:8.3f}ms" if r["gemm_s"] else f"{'':10s}"
        over = f"{r['cython_s'] / r['gemm_s']:6.2f}" if r["gemm_s"] else f"{'':6s}"
        print(f"{r['kernel']:42s} {r['batch']:5d} {r['cython_s'] * 1e3:8.3f}ms {gemm} {over} "
              f"{r['reference_s'] * 1e3:8.3f}ms {r['reference_s'] / r['cython_s']:6.1f}x",
              file=file)


# ------------------------------------------------------------------ training

def mnist_images(n):
    """``(x, y)``: the first ``n`` training images of the bundled MNIST,
    ``(n, 28, 28, 1)`` float32 in [0, 1], and their labels."""
    (x, y), _ = fastnn.datasets.load_mnist_small()
    reps = -(-n // len(x))
    x = np.concatenate([x] * reps)[:n].reshape(-1, 28, 28, 1).astype(F32)
    y = np.concatenate([y] * reps)[:n]
    return np.ascontiguousarray(x), y


def fastnn_model(network, seed=0):
    layers = [fastnn.Conv2D(32, (3, 3), activation="relu", input_shape=(28, 28, 1))]
    if network == "convnet":
        layers += [fastnn.MaxPool2D(2), fastnn.Conv2D(64, 3, activation="relu"),
                   fastnn.MaxPool2D(2), fastnn.Flatten(), fastnn.Dropout(0.5)]
    else:
        layers += [fastnn.Flatten()]
    layers.append(fastnn.Dense(10, activation="softmax"))
    model = fastnn.Sequential(layers, seed=seed)
    model.compile(optimizer=fastnn.Adam(lr=1e-3), loss="sparse_categorical_crossentropy")
    return model


def fastnn_epoch_fn(backend, network, x, y, batch):
    """A zero-argument callable: one ``fit`` epoch on ``backend``."""
    with fastnn.use_backend(backend):
        model = fastnn_model(network)

    def epoch():
        with fastnn.use_backend(backend):
            model.fit(x, y, epochs=1, batch_size=batch, shuffle=False, verbose=0)
    return epoch


TORCH_CONV_SCRIPT = r"""
import json, sys, time
import numpy as np
cfg = json.loads(sys.argv[1])
import torch
torch.manual_seed(0)
torch.set_num_threads(cfg["threads"])
data = np.load(cfg["data"])
x = torch.from_numpy(np.ascontiguousarray(data["x"].transpose(0, 3, 1, 2)))
y = torch.from_numpy(data["y"].astype(np.int64))
out = {"version": torch.__version__, "threads": torch.get_num_threads(), "epoch_s": {}}
for network in cfg["networks"]:
    for batch in cfg["batches"]:
        if network == "convnet":
            mods = [torch.nn.Conv2d(1, 32, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                    torch.nn.Conv2d(32, 64, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                    torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(1600, 10)]
        else:
            mods = [torch.nn.Conv2d(1, 32, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                    torch.nn.Linear(26 * 26 * 32, 10)]
        model = torch.nn.Sequential(*mods)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        loss_fn = torch.nn.CrossEntropyLoss()
        n = x.shape[0]
        batches = [(x[s:s + batch], y[s:s + batch]) for s in range(0, n - batch + 1, batch)]
        def epoch():
            for xb, yb in batches:
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                loss.backward()
                opt.step()
        epoch()
        times = []
        for _ in range(cfg["repeats"]):
            t0 = time.perf_counter()
            epoch()
            times.append(time.perf_counter() - t0)
        out["epoch_s"][f"{network} {batch}"] = times
print("RESULT " + json.dumps(out))
"""


def torch_training(networks, batches, x, y, repeats, threads, timeout=900):
    """``{(network, batch): seconds per epoch (minimum)}`` of PyTorch in its own
    process (it never imports fastnn, whose ``GOMP_SPINCOUNT`` would reach
    PyTorch's OpenMP), and its version; ``None`` and the reason when PyTorch is
    missing or fails."""
    try:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            return None, "PyTorch is not installed"
    except ImportError:
        return None, "PyTorch is not installed"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.npz")
        np.savez(path, x=x, y=y)
        cfg = {"networks": list(networks), "batches": list(batches), "repeats": repeats,
               "threads": threads, "data": path}
        env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT",)}
        proc = subprocess.run([sys.executable, "-c", TORCH_CONV_SCRIPT, json.dumps(cfg)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            times = {tuple(k.split()): min(v) for k, v in res["epoch_s"].items()}
            return {(net, int(b)): t for (net, b), t in times.items()}, f"PyTorch {res['version']}"
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    return None, f"PyTorch failed (exit {proc.returncode}): {tail}"


def training_rows(networks=NETWORKS, batches=(32, 128), samples=2048, repeats=5, torch=True):
    """``[{network, batch, cython, numpy, torch}]`` in samples/s (``torch`` None
    when PyTorch is unavailable), and a note on PyTorch."""
    x, y = mnist_images(samples)
    threads = fastnn.get_num_threads()
    peer, note = (torch_training(networks, batches, x, y, repeats, threads) if torch
                  else (None, "PyTorch not asked for"))
    rows = []
    for network in networks:
        for batch in batches:
            fns = {b: fastnn_epoch_fn(b, network, x, y, batch) for b in ("cython", "numpy")}
            t = _min_times(fns, repeats=repeats, min_time=0)
            rows.append({"network": network, "batch": batch,
                         "cython": samples / t["cython"], "numpy": samples / t["numpy"],
                         "torch": samples / peer[(network, batch)] if peer else None})
    return rows, note


def print_training_rows(rows, note, file=sys.stdout):
    print(f"{'network':8s} {'batch':>5s} {'cython':>9s} {'numpy':>9s} {'PyTorch':>9s} "
          f"{'x numpy':>8s} {'x PyTorch':>9s}   (samples/s; {note})", file=file)
    for r in rows:
        torch_s = f"{r['torch']:9.0f}" if r["torch"] else f"{'-':>9s}"
        over = f"{r['cython'] / r['torch']:9.2f}" if r["torch"] else f"{'-':>9s}"
        print(f"{r['network']:8s} {r['batch']:5d} {r['cython']:9.0f} {r['numpy']:9.0f} "
              f"{torch_s} {r['cython'] / r['numpy']:8.2f} {over}", file=file)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("kernels", "training"))
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batches", default="32,128")
    ap.add_argument("--samples", type=int, default=2048, help="training samples per epoch")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        fastnn.set_num_threads(args.threads)
    batches = tuple(int(b) for b in args.batches.split(","))
    repeats = 3 if args.quick else 7
    info = fastnn.backends()["cython"]
    if not info.available:
        print(f"the cython backend is unavailable: {info.reason}")
        return 0
    from fastnn.kernels import cython_cpu as cy

    load = load_average()
    print(f"fastnn {fastnn.__version__}, cython ({cy.CPU_VARIANT}, BLAS {cy.blas()}), "
          f"{fastnn.get_num_threads()} threads, load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f} (provisional on a shared machine)")
    if args.only in (None, "kernels"):
        with fastnn.use_backend("cython"):
            print_kernel_rows(kernel_rows(batches, repeats))
        print()
    if args.only in (None, "training"):
        rows, note = training_rows(batches=batches, samples=args.samples,
                                   repeats=3 if args.quick else 5, torch=not args.no_torch)
        print_training_rows(rows, note)
    load = load_average()
    print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
