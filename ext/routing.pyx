# cython: language_level=3
"""Data-plane kernel that maps 128-bit ids to shards.

The hash is part of the storage layout: every id must land on the same shard forever, so
tests/property/test_routing_kernel.py pins it with literal expected values. The plain-Python
oracle is engine.kernels.reference.shard_of_reference.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t

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


cdef inline uint64_t _big_endian(const uint8_t* p) noexcept nogil:
    return ((<uint64_t>p[0] << 56) | (<uint64_t>p[1] << 48) | (<uint64_t>p[2] << 40)
            | (<uint64_t>p[3] << 32) | (<uint64_t>p[4] << 24) | (<uint64_t>p[5] << 16)
            | (<uint64_t>p[6] << 8) | <uint64_t>p[7])


cdef inline uint32_t _shard_of_id(bytes id, uint32_t shard_count) except? 0xFFFFFFFF:
    if PyBytes_GET_SIZE(id) != 16:
        raise ValueError(f"ids must be 16 bytes, got {PyBytes_GET_SIZE(id)}")
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(id)
    return <uint32_t>(_splitmix64(_big_endian(p) ^ _splitmix64(_big_endian(p + 8)))
                      % shard_count)


def transfer_shard_items(list debit_ids, list credit_ids, uint32_t shard_count):
    """{shard: items} that a request of transfers takes of the shards' queues: one item of each
    shard a transfer touches, so one when both of its accounts are in the same shard.

    The same hash as shard_of, read straight from the 16-byte ids. Raises ValueError if
    shard_count is not in 1..1024, the lists differ in length or an id is not 16 bytes."""
    cdef Py_ssize_t n = len(debit_ids), i
    cdef uint32_t debit, credit
    cdef uint32_t counts[1024]
    if not 1 <= shard_count <= SHARD_COUNT_MAX:
        raise ValueError(f"shard_count must be in 1..{SHARD_COUNT_MAX}, got {shard_count}")
    if len(credit_ids) != n:
        raise ValueError(f"one credit id per debit id, got {n} and {len(credit_ids)}")
    for i in range(shard_count):
        counts[i] = 0
    for i in range(n):
        debit = _shard_of_id(debit_ids[i], shard_count)
        credit = _shard_of_id(credit_ids[i], shard_count)
        counts[debit] += 1
        if credit != debit:
            counts[credit] += 1
    return {shard: counts[shard] for shard in range(shard_count) if counts[shard]}
