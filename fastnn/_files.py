"""Writing output files: a folder checked before long work, and atomic writes.

``check_writable`` is called before training (``--save``, ``--checkpoint``,
``--plot``, ``--export-onnx``, ``ModelCheckpoint``) or before building an
export, so a long run is not lost at its end. It creates and removes a
probe file in the folder instead of asking ``os.access``: that also catches a
read-only file system and works the same for root, whom permission bits do
not stop.

``write_atomic`` writes to a temporary file in the same folder and renames it
over the target (as ``Sequential.save``): a failed write leaves an existing
file intact and no temporary file behind.
"""

import os
import tempfile

__all__ = ["check_writable", "check_folder", "write_atomic"]


def check_writable(path, name="path"):
    """``path`` as a str after checking that a file can be written there.

    Raises
    ------
    TypeError
        ``path`` is not a str or os.PathLike.
    ValueError
        Its folder does not exist or is not a folder, the path is a folder, or
        a file cannot be created in the folder (the message names ``name``,
        the folder and the reason).
    """
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"{name} must be a file path (str or os.PathLike), got "
                        f"{type(path).__name__}") from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise ValueError(f"{name} is empty")
    if os.path.isdir(path):
        raise ValueError(f"{name} {path!r} is a folder; give a file name")
    check_folder(os.path.dirname(os.path.abspath(path)), f"{name} {path!r}")
    return path


def check_folder(folder, what):
    """ValueError (starting with ``what``) unless a file can be created in ``folder``."""
    if not os.path.isdir(folder):
        state = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise ValueError(f"{what}: the folder {folder} {state}")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".fastnn-probe-")
    except OSError as exc:
        raise ValueError(f"{what}: cannot write in the folder {folder} "
                         f"({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path, write):
    """Call ``write(fileobj)`` on a temporary file beside ``path``, flush it to
    disk, and rename it over ``path``. The file gets the mode a new file gets
    under the process' umask. On any error the temporary file is removed and
    an existing ``path`` is left as it was; the error propagates."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
