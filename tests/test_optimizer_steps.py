"""The optimizer kernels of every backend track the reference over 100 steps.

One step of parity (``test_parity.py``) does not show state that drifts: here
each backend runs 100 consecutive steps of ``sgd_step``, ``adam_step`` and
``rmsprop_step`` through ``fastnn.ops`` with its state carried from step to
step (on the device for the cuda backend), next to the NumPy reference fed
the same gradients, and every array is compared along the way. Variants: plain,
weight decay (L2 in the gradient), L1, momentum, Nesterov, AMSGrad, decoupled
weight decay (AdamW), centered RMSprop, and their combinations; float32 and
float64.
"""

import numpy as np
import pytest

import fastnn
from fastnn import _backend
from fastnn.kernels import reference as ref
from conftest import BACKENDS, DTYPES, assert_close

STEPS = 100
CHECK_EVERY = 10
#: Size for backends without PARITY_SHAPES (odd), and a larger one for the
#: variants that combine every option (above the Cython backend's OpenMP
#: threshold; numba's prange path starts at 1 M elements and is compared with
#: its serial path in test_numba.py with the thresholds forced down).
SIZE, LARGE_SIZE = 1001, 70001
LARGE_VARIANTS = ("plain", "nesterov_wd_l1", "adamw_amsgrad_l1", "wd_amsgrad_l1",
                  "centered_momentum_wd_l1")

SGD = {
    "plain": dict(momentum=0.0, nesterov=False, weight_decay=0.0, l1=0.0),
    "weight_decay": dict(momentum=0.0, nesterov=False, weight_decay=1e-2, l1=0.0),
    "l1": dict(momentum=0.0, nesterov=False, weight_decay=0.0, l1=1e-3),
    "momentum": dict(momentum=0.9, nesterov=False, weight_decay=0.0, l1=0.0),
    "nesterov": dict(momentum=0.9, nesterov=True, weight_decay=0.0, l1=0.0),
    "nesterov_wd_l1": dict(momentum=0.5, nesterov=True, weight_decay=1e-2, l1=1e-3),
}
ADAM = {
    "plain": dict(weight_decay=0.0, decoupled=False, l1=0.0, amsgrad=False),
    "weight_decay": dict(weight_decay=1e-2, decoupled=False, l1=0.0, amsgrad=False),
    "adamw": dict(weight_decay=1e-2, decoupled=True, l1=0.0, amsgrad=False),
    "l1": dict(weight_decay=0.0, decoupled=False, l1=1e-3, amsgrad=False),
    "amsgrad": dict(weight_decay=0.0, decoupled=False, l1=0.0, amsgrad=True),
    "adamw_amsgrad_l1": dict(weight_decay=1e-2, decoupled=True, l1=1e-3, amsgrad=True),
    "wd_amsgrad_l1": dict(weight_decay=1e-2, decoupled=False, l1=1e-3, amsgrad=True),
}
RMSPROP = {
    "plain": dict(momentum=0.0, centered=False, weight_decay=0.0, l1=0.0),
    "weight_decay": dict(momentum=0.0, centered=False, weight_decay=1e-2, l1=0.0),
    "l1": dict(momentum=0.0, centered=False, weight_decay=0.0, l1=1e-3),
    "momentum": dict(momentum=0.9, centered=False, weight_decay=0.0, l1=0.0),
    "centered": dict(momentum=0.0, centered=True, weight_decay=0.0, l1=0.0),
    "centered_momentum_wd_l1": dict(momentum=0.9, centered=True, weight_decay=1e-2, l1=1e-3),
}


def _sizes(name, variant):
    shapes = getattr(_backend.load(name).module, "PARITY_SHAPES", None)
    if shapes is not None:
        return (max(b * w for b, w in shapes),)   # e.g. the CUDA simulator: small
    return (SIZE, LARGE_SIZE) if variant in LARGE_VARIANTS else (SIZE,)


def _run(backend, kernel, n, dtype, states, call):
    """Run ``STEPS`` steps of ``kernel`` on the reference and on ``backend``.

    ``states`` names the state arrays (zero at the start, as the optimizers
    create them); ``call(arrays, t)`` returns the keyword arguments of step
    ``t`` for a dict of arrays ``p``, ``g`` and the states."""
    be = _backend.load(backend)
    rng = np.random.default_rng(n)
    p0 = np.ascontiguousarray(rng.standard_normal(n), dtype=dtype)
    host = {"p": p0.copy(), **{s: np.zeros(n, dtype) for s in states}}
    dev = {"p": be.from_host(p0.copy()), **{s: be.zeros(n, dtype) for s in states}}
    for t in range(1, STEPS + 1):
        g = np.ascontiguousarray(rng.standard_normal(n) * rng.uniform(0.1, 10), dtype=dtype)
        getattr(ref, kernel)(**call(dict(host, g=g), t))
        with fastnn.use_backend(backend):
            getattr(fastnn.ops, kernel)(**call(dict(dev, g=be.from_host(g)), t))
        if t % CHECK_EVERY == 0 or t == 1:
            for name in host:
                assert_close(be.to_host(dev[name]), host[name], dtype,
                             err_msg=f"{backend}.{kernel}: {name} after step {t}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", list(SGD))
def test_sgd_steps(backend, dtype, variant):
    hp = SGD[variant]
    states = ("buf",) if hp["momentum"] > 0 else ()

    def call(a, t):
        return dict(p=a["p"], g=a["g"], buf=a.get("buf"), lr=0.05, **hp)

    for n in _sizes(backend, variant):
        _run(backend, "sgd_step", n, dtype, states, call)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", list(ADAM))
def test_adam_steps(backend, dtype, variant):
    hp = dict(ADAM[variant])
    amsgrad = hp.pop("amsgrad")
    states = ("m", "v") + (("vmax",) if amsgrad else ())

    def call(a, t):
        return dict(p=a["p"], g=a["g"], m=a["m"], v=a["v"], step=t, lr=1e-2, beta1=0.9,
                    beta2=0.999, eps=1e-8, vmax=a.get("vmax"), **hp)

    for n in _sizes(backend, variant):
        _run(backend, "adam_step", n, dtype, states, call)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", list(RMSPROP))
def test_rmsprop_steps(backend, dtype, variant):
    hp = dict(RMSPROP[variant])
    centered = hp.pop("centered")
    states = ("sq",) + (("buf",) if hp["momentum"] > 0 else ()) + \
        (("centered_mean",) if centered else ())

    def call(a, t):
        return dict(p=a["p"], g=a["g"], sq=a["sq"], buf=a.get("buf"), lr=1e-3, rho=0.9,
                    eps=1e-8, centered_mean=a.get("centered_mean"), **hp)

    for n in _sizes(backend, variant):
        _run(backend, "rmsprop_step", n, dtype, states, call)
