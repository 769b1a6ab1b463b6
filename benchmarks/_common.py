"""Shared helpers of the benchmark suites and ``goals.py``.

The measuring itself lives in the package (``fastnn._bench``) so that
``python -m fastnn bench`` works from an installed fastnn; this module
re-exports it and adds what the pytest-benchmark suites need: the parameter
lists, the thread count and the group of each benchmark.
"""

import os
import sys

import pytest

import fastnn
from fastnn import _bench  # noqa: F401  (re-exported)
from fastnn._bench import (  # noqa: F401  (re-exported)
    DTYPES, SEED, TRAIN_BATCHES, TRAIN_LAYERS, Case, KernelMLP, all_cases,
    available_backends, bind, cuda_simulated, find_case, fmt_probe, fmt_ratio, fmt_time,
    gemm_ceiling_fn, machine_info, machine_line, measure, probe, quick_cases, run_case,
    run_startup, run_training, runs_reference, sequential_available, sequential_epoch_fn,
    sklearn_available, sklearn_epoch_fn, startup, thread_pools, torch_available,
    torch_epochs,
)


def benchmark_backends():
    """The backends the suites measure: every available one, the CUDA simulator
    left out (it runs kernels in Python threads: its times mean nothing), and
    ``FASTNN_BENCH_BACKENDS=numpy,numba`` restricting them."""
    wanted = os.environ.get("FASTNN_BENCH_BACKENDS")
    return available_backends(wanted.split(",") if wanted else None)


def annotate(benchmark, group, **info):
    """Set the benchmark's group and the facts a reader needs (threads, seed, ...)."""
    benchmark.group = group
    benchmark.extra_info.update(threads=fastnn.get_num_threads(), seed=SEED, **info)


def record_external(benchmark, seconds, group, **info):
    """Put times measured elsewhere (PyTorch's own process) into a pytest-benchmark
    row of ``group``, so that its table compares them with the in-process ones."""
    annotate(benchmark, group, **info)
    make_stats = getattr(benchmark, "_make_stats", None)
    if make_stats is None:    # a pytest-benchmark without this internal: keep the numbers
        benchmark.extra_info["seconds"] = list(seconds)
        pytest.skip("this pytest-benchmark cannot record external times; see extra_info")
    benchmark._mode = "external process"
    stats = make_stats(1)
    for s in seconds:
        stats.update(s)


def python():
    return sys.executable
