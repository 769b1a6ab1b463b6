"""Data-parallel training over MPI (mpi4py): one model trained by many processes.

Every rank (process) holds the whole model in the same flat buffers. Per step
rank ``r`` of ``N`` runs forward and backward on rows ``[r*B//N, (r+1)*B//N)``
of the global batch of ``B`` rows (uneven splits handled; a rank with no rows
of a batch still takes part in the reductions), MPI sums the flat gradient
buffer, and every rank applies the same optimizer step, so the parameters stay
equal without being sent. The gradient is scaled once per step, before the
sum: each rank multiplies its top delta (the loss gradient of the logits, a
mean over its ``b_r`` rows) by ``b_r / B``, so the backward pass yields
``(1/B) * sum over its rows`` and the sum over the ranks is the mean gradient
of the global batch, as one process with batch ``B`` computes it (equal to
rounding: the sums are taken in another order).

At the start of ``fit``, after every rank checked its arguments, the ranks
compare the shapes and dtypes of their data and the fit arguments (one
``allgather``; a difference is a ``ValueError`` on every rank, before anything
changes), then rank 0 broadcasts the parameters, the optimizer state and the
model's generator: every rank draws the same permutation per epoch. Dropout
masks differ between ranks: the rank is folded into each dropout seed.
Validation and ``evaluate`` split the rows across the ranks and sum the
losses and correct counts. Only rank 0 prints (progress bar, epoch lines) and
``save`` writes on rank 0 only; the history holds the same global figures on
every rank (callbacks decide the same everywhere).

Failure: ``init`` installs a ``sys.excepthook`` that prints the traceback and
calls ``comm.Abort(1)``, so an uncaught exception on any rank ends every rank
with that message and a non-zero exit instead of leaving the others waiting in
a collective. (``python -m mpi4py script.py`` does the same for any script.)

Usage::

    import fastnn as fn
    rank, size = fn.distributed.init()     # MPI.COMM_WORLD by default
    model.fit(x, y, batch_size=128)        # 128 rows per step over all ranks

launched as ``mpiexec -n 4 python script.py``. This module imports mpi4py only
in ``init`` (or when ``fit``/``evaluate`` are given a communicator):
``import fastnn`` stays light.
"""

import math
import sys
import time

import numpy as np

__all__ = ["init", "is_initialized", "rank", "size", "communicator", "REDUCE_MODES"]

#: ``"buffer"``: one blocking ``Allreduce`` of the whole gradient buffer before
#: the optimizer step; ``"layers"``: a non-blocking ``Iallreduce`` of each
#: layer's slice as soon as its backward pass wrote it (top layer first),
#: all waited for before the optimizer step.
REDUCE_MODES = ("buffer", "layers")
#: the default (measured; see README "Data-parallel training")
DEFAULT_REDUCE = "buffer"

_M64 = (1 << 64) - 1
_default = None        # the _Comm of init()
_hooked = set()        # ids of the communicators whose abort hook is installed
#: seconds the abort hook waits between writing the traceback and
#: ``MPI_Abort``: MPICH's mpiexec forwards each rank's output through its
#: proxies and drops what is in flight when a rank aborts: without the pause,
#: 2 of 14 runs of the three abort tests lost all but the traceback's first
#: line; with it, none of 40 (measured while CI ran beside them)
ABORT_GRACE_S = 0.5


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(f"distributed training needs mpi4py and an MPI library: "
                          f"pip install 'fastnn[mpi]' ({exc})") from None
    return MPI


def init(comm=None, threads="auto", reduce=None, abort_on_error=True):
    """Take part in data-parallel training: ``fit`` and ``evaluate`` then run
    over the ranks of ``comm``.

    Parameters
    ----------
    comm : mpi4py.MPI.Intracomm, optional
        Any intra-communicator; ``MPI.COMM_WORLD`` by default.
    threads : "auto", int or None
        ``"auto"``: unless ``fastnn.set_num_threads`` was called, give each
        rank ``max(1, cores // ranks on this node)`` threads, so that the
        ranks of one machine do not oversubscribe its cores. An int sets that
        count; None leaves the thread count alone.
    reduce : {"buffer", "layers"}, optional
        How gradients are summed (``REDUCE_MODES``); by default
        ``DEFAULT_REDUCE``, the faster one measured. Must be the same on every
        rank.
    abort_on_error : bool
        Install a ``sys.excepthook`` that prints an uncaught exception and
        calls ``comm.Abort(1)``, ending every rank (without it, the other
        ranks wait forever in their next collective).

    Returns
    -------
    (int, int)
        ``(rank, size)`` of this process in ``comm``.
    """
    global _default
    MPI = _mpi()
    if comm is None:
        comm = MPI.COMM_WORLD
    c = _Comm(comm, reduce)
    if threads is not None:
        _set_threads(c, threads)
    if abort_on_error:
        _install_abort_hook(c)
    _default = c
    return c.rank, c.size


def is_initialized():
    """Whether ``init`` was called in this process."""
    return _default is not None


def rank():
    """This process' rank in ``init``'s communicator (0 without ``init``)."""
    return 0 if _default is None else _default.rank


def size():
    """The number of ranks in ``init``'s communicator (1 without ``init``)."""
    return 1 if _default is None else _default.size


def communicator():
    """``init``'s mpi4py communicator, or None."""
    return None if _default is None else _default.comm


def _set_threads(c, threads):
    from . import _threads

    if threads == "auto":
        if _threads._num_threads is not None:   # the user chose
            return
        local = c.comm.Split_type(c.MPI.COMM_TYPE_SHARED)
        try:
            n = max(1, _threads.cpu_count() // local.Get_size())
        finally:
            local.Free()
    elif isinstance(threads, bool) or not isinstance(threads, int):
        raise TypeError(f"threads must be 'auto', an int or None, got {threads!r}")
    else:
        n = threads
    _threads.set_num_threads(n)


def _install_abort_hook(c):
    if id(c.comm) in _hooked:
        return
    previous = sys.excepthook
    comm, r, n = c.comm, c.rank, c.size

    def abort_all(kind, value, tb):
        try:
            sys.stdout.flush()
            previous(kind, value, tb)
            sys.stderr.write(f"fastnn.distributed: uncaught {kind.__name__} on rank {r} of "
                             f"{n}; aborting every rank\n")
            sys.stderr.flush()
            time.sleep(ABORT_GRACE_S)
        finally:
            comm.Abort(1)

    sys.excepthook = abort_all
    _hooked.add(id(comm))


def _resolve(comm):
    """The ``_Comm`` a ``fit``/``evaluate`` call runs over: ``comm`` (any
    mpi4py communicator) or ``init``'s; None for a single process (no
    ``init``, or a communicator of one rank)."""
    if comm is None:
        c = _default
    elif _default is not None and comm is _default.comm:
        c = _default
    else:
        MPI = _mpi()
        if not isinstance(comm, MPI.Intracomm):
            raise TypeError(f"comm must be an mpi4py intra-communicator (MPI.COMM_WORLD or one "
                            f"split from it), got {type(comm).__name__}")
        c = _Comm(comm, None if _default is None else _default.reduce)
        _install_abort_hook(c)
    if c is None or c.size == 1:
        return None
    return c


def skip_save(model):
    """Whether ``model.save`` should not write here: a rank other than 0 of
    the last distributed ``fit`` of ``model``, or of ``init``."""
    r = getattr(model, "_save_rank", None)
    if r is None:
        r = rank()
    return r != 0


def _mix64(z):
    """SplitMix64's finalizer on a Python int (wrapping in 64 bits)."""
    z &= _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def rank_seed(seed, r):
    """The dropout seed of rank ``r`` from the model's draw ``seed``:
    ``splitmix64(seed + r)``. Not ``seed + r * golden``: the dropout hash
    already steps by the golden ratio per element, so that would shift one
    mask against the other instead of drawing a new one."""
    return _mix64(seed + r)


def split(n, r, size):
    """Rows ``[r*n//size, (r+1)*n//size)`` of ``n``: rank ``r``'s part."""
    return r * n // size, (r + 1) * n // size


class _Comm:
    """An mpi4py communicator and what fastnn does over it."""

    def __init__(self, comm, reduce):
        MPI = _mpi()
        if not isinstance(comm, MPI.Intracomm):
            raise TypeError(f"comm must be an mpi4py intra-communicator, got "
                            f"{type(comm).__name__}")
        reduce = DEFAULT_REDUCE if reduce is None else reduce
        if reduce not in REDUCE_MODES:
            raise ValueError(f"reduce must be one of {REDUCE_MODES}, got {reduce!r}")
        self.MPI = MPI
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.reduce = reduce

    # ---------------------------------------------------------------- start
    def check_same(self, items):
        """``items`` (name -> a value that must agree) gathered from every rank;
        the first that differs from rank 0's is a ValueError, the same on every
        rank (so all of them raise, none waits)."""
        every = self.comm.allgather(items)
        for name, value in every[0].items():
            for r, theirs in enumerate(every[1:], 1):
                if theirs.get(name) != value:
                    raise ValueError(f"{name} differs between ranks: {value} on rank 0, "
                                     f"{theirs.get(name)} on rank {r}; every rank must call "
                                     f"fit/evaluate with data of the same size and shape and "
                                     f"the same arguments")

    def broadcast_model(self, model):
        """Rank 0's parameters, optimizer state and generator state on every rank."""
        comm = self.comm
        comm.Bcast(model._params, root=0)
        opt = model.optimizer
        for name in opt.state_names():
            comm.Bcast(opt._states[0][name], root=0)
        opt._t = comm.bcast(opt._t, root=0)
        state = comm.bcast(model._rng.bit_generator.state if self.rank == 0 else None, root=0)
        bitgen = model._rng.bit_generator
        if type(bitgen).__name__ == state["bit_generator"]:
            bitgen.state = state
        else:   # another kind of generator: replace it (cached steps hold the old one)
            new = getattr(np.random, state["bit_generator"])()
            new.state = state
            model._rng = np.random.Generator(new)
            model._plans = {}

    def any(self, flag):
        """Whether ``flag`` is true on some rank (every rank gets the answer)."""
        buf = np.array([1.0 if flag else 0.0])
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.MAX)
        return bool(buf[0])

    def sum(self, values):
        """Element-wise sums over the ranks of a few numbers (float64)."""
        buf = np.array(values, dtype=np.float64)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return buf

    def plan_rows(self, batch):
        """Rows of the training plan: the most any rank gets of a batch of
        ``batch`` rows (or fewer) is ``ceil(batch / size)``."""
        return -(-batch // self.size)

    # ---------------------------------------------------------------- training
    def trainer(self, model, be, source, plan, batch, n):
        return _Trainer(self, model, be, source, plan, batch, n)

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, model, be, x, y, batch_size):
        """``{"loss", "accuracy"}`` over all ``n`` rows: this rank's part, then
        the sums over the ranks."""
        n = x.shape[0]
        lo, hi = split(n, self.rank, self.size)
        total, correct = model._eval_sums(be, x[lo:hi], y[lo:hi], batch_size) if hi > lo \
            else (0.0, 0)
        total, correct = self.sum([total, correct])
        result = {"loss": float(total) / n}
        if model.loss.classification:
            result["accuracy"] = float(correct) / n
        return result


class _Reducer:
    """The gradient sum of one fit: the whole buffer at once, or layer by layer
    (non-blocking, top layer first, as the backward pass writes them)."""

    def __init__(self, c, model):
        MPI = c.MPI
        self.comm = comm = c.comm
        grads = model._grads
        mpi_type = MPI.DOUBLE if grads.dtype == np.float64 else MPI.FLOAT
        in_place, op = MPI.IN_PLACE, MPI.SUM
        self.order = []   # layer indices with parameters, top first
        self.start = {}   # layer index -> function starting its reduction
        if c.reduce == "buffer":
            whole = [grads, mpi_type]
            allreduce = comm.Allreduce

            def finish():
                allreduce(in_place, whole, op)
            self.finish = finish
            return
        offset, spans = 0, []
        for i, layer in enumerate(model.layers):
            size = sum(math.prod(s) for s in layer.param_shapes())
            if size:
                spans.append((i, offset, offset + size))
            offset += size
        reqs = []
        iallreduce, waitall = comm.Iallreduce, MPI.Request.Waitall
        testall = MPI.Request.Testall
        for i, lo, hi in reversed(spans):
            buf = [grads[lo:hi], mpi_type]

            def begin(buf=buf):
                if reqs:
                    testall(reqs)   # MPICH progresses earlier requests only inside MPI calls
                reqs.append(iallreduce(in_place, buf, op))
            self.order.append(i)
            self.start[i] = begin

        def finish_layers():
            waitall(reqs)
            reqs.clear()
        self.finish = finish_layers

    def sync(self, scale):
        return _Sync(scale, self.start, self.finish)


class _Sync:
    """What ``Sequential._make_step`` needs for a distributed step: the scale
    of the top delta, a function per layer after its backward, and the wait
    before the optimizer step."""

    __slots__ = ("scale", "layer_done", "finish")

    def __init__(self, scale, layer_done, finish):
        self.scale = scale
        self.layer_done = layer_done
        self.finish = finish


class _Trainer:
    """The batches of one distributed ``fit`` on this rank."""

    def __init__(self, c, model, be, source, plan, batch, n):
        self.c, self.model, self.be, self.source, self.plan = c, model, be, source, plan
        self.dtype = model.dtype
        self.reducer = _Reducer(c, model)
        opt = model.optimizer
        self.opt_step = opt._make_flat_step(be, model._params, model._grads)
        raw = model._rng.bit_generator.random_raw
        r = c.rank

        def seeds():
            return rank_seed(raw(), r)
        self.seeds = seeds
        self.draws = sum(1 for layer in model.layers if layer.kind == "dropout")
        self.raw = raw
        # (lo, hi, rows of the global batch) per batch: this rank's part
        self.spans = []
        for start in range(0, n, batch):
            rows = min(batch, n - start)
            lo, hi = split(rows, c.rank, c.size)
            self.spans.append((start + lo, start + hi, rows))
        self.steps = {}   # (rows here, rows in all) -> (plan, step)
        self.batch = batch

    def stage(self, order):
        """Start reading this rank's rows of the epoch ahead (a memmap's)."""
        self.source.epoch(order, self.batch, [(lo, hi) for lo, hi, _ in self.spans if hi > lo])

    def _empty_step(self):
        """This rank has no rows of the batch: a zero gradient joins the sums,
        the generator advances as a step's dropout layers would advance it."""
        model = self.model
        model._grads.fill(0)
        for i in self.reducer.order:
            self.reducer.start[i]()
        self.reducer.finish()
        for _ in range(self.draws):
            self.raw()
        self.opt_step()
        return 0.0

    def _step(self, order, lo, hi, rows):
        nb = hi - lo
        plan = self.plan
        if nb == 0:
            entry = (None, self._empty_step)
        else:
            p = plan if nb == plan.batch else plan.view(self.model, self.be, nb)
            if not p.checked:
                self.model._check_plan(p, *self.source.batch(p, order, lo, hi))
            scale = self.dtype.type(nb / rows)
            step = self.model._make_step(self.be, p, self.opt_step, self.seeds,
                                         self.reducer.sync(scale))
            entry = (p, step)
        self.steps[(nb, rows)] = entry
        return entry

    def epoch(self, order, bar, batch_cbs, classification):
        """One epoch: returns ``(loss sum, correct, step seconds, rows)`` with
        the sums over every rank (the step time is this rank's)."""
        from time import perf_counter

        model, c, source = self.model, self.c, self.source
        count_correct = self.be.count_correct
        steps = self.steps
        total_loss, correct, step_time, seen, seen_all = 0.0, 0, 0.0, 0, 0
        last_post = perf_counter()
        for i, (lo, hi, rows) in enumerate(self.spans):
            nb = hi - lo
            entry = steps.get((nb, rows)) or self._step(order, lo, hi, rows)
            p, step = entry
            if p is None:
                t = perf_counter()
                loss = step()
                step_time += perf_counter() - t
            else:
                xb, yb = source.batch(p, order, lo, hi)
                t = perf_counter()
                loss = step(xb, yb)
                step_time += perf_counter() - t
                total_loss += loss * nb
                seen += nb
                if classification:
                    correct += count_correct(p.records[-1].y, yb)
            seen_all += rows
            if bar is not None:   # rank 0's running figures; the epoch's are global
                bar.update(rows)
                now = perf_counter()
                if now - last_post > 0.5 and seen:
                    last_post = now
                    post = {"loss": f"{total_loss / seen:.4f}"}
                    if classification:
                        post["accuracy"] = f"{correct / seen:.4f}"
                    bar.set_postfix(post, refresh=False)
            if batch_cbs:
                batch_loss = float(c.sum([loss * nb])[0]) / rows
                logs = {"batch": i, "size": rows, "loss": batch_loss}
                for cb in batch_cbs:
                    cb.on_batch_end(i, logs)
                model.stop_training = c.any(model.stop_training)
                if model.stop_training:
                    break
        total_loss, correct = c.sum([total_loss, correct])
        return float(total_loss), int(correct), step_time, seen_all
