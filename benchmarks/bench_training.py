"""Whole training epochs of the 784-256-128-10 ReLU MLP (MNIST's shape) with
Adam, float32, at batch 32 and 128; one group per batch size:

* ``numpy-plain``: the same step written with NumPy (the reference kernels,
  buffers allocated once) -- the baseline;
* ``fastnn[b]``: ``fastnn.Sequential.fit`` on each available backend;
* ``kernels[b]``: backend b's kernels called directly (no model code);
* ``gemm-only``: the eight GEMMs of a step, nothing else (the ceiling);
* ``sklearn``: ``MLPClassifier.partial_fit`` (one epoch a call);
* ``pytorch``: ``torch.optim.Adam(fused=True)``, in its own process (its
  epoch times are recorded into this group).

Peers that are not installed are skipped with a message. ``extra_info``
holds samples/s and the time of one step.

    pytest benchmarks/bench_training.py --benchmark-only
"""

import functools

import pytest

from _common import (KernelMLP, TRAIN_BATCHES, _bench, annotate, benchmark_backends,
                     gemm_ceiling_fn, record_external, sequential_available,
                     sequential_epoch_fn, sklearn_available, sklearn_epoch_fn,
                     torch_available, torch_epochs)

N = 4096
ROUNDS = 7
BACKENDS = benchmark_backends()


@functools.lru_cache(maxsize=None)
def data():
    return _bench._training_data(N)


def _run(benchmark, epoch, batch, contender, backend=None):
    epoch()   # warm-up: numba compiles, buffers are allocated
    annotate(benchmark, f"training epoch 784-256-128-10 batch {batch} float32",
             contender=contender, backend=backend, batch=batch, samples=N,
             steps=N // batch)
    benchmark.pedantic(epoch, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    t = benchmark.stats.stats.median
    benchmark.extra_info.update(samples_per_s=N // batch * batch / t,
                                step_s=t / (N // batch))


@pytest.mark.parametrize("batch", TRAIN_BATCHES)
def test_numpy_plain(benchmark, batch):
    x, y = data()
    _run(benchmark, KernelMLP("numpy", batch).epoch_fn(x, y), batch, "numpy-plain", "numpy")


@pytest.mark.parametrize("batch", TRAIN_BATCHES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fastnn(benchmark, backend, batch):
    ok, why = sequential_available()
    if not ok:
        pytest.skip(why)
    x, y = data()
    _run(benchmark, sequential_epoch_fn(backend, x, y, batch), batch, f"fastnn[{backend}]",
         backend)


@pytest.mark.parametrize("batch", TRAIN_BATCHES)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "numpy"])
def test_kernels(benchmark, backend, batch):
    x, y = data()
    _run(benchmark, KernelMLP(backend, batch).epoch_fn(x, y), batch, f"kernels[{backend}]",
         backend)


@pytest.mark.parametrize("batch", TRAIN_BATCHES)
def test_gemm_only(benchmark, batch):
    x, _ = data()
    _run(benchmark, gemm_ceiling_fn(x, batch), batch, "gemm-only")


@pytest.mark.parametrize("batch", TRAIN_BATCHES)
def test_sklearn(benchmark, batch):
    ok, why = sklearn_available()
    if not ok:
        pytest.skip(why)
    x, y = data()
    _run(benchmark, sklearn_epoch_fn(x, y, batch), batch, "sklearn")


@functools.lru_cache(maxsize=None)
def _torch():
    return torch_epochs(TRAIN_BATCHES, N, ROUNDS)


@pytest.mark.parametrize("batch", TRAIN_BATCHES)
def test_pytorch(benchmark, batch):
    ok, why = torch_available()
    if not ok:
        pytest.skip(why)
    res = _torch()
    seconds = res["epoch_s"][batch]
    record_external(benchmark, seconds,
                    f"training epoch 784-256-128-10 batch {batch} float32",
                    contender="pytorch", batch=batch, samples=N, steps=N // batch,
                    torch=res["version"], torch_threads=res["threads"],
                    process="own subprocess")
    t = sorted(seconds)[len(seconds) // 2]
    benchmark.extra_info.update(samples_per_s=N // batch * batch / t, step_s=t / (N // batch))
