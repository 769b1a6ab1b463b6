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


# ----------------------------------------------------------------------- convnets, data, goals

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = [b for b in ("cython", "numba") if __import__("fastnn").backends()[b].available]
GOALS = os.path.join(ROOT, "benchmarks", "goals.py")
needs_goals = pytest.mark.skipif(
    not os.path.exists(GOALS), reason="benchmarks/ is not beside tests/ (installed-package run)")


def test_quick_cases_cover_the_new_kernels():
    """``bench --quick`` has a row for every convolution, pooling, dropout and
    gather kernel, at the convnet's shapes; the convolutions have a GEMM probe."""
    from fastnn import _bench
    from fastnn.kernels import reference

    cases = _bench.quick_cases()
    assert set(reference.CONV_KERNELS) | {"gather_rows"} <= {c.kernel for c in cases}
    for c in cases:
        if c.kernel.startswith("conv2d"):
            assert c.dims in _bench.CONV_SHAPES and c.probe == "gemm"
        elif c.kernel.startswith("maxpool"):
            assert c.dims in _bench.POOL_SHAPES
        elif c.kernel.startswith("dropout"):
            assert c.dims in _bench.DROPOUT_SHAPES


@pytest.mark.parametrize("kernel", ["conv2d_forward", "conv2d_backward", "conv2d_backprop"])
def test_conv_gemm_probe_is_the_kernels_gemm(kernel):
    """The probe's GEMM, fed the im2col columns of a small case, gives the
    convolution's pre-activation (forward), weight gradient (backward) and
    column gradient (backprop, checked through col2im against the reference)."""
    import numpy as np

    from fastnn import _bench
    from fastnn.kernels import reference

    dims = (2, 7, 6, 3, 4, 3)
    n, h, w, c, o, k = dims
    p, q = h - k + 1, w - k + 1
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, h, w, c))
    wt = rng.standard_normal((k, k, c, o))
    dz = rng.standard_normal((n, p, q, o))
    a_shape, b_shape, c_shape, ta, tb = _bench.conv_gemm_shapes(kernel, dims)
    cols = reference._im2col(x, k, k, (1, 1), (0, 0, 0, 0), p, q)
    out = np.empty(c_shape)
    if kernel == "conv2d_forward":
        a, b = cols, wt.reshape(k * k * c, o)
        _bench.np_gemm(a, b, out, ta, tb)
        expected = np.empty((n, p, q, o))
        reference.conv2d_forward(x, wt, np.zeros(o), "identity", expected)
        np.testing.assert_allclose(out, expected.reshape(-1, o), rtol=1e-12, atol=1e-12)
    elif kernel == "conv2d_backward":
        a, b = cols, dz.reshape(-1, o)
        _bench.np_gemm(a, b, out, ta, tb)
        dw, db = np.empty_like(wt), np.empty(o)
        reference.conv2d_backward(x, dz, dw, db)
        np.testing.assert_allclose(out, dw.reshape(-1, o), rtol=1e-12, atol=1e-12)
    else:
        a, b = dz.reshape(-1, o), wt.reshape(k * k * c, o)
        _bench.np_gemm(a, b, out, ta, tb)
        # col2im of the column gradient by hand: every window adds its column back
        dx = np.zeros_like(x)
        blocks = out.reshape(n, p, q, k, k, c)
        for i in range(k):
            for j in range(k):
                dx[:, i:i + p, j:j + q, :] += blocks[:, :, :, i, j, :]
        expected = np.empty_like(x)
        reference.conv2d_backprop(dz, wt, None, x, "identity", expected)
        np.testing.assert_allclose(dx, expected, rtol=1e-12, atol=1e-12)
    assert (a.shape, b.shape, out.shape) == (a_shape, b_shape, c_shape)


@pytest.mark.parametrize("network", ["convnet", "cnn"])
def test_kernel_convnet_steps_agree_across_backends(network):
    """``KernelConvNet`` (the convnets' "numpy (plain)" and "kernel step" rows)
    gives the same losses on every CPU backend as on the NumPy reference."""
    import numpy as np

    from fastnn import _bench

    x, y = _bench.network_data(network, 64)
    losses = {}
    for b in ["numpy"] + CPU:
        net = _bench.KernelConvNet(b, 32, network)
        losses[b] = [net.step(x[s:s + 32], y[s:s + 32]) for s in (0, 32, 0)]
    for b in CPU:
        np.testing.assert_allclose(losses[b], losses["numpy"], rtol=2e-5, err_msg=b)


def test_kernel_cnn_first_loss_matches_an_independent_forward():
    """Seed 003's network in ``KernelConvNet``: the first step's loss against
    a forward pass written with sliding windows and einsum in float64."""
    import numpy as np

    from fastnn import _bench

    x, y = _bench.network_data("cnn", 32)
    net = _bench.KernelConvNet("numpy", 32, "cnn", dtype="float64")
    x = x.astype(np.float64)
    w1, b1, w2, b2 = (a.copy() for a in net.w)
    win = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))  # n,26,26,1,3,3
    z1 = np.einsum("npqcij,ijco->npqo", win, w1) + b1
    logits = np.maximum(z1, 0).reshape(32, -1) @ w2 + b2
    m = logits.max(1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
    expected = -logp[np.arange(32), y].mean()
    assert abs(net.step(x, y) - expected) < 1e-10 * max(1, abs(expected))
    # and it learns: small Adam steps on the same batch lower its loss
    net = _bench.KernelConvNet("numpy", 32, "cnn", dtype="float64", lr=1e-5)
    losses = [net.step(x, y) for _ in range(4)]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0]


def test_run_training_has_the_convnet_rows():
    """``run_training`` on the two convnets: the NumPy baseline, fastnn on each
    backend, the kernel steps and the GEMM ceiling, with their ratios (no peers,
    tiny epochs: no timed assertion)."""
    from fastnn import _bench

    backends = ["numpy"] + CPU[:1]
    rows, skipped = _bench.run_training(backends, batches=(32,), n=64, repeats=3, peers=False,
                                        networks=("convnet", "cnn"))
    assert not skipped, skipped
    by = {(r.network, r.contender): r for r in rows}
    for net in ("convnet", "cnn"):
        names = {c for n, c in by if n == net}
        assert names == {"numpy (plain)", "fastnn[numpy]", "GEMMs only"} | {
            f"{k}[{b}]" for b in CPU[:1] for k in ("fastnn", "kernel step")}
        assert by[net, "numpy (plain)"].vs_numpy == 1.0
        for b in CPU[:1]:
            r = by[net, f"fastnn[{b}]"]
            assert r.samples_per_s > 0 and r.vs_kernels > 0 and r.vs_torch is None
            assert r.of_ceiling > 0 and r.batch == 32


@pytest.mark.parametrize("network", ["convnet", "cnn"])
def test_torch_convnet_epochs(network):
    """PyTorch's convnet epochs in its own process (skipped without torch)."""
    from fastnn import _bench

    ok, why = _bench.torch_available()
    if not ok:
        pytest.skip(why)
    res = _bench.torch_epochs([32], 64, 2, network=network)
    assert res["network"] == network and len(res["epoch_s"][32]) == 2
    assert all(t > 0 for t in res["epoch_s"][32])


def test_run_data_rows():
    """The data-at-scale rows: a fresh process per framework, wall samples/s and
    the resident peak over the data (a small generated set here)."""
    from fastnn import _bench

    peers = _bench.torch_available()[0]
    rows, notes = _bench.run_data(sets=(("generated", 2048),), batch=128, peers=peers)
    assert not notes, notes
    assert [r.contender.split("[")[0] for r in rows] == ["fastnn"] + (
        ["pytorch DataLoader"] if peers else [])
    for r in rows:
        assert r.samples == 2048 and r.batch == 128 and r.samples_per_s > 0
        assert r.data_bytes == 2048 * (784 * 4 + 8) and r.peak_over_data is not None
    assert rows[0].step_samples_per_s > 0


def test_fit_process_stages_and_memmap(tmp_path):
    """``fit_process`` on a read-only memmap with shuffle="batch": the stages'
    resident sizes and tracemalloc's figures are there."""
    import numpy as np

    from fastnn import _bench

    x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32,
                                  shape=(600, 784))
    x[:] = np.random.default_rng(0).random((600, 784), dtype=np.float32)
    x.flush()
    del x
    np.save(tmp_path / "y.npy", np.arange(600) % 10)
    r = _bench.fit_process("fastnn", data="memmap", path=str(tmp_path / "x.npy"),
                           ypath=str(tmp_path / "y.npy"), shuffle="batch", trace=True)
    assert r["n"] == 600 and r["samples_per_s"] > 0
    assert set(r["stages"]) == {"start", "imports", "data", "ready", "end"}
    assert r["traced"]["model"] > 0 and r["traced"]["peak"] >= r["traced"]["before"]
    if r["peak_resets"]:
        assert _bench.peak_over(r, "ready") >= 0 and _bench.peak_over(r) >= 0


def test_bench_cli_convnet_section(tmp_path):
    """``bench --quick --only cnn``: seed 003's network's training table, and no
    other section."""
    proc = subprocess.run(
        [sys.executable, "-m", "fastnn", "bench", "--quick", "--only", "cnn", "--repeats", "3",
         "--threads", "1", "--backends", "cython", "--no-progress", "--no-peers", "--out",
         str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = (tmp_path / "report.md").read_text()
    assert "## Training: seed 003's network" in report
    assert "| 32 | kernel step[cython] |" in report and "of kernel step" in report
    for other in ("## Kernels", "## Training: 784", "## Training: Keras", "## Data at scale",
                  "## Start-up"):
        assert other not in report
    res = json.loads((tmp_path / "results.json").read_text())
    assert {r["network"] for r in res["training"]} == {"cnn"} and res["data"] == []


def test_bench_sections_chosen():
    from fastnn import __main__ as cli
    from fastnn import _cli_bench

    parse = cli.build_parser().parse_args
    args = parse(["bench", "--quick"])
    assert _cli_bench._networks(args) == ("mlp", "convnet", "cnn")
    assert not _cli_bench._data_selected(args)          # --quick leaves the data section out
    assert _cli_bench._data_selected(parse(["bench"]))
    args = parse(["bench", "--quick", "--only", "data"])
    assert _cli_bench._data_selected(args) and _cli_bench._networks(args) == ()
    assert _cli_bench._networks(parse(["bench", "--only", "convnet,softmax"])) == ("convnet",)


@needs_goals
def test_goals_smoke():
    """``benchmarks/goals.py --smoke``: every section runs at tiny sizes and
    prints its goals as PASS/FAIL/INFO lines and a summary (no timed assertion:
    the figures of a smoke run mean nothing)."""
    sections = "kernels,conv,training,data,startup,gpu,thresholds"
    proc = subprocess.run(
        [sys.executable, GOALS, "--smoke", "--threads",
         "1", "--no-torch", "--section", sections],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "SMOKE RUN" in out and "stopped" not in out, out
    for name in sections.split(","):
        assert f"\n== {name}: " in out
    lines = [line.strip() for line in out.splitlines()]
    verdicts = [line.split()[0] for line in lines if line[:4] in ("PASS", "FAIL", "INFO")]
    assert len(verdicts) > 40
    for issue in ("#4 ", "#5 ", "#6 ", "#14", "#16", "#17"):
        assert any(line[6:9] == issue[:3] for line in lines if line[:4] in ("PASS", "FAIL")), issue
    assert "goals PASS" in out and "serial" in out     # the summary; the thresholds table


@needs_goals
def test_goals_unknown_section():
    proc = subprocess.run([sys.executable, GOALS, "--section", "nope"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "unknown section" in proc.stderr


def test_measure_turns_the_order_each_round():
    """``_bench.measure`` samples round robin, the order turned by one each
    round, so no callable always runs right after the same neighbour."""
    from fastnn import _bench

    log = []
    fns = {name: (lambda name=name: log.append(name)) for name in "abc"}
    times = _bench.measure(fns, repeats=3, min_time=0.0, warmup=0)
    assert set(times) == set("abc") and all(t >= 0 for t in times.values())
    assert log[:3] == list("abc")                          # one probe call each
    assert log[3:] == list("abc") + list("bca") + list("cab")
