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
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    return parser


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
    samples/s. Returns the exit code (0, or 2 for a bad option or data)."""
    import numpy as np

    import fastnn as fn

    try:
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
    if not args.quiet:
        print("val_loss / val_accuracy: the test split, evaluated after each epoch")
    verbose = 0 if args.quiet else (1 if sys.stderr.isatty() else 2)
    t0 = time.perf_counter()
    history = model.fit(x, y, epochs=args.epochs, batch_size=args.batch_size,
                        validation_data=(xt, yt), verbose=verbose)
    wall = time.perf_counter() - t0
    test = model.evaluate(xt, yt)
    train_samples = len(x) * args.epochs
    train_seconds = sum(len(x) / s for s in history.history["samples_per_s"])
    print(f"test accuracy {test['accuracy']:.4f} (loss {test['loss']:.4f}) after "
          f"{args.epochs} epochs")
    print(f"wall time {wall:.2f} s; training {train_samples / train_seconds:,.0f} samples/s "
          f"({train_seconds:.2f} s in the training steps)")
    if args.save:
        try:
            model.save(args.save)
        except OSError as exc:
            print(f"error: could not save to {args.save}: {exc}", file=sys.stderr)
            return 1
        print(f"saved to {args.save}")
    return 0
