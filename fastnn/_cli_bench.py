"""``python -m fastnn bench [--quick] [--out DIR]``: run benchmarks, write a report.

Writes ``DIR/report.md`` (the machine line and tables: kernels, per-call
overhead of ``fastnn.ops``, training of the MLP and the two convnets, data at
scale (not with ``--quick``), start-up), ``DIR/speedup.png`` (speed-ups over
NumPy, log scale, one colour per backend; needs matplotlib, the ``bench``
extra) and ``DIR/results.json``.
The measuring is ``fastnn._bench``; see its docstring for the method.
"""

import argparse
import datetime
import json
import math
import os
import sys
import time
from dataclasses import asdict

from . import _bench

SECTIONS = ("kernels", "overhead", "training", "data", "startup")

#: One colour per backend and peer (Okabe-Ito, readable by colour-blind readers).
COLOURS = {"numpy": "#999999", "cython": "#0072B2", "numba": "#E69F00", "cuda": "#009E73",
           "pytorch": "#D55E00", "sklearn": "#CC79A7", "gemm": "#000000"}


def add_arguments(parser):
    """Options of ``python -m fastnn bench``."""
    parser.add_argument("--quick", action="store_true",
                        help="a small set (float32, the shapes of the speed goals, short "
                             "training epochs, no data-at-scale section, warm start-up "
                             "only): two to three minutes on 2 quiet cores")
    parser.add_argument("--out", default="bench-out", metavar="DIR",
                        help="folder for report.md, speedup.png, results.json "
                             "(default: %(default)s)")
    parser.add_argument("--only", default=None, metavar="PATTERNS",
                        help="comma-separated substrings: run only the kernel cases whose name "
                             "contains one (e.g. softmax,adam), and the overhead / training / "
                             "data / startup sections only when named; mlp, convnet, cnn name "
                             "one network of the training section")
    parser.add_argument("--backends", default=None, metavar="NAMES",
                        help="comma-separated backends (default: every available one; numpy, "
                             "the baseline, always runs)")
    parser.add_argument("--dtype", choices=("float32", "float64", "both"), default=None,
                        help="kernel dtypes (default: float32 with --quick, else both)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed samples per measurement; the median is reported "
                             "(default: 5 with --quick, else 9)")
    parser.add_argument("--threads", type=int, default=None,
                        help="fastnn.set_num_threads(n) first (default: all cores)")
    parser.add_argument("--no-peers", action="store_true",
                        help="leave out PyTorch and scikit-learn from the training section")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _select(args):
    """(kernel cases, run training?, run start-up?, backends, start-up modes); the
    overhead section: ``_overhead_selected``; the networks and the data
    section: ``_networks``, ``_data_selected``."""
    backends = _bench.available_backends(args.backends.split(",") if args.backends else None)
    if "numpy" not in backends:
        backends.insert(0, "numpy")
    dtypes = {"float32": ("float32",), "float64": ("float64",), "both": _bench.DTYPES,
              None: ("float32",) if args.quick else _bench.DTYPES}[args.dtype]
    if args.quick:
        cases = [_bench.find_case(c.kernel, c.variant, c.dims, d)
                 for d in dtypes for c in _bench.quick_cases()]
    else:
        cases = _bench.all_cases(dtypes)
    training = startup = True
    if args.only:
        pats = [p.strip() for p in args.only.split(",") if p.strip()]
        cases = [c for c in cases if any(p in c.name for p in pats)]
        training = any(p in "training" for p in pats)
        startup = any(p in "startup" for p in pats)
    modes = ("warm",) if args.quick else ("cold", "warm")
    return cases, training, startup, backends, modes


def _networks(args):
    """The networks of the training section (keys of ``_bench.NETWORKS``):
    every one, or those ``--only`` names (all when it names ``training``)."""
    if not args.only:
        return tuple(_bench.NETWORKS)
    pats = [p.strip() for p in args.only.split(",") if p.strip()]
    if any(p in "training" for p in pats):
        return tuple(_bench.NETWORKS)
    return tuple(k for k in _bench.NETWORKS if k in pats)


def _data_selected(args):
    """Whether the data-at-scale section runs: not with ``--quick`` unless
    ``--only`` names it; otherwise unless ``--only`` names other things only."""
    named = bool(args.only) and any(p.strip() and p.strip() in "data"
                                    for p in args.only.split(","))
    return named or not (args.quick or args.only)


def _overhead_selected(args):
    """Whether the per-call overhead table runs: always, unless ``--only`` names
    other things only."""
    if not args.only:
        return True
    return any(p.strip() and p.strip() in "overhead" for p in args.only.split(","))


def run(args):
    """Run the chosen benchmarks and write the report; returns the exit code."""
    import fastnn
    from tqdm import tqdm

    if args.threads is not None:
        fastnn.set_num_threads(args.threads)
    started = time.perf_counter()
    info = _bench.machine_info()
    cases, _, startup, backends, modes = _select(args)
    networks = _networks(args)
    data = _data_selected(args)
    overhead = _overhead_selected(args)
    overhead_backends = [b for b in backends if b != "numpy"]
    repeats = args.repeats or (5 if args.quick else 9)
    min_time = 0.01 if args.quick else 0.05
    max_time = 1.5 if args.quick else 5.0
    n_train = 2048 if args.quick else 8192
    #: the convnets on the NumPy reference run about 1,000 samples/s
    n_conv = 384 if args.quick else 4096
    peers = not args.no_peers
    torch_ok = peers and _bench.torch_available()[0]

    total = len(cases)
    if overhead:
        total += len(_bench.overhead_cases()) * len(overhead_backends)
    if networks:
        total += len(networks) * (len(_bench.TRAIN_BATCHES) + (1 if torch_ok else 0))
    if data:
        total += len(_bench.DATA_SETS) * (2 if torch_ok else 1)
    if startup:
        total += len(backends) * len(modes)
    bar = tqdm(total=total, desc="fastnn bench", unit="run", disable=args.no_progress,
               file=sys.stderr, dynamic_ncols=True)

    kernel_rows, overhead_rows, train_rows, start_rows, notes = [], [], [], [], []
    data_rows = []
    spent = {}
    t0 = time.perf_counter()
    for case in cases:
        bar.set_postfix_str(f"{case.name} {case.shape} {case.dtype}", refresh=False)
        kernel_rows += _bench.run_case(case, backends, repeats, min_time, max_time)
        bar.update()
    spent["kernels"] = time.perf_counter() - t0
    if overhead:
        t0 = time.perf_counter()
        bar.set_postfix_str("per-call overhead", refresh=True)
        overhead_rows, skipped = _bench.run_overhead(overhead_backends, peers=peers,
                                                     progress=bar.update)
        notes += skipped
        spent["overhead"] = time.perf_counter() - t0
    if networks:
        t0 = time.perf_counter()
        bar.set_postfix_str("training epochs", refresh=True)
        train_rows, skipped = _bench.run_training(
            backends, n=n_train, repeats=repeats, peers=peers, progress=bar.update,
            networks=networks, conv_n=n_conv)
        notes += skipped
        spent["training"] = time.perf_counter() - t0
    if data:
        t0 = time.perf_counter()
        bar.set_postfix_str("data at scale (fresh processes)", refresh=True)
        data_rows, skipped = _bench.run_data(peers=peers, progress=bar.update)
        notes += skipped
        spent["data"] = time.perf_counter() - t0
    if startup:
        t0 = time.perf_counter()
        bar.set_postfix_str("start-up (fresh processes)", refresh=True)
        start_rows, errors = _bench.run_startup(backends, modes, progress=bar.update)
        notes += errors
        spent["start-up"] = time.perf_counter() - t0
    bar.close()
    elapsed = time.perf_counter() - started
    info["load_end"] = _bench.load_average()

    os.makedirs(args.out, exist_ok=True)
    command = "python -m fastnn bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"]
                                                    else [])
    fallbacks = {b: fastnn.backends()[b].fallbacks for b in backends if b != "numpy"}
    report = render_report(info, kernel_rows, train_rows, start_rows, notes, fallbacks,
                           repeats, elapsed, command.strip(), spent, overhead_rows, data_rows)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"machine": info, "kernels": [asdict(r) for r in kernel_rows],
                   "overhead": [asdict(r) for r in overhead_rows],
                   "training": [asdict(r) for r in train_rows],
                   "data": [asdict(r) for r in data_rows],
                   "startup": [asdict(r) for r in start_rows], "notes": notes,
                   "seconds": elapsed, "sections": spent}, f, indent=1)
    chart = os.path.join(args.out, "speedup.png")
    try:
        plot_speedups(kernel_rows, train_rows, chart, title=_chart_title(info))
    except ImportError:
        print("speedup.png not written: matplotlib is not installed "
              "(pip install -e \".[bench]\")", file=sys.stderr)
        chart = None
    print(f"wrote {os.path.join(args.out, 'report.md')}" + (f" and {chart}" if chart else "")
          + f" in {elapsed:.0f} s")
    return 0


# ======================================================================= report

def _table(header, rows, right=()):
    """A Markdown table; the columns named in ``right`` are right-aligned."""
    out = ["| " + " | ".join(header) + " |",
           "| " + " | ".join("---:" if h in right else "---" for h in header) + " |"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def kernel_table(rows):
    """The kernel table in Markdown."""
    return _table(["kernel", "shape", "dtype", "backend", "time", "vs NumPy", "vs probe"],
                  right=("time", "vs NumPy", "vs probe"),
                  rows=[[r.name, r.shape, r.dtype, r.backend, _bench.fmt_time(r.seconds),
                    _bench.fmt_ratio(r.speedup), _bench.fmt_probe(r)] for r in rows])


def overhead_table(rows):
    """The per-call table in Markdown: ``fn.ops``, the backend's kernel directly,
    their difference, the NumPy reference, PyTorch's op."""
    us = lambda s: "" if s is None else f"{s * 1e6:.2f}"  # noqa: E731
    return _table(["kernel", "shape", "dtype", "backend", "fn.ops us", "direct us",
                   "fn.ops - direct", "fn.ops path", "NumPy ref. us", "PyTorch us", "PyTorch op"],
                  right=("fn.ops us", "direct us", "fn.ops - direct", "NumPy ref. us",
                         "PyTorch us"),
                  rows=[[r.name, r.shape, r.dtype, r.backend, us(r.ops_s), us(r.direct_s),
                         f"{(r.ops_s - r.direct_s) * 1e6:+.2f}", r.path, us(r.numpy_s),
                         us(r.torch_s), r.torch_op] for r in rows])


def overhead_summary(rows):
    """One sentence per backend: the largest fn.ops - direct, and the rows where
    fn.ops is slower than the NumPy reference or PyTorch's op."""
    out = []
    for backend in dict.fromkeys(r.backend for r in rows):
        mine = [r for r in rows if r.backend == backend]
        worst = max(mine, key=lambda r: r.ops_s - r.direct_s)
        slower = [r.name for r in mine if r.ops_s > r.numpy_s or
                  (r.torch_s is not None and r.ops_s > r.torch_s)]
        out.append(f"{backend}: fn.ops costs at most {(worst.ops_s - worst.direct_s) * 1e6:+.2f} "
                   f"us over the kernel called directly ({worst.name}); "
                   + (f"slower than the NumPy reference or PyTorch in {', '.join(slower)}."
                      if slower else "as fast as the NumPy reference and PyTorch or faster "
                      "in every row."))
    return out


def training_table(rows):
    """The training table of one network in Markdown."""
    return _table(["batch", "contender", "samples/s", "vs NumPy", "vs PyTorch",
                   "of GEMM ceiling", "of kernel step"],
                  right=("batch", "samples/s", "vs NumPy", "vs PyTorch", "of GEMM ceiling",
                         "of kernel step"),
                  rows=[[r.batch, r.contender + (f" ({r.note})" if r.note else ""),
                    f"{r.samples_per_s:,.0f}", _bench.fmt_ratio(r.vs_numpy),
                    _bench.fmt_ratio(r.vs_torch),
                    "" if r.of_ceiling is None else f"{100 * r.of_ceiling:.0f}%",
                    "" if r.vs_kernels is None else f"{100 * r.vs_kernels:.0f}%"]
                   for r in rows])


def data_table(rows):
    """The data-at-scale table in Markdown."""
    mb = lambda b: "" if b is None else f"{b / 2**20:,.0f} MB"  # noqa: E731
    return _table(["data", "batch", "contender", "wall samples/s", "steps alone samples/s",
                   "peak over the data", "size of the data"],
                  right=("batch", "wall samples/s", "steps alone samples/s",
                         "peak over the data", "size of the data"),
                  rows=[[r.data, r.batch, r.contender + (f" ({r.note})" if r.note else ""),
                         f"{r.samples_per_s:,.0f}",
                         "" if r.step_samples_per_s is None else f"{r.step_samples_per_s:,.0f}",
                         mb(r.peak_over_data), mb(r.data_bytes)] for r in rows])


def startup_table(rows):
    """The start-up table in Markdown."""
    return _table(["backend", "cache", "import fastnn", "load backend", "first call",
                   "process total", "first call is"],
                  right=("import fastnn", "load backend", "first call", "process total"),
                  rows=[[r.backend, r.cache, f"{r.import_s:.2f} s", f"{r.load_s:.2f} s",
                    f"{r.first_s:.2f} s", f"{r.total_s:.2f} s", r.kind] for r in rows])


def summary_tables(kernel_rows, train_rows):
    """Compact tables for a README: speed-ups over NumPy by backend in columns,
    and training samples/s by contender in columns."""
    out = []
    backends = [b for b in _bench.BACKEND_ORDER if b != "numpy"
                and any(r.backend == b for r in kernel_rows)]
    if kernel_rows and backends:
        cells = {}
        for r in kernel_rows:
            key = (r.name, r.shape, r.dtype)
            cells.setdefault(key, {})[r.backend] = r
        rows = []
        for (name, shape, dtype), by in cells.items():
            base = by.get("numpy")
            rows.append([name, shape, dtype, _bench.fmt_time(base.seconds if base else None)]
                        + [_bench.fmt_ratio(by[b].speedup) if b in by else "(reference)"
                           for b in backends])
        out.append(_table(["kernel", "shape", "dtype", "NumPy"] + backends, rows=rows,
                          right=["NumPy"] + backends))
    if train_rows:
        names = list(dict.fromkeys(r.contender for r in train_rows))
        by = {(r.network, r.batch, r.contender): r for r in train_rows}
        rows = []
        for net, batch in dict.fromkeys((r.network, r.batch) for r in train_rows):
            rows.append([_bench.NETWORK_SHORT.get(net, net), batch]
                        + [f"{by[net, batch, n].samples_per_s:,.0f}" if (net, batch, n) in by
                           else "" for n in names])
        out.append(_table(["network", "batch"] + names, rows=rows, right=["batch"] + names))
    return out


def render_report(info, kernel_rows, train_rows, start_rows, notes, fallbacks, repeats,
                  elapsed, command, spent=None, overhead_rows=(), data_rows=()):
    """report.md as a string."""
    split = ""
    if spent:
        split = " (" + ", ".join(f"{k} {v:.0f} s" for k, v in spent.items()) + ")"
    load = ""
    if info.get("load") is not None:
        load = (f" The 1-minute load average was {info['load']:.1f} at the start and "
                f"{info.get('load_end') or 0:.1f} at the end: above the core count, other "
                f"processes were running and the times are noisy (the ratios less so: "
                f"each is measured round robin with its baseline).")
    lines = [
        "# fastnn benchmark report", "",
        f"`{command}`, {datetime.datetime.now().isoformat(timespec='seconds')}, "
        f"{elapsed:.0f} s{split}.", "",
        f"**Machine:** {_bench.machine_line(info)}.{load}", "",
    ]
    summary = summary_tables(kernel_rows, train_rows)
    if summary:
        lines += ["## Summary", "",
                  "Speed-ups over NumPy (its time in the NumPy column; *(reference)*: the "
                  "backend runs the NumPy reference there); training in samples/s.", ""]
        for t in summary:
            lines += [t, ""]
    if kernel_rows:
        lines += [
            "## Kernels", "",
            f"Median of {repeats} samples per row after an untimed warm-up call, the "
            "backends of a row group sampled round robin with the NumPy baseline "
            "(`numpy`, the reference kernels) in the same run. *vs NumPy*: NumPy's time "
            "over this one (above 1 is faster). *vs probe*: for the dense kernels, this "
            "time over the bare BLAS GEMM of the same shape (`np.matmul(out=)`; 1.00x adds "
            "nothing to it); for the convolutions, over their GEMM alone in im2col form "
            "(M = n*p*q, K = kh*kw*c, N = o: forward `cols @ w`, backward `cols.T @ dz`, "
            "backprop `dz @ w.T`, on columns that exist already); for the optimizers, the "
            "fraction of the memory-bandwidth floor reached (a streaming kernel reading and writing the same arrays once, Adam 4 "
            "reads + 3 writes; 100% is at bandwidth).", "",
            kernel_table(kernel_rows), "",
        ]
        partial = {b: f for b, f in fallbacks.items() if f}
        if partial:
            lines += ["Not measured, because the backend runs the NumPy reference there:", ""]
            lines += [f"- {b}: {', '.join(f)}" for b, f in partial.items()]
            lines.append("")
    if overhead_rows:
        lines += [
            "## Per-call overhead of fastnn.ops", "",
            f"One call at a small size, median of {_bench.OVERHEAD_CALLS:,} calls each timed "
            "alone (`perf_counter_ns`, whose own ~0.05 us is in every figure), the "
            "contenders of a row interleaved call by call: through `fastnn.ops` (checked, "
            "then dispatched), the backend's kernel called directly (unchecked), the NumPy "
            "reference kernel called directly, and PyTorch's nearest op in its own process "
            "(where it computes less, the op column says so). *fn.ops path*: *C entry* (the "
            "compiled gate hands the checked pointers to the kernel's C code, so fn.ops can "
            "be faster than the Python-level kernel), *compiled gate* (checked in C, then "
            "the backend's kernel), *Python gate*.", "",
            overhead_table(overhead_rows), "",
        ]
        lines += [f"- {line}" for line in overhead_summary(overhead_rows)] + [""]
    for net in dict.fromkeys(r.network for r in train_rows):
        mine = [r for r in train_rows if r.network == net]
        if net == "mlp":
            what = ("*numpy (plain)*: the same step written with NumPy (the reference "
                    "kernels, buffers allocated once); *fastnn[b]*: `fastnn.Sequential.fit` "
                    "on backend b; *kernel step[b]*: backend b's kernels called directly, "
                    "what a step costs without the model's Python; *GEMMs only*: the eight "
                    "GEMMs of a step and nothing else, the ceiling.")
        else:
            what = ("Generated 28x28x1 images (the speed does not depend on the values), "
                    "NHWC. *numpy (plain)*: the step written with the NumPy reference kernels "
                    "(im2col + one GEMM per convolution, buffers allocated once), the NumPy "
                    "baseline; *fastnn[b]*: `fastnn.Sequential.fit` on backend b; *kernel "
                    "step[b]*: backend b's kernels called directly; *GEMMs only*: the "
                    "step's GEMMs in im2col form on columns that exist already (no im2col, "
                    "pooling, dropout or epilogue), the ceiling of an im2col implementation; "
                    "*pytorch*: the same layers in NCHW, PyTorch's layout.")
        lines += [
            f"## Training: {_bench.NETWORKS.get(net, net)}; Adam, float32", "",
            "Samples/s of one epoch (median; full batches, no shuffle), in this process "
            "and interleaved except PyTorch (`torch.optim.Adam(fused=True)`, its own "
            "process, the same thread count). " + what + " *of kernel step*: fastnn[b] "
            "over kernel step[b].", "",
            training_table(mine), "",
        ]
    if data_rows:
        lines += [
            "## Data at scale: a shuffled epoch of the 784-256-128-10 MLP", "",
            "Each row in a fresh process: the data made (or loaded), the model made and "
            "trained on two batches, then one whole epoch, shuffled. *wall samples/s*: the "
            "epoch's wall clock, data movement included (fastnn: `fit`; PyTorch: a "
            "`DataLoader` over a `TensorDataset`, `shuffle=True`, no workers); *steps "
            "alone*: fastnn's `history['step_samples_per_s']`; *peak over the data*: the "
            "resident peak (`VmHWM`) while making the model and training, over the "
            "resident size once the data existed (the model's own buffers included).", "",
            data_table(data_rows), "",
        ]
    if start_rows:
        lines += [
            "## Start-up", "",
            "A fresh process each: `import fastnn`, loading the backend, then the first "
            "call (compiles on numba when the cache is cold). *cold*: empty "
            "`NUMBA_CACHE_DIR`; *warm*: the cache of an earlier run.", "",
            startup_table(start_rows), "",
        ]
    if notes:
        lines += ["## Skipped or failed", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


# ======================================================================= chart

def _chart_title(info):
    threads = f"{info['threads']} thread{'s' if info['threads'] != 1 else ''}"
    return (f"fastnn speed-up over NumPy: {info['cpu']}, {threads}, "
            f"NumPy {info['versions']['numpy']}")


def plot_speedups(kernel_rows, train_rows, path, title="fastnn speed-up over NumPy"):
    """Horizontal bar chart of speed-ups over NumPy (log scale), one colour per
    backend: a panel for the kernels (one group of bars per case), one for
    training samples/s (one labelled bar per contender). Raises ImportError
    without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator

    panels = []   # (x label, [(group label, [(bar label, value, colour key, hatched)])])
    groups = {}
    for r in kernel_rows:
        if r.backend != "numpy":
            key = f"{r.name}  {r.shape}  {r.dtype.replace('float', 'f')}"
            groups.setdefault(key, []).append((None, r.speedup, r.backend, False))
    if groups:
        panels.append(("kernels: time of NumPy / time (log scale)", list(groups.items())))
    groups = {}
    for r in train_rows:
        if r.contender != "numpy (plain)" and r.vs_numpy:
            group = f"{_bench.NETWORK_SHORT.get(r.network, r.network)} batch {r.batch}"
            groups.setdefault(group, []).append(
                (r.contender, r.vs_numpy, r.backend, r.contender.startswith("kernel step")))
    if groups:
        panels.append(("training: samples/s over plain NumPy's (log scale)",
                       list(groups.items())))
    if not panels:
        return None

    bar_in, gap_in, top_in, axis_in = 0.26, 0.16, 0.95, 0.55
    heights = [sum(len(b) * bar_in + gap_in for _, b in g) for _, g in panels]
    labels = [lab for _, g in panels for lab, bars in g] + [
        f"{lab}: {name}" for _, g in panels for lab, bars in g for name, *_ in bars if name]
    left_in = 0.35 + 0.068 * max(len(lab) for lab in labels)
    width_in = max(10.0, left_in + 6.5)
    height_in = top_in + sum(heights) + axis_in * len(panels) + 0.1
    fig = plt.figure(figsize=(width_in, height_in))
    used = {}
    y_top = height_in - top_in
    for (xlabel, grouped), h in zip(panels, heights):
        ax = fig.add_axes((left_in / width_in, (y_top - h) / height_in,
                           1 - (left_in + 0.3) / width_in, h / height_in))
        y_top -= h + axis_in
        y, ticks, ticklabels, values = 0.0, [], [], []
        for group, bars in grouped:
            start = y
            for name, value, key, hatched in bars:
                colour = COLOURS.get(key, "#56B4E9")
                ax.barh(y, value, height=0.78, color=colour, hatch="///" if hatched else None,
                        edgecolor="white" if hatched else colour, linewidth=0)
                ax.text(value * 1.05, y, f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x",
                        va="center", fontsize=7.5)
                values.append(value)
                if name:   # a labelled bar
                    ticks.append(y)
                    ticklabels.append(f"{group}: {name}")
                legend = {"pytorch": "PyTorch (own process)", "sklearn": "scikit-learn",
                          "gemm": "GEMMs only (ceiling)"}.get(key, key)
                used.setdefault(legend, (colour, None))
                if hatched:
                    used.setdefault("backend kernels called directly", ("#bbbbbb", "///"))
                y += 1
            if not bars[0][0]:
                ticks.append((start + y - 1) / 2)
                ticklabels.append(group)
            y += gap_in / bar_in
        ax.set_xscale("log")
        ax.set_xlim(min(values + [1.0]) / 1.7, max(values + [1.0]) * 2.3)
        ax.set_ylim(y - gap_in / bar_in + 0.5, -0.6)
        ax.axvline(1.0, color="#444444", lw=1, ls="--", zorder=0.5)
        ax.set_yticks(ticks)
        ax.set_yticklabels(ticklabels, fontsize=8.5)
        ax.tick_params(axis="y", length=0)
        ax.set_xlabel(xlabel, fontsize=9)
        lo, hi = ax.get_xlim()
        decades = math.log10(hi / lo)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1,) if decades > 2.5 else (1, 2, 5)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", which="major", color="#dddddd", lw=0.6)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    order = ["numpy", "cython", "numba", "cuda", "backend kernels called directly",
             "scikit-learn", "PyTorch (own process)", "GEMMs only (ceiling)"]
    handles = [Patch(facecolor=c, hatch=h, edgecolor="white" if h else c, label=n)
               for n, (c, h) in sorted(used.items(), key=lambda kv: (
                   order.index(kv[0]) if kv[0] in order else len(order), kv[0]))]
    fig.text(0.5, 1 - 0.22 / height_in, title, ha="center", va="center", fontsize=10.5)
    fig.legend(handles=handles, loc="center", ncol=min(len(handles), 4), fontsize=8.5,
               frameon=False, bbox_to_anchor=(0.5, 1 - 0.6 / height_in))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastnn bench")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
