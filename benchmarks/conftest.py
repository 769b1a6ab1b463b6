"""pytest-benchmark suites: ``pytest benchmarks --benchmark-only``.

They stay out of the normal test run (``testpaths = ["tests"]``). Files
named ``bench_*.py`` are collected here (pytest's default pattern is
``test_*.py``). Every benchmark calls its target once before timing (numba
compiles on the first call), draws its inputs from a fixed seed, records the
thread count in ``extra_info`` and sits in a group with its NumPy baseline,
so that pytest-benchmark's table shows the ratio.

Options: ``FASTNN_BENCH_BACKENDS=numpy,numba`` restricts the backends;
``--bench-quick`` runs only the shapes of the speed goals, float32.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def pytest_addoption(parser):
    parser.addoption("--bench-quick", action="store_true", default=False,
                     help="fastnn: only the quick set (float32, the goals' shapes)")


def pytest_collect_file(file_path, parent):
    # a file named on the command line is collected by pytest itself
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_report_header(config):
    from _common import machine_line
    return [f"fastnn bench: {machine_line()}"]


@pytest.fixture(autouse=True)
def _restore_backend_default():
    from fastnn import _backend

    saved = _backend._default
    yield
    _backend._default = saved
