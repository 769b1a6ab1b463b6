"""The gate of ``fastnn.ops``, fast: each kernel described once, checked in C.

``fastnn._validate`` defines the gate: every check and every message. Checking
in Python costs 8-20 us a call, more than the kernels at the sizes of a
training step, so ``fastnn.ops`` runs the same checks compiled
(``fastnn.kernels._cy_gate``), from the description of each kernel below, and
calls the Python gate only for what the compiled checks do not accept (a bad
argument, whose error and message come from there; or an unusual good one: a
NumPy scalar for a float, a big-endian array, a CUDA array). A kernel without
a description, or an environment without the compiled module, takes the
Python gate on every call.

A description has one line per parameter, in the order of the kernel's
signature, then lines for the rules between them::

    NAME float DIMS [out] [optional | if_z | if_y | if:PARAM>0] [unit]
    NAME int32 DIMS [out] [below:A*B]     an int32 array (maxpool's argmax)
    NAME index DIMS below:A               any integer array, values in [0, A)
    NAME any A * [rows]                   a bool, integer or float array; ``rows``:
                                          each row one contiguous block, the rows at
                                          any stride (instead of C-contiguous)
    NAME act | bool | uint64              an activation name, a bool, a uint64 (seed)
    NAME real >=0 | >0 | [0,1)            a finite real in that range
    NAME int >=1
    NAME ints A B... >=1 [default:C,D]    a tuple/list of ints, bound to A, B...
                                          (None: take C, D's values)
    in_place                              an output may be exactly an input
    returns_float                         the loss kernels
    blas A B*C D                          each product a 32-bit GEMM dimension
    requires PARAM PARAM2>0               bool PARAM True needs PARAM2 > 0
    outsize P H K S [A B]                 P = (H + A + B - K) // S + 1 >= 1
    less A B                              A < B

DIMS are shape symbols (upper case), bound by the first array that has them
and checked against the rest, or ``...``: any rank, the shape of the first
such array of the call (elementwise kernels), or ``A *``: the first axis A,
the others those of the first such array of the call (gather_rows). Every
dimension is >= 1; every array is C-contiguous (or ``rows``) and aligned;
outputs are writable and overlap nothing (``in_place``: or are an input
exactly); all float arrays share a dtype.
"""

import functools
import inspect
import re

from . import _backend, _validate
from .kernels import reference

SPECS = {
    "dense_forward": """
        x       float B I
        w       float I O
        b       float O
        act     act
        out     float B O out
        preact  float B O out optional
        blas B I O
    """,
    "activation_forward": """
        act     act
        z       float ...
        out     float ... out
        in_place
    """,
    "activation_backward": """
        act     act
        dy      float ...
        z       float ... if_z
        y       float ... if_y
        out     float ... out
        in_place
    """,
    "backprop_delta": """
        dy      float B O
        w       float I O
        z       float B I if_z
        y       float B I if_y
        act     act
        out     float B I out
        blas B I O
    """,
    "dense_backward": """
        x       float B I
        dz      float B O
        dw      float I O out
        db      float O out
        blas B I O
    """,
    "softmax_cross_entropy": """
        logits  float B C
        labels  index B below:C
        grad    float B C out
        returns_float
    """,
    "sigmoid_binary_cross_entropy": """
        logits  float ...
        targets float ... unit
        grad    float ... out
        returns_float
    """,
    "mse": """
        pred    float ...
        target  float ...
        grad    float ... out
        in_place
        returns_float
    """,
    "softmax": """
        z       float B C
        out     float B C out
        in_place
    """,
    "sgd_step": """
        p       float N out
        g       float N
        buf     float N out if:momentum>0
        lr      real >=0
        momentum real >=0
        nesterov bool
        weight_decay real >=0
        l1      real >=0
        requires nesterov momentum>0
    """,
    "adam_step": """
        p       float N out
        g       float N
        m       float N out
        v       float N out
        step    int >=1
        lr      real >=0
        beta1   real [0,1)
        beta2   real [0,1)
        eps     real >0
        weight_decay real >=0
        decoupled bool
        l1      real >=0
        vmax    float N out optional
    """,
    "rmsprop_step": """
        p       float N out
        g       float N
        sq      float N out
        buf     float N out if:momentum>0
        lr      real >=0
        rho     real [0,1)
        eps     real >0
        momentum real >=0
        centered_mean float N out optional
        weight_decay real >=0
        l1      real >=0
    """,
    # NHWC convolutions and pools (issue 15): see fastnn._validate
    "conv2d_forward": """
        x       float N H W C
        w       float KH KW C O
        b       float O
        act     act
        out     float N P Q O out
        preact  float N P Q O out optional
        stride  ints SH SW >=1
        padding ints PT PB PL PR >=0
        less PT KH
        less PB KH
        less PL KW
        less PR KW
        outsize P H KH SH PT PB
        outsize Q W KW SW PL PR
        blas N*P*Q KH*KW*C O
    """,
    "conv2d_backward": """
        x       float N H W C
        dz      float N P Q O
        dw      float KH KW C O out
        db      float O out
        stride  ints SH SW >=1
        padding ints PT PB PL PR >=0
        less PT KH
        less PB KH
        less PL KW
        less PR KW
        outsize P H KH SH PT PB
        outsize Q W KW SW PL PR
        blas N*P*Q KH*KW*C O
    """,
    "conv2d_backprop": """
        dz      float N P Q O
        w       float KH KW C O
        z       float N H W C if_z
        y       float N H W C if_y
        act     act
        out     float N H W C out
        stride  ints SH SW >=1
        padding ints PT PB PL PR >=0
        less PT KH
        less PB KH
        less PL KW
        less PR KW
        outsize P H KH SH PT PB
        outsize Q W KW SW PL PR
        blas N*P*Q KH*KW*C O
    """,
    "maxpool2d_forward": """
        x       float N H W C
        out     float N P Q C out
        argmax  int32 N P Q C out
        pool    ints PH PW >=1
        stride  ints SH SW >=1 default:PH,PW
        outsize P H PH SH
        outsize Q W PW SW
    """,
    "maxpool2d_backward": """
        dy      float N P Q C
        argmax  int32 N P Q C below:PH*PW
        z       float N H W C if_z
        y       float N H W C if_y
        act     act
        out     float N H W C out
        pool    ints PH PW >=1
        stride  ints SH SW >=1 default:PH,PW
        outsize P H PH SH
        outsize Q W PW SW
    """,
    "dropout_forward": """
        x       float ...
        rate    real [0,1)
        seed    uint64
        out     float ... out
        in_place
    """,
    # data movement (issue 17)
    "gather_rows": """
        src     any R * rows
        index   index N below:R
        out     float N * out
    """,
    "dropout_backward": """
        dy      float ...
        rate    real [0,1)
        seed    uint64
        out     float ... out
        in_place
    """,
}

#: Contract kernels left to the Python gate on every call (none now: a kernel
#: whose checks no description expresses would be listed here).
PYTHON_GATE = ()

try:
    from .kernels import _cy_gate
except ImportError:        # not built (a pure-Python checkout): the Python gate alone
    _cy_gate = None

# the codes of fastnn.kernels._cy_gate
_KINDS = {"float": 1, "int32": 2, "index": 3, "any": 4, "act": 5, "real": 6, "bool": 7,
          "int": 8, "uint64": 9, "ints": 10}
_F_OUT, _F_NONE, _F_IF_Z, _F_IF_Y, _F_IF_POS, _F_LIKE, _F_UNIT, _F_BELOW, _F_ROWS, _F_TAIL = (
    1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_R_BLAS, _R_NEEDS_POS, _R_OUTSIZE, _R_LESS = 1, 2, 3, 4
_RANGE = re.compile(r"^([\[(])([-+\d.e]+),([-+\d.e]+)([\])])$|^(>=|>)([-+\d.e]+)$")


def compile_spec(kernel, text):
    """The description of ``kernel`` as the plain data ``_cy_gate.Op`` takes:
    ``{"params": [dict per parameter], "rules": [(op, operands, groups)],
    "in_place": bool, "returns_float": bool}``.

    Raises ``ValueError`` when the parameters are not those of the kernel's
    signature in ``kernels/reference.py``, in order, or a line is not understood.
    """
    signature = list(inspect.signature(getattr(reference, kernel)).parameters)
    symbols = {}
    params, rules, names = [], [], []
    spec = {"params": params, "rules": rules, "in_place": False, "returns_float": False}

    def sym(s):
        if not re.fullmatch(r"[A-Z][A-Z0-9]*", s):
            raise ValueError(f"{kernel}: {s!r} is not a shape symbol")
        return symbols.setdefault(s, len(symbols))

    def param_index(s):
        if s not in signature:
            raise ValueError(f"{kernel}: {s!r} is not a parameter")
        return signature.index(s)

    for line in (ln.split() for ln in text.strip().splitlines()):
        head, rest = line[0], line[1:]
        if head in ("in_place", "returns_float"):
            spec[head] = True
        elif head == "blas":
            rules.append((_R_BLAS, (), tuple(tuple(sym(f) for f in g.split("*")) for g in rest)))
        elif head == "requires":
            flag, cond = rest
            other = cond.removesuffix(">0")
            rules.append((_R_NEEDS_POS, (param_index(flag), param_index(other)), ()))
        elif head == "outsize":
            out, size, k, s, *pads = rest
            pads = [sym(p) for p in pads] + [-1] * (2 - len(pads))
            rules.append((_R_OUTSIZE, (sym(out), sym(size), sym(k), sym(s), *pads), ()))
        elif head == "less":
            rules.append((_R_LESS, (sym(rest[0]), sym(rest[1])), ()))
        else:
            params.append(_param(kernel, head, rest, sym, param_index))
            names.append(head)
    if names != signature:
        raise ValueError(f"{kernel}: the description has parameters {names}, the kernel "
                         f"{signature}")
    return spec


def _param(kernel, name, words, sym, param_index):
    kind, words = words[0], words[1:]
    if kind not in _KINDS:
        raise ValueError(f"{kernel}: unknown kind {kind!r} of {name}")
    d = {"kind": _KINDS[kind], "flags": 0}
    dims = []
    for w in words:
        if w == "...":
            d["flags"] |= _F_LIKE
        elif w == "*":
            d["flags"] |= _F_TAIL
        elif w == "rows":
            d["flags"] |= _F_ROWS
        elif re.fullmatch(r"[A-Z][A-Z0-9]*", w):
            dims.append(sym(w))
        elif w == "out":
            d["flags"] |= _F_OUT
        elif w == "optional":
            d["flags"] |= _F_NONE
        elif w == "if_z":
            d["flags"] |= _F_IF_Z
        elif w == "if_y":
            d["flags"] |= _F_IF_Y
        elif w.startswith("if:") and w.endswith(">0"):
            d["flags"] |= _F_IF_POS
            d["ref"] = param_index(w[3:-2])
        elif w == "unit":
            d["flags"] |= _F_UNIT
        elif w.startswith("below:"):
            d["flags"] |= _F_BELOW
            d["below"] = tuple(sym(s) for s in w[6:].split("*"))
        elif w.startswith("default:"):
            d["flags"] |= _F_NONE
            d["default"] = tuple(sym(s) for s in w[8:].split(","))
        elif _RANGE.match(w):
            m = _RANGE.match(w)
            if m.group(5):
                low = float(m.group(6))
                d.update(low=low, low_open=m.group(5) == ">", ilow=int(low))
            else:
                d.update(low=float(m.group(2)), low_open=m.group(1) == "(",
                         high=float(m.group(3)), high_open=m.group(4) == ")")
        else:
            raise ValueError(f"{kernel}: cannot read {w!r} of {name}")
    d["dims"] = tuple(dims)
    return d


def _python_op(name, check):
    def run(*args):
        check(*args)
        return getattr(_backend.current(), name)(*args)
    return run


#: name -> the callable behind ``fastnn.ops.<name>`` (an ``_cy_gate.Op`` when built)
OPS = {}


def make_op(name):
    """The callable behind ``fastnn.ops.<name>``: takes every parameter
    positionally, checks, dispatches, returns the kernel's result."""
    check = getattr(_validate, name)
    if _cy_gate is None:
        return _python_op(name, check)
    spec = compile_spec(name, SPECS[name]) if name in SPECS else None
    return _cy_gate.Op(name, reference.CONTRACT.index(name), check, spec)


def function(name, module):
    """``fastnn.ops.<name>``: a function with the reference kernel's signature,
    docstring and name, that passes every argument positionally to
    :func:`make_op`'s callable (so the gate needs no keyword handling)."""
    ref = getattr(reference, name)
    params = list(inspect.signature(ref).parameters)
    OPS[name] = run = make_op(name)
    namespace = {"_run": run}
    # generated as namedtuple and dataclasses do, so that the call is one frame
    exec(f"def {name}({', '.join(params)}):\n    return _run({', '.join(params)})\n", namespace)
    fn = functools.wraps(ref)(namespace[name])
    fn.__defaults__ = ref.__defaults__
    fn.__module__ = module
    return fn


if _cy_gate is not None:
    _cy_gate.setup(_backend, reference.CONTRACT, reference.ACTIVATIONS,
                   reference.Y_ACTIVATIONS)
    _backend._CHANGED.append(_cy_gate.forget)
