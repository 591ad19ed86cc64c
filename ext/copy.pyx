# cython: language_level=3
"""Data-plane kernel that encodes rows for Postgres' binary COPY, straight from columns.

The writer hands Postgres one buffer per table and batch instead of building a Python tuple
per row for asyncpg to encode. Columns are numpy arrays (the caller keeps them alive for the
call); engine/kernels/reference.py holds the plain-Python oracle `encode_binary_copy_reference`.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int16_t, int32_t, int64_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

cdef extern from *:
    """
    static inline uint16_t txe_be16(uint16_t x) { return __builtin_bswap16(x); }
    static inline uint32_t txe_be32(uint32_t x) { return __builtin_bswap32(x); }
    static inline uint64_t txe_be64(uint64_t x) { return __builtin_bswap64(x); }
    """
    uint16_t txe_be16(uint16_t x) nogil
    uint32_t txe_be32(uint32_t x) nogil
    uint64_t txe_be64(uint64_t x) nogil

# Column kinds, shared with the Python side through the module constants below.
cdef enum:
    KIND_INT16 = 1
    KIND_INT32 = 2
    KIND_INT64 = 3
    KIND_UUID = 4
    KIND_BYTEA = 5

INT16, INT32, INT64, UUID, BYTEA = KIND_INT16, KIND_INT32, KIND_INT64, KIND_UUID, KIND_BYTEA

# PGCOPY signature, flags field, header extension length; the trailer is a field count of -1.
cdef bytes _HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8
cdef bytes _TRAILER = b"\xff\xff"
cdef enum:
    HEADER_BYTES = 19
    TRAILER_BYTES = 2
HEADER, TRAILER = _HEADER, _TRAILER

cdef struct Column:
    int kind
    const char *first   # the values; for UUID the high halves; for BYTEA the data
    const char *second  # for UUID the low halves; for BYTEA the n+1 offsets (int64)


def encode_binary_copy(Py_ssize_t rows, list columns):
    """Return the whole binary COPY stream (header, rows, trailer) as bytes.

    columns: one tuple per table column, in COPY column order:
      (INT16, int16 array) | (INT32, int32 array) | (INT64, int64 or uint64 array holding
      values < 2**63) | (UUID, hi uint64 array, lo uint64 array) |
      (BYTEA, data bytes, int64 offsets array of rows + 1 entries).
    Every array must be C-contiguous with `rows` entries. Nothing is modified.
    """
    cdef Py_ssize_t ncols = len(columns)
    cdef Py_ssize_t size = HEADER_BYTES + TRAILER_BYTES + rows * 2
    cdef Py_ssize_t k
    cdef char *buffer
    cdef Column *cols = <Column *> malloc(max(ncols, 1) * sizeof(Column))
    if cols == NULL:
        raise MemoryError()
    keep = []  # memoryviews whose buffers the pointers refer to
    try:
        for k in range(ncols):
            size += _describe(&cols[k], columns[k], rows, keep)
        out = PyBytes_FromStringAndSize(NULL, size)
        buffer = PyBytes_AS_STRING(out)
        memcpy(buffer, PyBytes_AS_STRING(_HEADER), HEADER_BYTES)
        with nogil:
            _encode_rows(buffer + HEADER_BYTES, rows, cols, ncols)
        memcpy(buffer + size - TRAILER_BYTES, PyBytes_AS_STRING(_TRAILER), TRAILER_BYTES)
        return out
    finally:
        free(cols)


cdef Py_ssize_t _describe(Column *col, tuple spec, Py_ssize_t rows, list keep) except -1:
    """Fill col from spec after checking kinds and lengths; return the column's bytes."""
    cdef int kind = spec[0]
    cdef const int16_t[::1] v16
    cdef const int32_t[::1] v32
    cdef const int64_t[::1] v64
    cdef const uint64_t[::1] hi, lo
    cdef const int64_t[::1] offsets
    cdef const unsigned char[::1] data
    col.kind = kind
    if kind == KIND_INT16:
        v16 = spec[1]
        _require(v16.shape[0] == rows, "int16 column length")
        keep.append(v16)
        col.first = <const char *> &v16[0] if rows else NULL
        return rows * (4 + 2)
    if kind == KIND_INT32:
        v32 = spec[1]
        _require(v32.shape[0] == rows, "int32 column length")
        keep.append(v32)
        col.first = <const char *> &v32[0] if rows else NULL
        return rows * (4 + 4)
    if kind == KIND_INT64:
        v64 = spec[1].view("int64") if spec[1].dtype.kind == "u" else spec[1]
        _require(v64.shape[0] == rows, "int64 column length")
        keep.append(v64)
        col.first = <const char *> &v64[0] if rows else NULL
        return rows * (4 + 8)
    if kind == KIND_UUID:
        hi = spec[1]
        lo = spec[2]
        _require(hi.shape[0] == rows and lo.shape[0] == rows, "uuid column length")
        keep.append(hi)
        keep.append(lo)
        col.first = <const char *> &hi[0] if rows else NULL
        col.second = <const char *> &lo[0] if rows else NULL
        return rows * (4 + 16)
    if kind == KIND_BYTEA:
        data = spec[1] if len(spec[1]) else b"\x00"
        offsets = spec[2]
        _require(offsets.shape[0] == rows + 1, "bytea offsets length")
        _require(offsets[0] == 0 and offsets[rows] <= len(spec[1]), "bytea offsets range")
        _require(_offsets_ordered(offsets, rows), "bytea offsets order")
        keep.append(data)
        keep.append(offsets)
        col.first = <const char *> &data[0]
        col.second = <const char *> &offsets[0]
        return rows * 4 + offsets[rows]
    raise ValueError(f"unknown column kind {kind}")


cdef bint _offsets_ordered(const int64_t[::1] offsets, Py_ssize_t rows) noexcept:
    cdef Py_ssize_t k
    for k in range(rows):
        if offsets[k] > offsets[k + 1]:
            return False
    return True


cdef int _require(bint condition, str what) except -1:
    if not condition:
        raise ValueError(f"binary COPY: bad {what}")
    return 0


cdef void _encode_rows(char *p, Py_ssize_t rows, Column *cols, Py_ssize_t ncols) noexcept nogil:
    cdef Py_ssize_t r, k
    cdef int64_t start, length
    cdef uint16_t count = txe_be16(<uint16_t> ncols)
    cdef Column *c
    for r in range(rows):
        memcpy(p, &count, 2)
        p += 2
        for k in range(ncols):
            c = &cols[k]
            if c.kind == KIND_INT64:
                _put32(p, 8)
                _put64(p + 4, (<const uint64_t *> c.first)[r])
                p += 12
            elif c.kind == KIND_UUID:
                _put32(p, 16)
                _put64(p + 4, (<const uint64_t *> c.first)[r])
                _put64(p + 12, (<const uint64_t *> c.second)[r])
                p += 20
            elif c.kind == KIND_INT32:
                _put32(p, 4)
                _put32(p + 4, <uint32_t> (<const int32_t *> c.first)[r])
                p += 8
            elif c.kind == KIND_INT16:
                _put32(p, 2)
                _put16(p + 4, <uint16_t> (<const int16_t *> c.first)[r])
                p += 6
            else:
                start = (<const int64_t *> c.second)[r]
                length = (<const int64_t *> c.second)[r + 1] - start
                _put32(p, <uint32_t> length)
                memcpy(p + 4, c.first + start, length)
                p += 4 + length


# memcpy keeps the unaligned stores well defined; compilers turn it into one move.
cdef inline void _put16(char *p, uint16_t value) noexcept nogil:
    value = txe_be16(value)
    memcpy(p, &value, 2)


cdef inline void _put32(char *p, uint32_t value) noexcept nogil:
    value = txe_be32(value)
    memcpy(p, &value, 4)


cdef inline void _put64(char *p, uint64_t value) noexcept nogil:
    value = txe_be64(value)
    memcpy(p, &value, 8)
