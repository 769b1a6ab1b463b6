"""Every contract kernel x every available backend x float32/float64, at the
sizes users meet (``fastnn._bench.all_cases``: the convolution, pooling and
dropout kernels at Keras' MNIST convnet's shapes, batch 128; gather_rows as
``fit`` reads a shuffled epoch), each grouped with its NumPy baseline and its
probe: the bare BLAS GEMM of the same shape for the dense kernels, the im2col
GEMM alone (the same M, N, K, on columns that exist already) for the
convolutions, the memory-bandwidth floor (a streaming kernel over the same
arrays) for the optimizers.

    pytest benchmarks/bench_kernels.py --benchmark-only
    pytest benchmarks/bench_kernels.py --benchmark-only -k "adam_step and 10M"
    pytest benchmarks/bench_kernels.py --benchmark-only -k "conv2d and float32"
"""

import pytest

from _common import (all_cases, annotate, benchmark_backends, bind, probe, quick_cases,
                     runs_reference)

BACKENDS = benchmark_backends()


def pytest_generate_tests(metafunc):
    cases = quick_cases() if metafunc.config.getoption("--bench-quick") else all_cases()
    if "kcase" in metafunc.fixturenames:
        metafunc.parametrize("kcase", cases, ids=[c.id for c in cases])
    if "pcase" in metafunc.fixturenames:    # the cases with a probe
        cases = [c for c in cases if c.probe is not None]
        metafunc.parametrize("pcase", cases, ids=[c.id for c in cases])


def _group(case):
    return f"{case.name} {case.shape} {case.dtype}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel(benchmark, kcase, backend):
    if runs_reference(kcase, backend):
        pytest.skip(f"{backend} runs the NumPy reference for {kcase.name}")
    fn = bind(kcase, backend)
    fn()   # warm-up: numba compiles here
    annotate(benchmark, _group(kcase), backend=backend, kernel=kcase.kernel,
             variant=kcase.variant, shape=kcase.shape, dtype=kcase.dtype)
    benchmark(fn)


def test_probe(benchmark, pcase):
    kcase = pcase
    fn = probe(kcase)
    if fn is None:
        pytest.skip("the bandwidth floor needs numba")
    fn()
    what = {"gemm": "bare BLAS GEMM (np.matmul out=)",
            "floor": "memory-bandwidth floor (streaming kernel)"}[kcase.probe]
    if kcase.kernel.startswith("conv2d"):
        what = "its im2col GEMM alone (np.matmul out=, columns made already)"
    annotate(benchmark, _group(kcase), backend="probe", probe=what, shape=kcase.shape,
             dtype=kcase.dtype)
    benchmark(fn)
