"""The ``cython`` backend: the compiled ``_cy_*`` extensions under the contract's names.

Every kernel of the contract (``kernels/reference.py``) is compiled here, for
float32 and float64 from one source (Cython fused types), with all eight
activations:

* ``_cy_elementwise``: ``activation_forward``, ``activation_backward``;
* ``_cy_dense``: ``dense_forward``, ``backprop_delta``, ``dense_backward``
  (GEMM by BLAS plus fused epilogues; which BLAS: below);
* ``_cy_loss``: ``softmax_cross_entropy``, ``sigmoid_binary_cross_entropy``,
  ``mse``, ``softmax`` (and ``count_correct``, the backend's accuracy hook);
* ``_cy_optim``: ``sgd_step``, ``adam_step``, ``rmsprop_step``;
* ``_cy_conv``: ``conv2d_forward``, ``conv2d_backward``, ``conv2d_backprop``,
  ``maxpool2d_forward``, ``maxpool2d_backward``, ``dropout_forward``,
  ``dropout_backward`` (chunked im2col GEMMs on the same BLAS, read through
  ``_cy_dense``'s table; a workspace per calling thread);
* ``_cy_data``: ``gather_rows`` (row copies and dtype conversion, for ``fit``;
  ``gather_batch``, not in the contract, is ``fit``'s batch and targets in one call).

The shared inline math (vectorizable exp/tanh/sigmoid, the activations over
raw-pointer ranges) lives in ``_cy_math.pxd``. Importing this module fails (and
the registry reports why) when the extensions were not built. Without OpenMP at
build time the kernels run serially and ``available()`` says so.

Per-CPU variants: on x86-64, setup.py builds each extension three times, for
baseline x86-64 (``_cy_dense``), x86-64-v3 (AVX2 and FMA: ``_cy_dense_v3``)
and x86-64-v4 (AVX-512 F/BW/CD/DQ/VL: ``_cy_dense_v4``). At import the best
variant this CPU runs is loaded (``cpu_levels()``), or the one named by
``FASTNN_CPU_VARIANT`` (``baseline``, ``v3``, ``v4``: for tests and
comparisons; one the CPU cannot run, or that was not built, makes this backend
unavailable with the reason). The chosen modules are also registered as
``fastnn.kernels._cy_*``, so that code importing those names after this module
gets the code the backend runs. ``info()`` reports the choice.

BLAS: the GEMMs call NumPy's own OpenBLAS when NumPy bundles one with ILP64
Fortran entry points (``scipy_sgemm_64_``, as the NumPy wheels on PyPI do),
else SciPy's ``scipy.linalg.cython_blas``. Two OpenBLAS copies in one process
keep two thread pools whose idle workers spin on the same cores, and the
user's own ``np.dot`` already woke NumPy's; NumPy's copy was also the faster
one here (OpenBLAS 0.3.31 against SciPy's 0.3.30: 32x784x256 float32 in 66 us
against 88 us on 2 threads, 120 against 160 us on one). ``FASTNN_BLAS=scipy``
(or ``numpy``, which fails when NumPy's cannot be used) decides instead;
``use_blas(name)`` switches at run time. A GEMM checked against ``np.matmul``
guards the choice. SciPy is imported only when its BLAS is used.

The convolutions (``_cy_conv``) run their GEMMs on one BLAS thread each inside
their own OpenMP regions; around a region they set OpenBLAS to one thread
(``openblas_set_num_threads``) and lower its ``thread_timeout`` (an internal
variable, found once through the library's ELF symbol table; nothing is done
where it is not found) so that a worker spinning after the last GEMM goes to
sleep instead of sharing a core with the region; both are restored after it.
"""

import importlib
import os
import sys

#: The per-CPU variants, best last; "baseline" is the plain module name.
VARIANTS = ("baseline", "v3", "v4")
_NAMES = ("_cy_elementwise", "_cy_dense", "_cy_loss", "_cy_optim", "_cy_conv", "_cy_data")
#: /proc/cpuinfo flags that ``-march=x86-64-v3`` / ``-march=x86-64-v4`` code may use.
_LINUX_FLAGS = {
    "v3": ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"),
    "v4": ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
}


def _cpuinfo_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_levels():
    """The variants this CPU (and its OS) can run, in ``VARIANTS`` order.

    Linux: the flags of ``/proc/cpuinfo`` (the kernel lists AVX and AVX-512
    only when it saves their registers). Elsewhere: NumPy's runtime CPU
    dispatch table (``AVX2``, ``FMA3``, ``F16C``; ``AVX512_SKX``).
    """
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "x64"):
        return ("baseline",)
    levels = ["baseline"]
    flags = _cpuinfo_flags()
    if flags is not None:
        v3 = all(f in flags for f in _LINUX_FLAGS["v3"])
        v4 = v3 and all(f in flags for f in _LINUX_FLAGS["v4"])
    else:
        try:
            from numpy._core._multiarray_umath import __cpu_features__ as feats
        except ImportError:
            feats = {}
        v3 = all(feats.get(k) for k in ("AVX2", "FMA3", "F16C"))
        v4 = v3 and bool(feats.get("AVX512_SKX"))
    if v3:
        levels.append("v3")
    if v4:
        levels.append("v4")
    return tuple(levels)


def _module_name(name, variant):
    return f"{__package__}.{name}" + ("" if variant == "baseline" else f"_{variant}")


def built_variants():
    """The variants whose extensions are installed next to this module."""
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))

    def beside(name):
        spec = importlib.util.find_spec(name)
        return spec is not None and spec.origin is not None and \
            os.path.dirname(os.path.abspath(spec.origin)) == here

    return tuple(v for v in VARIANTS if all(beside(_module_name(n, v)) for n in _NAMES))


def _choose():
    forced = os.environ.get("FASTNN_CPU_VARIANT", "").strip().lower()
    runnable = cpu_levels()
    if forced:
        if forced not in VARIANTS:
            raise ImportError(f"FASTNN_CPU_VARIANT={forced!r} is not a variant; choose one of "
                              f"{', '.join(VARIANTS)}")
        if forced not in runnable:
            raise ImportError(f"FASTNN_CPU_VARIANT={forced}: this CPU cannot run it (it runs "
                              f"{', '.join(runnable)})")
        if forced != "baseline" and forced not in built_variants():
            raise ImportError(f"FASTNN_CPU_VARIANT={forced}: that variant was not built "
                              f"(built: {', '.join(built_variants()) or 'none'})")
        return forced, True
    built = built_variants()
    for variant in reversed(VARIANTS):
        if variant in runnable and (variant == "baseline" or variant in built):
            return variant, False
    return "baseline", False


def _load(variant):
    modules = [importlib.import_module(_module_name(n, variant)) for n in _NAMES]
    if variant != "baseline":
        package = sys.modules[__package__]
        for name, module in zip(_NAMES, modules):
            sys.modules[f"{__package__}.{name}"] = module
            setattr(package, name, module)
    return modules


CPU_VARIANT, _FORCED = _choose()
_cy_elementwise, _cy_dense, _cy_loss, _cy_optim, _cy_conv, _cy_data = _load(CPU_VARIANT)
_cy_conv._use_blas_table(_cy_dense._blas_table())

dense_forward = _cy_dense.dense_forward
backprop_delta = _cy_dense.backprop_delta
dense_backward = _cy_dense.dense_backward
activation_forward = _cy_elementwise.activation_forward
activation_backward = _cy_elementwise.activation_backward
softmax_cross_entropy = _cy_loss.softmax_cross_entropy
sigmoid_binary_cross_entropy = _cy_loss.sigmoid_binary_cross_entropy
mse = _cy_loss.mse
softmax = _cy_loss.softmax
sgd_step = _cy_optim.sgd_step
adam_step = _cy_optim.adam_step
rmsprop_step = _cy_optim.rmsprop_step
conv2d_forward = _cy_conv.conv2d_forward
conv2d_backward = _cy_conv.conv2d_backward
conv2d_backprop = _cy_conv.conv2d_backprop
maxpool2d_forward = _cy_conv.maxpool2d_forward
maxpool2d_backward = _cy_conv.maxpool2d_backward
dropout_forward = _cy_conv.dropout_forward
dropout_backward = _cy_conv.dropout_backward
gather_rows = _cy_data.gather_rows
#: ``fit``'s batch in one call (``fastnn._batches.Source``; not a contract kernel)
gather_batch = _cy_data.gather_batch
#: the ``count_correct`` hook (``fastnn._backend``): compiled for the usual case
count_correct = _cy_loss.count_correct

__all__ = [
    "dense_forward", "activation_forward", "activation_backward", "backprop_delta",
    "dense_backward", "softmax_cross_entropy", "sigmoid_binary_cross_entropy", "mse",
    "sgd_step", "adam_step", "rmsprop_step", "softmax", "conv2d_forward", "conv2d_backward",
    "conv2d_backprop", "maxpool2d_forward", "maxpool2d_backward", "dropout_forward",
    "dropout_backward", "gather_rows",
]

#: Meant to implement the whole contract (the contract test holds it to that).
COMPLETE = True

_EXTENSIONS = (_cy_elementwise, _cy_dense, _cy_loss, _cy_optim, _cy_conv, _cy_data)
#: True when every extension was compiled with OpenMP.
OPENMP = all(ext.OPENMP for ext in _EXTENSIONS)
#: C entry points of the kernels (``_cy_call.pxd``): what ``fastnn.ops`` calls after
#: its compiled gate has checked a call, without the kernels' Python wrappers.
ENTRIES = {name: entry for ext in _EXTENSIONS
           for name, entry in getattr(ext, "ENTRIES", {}).items()}
_num_threads = 1


def _numpy_blas_addresses():
    """Addresses of ``sgemm``/``dgemm`` (ILP64 Fortran interface) in the OpenBLAS
    NumPy loaded and of its ``openblas_set_num_threads``/``_get_num_threads``
    (0 when absent), or None with the reason.

    NumPy's wheels bundle scipy-openblas64 with the symbols renamed
    ``scipy_?gemm_64_`` in ``numpy.libs`` (Linux, Windows) or ``numpy/.dylibs``
    (macOS). Opening the same file again returns the library already loaded
    (no second copy, no second thread pool).
    """
    import ctypes
    import glob

    import numpy as np

    try:
        blas = np.__config__.CONFIG["Build Dependencies"]["blas"]
    except (AttributeError, KeyError, TypeError):
        return None, "NumPy does not say which BLAS it was built with"
    if blas.get("name") != "scipy-openblas":
        return None, f"NumPy's BLAS is {blas.get('name')!r}, not the bundled scipy-openblas"
    if "USE64BITINT" not in str(blas.get("openblas configuration", "")):
        return None, "NumPy's OpenBLAS is not ILP64"
    root = os.path.dirname(os.path.abspath(np.__file__))
    paths = []
    for folder in (os.path.join(os.path.dirname(root), "numpy.libs"), os.path.join(root, ".dylibs")):
        for ext in ("so", "dylib", "dll"):
            paths += glob.glob(os.path.join(folder, f"libscipy_openblas64_*.{ext}"))
    if len(paths) != 1:
        return None, f"expected one bundled OpenBLAS beside NumPy, found {len(paths)}"
    try:
        lib = ctypes.CDLL(paths[0])
        s, d = lib.scipy_sgemm_64_, lib.scipy_dgemm_64_
    except (OSError, AttributeError) as exc:
        return None, f"NumPy's OpenBLAS has no usable scipy_?gemm_64_: {exc}"
    address = lambda f: ctypes.cast(f, ctypes.c_void_p).value  # noqa: E731
    return (address(s), address(d)) + _thread_functions(
        lib, "scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"), ""


def _thread_functions(lib, set_name, get_name):
    """Addresses of an OpenBLAS' ``openblas_set_num_threads``/``_get_num_threads``
    (the convolutions run one GEMM per thread of theirs: ``_cy_conv``), or
    ``(0, 0)`` when the library has none."""
    import ctypes

    try:
        return (ctypes.cast(getattr(lib, set_name), ctypes.c_void_p).value,
                ctypes.cast(getattr(lib, get_name), ctypes.c_void_p).value)
    except AttributeError:
        return (0, 0)


def _elf_symbols(path, names):
    """``{name: [(value, size, info), ...]}`` of the named symbols in the ELF
    file's symbol table (``.symtab``: local symbols too, which the dynamic
    loader does not show), or ``{}`` for a file that is no little-endian
    ELF64 or has no symbol table. Reads the section headers and the table
    only (a few ms for OpenBLAS)."""
    import mmap
    import struct

    import numpy as np

    found = {}
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m[:4] != b"\x7fELF" or m[4] != 2 or m[5] != 1:
                return {}
            shoff, = struct.unpack_from("<Q", m, 0x28)
            shentsize, shnum = struct.unpack_from("<HH", m, 0x3A)
            sections = [struct.unpack_from("<IIQQQQIIQQ", m, shoff + i * shentsize)
                        for i in range(shnum)]
            sym_t = np.dtype([("name", "<u4"), ("info", "u1"), ("other", "u1"),
                              ("shndx", "<u2"), ("value", "<u8"), ("size", "<u8")])
            for _, kind, _, _, offset, size, link, _, _, _ in sections:
                if kind != 2:           # SHT_SYMTAB
                    continue
                strtab = sections[link]
                strings = m[strtab[4]:strtab[4] + strtab[5]]
                symbols = np.frombuffer(m[offset:offset + size], sym_t)
                for name in names:
                    # a name may also end a longer string (linkers merge tails)
                    key, starts, at = name.encode() + b"\0", [], -1
                    while True:
                        at = strings.find(key, at + 1)
                        if at < 0:
                            break
                        starts.append(at)
                    hits = symbols[np.isin(symbols["name"], starts)]
                    found[name] = [(int(h["value"]), int(h["size"]), int(h["info"]))
                                   for h in hits]
    except (OSError, ValueError, IndexError, struct.error):
        return {}
    return found


def _thread_timeout_address(path, anchor, anchor_address):
    """The address of OpenBLAS' ``thread_timeout`` (a static ``unsigned int``:
    the cycles an idle worker spins before it sleeps) in the library at
    ``path``, located through its symbol table from the exported ``anchor``
    loaded at ``anchor_address``; 0 unless exactly one 4-byte data object of
    that name is found holding a power of two in [2^4, 2^30] (the values
    OpenBLAS sets)."""
    import ctypes

    symbols = _elf_symbols(path, ["thread_timeout", anchor])
    timeout, base = symbols.get("thread_timeout", []), symbols.get(anchor, [])
    if len(timeout) != 1 or len(base) != 1 or timeout[0][1] != 4 or timeout[0][2] & 0xF != 1:
        return 0
    address = anchor_address - base[0][0] + timeout[0][0]
    value = ctypes.c_uint.from_address(address).value
    if value < 16 or value > 1 << 30 or value & (value - 1):
        return 0
    return address


_TIMEOUTS = {}


def _quiet_openblas():
    """Point ``_cy_dense``'s BLAS table at the current BLAS' ``thread_timeout``
    when it can be found (``_cy_conv`` lowers it for the length of its
    parallel regions: an OpenBLAS worker otherwise spins for about 0.1 s
    after every GEMM on a core that a region's thread then shares; measured
    with the convnet at 2 threads on a loaded machine, 2,265 -> 4,390
    samples/s at batch 32 with the spin short for the whole run). Called by
    ``_cy_conv`` on its first kernel call after the BLAS was chosen."""
    import ctypes
    import glob

    if _BLAS not in _TIMEOUTS:
        address = 0
        try:
            if _BLAS == "numpy":
                import numpy as np

                root = os.path.dirname(os.path.abspath(np.__file__))
                paths = glob.glob(os.path.join(os.path.dirname(root), "numpy.libs",
                                               "libscipy_openblas64_*.so"))
                anchor = "scipy_sgemm_64_"
            else:
                import scipy

                root = os.path.dirname(os.path.abspath(scipy.__file__))
                paths = glob.glob(os.path.join(os.path.dirname(root), "scipy.libs",
                                               "libscipy_openblas*.so"))
                anchor = "scipy_sgemm_"
            if len(paths) == 1:
                lib = ctypes.CDLL(paths[0])
                address = _thread_timeout_address(
                    paths[0], anchor, ctypes.cast(getattr(lib, anchor), ctypes.c_void_p).value)
        except (OSError, AttributeError, ImportError):
            address = 0
        _TIMEOUTS[_BLAS] = address
    _cy_dense._set_thread_timeout(_TIMEOUTS[_BLAS])


def _scipy_blas_thread_functions():
    """The thread-count functions of the OpenBLAS SciPy bundles (``scipy.libs``),
    or ``(0, 0)``."""
    import ctypes
    import glob

    import scipy

    root = os.path.dirname(os.path.abspath(scipy.__file__))
    paths = []
    for folder in (os.path.join(os.path.dirname(root), "scipy.libs"), os.path.join(root, ".dylibs")):
        for ext in ("so", "dylib", "dll"):
            paths += glob.glob(os.path.join(folder, f"libscipy_openblas*.{ext}"))
    if len(paths) != 1:
        return (0, 0)
    try:
        lib = ctypes.CDLL(paths[0])
    except OSError:
        return (0, 0)
    return _thread_functions(lib, "scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads")


def _gemm_agrees():
    """The GEMM of ``_cy_dense`` against ``np.matmul``, both dtypes, all three
    transposition patterns the kernels use."""
    import numpy as np

    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        a = rng.standard_normal((5, 3)).astype(dtype)
        b = rng.standard_normal((3, 4)).astype(dtype)
        for ta, tb, x, y in ((False, False, a, b), (True, False, a.T.copy(), b),
                             (False, True, a, b.T.copy())):
            c = np.empty((5, 4), dtype)
            _cy_dense._gemm(x, y, c, trans_a=ta, trans_b=tb)
            if not np.allclose(c, a @ b, rtol=1e-5, atol=1e-5):
                return False
    return True


_BLAS = "scipy"
_BLAS_NOTE = ""


def use_blas(name):
    """Route this backend's GEMMs to ``"numpy"`` (NumPy's bundled OpenBLAS) or
    ``"scipy"`` (``scipy.linalg.cython_blas``); returns the previous name.

    Raises ``ValueError`` for another name, ``RuntimeError`` when NumPy's BLAS
    cannot be used (the reason is in the message): the choice stays as it was,
    or becomes SciPy's when NumPy's GEMM was found but disagreed with
    ``np.matmul``.
    """
    global _BLAS, _BLAS_NOTE
    if name not in ("numpy", "scipy"):
        raise ValueError(f"name must be 'numpy' or 'scipy', got {name!r}")
    previous = _BLAS
    _cy_conv._set_quiet_hook(_quiet_openblas)     # the table's timeout is reset below
    if name == "scipy":
        _cy_dense._set_blas(*_cy_dense._scipy_blas_addresses(), False,
                            *_scipy_blas_thread_functions())
        _BLAS, _BLAS_NOTE = "scipy", ""
        _size_scipy_blas()
        return previous
    addresses, why = _numpy_blas_addresses()
    if addresses is None:
        raise RuntimeError(f"NumPy's BLAS cannot be used: {why}")
    _cy_dense._set_blas(addresses[0], addresses[1], True, *addresses[2:])
    if not _gemm_agrees():
        _cy_dense._set_blas(*_cy_dense._scipy_blas_addresses(), False,
                            *_scipy_blas_thread_functions())
        _BLAS = "scipy"
        raise RuntimeError("NumPy's BLAS cannot be used: its GEMM disagreed with np.matmul")
    _BLAS, _BLAS_NOTE = "numpy", ""
    return previous


def _size_scipy_blas():
    """SciPy's OpenBLAS may have loaded just now: give it fastnn's thread count
    when the user set one (threadpoolctl limits only the libraries loaded)."""
    from fastnn import _threads

    if _threads._num_threads is not None:
        _threads.set_num_threads(_threads._num_threads)


def _init_blas():
    global _BLAS_NOTE
    forced = os.environ.get("FASTNN_BLAS", "").strip().lower()
    if forced and forced not in ("numpy", "scipy"):
        raise ImportError(f"FASTNN_BLAS={forced!r}: choose 'numpy' or 'scipy'")
    if forced == "scipy":
        use_blas("scipy")
        _BLAS_NOTE = " (FASTNN_BLAS=scipy)"
        return
    try:
        use_blas("numpy")
    except RuntimeError as exc:
        if forced == "numpy":
            raise ImportError(f"FASTNN_BLAS=numpy: {exc}") from None
        use_blas("scipy")
        _BLAS_NOTE = f" ({exc})"


def blas():
    """``"numpy"`` or ``"scipy"``: the BLAS this backend's GEMMs call."""
    return _BLAS


def available():
    """The extensions imported; say so when they run serially."""
    if OPENMP:
        return True, ""
    serial = [ext.__name__.rsplit(".", 1)[-1] for ext in _EXTENSIONS if not ext.OPENMP]
    return True, f"compiled without OpenMP: kernels run serially ({', '.join(serial)})"


def set_num_threads(n):
    """Set the OpenMP threads of every extension's parallel loops (always 1 in
    a forked child: see ``fastnn._threads.forked_child``)."""
    global _num_threads
    from fastnn import _threads

    n = 1 if _threads.forked_child else max(1, int(n))
    for ext in _EXTENSIONS:
        ext.set_num_threads(n)
    _num_threads = n


def get_num_threads():
    """The OpenMP threads of this backend's parallel loops."""
    return _num_threads


_DESCRIPTION = {"baseline": "x86-64 baseline (SSE2)", "v3": "x86-64-v3 (AVX2, FMA)",
                "v4": "x86-64-v4 (AVX-512)"}


def info():
    """Extra lines for ``python -m fastnn info``."""
    variant = _DESCRIPTION.get(CPU_VARIANT, CPU_VARIANT)
    if built_variants() == ("baseline",):
        variant = "baseline (no per-CPU variants built: not x86-64, or FASTNN_CPU_VARIANTS=0)"
    return {
        "openmp": OPENMP,
        "openmp_threads": _num_threads,
        "cpu_variant": variant + (" (forced by FASTNN_CPU_VARIANT)" if _FORCED else ""),
        "cpu_variants_built": ", ".join(built_variants()),
        "cpu_variants_runnable": ", ".join(cpu_levels()),
        "extensions": ", ".join(ext.__name__ for ext in _EXTENSIONS),
        "blas": ("NumPy's OpenBLAS" if _BLAS == "numpy" else "scipy.linalg.cython_blas")
        + _BLAS_NOTE,
    }


def _init_threads():
    from fastnn._threads import get_num_threads as fastnn_threads

    set_num_threads(fastnn_threads())


_init_threads()
_init_blas()
