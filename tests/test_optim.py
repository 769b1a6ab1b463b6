"""Optimizers alone on lists of arrays: the reference kernels, PyTorch, bad arguments."""

import numpy as np
import pytest

import fastnn as fn
from fastnn.kernels import reference as ref
from conftest import BACKENDS, assert_close

CPU_BACKENDS = [p for p in BACKENDS if p.values[0] in ("numpy", "cython", "numba")]

CONFIGS = {
    "sgd": lambda: fn.SGD(0.1),
    "sgd_momentum": lambda: fn.SGD(0.05, momentum=0.9, weight_decay=1e-2, l1=1e-3),
    "sgd_nesterov": lambda: fn.SGD(0.05, momentum=0.8, nesterov=True),
    "adam": lambda: fn.Adam(),
    "adam_l2_amsgrad": lambda: fn.Adam(1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2,
                                       l1=1e-3, amsgrad=True),
    "adamw": lambda: fn.AdamW(1e-2),
    "adamw_amsgrad": lambda: fn.AdamW(1e-2, weight_decay=0.1, amsgrad=True),
    "rmsprop": lambda: fn.RMSprop(),
    "rmsprop_centered_momentum": lambda: fn.RMSprop(1e-3, rho=0.9, momentum=0.9, centered=True,
                                                    weight_decay=1e-3),
}


def _reference_steps(opt, params, grads_per_step):
    """Apply the reference kernel by hand, one flat array at a time."""
    params = [p.copy().reshape(-1) for p in params]
    states = [{k: np.zeros_like(p) for k in opt.state_names()} for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for p, g, s in zip(params, grads, states):
            getattr(ref, opt.kernel)(*opt._args(p, g.reshape(-1), s, t))
    return params


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_step_on_lists_matches_the_reference(backend, dtype, name):
    rng = np.random.default_rng(0)
    shapes = [(7, 5), (5,), (3, 2, 4)]
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(4)]
    opt = CONFIGS[name]()
    expected = _reference_steps(opt, params, grads)
    with fn.use_backend(backend):
        for step_grads in grads:
            kept = [g.copy() for g in step_grads]
            opt.step(params, step_grads)
            for g, k in zip(step_grads, kept):
                np.testing.assert_array_equal(g, k)  # gradients are never written
    assert opt.iterations == 4
    for p, e, s in zip(params, expected, shapes):
        assert p.shape == s and p.dtype == dtype
        assert_close(p.reshape(-1), e, dtype)



def _torch_optimizer(name, tensors):
    import torch

    return {
        "sgd": lambda: torch.optim.SGD(tensors, lr=0.1),
        "sgd_momentum": lambda: torch.optim.SGD(tensors, lr=0.05, momentum=0.9,
                                                weight_decay=1e-2),
        "sgd_nesterov": lambda: torch.optim.SGD(tensors, lr=0.05, momentum=0.8, nesterov=True),
        "adam": lambda: torch.optim.Adam(tensors),
        "adam_l2_amsgrad": lambda: torch.optim.Adam(tensors, lr=1e-2, betas=(0.8, 0.99),
                                                    eps=1e-6, weight_decay=1e-2, amsgrad=True),
        "adamw": lambda: torch.optim.AdamW(tensors, lr=1e-2),
        "adamw_amsgrad": lambda: torch.optim.AdamW(tensors, lr=1e-2, weight_decay=0.1,
                                                   amsgrad=True),
        "rmsprop": lambda: torch.optim.RMSprop(tensors),
        "rmsprop_centered_momentum": lambda: torch.optim.RMSprop(
            tensors, lr=1e-3, alpha=0.9, momentum=0.9, centered=True, weight_decay=1e-3),
    }[name]()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_pytorch(name):
    """Same defaults and semantics as torch.optim (L1 is fastnn's own, left out)."""
    torch = pytest.importorskip("torch")
    opt = CONFIGS[name]()
    if getattr(opt, "l1", 0):
        opt.l1 = 0.0
    rng = np.random.default_rng(1)
    params = [rng.standard_normal((6, 4)), rng.standard_normal(4)]
    tensors = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    topt = _torch_optimizer(name, tensors)
    for _ in range(5):
        grads = [rng.standard_normal(p.shape) for p in params]
        opt.step(params, grads)
        for t, g in zip(tensors, grads):
            t.grad = torch.tensor(g)
        topt.step()
    for p, t in zip(params, tensors):
        np.testing.assert_allclose(p, t.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_defaults_are_pytorch_defaults():
    assert fn.SGD().get_config() == {"lr": 1e-3, "momentum": 0.0, "nesterov": False,
                                     "weight_decay": 0.0, "l1": 0.0}
    assert fn.Adam().get_config() == {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                                      "weight_decay": 0.0, "l1": 0.0, "amsgrad": False}
    assert fn.AdamW().get_config()["weight_decay"] == 1e-2
    assert fn.RMSprop().get_config() == {"lr": 1e-2, "rho": 0.99, "eps": 1e-8, "momentum": 0.0,
                                         "centered": False, "weight_decay": 0.0, "l1": 0.0}


def test_single_array_and_reset():
    p = np.ones(3)
    opt = fn.SGD(0.5)
    opt.step(p, np.ones(3))
    np.testing.assert_array_equal(p, 0.5)
    with pytest.raises(ValueError, match="reset"):
        opt.step([np.ones(4)], [np.ones(4)])
    opt.reset()
    assert opt.iterations == 0
    opt.step([np.ones(4)], [np.ones(4)])


@pytest.mark.parametrize("params,grads,exc,match", [
    ("p", [np.ones(2)], TypeError, "list"),
    ([np.ones(2)], [np.ones(2), np.ones(2)], ValueError, "same length"),
    ([], [], ValueError, "empty"),
    ([[1.0, 2.0]], [np.ones(2)], TypeError, "numpy.ndarray"),
    ([np.ones(2)], [np.ones(3)], ValueError, "shape"),
    ([np.ones(2, np.float32)], [np.ones(2)], TypeError, "dtype"),
    ([np.ones(2, np.int64)], [np.ones(2, np.int64)], TypeError, "float32 or float64"),
    ([np.ones((4, 4))[:, 0]], [np.ones(4)], ValueError, "C-contiguous"),
])
def test_bad_lists(params, grads, exc, match):
    opt = fn.Adam()
    with pytest.raises(exc, match=match):
        opt.step(params, grads)
    assert opt.iterations == 0 and opt._states is None


def test_bad_arguments_write_nothing():
    base = np.arange(6.0)
    shared = [base[:4], base[2:]]
    opt = fn.SGD(0.1)
    with pytest.raises(ValueError, match="share memory"):
        opt.step(shared, [np.ones(4), np.ones(4)])
    np.testing.assert_array_equal(base, np.arange(6.0))
    readonly = np.ones(3)
    readonly.flags.writeable = False
    ok = np.ones(3)
    with pytest.raises(ValueError, match="writable"):
        opt.step([ok, readonly], [np.ones(3), np.ones(3)])
    np.testing.assert_array_equal(ok, 1.0)  # the first array was not updated either
    opt = fn.Adam()
    with pytest.raises(ValueError, match="lr"):
        opt.lr = -1.0   # the setter checks at once
    assert opt.lr == 1e-3
    opt._lr = -1.0      # past the setter, the kernel's gate still refuses it
    p = np.ones(3)
    with pytest.raises(ValueError, match="lr"):
        opt.step([p], [np.ones(3)])
    np.testing.assert_array_equal(p, 1.0)


@pytest.mark.parametrize("make,exc,match", [
    (lambda: fn.SGD(-0.1), ValueError, "lr"),
    (lambda: fn.SGD("0.1"), TypeError, "lr"),
    (lambda: fn.SGD(0.1, nesterov=True), ValueError, "nesterov"),
    (lambda: fn.SGD(0.1, momentum=-1), ValueError, "momentum"),
    (lambda: fn.Adam(betas=(1.0, 0.9)), ValueError, "betas"),
    (lambda: fn.Adam(betas=0.9), TypeError, "betas"),
    (lambda: fn.Adam(eps=0), ValueError, "eps"),
    (lambda: fn.Adam(amsgrad=1), TypeError, "amsgrad"),
    (lambda: fn.AdamW(weight_decay=float("nan")), ValueError, "weight_decay"),
    (lambda: fn.RMSprop(rho=1.0), ValueError, "rho"),
    (lambda: fn.RMSprop(l1=-1), ValueError, "l1"),
    (lambda: fn.optim.get("adagrad"), ValueError, "unknown optimizer"),
    (lambda: fn.optim.get(3), TypeError, "optimizer"),
])
def test_bad_hyperparameters(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_get_by_name():
    assert isinstance(fn.optim.get("AdamW"), fn.AdamW)
    assert fn.optim.get("sgd", lr=0.3).lr == 0.3
    opt = fn.RMSprop()
    assert fn.optim.get(opt) is opt
    assert repr(fn.SGD(0.1)).startswith("SGD(lr=0.1")
