"""Smoke test of ``python -m fastnn bench``: a tiny set runs in a fresh process
and writes the report (and the chart when matplotlib is installed). No timed
assertion: the figures are only checked to be there."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

HAS_MPL = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ)
    env.setdefault("NUMBA_CACHE_DIR", str(out / "numba-cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "fastnn", "bench", "--quick", "--only", "softmax",
         "--repeats", "3", "--no-progress", "--no-peers", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_report_written(bench_out):
    report = (bench_out / "report.md").read_text()
    assert report.startswith("# fastnn benchmark report")
    assert "**Machine:**" in report and "cores" in report
    assert "| kernel | shape | dtype | backend | time | vs NumPy | vs probe |" in report
    assert "| softmax_cross_entropy | 128x10 | float32 | numpy |" in report
    # --only softmax leaves out the training and start-up sections
    assert "## Training" not in report and "## Start-up" not in report


def test_results_json(bench_out):
    res = json.loads((bench_out / "results.json").read_text())
    rows = res["kernels"]
    assert {r["kernel"] for r in rows} == {"softmax", "softmax_cross_entropy"}
    for r in rows:
        assert r["seconds"] > 0 and r["speedup"] > 0
        if r["backend"] == "numpy":
            assert r["speedup"] == 1.0


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed (the bench extra)")
def test_chart_written(bench_out):
    png = (bench_out / "speedup.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_bench_options():
    from fastnn import __main__ as cli

    args = cli.build_parser().parse_args(["bench", "--quick", "--out", "x", "--only", "adam"])
    assert args.quick and args.out == "x" and args.only == "adam"


def test_case_sets():
    from fastnn import _bench
    from fastnn.kernels import reference

    kernels = {c.kernel for c in _bench.all_cases()}
    assert kernels == set(reference.CONTRACT)
    assert all(c.dtype == "float32" for c in _bench.quick_cases())
    # every case builds arguments the NumPy reference accepts
    import numpy as np

    seen = set()
    for case in _bench.all_cases(("float64",)):
        # one small shape of each kernel and variant is enough here
        if case.name in seen or (len(case.dims) == 3 and max(case.dims) > 1024):
            continue
        seen.add(case.name)
        args = case.make(np.random.default_rng(0))
        getattr(reference, case.kernel)(*args)
