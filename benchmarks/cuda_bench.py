"""GPU benchmark of the cuda backend: ``python benchmarks/cuda_bench.py``.

Three measurements on one GPU, in one run (issue 8's goals in brackets):

1. Fused Adam over 10 M float32 parameters as a fraction of the GPU's memory
   bandwidth [>= 80 %]. Adam moves 7 arrays' worth of bytes (reads p, g, m, v;
   writes p, m, v): bytes / time is its bandwidth. The peak is a device-to-
   device copy (``cuMemcpyDtoD``: one read and one write per byte); a plain
   numba streaming kernel with Adam's 4 reads and 3 writes is DESIGN.md's
   floor, measured too.
2. ``dense_forward`` (GEMM + bias + relu) against bare cuBLAS (CuPy's
   ``matmul`` into a preallocated output) at 128x784x256 and 1024x1024x1024
   [<= 1.1x], float32; per call, back to back, synchronised at the end, so a
   host-bound small call counts its launch overheads as a training step does.
   The numba tiled GEMM (the fallback without CuPy) is shown for information.
3. A whole MNIST training epoch (784-256-128-10 relu MLP, Adam 1e-3, batch 128,
   float32, shuffled) with fastnn's ``Sequential`` on the cuda backend against
   PyTorch CUDA (when installed) in the same run, with the test accuracy of
   each after the epoch. Full MNIST when ``fastnn.datasets.load_mnist`` finds
   it on disk (no download is tried); else the bundled 4000-sample subset,
   repeated to MNIST's 60000 samples.
4. The seven kernels of the convolutional layers (issue 16) at Keras' MNIST
   convnet shapes (``fastnn._bench.CONV_SHAPES``, ``POOL_SHAPES``,
   ``DROPOUT_SHAPES``; batch 128), float32, device arrays: each convolution
   kernel against its GEMM alone (the same M, N, K through the same engine,
   cuBLAS or the tiled kernel, no epilogue), with one call checked against
   the NumPy reference; pooling and dropout as bandwidth against the copy peak
   of 1.
5. A whole MNIST epoch of Keras' "simple MNIST convnet" (Conv2D 32 relu,
   MaxPool 2, Conv2D 64 relu, MaxPool 2, Flatten, Dropout 0.5, Dense 10
   softmax; Adam 1e-3, batch 128, float32) with fastnn's ``Sequential`` on the
   cuda backend against the same network in PyTorch CUDA (NCHW, cuDNN), when
   installed, in the same run.

Options: ``--quick`` (fewer repeats), ``--json PATH`` (write the figures),
``--skip-mnist``, ``--skip-conv``, ``--skip-convnet``, ``--batch`` (the MLP's),
``--conv-batch`` (4 and 5). Without a usable GPU it exits with status 2 and
says why (the CUDA simulator does not count: it is for tests only).
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

GOAL_ADAM_FRACTION = 0.80
GOAL_DENSE_RATIO = 1.10
GEMM_SHAPES = ((128, 784, 256), (1024, 1024, 1024))
ADAM_N = 10_000_000
LAYERS = (784, 256, 128, 10)   # the MNIST MLP
COPY_N = 64 * 1024 * 1024   # float32 elements of the copy that measures the peak (256 MiB)


def fail(message):
    print(f"cuda_bench: {message}", file=sys.stderr)
    sys.exit(2)


def gpu_or_exit():
    """The cuda backend module and numba.cuda, or exit(2) saying why not."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        fail("NUMBA_ENABLE_CUDASIM is set: the CUDA simulator runs kernels as Python "
             "threads, for tests only; unset it and run on a machine with an NVIDIA GPU")
    try:
        from fastnn.kernels import cuda as backend
    except ImportError as exc:
        fail(f"fastnn is not importable ({exc}); install it: pip install -e '.[cuda]'")
    ok, reason = backend.available()
    if not ok:
        fail(f"no CUDA GPU to benchmark: {reason}")
    from numba import cuda

    return backend, cuda


# ------------------------------------------------------------------ timing

def gpu_time(cuda, fn, reps):
    """Seconds per call of ``fn`` on the GPU: CUDA events around ``reps``
    back-to-back calls (after one warm-up call)."""
    fn()
    cuda.synchronize()
    start, stop = cuda.event(), cuda.event()
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / 1e3 / reps


def wall_time(sync, fn, reps, repeats):
    """Median over ``repeats`` of the wall-clock seconds per call of ``reps``
    back-to-back calls, synchronised at the end (after a warm-up)."""
    fn()
    sync()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        samples.append((time.perf_counter() - t0) / reps)
    return statistics.median(samples)


# ------------------------------------------------------------------ 1. Adam

cuda = None   # numba.cuda, set by main(): kernels below find it as a global


def _stream_4r3w(p, g, m, v, c):
    """DESIGN.md's floor for Adam: a plain kernel with its 4 reads and 3 writes."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, p.size, stride):
        gi = g[i]
        m[i] = m[i] + c * gi
        v[i] = v[i] + c * gi
        p[i] = p[i] - c * gi


def bench_adam(backend, cuda, reps):
    n = ADAM_N
    dt = np.float32
    rng = np.random.default_rng(0)
    p = cuda.to_device(rng.standard_normal(n).astype(dt))
    g = cuda.to_device(rng.standard_normal(n).astype(dt))
    m, v = backend.zeros(n, dt), backend.zeros(n, dt)
    step = [0]

    def adam():
        step[0] += 1
        backend.adam_step(p, g, m, v, step[0], 1e-3, 0.9, 0.999, 1e-8, 0.0, False, 0.0, None)

    t_adam = gpu_time(cuda, adam, reps)

    # peak: a device-to-device copy of 256 MiB (read + write)
    big = COPY_N
    src, dst = backend.zeros(big, dt), backend.empty(big, dt)
    t_copy = gpu_time(cuda, lambda: dst.copy_to_device(src), reps)
    copy_bw = 2 * big * 4 / t_copy

    stream_4r3w = cuda.jit(_stream_4r3w)
    sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
    blocks = min(-(-n // 256), 16 * sms)
    c = np.float32(1e-7)
    t_floor = gpu_time(cuda, lambda: stream_4r3w[blocks, 256](p, g, m, v, c), reps)
    moved = 7 * n * 4
    return {
        "n": n, "adam_s": t_adam, "adam_GBps": moved / t_adam / 1e9,
        "copy_GBps": copy_bw / 1e9, "floor_s": t_floor, "floor_GBps": moved / t_floor / 1e9,
        "fraction_of_copy_peak": moved / t_adam / copy_bw,
        "ratio_to_floor": t_adam / t_floor,
    }


# ------------------------------------------------------------------ 2. dense_forward

def bench_dense(backend, cuda, repeats):
    try:
        import cupy
        cupy.matmul(cupy.ones((2, 2), cupy.float32), cupy.ones((2, 2), cupy.float32))
        backend.set_gemm("cublas")
    except Exception as exc:  # noqa: BLE001 - any failure means: no CuPy/cuBLAS here
        cupy = None
        cupy_why = f"{type(exc).__name__}: {exc}"
    rows = []
    for batch, n_in, n_out in GEMM_SHAPES:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch, n_in)).astype(np.float32)
        w = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        b = rng.standard_normal(n_out).astype(np.float32)
        dx, dw, db = backend.from_host(x), backend.from_host(w), backend.from_host(b)
        out = backend.empty((batch, n_out), np.float32)
        flops = 2.0 * batch * n_in * n_out
        reps = max(5, min(2000, int(2e11 / flops)))
        row = {"shape": f"{batch}x{n_in}x{n_out}", "reps": reps}
        if cupy is not None:
            cx, cw = cupy.asarray(x), cupy.asarray(w)
            cz = cupy.empty((batch, n_out), cupy.float32)
            row["cublas_s"] = wall_time(cuda.synchronize,
                                        lambda: cupy.matmul(cx, cw, out=cz), reps, repeats)
            backend.set_gemm("cublas")
            row["fastnn_cublas_s"] = wall_time(
                cuda.synchronize, lambda: backend.dense_forward(dx, dw, db, "relu", out),
                reps, repeats)
            row["ratio"] = row["fastnn_cublas_s"] / row["cublas_s"]
            want = np.maximum(cupy.asnumpy(cz) + b, 0)
            got = backend.to_host(out)
            row["max_abs_err_vs_cublas"] = float(np.abs(got - want).max())
        else:
            row["cublas"] = f"CuPy not usable: {cupy_why}"
        backend.set_gemm("numba")
        row["fastnn_tiled_s"] = wall_time(
            cuda.synchronize, lambda: backend.dense_forward(dx, dw, db, "relu", out),
            reps, repeats)
        backend.set_gemm("auto")
        for key in ("cublas_s", "fastnn_cublas_s", "fastnn_tiled_s"):
            if key in row:
                row[key.replace("_s", "_TFLOPs")] = flops / row[key] / 1e12
        rows.append(row)
    return rows


# ------------------------------------------------------------------ 3. MNIST epoch

def mnist():
    """(x, y, x_test, y_test, what): full MNIST if on disk, else the bundled
    subset repeated to 60000 training samples."""
    import fastnn

    try:
        (x, y), (xt, yt) = fastnn.datasets.load_mnist(download=False)
        return x, y, xt, yt, "MNIST (60000 train, 10000 test)"
    except Exception:  # noqa: BLE001 - not on disk: use the bundled subset
        (x, y), (xt, yt) = fastnn.datasets.load_mnist_small()
        reps = -(-60000 // x.shape[0])
        x, y = np.concatenate([x] * reps)[:60000], np.concatenate([y] * reps)[:60000]
        return x, y, xt, yt, ("bundled MNIST subset (4000 samples) repeated to 60000; "
                              f"test {xt.shape[0]}")


def _mlp_fastnn():
    import fastnn as fn

    m = fn.Sequential([fn.Dense(u, "relu") for u in LAYERS[1:-1]] + [fn.Dense(LAYERS[-1])],
                      input_dim=LAYERS[0], dtype="float32", seed=0)
    m.compile(loss="softmax_cross_entropy", optimizer=fn.Adam(lr=1e-3))
    return m


def bench_fastnn_epoch(x, y, xt, yt, batch, model=_mlp_fastnn):
    """One epoch of ``model()`` (a compiled Sequential) on the cuda backend."""
    import fastnn as fn

    with fn.use_backend("cuda"):
        warm = model()     # compiles every kernel (numba JIT) outside the timing
        warm.fit(x[:2 * batch + 17], y[:2 * batch + 17], epochs=1, batch_size=batch, verbose=0)
        warm.evaluate(xt[:batch], yt[:batch])
        m = model()
        t0 = time.perf_counter()
        hist = m.fit(x, y, epochs=1, batch_size=batch, verbose=0)
        seconds = time.perf_counter() - t0
        test = m.evaluate(xt, yt)
    return {"epoch_s": seconds, "samples_per_s": x.shape[0] / seconds,
            "train_loss": hist.history["loss"][0], "test_accuracy": test["accuracy"]}


def _mlp_torch(torch):
    mods = []
    for n_in, n_out in zip(LAYERS[:-2], LAYERS[1:-1]):
        mods += [torch.nn.Linear(n_in, n_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*mods, torch.nn.Linear(*LAYERS[-2:]))


def bench_torch_epoch(x, y, xt, yt, batch, make_net=_mlp_torch):
    """The same epoch in PyTorch CUDA: ``make_net(torch)`` (logits out), Adam 1e-3,
    cross-entropy; ``x`` already in the layout the net takes."""
    try:
        import torch
    except ImportError:
        return {"skipped": "PyTorch is not installed"}
    if not torch.cuda.is_available():
        return {"skipped": "PyTorch has no CUDA here (a CPU-only build?)"}
    dev = torch.device("cuda")
    torch.manual_seed(0)

    def model():
        m = make_net(torch).to(dev)
        return m, torch.optim.Adam(m.parameters(), lr=1e-3)

    loss_fn = torch.nn.CrossEntropyLoss()

    def epoch(net, opt, xs, ys):
        """One shuffled epoch, reading back the loss and the count of correct
        predictions every batch, as fastnn's fit does."""
        n = xs.shape[0]
        order = torch.randperm(n, device=dev)
        total, correct = 0.0, 0
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            xb, yb = xs[idx], ys[idx]
            opt.zero_grad(set_to_none=True)
            logits = net(xb)
            loss = loss_fn(logits, yb)
            loss.backward()
            opt.step()
            total += loss.item() * xb.shape[0]
            correct += int((logits.argmax(1) == yb).sum().item())
        return total / n, correct / n

    xs, ys = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)
    m, opt = model()
    epoch(m, opt, xs[:2 * batch + 17], ys[:2 * batch + 17])   # warm-up (cuBLAS, cuDNN, allocator)
    m, opt = model()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss, _ = epoch(m, opt, xs, ys)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    m.eval()
    with torch.no_grad():
        pred = torch.cat([m(xb).argmax(1) for xb in torch.from_numpy(xt).to(dev).split(1000)])
        pred = pred.cpu().numpy()
    return {"version": torch.__version__, "epoch_s": seconds,
            "samples_per_s": x.shape[0] / seconds, "train_loss": loss,
            "test_accuracy": float(np.mean(pred == yt))}


# ------------------------------------------------------------------ 4. conv kernels

def _conv_gemms(dims):
    """The GEMMs (m, n, k, ta, tb) of one convolution of Keras' convnet: the
    forward product ``cols @ w``, ``dw = cols.T @ dz`` and backprop's
    ``dz @ w.T`` (``dims`` as ``fastnn._bench.CONV_SHAPES``)."""
    batch, h, w, c, o, k = dims
    m, kk = batch * (h - k + 1) * (w - k + 1), k * k * c
    return {"conv2d_forward": (m, o, kk, False, False),
            "conv2d_backward": (kk, o, m, True, False),
            "conv2d_backprop": (m, kk, o, False, True)}


def _gemm_alone(backend, m, n, k, ta, tb, dtype):
    """``c = op(a) @ op(b)`` of shape (m, n, k) through the backend's GEMM
    engine (cuBLAS, or the tiled kernel) with no epilogue: the baseline a conv
    kernel's GEMM is held against."""
    from fastnn.kernels import _cuda_kernels as K

    rng = np.random.default_rng(1)
    a = backend.from_host(rng.standard_normal((k, m) if ta else (m, k)).astype(dtype))
    b = backend.from_host(rng.standard_normal((n, k) if tb else (k, n)).astype(dtype))
    c = backend.empty((m, n), dtype)
    ks = K.kernels(np.dtype(dtype))
    return lambda: backend._matmul(a, b, c, ta, tb, ks, K.EPI_STORE)


def _check(name, got, want, n):
    """Max abs error over max |want|, and whether it is within float32's
    tolerance for a sum of ``n`` terms (DESIGN.md, scaled)."""
    err = float(np.max(np.abs(got - want)))
    scale = float(np.max(np.abs(want))) or 1.0
    return {"max_abs_err": err, "ok": err <= 1e-5 * n * scale + 1e-6 * n}


def bench_conv(backend, cuda, repeats, batch):
    """Each conv, pooling and dropout kernel at Keras' convnet shapes (float32,
    device arrays, wall time per call back to back): a convolution against its
    GEMM alone (same M, N, K, same engine), pooling and dropout as bandwidth
    against the device-to-device copy peak. One call of each convolution is
    checked against the NumPy reference."""
    from fastnn._bench import CONV_SHAPES, DROPOUT_SHAPES, POOL_SHAPES
    from fastnn.kernels import reference as R

    dt = np.float32
    sync = cuda.synchronize
    rng = np.random.default_rng(0)
    rows = []
    engine = backend.gemm_engine()
    for dims in CONV_SHAPES:
        dims = (batch,) + tuple(dims[1:])
        _, h, w, c, o, k = dims
        p, q = h - k + 1, w - k + 1
        x = rng.standard_normal((batch, h, w, c)).astype(dt)
        wt = (rng.standard_normal((k, k, c, o)) / np.sqrt(k * k * c)).astype(dt)
        b = rng.standard_normal(o).astype(dt)
        dz = rng.standard_normal((batch, p, q, o)).astype(dt)
        y = np.abs(rng.standard_normal(x.shape)).astype(dt)
        dx, dw, db, ddz, dy_ = (backend.from_host(a) for a in (x, wt, b, dz, y))
        out, z = backend.empty((batch, p, q, o), dt), backend.empty((batch, p, q, o), dt)
        gw, gb = backend.empty(wt.shape, dt), backend.empty(o, dt)
        delta = backend.empty(x.shape, dt)
        calls = {
            "conv2d_forward": lambda: backend.conv2d_forward(dx, dw, db, "relu", out, z),
            "conv2d_backward": lambda: backend.conv2d_backward(dx, ddz, gw, gb),
            "conv2d_backprop": lambda: backend.conv2d_backprop(ddz, dw, None, dy_, "relu", delta),
        }
        gemms = _conv_gemms(dims)
        shape = f"{batch}x{h}x{w}x{c} -> {o} {k}x{k}"
        for name, fn in calls.items():
            m, n, kk, ta, tb = gemms[name]
            flops = 2.0 * m * n * kk
            reps = max(5, min(500, int(2e10 / flops)))
            row = {"kernel": name, "shape": shape, "gemm_mnk": f"{m}x{n}x{kk}", "engine": engine,
                   "reps": reps}
            row["fastnn_s"] = wall_time(sync, fn, reps, repeats)
            row["gemm_s"] = wall_time(sync, _gemm_alone(backend, m, n, kk, ta, tb, dt), reps,
                                      repeats)
            row["ratio_to_gemm"] = row["fastnn_s"] / row["gemm_s"]
            row["TFLOPs"] = flops / row["fastnn_s"] / 1e12
            if name == "conv2d_forward":
                want = np.empty((batch, p, q, o), dt)
                R.conv2d_forward(x, wt, b, "relu", want)
                row.update(_check(name, backend.to_host(out), want, k * k * c))
            elif name == "conv2d_backward":
                want, want_b = np.empty_like(wt), np.empty_like(b)
                R.conv2d_backward(x, dz, want, want_b)
                row.update(_check(name, backend.to_host(gw), want, batch * p * q))
            else:
                want = np.empty_like(x)
                R.conv2d_backprop(dz, wt, None, y, "relu", want)
                row.update(_check(name, backend.to_host(delta), want, k * k * o))
            rows.append(row)
    for dims in POOL_SHAPES:
        n_, h, w, c = (batch,) + tuple(dims[1:])
        p, q = h // 2, w // 2
        x = backend.from_host(rng.standard_normal((n_, h, w, c)).astype(dt))
        out, arg = backend.empty((n_, p, q, c), dt), backend.empty((n_, p, q, c), np.int32)
        dyp, g = backend.from_host(rng.standard_normal((n_, p, q, c)).astype(dt)), \
            backend.empty((n_, h, w, c), dt)
        shape = f"{n_}x{h}x{w}x{c} pool 2x2"
        moved = {"maxpool2d_forward": 4 * (n_ * h * w * c + 2 * n_ * p * q * c),
                 "maxpool2d_backward": 4 * (2 * n_ * h * w * c + 2 * n_ * p * q * c)}
        calls = {"maxpool2d_forward": lambda: backend.maxpool2d_forward(x, out, arg, (2, 2)),
                 "maxpool2d_backward": lambda: backend.maxpool2d_backward(
                     dyp, arg, None, x, "relu", g, (2, 2))}
        for name, fn in calls.items():
            t = wall_time(sync, fn, 200, repeats)
            rows.append({"kernel": name, "shape": shape, "fastnn_s": t,
                         "GBps": moved[name] / t / 1e9})
    for dims in DROPOUT_SHAPES:
        rows_, cols = dims if dims[1] != 1600 else (batch, dims[1])
        a = backend.from_host(rng.standard_normal((rows_, cols)).astype(dt))
        o_ = backend.empty((rows_, cols), dt)
        for name in ("dropout_forward", "dropout_backward"):
            kern = getattr(backend, name)
            seed = [0]

            def fn(kern=kern, seed=seed):
                seed[0] += 1
                kern(a, 0.5, seed[0], o_)
            t = wall_time(sync, fn, 200, repeats)
            rows.append({"kernel": name, "shape": f"{rows_}x{cols} rate 0.5", "fastnn_s": t,
                         "GBps": 8 * rows_ * cols / t / 1e9})
    return rows


# ------------------------------------------------------------------ 5. convnet epoch

def _keras_convnet_fastnn():
    import fastnn as fn

    m = fn.Sequential([
        fn.Conv2D(32, (3, 3), activation="relu", input_shape=(28, 28, 1)),
        fn.MaxPool2D(pool_size=(2, 2)),
        fn.Conv2D(64, (3, 3), activation="relu"),
        fn.MaxPool2D(pool_size=(2, 2)),
        fn.Flatten(),
        fn.Dropout(0.5),
        fn.Dense(10, activation="softmax"),
    ], dtype="float32", seed=0)
    m.compile(loss="sparse_categorical_crossentropy", optimizer=fn.Adam(lr=1e-3))
    return m


def _keras_convnet_torch(torch):
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.5), nn.Linear(1600, 10))


# ------------------------------------------------------------------ report

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--skip-mnist", action="store_true", help="no training epoch")
    parser.add_argument("--batch", type=int, default=128, help="MNIST batch size (128)")
    parser.add_argument("--skip-conv", action="store_true", help="no conv kernel rows")
    parser.add_argument("--skip-convnet", action="store_true", help="no convnet epoch")
    parser.add_argument("--conv-batch", type=int, default=128,
                        help="batch of the conv kernel rows and the convnet epoch (128)")
    args = parser.parse_args(argv)

    global cuda
    backend, cuda = gpu_or_exit()
    info = backend.info()
    print("cuda_bench:", ", ".join(f"{k}: {v}" for k, v in info.items()))
    results = {"info": info}
    reps, repeats = (20, 3) if args.quick else (100, 5)

    a = results["adam"] = bench_adam(backend, cuda, reps)
    print(f"\n1. Adam, {a['n']:,} float32 (7 arrays moved: {7 * a['n'] * 4 / 1e6:.0f} MB)")
    print(f"   device-to-device copy peak  {a['copy_GBps']:8.0f} GB/s")
    print(f"   streaming floor (4r+3w)     {a['floor_GBps']:8.0f} GB/s  "
          f"{a['floor_s'] * 1e6:8.1f} us")
    print(f"   fastnn adam_step            {a['adam_GBps']:8.0f} GB/s  {a['adam_s'] * 1e6:8.1f} us"
          f"  = {a['fraction_of_copy_peak']:.0%} of the copy peak, "
          f"{a['ratio_to_floor']:.2f}x the floor's time  "
          f"[goal >= {GOAL_ADAM_FRACTION:.0%}: "
          f"{'met' if a['fraction_of_copy_peak'] >= GOAL_ADAM_FRACTION else 'NOT met'}]")

    rows = results["dense_forward"] = bench_dense(backend, cuda, repeats)
    print("\n2. dense_forward (relu) vs bare cuBLAS, float32, wall time per call")
    for r in rows:
        line = f"   {r['shape']:>15s}:"
        if "cublas_s" in r:
            line += (f" cuBLAS {r['cublas_s'] * 1e6:9.1f} us ({r['cublas_TFLOPs']:.1f} TFLOP/s),"
                     f" fastnn {r['fastnn_cublas_s'] * 1e6:9.1f} us = {r['ratio']:.2f}x"
                     f" [goal <= {GOAL_DENSE_RATIO}: "
                     f"{'met' if r['ratio'] <= GOAL_DENSE_RATIO else 'NOT met'}];")
        else:
            line += f" {r['cublas']};"
        line += f" numba tiled GEMM {r['fastnn_tiled_s'] * 1e6:9.1f} us"
        print(line)

    if not args.skip_mnist:
        x, y, xt, yt, what = mnist()
        print(f"\n3. One MNIST epoch, 784-256-128-10 relu, Adam, batch {args.batch}, float32: {what}")
        f = results["mnist_fastnn"] = bench_fastnn_epoch(x, y, xt, yt, args.batch)
        print(f"   fastnn (cuda)  {f['epoch_s']:7.2f} s  {f['samples_per_s']:9.0f} samples/s  "
              f"loss {f['train_loss']:.4f}  test accuracy {f['test_accuracy']:.4f}")
        t = results["mnist_torch"] = bench_torch_epoch(x, y, xt, yt, args.batch)
        if "skipped" in t:
            print(f"   PyTorch CUDA   skipped: {t['skipped']}")
        else:
            print(f"   PyTorch {t['version']} {t['epoch_s']:7.2f} s  {t['samples_per_s']:9.0f} "
                  f"samples/s  loss {t['train_loss']:.4f}  test accuracy {t['test_accuracy']:.4f}"
                  f"  -> fastnn takes {f['epoch_s'] / t['epoch_s']:.2f}x PyTorch's time")

    if not args.skip_conv:
        rows = results["conv"] = bench_conv(backend, cuda, repeats, args.conv_batch)
        print(f"\n4. Conv, pooling and dropout kernels at Keras' convnet shapes, float32, "
              f"wall time per call (GEMM engine: {backend.gemm_engine()})")
        for r in rows:
            line = f"   {r['kernel']:19s} {r['shape']:>28s}: {r['fastnn_s'] * 1e6:9.1f} us"
            if "gemm_s" in r:
                line += (f"  GEMM alone ({r['gemm_mnk']}) {r['gemm_s'] * 1e6:9.1f} us"
                         f" -> {r['ratio_to_gemm']:.2f}x  {r['TFLOPs']:.2f} TFLOP/s"
                         f"  {'ok' if r['ok'] else 'WRONG'} (max err {r['max_abs_err']:.1e})")
            else:
                line += (f"  {r['GBps']:7.0f} GB/s"
                         + (f" = {r['GBps'] / a['copy_GBps']:.0%} of the copy peak"))
            print(line)

    if not args.skip_convnet:
        x, y, xt, yt, what = mnist()
        x, xt = x.reshape(-1, 28, 28, 1), xt.reshape(-1, 28, 28, 1)
        b = args.conv_batch
        print(f"\n5. One MNIST epoch of Keras' convnet (conv 32 relu, pool, conv 64 relu, pool, "
              f"dropout 0.5, dense 10), Adam, batch {b}, float32: {what}")
        f = results["convnet_fastnn"] = bench_fastnn_epoch(x, y, xt, yt, b,
                                                           _keras_convnet_fastnn)
        print(f"   fastnn (cuda)  {f['epoch_s']:7.2f} s  {f['samples_per_s']:9.0f} samples/s  "
              f"loss {f['train_loss']:.4f}  test accuracy {f['test_accuracy']:.4f}")
        t = results["convnet_torch"] = bench_torch_epoch(
            x.transpose(0, 3, 1, 2).copy(), y, xt.transpose(0, 3, 1, 2).copy(), yt, b,
            _keras_convnet_torch)
        if "skipped" in t:
            print(f"   PyTorch CUDA   skipped: {t['skipped']}")
        else:
            print(f"   PyTorch {t['version']} {t['epoch_s']:7.2f} s  {t['samples_per_s']:9.0f} "
                  f"samples/s  loss {t['train_loss']:.4f}  test accuracy {t['test_accuracy']:.4f}"
                  f"  -> fastnn takes {f['epoch_s'] / t['epoch_s']:.2f}x PyTorch's time")

    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=str)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
