"""Data-parallel training over MPI (fastnn.distributed, issue 18).

The MPI tests launch ``mpiexec -n N python tests/_distributed_worker.py CASE``
in a new session with a timeout, so a hang fails the test (and the whole
process group is killed) instead of blocking the run. The single-process
references are computed here, by the same builders the worker uses.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fastnn as fn
from fastnn import distributed

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_distributed_worker.py"
sys.path.insert(0, str(HERE))
import _distributed_worker as worker  # noqa: E402

#: a run that trains for a few seconds gets minutes before it counts as hung
#: (the machine may be loaded); a failure must end every rank long before that
TIMEOUT = 300


def _mpiexec():
    """The mpiexec next to this interpreter (the ``mpich`` wheel's, matching
    mpi4py's library), else the first on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        return str(here)
    import shutil

    return shutil.which("mpiexec")


def _skip_reason():
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install -e '.[mpi]')"
    if _mpiexec() is None:
        return "no mpiexec (pip install -e '.[mpi]' brings MPICH's)"
    return None


needs_mpi = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def test_mpi_present_where_required():
    """.ci/run sets FASTNN_REQUIRE_MPI=1 where it installed the mpi extra, so
    that the tests below cannot pass by skipping."""
    if os.environ.get("FASTNN_REQUIRE_MPI") == "1":
        assert _skip_reason() is None, _skip_reason()


def run_ranks(n, args, timeout=TIMEOUT, module=False):
    """``mpiexec -n n python WORKER *args`` (or ``python -m *args``): returns
    ``(returncode, stdout, stderr, seconds)``; a run past ``timeout`` is killed
    with its whole process group and fails the test."""
    cmd = [_mpiexec(), "-n", str(n), sys.executable]
    cmd += ["-m", *args] if module else [str(WORKER), *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True, cwd=HERE.parent)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} hung: killed after {timeout} s\nstdout:\n{out}\n"
                    f"stderr:\n{err}")
    return proc.returncode, out, err, time.monotonic() - t0


# ---------------------------------------------------------------- without MPI

def test_import_fastnn_does_not_import_mpi4py():
    code = ("import sys, fastnn; fastnn.distributed.is_initialized(); fastnn.Sequential; "
            "print(sorted(m for m in sys.modules if m.startswith('mpi4py')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 31, 32, 33, 100])
def test_split_covers_every_row_once(n, size):
    parts = [distributed.split(n, r, size) for r in range(size)]
    rows = np.concatenate([np.arange(lo, hi) for lo, hi in parts])
    np.testing.assert_array_equal(rows, np.arange(n))
    counts = [hi - lo for lo, hi in parts]
    assert max(counts) - min(counts) <= 1
    assert max(counts) <= -(-n // size)   # what plan_rows allocates


def test_rank_seeds_draw_independent_masks():
    """Rank 1's mask is not rank 0's, nor rank 0's shifted by an element (what
    ``seed + rank * golden`` would give): the masks agree where two independent
    draws would, on keep**2 + drop**2 of the elements, within 5 standard
    deviations, at shifts -1, 0 and 1."""
    rate, n = 0.3, 1 << 18
    x = np.ones(n + 1, np.float32)
    seed = 0x1234_5678_9ABC_DEF0

    def mask(s):
        out = np.empty_like(x)
        fn.ops.dropout_forward(x, rate, s, out)
        return out != 0

    masks = [mask(distributed.rank_seed(seed, r)) for r in range(3)]
    p = (1 - rate) ** 2 + rate ** 2
    sd = np.sqrt(p * (1 - p) / n)
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        for ma, mb in [(masks[a][:n], masks[b][:n]), (masks[a][1:], masks[b][:n]),
                       (masks[a][:n], masks[b][1:])]:
            assert abs(np.mean(ma == mb) - p) < 5 * sd, (a, b)
    # the folding this avoids: seed + golden is the mask of seed shifted by one
    golden = 0x9E3779B97F4A7C15
    assert np.array_equal(mask((seed + golden) % (1 << 64))[:n], mask(seed)[1:])


def test_mix64_is_splitmix64():
    # SplitMix64's first output from state 0 is mix64(0x9E3779B97F4A7C15)
    assert distributed._mix64(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF
    assert distributed._mix64(0) == 0


def test_single_process_without_init_is_not_distributed():
    assert not distributed.is_initialized()
    assert (distributed.rank(), distributed.size()) == (0, 1)
    assert distributed._resolve(None) is None


# ---------------------------------------------------------------- under mpiexec

@pytest.fixture(scope="module")
def references():
    """One process, batch 32, the same data order: per case (params, history, evaluate)."""
    return {case: worker.train(*case)[:3] for case in worker.cases()}


@pytest.fixture(scope="module", params=[(2, "buffer"), (2, "layers"), (3, "buffer"),
                                        (3, "layers")], ids=lambda p: f"{p[0]}ranks-{p[1]}")
def equivalence_run(request, tmp_path_factory):
    if _skip_reason():
        pytest.skip(_skip_reason())
    ranks, reduce = request.param
    out = tmp_path_factory.mktemp(f"eq{ranks}{reduce}")
    rc, stdout, stderr, _ = run_ranks(ranks, ["equivalence", str(out), reduce])
    assert rc == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    with np.load(out / "equivalence.npz") as z:
        params = {k: z[k] for k in z.files}
    meta = json.loads((out / "equivalence.json").read_text())
    assert meta["ranks"] == ranks
    return ranks, out, params, meta["cases"]


@needs_mpi
@pytest.mark.parametrize("case", worker.cases(), ids="-".join)
def test_ranks_train_as_one_process(equivalence_run, references, case):
    """N ranks with a global batch of 32 (3 ranks: slices of 10/11/11, and no
    row at all for rank 0 in the last batch of 2) end 20 steps with the
    parameters of one process with batch 32 on the same data order, relative
    to the largest parameter: float64 1e-12, float32 1e-5. Loss, validation
    and evaluate figures agree likewise; accuracy to one row."""
    ranks, _, params, meta = equivalence_run
    key = "-".join(case)
    ref_params, ref_hist, ref_eval = references[case]
    rtol = 1e-12 if case[2] == "float64" else 1e-5
    got = params[key]
    assert got.dtype == ref_params.dtype and got.shape == ref_params.shape
    err = np.max(np.abs(got - ref_params)) / np.max(np.abs(ref_params))
    assert err <= rtol, f"{ranks} ranks: max relative difference {err:.3g}"
    m = meta[key]
    assert m["same_on_all_ranks"]
    assert m["iterations"] == 20
    for k in ("loss", "val_loss"):
        assert m["history"][k] == pytest.approx(ref_hist[k], rel=rtol), k
    assert m["evaluate"]["loss"] == pytest.approx(ref_eval["loss"], rel=rtol)
    for got_acc, want in [(m["history"]["accuracy"], ref_hist["accuracy"]),
                          (m["history"]["val_accuracy"], ref_hist["val_accuracy"]),
                          (m["evaluate"]["accuracy"], ref_eval["accuracy"])]:
        assert abs(got_acc - want) <= 1 / 101 + 1e-12


@needs_mpi
def test_only_rank_0_saves(equivalence_run):
    ranks, out, params, _ = equivalence_run
    assert (out / "model_0.npz").exists()
    assert not any((out / f"model_{r}.npz").exists() for r in range(1, ranks))
    saved = fn.load_model(out / "model_0.npz")
    np.testing.assert_array_equal(saved.params, params["convnet-rmsprop-float64"])


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_parameters_bit_identical_across_ranks(tmp_path, ranks):
    """100 steps of an MLP with dropout (each rank its own masks) on N ranks:
    parameters and Adam's first moment hash the same on every rank."""
    rc, stdout, stderr, _ = run_ranks(ranks, ["identical", str(tmp_path)])
    assert rc == 0, stderr
    sums = json.loads((tmp_path / "identical.json").read_text())
    assert len(sums) == ranks
    assert all(s[1] == 100 for s in sums)
    assert len({s[0] for s in sums}) == 1, sums
    assert len({s[2] for s in sums}) == 1, sums


@needs_mpi
def test_batch_callbacks_and_early_stopping_as_one_process(tmp_path):
    """With a callback defining on_batch_end, each batch's loss in the logs is
    the global batch's (summed over the ranks); a stop set on rank 1 alone
    stops every rank at that batch (epoch 1, batch 5); EarlyStopping stops and
    restores at the epoch one process does. 3 ranks."""
    (ref_params, ref_losses, ref_epochs), (ref_params2, ref_epochs2) = worker.train_callbacks()
    assert (len(ref_losses), ref_epochs) == (20 + 6, 2)
    assert ref_epochs2 < 8   # it did stop early
    rc, stdout, stderr, _ = run_ranks(3, ["callbacks", str(tmp_path)])
    assert rc == 0, stderr
    with np.load(tmp_path / "callbacks.npz") as z:
        got = {k: z[k] for k in z.files}
    assert bool(got["same"])
    assert (int(got["epochs"]), int(got["epochs2"])) == (ref_epochs, ref_epochs2)
    np.testing.assert_allclose(got["losses"], ref_losses, rtol=1e-12)
    for key, ref in [("params", ref_params), ("params2", ref_params2)]:
        err = np.max(np.abs(got[key] - ref)) / np.max(np.abs(ref))
        assert err <= 1e-12, key


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_memmap_rows_are_read_ahead_on_every_rank(tmp_path, ranks):
    """Each rank reads its parts of the batches of a memmap through the
    read-ahead thread (``shuffle="batch"`` and in order), and trains as it
    does on the same rows in memory, bit for bit."""
    rc, stdout, stderr, _ = run_ranks(ranks, ["memmap", str(tmp_path)])
    assert rc == 0, stderr
    sums = json.loads((tmp_path / "memmap.json").read_text())
    assert len(sums) == ranks
    for result, served in sums:
        assert result == {"batch": True, "False": True}
        # two epochs of each of the two orders, 41 batches, every one of them
        assert served >= 2 * 2 * 40, served


def _assert_all_ended(rc, stdout, stderr, message, failing_rank):
    assert rc != 0
    assert message in stderr
    assert f"on rank {failing_rank} of 2; aborting every rank" in stderr
    assert "finished training" not in stdout and "passed the save" not in stdout


@needs_mpi
def test_exception_on_rank_1_ends_rank_0(tmp_path):
    """Rank 1 raises at its 5th step of a 50-epoch run while rank 0 waits in the
    gradient sum: both end, with rank 1's message and a non-zero exit (the
    timeout is the hang check)."""
    rc, stdout, stderr, seconds = run_ranks(2, ["raise", str(tmp_path)], timeout=120)
    _assert_all_ended(rc, stdout, stderr, "RuntimeError: injected failure on rank 1 at step 5", 1)


@needs_mpi
def test_bad_data_on_one_rank_ends_every_rank(tmp_path):
    rc, stdout, stderr, _ = run_ranks(2, ["nan", str(tmp_path)], timeout=120)
    _assert_all_ended(rc, stdout, stderr, "x holds NaN or inf, first in row 100", 1)


@needs_mpi
def test_full_disk_on_rank_0_save_ends_every_rank(tmp_path):
    rc, stdout, stderr, _ = run_ranks(2, ["save_fail", str(tmp_path)], timeout=120)
    _assert_all_ended(rc, stdout, stderr, "No space left on device (injected)", 0)
    assert not (tmp_path / "model.npz").exists()


@needs_mpi
def test_data_of_another_shape_caught_before_training(tmp_path):
    """Rank 1 has 600 rows where rank 0 has 610: every rank raises the same
    ValueError before the model changes (no step, parameters as they were)."""
    rc, stdout, stderr, _ = run_ranks(2, ["mismatch", str(tmp_path)], timeout=120)
    assert rc == 0, stderr
    for r in range(2):
        assert (f"rank {r}: ValueError: x differs between ranks: shape (610, 20) float64 on "
                f"rank 0, shape (600, 20) float64 on rank 1") in stdout
        assert stdout.count(f"rank {r}: ValueError") == 1
    assert stdout.count("unchanged=True") == 2


@needs_mpi
@pytest.mark.parametrize("model", ["mlp", "convnet"])
def test_cli_train_distributed(model):
    """``mpiexec -n 2 python -m fastnn train --distributed``: rank 0 prints what
    one process prints, once, plus the rank count and the per-rank rate."""
    args = ["fastnn", "train", "--distributed", "--epochs", "1", "--model", model]
    rc, stdout, stderr, _ = run_ranks(2, args, module=True)
    assert rc == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    assert stdout.count("test accuracy") == 1
    assert stdout.count("fastnn ") == 1
    assert "distributed: 2 ranks" in stdout
    assert "per rank" in stdout
    acc = float(stdout.split("test accuracy ")[1].split()[0])
    assert acc > 0.5   # one epoch on 4,000 images: far above chance (0.1)
