"""The ``cython`` backend: the compiled ``_cy_*`` extensions under the contract's names.

Every kernel of the contract (``kernels/reference.py``) is compiled here, for
float32 and float64 from one source (Cython fused types), with all eight
activations:

* ``_cy_elementwise``: ``activation_forward``, ``activation_backward``;
* ``_cy_dense``: ``dense_forward``, ``backprop_delta``, ``dense_backward``
  (GEMM by ``scipy.linalg.cython_blas`` plus fused epilogues);
* ``_cy_loss``: ``softmax_cross_entropy``, ``sigmoid_binary_cross_entropy``,
  ``mse``, ``softmax``;
* ``_cy_optim``: ``sgd_step``, ``adam_step``, ``rmsprop_step``.

The shared inline math (vectorizable exp/tanh/sigmoid, the activations over
raw-pointer ranges) lives in ``_cy_math.pxd``. Importing this module fails (and
the registry reports why) when the extensions were not built. Without OpenMP at
build time the kernels run serially and ``available()`` says so.
"""

from . import _cy_dense, _cy_elementwise, _cy_loss, _cy_optim
from ._cy_dense import backprop_delta, dense_backward, dense_forward
from ._cy_elementwise import activation_backward, activation_forward
from ._cy_loss import mse, sigmoid_binary_cross_entropy, softmax, softmax_cross_entropy
from ._cy_optim import adam_step, rmsprop_step, sgd_step

__all__ = [
    "dense_forward", "activation_forward", "activation_backward", "backprop_delta",
    "dense_backward", "softmax_cross_entropy", "sigmoid_binary_cross_entropy", "mse",
    "sgd_step", "adam_step", "rmsprop_step", "softmax",
]

#: Meant to implement the whole contract (the contract test holds it to that).
COMPLETE = True

_EXTENSIONS = (_cy_elementwise, _cy_dense, _cy_loss, _cy_optim)
#: True when every extension was compiled with OpenMP.
OPENMP = all(ext.OPENMP for ext in _EXTENSIONS)


def available():
    """The extensions imported; say so when they run serially."""
    if OPENMP:
        return True, ""
    serial = [ext.__name__.rsplit(".", 1)[-1] for ext in _EXTENSIONS if not ext.OPENMP]
    return True, f"compiled without OpenMP: kernels run serially ({', '.join(serial)})"


def set_num_threads(n):
    """Set the OpenMP threads of every extension's parallel loops."""
    for ext in _EXTENSIONS:
        ext.set_num_threads(n)


def info():
    """Extra lines for ``python -m fastnn info``."""
    return {"openmp": OPENMP, "extensions": ", ".join(ext.__name__ for ext in _EXTENSIONS)}


def _init_threads():
    from fastnn._threads import get_num_threads

    set_num_threads(get_num_threads())


_init_threads()
