"""The registry and the conventions of the contract: names, availability,
selection (process default, FASTNN_BACKEND, thread-local use_backend),
fallbacks, complete backends, return values, threads, lazy imports."""

import inspect
import os
import subprocess
import sys
import threading
import types

import numpy as np
import pytest

import fastnn
from fastnn import _backend
from fastnn.kernels import reference as ref
from conftest import BACKENDS


def _python(code, **env):
    """Run ``code`` in a fresh interpreter (outside the source tree) and return stdout."""
    full_env = {k: v for k, v in os.environ.items() if k != "FASTNN_BACKEND"}
    full_env.update(env)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, cwd=os.path.dirname(os.path.abspath(__file__)) + "/..",
                          timeout=300)
    return proc


def test_backends_report():
    info = fastnn.backends()
    assert list(info) == ["numpy", "cython", "numba", "cuda"]
    for name, b in info.items():
        assert isinstance(b, fastnn.BackendInfo)
        assert isinstance(b.available, bool) and isinstance(b.reason, str)
        assert isinstance(b.fallbacks, tuple)
        if not b.available:
            assert b.reason, f"{name} is unavailable without a reason"
    assert info["numpy"] == fastnn.BackendInfo(True, "", ())


def test_cython_is_built_and_default():
    """The package is installed with its extensions in CI: cython is
    available and the automatic default."""
    assert fastnn.backends()["cython"].available, fastnn.backends()["cython"].reason
    proc = _python("import fastnn; print(fastnn.get_backend())")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "cython"


def test_import_is_light():
    proc = _python("import sys, fastnn; print('numba' in sys.modules, 'fastnn.kernels.numba_cpu' "
                   "in sys.modules, 'tqdm' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False", "False"]


def test_environment_variable_selects_backend():
    proc = _python("import fastnn; print(fastnn.get_backend())", FASTNN_BACKEND="numpy")
    assert proc.stdout.strip() == "numpy", proc.stderr
    proc = _python("import fastnn; fastnn.get_backend()", FASTNN_BACKEND="tensorflow")
    assert proc.returncode != 0
    assert "FASTNN_BACKEND='tensorflow' is not a backend; choose one of numpy, cython" in proc.stderr


def test_unknown_backend_lists_choices():
    with pytest.raises(ValueError, match="unknown backend 'torch'; choose one of numpy, cython, numba, cuda"):
        fastnn.set_backend("torch")
    with pytest.raises(TypeError, match="backend name must be a str"):
        fastnn.set_backend(3)
    with pytest.raises(ValueError, match="unknown backend"):
        with fastnn.use_backend("jax"):
            pass


def test_unavailable_backend_says_why_and_changes_nothing(monkeypatch):
    monkeypatch.setitem(_backend.MODULES, "numba", "fastnn.kernels._no_such_module")
    monkeypatch.delitem(_backend._loaded, "numba", raising=False)
    monkeypatch.delitem(_backend._failed, "numba", raising=False)
    before = fastnn.get_backend()
    with pytest.raises(fastnn.BackendUnavailable, match="backend 'numba' is not available: .*_no_such_module"):
        fastnn.set_backend("numba")
    assert fastnn.get_backend() == before
    assert not fastnn.backends()["numba"].available
    monkeypatch.delitem(_backend._failed, "numba")


def test_set_backend_and_use_backend_nest():
    fastnn.set_backend("numpy")
    assert fastnn.get_backend() == "numpy"
    with fastnn.use_backend("cython") as be:
        assert be.name == "cython" and fastnn.get_backend() == "cython"
        with fastnn.use_backend("numpy"):
            assert fastnn.get_backend() == "numpy"
        assert fastnn.get_backend() == "cython"
    assert fastnn.get_backend() == "numpy"


def test_use_backend_is_thread_local():
    fastnn.set_backend("cython")
    entered, release = threading.Event(), threading.Event()
    seen = {}

    def worker():
        with fastnn.use_backend("numpy"):
            entered.set()
            release.wait(10)
            seen["worker"] = fastnn.get_backend()

    t = threading.Thread(target=worker)
    t.start()
    entered.wait(10)
    seen["main"] = fastnn.get_backend()
    release.set()
    t.join()
    assert seen == {"worker": "numpy", "main": "cython"}


def test_reference_defines_the_contract():
    for name in ref.CONTRACT:
        assert callable(getattr(ref, name)), name
    assert set(ref.ACTIVATIONS) == set(ref.Y_ACTIVATIONS) | set(ref.Z_ACTIVATIONS)
    assert len(ref.ACTIVATIONS) == 8


def test_ops_have_reference_signatures():
    for name in ref.CONTRACT:
        op = getattr(fastnn.ops, name)
        assert inspect.signature(op) == inspect.signature(getattr(ref, name)), name
        assert op.__doc__ and "``" in op.__doc__


@pytest.mark.parametrize("backend", BACKENDS)
def test_complete_backends_export_the_whole_contract(backend):
    be = _backend.load(backend)
    module = be.module
    if not be.complete:
        assert be.fallbacks, f"{backend} is partial, so it must name its fallbacks"
        return
    # PENDING: new rows of the contract a complete backend has not implemented yet
    pending = tuple(getattr(module, "PENDING", ()))
    assert set(pending) <= set(ref.CONTRACT)
    missing = [k for k in ref.CONTRACT if not callable(getattr(module, k, None))]
    assert missing == [k for k in ref.CONTRACT if k in pending], \
        f"{backend} is COMPLETE but lacks {missing} (pending: {pending})"
    assert be.fallbacks == tuple(missing)
    for k in ref.CONTRACT:
        if k in pending:
            continue
        params = list(inspect.signature(getattr(module, k)).parameters) if _has_signature(
            getattr(module, k)) else None
        if params is not None:
            assert params == list(inspect.signature(getattr(ref, k)).parameters), k


def _has_signature(f):
    try:
        inspect.signature(f)
        return True
    except (TypeError, ValueError):
        return False


def test_partial_backend_falls_back_per_kernel_and_activation():
    calls = []

    def activation_forward(act, z, out):
        calls.append(act)
        out[...] = 42

    fake = types.SimpleNamespace(activation_forward=activation_forward, ACTIVATIONS=("relu",))
    be = _backend.Backend("fake", fake)
    assert "dense_forward" in be.fallbacks and "adam_step" in be.fallbacks
    assert "activation_forward[gelu]" in be.fallbacks
    assert "activation_forward[relu]" not in be.fallbacks
    z = np.linspace(-1, 1, 5)
    out = np.empty_like(z)
    be.activation_forward("relu", z, out)
    np.testing.assert_array_equal(out, 42)
    be.activation_forward("gelu", z, out)
    expected = np.empty_like(z)
    ref.activation_forward("gelu", z, expected)
    np.testing.assert_array_equal(out, expected)
    be.activation_forward(act="relu", z=z, out=out)
    assert calls == ["relu", "relu"]
    assert be.adam_step is ref.adam_step


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_values(backend):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4))
    labels = np.array([0, 1, 3])
    with fastnn.use_backend(backend):
        assert fastnn.ops.dense_forward(x, np.ones((4, 4)), np.zeros(4), "relu", np.empty((3, 4))) is None
        assert fastnn.ops.activation_forward("tanh", x, np.empty_like(x)) is None
        assert fastnn.ops.softmax(x, np.empty_like(x)) is None
        for loss in (fastnn.ops.softmax_cross_entropy(x, labels, np.empty_like(x)),
                     fastnn.ops.mse(x, x * 0, np.empty_like(x)),
                     fastnn.ops.sigmoid_binary_cross_entropy(x, np.ones_like(x), np.empty_like(x))):
            assert type(loss) is float
        assert fastnn.ops.sgd_step(np.ones(3), np.ones(3), None, 0.1, 0.0, False, 0.0, 0.0) is None


def test_set_num_threads():
    n = fastnn.get_num_threads()
    assert 1 <= n <= fastnn._threads.cpu_count()
    with fastnn.num_threads(1):
        assert fastnn.get_num_threads() == 1
        from threadpoolctl import threadpool_info
        assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")
    assert fastnn.get_num_threads() == n
    with pytest.raises(ValueError, match="n must be between 1 and"):
        fastnn.set_num_threads(fastnn._threads.cpu_count() + 1)
    with pytest.raises(ValueError):
        fastnn.set_num_threads(0)
    with pytest.raises(TypeError, match="n must be an int"):
        fastnn.set_num_threads(1.5)
    assert fastnn.get_num_threads() == n


def test_info_command():
    proc = _python("import fastnn.__main__ as m; m.main(['info'])")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"fastnn {fastnn.__version__}" in out
    for name in ("numpy", "cython", "numba", "cuda"):
        assert f"  {name}" in out
    assert "thread pools" in out and "blas" in out


# ------------------------------------------------------------------ fastnn.ops dispatch

def _spy(name, seen):
    """A partial backend whose activation_forward records (backend, thread)."""
    def activation_forward(act, z, out):
        seen.append((name, threading.current_thread().name))
        ref.activation_forward(act, z, out)
    return _backend.Backend(name, types.SimpleNamespace(activation_forward=activation_forward))


def test_ops_follow_the_backend_between_calls(monkeypatch):
    """fastnn.ops resolves each backend's kernels once, but a call after
    set_backend runs on the new backend."""
    seen = []
    monkeypatch.setitem(_backend._loaded, "numba", _spy("numba", seen))
    monkeypatch.setitem(_backend._loaded, "cuda", _spy("cuda", seen))
    z = np.linspace(-1, 1, 6).reshape(2, 3)
    out = np.empty_like(z)
    me = threading.current_thread().name
    fastnn.set_backend("numpy")
    fastnn.ops.activation_forward("relu", z, out)
    assert seen == []
    fastnn.set_backend("numba")
    fastnn.ops.activation_forward("relu", z, out)
    fastnn.set_backend("cuda")
    fastnn.ops.activation_forward("relu", z, out)
    fastnn.ops.activation_forward("relu", z, out)
    fastnn.set_backend("numpy")
    fastnn.ops.activation_forward("relu", z, out)
    with fastnn.use_backend("numba"):
        fastnn.ops.activation_forward("relu", z, out)
    fastnn.ops.activation_forward("relu", z, out)
    assert seen == [("numba", me), ("cuda", me), ("cuda", me), ("numba", me)]
    np.testing.assert_array_equal(out, np.maximum(z, 0))


def test_ops_dispatch_per_thread(monkeypatch):
    """Two threads in use_backend of two backends, calling in turn: each call
    runs on its own thread's backend; the main thread keeps the default."""
    seen = []
    monkeypatch.setitem(_backend._loaded, "numba", _spy("numba", seen))
    monkeypatch.setitem(_backend._loaded, "cuda", _spy("cuda", seen))
    fastnn.set_backend("numpy")
    turn = threading.Barrier(2, timeout=30)
    errors = []

    def worker():
        name = threading.current_thread().name
        z = np.ones((4, 5))
        out = np.empty_like(z)
        try:
            with fastnn.use_backend(name):
                for _ in range(40):
                    turn.wait()             # the two threads alternate call by call
                    fastnn.ops.activation_forward("relu", z, out)
        except Exception as exc:            # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, name=n) for n in ("numba", "cuda")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(seen) == 80 and all(backend == thread for backend, thread in seen)
    assert {b for b, _ in seen} == {"numba", "cuda"}
    z = np.ones(3)
    fastnn.ops.activation_forward("relu", z, np.empty_like(z))
    assert len(seen) == 80 and fastnn.get_backend() == "numpy"


def test_ops_see_a_kernel_replaced_on_a_backend(monkeypatch):
    be = _backend.load("numpy")
    calls = []
    z = np.ones((2, 3))
    with fastnn.use_backend("numpy"):
        fastnn.ops.softmax(z, np.empty_like(z))
        monkeypatch.setattr(be, "softmax", lambda z, out: calls.append(z.shape))
        fastnn.ops.softmax(z, np.empty_like(z))
        monkeypatch.undo()
        fastnn.ops.softmax(z, np.empty_like(z))
    assert calls == [(2, 3)]
