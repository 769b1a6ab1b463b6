"""Plots of a training run: ``plot_history(history, path, confusion=None)``.

Needs matplotlib (``pip install "fastnn[plot]"``), imported only when
plotting; the figure is drawn on matplotlib's Agg canvas without ``pyplot``,
so no window opens and no global state changes. ``confusion_matrix`` is plain
NumPy.

>>> import numpy as np
>>> from fastnn.plot import confusion_matrix
>>> confusion_matrix([0, 1, 1, 2], [0, 1, 2, 2], 3)
array([[1, 0, 0],
       [0, 1, 1],
       [0, 0, 1]])
"""

import numbers

import numpy as np

from . import _files

__all__ = ["plot_history", "confusion_matrix"]

#: Above this many classes the cells of the confusion matrix carry no numbers.
ANNOTATE_MAX_CLASSES = 20


def confusion_matrix(y_true, y_pred, classes):
    """Counts of (true, predicted) class pairs.

    ``m[i, j]`` is the number of samples of true class ``i`` predicted as
    ``j``: rows sum to the class counts, the diagonal holds the correct ones.

    Parameters
    ----------
    y_true, y_pred : array-like of int, shape (n,)
        Class indices in ``[0, classes)``.
    classes : int >= 1
        The number of classes (the matrix is ``classes x classes``).

    Returns
    -------
    ndarray (classes, classes) of int64
    """
    if isinstance(classes, bool) or not isinstance(classes, numbers.Integral) or classes < 1:
        raise ValueError(f"classes must be an integer >= 1, got {classes!r}")
    arrays = []
    for name, a in (("y_true", y_true), ("y_pred", y_pred)):
        a = np.asarray(a)
        if a.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integer class indices, got dtype {a.dtype}")
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
        if a.size and (a.min() < 0 or a.max() >= classes):
            raise ValueError(f"{name} must hold class indices in [0, {classes}), got values "
                             f"in [{a.min()}, {a.max()}]")
        arrays.append(a.astype(np.int64))
    t, p = arrays
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {t.size} and "
                         f"{p.size}")
    return np.bincount(t * classes + p, minlength=classes * classes).reshape(classes, classes)


def _series(history):
    if hasattr(history, "history") and isinstance(history.history, dict):
        history = history.history
    if not isinstance(history, dict):
        raise TypeError(f"history must be a fastnn History (what fit returns) or a dict of "
                        f"lists, got {type(history).__name__}")
    loss = history.get("loss")
    if loss is None or len(loss) == 0:
        raise ValueError("history has no 'loss' values: nothing to plot (fit for at least "
                         "one epoch)")
    out = {}
    for key in ("loss", "val_loss", "accuracy", "val_accuracy", "lr", "learning_rate"):
        values = history.get(key)
        if values is not None and len(values):
            out[key] = np.asarray(values, dtype=np.float64)
    return out


def _check_confusion(confusion):
    if confusion is None:
        return None
    m = np.asarray(confusion)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 1:
        raise ValueError(f"confusion must be a square matrix (classes x classes), got shape "
                         f"{m.shape}")
    if m.dtype.kind not in "iuf" or not np.all(np.isfinite(m)) or np.any(m < 0):
        raise ValueError("confusion must hold counts: finite numbers >= 0")
    return m


def _curves(ax, epochs, series, train, val, label):
    ax.plot(epochs, series[train], "o-", label=f"training {label}", color="tab:blue")
    if val in series:
        ax.plot(epochs[:len(series[val])], series[val], "s--", label=f"validation {label}",
                color="tab:orange")
    ax.set_xlabel("epoch")
    ax.set_ylabel(label)
    ax.set_title(label.capitalize())
    ax.grid(True, alpha=0.3)
    ax.legend()


def _confusion(fig, ax, m):
    k = m.shape[0]
    image = ax.imshow(m, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    total = m.sum()
    accuracy = np.trace(m) / total if total else float("nan")
    ax.set_title(f"Confusion matrix (accuracy {accuracy:.4f})")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ticks = np.arange(k) if k <= ANNOTATE_MAX_CLASSES else \
        np.unique(np.linspace(0, k - 1, 10).round().astype(int))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    if k <= ANNOTATE_MAX_CLASSES:
        threshold = m.max() / 2
        for i in range(k):
            for j in range(k):
                v = m[i, j]
                ax.text(j, i, f"{v:g}", ha="center", va="center", fontsize=8,
                        color="white" if v > threshold else "black")


def plot_history(history, path, confusion=None, title=None):
    """Write a PNG of a training run.

    Panels: the loss per epoch (training, and validation when there is
    some); the accuracy likewise when the history has it (the classification
    losses); the learning rate when the history records one that changes
    (``lr``, as ``fit`` logs it, or Keras' ``learning_rate``: the rate at the
    end of each epoch); and the confusion matrix when given (cells numbered up
    to ``ANNOTATE_MAX_CLASSES`` classes).

    Parameters
    ----------
    history : fastnn History or dict
        What ``fit`` returns, or ``{"loss": [...], ...}``.
    path : str or os.PathLike
        The PNG to write; its folder must exist and be writable (checked
        before anything is drawn). Written atomically.
    confusion : array-like (k, k), optional
        Counts, e.g. ``confusion_matrix(y_test, model.predict(x_test).argmax(1), k)``.
    title : str, optional
        Above the panels.

    Returns
    -------
    str
        ``path``.
    """
    path = _files.check_writable(path, "path")
    series = _series(history)
    m = _check_confusion(confusion)
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title must be a str, got {type(title).__name__}")
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(f"plot_history needs matplotlib: pip install \"fastnn[plot]\" "
                          f"({exc})") from None
    # a constant rate says nothing a panel should show
    rate = next((k for k in ("lr", "learning_rate") if k in series and np.ptp(series[k]) > 0),
                None)
    panels = ["loss"] + (["accuracy"] if "accuracy" in series else []) + \
        ([rate] if rate else []) + (["confusion"] if m is not None else [])
    fig = Figure(figsize=(5.2 * len(panels), 4.4), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    epochs = np.arange(1, len(series["loss"]) + 1)
    for ax, panel in zip(axes, panels):
        if panel == "loss":
            _curves(ax, epochs, series, "loss", "val_loss", "loss")
        elif panel == "accuracy":
            _curves(ax, epochs[:len(series["accuracy"])], series, "accuracy", "val_accuracy",
                    "accuracy")
        elif panel == "confusion":
            _confusion(fig, ax, m)
        else:
            values = series[panel]
            ax.plot(np.arange(1, len(values) + 1), values, "o-", color="tab:green")
            ax.set_yscale("log" if np.all(values > 0) else "linear")
            ax.set_xlabel("epoch")
            ax.set_ylabel("learning rate (end of epoch)")
            ax.set_title("Learning rate")
            ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    _files.write_atomic(path, lambda f: fig.savefig(f, format="png"))
    return path
