# cython: language_level=3
"""Data-plane kernel that maps 128-bit ids to shards.

The hash is part of the storage layout: every id must land on the same shard forever, so
tests/property/test_routing_kernel.py pins it with literal expected values. The plain-Python
oracle is engine.kernels.reference.shard_of_reference.
"""
from libc.stdint cimport int32_t, uint32_t, uint64_t

# Shards are a deployment-time choice; 1,024 bounds the per-shard queues and connections.
cdef uint32_t SHARD_COUNT_MAX = 1024


def shard_of(const uint64_t[:] hi, const uint64_t[:] lo, uint32_t shard_count, int32_t[:] out):
    """Write the shard of each id (hi[i], lo[i]) into out[i], in 0..shard_count-1.

    hi holds the first 8 big-endian bytes of the id, lo the last 8. The shard is
    splitmix64(hi ^ splitmix64(lo)) mod shard_count.

    Modified in place: out. Raises ValueError if shard_count is not in 1..1024 or if the
    three arrays do not have the same length.
    """
    cdef Py_ssize_t n = hi.shape[0]
    cdef Py_ssize_t i
    if not 1 <= shard_count <= SHARD_COUNT_MAX:
        raise ValueError(f"shard_count must be in 1..{SHARD_COUNT_MAX}, got {shard_count}")
    if lo.shape[0] != n or out.shape[0] != n:
        raise ValueError(
            f"hi, lo and out must have one length, got {n}, {lo.shape[0]}, {out.shape[0]}"
        )
    with nogil:
        for i in range(n):
            out[i] = <int32_t>(_splitmix64(hi[i] ^ _splitmix64(lo[i])) % shard_count)


cdef inline uint64_t _splitmix64(uint64_t x) noexcept nogil:
    # Unsigned arithmetic in C wraps mod 2**64, which is what splitmix64 specifies.
    cdef uint64_t z = x + <uint64_t>0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EB
    return z ^ (z >> 31)
