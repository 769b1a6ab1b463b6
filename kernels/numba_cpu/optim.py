"""Optimizer kernels of the numba backend: SGD, Adam (AdamW, AMSGrad) and
RMSprop, each variant one loop that reads and writes every array once."""

import math

from ._runtime import PARALLEL_MIN, _Kernel, _launch, _named, _specialised
from ._math import _c, _maximum, _sign

# One loop per optimizer variant: the flags are constants of the closure, so
# each variant compiles without the branches it does not take. Scalars are
# cast to the array dtype as NumPy casts Python floats (``p *= beta1``), and
# the operations follow the reference's order: the results are identical.
# Each loop is named after its variant (``adam__decoupled__wd``: see _named).


def _tags(**flags):
    """The names of the flags that are set: a variant's part of a loop's name."""
    return tuple(name for name, on in flags.items() if on)


def _sgd_kernel(has_wd, has_l1, has_momentum, nesterov):
    def sgd(lo, hi, p, g, buf, lr, momentum, wd, l1):
        p, g, buf = p[lo:hi], g[lo:hi], buf[lo:hi]
        for i in range(p.size):
            pi = p[i]
            gi = g[i]
            if has_wd:
                gi = gi + wd * pi
            if has_l1:
                gi = gi + l1 * _sign(pi)
            if has_momentum:
                b = buf[i] * momentum + gi
                buf[i] = b
                d = gi + momentum * b if nesterov else b
            else:
                d = gi
            p[i] = pi - lr * d

    return _Kernel(_named(sgd, *_tags(wd=has_wd, l1=has_l1, momentum=has_momentum,
                                      nesterov=nesterov)))


def sgd_step(p, g, buf, lr, momentum, nesterov, weight_decay, l1):
    """One SGD step in place (PyTorch's ``torch.optim.SGD``, dampening 0).

    ``g' = g + weight_decay*p + l1*sign(p)``; with ``momentum > 0``:
    ``buf = momentum*buf + g'`` and ``d = g' + momentum*buf`` (Nesterov) or
    ``d = buf``; without momentum ``d = g'``. Then ``p -= lr*d``. One pass.

    Parameters
    ----------
    p : ndarray (n,). IN/OUT
    g : ndarray (n,). IN
    buf : ndarray (n,) or None (when ``momentum == 0``). IN/OUT
    lr, momentum, weight_decay, l1 : float
    nesterov : bool
    """
    has_momentum = momentum != 0
    flags = (weight_decay != 0, l1 != 0, has_momentum, bool(nesterov) and has_momentum)
    kernel = _specialised(("sgd",) + flags, _sgd_kernel, *flags)
    ft = p.dtype.type
    _launch(kernel, p.size, PARALLEL_MIN["optimizer"], p, g, buf if has_momentum else p,
            ft(lr), ft(momentum), ft(weight_decay), ft(l1))


def _adam_kernel(decoupled, has_wd, has_l1, amsgrad):
    def adam(lo, hi, p, g, m, v, vmax, decay, wd, l1, beta1, c1, beta2, c2, bc2_sqrt, eps,
             step_size):
        p, g, m, v, vmax = p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], vmax[lo:hi]
        for i in range(p.size):
            pi = p[i]
            gi = g[i]
            if decoupled:
                if has_l1:
                    gi = gi + l1 * _sign(pi)      # sign(p) before the decay
                if has_wd:
                    pi = pi * decay
            else:
                if has_wd:
                    gi = gi + wd * pi
                if has_l1:
                    gi = gi + l1 * _sign(pi)
            mi = m[i] * beta1 + c1 * gi
            vi = v[i] * beta2 + c2 * (gi * gi)
            m[i] = mi
            v[i] = vi
            if amsgrad:
                vi = _maximum(vmax[i], vi)
                vmax[i] = vi
            p[i] = pi - mi / (math.sqrt(vi) / bc2_sqrt + eps) * step_size

    return _Kernel(_named(adam, *_tags(decoupled=decoupled, wd=has_wd, l1=has_l1,
                                       amsgrad=amsgrad)))


def adam_step(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, decoupled, l1, vmax):
    """One Adam / AdamW / AMSGrad step in place (PyTorch's ``torch.optim.Adam``
    and ``AdamW``), one pass over the arrays.

    ``g' = g + weight_decay*p + l1*sign(p)`` (with ``decoupled``, AdamW: no
    weight-decay term in ``g'``, ``p *= 1 - lr*weight_decay`` instead);
    ``m = beta1*m + (1-beta1)*g'``, ``v = beta2*v + (1-beta2)*g'^2``, with
    AMSGrad ``vmax = max(vmax, v)`` used for ``v``;
    ``p -= lr/(1-beta1^t) * m / (sqrt(v)/sqrt(1-beta2^t) + eps)``.

    Parameters
    ----------
    p : ndarray (n,). IN/OUT
    g : ndarray (n,). IN
    m, v : ndarray (n,). IN/OUT
    step : int
        ``t``, 1-based, after this step.
    lr, beta1, beta2, eps, weight_decay, l1 : float
    decoupled : bool
    vmax : ndarray (n,) or None. IN/OUT
    """
    amsgrad = vmax is not None
    flags = (bool(decoupled), weight_decay != 0, l1 != 0, amsgrad)
    kernel = _specialised(("adam",) + flags, _adam_kernel, *flags)
    ft = p.dtype.type
    bc1 = 1 - beta1 ** step
    bc2_sqrt = math.sqrt(1 - beta2 ** step)
    _launch(kernel, p.size, PARALLEL_MIN["optimizer"], p, g, m, v, vmax if amsgrad else v,
            ft(1 - lr * weight_decay), ft(weight_decay), ft(l1), ft(beta1), ft(1 - beta1),
            ft(beta2), ft(1 - beta2), ft(bc2_sqrt), ft(eps), ft(lr / bc1))


def _rmsprop_kernel(has_wd, has_l1, centered, has_momentum):
    def rmsprop(lo, hi, p, g, sq, buf, cm, lr, rho, c, eps, momentum, wd, l1):
        p, g, sq, buf, cm = p[lo:hi], g[lo:hi], sq[lo:hi], buf[lo:hi], cm[lo:hi]
        for i in range(p.size):
            pi = p[i]
            gi = g[i]
            if has_wd:
                gi = gi + wd * pi
            if has_l1:
                gi = gi + l1 * _sign(pi)
            s = sq[i] * rho + c * (gi * gi)
            sq[i] = s
            if centered:
                mi = cm[i] * rho + c * gi
                cm[i] = mi
                v = s - mi * mi
                den = math.sqrt(_c(v, 0.0) if v < 0 else v)   # rounding: v may be < 0
            else:
                den = math.sqrt(s)
            r = gi / (den + eps)
            if has_momentum:
                b = buf[i] * momentum + r
                buf[i] = b
                p[i] = pi - lr * b
            else:
                p[i] = pi - r * lr

    return _Kernel(_named(rmsprop, *_tags(wd=has_wd, l1=has_l1, centered=centered,
                                          momentum=has_momentum)))


def rmsprop_step(p, g, sq, buf, lr, rho, eps, momentum, centered_mean, weight_decay, l1):
    """One RMSprop step in place (PyTorch's ``torch.optim.RMSprop``), one pass.

    ``g' = g + weight_decay*p + l1*sign(p)``; ``sq = rho*sq + (1-rho)*g'^2``;
    centered: ``cm = rho*cm + (1-rho)*g'``, ``den = sqrt(max(sq - cm^2, 0)) + eps``,
    else ``den = sqrt(sq) + eps``; with ``momentum > 0``:
    ``buf = momentum*buf + g'/den``, ``p -= lr*buf``, else ``p -= lr*g'/den``.

    Parameters
    ----------
    p : ndarray (n,). IN/OUT
    g : ndarray (n,). IN
    sq : ndarray (n,). IN/OUT
    buf : ndarray (n,) or None (when ``momentum == 0``). IN/OUT
    lr, rho, eps, momentum, weight_decay, l1 : float
    centered_mean : ndarray (n,) or None. IN/OUT
    """
    has_momentum = momentum > 0
    centered = centered_mean is not None
    flags = (weight_decay != 0, l1 != 0, centered, has_momentum)
    kernel = _specialised(("rmsprop",) + flags, _rmsprop_kernel, *flags)
    ft = p.dtype.type
    _launch(kernel, p.size, PARALLEL_MIN["optimizer"], p, g, sq, buf if has_momentum else p,
            centered_mean if centered else p, ft(lr), ft(rho), ft(1 - rho), ft(eps),
            ft(momentum), ft(weight_decay), ft(l1))

