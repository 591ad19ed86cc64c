# cython: language_level=3
"""Protobuf varints for the kernels that write wire format (events, wire)."""
from libc.stdint cimport uint8_t, uint64_t


cdef inline int varint_size(uint64_t value) noexcept nogil:
    cdef int size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


cdef inline uint8_t *put_varint(uint8_t *p, uint64_t value) noexcept nogil:
    """Write value at p; return the position after it."""
    while value >= 0x80:
        p[0] = <uint8_t> (value | 0x80)
        value >>= 7
        p += 1
    p[0] = <uint8_t> value
    return p + 1
