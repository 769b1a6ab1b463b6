"""Build fastnn's Cython extensions (kernels/_cy_*.pyx) with OpenMP.

Flags: ``-O3 -fno-math-errno -fno-trapping-math -ffp-contract=off`` (portable,
change no result: no errno from libm, no floating-point exception flags kept
exact, which lets gcc if-convert the selects of the vectorizable math in
``kernels/_cy_math.pxd``; no fused multiply-adds the source does not write,
which gcc would otherwise contract wherever the target has FMA, as x86-64-v3
and ARM do, and which changes results: RMSprop's centered ``sq - cm*cm``
cancels) and OpenMP when the compiler has it; without OpenMP the extensions still build, run serially,
and a warning says so. ``FASTNN_NO_OPENMP=1`` forces a serial build.
The ``kernels/`` folder is installed as the subpackage ``fastnn.kernels``.

Per-CPU variants (x86-64 only): every ``_cy_*`` kernel module is built three times
(``BASELINE_ONLY`` lists the modules built once),
for baseline x86-64 (``fastnn.kernels._cy_dense``), for x86-64-v3 (AVX2, FMA:
``_cy_dense_v3``, ``-march=x86-64-v3`` or MSVC ``/arch:AVX2``) and for
x86-64-v4 (AVX-512: ``_cy_dense_v4``, ``-march=x86-64-v4`` or
``/arch:AVX512``): the same arithmetic in wider vectors, so every variant
gives the baseline's results bit for bit, except the exp/tanh/log1p polynomials
of ``kernels/_cy_math.pxd``, which use FMA where the target has it (a few ulp;
tanh 1.5x faster); ``fastnn.kernels.cython_cpu`` loads the best one the CPU
runs (``FASTNN_CPU_VARIANT`` forces one). A variant the compiler cannot target
(gcc < 11, clang < 12) is left out with a warning; ``FASTNN_CPU_VARIANTS=0`` builds the baseline only
(a quicker development build).

Sanitizers: ``FASTNN_SANITIZE=address,undefined`` (or ``=1`` for that pair,
or any list ``-fsanitize=`` takes) adds ``-fsanitize=...
-fno-omit-frame-pointer -g`` to every extension (gcc/clang; MSVC gets
``/fsanitize=address`` only). Such a build runs only with the sanitizer
runtime preloaded into an uninstrumented Python: ``scripts/sanitize.sh``.
"""

import glob
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import textwrap
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_PROBE = textwrap.dedent("""
    #include <omp.h>
    int fastnn_probe(void) { return omp_get_max_threads() > 0 ? 0 : 1; }
""")
EMPTY_PROBE = "int fastnn_probe(void) { return 0; }\n"

#: Per-CPU variants: module-name suffix -> (gcc/clang flags, MSVC flags).
CPU_VARIANTS = {
    "v3": (["-march=x86-64-v3"], ["/arch:AVX2"]),
    "v4": (["-march=x86-64-v4"], ["/arch:AVX512"]),
}


def _openmp_flags(compiler):
    """(compile flags, link flags) that enable OpenMP, or None."""
    if compiler.compiler_type == "msvc":
        return ["/openmp"], []
    if sys.platform == "darwin":
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


def _compiles_with(compiler, cflags, lflags, source=OPENMP_PROBE):
    """Whether ``source`` compiles and links as a shared object, as an extension
    does (so ``CFLAGS``/``CPPFLAGS``/``LDFLAGS`` apply as they do there)."""
    tmp = tempfile.mkdtemp(prefix="fastnn-probe-")
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(source)
        objs = compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
        compiler.link_shared_object(objs, os.path.join(tmp, "probe" + compiler.shared_lib_extension),
                                    extra_postargs=lflags)
        return True
    except Exception:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sanitizers():
    """The ``-fsanitize=`` list asked for by ``FASTNN_SANITIZE``, or None."""
    value = os.environ.get("FASTNN_SANITIZE", "").strip()
    if value in ("", "0"):
        return None
    return "address,undefined" if value == "1" else value


def _x86_64_target():
    """Whether the extensions are built for x86-64 (not cross-compiled elsewhere)."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "x64"):
        return False
    if sys.platform == "darwin" and "arm64" in os.environ.get("ARCHFLAGS", ""):
        return False            # cross-compiling (universal2 or arm64) on an Intel Mac
    if sys.platform == "win32" and "arm" in os.environ.get("VSCMD_ARG_TGT_ARCH", "").lower():
        return False
    return True


def _want_variants():
    return _x86_64_target() and os.environ.get("FASTNN_CPU_VARIANTS", "1") != "0"


class BuildExt(build_ext):
    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:           # extensions compile in parallel (variants triple them)
            self.parallel = max(1, os.cpu_count() or 1)

    def build_extensions(self):
        msvc = self.compiler.compiler_type == "msvc"
        cflags = ["/O2"] if msvc else ["-O3", "-fno-math-errno", "-fno-trapping-math",
                                       "-ffp-contract=off"]
        lflags = []
        omp_c, omp_l = _openmp_flags(self.compiler)
        if os.environ.get("FASTNN_NO_OPENMP") == "1":
            warnings.warn("FASTNN_NO_OPENMP=1: building fastnn's kernels without OpenMP (serial)")
        elif _compiles_with(self.compiler, omp_c, omp_l):
            cflags += omp_c
            lflags += omp_l
        else:
            warnings.warn("the C compiler has no OpenMP: fastnn's Cython kernels will run "
                          "serially (fastnn.backends() says so)")
        sanitize = _sanitizers()
        if not msvc and not sanitize and os.environ.get("FASTNN_DEBUG_INFO") != "1":
            # Python's own CFLAGS often carry -g: debug info triples the size of the
            # wheel (12 extensions) and changes no code; FASTNN_DEBUG_INFO=1 keeps it
            cflags += ["-g0"]
        if sanitize and msvc:
            if "address" in sanitize:
                cflags += ["/fsanitize=address", "/Zi"]
            warnings.warn(f"FASTNN_SANITIZE={sanitize}: MSVC gets /fsanitize=address only")
        elif sanitize:
            cflags += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g"]
            lflags += [f"-fsanitize={sanitize}"]
        variant_flags = {}
        wanted = {getattr(e, "fastnn_variant", None) for e in self.extensions} - {None}
        for suffix in sorted(wanted):
            flags = CPU_VARIANTS[suffix][1 if msvc else 0]
            if msvc or _compiles_with(self.compiler, flags, [], EMPTY_PROBE):
                variant_flags[suffix] = flags
            else:
                warnings.warn(f"the C compiler cannot target {flags[0]}: the {suffix} variant "
                              f"of fastnn's kernels is left out")
        self.extensions = [e for e in self.extensions
                           if getattr(e, "fastnn_variant", None) in (None, *variant_flags)]
        for ext in self.extensions:
            extra = variant_flags.get(getattr(ext, "fastnn_variant", None), [])
            ext.extra_compile_args = cflags + extra + list(ext.extra_compile_args)
            ext.extra_link_args = lflags + list(ext.extra_link_args)
        super().build_extensions()


#: Modules built once, without per-CPU variants: ``_cy_gate`` (the compiled gate of
#: ``fastnn.ops``) does no vector arithmetic worth an ``-march`` build, and one module
#: name lets ``fastnn.ops`` import it whatever variant the kernels load.
BASELINE_ONLY = ("_cy_gate",)
#: Modules that read NumPy's array struct, compiled against NumPy's headers.
NUMPY_HEADERS = ("_cy_gate", "_cy_data", "_cy_loss")


def _stem(pyx):
    return os.path.splitext(os.path.basename(pyx))[0]


def _extension(pyx, module):
    if _stem(pyx) in NUMPY_HEADERS:
        import numpy

        return Extension(module, [pyx], include_dirs=[numpy.get_include()])
    return Extension(module, [pyx])


def extensions():
    from Cython.Build import cythonize

    # Cython's translation in parallel processes where they fork (a spawned one
    # would run this setup.py again)
    threads = (os.cpu_count() or 1) if sys.platform.startswith("linux") else 0
    directives = {"boundscheck": False, "wraparound": False, "cdivision": True,
                  "initializedcheck": False}
    sources = sorted(glob.glob(os.path.join("kernels", "_cy_*.pyx")))
    name = lambda pyx, suffix="": (  # noqa: E731
        f"fastnn.kernels.{os.path.splitext(os.path.basename(pyx))[0]}{suffix}")
    # include_path: the shared kernels/_cy_math.pxd is cimported by its bare name
    exts = cythonize([_extension(pyx, name(pyx)) for pyx in sources], language_level=3,
                     include_path=["kernels"], compiler_directives=directives, nthreads=threads)
    if _want_variants():
        sources = [pyx for pyx in sources if _stem(pyx) not in BASELINE_ONLY]
        for suffix in CPU_VARIANTS:
            # the same .pyx under another module name: Cython writes the module name
            # into the C code, so each variant is translated into its own build folder
            variant = cythonize([Extension(name(pyx, "_" + suffix), [pyx]) for pyx in sources],
                                language_level=3, include_path=["kernels"],
                                compiler_directives=directives, nthreads=threads,
                                build_dir=os.path.join("build", f"cython-{suffix}"))
            for ext in variant:
                ext.fastnn_variant = suffix
            exts += variant
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
