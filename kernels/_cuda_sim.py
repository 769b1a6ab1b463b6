"""Make the CUDA simulator's device arrays look like real ones.

numba-cuda's simulator (``NUMBA_ENABLE_CUDASIM=1``) wraps NumPy arrays in
``FakeCUDAArray``, which lacks the ``__cuda_array_interface__`` that real
device arrays export, and its ``numba.cuda`` lacks ``as_cuda_array`` and
``is_cuda_array``. fastnn's gate (``fastnn._validate.array_info``) recognises
device arrays by that interface and reads device labels back with
``as_cuda_array``, so without this shim a simulated device array could not pass
the gate, and a model on the cuda backend could not run under the simulator.

``install(cuda)`` adds the three, only when the simulator is active and only
where they are missing. The interface describes the wrapped host buffer, so
the gate's overlap checks see the real addresses. It is applied once by
``fastnn.kernels.cuda`` when it finds the simulator.
"""

def _interface(self):
    """``__cuda_array_interface__`` (version 3) of a simulated device array."""
    ary = self._ary
    ai = ary.__array_interface__
    return {
        "shape": tuple(ary.shape),
        "typestr": ary.dtype.str,
        "data": (ai["data"][0], False),
        "strides": None if ary.flags.c_contiguous else tuple(ary.strides),
        "version": 3,
        "stream": None,
    }


def install(cuda):
    """Add ``__cuda_array_interface__`` to ``FakeCUDAArray`` and
    ``as_cuda_array``/``is_cuda_array`` to the simulator's ``cuda`` module,
    where missing."""
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    if "__cuda_array_interface__" not in FakeCUDAArray.__dict__:
        FakeCUDAArray.__cuda_array_interface__ = property(_interface)

    def is_cuda_array(obj):
        """True for a simulated device array."""
        return isinstance(obj, FakeCUDAArray)

    def as_cuda_array(obj, sync=True):
        """The simulated device array itself (there is no other kind here)."""
        if isinstance(obj, FakeCUDAArray):
            return obj
        raise TypeError(f"the CUDA simulator has no device array for {type(obj).__name__}")

    if not hasattr(cuda, "is_cuda_array"):
        cuda.is_cuda_array = is_cuda_array
    if not hasattr(cuda, "as_cuda_array"):
        cuda.as_cuda_array = as_cuda_array
    return FakeCUDAArray


__all__ = ["install"]
