"""Whole training epochs, float32, Adam, at batch 32 and 128, of three
networks (``fastnn._bench.NETWORKS``): the 784-256-128-10 ReLU MLP (MNIST's
shape), Keras' MNIST convnet and seed 003's network (one convolution and a
dense layer). One group per network and batch size:

* ``numpy-plain``: the same step written with NumPy (the reference kernels,
  buffers allocated once; for the convnets im2col + GEMM, NHWC) -- the baseline;
* ``fastnn[b]``: ``fastnn.Sequential.fit`` on each available backend;
* ``kernels[b]``: backend b's kernels called directly (no model code);
* ``gemm-only``: the GEMMs of a step, nothing else (the ceiling; for the
  convnets their im2col GEMMs on columns that exist already);
* ``sklearn``: ``MLPClassifier.partial_fit`` (one epoch a call; the MLP only);
* ``pytorch``: ``torch.optim.Adam(fused=True)``, in its own process (NCHW for
  the convnets; its epoch times are recorded into this group).

Peers that are not installed are skipped with a message. ``extra_info``
holds samples/s and the time of one step.

    pytest benchmarks/bench_training.py --benchmark-only
    pytest benchmarks/bench_training.py --benchmark-only -k "convnet and 128"
"""

import functools

import pytest

from _common import (KernelMLP, TRAIN_BATCHES, _bench, annotate, benchmark_backends,
                     gemm_ceiling_fn, record_external, sequential_available,
                     sequential_epoch_fn, sklearn_available, sklearn_epoch_fn,
                     torch_available, torch_epochs)

#: samples per epoch: the convnets on the NumPy reference run ~1,000 samples/s
SAMPLES = {"mlp": 4096, "convnet": 1024, "cnn": 1024}
NETWORKS = tuple(SAMPLES)
ROUNDS = 7
BACKENDS = benchmark_backends()


@functools.lru_cache(maxsize=None)
def data(network):
    return _bench.network_data(network, SAMPLES[network])


def _group(network, batch):
    return f"training epoch {_bench.NETWORK_SHORT[network]} batch {batch} float32"


def _kernels(network, backend, batch):
    if network == "mlp":
        return KernelMLP(backend, batch)
    return _bench.KernelConvNet(backend, batch, network)


def _run(benchmark, epoch, network, batch, contender, backend=None):
    n = SAMPLES[network]
    epoch()   # warm-up: numba compiles, buffers are allocated
    annotate(benchmark, _group(network, batch), contender=contender, backend=backend,
             network=network, batch=batch, samples=n, steps=n // batch)
    benchmark.pedantic(epoch, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    t = benchmark.stats.stats.median
    benchmark.extra_info.update(samples_per_s=n // batch * batch / t, step_s=t / (n // batch))


@pytest.mark.parametrize("batch", TRAIN_BATCHES)
@pytest.mark.parametrize("network", NETWORKS)
def test_numpy_plain(benchmark, network, batch):
    x, y = data(network)
    _run(benchmark, _kernels(network, "numpy", batch).epoch_fn(x, y), network, batch,
         "numpy-plain", "numpy")


@pytest.mark.parametrize("batch", TRAIN_BATCHES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("network", NETWORKS)
def test_fastnn(benchmark, network, backend, batch):
    ok, why = sequential_available()
    if not ok:
        pytest.skip(why)
    x, y = data(network)
    _run(benchmark, sequential_epoch_fn(backend, x, y, batch, network=network), network, batch,
         f"fastnn[{backend}]", backend)


@pytest.mark.parametrize("batch", TRAIN_BATCHES)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "numpy"])
@pytest.mark.parametrize("network", NETWORKS)
def test_kernels(benchmark, network, backend, batch):
    x, y = data(network)
    _run(benchmark, _kernels(network, backend, batch).epoch_fn(x, y), network, batch,
         f"kernels[{backend}]", backend)


@pytest.mark.parametrize("batch", TRAIN_BATCHES)
@pytest.mark.parametrize("network", NETWORKS)
def test_gemm_only(benchmark, network, batch):
    x, _ = data(network)
    epoch = (gemm_ceiling_fn(x, batch) if network == "mlp"
             else _bench.conv_gemm_ceiling_fn(network, x, batch))
    _run(benchmark, epoch, network, batch, "gemm-only")


@pytest.mark.parametrize("batch", TRAIN_BATCHES)
def test_sklearn(benchmark, batch):
    ok, why = sklearn_available()
    if not ok:
        pytest.skip(why)
    x, y = data("mlp")
    _run(benchmark, sklearn_epoch_fn(x, y, batch), "mlp", batch, "sklearn")


@functools.lru_cache(maxsize=None)
def _torch(network):
    return torch_epochs(TRAIN_BATCHES, SAMPLES[network], ROUNDS, network=network)


@pytest.mark.parametrize("batch", TRAIN_BATCHES)
@pytest.mark.parametrize("network", NETWORKS)
def test_pytorch(benchmark, network, batch):
    ok, why = torch_available()
    if not ok:
        pytest.skip(why)
    res = _torch(network)
    n = SAMPLES[network]
    seconds = res["epoch_s"][batch]
    record_external(benchmark, seconds, _group(network, batch), contender="pytorch",
                    network=network, batch=batch, samples=n, steps=n // batch,
                    torch=res["version"], torch_threads=res["threads"], process="own subprocess")
    t = sorted(seconds)[len(seconds) // 2]
    benchmark.extra_info.update(samples_per_s=n // batch * batch / t, step_s=t / (n // batch))
