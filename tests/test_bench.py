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


@pytest.fixture(scope="module")
def overhead_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("overhead")
    proc = subprocess.run(
        [sys.executable, "-m", "fastnn", "bench", "--quick", "--only", "overhead",
         "--backends", "cython", "--no-progress", "--no-peers", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_overhead_cases_cover_the_contract():
    from fastnn import _bench
    from fastnn.kernels import reference

    cases = _bench.overhead_cases()
    assert {c.kernel for c in cases} == set(reference.CONTRACT)
    sizes = {c.kernel: c.dims for c in cases}
    assert sizes["dense_forward"] == (32, 128, 10) and sizes["adam_step"] == (1000,)
    assert sizes["activation_forward"] == (32, 256) and sizes["softmax_cross_entropy"] == (32, 10)


def test_overhead_table_written(overhead_out):
    """``bench --only overhead``: the per-call table of every contract kernel through
    fn.ops, directly and as the NumPy reference (no timed assertion)."""
    from fastnn.kernels import reference

    report = (overhead_out / "report.md").read_text()
    assert "## Per-call overhead of fastnn.ops" in report
    assert ("| kernel | shape | dtype | backend | fn.ops us | direct us | fn.ops - direct | "
            "fn.ops path | NumPy ref. us | PyTorch us | PyTorch op |") in report
    assert "| activation_forward[relu] | 32x256 | float32 | cython |" in report
    assert "## Kernels" not in report and "## Training" not in report
    rows = json.loads((overhead_out / "results.json").read_text())["overhead"]
    assert {r["kernel"] for r in rows} == set(reference.CONTRACT)
    for r in rows:
        assert r["backend"] == "cython" and r["torch_s"] is None      # --no-peers
        assert r["ops_s"] > 0 and r["direct_s"] > 0 and r["numpy_s"] > 0
        assert r["path"] in ("C entry", "compiled gate", "Python gate")
    assert any(r["path"] == "C entry" for r in rows)


def test_torch_per_call_ops():
    """PyTorch's op of each overhead case, timed in its own process (skipped
    without torch, the peers extra)."""
    from fastnn import _bench

    ok, why = _bench.torch_available()
    if not ok:
        pytest.skip(why)
    cases = [c for c in _bench.overhead_cases() if c.kernel != "rmsprop_step"]
    times = _bench.torch_calls(cases, calls=20)
    assert set(times) == {c.id for c in cases}, set(c.id for c in cases) - set(times)
    for seconds, label in times.values():
        assert seconds > 0 and label
