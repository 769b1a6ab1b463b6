"""``python -m fastnn {info,train,bench}``."""

import argparse
import sys


def _info(args):
    from . import _info
    _info.print_info()
    return 0


def _train(args):
    from . import _cli_train
    return _cli_train.run(args)


def _bench(args):
    from . import _cli_bench
    return _cli_bench.run(args)


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m fastnn",
                                     description="fastnn: fast neural-network training kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="version, backends, threads, BLAS")
    p.set_defaults(func=_info)
    p = sub.add_parser("train", help="train an MLP on MNIST")
    try:
        from . import _cli_train
        _cli_train.add_arguments(p)
    except ImportError:
        pass
    p.set_defaults(func=_train)
    p = sub.add_parser("bench", help="run the benchmarks and write a report")
    try:
        from . import _cli_bench
        _cli_bench.add_arguments(p)
    except ImportError:
        pass
    p.set_defaults(func=_bench)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
