"""``python -m fastnn train``: train a network on MNIST and report accuracy and speed.

Defaults: the 784-256-128-10 ReLU MLP, Adam (lr 1e-3), batch 32, 10 epochs,
float32, on the bundled 5,000-image MNIST subset (4,000 train / 1,000 test;
no network needed). ``--model cnn`` trains the network of seed text 003
(``Conv2D(32, 3, relu) -> Flatten -> Dense(10, softmax)``), ``--model
convnet`` Keras' "simple MNIST convnet" (``Conv2D(32, 3, relu) -> MaxPool2D(2)
-> Conv2D(64, 3, relu) -> MaxPool2D(2) -> Flatten -> Dropout(0.5) ->
Dense(10, softmax)``), both with Keras' ``sparse_categorical_crossentropy``.
``--binary`` trains digit 0 against the rest with one sigmoid output and
binary cross-entropy.

Around the training (issue 19): ``--early-stopping PATIENCE`` and
``--checkpoint PATH`` watch ``val_loss`` (the test split, as the per-epoch
figures), ``--lr-schedule`` chooses a learning-rate schedule, ``--plot PATH``
writes a PNG of the curves and the test confusion matrix (the ``plot`` extra)
and ``--export-onnx PATH`` the trained network as ONNX (the ``onnx`` extra).
Every output path (``--save`` too) is checked, and every extra they need
imported, before training starts, so a long run is not lost at its end.
"""

import argparse
import os
import sys
import time

from .kernels.reference import ACTIVATIONS

DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3, "rmsprop": 1e-3}


def _hidden(text):
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()] if text.strip() else []
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer widths such as "
                                         f"256,128, got {text!r}") from None
    if any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"layer widths must be >= 1, got {text!r}")
    return sizes


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def _non_negative_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _rate(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"a dropout rate must be in [0, 1), got {text}")
    return v


MODELS = ("mlp", "cnn", "convnet")


def build_layers(model, hidden, activation, filters, dropout, head):
    """The layers of ``--model`` (``head`` is the last Dense). Returns
    ``(layers, description, image)``: ``image`` says the input is (28, 28, 1)."""
    import fastnn as fn

    extra = [fn.Dropout(dropout)] if dropout else []
    if model == "mlp":
        layers = [fn.Dense(h, activation) for h in hidden] + extra + [head]
        widths = "-".join(str(d) for d in [784, *hidden, head.units])
        return layers, f"{widths} {activation} MLP", False
    if model == "cnn":
        filters = filters or [32]
        if len(filters) != 1:
            raise ValueError(f"--filters for cnn is one width, got {filters}")
        layers = [fn.Conv2D(filters[0], 3, "relu"), fn.Flatten()] + extra + [head]
        return layers, f"Conv2D({filters[0]}, 3, relu)-Flatten-Dense({head.units}) CNN", True
    filters = filters or [32, 64]
    if len(filters) != 2:
        raise ValueError(f"--filters for convnet is two widths such as 32,64, got {filters}")
    rate = 0.5 if dropout is None else dropout
    layers = [fn.Conv2D(filters[0], 3, "relu"), fn.MaxPool2D(2),
              fn.Conv2D(filters[1], 3, "relu"), fn.MaxPool2D(2), fn.Flatten()]
    layers += ([fn.Dropout(rate)] if rate else []) + [head]
    return layers, (f"convnet Conv2D({filters[0]})-MaxPool-Conv2D({filters[1]})-MaxPool-"
                    f"Flatten-Dropout({rate})-Dense({head.units})"), True


def add_arguments(parser):
    """Add the ``train`` options to an argparse (sub)parser."""
    parser.description = __doc__.split("\n\n")[0].split(": ", 1)[-1]
    parser.add_argument("--data", default="small", metavar="{small,mnist,PATH}",
                        help="small: the bundled subset (default); mnist: full MNIST from "
                             "the cache (~/.cache/fastnn), downloaded on first use; PATH: a "
                             "folder with the four MNIST IDX files")
    parser.add_argument("--model", choices=MODELS, default="mlp",
                        help="mlp (default): Dense layers of --hidden; cnn: seed 003's "
                             "Conv2D(32,3,relu)-Flatten-Dense(10); convnet: Keras' MNIST convnet "
                             "(two Conv2D+MaxPool2D, Dropout, Dense(10))")
    parser.add_argument("--filters", type=_hidden, default=None, metavar="32,64",
                        help="filters of the Conv2D layers (cnn: one width, default 32; "
                             "convnet: two, default 32,64)")
    parser.add_argument("--dropout", type=_rate, default=None,
                        help="dropout rate before the last layer (convnet: default 0.5; "
                             "mlp, cnn: default none)")
    parser.add_argument("--epochs", type=_positive_int, default=10)
    parser.add_argument("--batch-size", type=_positive_int, default=32)
    parser.add_argument("--hidden", type=_hidden, default=[256, 128], metavar="256,128",
                        help="hidden layer widths (empty string: no hidden layer)")
    parser.add_argument("--activation", choices=ACTIVATIONS, default="relu",
                        help="activation of the hidden layers")
    parser.add_argument("--optimizer", choices=("sgd", "adam", "adamw", "rmsprop"),
                        default="adam")
    parser.add_argument("--lr", type=_positive_float, default=None,
                        help="learning rate (default: sgd 0.05, others 1e-3)")
    parser.add_argument("--momentum", type=float, default=None,
                        help="momentum for sgd (default 0.9) and rmsprop (default 0)")
    parser.add_argument("--backend", default=None,
                        help="numpy, cython, numba or cuda (default: fastnn's choice)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--binary", action="store_true",
                        help="digit 0 against the rest: Dense(1) and sigmoid binary "
                             "cross-entropy")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="threads for OpenMP, numba and BLAS together (default: all cores)")
    parser.add_argument("--save", metavar="PATH", default=None,
                        help="save the trained model (.npz) here")
    parser.add_argument("--early-stopping", type=_non_negative_int, default=None,
                        metavar="PATIENCE",
                        help="stop when val_loss has not improved for PATIENCE epochs, and "
                             "restore the weights of the best epoch")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                        help="constant (default); step: the rate halves every third of the "
                             "epochs; cosine: linear warm-up from 0 over the first 10%% of "
                             "the steps (at most one epoch), then cosine decay to 0")
    parser.add_argument("--checkpoint", metavar="PATH", default=None,
                        help="save the model (.npz) here after every epoch that improves "
                             "val_loss (the best one stays)")
    parser.add_argument("--plot", metavar="PATH", default=None,
                        help="write a PNG of loss and accuracy per epoch and the test "
                             "confusion matrix (needs: pip install \"fastnn[plot]\")")
    parser.add_argument("--export-onnx", metavar="PATH", default=None,
                        help="write the trained network as an ONNX model (needs: pip install "
                             "\"fastnn[onnx]\")")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    parser.add_argument("--distributed", action="store_true",
                        help="data-parallel over the ranks of `mpiexec -n N python -m fastnn "
                             "train --distributed` (needs: pip install \"fastnn[mpi]\"); "
                             "--batch-size is the global batch; rank 0 prints and saves")
    return parser


LR_SCHEDULES = ("constant", "step", "cosine")


def lr_schedule(kind, lr, steps_per_epoch, epochs):
    """The ``lr`` the optimizer gets for ``--lr-schedule kind``: ``lr`` itself
    (constant); ``StepDecay(lr, steps_per_epoch * max(1, epochs // 3), 0.5)``
    (step); or ``CosineDecay`` with a linear warm-up from 0 over ``w =
    min(steps_per_epoch, total // 10)`` steps to ``lr``, then down to 0 over
    the ``total - w`` steps left (``total = steps_per_epoch * epochs``)."""
    from . import schedules

    if kind == "constant":
        return lr
    if kind == "step":
        return schedules.StepDecay(lr, steps_per_epoch * max(1, epochs // 3), 0.5)
    total = steps_per_epoch * epochs
    warmup = min(steps_per_epoch, total // 10)
    if warmup == 0:
        return schedules.CosineDecay(lr, total)
    return schedules.CosineDecay(0.0, total - warmup, warmup_target=lr, warmup_steps=warmup)


#: (option, extra's module, extra) for the outputs that need an optional package
_EXTRAS = (("plot", "matplotlib", "plot"), ("export_onnx", "onnx", "onnx"))


def _check_outputs(args):
    """Before training: each output path's folder exists and is writable, and
    the optional packages an output needs are installed. Raises ValueError."""
    import importlib.util

    from . import _files

    for option in ("save", "checkpoint", "plot", "export_onnx"):
        path = getattr(args, option, None)
        if path is not None:
            _files.check_writable(path, "--" + option.replace("_", "-"))
    for option, module, extra in _EXTRAS:
        if getattr(args, option, None) is not None and importlib.util.find_spec(module) is None:
            raise ValueError(f"--{option.replace('_', '-')} needs the {module} package: "
                             f"pip install \"fastnn[{extra}]\"")


def _confusion(model, xt, yt, binary):
    from .plot import confusion_matrix

    p = model.predict(xt)
    if binary:
        return confusion_matrix(yt.astype("int64"), (p[:, 0] > 0.5).astype("int64"), 2)
    return confusion_matrix(yt, p.argmax(axis=1), p.shape[1])


def _load_data(spec, shape="flat"):
    from . import datasets

    if spec == "small":
        return (datasets.load_mnist_small(shape=shape),
                "bundled MNIST subset (4,000 train / 1,000 test)")
    if spec == "mnist":
        return datasets.load_mnist(shape=shape), "MNIST (60,000 train / 10,000 test)"
    if os.path.isdir(spec):
        return datasets.load_mnist(spec, download=False, shape=shape), f"MNIST from {spec}"
    raise ValueError(f"--data must be small, mnist or a folder with the MNIST files; "
                     f"{spec!r} is none of these")


def run(args):
    """Train as ``args`` say; print per-epoch figures, test accuracy, time and
    samples/s. Returns the exit code (0, or 2 for a bad option or data).

    ``--distributed``: ``fastnn.distributed.init()`` first; only rank 0
    prints, and a non-zero exit on any rank aborts every rank (the others may
    be waiting for it in a collective)."""
    if not getattr(args, "distributed", False):
        return _run(args)
    import contextlib

    import fastnn as fn

    try:
        rank, _ = fn.distributed.init()
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        if rank != 0:
            stack.enter_context(contextlib.redirect_stdout(
                stack.enter_context(open(os.devnull, "w"))))
        code = _run(args)
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        fn.distributed.communicator().Abort(code)
    return code


def _run(args):
    import numpy as np

    import fastnn as fn

    try:
        _check_outputs(args)
        if args.backend is not None:
            fn.set_backend(args.backend)
        if args.threads is not None:
            fn.set_num_threads(args.threads)
        ((x, y), (xt, yt)), source = _load_data(
            args.data, "flat" if args.model == "mlp" else "image")
    except (ValueError, TypeError, fn.BackendUnavailable, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    keras = args.model != "mlp"   # the convnets are written as Keras writes them
    if args.binary:
        y, yt = (y == 0).astype(np.float32), (yt == 0).astype(np.float32)
        loss, head = (("binary_crossentropy", fn.Dense(1, "sigmoid")) if keras else
                      ("sigmoid_binary_cross_entropy", fn.Dense(1)))
        task = "digit 0 vs the rest (sigmoid BCE)"
    else:
        loss, head = (("sparse_categorical_crossentropy", fn.Dense(10, "softmax")) if keras else
                      ("softmax_cross_entropy", fn.Dense(10)))
        task = "10 digits (softmax cross-entropy)"
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    steps = -(-len(x) // min(args.batch_size, len(x)))
    lr = lr_schedule(getattr(args, "lr_schedule", "constant"), lr, steps, args.epochs)
    try:
        if args.optimizer == "sgd":
            opt = fn.SGD(lr, momentum=0.9 if args.momentum is None else args.momentum)
        elif args.optimizer == "rmsprop":
            opt = fn.RMSprop(lr, momentum=0.0 if args.momentum is None else args.momentum)
        else:
            if args.momentum is not None:
                raise ValueError(f"--momentum does not apply to {args.optimizer}")
            opt = (fn.Adam if args.optimizer == "adam" else fn.AdamW)(lr)
        layers, what, _ = build_layers(args.model, args.hidden, args.activation, args.filters,
                                       args.dropout, head)
        model = fn.Sequential(layers, input_shape=x.shape[1:], dtype=args.dtype, seed=args.seed)
        model.compile(loss, opt)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    backend = fn.get_backend()
    print(f"fastnn {fn.__version__}: {what}, {task}")
    print(f"data: {source}; {opt!r}; batch "
          f"{args.batch_size}; {args.dtype}; backend {backend}; "
          f"{fn.get_num_threads()} threads")
    ranks = fn.distributed.size()
    if ranks > 1:
        b = min(args.batch_size, len(x))
        print(f"distributed: {ranks} ranks of {fn.get_num_threads()} threads; each computes "
              f"{b // ranks}{'' if b % ranks == 0 else f'-{-(-b // ranks)}'} rows of every "
              f"global batch of {b}")
    if not args.quiet:
        print("val_loss / val_accuracy: the test split, evaluated after each epoch")
    verbose = 0 if args.quiet else (1 if sys.stderr.isatty() else 2)
    callbacks = []
    stopper = checkpoint = None
    if getattr(args, "early_stopping", None) is not None:
        stopper = fn.callbacks.EarlyStopping("val_loss", patience=args.early_stopping,
                                             restore_best_weights=True)
        callbacks.append(stopper)
    if getattr(args, "checkpoint", None) is not None:
        checkpoint = fn.callbacks.ModelCheckpoint(args.checkpoint, "val_loss",
                                                  save_best_only=True)
        callbacks.append(checkpoint)
    t0 = time.perf_counter()
    history = model.fit(x, y, epochs=args.epochs, batch_size=args.batch_size,
                        validation_data=(xt, yt), verbose=verbose, callbacks=callbacks)
    wall = time.perf_counter() - t0
    test = model.evaluate(xt, yt)
    epochs_run = len(history.epoch)
    train_samples = len(x) * epochs_run
    train_seconds = sum(len(x) / s for s in history.history["samples_per_s"])
    if stopper is not None and stopper.stopped_epoch:
        print(f"early stopping after epoch {stopper.stopped_epoch + 1}: val_loss best "
              f"{stopper.best:.4f} at epoch {stopper.best_epoch + 1} (its weights restored)")
    print(f"test accuracy {test['accuracy']:.4f} (loss {test['loss']:.4f}) after "
          f"{epochs_run} epochs")
    print(f"wall time {wall:.2f} s; training {train_samples / train_seconds:,.0f} samples/s "
          f"({train_seconds:.2f} s in the training steps)")
    if ranks > 1:
        print(f"{ranks} ranks: {train_samples / train_seconds / ranks:,.0f} samples/s per rank")
    if args.save:
        try:
            model.save(args.save)
        except OSError as exc:
            print(f"error: could not save to {args.save}: {exc}", file=sys.stderr)
            return 1
        print(f"saved to {args.save}")
    if checkpoint is not None and checkpoint.last_saved is not None:
        print(f"checkpoint: the model of the best epoch (val_loss {checkpoint.best:.4f}) is "
              f"in {checkpoint.last_saved}")
    outputs = []
    if getattr(args, "export_onnx", None):
        outputs.append(("ONNX model", args.export_onnx, lambda: model.export_onnx(
            args.export_onnx)))
    if getattr(args, "plot", None):
        from .plot import plot_history

        outputs.append(("plot", args.plot, lambda: plot_history(
            history, args.plot, confusion=_confusion(model, xt, yt, args.binary),
            title=f"{what}: {task}")))
    if fn.distributed.rank() != 0:   # distributed: the models are the same, rank 0 writes
        outputs = []
    for name, path, write in outputs:
        try:
            write()
        except OSError as exc:
            print(f"error: could not write the {name} to {path}: {exc}", file=sys.stderr)
            return 1
        print(f"{name} written to {path}")
    return 0
