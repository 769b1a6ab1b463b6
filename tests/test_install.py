"""A read-only install, used by an unprivileged user.

The wheel (``FASTNN_WHEEL``: a wheel file or a folder holding one; else built
once from this source tree with ``pip wheel --no-deps``) is installed with its
dependencies into a fresh venv; the venv's site-packages is then made
read-only, and ``runuser -u nobody`` runs Python there (root ignores file
permissions, so a test as root would pass vacuously). As ``nobody``:

* nothing can be written into the package folder (checked first: the setup
  is real);
* ``import fastnn`` gives the installed package, the cython backend is
  available and computes what the reference computes;
* the numba backend compiles and caches its kernels in the user cache folder
  (``$XDG_CACHE_HOME/fastnn/numba``, else ``~/.cache/fastnn/numba``), also
  when ``HOME`` is ``nobody``'s ``/nonexistent``, and a second process finds
  them there;
* ``python -m fastnn info`` runs;
* the package folder is byte for byte as it was (no ``__pycache__``, no
  numba index written next to the sources).

Slow (a wheel build unless ``FASTNN_WHEEL`` is given, a pip install of the
dependencies, numba compiling in a cold cache): marked ``slow``; skipped
unless running as root on Linux with ``runuser``.

The interpreter must be one ``nobody`` can run: this one, else a system
``/usr/bin/pythonX.Y`` of the same version (a pyenv Python under ``/root`` is
unreadable to ``nobody``).
"""

import glob
import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOBODY = "nobody"
RUNUSER = shutil.which("runuser")


def _nobody_ids():
    try:
        import pwd

        entry = pwd.getpwnam(NOBODY)
        return entry.pw_uid, entry.pw_gid
    except (ImportError, KeyError):
        return None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only (runuser)"),
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                       reason="needs root to switch to an unprivileged user"),
    pytest.mark.skipif(RUNUSER is None, reason="runuser is not installed"),
    pytest.mark.skipif(_nobody_ids() is None, reason="no user 'nobody'"),
]


def _as_nobody(args, env, cwd, timeout=900):
    # -m keeps the environment given here: runuser alone resets HOME to nobody's (/nonexistent)
    return subprocess.run([RUNUSER, "-m", "-u", NOBODY, "--", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def _interpreter(scratch):
    """A Python of this version that ``nobody`` can run, or None."""
    want = f"{sys.version_info[0]}.{sys.version_info[1]}"
    candidates = [os.path.realpath(sys.executable),
                  getattr(sys, "_base_executable", sys.executable),
                  f"/usr/bin/python{want}", f"/usr/local/bin/python{want}"]
    for exe in dict.fromkeys(candidates):
        if not os.path.exists(exe):
            continue
        proc = _as_nobody([exe, "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"],
                          env=_env(HOME="/nonexistent"), cwd=scratch, timeout=60)
        if proc.returncode == 0 and proc.stdout.strip() == want:
            return exe
    return None


def _wheel(scratch):
    """``FASTNN_WHEEL`` or a wheel built from a copy of this source tree."""
    given = os.environ.get("FASTNN_WHEEL")
    if given:
        found = [given] if given.endswith(".whl") else glob.glob(os.path.join(given, "fastnn-*.whl"))
        if not found:
            pytest.fail(f"FASTNN_WHEEL={given!r} names no fastnn wheel")
        return found[0]
    if not os.path.exists(os.path.join(ROOT, "setup.py")):
        pytest.skip("no source tree to build a wheel from, and FASTNN_WHEEL is not set")
    src = os.path.join(scratch, "src")
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "*.so", "*.c", "__pycache__", ".hypothesis",
        ".pytest_cache", ".benchmarks", "*.nbi", "*.nbc", "venv", ".venv", "bench-out"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
           os.path.join(scratch, "dist"), src]
    try:            # the build requirements are here: skip pip's isolated build env
        import Cython, numpy, scipy, setuptools  # noqa: F401, E401
        cmd.insert(4, "--no-build-isolation")
    except ImportError:
        pass
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return glob.glob(os.path.join(scratch, "dist", "fastnn-*.whl"))[0]


def _tree(path):
    """``{relative path: (size, mtime_ns)}`` of every file and folder under ``path``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
    return out


def _read_only(path):
    """Take every write bit away under ``path`` (files and folders)."""
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, stat.S_IMODE(os.lstat(p).st_mode) & ~0o222 | 0o444
                         | (0o111 if os.path.isdir(p) else 0))
    os.chmod(path, stat.S_IMODE(os.stat(path).st_mode) & ~0o222)


@pytest.fixture(scope="module")
def install():
    """A venv with the wheel installed, its site-packages read-only, in a
    scratch folder that ``nobody`` can enter. Removed afterwards."""
    scratch = tempfile.mkdtemp(prefix="fastnn-install-")
    os.chmod(scratch, 0o755)
    try:
        exe = _interpreter(scratch)
        if exe is None:
            pytest.skip(f"no Python {sys.version_info[0]}.{sys.version_info[1]} that "
                        f"'{NOBODY}' can run")
        wheel = _wheel(scratch)
        venv = os.path.join(scratch, "venv")
        subprocess.run([exe, "-m", "venv", venv], check=True, timeout=300)
        py = os.path.join(venv, "bin", "python")
        proc = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                               wheel], capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        package = os.path.join(site, "fastnn")
        assert os.path.isdir(os.path.join(package, "kernels")), os.listdir(site)
        for dirpath, dirnames, filenames in os.walk(scratch):   # readable by nobody
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                if not os.path.islink(p):
                    os.chmod(p, stat.S_IMODE(os.lstat(p).st_mode) | 0o444
                             | (0o111 if os.path.isdir(p) else 0))
        _read_only(site)
        uid, gid = _nobody_ids()
        homes = {}
        for name in ("home", "xdg"):
            homes[name] = os.path.join(scratch, name)
            os.mkdir(homes[name])
            os.chown(homes[name], uid, gid)
        yield dict(scratch=scratch, py=py, site=site, package=package, wheel=wheel, **homes)
    finally:
        for dirpath, dirnames, _ in os.walk(scratch):   # give the write bits back to remove it
            os.chmod(dirpath, 0o755)
        shutil.rmtree(scratch, ignore_errors=True)


def _env(**extra):
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "USER": NOBODY, "LOGNAME": NOBODY}
    env.update({k: v for k, v in extra.items() if v is not None})
    return env


USE = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import fastnn
    from fastnn.kernels import reference as ref
    report = {"file": fastnn.__file__, "backends": {
        k: [v.available, v.reason] for k, v in fastnn.backends().items()}}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((17, 9)).astype(np.float32)
    w = rng.standard_normal((9, 5)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    exp_out = np.empty((17, 5), np.float32)
    ref.dense_forward(x, w, b, "gelu", exp_out)
    p0, g = rng.standard_normal(333), rng.standard_normal(333)
    exp_p, m, v = p0.copy(), np.zeros(333), np.zeros(333)
    ref.adam_step(exp_p, g, m, v, 1, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, 0.0, None)
    for name in ("cython", "numba"):
        if not report["backends"][name][0]:
            continue
        with fastnn.use_backend(name):
            out = np.empty_like(exp_out)
            fastnn.ops.dense_forward(x, w, b, "gelu", out)
            p, m, v = p0.copy(), np.zeros(333), np.zeros(333)
            fastnn.ops.adam_step(p, g, m, v, 1, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, 0.0, None)
        np.testing.assert_allclose(out, exp_out, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(p, exp_p, rtol=1e-12, atol=1e-13)
        report[name] = "ok"
    if report["backends"]["numba"][0]:
        from fastnn.kernels import numba_cpu
        report["numba_cache"] = numba_cpu.cache_dir()
    try:
        open(os.path.join(os.path.dirname(fastnn.__file__), "probe"), "w").close()
        report["package_writable"] = True
    except OSError:
        report["package_writable"] = False
    print("REPORT" + json.dumps(report))
""")


def _use(install, env):
    proc = _as_nobody([install["py"], "-I", "-c", USE], env=env, cwd=install["home"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT")][-1]
    return json.loads(line[len("REPORT"):])


def _cached(folder):
    return sorted(os.path.relpath(p, folder) for p in glob.glob(os.path.join(folder, "**", "*.nbi"),
                                                                recursive=True))


@pytest.mark.parametrize("where", ["home", "xdg"])
def test_read_only_install_as_nobody(install, where):
    before = _tree(install["site"])
    if where == "home":       # HOME writable, no XDG_CACHE_HOME: ~/.cache/fastnn/numba
        env = _env(HOME=install["home"])
        cache = os.path.join(install["home"], ".cache", "fastnn", "numba")
    else:                     # nobody's own HOME (/nonexistent), XDG_CACHE_HOME writable
        env = _env(HOME="/nonexistent", XDG_CACHE_HOME=install["xdg"])
        cache = os.path.join(install["xdg"], "fastnn", "numba")
    report = _use(install, env)
    assert report["package_writable"] is False, "the package folder is writable by nobody"
    assert report["file"].startswith(install["package"]), report["file"]
    assert report["backends"]["cython"][0], report["backends"]["cython"]
    assert report.get("cython") == "ok"
    assert report["backends"]["numba"][0], report["backends"]["numba"]
    assert report.get("numba") == "ok"
    assert report["numba_cache"] == cache
    first = _cached(cache)
    assert first, f"nothing cached in {cache}"
    again = _use(install, env)          # a second process loads them from there
    assert again.get("numba") == "ok"
    assert _cached(cache) == first, "the second process compiled again"
    proc = _as_nobody([install["py"], "-I", "-m", "fastnn", "info"], env=env,
                      cwd=install["home"])
    assert proc.returncode == 0, proc.stderr
    assert "cython" in proc.stdout and "numba" in proc.stdout
    assert _tree(install["site"]) == before, "something was written into site-packages"


def test_no_writable_cache_folder_anywhere(install):
    """``HOME=/nonexistent`` and no ``XDG_CACHE_HOME``: there is nowhere to
    cache; ``import fastnn`` and the cython backend still work, and the numba
    backend either works uncached or says why it is unavailable (kernels/numba_cpu/
    compiles uncached there and says so in its reason)."""
    before = _tree(install["site"])
    proc = _as_nobody([install["py"], "-I", "-c", USE], env=_env(HOME="/nonexistent"),
                      cwd=install["scratch"])
    assert _tree(install["site"]) == before
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads([ln for ln in proc.stdout.splitlines()
                         if ln.startswith("REPORT")][-1][len("REPORT"):])
    assert report["file"].startswith(install["package"])
    assert report.get("cython") == "ok"
    available, reason = report["backends"]["numba"]
    assert report.get("numba") == "ok" if available else reason, report
