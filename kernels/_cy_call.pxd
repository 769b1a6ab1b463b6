# cython: language_level=3
"""One checked kernel call in C: what ``fastnn.ops``' compiled gate
(``_cy_gate.pyx``) hands to a kernel's C entry point.

The gate checks a call's arguments once (dtypes, shapes, layout, aliasing,
ranges) and writes what it read into a ``fastnn_call``, indexed by the
parameter's position in the kernel's signature (``kernels/reference.py``):
data pointers and shapes of arrays, values of scalars. A backend module that
exports ``ENTRIES = {kernel name: PyCapsule(fastnn_entry, FASTNN_CALL_CAPSULE)}``
then runs the kernel from that struct, without the Python objects: the
arguments are already trusted. Change the struct only with the capsule name.
"""

cdef extern from *:
    """
    #define FASTNN_CALL_CAPSULE "fastnn._cy_call.fastnn_entry.v1"
    """
    const char* FASTNN_CALL_CAPSULE

cdef enum:
    FASTNN_MAXP = 16      # parameters of a kernel
    FASTNN_MAXD = 4       # dimensions kept in ``shape`` (the arrays of fixed rank)

ctypedef struct fastnn_call:
    int dtype                                   # the float arrays: 0 float32, 1 float64
    int act                                     # the ACT_* code of ``_cy_math.pxd``, or -1
    char* data[FASTNN_MAXP]                     # arrays: first byte; None: NULL
    Py_ssize_t size[FASTNN_MAXP]                # arrays: elements
    Py_ssize_t shape[FASTNN_MAXP][FASTNN_MAXD]  # arrays: the first FASTNN_MAXD dimensions
    char kind[FASTNN_MAXP]                      # arrays: dtype kind, b'f', b'i' or b'u'
    int itemsize[FASTNN_MAXP]                   # arrays: bytes per element
    double real[FASTNN_MAXP]                    # real scalars
    long long ival[FASTNN_MAXP]                 # bools (0/1), ints; a uint64 as its bits
    Py_ssize_t ints[FASTNN_MAXP][FASTNN_MAXD]   # tuples of ints (stride, padding, pool)
    double result                               # the losses' mean, set by the entry

# 0: done (``result`` set for the losses); 1: this call is not for the entry
# (the gate calls the backend's Python kernel instead); -1: an exception is set
ctypedef int (*fastnn_entry)(fastnn_call* c) except -1
