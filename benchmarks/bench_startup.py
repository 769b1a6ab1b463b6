"""Start-up: ``import fastnn`` plus the first training step on each backend,
in a fresh process each time, with a cold numba cache (an empty
``NUMBA_CACHE_DIR``: numba compiles every kernel of the step) and a warm one
(the cache a previous run filled). The benchmark's time is the whole process
(interpreter start included); ``extra_info`` splits it into ``import``
(``import fastnn``), ``load`` (the backend module) and ``first`` (the first
step: ``Sequential.fit`` on one batch of 128 when the model exists, else the
kernels of one step called directly).

    pytest benchmarks/bench_startup.py --benchmark-only
"""

import shutil
import tempfile

import pytest

from _common import annotate, benchmark_backends, startup

BACKENDS = benchmark_backends()


@pytest.mark.parametrize("cache", ["cold", "warm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_startup(benchmark, backend, cache):
    folder = tempfile.mkdtemp(prefix="fastnn-numba-cache-")
    last = {}
    try:
        if cache == "warm":
            startup(backend, "step", folder)      # fills the cache, untimed

        def setup():
            if cache == "cold":
                shutil.rmtree(folder, ignore_errors=True)
            return (), {}

        def run():
            last.update(startup(backend, "step", folder))

        annotate(benchmark, f"start-up: import fastnn + first training step ({cache} cache)",
                 backend=backend, cache=cache)
        benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
        benchmark.extra_info.update({k: last[k] for k in ("import", "load", "first", "kind")})
    finally:
        shutil.rmtree(folder, ignore_errors=True)
