"""The reference against independent checks: closed forms written with the
``math`` module, the optimizers written out a second way as PyTorch's
per-element algorithms, and central finite differences in float64 for every
derivative and gradient (relative error < 1e-6)."""

import math

import numpy as np
import pytest

from fastnn.kernels import reference as ref
from conftest import DTYPES

RNG = np.random.default_rng(1234)


def _away_from_kinks(shape, scale=2.0):
    """float64 normals kept at least 1e-3 away from 0 (relu/leaky_relu kinks)."""
    z = RNG.standard_normal(shape) * scale
    z[np.abs(z) < 1e-3] = 0.5
    return z


# ------------------------------------------------------------ closed forms

CLOSED_FORMS = {
    "identity": lambda z: z,
    "relu": lambda z: max(z, 0.0),
    "leaky_relu": lambda z: z if z > 0 else 0.01 * z,
    "sigmoid": lambda z: 1.0 / (1.0 + math.exp(-z)),
    "tanh": math.tanh,
    "gelu": lambda z: 0.5 * z * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))),
    "silu": lambda z: z / (1.0 + math.exp(-z)),
    "softplus": lambda z: math.log(1.0 + math.exp(z)),
}


@pytest.mark.parametrize("act", ref.ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_closed_form(act, dtype):
    z64 = np.linspace(-30, 30, 601)
    z = z64.astype(dtype)
    out = np.empty_like(z)
    ref.activation_forward(act, z, out)
    assert out.dtype == dtype
    expected = np.array([CLOSED_FORMS[act](float(v)) for v in z])
    rtol, atol = (1e-5, 1e-6) if dtype == np.float32 else (1e-12, 1e-13)
    np.testing.assert_allclose(out, expected, rtol=rtol, atol=atol)


def test_sigmoid_keeps_relative_accuracy_in_the_tail():
    z = np.array([-50.0, -80.0, -700.0], np.float64)
    out = np.empty_like(z)
    ref.activation_forward("sigmoid", z, out)
    np.testing.assert_allclose(out, np.exp(z) / (1 + np.exp(z)), rtol=1e-14)
    z32 = np.array([-50.0, -80.0, -87.0], np.float32)  # normal range
    out32 = np.empty_like(z32)
    ref.activation_forward("sigmoid", z32, out32)
    assert np.all(out32 > 0)
    np.testing.assert_allclose(out32, np.exp(z32.astype(np.float64)), rtol=1e-6)


def test_softplus_large_and_small():
    z = np.array([-800.0, -40.0, 0.0, 40.0, 800.0])
    out = np.empty_like(z)
    ref.activation_forward("softplus", z, out)
    np.testing.assert_allclose(out, [0.0, math.exp(-40), math.log(2), 40.0, 800.0],
                               rtol=1e-14, atol=0)


# ------------------------------------------------------------ finite differences

def _central(f, z, h=1e-6):
    """Elementwise central difference of an elementwise function."""
    return (f(z + h) - f(z - h)) / (2 * h)


def _forward(act):
    def f(z):
        out = np.empty_like(z)
        ref.activation_forward(act, z, out)
        return out
    return f


@pytest.mark.parametrize("act", ref.ACTIVATIONS)
def test_activation_derivative_finite_difference(act):
    z = _away_from_kinks((13, 17))
    y = _forward(act)(z)
    dy = RNG.standard_normal(z.shape)
    out = np.empty_like(z)
    ref.activation_backward(act, dy, z, y, out)
    expected = dy * _central(_forward(act), z)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-9)


def test_relu_derivative_at_zero_is_zero_and_leaky_slope():
    z = np.array([0.0, -1.0, 2.0])
    dy = np.ones(3)
    out = np.empty(3)
    ref.activation_backward("relu", dy, None, np.maximum(z, 0), out)
    np.testing.assert_array_equal(out, [0.0, 0.0, 1.0])
    ref.activation_backward("leaky_relu", dy, z, None, out)
    np.testing.assert_array_equal(out, [0.01, 0.01, 1.0])


def _fd_gradient(loss, a, h=1e-6):
    """Central finite-difference gradient of the scalar ``loss()`` with respect
    to every element of ``a`` (perturbed in place and restored)."""
    grad = np.empty_like(a)
    flat, gflat = a.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        keep = flat[i]
        flat[i] = keep + h
        up = loss()
        flat[i] = keep - h
        down = loss()
        flat[i] = keep
        gflat[i] = (up - down) / (2 * h)
    return grad


def _assert_grad(analytic, numeric):
    scale = max(1e-3, np.abs(numeric).max())
    err = np.abs(analytic - numeric).max() / scale
    assert err < 1e-6, f"relative error {err:.2e}"


def test_softmax_cross_entropy_gradient():
    logits = RNG.standard_normal((5, 7)) * 3
    labels = RNG.integers(0, 7, 5)
    grad = np.empty_like(logits)
    ref.softmax_cross_entropy(logits, labels, grad)
    scratch = np.empty_like(logits)
    numeric = _fd_gradient(lambda: ref.softmax_cross_entropy(logits, labels, scratch), logits)
    _assert_grad(grad, numeric)


def test_softmax_cross_entropy_closed_form():
    logits = RNG.standard_normal((6, 4))
    labels = np.array([0, 1, 2, 3, 0, 1])
    grad = np.empty_like(logits)
    loss = ref.softmax_cross_entropy(logits, labels, grad)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert loss == pytest.approx(-np.mean(np.log(p[np.arange(6), labels])), rel=1e-13)
    onehot = np.eye(4)[labels]
    np.testing.assert_allclose(grad, (p - onehot) / 6, rtol=1e-12, atol=1e-15)


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0], [-1000.0, 0.0]])
    grad = np.empty_like(logits)
    loss = ref.softmax_cross_entropy(logits, np.array([0, 0]), grad)
    assert loss == pytest.approx(500.0)
    assert np.all(np.isfinite(grad))


def test_sigmoid_bce_gradient_and_closed_form():
    logits = RNG.standard_normal((6, 3)) * 3
    targets = RNG.uniform(0, 1, (6, 3))
    grad = np.empty_like(logits)
    loss = ref.sigmoid_binary_cross_entropy(logits, targets, grad)
    s = 1 / (1 + np.exp(-logits))
    closed = -np.mean(targets * np.log(s) + (1 - targets) * np.log(1 - s))
    assert loss == pytest.approx(closed, rel=1e-12)
    scratch = np.empty_like(logits)
    numeric = _fd_gradient(
        lambda: ref.sigmoid_binary_cross_entropy(logits, targets, scratch), logits)
    _assert_grad(grad, numeric)


def test_mse_gradient_and_closed_form():
    pred = RNG.standard_normal((4, 5))
    target = RNG.standard_normal((4, 5))
    grad = np.empty_like(pred)
    loss = ref.mse(pred, target, grad)
    assert loss == pytest.approx(np.mean((pred - target) ** 2), rel=1e-13)
    scratch = np.empty_like(pred)
    _assert_grad(grad, _fd_gradient(lambda: ref.mse(pred, target, scratch), pred))


def test_softmax_rows_sum_to_one_and_shift_invariant():
    z = RNG.standard_normal((5, 9)) * 10
    out = np.empty_like(z)
    ref.softmax(z, out)
    np.testing.assert_allclose(out.sum(1), 1, rtol=1e-14)
    shifted = np.empty_like(z)
    ref.softmax(z + 123.0, shifted)
    np.testing.assert_allclose(shifted, out, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(out, np.exp(z) / np.exp(z).sum(1, keepdims=True), rtol=1e-12)


def test_dense_backward_finite_difference():
    x = RNG.standard_normal((4, 3))
    w = RNG.standard_normal((3, 5))
    b = RNG.standard_normal(5)
    g = RNG.standard_normal((4, 5))  # upstream gradient: loss = sum(g * (x @ w + b))
    dw, db = np.empty_like(w), np.empty_like(b)
    ref.dense_backward(x, g, dw, db)

    def loss():
        return float(np.sum(g * (x @ w + b)))

    _assert_grad(dw, _fd_gradient(loss, w))
    _assert_grad(db, _fd_gradient(loss, b))


@pytest.mark.parametrize("act", ref.ACTIVATIONS)
def test_backprop_delta_finite_difference(act):
    z = _away_from_kinks((4, 6))
    w = RNG.standard_normal((6, 3))
    b = RNG.standard_normal(3)
    dy = RNG.standard_normal((4, 3))  # loss = sum(dy * (act(z) @ w + b))
    out = np.empty_like(z)
    ref.backprop_delta(dy, w, z, _forward(act)(z), act, out)

    def loss():
        return float(np.sum(dy * (_forward(act)(z) @ w + b)))

    _assert_grad(out, _fd_gradient(loss, z))


@pytest.mark.parametrize("act", ref.ACTIVATIONS)
def test_dense_forward_definition(act):
    x = RNG.standard_normal((3, 4))
    w = RNG.standard_normal((4, 2))
    b = RNG.standard_normal(2)
    out, pre = np.empty((3, 2)), np.empty((3, 2))
    ref.dense_forward(x, w, b, act, out, pre)
    np.testing.assert_allclose(pre, x @ w + b, rtol=1e-14)
    expected = np.array([[CLOSED_FORMS[act](v) for v in row] for row in x @ w + b])
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-14)
    out2 = np.empty((3, 2))
    ref.dense_forward(x, w, b, act, out2)
    np.testing.assert_array_equal(out2, out)


# ------------------------------------------------------------ optimizers, second way

def _sign(v):
    return 1.0 if v > 0 else (-1.0 if v < 0 else 0.0)


def sgd_scalar(p, g, buf, lr, momentum, nesterov, weight_decay, l1):
    """torch.optim.SGD (dampening 0), written per element."""
    for i in range(p.size):
        d = g[i] + weight_decay * p[i] + l1 * _sign(p[i])
        if momentum:
            buf[i] = momentum * buf[i] + d
            d = d + momentum * buf[i] if nesterov else buf[i]
        p[i] = p[i] - lr * d


def adam_scalar(p, g, m, v, t, lr, b1, b2, eps, wd, decoupled, l1, vmax):
    """torch.optim.Adam / AdamW (amsgrad optional), written per element."""
    for i in range(p.size):
        grad = g[i] + l1 * _sign(p[i])
        if decoupled:
            p[i] = p[i] * (1 - lr * wd)
        else:
            grad += wd * p[i]
        m[i] = b1 * m[i] + (1 - b1) * grad
        v[i] = b2 * v[i] + (1 - b2) * grad * grad
        second = v[i]
        if vmax is not None:
            vmax[i] = max(vmax[i], v[i])
            second = vmax[i]
        m_hat = m[i] / (1 - b1**t)
        v_hat = second / (1 - b2**t)
        p[i] = p[i] - lr * m_hat / (math.sqrt(v_hat) + eps)


def rmsprop_scalar(p, g, sq, buf, lr, rho, eps, momentum, cm, wd, l1):
    """torch.optim.RMSprop, written per element."""
    for i in range(p.size):
        grad = g[i] + wd * p[i] + l1 * _sign(p[i])
        sq[i] = rho * sq[i] + (1 - rho) * grad * grad
        avg = sq[i]
        if cm is not None:
            cm[i] = rho * cm[i] + (1 - rho) * grad
            avg = sq[i] - cm[i] * cm[i]
        den = math.sqrt(avg) + eps
        if momentum > 0:
            buf[i] = momentum * buf[i] + grad / den
            p[i] = p[i] - lr * buf[i]
        else:
            p[i] = p[i] - lr * grad / den


def _steps(kernel, scalar, make_args, steps=20):
    a = make_args()
    b = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in a.items()}
    g0 = a["g"].copy()
    for t in range(1, steps + 1):
        if "step" in a:
            a["step"] = b["step"] = t
        kernel(**a)
        scalar(*b.values())
        np.testing.assert_array_equal(a["g"], g0)  # g is never written
    for k, v in a.items():
        if isinstance(v, np.ndarray):
            np.testing.assert_allclose(v, b[k], rtol=1e-12, atol=1e-14, err_msg=k)


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
@pytest.mark.parametrize("wd,l1", [(0.0, 0.0), (0.1, 0.01)])
def test_sgd_matches_second_formulation(momentum, nesterov, wd, l1):
    n = 23
    _steps(ref.sgd_step, sgd_scalar, lambda: dict(
        p=RNG.standard_normal(n), g=RNG.standard_normal(n), buf=np.zeros(n), lr=0.05,
        momentum=momentum, nesterov=nesterov, weight_decay=wd, l1=l1))


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("wd,l1", [(0.0, 0.0), (0.1, 0.01)])
def test_adam_matches_second_formulation(decoupled, amsgrad, wd, l1):
    n = 23
    _steps(ref.adam_step, adam_scalar, lambda: dict(
        p=RNG.standard_normal(n), g=RNG.standard_normal(n), m=np.zeros(n), v=np.zeros(n), step=1,
        lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd, decoupled=decoupled, l1=l1,
        vmax=np.zeros(n) if amsgrad else None))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("wd,l1", [(0.0, 0.0), (0.1, 0.01)])
def test_rmsprop_matches_second_formulation(momentum, centered, wd, l1):
    n = 23
    _steps(ref.rmsprop_step, rmsprop_scalar, lambda: dict(
        p=RNG.standard_normal(n), g=RNG.standard_normal(n), sq=np.zeros(n),
        buf=np.zeros(n), lr=1e-2, rho=0.99, eps=1e-8, momentum=momentum,
        centered_mean=np.zeros(n) if centered else None, weight_decay=wd, l1=l1))


def test_adam_first_step_closed_form():
    """With zero state, the bias-corrected first step is lr*g/(|g| + eps)."""
    g = np.array([0.5, -2.0, 1e-3])
    p = np.zeros(3)
    ref.adam_step(p, g, np.zeros(3), np.zeros(3), 1, 0.1, 0.9, 0.999, 1e-8, 0.0, False, 0.0, None)
    np.testing.assert_allclose(p, -0.1 * g / (np.abs(g) + 1e-8), rtol=1e-12)


def test_sgd_first_momentum_step_equals_plain_step():
    g = RNG.standard_normal(5)
    p1, p2 = np.ones(5), np.ones(5)
    ref.sgd_step(p1, g, np.zeros(5), 0.1, 0.9, False, 0.0, 0.0)
    ref.sgd_step(p2, g, None, 0.1, 0.0, False, 0.0, 0.0)
    np.testing.assert_array_equal(p1, p2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_optimizers_keep_dtype(dtype):
    n = 8
    p, g = np.ones(n, dtype), np.ones(n, dtype)
    m, v, sq = np.zeros(n, dtype), np.zeros(n, dtype), np.zeros(n, dtype)
    ref.adam_step(p, g, m, v, 3, 1e-3, 0.9, 0.999, 1e-8, 0.1, True, 0.01, None)
    ref.rmsprop_step(p, g, sq, None, 1e-3, 0.9, 1e-8, 0.0, None, 0.0, 0.0)
    ref.sgd_step(p, g, None, 1e-3, 0.0, False, 0.0, 0.0)
    assert {a.dtype for a in (p, g, m, v, sq)} == {np.dtype(dtype)}


@pytest.mark.parametrize("act", ["gelu", "silu", "softplus", "sigmoid", "tanh"])
def test_float32_matches_float64_in_the_tails(act):
    """The float32 reference is accurate where naive formulas cancel (GELU's
    ``1 + tanh(u)`` near -1, for instance): within a few float32 ulps of the
    float64 result, forward and derivative."""
    z64 = np.linspace(-9, 9, 4001)
    z32 = z64.astype(np.float32)
    z64 = z32.astype(np.float64)
    results = {}
    for z in (z32, z64):
        y, dz = np.empty_like(z), np.empty_like(z)
        ref.activation_forward(act, z, y)
        ref.activation_backward(act, np.ones_like(z), z, y, dz)
        results[z.dtype] = (y, dz)
    for a32, a64 in zip(results[np.dtype(np.float32)], results[np.dtype(np.float64)]):
        np.testing.assert_allclose(a32, a64, rtol=2e-6, atol=2e-7)
