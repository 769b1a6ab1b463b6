"""Runtime of the numba backend: the cache folder (chosen before numba is
imported), numba's threading layer, the compile options, the serial/parallel
launch of loop bodies and the specialisation table, and the backend hooks
(``available``, ``info``, ``set_num_threads``).

Every other module of the package imports this one first, so that
``NUMBA_CACHE_DIR`` is set before numba loads.
"""

import hashlib
import importlib
import inspect
import os
import tempfile
import threading

import numpy as np

# ------------------------------------------------------------ cache folder (before numba)

def _user_cache_dir(environ):
    """``$XDG_CACHE_HOME/fastnn/numba``, else ``~/.cache/fastnn/numba``."""
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastnn", "numba")


def _dir_writable(path):
    """Whether numba could write its cache into ``path`` (tried as numba does:
    create the folder and a temporary file in it; ``os.access`` is wrong for
    root and for read-only mounts)."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def _cache_plan(package_dir, environ, writable=_dir_writable):
    """Where compiled kernels are cached: ``(cache_dir_to_set, enabled)``.

    The first writable of: ``NUMBA_CACHE_DIR`` when the user set it, the
    package folder (``__pycache__`` next to this file, numba's default), the
    user's cache folder (``_user_cache_dir``; then it is returned, to be set
    as ``NUMBA_CACHE_DIR``). When none is writable (a read-only install run
    with no home), ``enabled`` is False: kernels compile in every process
    instead of failing (numba's ``cache=True`` raises without a cache folder).
    """
    user = environ.get("NUMBA_CACHE_DIR")
    if user and writable(user):
        return None, True
    if writable(os.path.join(package_dir, "__pycache__")):
        return None, True
    mine = _user_cache_dir(environ)
    if writable(mine):
        return mine, True
    return None, False


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_CACHE_DIR_SET, _CACHE_ENABLED = _cache_plan(_PACKAGE_DIR, os.environ)
if _CACHE_DIR_SET is not None:
    os.environ["NUMBA_CACHE_DIR"] = _CACHE_DIR_SET

import numba  # noqa: E402
from numba import njit, prange  # noqa: E402
from numba.extending import register_jitable  # noqa: E402

if _CACHE_DIR_SET is not None and numba.config.CACHE_DIR != _CACHE_DIR_SET:
    numba.config.CACHE_DIR = _CACHE_DIR_SET  # numba was imported before us


def _select_threading_layer():
    """Prefer ``omp`` (thread-safe) unless the user chose a layer. Returns
    whether parallel calls must be serialised by a lock (a layer that may be
    workqueue, which aborts on concurrent calls from Python threads)."""
    if os.environ.get("NUMBA_THREADING_LAYER"):
        return numba.config.THREADING_LAYER not in ("omp", "tbb", "safe", "threadsafe")
    try:
        importlib.import_module("numba.np.ufunc.omppool")
    except ImportError:
        # tbb if installed, else workqueue; which one is known after the first launch
        return True
    numba.config.THREADING_LAYER = "omp"
    return False


_SERIALISE_PARALLEL = _select_threading_layer()
_parallel_lock = threading.Lock()

#: Options of every compiled kernel.
_JIT = dict(cache=_CACHE_ENABLED, nogil=True, error_model="numpy")
#: Options of the inlined helpers (loop bodies, scalar functions).
_INNER = dict(error_model="numpy")


def _scalar(fn):
    """A helper callable from our kernels (compiled into them, inlined by LLVM)."""
    return register_jitable(**_INNER)(fn)


def _scalar_fma(fn):
    """A math helper whose ``a*b + c`` may become one FMA (``contract``: one
    rounding instead of two; no other fast-math assumption, so infinities and
    NaN keep their IEEE meaning). Used for polynomials, not for the optimizers
    (those match the reference bit for bit)."""
    return register_jitable(error_model="numpy", fastmath={"contract"})(fn)


# ------------------------------------------------------------ serial / parallel launch

# Below these element counts a kernel runs its serial loop, above them the
# prange path. Measured on the development machine (2 cores, a KVM guest,
# numba 0.68 omp layer, GOMP_SPINCOUNT=1000 from fastnn/__init__.py, quiet:
# load < 0.8; ``python benchmarks/goals.py --section thresholds``). Serially,
# relu forward takes 66 us per 1 M float32 (memory-bound), sigmoid 190 us,
# Adam 180 us (in cache). A parallel call right after another one costs
# 1-2 us more than its work (relu over 4 k: 0.5 us serial, 1.7 us parallel),
# so back to back two threads win from ~100 k cheap elements and ~30 k
# transcendental or optimizer ones. But libgomp's workers fall asleep ~1 us
# after a region, and waking them costs ~50 us on this VM (relu over 4 k after
# a pause: 47 us, p10 of 400 calls). That is the case in a training step,
# where our kernels alternate with BLAS calls: the whole 784-256-128-10 Adam
# step ran 8-16% slower with thresholds of 128 k / 16 k / 32 k than fully
# serial, and as fast as serial with these. So a kernel goes parallel from
# 1 M elements, where it wins back to back and loses little or nothing after a
# wake-up: sigmoid over 1 M took 190 us serial, 97 us parallel and ~150 us
# parallel after a pause; Adam over 1 M 181 us, 97 us and ~150 us; relu over
# 1 M 66 us, 43 us and 77 us (p10; a cheap kernel that large follows a GEMM
# of milliseconds in a training step, so the 11 us are noise there), over
# 2 M 134 us and 73 us. A machine whose threads wake faster would profit
# sooner.
PARALLEL_MIN = {"cheap": 1 << 20, "exp": 1 << 20, "optimizer": 1 << 20}
_ALIGN = 64   # chunk boundaries at multiples of 64 elements (whole cache lines)


# A compiled function's symbol is named after its module, qualified name,
# argument types and a counter that starts at 1 in every process; numba links
# the functions a kernel calls into it as weak symbols, and a process that loads
# two cached kernels defining one symbol runs the first definition it loaded
# in both. So two closures of one factory compiled in two fresh processes
# (relu's loop in one, leaky_relu's in the other) got one symbol, and the
# process that loaded both from a shared cache ran relu's loop for leaky_relu.
# Every loop body and parallel driver is therefore named after what it
# computes (``fwd__leaky_relu``, ``adam__decoupled__wd``, ``par__fwd__relu``):
# one name, one computation, in every process (tests/test_numba_cache.py).
# The loop of a prange is compiled as a function of its own, which numba names
# ``__numba_parfor_gufunc_<address of an object>`` plus the per-process counter
# and its argument types, nothing of what it computes: where two processes put
# that object at one address (likely with address-space randomisation off) the
# loops of relu' and leaky_relu' got one symbol again (a CI run failed so).
# So the parallel drivers take the body into a local before the loop: it is then
# an argument of the loop, and its type, named after the body, is in the symbol.

def _named(fn, *tags):
    """``fn`` renamed ``name__tag1__tag2...`` (``__name__`` and
    ``__qualname__``, which numba's symbols and cache files are named after):
    the tags name everything the closure is specialised on."""
    fn.__name__ = fn.__qualname__ = "__".join((fn.__name__,) + tags)
    return fn


# numba checks a cached function against the time stamp and size of its own
# source file only, and our kernels call helpers from the package's other
# files (``_math.py``): a change there would leave stale kernels in the cache.
# So every cached entry point closes over a digest of all of the package's
# sources (``source`` below): closure variables are part of numba's cache key.

def _source_digest(folder):
    """sha256 (16 hex digits) of the ``.py`` files in ``folder``; empty when
    they cannot be read (then numba's own per-file check is all there is)."""
    digest = hashlib.sha256()
    try:
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as f:
                    digest.update(name.encode() + b"\0" + f.read() + b"\0")
    except OSError:
        return ""
    return digest.hexdigest()[:16]


_SOURCE = _source_digest(_PACKAGE_DIR)

# An entry point with the arguments of the function it calls, spelled out:
# ``*args`` would cost ~0.1 us more per call. Compiled with this file's name,
# which numba's cache needs to find a source file.
_ENTRY = """
def make(fn, source):
    def run({params}):
        source
        return fn({params})
    return run
"""
_entry_makers = {}


def _entry(fn, *tags):
    """``fn`` (callable from compiled code: ``_scalar`` or ``register_jitable``)
    as a cached kernel, named ``run__<fn's name>__<tags>``, whose cache entry
    also depends on every source file of the package (``_SOURCE``). Every
    ``njit`` function with ``cache=True`` of this package is made here or by
    ``_parallel``/``_parallel_sum``."""
    params = ", ".join(inspect.signature(fn).parameters)
    make = _entry_makers.get(params)
    if make is None:
        # __name__: numba pickles a compiled function's environment with the
        # name of its globals' module and imports it when it loads the entry
        # from the cache (without it: "'NoneType' object has no attribute
        # 'startswith'" in a second process)
        namespace = {"__name__": __name__}
        exec(compile(_ENTRY.format(params=params), __file__, "exec"), namespace)
        make = _entry_makers[params] = namespace["make"]
    return njit(**_JIT)(_named(make(fn, _SOURCE), fn.__name__, *tags))


class _Kernel:
    """A loop body over ``[lo, hi)`` compiled twice: ``run(lo, hi, *args)``
    (serial) and ``par(threads, n, align, *args)`` (static chunks in prange).
    ``body`` is a module-level function or a closure renamed by ``_named``
    (see above)."""

    __slots__ = ("run", "par", "align", "reduces")

    def __init__(self, body, align=_ALIGN, reduces=False):
        if "<locals>" in body.__qualname__:
            raise ValueError(f"{body.__qualname__}: a closure compiled with cache=True needs "
                             f"a name of its own (_named)")
        _scalar(body)  # callable from the entry points
        self.run = _entry(body)
        self.par = (_parallel_sum if reduces else _parallel)(body)
        self.align = align
        self.reduces = reduces


def _chunk(n, threads, align):
    step = (n + threads - 1) // threads
    return (step + align - 1) // align * align


register_jitable(_chunk)


def _parallel(body):
    source = _SOURCE

    def par(threads, n, align, *args):
        source  # noqa: B018 - in the cache key (see _SOURCE)
        run = body  # in the loop's symbol (see _named)
        step = _chunk(n, threads, align)
        for c in prange(threads):
            lo = c * step
            hi = min(n, lo + step)
            if lo < hi:
                run(lo, hi, *args)

    return njit(parallel=True, **_JIT)(_named(par, body.__name__))


def _parallel_sum(body):
    source = _SOURCE

    def par(threads, n, align, *args):
        source  # noqa: B018 - in the cache key (see _SOURCE)
        run = body  # in the loop's symbol (see _named)
        step = _chunk(n, threads, align)
        parts = np.zeros(threads)
        for c in prange(threads):
            lo = c * step
            hi = min(n, lo + step)
            if lo < hi:
                parts[c] = run(lo, hi, *args)
        total = 0.0
        for c in range(threads):
            total += parts[c]
        return total

    return njit(parallel=True, **_JIT)(_named(par, "sum", body.__name__))


_num_threads = 1
# numba's thread count is per Python thread; each one is set on its first
# parallel launch (and when fastnn's count changed). Calling
# numba.set_num_threads inside the compiled driver instead would make it
# uncachable (it embeds a function pointer).
_thread_state = threading.local()


# GNU OpenMP cannot start a parallel region in a child forked after the
# parent used it (numba then aborts the child: "fork() called from a process
# already using GNU OpenMP"); a forked child runs every kernel serially
# (fastnn._threads sets the flag from its at-fork hook).
from fastnn import _threads as _fastnn_threads  # noqa: E402


def _launch(kernel, n, min_parallel, *args):
    """Run ``kernel`` over ``n`` items (elements or rows), in parallel from
    ``min_parallel`` on. Returns what the body returns (losses: a float64 sum)."""
    threads = _num_threads
    if threads > 1 and n >= min_parallel and not _fastnn_threads.forked_child:
        if getattr(_thread_state, "threads", 0) != threads:
            numba.set_num_threads(threads)
            _thread_state.threads = threads
        if _SERIALISE_PARALLEL:
            with _parallel_lock:
                return kernel.par(threads, n, kernel.align, *args)
        return kernel.par(threads, n, kernel.align, *args)
    return kernel.run(0, n, *args)


_build_lock = threading.Lock()
_built = {}


def _specialised(key, factory, *params):
    """The kernels ``factory(*params)`` makes, built once per ``key``."""
    kernels = _built.get(key)
    if kernels is None:
        with _build_lock:
            kernels = _built.get(key)
            if kernels is None:
                kernels = _built[key] = factory(*params)
    return kernels


# ------------------------------------------------------------ backend hooks

def available():
    """numba imported; the caveats: no cache folder, a threading layer that is
    not thread-safe."""
    caveats = []
    if not _CACHE_ENABLED:
        caveats.append(f"no writable cache folder (package folder, {_user_cache_dir(os.environ)}"
                       f", NUMBA_CACHE_DIR): kernels compile in every process")
    if _SERIALISE_PARALLEL:
        caveats.append(f"numba threading layer {numba.config.THREADING_LAYER!r} may be "
                       f"workqueue (not thread-safe): parallel kernels are serialised across "
                       f"Python threads")
    return True, "; ".join(caveats)


def cache_dir():
    """Where compiled kernels are cached (``NUMBA_CACHE_DIR``, else next to
    this file), or None when nothing is writable (no caching)."""
    if not _CACHE_ENABLED:
        return None
    user = numba.config.CACHE_DIR
    if user and _dir_writable(user):
        return user
    return os.path.join(_PACKAGE_DIR, "__pycache__")


def threading_layer():
    """numba's threading layer: the one in use once a parallel kernel ran,
    else the configured choice."""
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel launch yet
        return f"{numba.config.THREADING_LAYER} (not started)"


def info():
    """Lines for ``python -m fastnn info``."""
    return {"numba": numba.__version__, "threading_layer": threading_layer(),
            "cache_dir": cache_dir(), "numba_threads": _num_threads,
            "parallel_min": dict(PARALLEL_MIN)}


def set_num_threads(n):
    """Use ``n`` threads in the parallel loops (``numba.set_num_threads``);
    fastnn's ``set_num_threads`` calls this with OpenMP and BLAS together."""
    global _num_threads
    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    _num_threads = n
    numba.set_num_threads(n)
    _thread_state.threads = n


def _init_threads():
    from fastnn._threads import get_num_threads

    set_num_threads(get_num_threads())


_init_threads()
