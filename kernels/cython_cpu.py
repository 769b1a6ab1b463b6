"""The ``cython`` backend: the compiled ``_cy_*`` extensions under the contract's names.

Importing this module fails (and the registry reports why) when the
extensions were not built. Kernels and activations not compiled yet run the
NumPy reference (``fastnn.backends()["cython"].fallbacks`` lists them).
"""

from . import _cy_elementwise
from ._cy_elementwise import activation_backward, activation_forward

__all__ = ["activation_forward", "activation_backward"]

ACTIVATIONS = _cy_elementwise.ACTIVATIONS
OPENMP = _cy_elementwise.OPENMP
_EXTENSIONS = (_cy_elementwise,)


def available():
    """The extensions imported; say so when they run serially."""
    return True, "" if OPENMP else "compiled without OpenMP: kernels run serially"


def set_num_threads(n):
    """Set the OpenMP threads of every extension's parallel loops."""
    for ext in _EXTENSIONS:
        ext.set_num_threads(n)


def info():
    return {"openmp": OPENMP}


def _init_threads():
    from fastnn._threads import get_num_threads

    set_num_threads(get_num_threads())


_init_threads()
