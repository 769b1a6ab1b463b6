"""The backend registry: names, availability, selection.

A backend is a module under ``fastnn.kernels`` that exports the kernels of the
contract (``kernels.reference.CONTRACT``). Modules are imported only when a
backend is first used, so ``import fastnn`` imports no numba. A backend that
lacks a kernel, or an activation inside a kernel, runs the reference there;
``backends()`` lists those as its ``fallbacks``.

A backend module may define:

* ``available() -> (bool, reason)``: whether it can run here (default: it can
  when it imports); an available backend's reason is a caveat or empty;
* ``ACTIVATIONS``: the activations its kernels implement (default: all);
* ``COMPLETE``: True when it is meant to implement the whole contract (the
  contract test then requires every kernel of it);
* ``PENDING``: the contract kernels a COMPLETE backend does not implement
  yet (new rows of the contract, until its issue lands); they run the
  reference and are listed in ``fallbacks``, and the contract test requires
  that exactly these are missing;
* ``PARITY_SHAPES``: the (batch, width) pairs the parity suite should use
  (the CUDA simulator wants small ones);
* ``info() -> dict``: extra lines for ``python -m fastnn info``;
* array hooks for a model's buffers, where arrays do not live in host memory
  (the cuda backend): ``empty(shape, dtype)``, ``zeros(shape, dtype)``,
  ``from_host(ndarray)``, ``to_host(array) -> ndarray``,
  ``copy_from_host(dst, ndarray)`` and ``count_correct(logits, labels) -> int``
  (defaults: NumPy, below). On such a backend a kernel that falls back to the
  reference also takes device arrays: they are copied to the host, the
  reference runs there, and the outputs are copied back (slow, but correct).

Selection: ``set_backend(name)`` sets the process default, ``use_backend`` a
thread- and task-local one (``contextvars``); the initial default is
``FASTNN_BACKEND`` if set, else ``cython`` when built, else ``numba`` when
installed, else ``numpy``.
"""

import contextlib
import contextvars
import importlib
import importlib.util
import inspect
import os
import threading
from collections import namedtuple

import numpy as np

from .kernels import reference

MODULES = {
    "numpy": "fastnn.kernels.reference",
    "cython": "fastnn.kernels.cython_cpu",
    "numba": "fastnn.kernels.numba_cpu",
    "cuda": "fastnn.kernels.cuda",
}
#: Preference order of the automatic default.
DEFAULT_ORDER = ("cython", "numba", "numpy")
#: Kernels that take an activation name, and so may fall back per activation.
_ACT_KERNELS = ("dense_forward", "activation_forward", "activation_backward", "backprop_delta")

BackendInfo = namedtuple("BackendInfo", "available reason fallbacks")
BackendInfo.__doc__ = """Whether a backend can run here, why not, and what it leaves to the reference.

available : bool
reason : str
    Why not, when unavailable (an import error, no GPU, ...); when available,
    empty or a caveat (``"compiled without OpenMP: runs serially"``).
fallbacks : tuple of str
    Kernels (``"adam_step"``) and kernel-activation pairs
    (``"activation_forward[gelu]"``) that run the NumPy reference instead.
"""


class Backend:
    """A loaded backend: one attribute per contract kernel, ready to call."""

    def __init__(self, name, module, note=""):
        self.name = name
        self.note = note
        self.module = module
        self.complete = bool(getattr(module, "COMPLETE", False))
        self.pending = tuple(getattr(module, "PENDING", ()))
        supported = tuple(getattr(module, "ACTIVATIONS", reference.ACTIVATIONS))
        missing_acts = [a for a in reference.ACTIVATIONS if a not in supported]
        device = hasattr(module, "to_host")
        fallbacks = []
        for kernel in reference.CONTRACT:
            native = getattr(module, kernel, None)
            ref = getattr(reference, kernel)
            if device:
                ref = _host_fallback(kernel, module)
            if native is None:
                setattr(self, kernel, ref)
                fallbacks.append(kernel)
            elif kernel in _ACT_KERNELS and missing_acts:
                setattr(self, kernel, _per_activation(kernel, native, supported, ref))
                fallbacks.extend(f"{kernel}[{a}]" for a in missing_acts)
            else:
                setattr(self, kernel, native)
        self.fallbacks = tuple(fallbacks)
        for hook in _HOST_HOOKS:
            setattr(self, hook, getattr(module, hook, _HOST_HOOKS[hook]))

    def __setattr__(self, name, value):
        # fastnn.ops keeps each backend's kernels resolved (fastnn.kernels._cy_gate):
        # a kernel set here later (a spy in a test, a patch) replaces that table
        object.__setattr__(self, name, value)
        self.__dict__.pop("_ops_table", None)
        for hook in _CHANGED:
            hook()

    def __repr__(self):
        return f"<fastnn backend {self.name!r}>"


#: Called without arguments whenever an attribute of a Backend is set.
_CHANGED = []


def _count_correct(logits, labels):
    """Rows whose prediction equals the label: argmax for several classes, a
    positive logit for one output (binary)."""
    if logits.shape[1] == 1:
        return int(np.count_nonzero((logits[:, 0] > 0) == (labels.reshape(-1) > 0.5)))
    return int(np.count_nonzero(logits.argmax(axis=1) == labels))


_HOST_HOOKS = {
    "empty": np.empty,
    "zeros": np.zeros,
    "from_host": lambda a: a,
    "to_host": np.asarray,
    "copy_from_host": np.copyto,
    "count_correct": _count_correct,
}


def _on_device(a):
    return not isinstance(a, np.ndarray) and hasattr(a, "__cuda_array_interface__")


def _memory(a):
    """What identifies an array's memory: its address, shape and dtype."""
    cai = a.__cuda_array_interface__
    return cai["data"][0], tuple(cai["shape"]), cai["typestr"]


def _host_fallback(kernel, module):
    """The reference ``kernel`` for a backend whose arrays may live on a device.

    Device arguments (``__cuda_array_interface__``) are copied to the host
    with the module's ``to_host`` (once per memory, so ``out`` may still be
    ``x``), the reference runs on the copies, and the arrays the kernel writes
    (``reference.OUTPUTS``) are copied back with ``copy_from_host``. A call
    with NumPy arrays only runs the reference directly.
    """
    ref = getattr(reference, kernel)
    params = list(inspect.signature(ref).parameters)
    outputs = frozenset(reference.OUTPUTS[kernel])

    def fallback(*args, **kwargs):
        if not any(_on_device(a) for a in args) and not any(
                _on_device(a) for a in kwargs.values()):
            return ref(*args, **kwargs)
        bound = dict(zip(params, args), **kwargs)
        host, back = {}, {}
        for name, a in bound.items():
            if not _on_device(a):
                continue
            key = _memory(a)
            if key not in host:
                host[key] = module.to_host(a)
            if name in outputs:
                back[key] = a
            bound[name] = host[key]
        result = ref(**bound)
        for key, a in back.items():
            module.copy_from_host(a, host[key])
        return result

    fallback.__name__ = fallback.__qualname__ = kernel
    fallback.__doc__ = ref.__doc__
    fallback.__wrapped__ = ref
    return fallback


def _per_activation(kernel, native, supported, ref=None):
    """Call ``native`` for the supported activations and the reference (or
    ``ref``) otherwise."""
    if ref is None:
        ref = getattr(reference, kernel)
    position = list(inspect.signature(ref).parameters).index("act")
    supported = frozenset(supported)

    def dispatch(*args, **kwargs):
        act = args[position] if len(args) > position else kwargs["act"]
        return (native if act in supported else ref)(*args, **kwargs)

    dispatch.__name__ = dispatch.__qualname__ = kernel
    dispatch.__doc__ = ref.__doc__
    return dispatch


class BackendUnavailable(RuntimeError):
    """A backend that exists but cannot run here (the message says why)."""


_lock = threading.Lock()
_loaded = {}       # name -> Backend
_failed = {}       # name -> reason
_default = None    # process default name, resolved on first use
_context = contextvars.ContextVar("fastnn_backend", default=None)


def _check_name(name):
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a str, got {type(name).__name__}")
    if name not in MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(MODULES)}")


def _load(name):
    """Import and wrap a backend, or record why it cannot run. Returns the
    Backend or None."""
    backend = _loaded.get(name)
    if backend is not None or name in _failed:
        return backend
    with _lock:
        if name in _loaded or name in _failed:
            return _loaded.get(name)
        try:
            module = importlib.import_module(MODULES[name])
        except Exception as exc:  # ImportError, or a broken install of a dependency
            _failed[name] = _import_reason(name, exc)
            return None
        ok, reason = getattr(module, "available", lambda: (True, ""))()
        if not ok:
            _failed[name] = reason
            return None
        backend = Backend(name, module, note=reason)
        _loaded[name] = backend
        return backend


def _import_reason(name, exc):
    if name == "cython" and isinstance(exc, ImportError):
        return (f"the compiled extensions are not built ({exc}); install with "
                f"`pip install .` or `pip install -e .`")
    if isinstance(exc, ImportError):
        return f"{type(exc).__name__}: {exc}"
    return f"import failed: {type(exc).__name__}: {exc}"


def load(name):
    """Return the loaded ``Backend`` ``name``, or raise ``BackendUnavailable``
    saying why it cannot run (``ValueError`` for an unknown name)."""
    _check_name(name)
    backend = _load(name)
    if backend is None:
        raise BackendUnavailable(f"backend {name!r} is not available: {_failed[name]}")
    return backend


def _resolve_default():
    env = os.environ.get("FASTNN_BACKEND", "").strip()
    if env:
        if env not in MODULES:
            raise ValueError(f"FASTNN_BACKEND={env!r} is not a backend; choose one of "
                             f"{', '.join(MODULES)}")
        load(env)
        return env
    for name in DEFAULT_ORDER:
        if name == "numba" and importlib.util.find_spec("numba") is None:
            continue
        if _load(name) is not None:
            return name
    return "numpy"


def get_backend():
    """Return the name of the backend in effect for this thread / context.

    Returns
    -------
    str
        The innermost ``use_backend`` of this context, else the process
        default (``set_backend``, ``FASTNN_BACKEND``, or the automatic choice
        cython > numba > numpy).
    """
    global _default
    name = _context.get()
    if name is not None:
        return name
    if _default is None:
        _default = _resolve_default()
    return _default


def current():
    """The ``Backend`` object in effect (what ``fastnn.ops`` dispatches to)."""
    return load(get_backend())


def set_backend(name):
    """Set the process-wide default backend.

    Parameters
    ----------
    name : str
        One of ``"numpy"``, ``"cython"``, ``"numba"``, ``"cuda"``.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the choices).
    BackendUnavailable
        When the backend cannot run here (the message says why); the default
        is then left as it was.
    """
    global _default
    load(name)
    _default = name


@contextlib.contextmanager
def use_backend(name):
    """Use backend ``name`` inside a ``with`` block, for this thread (or
    asyncio task) only; other threads keep theirs.

    Yields
    ------
    Backend
    """
    backend = load(name)
    token = _context.set(name)
    try:
        yield backend
    finally:
        _context.reset(token)


def backends():
    """Report every backend: available or not, why not, and what falls back.

    Loading a backend to answer imports its module (numba for ``numba``).

    Returns
    -------
    dict
        ``{name: BackendInfo(available, reason, fallbacks)}`` in the order
        numpy, cython, numba, cuda.
    """
    result = {}
    for name in MODULES:
        backend = _load(name)
        if backend is None:
            result[name] = BackendInfo(False, _failed[name], ())
        else:
            result[name] = BackendInfo(True, backend.note, backend.fallbacks)
    return result
