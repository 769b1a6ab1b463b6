# cython: language_level=3
"""The part of NumPy's C API the kernels read arrays with (no ``cimport numpy``:
no build dependency on NumPy's Cython declarations, only its headers; setup.py
adds them for the modules in ``NUMPY_HEADERS``). A module that cimports this
calls ``_import_array()`` once at import."""

from cpython.object cimport PyObject

cdef extern from *:
    """
    #define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
    """

cdef extern from "numpy/arrayobject.h":
    ctypedef Py_ssize_t npy_intp
    ctypedef struct PyArray_Descr:
        char kind
        int type_num
    ctypedef struct PyArrayObject:
        pass
    bint PyArray_Check(PyObject* o)
    bint PyArray_CheckExact(object o)
    int PyArray_NDIM(PyArrayObject* a)
    npy_intp* PyArray_DIMS(PyArrayObject* a)
    npy_intp* PyArray_STRIDES(PyArrayObject* a)
    char* PyArray_BYTES(PyArrayObject* a)
    int PyArray_FLAGS(PyArrayObject* a)
    int PyArray_TYPE(PyArrayObject* a)
    npy_intp PyArray_ITEMSIZE(PyArrayObject* a)
    npy_intp PyArray_SIZE(PyArrayObject* a)
    PyArray_Descr* PyArray_DESCR(PyArrayObject* a)
    bint PyArray_ISNOTSWAPPED(PyArrayObject* a)
    bint PyTypeNum_ISINTEGER(int t)
    bint PyTypeNum_ISSIGNED(int t)
    bint PyTypeNum_ISBOOL(int t)
    bint PyTypeNum_ISFLOAT(int t)
    int NPY_ARRAY_C_CONTIGUOUS, NPY_ARRAY_ALIGNED, NPY_ARRAY_WRITEABLE
    int NPY_BOOL, NPY_FLOAT, NPY_DOUBLE, NPY_INTP
    int _import_array() except -1
