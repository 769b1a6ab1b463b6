"""Build fastnn's Cython extensions (kernels/_cy_*.pyx) with OpenMP.

Flags: ``-O3 -fno-math-errno -fno-trapping-math`` (portable, change no
result: no errno from libm, no floating-point exception flags kept exact, which
lets gcc if-convert the selects of the vectorizable math in
``kernels/_cy_math.pxd``) and OpenMP when the compiler has it; without OpenMP the extensions still build, run serially,
and a warning says so. ``FASTNN_NO_OPENMP=1`` forces a serial build.
The ``kernels/`` folder is installed as the subpackage ``fastnn.kernels``.
"""

import glob
import os
import shutil
import sys
import tempfile
import textwrap
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_PROBE = textwrap.dedent("""
    #include <omp.h>
    int main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }
""")


def _openmp_flags(compiler):
    """(compile flags, link flags) that enable OpenMP, or None."""
    if compiler.compiler_type == "msvc":
        return ["/openmp"], []
    if sys.platform == "darwin":
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


def _compiles_with(compiler, cflags, lflags):
    tmp = tempfile.mkdtemp(prefix="fastnn-omp-")
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(OPENMP_PROBE)
        objs = compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
        compiler.link_executable(objs, os.path.join(tmp, "probe"), extra_postargs=lflags)
        return True
    except Exception:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExt(build_ext):
    def build_extensions(self):
        msvc = self.compiler.compiler_type == "msvc"
        cflags = ["/O2"] if msvc else ["-O3", "-fno-math-errno", "-fno-trapping-math"]
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
        for ext in self.extensions:
            ext.extra_compile_args = cflags + list(ext.extra_compile_args)
            ext.extra_link_args = lflags + list(ext.extra_link_args)
        super().build_extensions()


def extensions():
    from Cython.Build import cythonize

    exts = [
        Extension(f"fastnn.kernels.{os.path.splitext(os.path.basename(pyx))[0]}", [pyx])
        for pyx in sorted(glob.glob(os.path.join("kernels", "_cy_*.pyx")))
    ]
    # include_path: the shared kernels/_cy_math.pxd is cimported by its bare name
    return cythonize(exts, language_level=3, include_path=["kernels"], compiler_directives={
        "boundscheck": False, "wraparound": False, "cdivision": True,
        "initializedcheck": False,
    })


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
