"""The ``numba`` backend: every kernel of the contract as ``numba.njit`` loops.

Importing this package imports numba (``fastnn`` itself never does; the
registry imports this module the first time the backend is used).

How it is built (DESIGN.md, "Rules the code keeps"):

* GEMMs are NumPy's BLAS, called on views into the caller's arrays
  (``np.matmul(x, w, out=z)``, ``x.T @ dz`` and ``dy @ w.T`` without copies);
  everything around them is one fused numba loop: bias + activation over the
  GEMM output, the activation derivative multiplied into ``dy @ w.T``,
  softmax-CE loss and gradient, and each optimizer as one loop that reads and
  writes every array once.
* Every loop body is one ``register_jitable`` function over an index range
  ``[lo, hi)``. It runs directly (``njit``, serial) below a size threshold and
  as static chunks of a ``prange`` above it (``njit(parallel=True)``), with the
  thread count of ``fastnn.set_num_threads``.
* Loops specialised per activation and per optimizer variant are made by small
  factories; a specialisation is compiled on its first use, for the dtype it is
  called with (float32 or float64), and cached on disk (``cache=True``). Every
  call passes arrays of one layout and scalars of the array dtype, so each
  kernel compiles once per dtype. Each specialised loop and its parallel
  driver carries a name of its own (``fwd__leaky_relu``, ``par__adam__amsgrad``):
  numba names compiled symbols after the function's qualified name, and
  processes sharing one cache folder otherwise ran one variant's loop for
  another's (``_runtime._named``).
* ``exp``, ``tanh`` and ``log1p`` are our own, branch-free so that LLVM
  vectorizes the loops around them (numba's ``math.exp`` is a scalar libm
  call and loses to NumPy's SIMD): ``exp`` is a polynomial with exponent bit
  tricks (``2**n`` by ``vscalef`` on AVX-512), float32 ``tanh`` a rational
  function we fitted, ``log1p`` an ``atanh`` series. Measured errors against
  NumPy in float64 over a dense float32 sweep: exp and log1p 1 ulp (float64:
  1-2 ulp); float32 tanh at most 5.5 ulp over every float32 input (see
  ``_math``); overflow, underflow, infinities and NaN give the IEEE results
  (tests/test_numba.py, tests/test_numerics.py).
* ``error_model='numpy'`` everywhere (Python's division checks block
  vectorization). Fast-math only where it changes no result beyond the parity
  tolerance and keeps IEEE semantics: ``contract`` (FMA) inside the math
  helpers above, ``reassoc`` in the float64 sum of per-element losses. No
  ``nnan``/``ninf``. Everything else follows the reference's order of
  operations with scalars cast as NumPy casts them, so the optimizers match the
  reference bit for bit.

Threads: numba's ``omp`` threading layer is selected when it is available (it
is thread-safe and shares libgomp with the Cython backend; ``workqueue`` is not
thread-safe, and parallel calls then hold a lock). ``fastnn/__init__.py`` sets
``GOMP_SPINCOUNT`` before libgomp loads, so its idle threads do not steal the
cores from the next BLAS call. A process forked after a parallel region runs
every kernel serially (GNU OpenMP cannot start a region in such a child).

Cache: in ``__pycache__`` next to these files when that folder is writable, else in
``$XDG_CACHE_HOME/fastnn/numba`` (``~/.cache/fastnn/numba``), set as
``NUMBA_CACHE_DIR`` before numba is imported; a ``NUMBA_CACHE_DIR`` of the
user's wins; with no writable folder at all kernels compile uncached
(``available()`` says so).

Modules, by kind of kernel as the Cython files are:

* ``_runtime``: cache folder, threading layer, compile options, the
  serial/parallel launch and the specialisation table, backend hooks;
* ``_math``: exp, tanh, log1p, sign, maximum, the activations (scalar);
* ``elementwise``: the loops of each activation, ``activation_forward`` and
  ``activation_backward``, ``dropout_forward`` and ``dropout_backward``;
* ``dense``: ``dense_forward``, ``backprop_delta``, ``dense_backward``;
* ``loss``: the three losses and ``softmax``;
* ``optim``: ``sgd_step``, ``adam_step``, ``rmsprop_step``;
* ``conv``: ``conv2d_forward``, ``conv2d_backward``, ``conv2d_backprop``,
  ``maxpool2d_forward``, ``maxpool2d_backward`` (im2col GEMMs with their
  epilogues, direct loops for kernels with few taps, pooling in one pass);
* ``data``: ``gather_rows`` (row copies and dtype conversion, for ``fit``).
"""

from ._runtime import (  # first: sets the cache folder before numba loads
    PARALLEL_MIN, available, cache_dir, info, set_num_threads, threading_layer)
from ._math import ACTIVATIONS
from .elementwise import (activation_backward, activation_forward, dropout_backward,
                          dropout_forward)
from .dense import backprop_delta, dense_backward, dense_forward
from .loss import mse, sigmoid_binary_cross_entropy, softmax, softmax_cross_entropy
from .optim import adam_step, rmsprop_step, sgd_step
from .data import gather_rows
from .conv import (conv2d_backprop, conv2d_backward, conv2d_forward, maxpool2d_backward,
                   maxpool2d_forward)

__all__ = [
    "dense_forward", "activation_forward", "activation_backward", "backprop_delta",
    "dense_backward", "softmax_cross_entropy", "sigmoid_binary_cross_entropy", "mse",
    "sgd_step", "adam_step", "rmsprop_step", "softmax",
    "conv2d_forward", "conv2d_backward", "conv2d_backprop", "maxpool2d_forward",
    "maxpool2d_backward", "dropout_forward", "dropout_backward", "gather_rows",
    "available", "info", "set_num_threads",
]

#: This backend implements the whole contract itself (no reference fallbacks).
COMPLETE = True
PENDING = ()
