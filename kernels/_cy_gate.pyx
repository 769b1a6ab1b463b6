# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The compiled gate of ``fastnn.ops``: checks and dispatch of one kernel call in C.

``fastnn._validate`` is the gate's definition: every check, every message.
This module is its fast path. An :class:`Op` holds one kernel's description
(``fastnn._gate.SPECS``, compiled here into C structs) and, per call, reads the
arguments at C level (the NumPy array struct: type number, byte order, flags,
dimensions, data pointer; exact ``float``/``int``/``bool``/``str`` scalars) with
no Python object made on the way: dtypes, shapes (symbols bound across the
arrays of the call), C-contiguity, alignment, writability of outputs, overlap
of outputs with inputs and with each other (from data pointers and extents),
scalar ranges, label and index ranges and BCE targets in ``[0, 1]`` (a pass
over the data). Anything it does not accept (a bad argument, or only an
unusual one: a NumPy scalar, a big-endian array, a CUDA array) goes to the
Python gate, which accepts it or raises today's error with today's message.
The fast path therefore only ever accepts calls the Python gate accepts (the
tests hold it to that); it need not reject everything the Python gate would.

Dispatch: the kernels of a backend are resolved once into a :class:`Table`
(kept on the ``Backend`` object; a kernel set on it later drops the table);
per call, the backend in effect is the ``use_backend`` of this context or
else the process default, looked up by name among the loaded backends. A
table entry with a C entry point (``ENTRIES`` of the backend module, see
``_cy_call.pxd``) is called with the checked call's struct; otherwise the
backend's Python kernel is called with the arguments.

Built once (no per-CPU variants: nothing here is vector arithmetic worth a
``-march`` build); ``fastnn._gate`` falls back to the Python gate when this
module is not built.
"""

from cpython.object cimport PyObject
from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_IsValid
from cpython.contextvars cimport get_value
from libc.math cimport isfinite
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free

from _cy_call cimport FASTNN_CALL_CAPSULE, FASTNN_MAXD, FASTNN_MAXP, fastnn_call, fastnn_entry
from _cy_math cimport act_code
from _cy_numpy cimport (
    NPY_ARRAY_ALIGNED, NPY_ARRAY_C_CONTIGUOUS, NPY_ARRAY_WRITEABLE, NPY_DOUBLE, NPY_FLOAT,
    PyArrayObject, PyArray_BYTES, PyArray_Check, PyArray_DESCR, PyArray_DIMS,
    PyArray_Descr, PyArray_FLAGS, PyArray_ISNOTSWAPPED, PyArray_ITEMSIZE, PyArray_NDIM,
    PyArray_SIZE, PyArray_STRIDES, PyArray_TYPE, PyTypeNum_ISBOOL, PyTypeNum_ISFLOAT,
    PyTypeNum_ISINTEGER, _import_array, npy_intp,
)

cdef extern from "Python.h":
    PyObject* PyTuple_GET_ITEM(PyObject* t, Py_ssize_t i)
    Py_ssize_t PyTuple_GET_SIZE(PyObject* t)
    bint PyTuple_Check(PyObject* o)
    bint PyList_Check(PyObject* o)
    PyObject* PyList_GET_ITEM(PyObject* t, Py_ssize_t i)
    Py_ssize_t PyList_GET_SIZE(PyObject* t)
    bint PyFloat_CheckExact(PyObject* o)
    void* Py_TYPE(PyObject* o)
    double PyFloat_AS_DOUBLE(PyObject* o)
    bint PyLong_CheckExact(PyObject* o)
    bint PyUnicode_Check(PyObject* o)
    double PyLong_AsDouble(PyObject* o)
    long long PyLong_AsLongLong(PyObject* o)
    unsigned long long PyLong_AsUnsignedLongLong(PyObject* o)
    PyObject* PyErr_Occurred()
    void PyErr_Clear()
    PyObject* PyDict_GetItem(PyObject* d, PyObject* k)
    PyObject* Py_None
    PyObject* Py_True
    PyObject* Py_False

_import_array()

cdef enum:
    MAXP = FASTNN_MAXP
    MAXD = FASTNN_MAXD
    MAXS = 32           # shape symbols of a kernel
    MAXR = 16           # rules of a kernel
    MAXG = 4            # factor groups of a rule

# parameter kinds
cdef enum:
    K_FLOAT = 1         # float32/float64 array; all of a call share the dtype
    K_INT32 = 2         # int32 array
    K_INDEX = 3         # integer array of any width (labels)
    K_ANY = 4           # bool, integer or floating array (gather_rows' src)
    K_ACT = 5           # activation name
    K_REAL = 6          # finite real in a range
    K_BOOL = 7
    K_INT = 8           # int >= low
    K_UINT64 = 9        # int in [0, 2**64)
    K_INTS = 10         # tuple or list of ints >= low, each bound to a symbol
    K_LAST_ARRAY = K_ANY

# parameter flags
cdef enum:
    F_OUT = 1           # written: writable, must not overlap
    F_NONE = 2          # may be None
    F_IF_Z = 4          # may be None unless the activation's derivative needs z
    F_IF_Y = 8          # may be None unless it needs y
    F_IF_POS = 16       # may be None unless the real parameter ``ref`` is > 0
    F_LIKE = 32         # any rank >= 1, the shape of the first F_LIKE array
    F_UNIT = 64         # values in [0, 1] (NaN passes, as in the Python gate)
    F_BELOW = 128       # integer values in [0, product of the ``below`` group)
    F_ROWS = 256        # each row (all axes after the first) one C-contiguous block, the
                        # rows at any stride, instead of C-contiguous
    F_TAIL = 512        # first axis bound to dims[0], the others those of the first
                        # F_TAIL array of the call (any number, >= 1 each)

# rules
cdef enum:
    R_BLAS = 1          # each group's product <= fastnn._validate._BLAS_MAX
    R_NEEDS_POS = 2     # bool parameter a True => real parameter b > 0
    R_OUTSIZE = 3       # a = (b + e + f - c) // d + 1 >= 1  (e, f: -1 for none)
    R_LESS = 4          # a < b


#: The codes above, for ``fastnn._gate`` (a test holds its copy to them).
CODES = {
    "kinds": {"float": K_FLOAT, "int32": K_INT32, "index": K_INDEX, "any": K_ANY, "act": K_ACT,
              "real": K_REAL, "bool": K_BOOL, "int": K_INT, "uint64": K_UINT64, "ints": K_INTS},
    "flags": {"out": F_OUT, "none": F_NONE, "if_z": F_IF_Z, "if_y": F_IF_Y, "if_pos": F_IF_POS,
              "like": F_LIKE, "unit": F_UNIT, "below": F_BELOW, "rows": F_ROWS, "tail": F_TAIL},
    "rules": {"blas": R_BLAS, "needs_pos": R_NEEDS_POS, "outsize": R_OUTSIZE, "less": R_LESS},
}


ctypedef struct PSpec:
    int kind
    int flags
    int ndim            # fixed-rank arrays; K_INTS: the count
    int dims[MAXD]      # symbols (-1: any size >= 1)
    int defsyms[MAXD]   # K_INTS given as None: take these symbols' values
    int ref             # F_IF_POS: the real parameter
    long long ilow      # K_INT, K_INTS
    double low, high
    bint has_low, has_high, low_open, high_open
    int below[MAXG]     # F_BELOW: symbols of the bound (-1 ends)


ctypedef struct RSpec:
    int op
    int a[6]
    int groups[MAXG][MAXG]   # R_BLAS: symbols of each factor group (-1 ends)


cdef class Table:
    """A backend's kernels in contract order, resolved once: the Python
    callables and, where the backend module exports one, the C entry."""

    cdef readonly object backend
    cdef readonly tuple kernels
    cdef fastnn_entry* entries
    cdef Py_ssize_t n

    def __cinit__(self, backend, tuple names):
        cdef Py_ssize_t i
        self.backend = backend
        self.n = len(names)
        self.entries = <fastnn_entry*>calloc(max(self.n, 1), sizeof(fastnn_entry))
        if self.entries == NULL:
            raise MemoryError()
        kernels = []
        module = getattr(backend, "module", None)
        exported = getattr(module, "ENTRIES", None) or {}
        for i, name in enumerate(names):
            kernel = getattr(backend, name)
            kernels.append(kernel)
            capsule = exported.get(name)
            # only where the backend runs the module's own kernel (not a
            # fallback, not a kernel set on the Backend object)
            if capsule is not None and kernel is getattr(module, name, None) and \
                    PyCapsule_IsValid(capsule, FASTNN_CALL_CAPSULE):
                self.entries[i] = <fastnn_entry>PyCapsule_GetPointer(capsule, FASTNN_CALL_CAPSULE)
        self.kernels = tuple(kernels)

    def __dealloc__(self):
        free(self.entries)

    def has_entry(self, Py_ssize_t i):
        """Whether kernel ``i`` (contract order) has a C entry (for tests)."""
        return 0 <= i < self.n and self.entries[i] != NULL


# ------------------------------------------------------------------ dispatch state

cdef object _names = ()         # kernel names, contract order
cdef object _ctxvar = None      # fastnn._backend._context
cdef object _bdict = None       # fastnn._backend.__dict__ (its ``_default``)
cdef object _loaded = None      # fastnn._backend._loaded
cdef object _current = None     # fastnn._backend.current (the slow path, which raises)
cdef object _last_backend = None
cdef Table _last_table = None
cdef void* _np_float64 = NULL   # numpy.float64, a float subclass that converts exactly
cdef dict _act_codes = {}
cdef unsigned int _y_acts = 0   # bit per ACT_* code whose derivative is taken from y


def setup(backend_module, tuple names, activations, y_activations):
    """Connect to the registry (``fastnn._backend``); called once by ``fastnn._gate``."""
    global _names, _ctxvar, _bdict, _loaded, _current, _y_acts, _np_float64
    import numpy

    _np_float64 = <void*>numpy.float64
    _names = names
    _ctxvar = backend_module._context
    _bdict = backend_module.__dict__
    _loaded = backend_module._loaded
    _current = backend_module.current
    _act_codes.clear()
    _y_acts = 0
    for a in activations:
        _act_codes[a] = act_code(a)
    for a in y_activations:
        _y_acts |= 1u << act_code(a)
    forget()


def forget():
    """Drop the cached table (a backend was loaded or a kernel replaced)."""
    global _last_backend, _last_table
    _last_backend = None
    _last_table = None


cdef Table _table_of(backend):
    global _last_backend, _last_table
    cdef Table t = backend.__dict__.get("_ops_table")
    if t is None or t.backend is not backend or t.n != len(_names):
        t = Table(backend, _names)
        backend.__dict__["_ops_table"] = t
    _last_backend = backend
    _last_table = t
    return t


cdef Table current_table():
    """The table of the backend in effect for this context."""
    cdef object name = get_value(_ctxvar)
    cdef PyObject* p
    if name is None:
        p = PyDict_GetItem(<PyObject*>_bdict, <PyObject*>"_default")
        if p == NULL or p == Py_None:
            return _table_of(_current())
        name = <object>p
    p = PyDict_GetItem(<PyObject*>_loaded, <PyObject*>name)
    if p == NULL:
        return _table_of(_current())
    if <object>p is _last_backend:
        return _last_table
    return _table_of(<object>p)


def current_kernels():
    """The :class:`Table` ``fastnn.ops`` dispatches to here and now (for tests)."""
    return current_table()


# ------------------------------------------------------------------ the checks

ctypedef struct Region:
    char* start
    char* end
    int out
    int nd
    npy_intp* dims


cdef inline bint _same_shape(int nd, npy_intp* a, int nd2, npy_intp* b) noexcept:
    cdef int k
    if nd != nd2:
        return False
    for k in range(nd):
        if a[k] != b[k]:
            return False
    return True


cdef inline bint _bind(Py_ssize_t* sym, unsigned long long* bound, int s,
                       Py_ssize_t v) noexcept:
    """Bind symbol ``s`` to ``v``, or check it equals its value."""
    if s < 0:
        return True
    if bound[0] & (1ull << s):
        return sym[s] == v
    sym[s] = v
    bound[0] |= 1ull << s
    return True


cdef bint _rows_contiguous(PyArrayObject* a) noexcept:
    """Every row (all axes after the first) one C-contiguous block."""
    cdef int k, nd = PyArray_NDIM(a)
    cdef npy_intp expected = PyArray_ITEMSIZE(a)
    cdef npy_intp* dims = PyArray_DIMS(a)
    cdef npy_intp* strides = PyArray_STRIDES(a)
    for k in range(nd - 1, 0, -1):
        if dims[k] > 1 and strides[k] != expected:
            return False
        expected *= dims[k]
    return nd >= 1


cdef void _extent(PyArrayObject* a, Region* r) noexcept:
    """The bytes a non-empty strided array spans: lowest to highest element."""
    cdef int k
    cdef char* lo = PyArray_BYTES(a)
    cdef char* hi = lo
    cdef npy_intp step
    for k in range(PyArray_NDIM(a)):
        step = (PyArray_DIMS(a)[k] - 1) * PyArray_STRIDES(a)[k]
        if step < 0:
            lo += step
        else:
            hi += step
    r.start = lo
    r.end = hi + PyArray_ITEMSIZE(a)


cdef extern from *:
    """
    #include <stdint.h>
    /* The passes over the data, in plain C so that the compiler vectorizes them
       (one compare per element, no branch) and keeps them out of the checks. */
    #if defined(__GNUC__)
    #define FASTNN_NOINLINE __attribute__((noinline))
    #else
    #define FASTNN_NOINLINE
    #endif
    #define FASTNN_BELOW(T) \
        static FASTNN_NOINLINE int fastnn_below_##T(const T##_t* p, Py_ssize_t n, T##_t bound) { \
            int bad = 0; \
            for (Py_ssize_t i = 0; i < n; i++) bad |= p[i] >= bound; \
            return !bad; \
        }
    FASTNN_BELOW(uint8) FASTNN_BELOW(uint16) FASTNN_BELOW(uint32) FASTNN_BELOW(uint64)
    #define FASTNN_UNIT(T) \
        static FASTNN_NOINLINE int fastnn_unit_##T(const T* p, Py_ssize_t n) { \
            int bad = 0; \
            for (Py_ssize_t i = 0; i < n; i++) bad |= (p[i] < 0) | (p[i] > 1); \
            return !bad; \
        }
    FASTNN_UNIT(float) FASTNN_UNIT(double)
    """
    bint fastnn_below_uint8(const uint8_t* p, Py_ssize_t n, uint8_t bound) noexcept
    bint fastnn_below_uint16(const uint16_t* p, Py_ssize_t n, uint16_t bound) noexcept
    bint fastnn_below_uint32(const uint32_t* p, Py_ssize_t n, uint32_t bound) noexcept
    bint fastnn_below_uint64(const uint64_t* p, Py_ssize_t n, uint64_t bound) noexcept
    bint fastnn_unit_float(const float* p, Py_ssize_t n) noexcept
    bint fastnn_unit_double(const double* p, Py_ssize_t n) noexcept


cdef bint _ints_in_range(char* data, Py_ssize_t n, bint signed, Py_ssize_t itemsize,
                         Py_ssize_t hi) noexcept:
    """All ``n`` integers (native order) in ``[0, hi)``: one unsigned compare
    each (a negative value read as unsigned is at least ``2**(bits-1)``, and
    the bound is clamped there for signed types)."""
    cdef uint64_t bound = <uint64_t>hi
    cdef int bits = <int>itemsize * 8
    if signed and bits <= 64 and bound > (1ull << (bits - 1)):
        bound = 1ull << (bits - 1)
    if itemsize == 8:
        return fastnn_below_uint64(<const uint64_t*>data, n, bound)
    if bound > (1ull << bits) - 1:      # every value of an unsigned type that narrow
        return True
    if itemsize == 4:
        return fastnn_below_uint32(<const uint32_t*>data, n, <uint32_t>bound)
    if itemsize == 2:
        return fastnn_below_uint16(<const uint16_t*>data, n, <uint16_t>bound)
    if itemsize == 1:
        return fastnn_below_uint8(<const uint8_t*>data, n, <uint8_t>bound)
    return False


cdef inline bint _unit_interval(char* data, Py_ssize_t n, int dtype) noexcept:
    """No value below 0 or above 1 (NaN passes: the Python gate's comparisons
    are False for it)."""
    if dtype == 0:
        return fastnn_unit_float(<const float*>data, n)
    return fastnn_unit_double(<const double*>data, n)


cdef class Op:
    """One kernel of ``fastnn.ops``: the compiled checks, the Python gate for
    what they do not accept, and the dispatch.

    Parameters
    ----------
    name : str
    index : int
        The kernel's position in the contract (its column in a :class:`Table`).
    check : callable
        The Python gate (``fastnn._validate.<name>``): the definition.
    spec : dict or None
        The compiled description (``fastnn._gate.compile_spec``); None: every
        call takes the Python gate.
    """

    cdef readonly str name
    cdef readonly Py_ssize_t index
    cdef readonly object check
    cdef readonly bint compiled
    cdef object gdict            # the Python gate's globals (its _BLAS_MAX)
    cdef int nparams, nrules
    cdef bint in_place, returns_float, has_blas
    cdef PSpec p[MAXP]
    cdef RSpec r[MAXR]

    def __init__(self, str name, Py_ssize_t index, check, spec=None):
        cdef int i, k, g
        self.name = name
        self.index = index
        self.check = check
        self.gdict = getattr(check, "__globals__", {})
        self.compiled = spec is not None
        self.nparams = self.nrules = 0
        if spec is None:
            return
        params, rules = spec["params"], spec["rules"]
        if len(params) > MAXP or len(rules) > MAXR:
            raise ValueError(f"{name}: too many parameters or rules for the compiled gate")
        self.in_place = spec["in_place"]
        self.returns_float = spec["returns_float"]
        self.has_blas = False
        self.nparams = len(params)
        for i, d in enumerate(params):
            ps = &self.p[i]
            ps.kind = d["kind"]
            ps.flags = d.get("flags", 0)
            dims = d.get("dims", ())
            if len(dims) > MAXD:
                raise ValueError(f"{name}: rank above {MAXD}")
            ps.ndim = len(dims)
            for k in range(MAXD):
                ps.dims[k] = dims[k] if k < len(dims) else -1
                ps.defsyms[k] = -1
                ps.below[k] = -1
            for k, s in enumerate(d.get("default", ())):
                ps.defsyms[k] = s
            for k, s in enumerate(d.get("below", ())):
                ps.below[k] = s
            ps.ref = d.get("ref", -1)
            ps.ilow = d.get("ilow", 0)
            ps.has_low = "low" in d
            ps.has_high = "high" in d
            ps.low = d.get("low", 0.0)
            ps.high = d.get("high", 0.0)
            ps.low_open = d.get("low_open", False)
            ps.high_open = d.get("high_open", True)
            for s in list(dims) + list(d.get("default", ())) + list(d.get("below", ())):
                if s >= MAXS:
                    raise ValueError(f"{name}: more than {MAXS} shape symbols")
        self.nrules = len(rules)
        for i, (op, operands, groups) in enumerate(rules):
            self.r[i].op = op
            for k in range(6):
                self.r[i].a[k] = operands[k] if k < len(operands) else -1
            for g in range(MAXG):
                for k in range(MAXG):
                    self.r[i].groups[g][k] = groups[g][k] if (
                        g < len(groups) and k < len(groups[g])) else -1
            if op == R_BLAS:
                self.has_blas = True

    def __call__(self, *args):
        """Check ``args`` (every parameter, positionally), then run the kernel
        on the backend in effect."""
        cdef fastnn_call c
        cdef Table t
        cdef fastnn_entry entry
        cdef int done
        if self.compiled and self._fast(<PyObject*>args, &c):
            t = current_table()
            entry = t.entries[self.index]
            if entry != NULL:
                done = entry(&c)
                if done == 0:
                    return c.result if self.returns_float else None
            return t.kernels[self.index](*args)
        self.check(*args)
        return current_table().kernels[self.index](*args)

    def accepts(self, *args):
        """Whether the compiled checks accept ``args`` alone (for tests: they
        must never accept what the Python gate rejects)."""
        cdef fastnn_call c
        return bool(self.compiled and self._fast(<PyObject*>args, &c))

    cdef bint _fast(self, PyObject* args, fastnn_call* c) noexcept:
        cdef Py_ssize_t sym[MAXS]
        cdef unsigned long long bound = 0
        cdef Region reg[MAXP]
        cdef int nreg = 0
        cdef int i, k, kind, flags, nd, code
        cdef int like_nd = -1, tail_nd = -1
        cdef npy_intp* like_dims = NULL
        cdef npy_intp* tail_dims = NULL
        cdef PyObject* o
        cdef PyObject* item
        cdef PyArrayObject* a
        cdef PSpec* ps
        cdef RSpec* rs
        cdef npy_intp* dims
        cdef double v
        cdef long long iv
        cdef Py_ssize_t n, prod, num, blas_max
        cdef int aflags, t, typ
        cdef bint is_list
        if PyTuple_GET_SIZE(args) != self.nparams:
            return False
        c.dtype = -1
        c.act = -1
        c.result = 0
        # scalars first: the activation decides which of z and y are required
        for i in range(self.nparams):
            ps = &self.p[i]
            kind = ps.kind
            o = PyTuple_GET_ITEM(args, i)
            if kind == K_ACT:
                if not PyUnicode_Check(o):
                    return False
                item = PyDict_GetItem(<PyObject*>_act_codes, o)
                if item == NULL:
                    return False
                c.act = <int>PyLong_AsLongLong(item)
            elif kind == K_REAL:
                if PyFloat_CheckExact(o) or Py_TYPE(o) == _np_float64:
                    v = PyFloat_AS_DOUBLE(o)
                elif PyLong_CheckExact(o):
                    v = PyLong_AsDouble(o)
                    if v == -1.0 and PyErr_Occurred() != NULL:
                        PyErr_Clear()
                        return False
                else:
                    return False
                if not isfinite(v):
                    return False
                if ps.has_low and (v < ps.low or (ps.low_open and v == ps.low)):
                    return False
                if ps.has_high and (v > ps.high or (ps.high_open and v == ps.high)):
                    return False
                c.real[i] = v
            elif kind == K_BOOL:
                if o == Py_True:
                    c.ival[i] = 1
                elif o == Py_False:
                    c.ival[i] = 0
                else:
                    return False
            elif kind == K_INT:
                if not PyLong_CheckExact(o):
                    return False
                iv = PyLong_AsLongLong(o)
                if iv == -1 and PyErr_Occurred() != NULL:
                    PyErr_Clear()
                    return False
                if iv < ps.ilow:
                    return False
                c.ival[i] = iv
            elif kind == K_UINT64:
                if not PyLong_CheckExact(o):
                    return False
                c.ival[i] = <long long>PyLong_AsUnsignedLongLong(o)
                if c.ival[i] == -1 and PyErr_Occurred() != NULL:
                    PyErr_Clear()
                    return False
            elif kind == K_INTS:
                if o == Py_None and (ps.flags & F_NONE):
                    for k in range(ps.ndim):
                        if not (bound & (1ull << ps.defsyms[k])):
                            return False
                        c.ints[i][k] = sym[ps.defsyms[k]]
                        if not _bind(sym, &bound, ps.dims[k], c.ints[i][k]):
                            return False
                    continue
                is_list = PyList_Check(o)
                if is_list:
                    n = PyList_GET_SIZE(o)
                elif PyTuple_Check(o):
                    n = PyTuple_GET_SIZE(o)
                else:
                    return False
                if n != ps.ndim:
                    return False
                for k in range(ps.ndim):
                    item = PyList_GET_ITEM(o, k) if is_list else PyTuple_GET_ITEM(o, k)
                    if not PyLong_CheckExact(item):
                        return False
                    iv = PyLong_AsLongLong(item)
                    if iv == -1 and PyErr_Occurred() != NULL:
                        PyErr_Clear()
                        return False
                    if iv < ps.ilow:
                        return False
                    c.ints[i][k] = <Py_ssize_t>iv
                    if not _bind(sym, &bound, ps.dims[k], <Py_ssize_t>iv):
                        return False
        # arrays
        for i in range(self.nparams):
            ps = &self.p[i]
            kind = ps.kind
            if kind > K_LAST_ARRAY:
                continue
            o = PyTuple_GET_ITEM(args, i)
            flags = ps.flags
            if o == Py_None:
                c.data[i] = NULL
                if flags & F_NONE:
                    continue
                if flags & F_IF_Z and c.act >= 0 and (_y_acts >> c.act) & 1:
                    continue
                if flags & F_IF_Y and c.act >= 0 and not (_y_acts >> c.act) & 1:
                    continue
                if flags & F_IF_POS and not c.real[ps.ref] > 0:
                    continue
                return False
            if not PyArray_Check(o):
                return False
            a = <PyArrayObject*>o
            typ = PyArray_TYPE(a)
            if not PyArray_ISNOTSWAPPED(a):
                return False
            if kind == K_FLOAT:
                if typ == NPY_FLOAT:
                    t = 0
                elif typ == NPY_DOUBLE:
                    t = 1
                else:
                    return False
                if c.dtype < 0:
                    c.dtype = t
                elif c.dtype != t:
                    return False
            elif kind == K_INT32:
                if not (PyArray_DESCR(a).kind == c'i' and PyArray_ITEMSIZE(a) == 4):
                    return False
            elif kind == K_INDEX:
                if not PyTypeNum_ISINTEGER(typ):
                    return False
            elif not (PyTypeNum_ISINTEGER(typ) or PyTypeNum_ISBOOL(typ) or
                      PyTypeNum_ISFLOAT(typ)):
                return False
            aflags = PyArray_FLAGS(a)
            if not (aflags & NPY_ARRAY_ALIGNED):
                return False
            if not (aflags & NPY_ARRAY_C_CONTIGUOUS) and not (
                    flags & F_ROWS and _rows_contiguous(a)):
                return False
            if flags & F_OUT and not (aflags & NPY_ARRAY_WRITEABLE):
                return False
            nd = PyArray_NDIM(a)
            dims = PyArray_DIMS(a)
            if flags & F_LIKE:
                if like_nd < 0:
                    if nd < 1:
                        return False
                    for k in range(nd):
                        if dims[k] < 1:
                            return False
                    like_nd = nd
                    like_dims = dims
                elif not _same_shape(nd, dims, like_nd, like_dims):
                    return False
            elif flags & F_TAIL:
                if nd < 1:
                    return False
                for k in range(nd):
                    if dims[k] < 1:
                        return False
                if not _bind(sym, &bound, ps.dims[0], dims[0]):
                    return False
                c.shape[i][0] = dims[0]
                if tail_nd < 0:
                    tail_nd = nd - 1
                    tail_dims = dims + 1
                elif not _same_shape(nd - 1, dims + 1, tail_nd, tail_dims):
                    return False
            else:
                if nd != ps.ndim:
                    return False
                for k in range(nd):
                    if dims[k] < 1 or not _bind(sym, &bound, ps.dims[k], dims[k]):
                        return False
                    c.shape[i][k] = dims[k]
            n = PyArray_SIZE(a)
            c.data[i] = PyArray_BYTES(a)
            c.size[i] = n
            c.kind[i] = PyArray_DESCR(a).kind
            c.itemsize[i] = <int>PyArray_ITEMSIZE(a)
            if aflags & NPY_ARRAY_C_CONTIGUOUS:
                reg[nreg].start = c.data[i]
                reg[nreg].end = c.data[i] + n * PyArray_ITEMSIZE(a)
            else:
                _extent(a, &reg[nreg])
            reg[nreg].out = flags & F_OUT
            reg[nreg].nd = nd
            reg[nreg].dims = dims
            nreg += 1
        # rules between symbols
        for i in range(self.nrules):
            rs = &self.r[i]
            if rs.op == R_NEEDS_POS:
                if c.ival[rs.a[0]] and not c.real[rs.a[1]] > 0:
                    return False
            elif rs.op == R_LESS:
                if not (bound >> rs.a[0]) & 1 or not (bound >> rs.a[1]) & 1:
                    return False
                if not sym[rs.a[0]] < sym[rs.a[1]]:
                    return False
            elif rs.op == R_OUTSIZE:
                for k in range(1, 4):
                    if not (bound >> rs.a[k]) & 1:
                        return False
                num = sym[rs.a[1]] - sym[rs.a[2]]
                for k in range(4, 6):
                    if rs.a[k] >= 0:
                        if not (bound >> rs.a[k]) & 1:
                            return False
                        num += sym[rs.a[k]]
                if num < 0:
                    return False
                if not _bind(sym, &bound, rs.a[0], num // sym[rs.a[3]] + 1):
                    return False
            elif rs.op == R_BLAS:
                o = PyDict_GetItem(<PyObject*>self.gdict, <PyObject*>"_BLAS_MAX")
                if o == NULL or not PyLong_CheckExact(o):
                    return False
                blas_max = <Py_ssize_t>PyLong_AsLongLong(o)
                if blas_max == -1 and PyErr_Occurred() != NULL:
                    PyErr_Clear()
                    return False
                for k in range(MAXG):
                    if rs.groups[k][0] < 0:
                        break
                    prod = 1
                    for t in range(MAXG):
                        if rs.groups[k][t] < 0:
                            break
                        if not (bound >> rs.groups[k][t]) & 1:
                            return False
                        prod *= sym[rs.groups[k][t]]
                    if prod > blas_max:
                        return False
        # outputs against inputs and against each other
        for i in range(nreg):
            if not reg[i].out:
                continue
            for k in range(nreg):
                if k == i or reg[i].end <= reg[k].start or reg[k].end <= reg[i].start:
                    continue
                if reg[k].out:
                    return False
                if not (self.in_place and reg[i].start == reg[k].start and
                        _same_shape(reg[i].nd, reg[i].dims, reg[k].nd, reg[k].dims)):
                    return False
        # passes over the data, last
        for i in range(self.nparams):
            ps = &self.p[i]
            if ps.kind > K_LAST_ARRAY or c.data[i] == NULL:
                continue
            if ps.flags & F_BELOW:
                prod = 1
                for k in range(MAXG):
                    if ps.below[k] < 0:
                        break
                    if not (bound >> ps.below[k]) & 1:
                        return False
                    prod *= sym[ps.below[k]]
                if not _ints_in_range(c.data[i], c.size[i], c.kind[i] == c'i', c.itemsize[i],
                                      prod):
                    return False
            if ps.flags & F_UNIT and not _unit_interval(c.data[i], c.size[i], c.dtype):
                return False
        return True
