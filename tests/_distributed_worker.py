"""What tests/test_distributed.py runs under ``mpiexec -n N`` (and, for the
single-process references, imports): ``python _distributed_worker.py CASE OUT
[REDUCE]`` (REDUCE: a ``fastnn.distributed.REDUCE_MODES`` entry).

Cases: ``equivalence`` (every model x optimizer x dtype, 20 steps, parameters,
history and evaluate to OUT/equivalence.npz from rank 0), ``identical``
(100 steps with dropout; every rank's parameter checksum), ``raise`` (rank 1
fails at its 5th step), ``nan`` (rank 1's data holds a NaN), ``mismatch``
(rank 1 has fewer rows), ``save_fail`` (rank 0's save fails as on a full disk),
``memmap`` (a memmap against the same rows in memory; batches served staged).
"""

import hashlib
import json
import os
import sys

import numpy as np

import fastnn as fn

#: 19 full batches of 32 and one of 2: on 3 ranks rank 0 has no row of the last
N_ROWS = 19 * 32 + 2
BATCH = 32
SHUFFLE_SEED = 7
OPTIMIZERS = {
    "sgd_momentum": lambda: fn.SGD(0.05, momentum=0.9),
    "adam": lambda: fn.Adam(1e-2),
    "adamw": lambda: fn.AdamW(1e-2, weight_decay=1e-2),
    "rmsprop": lambda: fn.RMSprop(1e-3, momentum=0.5),
}
MODELS = ("mlp", "convnet")
DTYPES = ("float32", "float64")


def data(model, n=N_ROWS, seed=0):
    rng = np.random.default_rng(seed)
    if model == "mlp":
        x = rng.standard_normal((n, 20))
    else:
        x = rng.standard_normal((n, 10, 10, 1))
    y = rng.integers(0, 3, n)
    return x, y


def build(model, opt, dtype, dropout=0.0):
    if model == "mlp":
        layers = [fn.Dense(16, "relu"), fn.Dense(12, "tanh")]
        layers += [fn.Dropout(dropout)] if dropout else []
        layers += [fn.Dense(3)]
        net = fn.Sequential(layers, input_dim=20, dtype=dtype, seed=3)
        net.compile("softmax_cross_entropy", OPTIMIZERS[opt]())
    else:
        layers = [fn.Conv2D(4, 3, "relu"), fn.MaxPool2D(2), fn.Conv2D(6, 3, "relu"),
                  fn.Flatten()]
        layers += [fn.Dropout(dropout)] if dropout else []
        layers += [fn.Dense(3, "softmax")]
        net = fn.Sequential(layers, input_shape=(10, 10, 1), dtype=dtype, seed=3)
        net.compile("sparse_categorical_crossentropy", OPTIMIZERS[opt]())
    return net


def cases():
    return [(m, o, d) for m in MODELS for o in OPTIMIZERS for d in DTYPES]


def train(model, opt, dtype):
    """20 steps of global batch 32; returns (params, history dict, evaluate dict)."""
    net = build(model, opt, dtype)
    x, y = data(model)
    xv, yv = data(model, n=101, seed=1)
    h = net.fit(x, y, epochs=1, batch_size=BATCH, seed=SHUFFLE_SEED, verbose=0,
                validation_data=(xv, yv))
    ev = net.evaluate(xv, yv, batch_size=16)
    hist = {k: h.history[k][0] for k in ("loss", "accuracy", "val_loss", "val_accuracy")}
    return np.array(net.params), hist, ev, net


class RecordAndStop(fn.callbacks.Callback):
    """Records every batch's loss; sets ``stop_training`` at ``batch`` of
    ``epoch`` on the rank ``stop_rank`` only (the other ranks must follow)."""

    def __init__(self, epoch, batch, stop_rank):
        super().__init__()
        self.at, self.stop_rank, self.losses, self.epoch = (epoch, batch), stop_rank, [], None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_batch_end(self, batch, logs=None):
        self.losses.append(logs["loss"])
        if (self.epoch, batch) == self.at and fn.distributed.rank() == self.stop_rank:
            self.model.stop_training = True


def train_callbacks():
    """Two fits: one stopped by a batch callback on one rank at epoch 1, batch
    5; one by EarlyStopping (restoring the best weights). Returns (params,
    batch losses, epochs run) of the first and (params, epochs run) of the
    second."""
    x, y = data("mlp")
    xv, yv = data("mlp", n=101, seed=1)
    net = build("mlp", "adam", "float64")
    rec = RecordAndStop(epoch=1, batch=5, stop_rank=1 if fn.distributed.size() > 1 else 0)
    h = net.fit(x, y, epochs=4, batch_size=BATCH, seed=SHUFFLE_SEED, verbose=0,
                validation_data=(xv, yv), callbacks=[rec, fn.callbacks.TerminateOnNaN()])
    first = (np.array(net.params), rec.losses, len(h.epoch))
    net = build("mlp", "adam", "float64")
    early = fn.callbacks.EarlyStopping("val_loss", patience=0, restore_best_weights=True)
    h = net.fit(x, y, epochs=8, batch_size=BATCH, seed=SHUFFLE_SEED, verbose=0,
                validation_data=(xv, yv), callbacks=[early])
    return first, (np.array(net.params), len(h.epoch))


def checksum(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def main(case, out, reduce=None):
    rank, size = fn.distributed.init(reduce=reduce)
    comm = fn.distributed.communicator()
    if case == "equivalence":
        arrays, meta = {}, {}
        for m, o, d in cases():
            params, hist, ev, net = train(m, o, d)
            sums = comm.allgather(checksum(params))
            key = f"{m}-{o}-{d}"
            arrays[key] = params
            meta[key] = {"history": hist, "evaluate": ev, "same_on_all_ranks": len(set(sums)) == 1,
                         "iterations": net.optimizer.iterations}
        net.save(os.path.join(out, f"model_{rank}.npz"))   # rank 0 only
        if rank == 0:
            np.savez(os.path.join(out, "equivalence.npz"), **arrays)
            with open(os.path.join(out, "equivalence.json"), "w") as f:
                json.dump({"ranks": size, "cases": meta}, f)
    elif case == "callbacks":
        (params, losses, epochs), (params2, epochs2) = train_callbacks()
        sums = comm.allgather((checksum(params), checksum(params2)))
        if rank == 0:
            np.savez(os.path.join(out, "callbacks.npz"), params=params, losses=losses,
                     epochs=epochs, params2=params2, epochs2=epochs2,
                     same=len(set(sums)) == 1)
    elif case == "identical":
        net = build("mlp", "adam", "float32", dropout=0.3)
        x, y = data("mlp", n=100 * BATCH)
        net.fit(x, y, epochs=1, batch_size=BATCH, verbose=0)
        sums = comm.gather((checksum(net.params), net.optimizer.iterations,
                            checksum(net.optimizer._states[0]["m"])), root=0)
        if rank == 0:
            with open(os.path.join(out, "identical.json"), "w") as f:
                json.dump(sums, f)
    elif case == "memmap":
        from fastnn import _batches

        served = [0]
        take = _batches.Stager.take

        def counting_take(self, lo, hi):
            pieces = take(self, lo, hi)
            served[0] += pieces is not None
            return pieces
        _batches.Stager.take = counting_take
        x, y = data("mlp", n=40 * BATCH + 5)
        x = x.astype(np.float32)
        if rank == 0:
            np.save(os.path.join(out, "x.npy"), x)
        comm.Barrier()
        xm = np.load(os.path.join(out, "x.npy"), mmap_mode="r")
        result = {}
        for shuffle in ("batch", False):
            nets = []
            for data_x in (xm, x):
                net = build("mlp", "adam", "float32")
                net.fit(data_x, y, epochs=2, batch_size=BATCH, shuffle=shuffle,
                        seed=SHUFFLE_SEED, verbose=0)
                nets.append(net)
            result[str(shuffle)] = bool(np.array_equal(nets[0].params, nets[1].params))
        sums = comm.gather((result, served[0]), root=0)
        if rank == 0:
            with open(os.path.join(out, "memmap.json"), "w") as f:
                json.dump(sums, f)
    elif case == "raise":
        class FailOnRank1(fn.schedules.LearningRateSchedule):
            def __call__(self, step):
                if rank == 1 and step >= 5:
                    raise RuntimeError("injected failure on rank 1 at step 5")
                return 1e-3

            def get_config(self):
                return {}

        net = build("mlp", "adam", "float32")
        net.optimizer.lr = FailOnRank1()
        x, y = data("mlp", n=100 * BATCH)
        net.fit(x, y, epochs=50, batch_size=BATCH, verbose=0)
        print(f"rank {rank} finished training", flush=True)   # must not happen
    elif case == "nan":
        net = build("mlp", "adam", "float32")
        x, y = data("mlp")
        if rank == 1:
            x[100, 3] = np.nan
        net.fit(x, y, epochs=50, batch_size=BATCH, verbose=0)
        print(f"rank {rank} finished training", flush=True)
    elif case == "mismatch":
        net = build("mlp", "adam", "float32")
        x, y = data("mlp")
        if rank == 1:
            x, y = x[:-10], y[:-10]
        before = np.array(net.params)
        try:
            net.fit(x, y, epochs=1, batch_size=BATCH, verbose=0)
        except ValueError as exc:
            unchanged = bool(np.array_equal(before, net.params)) and net.optimizer.iterations == 0
            print(f"rank {rank}: ValueError: {exc}; unchanged={unchanged}", flush=True)
        else:
            print(f"rank {rank}: trained", flush=True)
    elif case == "save_fail":
        import errno

        import fastnn.model

        def full_disk(fileobj, arrays):
            raise OSError(errno.ENOSPC, "No space left on device (injected)")

        if rank == 0:
            fastnn.model._write_npz = full_disk
        net = build("mlp", "adam", "float32")
        x, y = data("mlp")
        net.fit(x, y, epochs=1, batch_size=BATCH, verbose=0)
        net.save(os.path.join(out, "model.npz"))
        comm.Barrier()   # the other ranks wait here for rank 0, as a real script would later
        print(f"rank {rank} passed the save", flush=True)
    else:
        raise ValueError(f"unknown case {case!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
