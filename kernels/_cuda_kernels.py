"""The ``numba.cuda`` kernels behind ``fastnn.kernels.cuda``.

Imported only by ``fastnn.kernels.cuda`` once it has found numba-cuda and a
GPU (or the simulator, ``NUMBA_ENABLE_CUDASIM=1``). Nothing here allocates or
copies: the host wrappers in ``cuda.py`` do that and choose launch shapes.

Every formula is written once, as a device function: the activations and
their derivatives, the regulariser of the optimizers, the block reductions.
``build(dtype)`` instantiates all kernels for float32 or float64 with constants
of that dtype, so a float32 kernel computes in float32 (a bare Python literal
would promote it to float64 on the GPU); only the loss sums accumulate in
float64, as the reference does.

Launch conventions (the wrappers keep them):

* 1-D kernels run ``BLOCK`` threads per block (a power of two: the block
  reductions rely on it); elementwise ones are grid-stride loops, so any grid
  covers any size.
* ``gemm`` runs ``(TS, TS)`` threads per block on a grid of
  ``(ceil(m/BM), min(ceil(n/BM), 65535))`` blocks (``cuda.gemm_grid``): row
  tiles on ``x``, which takes any batch; a block strides over the column
  tiles beyond ``gridDim.y``.
* ``column_sum`` runs ``(CW, RW)`` threads per block on ``ceil(n/CW)`` blocks.
* Row kernels (softmax, softmax cross-entropy) run one block per row.
"""

import functools
import math

import numpy as np
from numba import cuda
from numba.cuda.core import config as _config

SIMULATOR = bool(_config.ENABLE_CUDASIM)

# The simulator runs every thread of a block as a Python thread: small blocks.
if SIMULATOR:
    BLOCK = 8      # threads of 1-D kernels
    TS, R = 4, 2   # GEMM: TS x TS threads, each R x R outputs
    BK = 4         # GEMM: depth of a k tile
    CW, RW = 4, 2  # column_sum: columns x row-lanes per block
else:
    BLOCK = 256
    TS, R = 16, 4
    BK = 16
    CW, RW = 32, 8
BM = TS * R                      # GEMM block tile: BM x BM outputs
BM_PAD = BM + 1                  # shared tile row length: stores along k hit distinct banks
LOADS = (BM * BK) // (TS * TS)   # tile elements each thread loads per operand
assert LOADS * TS * TS == BM * BK

#: Activation codes, in ``reference.ACTIVATIONS`` order. Codes below
#: ``FIRST_Z`` differentiate from the output ``y``, the rest from ``z``.
ACT_CODES = {"identity": 0, "relu": 1, "sigmoid": 2, "tanh": 3,
             "leaky_relu": 4, "gelu": 5, "silu": 6, "softplus": 7}
FIRST_Z = 4

#: GEMM epilogues.
EPI_STORE, EPI_FORWARD, EPI_DELTA = 0, 1, 2

LEAKY_SLOPE = 0.01
GELU_C = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715

_NB_TYPES = {np.dtype(np.float32): cuda.float32, np.dtype(np.float64): cuda.float64}
_built = {}


def _quiet(fn):
    """``fn`` under ``np.errstate(all="ignore")``: simulated kernels compute
    with NumPy scalars, which warn where a GPU silently gives IEEE results
    (``inf - inf``, ``0 * inf``); NumPy's error state is per thread, so the
    caller's does not reach the simulator's threads."""
    @functools.wraps(fn)
    def quiet(*args):
        with np.errstate(all="ignore"):
            return fn(*args)
    return quiet


#: The decorator of every kernel (``cuda.jit``; quiet under the simulator).
kernel = (lambda fn: cuda.jit(_quiet(fn))) if SIMULATOR else cuda.jit


def kernels(dtype):
    """The kernel set for ``dtype`` (float32 or float64), built on first use."""
    ks = _built.get(dtype)
    if ks is None:
        ks = _built[dtype] = build(np.dtype(dtype))
    return ks


class KernelSet:
    """The device functions and kernels of one dtype (attributes)."""

    def __init__(self, dtype, **items):
        self.dtype = dtype
        self.__dict__.update(items)


def build(dtype):
    """Compile-on-first-call kernels for ``dtype`` with constants of that dtype.

    Returns
    -------
    KernelSet
    """
    F = dtype.type
    DT = _NB_TYPES[dtype]
    F64 = cuda.float64
    ZERO, ONE, TWO = F(0), F(1), F(2)
    SLOPE = F(LEAKY_SLOPE)
    GC, GA, GA3 = F(GELU_C), F(GELU_A), F(3 * GELU_A)
    NEG_INF = F(-np.inf)
    ZERO64 = np.float64(0)

    # ------------------------------------------------------------ scalar math

    @cuda.jit(device=True)
    def maximum(a, b):
        """``np.maximum``: the larger of two, NaN if either is NaN."""
        if a != a:
            return a
        if b != b:
            return b
        return a if a > b else b

    @cuda.jit(device=True)
    def sign(p):
        """``np.sign``: 1, -1, 0, or NaN for NaN."""
        if p > ZERO:
            return ONE
        if p < ZERO:
            return -ONE
        return p * ZERO   # 0 for +-0, NaN for NaN

    @cuda.jit(device=True)
    def sigmoid(z):
        """``1/(1+exp(-z))`` as ``num/(1+e)``, ``e = exp(-|z|)``, ``num = 1``
        for ``z >= 0`` else ``e``: no overflow, full relative accuracy in the
        negative tail."""
        e = math.exp(-abs(z))
        num = ONE if z >= ZERO else e
        return num / (ONE + e)

    @cuda.jit(device=True)
    def softplus(z):
        """``log1p(exp(-|z|)) + max(z, 0)``."""
        return math.log1p(math.exp(-abs(z))) + maximum(z, ZERO)

    @cuda.jit(device=True)
    def gelu_halves(z):
        """``(s, q) = ((1 + t)/2, (1 - t)/2)`` for ``t = tanh(u)``,
        ``u = c*(z + a*z^3)`` (evaluated as ``((a*z*z + 1)*z)*c``), i.e.
        ``s = sigmoid(2u)``, ``q = sigmoid(-2u)``, from one ``e = exp(-2|u|)``.
        Written so, GELU and its derivative keep their relative accuracy in
        the negative tail, where ``1 + t`` cancels (the float32 reference's
        ``t + 1`` there is off by up to ~1e-6 absolute, for values ~1e-7)."""
        u = (z * z * GA + ONE) * z * GC
        e = math.exp(-TWO * abs(u))
        r = ONE / (ONE + e)
        if u >= ZERO:
            return r, e * r
        return e * r, r

    @cuda.jit(device=True)
    def act_forward(act, z):
        """``act(z)`` for an activation code (see ``ACT_CODES``)."""
        if act == 0:
            return z
        if act == 1:
            return maximum(z, ZERO)
        if act == 2:
            return sigmoid(z)
        if act == 3:
            return math.tanh(z)
        if act == 4:
            return maximum(z, z * SLOPE)
        if act == 5:
            # 0.5*z*(1 + tanh(u)) = z*s
            s, q = gelu_halves(z)
            return z * s
        if act == 6:
            return z * sigmoid(z)
        return softplus(z)

    @cuda.jit(device=True)
    def act_derivative(act, z, y):
        """``act'``: from the output ``y`` for codes below ``FIRST_Z``
        (identity 1, relu ``y > 0``, sigmoid ``y*(1-y)``, tanh ``1 - y^2``),
        else from ``z`` (leaky_relu 1 or 0.01, gelu, silu ``s*(1 + z*(1-s))``,
        softplus ``sigmoid(z)``)."""
        if act == 0:
            return ONE
        if act == 1:
            return ONE if y > ZERO else ZERO
        if act == 2:
            return y * (ONE - y)
        if act == 3:
            return ONE - y * y
        if act == 4:
            return ONE if z > ZERO else SLOPE
        if act == 5:
            # 0.5*(1+t) + 0.5*z*(1-t^2)*c*(1 + 3a*z^2), with 1+t = 2s and
            # 1-t^2 = 4*s*q: s*(1 + 2*z*q*c*(1 + 3a*z^2))
            s, q = gelu_halves(z)
            return s * (ONE + TWO * z * q * GC * (z * z * GA3 + ONE))
        if act == 6:
            s = sigmoid(z)
            return ((ONE - s) * z + ONE) * s
        return sigmoid(z)

    @cuda.jit(device=True)
    def derivative_at(act, z, y, i):
        """``act'`` at flat index ``i``, reading only the array it needs."""
        if act < FIRST_Z:
            return act_derivative(act, ZERO, y[i])
        return act_derivative(act, z[i], ZERO)

    @cuda.jit(device=True)
    def store_forward(acc, bj, act, out, preact, has_preact, i):
        """Epilogue of ``dense_forward`` at flat index ``i``:
        ``z = acc + b_j``; ``preact[i] = z`` when kept; ``out[i] = act(z)``."""
        z = acc + bj
        if has_preact:
            preact[i] = z
        out[i] = act_forward(act, z)

    @cuda.jit(device=True)
    def store_delta(acc, act, z, y, out, i):
        """Epilogue of ``backprop_delta`` (and ``activation_backward``):
        ``out[i] = acc * act'``."""
        out[i] = acc * derivative_at(act, z, y, i)

    @cuda.jit(device=True)
    def regularize(p, g, wd, l1):
        """``g' = g + wd*p + l1*sign(p)``; a zero term is skipped, not added
        (``0*inf`` would be NaN)."""
        if wd != ZERO:
            g = g + wd * p
        if l1 != ZERO:
            g = g + l1 * sign(p)
        return g

    # ------------------------------------------------------------ block reductions

    @cuda.jit(device=True)
    def block_reduce(sh, v, take_max):
        """Sum (or NaN-propagating max) of ``v`` over the ``BLOCK`` threads of
        a 1-D block, through the shared array ``sh`` (``BLOCK`` long); every
        thread gets the result. All threads must call it."""
        t = cuda.threadIdx.x
        sh[t] = v
        cuda.syncthreads()
        s = BLOCK // 2
        while s > 0:
            if t < s:
                if take_max:
                    sh[t] = maximum(sh[t], sh[t + s])
                else:
                    sh[t] = sh[t] + sh[t + s]
            cuda.syncthreads()
            s //= 2
        r = sh[0]
        cuda.syncthreads()
        return r

    @cuda.jit(device=True)
    def row_max_sum(z, i, sh):
        """Row ``i`` of ``z`` in one block: ``m = max_j z_ij`` and
        ``s = sum_j exp(z_ij - m)``."""
        t = cuda.threadIdx.x
        c = z.shape[1]
        m = NEG_INF
        for j in range(t, c, BLOCK):
            m = maximum(m, z[i, j])
        m = block_reduce(sh, m, True)
        s = ZERO
        for j in range(t, c, BLOCK):
            s += math.exp(z[i, j] - m)
        s = block_reduce(sh, s, False)
        return m, s

    # ------------------------------------------------------------ elementwise

    @kernel
    def fill(a, value):
        """``a[:] = value`` (1-D)."""
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, a.size, stride):
            a[i] = value

    @kernel
    def activation_forward(act, z, out):
        """``out = act(z)`` (1-D; ``out`` may be ``z``)."""
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, out.size, stride):
            out[i] = act_forward(act, z[i])

    @kernel
    def activation_backward(act, dy, z, y, out):
        """``out = dy * act'`` (1-D; ``out`` may be ``dy``; the unused one of
        ``z``, ``y`` may be any array)."""
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, out.size, stride):
            store_delta(dy[i], act, z, y, out, i)

    @kernel
    def bias_activation(zin, b, act, out, preact, has_preact):
        """``dense_forward``'s epilogue after a cuBLAS GEMM (flat ``(m, n)``
        arrays, ``n = b.size``): ``z = zin + b``, ``preact = z``, ``out = act(z)``.
        ``zin`` is ``out`` or ``preact``."""
        start, stride = cuda.grid(1), cuda.gridsize(1)
        n = b.size
        for i in range(start, out.size, stride):
            store_forward(zin[i], b[i % n], act, out, preact, has_preact, i)

    @kernel
    def column_sum(a, out):
        """``out = a.sum(0)`` for a 2-D ``a``: ``(CW, RW)`` threads per block,
        a column per x-lane, rows split over the y-lanes, then a shared-memory
        sum; accumulated in float64, rounded once."""
        sh = cuda.shared.array((RW, CW), F64)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        j = cuda.blockIdx.x * CW + tx
        rows, cols = a.shape
        s = ZERO64
        if j < cols:
            for r in range(ty, rows, RW):
                s += F64(a[r, j])
        sh[ty, tx] = s
        cuda.syncthreads()
        h = RW // 2
        while h > 0:
            if ty < h:
                sh[ty, tx] += sh[ty + h, tx]
            cuda.syncthreads()
            h //= 2
        if ty == 0 and j < cols:
            out[j] = F(sh[0, tx])

    # ------------------------------------------------------------ GEMM

    @kernel
    def gemm(a, b, ta, tb, epi, act, bias, out, preact, has_preact, z, y):
        """``C = op(a) @ op(b)`` with a fused epilogue; ``op(a) = a.T`` when
        ``ta`` (``a`` stored ``(k, m)``), else ``a`` (``(m, k)``); likewise
        ``tb``. Tiled in shared memory: a block computes a ``BM x BM`` tile of
        ``C``, each thread ``R x R`` outputs strided by ``TS`` (conflict-free
        shared reads, coalesced stores). ``out``, ``preact``, ``z``, ``y`` are
        the flat ``(m, n)`` arrays of the epilogue ``epi``:
        ``EPI_STORE`` ``out = C``; ``EPI_FORWARD`` ``store_forward``
        (bias ``bias``); ``EPI_DELTA`` ``store_delta``."""
        As = cuda.shared.array((BK, BM_PAD), DT)
        Bs = cuda.shared.array((BK, BM_PAD), DT)
        acc = cuda.local.array((R, R), DT)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        tid = ty * TS + tx
        row0 = cuda.blockIdx.x * BM
        if ta:
            k, m = a.shape
        else:
            m, k = a.shape
        n = b.shape[0] if tb else b.shape[1]
        for col0 in range(cuda.blockIdx.y * BM, n, cuda.gridDim.y * BM):   # column tiles
            for i in range(R):
                for j in range(R):
                    acc[i, j] = ZERO
            for k0 in range(0, k, BK):
                for load in range(LOADS):
                    e = tid + load * TS * TS
                    # op(a)[row0 + r, k0 + kk], read along the contiguous axis
                    if ta:
                        r, kk = e % BM, e // BM
                        v = ZERO
                        if row0 + r < m and k0 + kk < k:
                            v = a[k0 + kk, row0 + r]
                    else:
                        kk, r = e % BK, e // BK
                        v = ZERO
                        if row0 + r < m and k0 + kk < k:
                            v = a[row0 + r, k0 + kk]
                    As[kk, r] = v
                    # op(b)[k0 + kk, col0 + c]
                    if tb:
                        kk, c = e % BK, e // BK
                        v = ZERO
                        if col0 + c < n and k0 + kk < k:
                            v = b[col0 + c, k0 + kk]
                    else:
                        c, kk = e % BM, e // BM
                        v = ZERO
                        if col0 + c < n and k0 + kk < k:
                            v = b[k0 + kk, col0 + c]
                    Bs[kk, c] = v
                cuda.syncthreads()
                for kk in range(BK):
                    for i in range(R):
                        av = As[kk, ty + i * TS]
                        for j in range(R):
                            acc[i, j] += av * Bs[kk, tx + j * TS]
                cuda.syncthreads()
            for i in range(R):
                row = row0 + ty + i * TS
                if row < m:
                    for j in range(R):
                        col = col0 + tx + j * TS
                        if col < n:
                            idx = row * n + col
                            if epi == EPI_FORWARD:
                                store_forward(acc[i, j], bias[col], act, out, preact,
                                              has_preact, idx)
                            elif epi == EPI_DELTA:
                                store_delta(acc[i, j], act, z, y, out, idx)
                            else:
                                out[idx] = acc[i, j]

    # ------------------------------------------------------------ losses

    @kernel
    def mean_of_partials(partials, count, divisor, result):
        """``result[0] = sum(partials[:count]) / divisor`` in float64, one block."""
        sh = cuda.shared.array(BLOCK, F64)
        t = cuda.threadIdx.x
        s = ZERO64
        for i in range(t, count, BLOCK):
            s += partials[i]
        s = block_reduce(sh, s, False)
        if t == 0:
            result[0] = s / divisor

    @kernel
    def softmax_cross_entropy(logits, labels, grad, partials):
        """One block per row ``i``: ``m``, ``s`` by shared-memory reductions,
        ``grad_i = (exp(z_i - m)/s - onehot) / batch`` and
        ``partials[i] = log(s) - (z_{i,label} - m)`` (row loss, as float64)."""
        sh = cuda.shared.array(BLOCK, DT)
        i = cuda.blockIdx.x
        t = cuda.threadIdx.x
        batch, c = logits.shape
        m, s = row_max_sum(logits, i, sh)
        label = labels[i]
        nb = F(batch)
        for j in range(t, c, BLOCK):
            g = math.exp(logits[i, j] - m) / s
            if j == label:
                g -= ONE
            grad[i, j] = g / nb
        if t == 0:
            partials[i] = F64(math.log(s) - (logits[i, label] - m))

    @kernel
    def softmax(z, out):
        """One block per row: ``out_i = exp(z_i - m) / s`` (``out`` may be ``z``)."""
        sh = cuda.shared.array(BLOCK, DT)
        i = cuda.blockIdx.x
        m, s = row_max_sum(z, i, sh)
        for j in range(cuda.threadIdx.x, z.shape[1], BLOCK):
            out[i, j] = math.exp(z[i, j] - m) / s

    @kernel
    def sigmoid_bce(z, t, grad, partials):
        """Grid-stride over flat arrays: ``grad = (sigmoid(z) - t) / n``;
        ``partials[block]`` = block sum of ``softplus(z) - z*t`` in float64."""
        sh = cuda.shared.array(BLOCK, F64)
        start, stride = cuda.grid(1), cuda.gridsize(1)
        n = z.size
        nf = F(n)
        s = ZERO64
        for i in range(start, n, stride):
            zi, ti = z[i], t[i]
            s += F64(softplus(zi) - zi * ti)
            grad[i] = (sigmoid(zi) - ti) / nf
        s = block_reduce(sh, s, False)
        if cuda.threadIdx.x == 0:
            partials[cuda.blockIdx.x] = s

    @kernel
    def mse(pred, target, grad, scale, partials):
        """Grid-stride over flat arrays: ``d = pred - target``;
        ``grad = d*scale`` (``scale = 2/n``; ``grad`` may be ``pred`` or ``target``);
        ``partials[block]`` = block sum of ``d^2`` in float64."""
        sh = cuda.shared.array(BLOCK, F64)
        start, stride = cuda.grid(1), cuda.gridsize(1)
        s = ZERO64
        for i in range(start, pred.size, stride):
            d = pred[i] - target[i]
            s += F64(d * d)
            grad[i] = d * scale
        s = block_reduce(sh, s, False)
        if cuda.threadIdx.x == 0:
            partials[cuda.blockIdx.x] = s

    @kernel
    def count_correct(logits, labels, partials):
        """Rows whose prediction equals the label (``partials[block]`` = the
        block's count): ``argmax == label`` (first maximum, NaN counting as
        the largest, as ``np.argmax``), or for one column ``(z > 0) == (label > 0.5)``."""
        sh = cuda.shared.array(BLOCK, F64)
        start, stride = cuda.grid(1), cuda.gridsize(1)
        rows, c = logits.shape
        s = ZERO64
        for i in range(start, rows, stride):
            if c == 1:
                hit = (logits[i, 0] > ZERO) == (labels[i] > 0.5)
            else:
                best = logits[i, 0]
                arg = 0
                for j in range(1, c):
                    v = logits[i, j]
                    if best == best and (v > best or v != v):
                        best = v
                        arg = j
                hit = arg == labels[i]
            if hit:
                s += 1.0
        s = block_reduce(sh, s, False)
        if cuda.threadIdx.x == 0:
            partials[cuda.blockIdx.x] = s

    # ------------------------------------------------------------ optimizers

    @kernel
    def sgd(p, g, buf, lr, momentum, nesterov, wd, l1):
        """``g' = g + wd*p + l1*sign(p)``; with ``momentum > 0``
        ``buf = momentum*buf + g'``, ``d = g' + momentum*buf`` (Nesterov) or
        ``buf``; else ``d = g'``; ``p -= lr*d``. One read and write of each array."""
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, p.size, stride):
            pv = p[i]
            d = regularize(pv, g[i], wd, l1)
            if momentum != ZERO:
                bv = buf[i] * momentum + d
                buf[i] = bv
                d = d + momentum * bv if nesterov else bv
            p[i] = pv - lr * d

    @kernel
    def adam(p, g, m, v, vmax, has_vmax, wd, l1, decay, has_decay,
             beta1, c1, beta2, c2, bc2_sqrt, eps, step_size):
        """Adam / AdamW / AMSGrad: ``g' = g + wd*p + l1*sign(p)`` (``wd = 0``
        for AdamW, which instead scales ``p *= decay = 1 - lr*weight_decay``);
        ``m = beta1*m + c1*g'``, ``v = beta2*v + c2*g'^2`` (``c = 1 - beta``);
        AMSGrad ``vmax = max(vmax, v)`` replaces ``v``;
        ``p -= step_size * m / (sqrt(v)/bc2_sqrt + eps)`` with
        ``step_size = lr/(1-beta1^t)``, ``bc2_sqrt = sqrt(1-beta2^t)``."""
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, p.size, stride):
            pv = p[i]
            gp = regularize(pv, g[i], wd, l1)
            if has_decay:
                pv = pv * decay
            mv = m[i] * beta1 + c1 * gp
            vv = v[i] * beta2 + c2 * (gp * gp)
            m[i] = mv
            v[i] = vv
            if has_vmax:
                vv = maximum(vmax[i], vv)
                vmax[i] = vv
            den = math.sqrt(vv) / bc2_sqrt + eps
            p[i] = pv - mv / den * step_size

    @kernel
    def rmsprop(p, g, sq, buf, cm, lr, rho, c, eps, momentum, centered, wd, l1):
        """``g' = g + wd*p + l1*sign(p)``; ``sq = rho*sq + c*g'^2`` (``c = 1-rho``);
        centered: ``cm = rho*cm + c*g'``, ``den = sqrt(max(sq - cm^2, 0)) + eps``, else
        ``den = sqrt(sq) + eps``; with ``momentum > 0``
        ``buf = momentum*buf + g'/den``, ``p -= lr*buf``; else ``p -= lr*g'/den``."""
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, p.size, stride):
            pv = p[i]
            gp = regularize(pv, g[i], wd, l1)
            sv = sq[i] * rho + c * (gp * gp)
            sq[i] = sv
            if centered:
                cv = cm[i] * rho + c * gp
                cm[i] = cv
                sv = sv - cv * cv
                if sv < ZERO:       # >= 0 exactly; rounding may make it negative
                    sv = ZERO
            r = gp / (math.sqrt(sv) + eps)
            if momentum != ZERO:
                r = buf[i] * momentum + r
                buf[i] = r
            p[i] = pv - lr * r

    jitted = (type(fill), type(maximum))
    return KernelSet(dtype, **{name: obj for name, obj in locals().items()
                               if isinstance(obj, jitted)})
