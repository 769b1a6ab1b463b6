"""fastnn.kernels: every hot loop, one module per backend.

``reference`` (NumPy, the definition), ``cython_cpu`` (the compiled ``_cy_*``
extensions), ``numba_cpu`` and ``cuda``. Each exports the kernels named in
``reference.CONTRACT`` with the same signatures. Import them through
``fastnn`` (``fastnn.kernels.reference``), never as a bare ``kernels``.
"""
