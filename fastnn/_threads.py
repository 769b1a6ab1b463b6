"""One thread knob for every pool: OpenMP (our Cython kernels), numba, and the
BLAS libraries of NumPy and SciPy (through threadpoolctl).

Pools that are sized independently oversubscribe the cores and fight (see
DESIGN.md, "Facts"), so fastnn sizes them all together. The default is every
core this process may run on.
"""

import contextlib
import os
import sys
import threading

_lock = threading.Lock()
_num_threads = None
_blas_limiter = None

#: True in a process forked (``os.fork``, multiprocessing's "fork" start method)
#: from one that had imported fastnn. GNU OpenMP cannot start a parallel region
#: in such a child once the parent used one (the child hangs, or numba aborts
#: it), so the backends run every kernel on one thread there.
forked_child = False


def _after_fork_in_child():
    global forked_child
    forked_child = True
    mod = sys.modules.get("fastnn.kernels.cython_cpu")
    if mod is not None:
        mod.set_num_threads(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def cpu_count():
    """Cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def get_num_threads():
    """The thread count every fastnn pool uses (default: ``cpu_count()``)."""
    return _num_threads if _num_threads is not None else cpu_count()


def _load_scipy_blas():
    """Load SciPy's BLAS (its own OpenBLAS) unless the loaded cython backend
    calls NumPy's, so that threadpoolctl sizes it now: a BLAS library loaded
    after ``threadpool_limits`` keeps its default thread count (the cython
    backend sizes it again when it switches to it). Costs ~0.15 s once."""
    cython = sys.modules.get("fastnn.kernels.cython_cpu")
    if cython is not None and cython.blas() == "numpy":
        return
    try:
        import scipy.linalg.cython_blas  # noqa: F401
    except ImportError:
        pass


def _apply_to_loaded_pools(n):
    """Size the pools that are loaded now; backends loaded later read
    ``get_num_threads()`` when they load."""
    global _blas_limiter
    from threadpoolctl import threadpool_limits

    _load_scipy_blas()
    _blas_limiter = threadpool_limits(limits=n)
    for mod_name in ("fastnn.kernels.cython_cpu", "fastnn.kernels.numba_cpu"):
        mod = sys.modules.get(mod_name)
        if mod is not None and hasattr(mod, "set_num_threads"):
            mod.set_num_threads(n)


def set_num_threads(n):
    """Set the threads of OpenMP, numba and BLAS together.

    Parameters
    ----------
    n : int or None
        Between 1 and ``cpu_count()``; None restores the default (all cores).
        More threads than cores only oversubscribe, so it is refused.
    """
    global _num_threads
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int or None, got {type(n).__name__}")
        if not 1 <= n <= cpu_count():
            raise ValueError(f"n must be between 1 and {cpu_count()} (the cores available), got {n}")
    with _lock:
        _num_threads = n
        _apply_to_loaded_pools(get_num_threads())


@contextlib.contextmanager
def num_threads(n):
    """``with fastnn.num_threads(1): ...`` sets the thread count for the block
    (process-wide, as the pools are) and restores the previous one."""
    previous = _num_threads
    set_num_threads(n)
    try:
        yield
    finally:
        set_num_threads(previous)
