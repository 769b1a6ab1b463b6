"""``python -m fastnn info``: version, backends, threads, BLAS, CPU."""

import platform
import sys

import numpy as np


def cpu_features():
    """The SIMD features of this CPU that matter to our kernels (Linux: /proc/cpuinfo)."""
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "neon", "asimd")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in flags]
    except OSError:
        pass
    return []


def collect():
    """Everything ``info`` prints, as a dict."""
    import fastnn
    from fastnn import _backend
    from fastnn._bench import cpu_model
    from fastnn._threads import cpu_count
    from threadpoolctl import threadpool_info

    backends = {}
    for name, info in fastnn.backends().items():
        entry = {"available": info.available, "reason": info.reason,
                 "fallbacks": list(info.fallbacks)}
        if info.available:
            extra = getattr(_backend.load(name).module, "info", None)
            if extra is not None:
                entry.update(extra())
        backends[name] = entry
    return {
        "fastnn": fastnn.__version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": f"{cpu_model()} ({platform.machine()}, {cpu_count()} cores available)",
        "cpu_features": cpu_features(),
        "default_backend": fastnn.get_backend(),
        "threads": fastnn.get_num_threads(),
        "backends": backends,
        "threadpools": [
            {k: p.get(k) for k in ("user_api", "internal_api", "num_threads", "version",
                                   "architecture", "filepath")}
            for p in threadpool_info()
        ],
    }


def print_info(file=None):
    """Print ``collect()`` as readable lines."""
    file = file or sys.stdout
    d = collect()
    w = lambda s="": print(s, file=file)  # noqa: E731
    w(f"fastnn {d['fastnn']}  (Python {d['python']}, NumPy {d['numpy']}, {d['platform']})")
    w(f"CPU: {d['cpu']}; features: {' '.join(d['cpu_features']) or 'unknown'}")
    w(f"default backend: {d['default_backend']}; threads: {d['threads']}")
    w("backends:")
    for name, b in d["backends"].items():
        state = "available" if b["available"] else "unavailable"
        line = f"  {name:7s} {state}"
        if b["reason"]:
            line += f": {b['reason']}"
        w(line)
        extras = {k: v for k, v in b.items() if k not in ("available", "reason", "fallbacks")}
        for k, v in extras.items():
            w(f"          {k}: {v}")
        if b["fallbacks"]:
            w(f"          runs the reference for: {', '.join(b['fallbacks'])}")
    w("thread pools (threadpoolctl):")
    for p in d["threadpools"]:
        w(f"  {p['user_api']:7s} {p['internal_api']:9s} threads={p['num_threads']} "
          f"version={p['version']} arch={p['architecture']}  {p['filepath']}")
