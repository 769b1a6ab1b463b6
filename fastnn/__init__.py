"""fastnn: fast kernels for neural-network training on NumPy arrays.

Dense and convolutional layers, activations, losses and optimizers as Cython/OpenMP, numba and
CUDA kernels under one contract, each checked against a NumPy reference.

>>> import fastnn as fn
>>> fn.get_backend() in fn.backends()
True
"""

import os as _os

# OpenMP threads that spin-wait after a parallel region steal the cores from
# the BLAS threads of the next GEMM (measured: 10x slower steps). libgomp reads
# this once, when it is first loaded, which happens after this line. 10000
# (~0.2 ms of spinning) made Keras' convnet at batch 32 7 % faster in fit (its
# regions follow each other closely) but a GEMM, relu over 1 M, GEMM loop
# 1.5-1.9x its parts (1.04-1.09x with 1000; 2 cores, cython and numba).
_os.environ.setdefault("GOMP_SPINCOUNT", "1000")

from . import ops  # noqa: E402
from ._backend import (  # noqa: E402
    BackendInfo, BackendUnavailable, backends, get_backend, set_backend, use_backend,
)
from ._threads import get_num_threads, num_threads, set_num_threads  # noqa: E402
from . import callbacks, datasets, distributed, losses, optim, schedules  # noqa: E402
from .layers import (  # noqa: E402
    Conv2D, Dense, Dropout, Flatten, MaxPool2D, MaxPooling2D,
)
from .model import History, Sequential, load_model  # noqa: E402
from .optim import SGD, Adam, AdamW, RMSprop  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ops", "backends", "get_backend", "set_backend", "use_backend", "BackendInfo",
    "BackendUnavailable", "set_num_threads", "get_num_threads", "num_threads",
    "__version__",
    "Sequential", "Dense", "Conv2D", "MaxPool2D", "MaxPooling2D", "Flatten", "Dropout",
    "History", "load_model", "SGD", "Adam", "AdamW", "RMSprop",
    "losses", "optim", "schedules", "callbacks", "datasets", "distributed",
]
