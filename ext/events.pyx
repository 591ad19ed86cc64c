# cython: language_level=3
"""Data-plane kernel that encodes committed transfers as txengine.v1.Event messages.

The output is the protobuf wire form of the `events` field of an EventBatch (and of a
SubscribeEventsResponse, which has the same field): one length-delimited element per transfer,
straight from the columns the outbox reader fetched, without a Python object per event.
engine/events/codec.py `commit_events` builds the same messages with the protobuf runtime and is
the kernel's oracle.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.string cimport memcpy

from protowire cimport put_varint as _varint, varint_size as _varint_size

cdef enum:
    ID_BYTES = 16
    EVENT_BYTES_MAX = 512  # bound of one encoded element (the transfer's user_data aside)
    EVENT_TYPE_TRANSFER_COMMITTED = 1


cdef struct Row:
    int64_t commit_timestamp
    int64_t index
    int64_t shard
    int64_t seq
    int64_t timestamp
    const uint8_t *id
    const uint8_t *debit
    const uint8_t *credit
    const uint8_t *pending
    uint64_t amount
    int64_t ledger
    int64_t code
    int64_t flags
    int64_t timeout
    const uint8_t *user_data
    Py_ssize_t user_data_len
    const uint64_t *balances


def encode_transfer_events(int64_t commit_timestamp, const int64_t[::1] index,
                           const int64_t[::1] shard, const int64_t[::1] seq,
                           const int64_t[::1] timestamp, const uint8_t[::1] ids,
                           const uint8_t[::1] debit_ids, const uint8_t[::1] credit_ids,
                           const uint8_t[::1] pending_ids, const uint64_t[::1] amount,
                           const int64_t[::1] ledger, const int64_t[::1] code,
                           const int64_t[::1] flags, const int64_t[::1] timeout,
                           const uint8_t[::1] user_data, const int64_t[::1] user_data_offsets,
                           const uint64_t[::1] balances, const int64_t[::1] order,
                           int64_t[::1] out_offsets):
    """Return the events of rows order[0], order[1], ... as repeated `events` elements.

    Ids are 16 bytes per row, concatenated; a zero pending id is left out, as the API does.
    balances holds 8 values per row (debit account dp, dpo, cp, cpo, then the credit
    account's). out_offsets (len(order) + 1) receives where each element starts, and the
    total length last. Nothing else is modified."""
    cdef Py_ssize_t n = index.shape[0]
    cdef Py_ssize_t k, r, total = 0
    cdef Row row
    _require(shard.shape[0] == n and seq.shape[0] == n and timestamp.shape[0] == n
             and amount.shape[0] == n and ledger.shape[0] == n and code.shape[0] == n
             and flags.shape[0] == n and timeout.shape[0] == n, "column length")
    _require(ids.shape[0] == n * ID_BYTES and debit_ids.shape[0] == n * ID_BYTES
             and credit_ids.shape[0] == n * ID_BYTES and pending_ids.shape[0] == n * ID_BYTES,
             "id column length")
    _require(balances.shape[0] == n * 8, "balances length")
    _require(user_data_offsets.shape[0] == n + 1, "user_data offsets length")
    _require(order.shape[0] <= n and out_offsets.shape[0] == order.shape[0] + 1, "order length")
    for k in range(n):
        _require(0 <= user_data_offsets[k] <= user_data_offsets[k + 1] <= user_data.shape[0],
                 "user_data offsets")
    for k in range(order.shape[0]):
        _require(0 <= order[k] < n, "order entry")
        r = order[k]
        total += EVENT_BYTES_MAX + user_data_offsets[r + 1] - user_data_offsets[r]
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef uint8_t *start = <uint8_t *> PyBytes_AS_STRING(out)
    cdef uint8_t *p = start
    cdef const uint8_t *no_bytes = <const uint8_t *> b""
    with nogil:
        for k in range(order.shape[0]):
            r = order[k]
            row.commit_timestamp = commit_timestamp
            row.index = index[r]
            row.shard = shard[r]
            row.seq = seq[r]
            row.timestamp = timestamp[r]
            row.id = &ids[r * ID_BYTES]
            row.debit = &debit_ids[r * ID_BYTES]
            row.credit = &credit_ids[r * ID_BYTES]
            row.pending = &pending_ids[r * ID_BYTES]
            row.amount = amount[r]
            row.ledger = ledger[r]
            row.code = code[r]
            row.flags = flags[r]
            row.timeout = timeout[r]
            row.user_data_len = user_data_offsets[r + 1] - user_data_offsets[r]
            row.user_data = (&user_data[user_data_offsets[r]] if row.user_data_len
                             else no_bytes)
            row.balances = &balances[r * 8]
            out_offsets[k] = p - start
            p = _event(p, &row)
        out_offsets[order.shape[0]] = p - start
    return out[:p - start]


cdef int _require(bint condition, str what) except -1:
    if not condition:
        raise ValueError(f"encode_transfer_events: bad {what}")
    return 0




cdef inline int _field_size(uint64_t value) noexcept nogil:
    """Bytes of a one-byte-tag varint field; proto3 leaves a zero out."""
    return 1 + _varint_size(value) if value else 0


cdef inline uint8_t *_field(uint8_t *p, uint8_t tag, uint64_t value) noexcept nogil:
    if value:
        p[0] = tag
        p = _varint(p + 1, value)
    return p


cdef inline uint8_t *_bytes(uint8_t *p, uint8_t tag, const uint8_t *data,
                            Py_ssize_t length) noexcept nogil:
    p[0] = tag
    p = _varint(p + 1, <uint64_t> length)
    memcpy(p, data, length)
    return p + length


cdef inline bint _is_zero_id(const uint8_t *id) noexcept nogil:
    cdef int k
    for k in range(ID_BYTES):
        if id[k]:
            return False
    return True


cdef int _cursor_size(Row *row) noexcept nogil:
    return _field_size(<uint64_t> row.commit_timestamp) + _field_size(<uint64_t> row.index)


cdef int _balance_size(int64_t timestamp, const uint64_t *b) noexcept nogil:
    return (_field_size(<uint64_t> timestamp) + _field_size(b[0]) + _field_size(b[1])
            + _field_size(b[2]) + _field_size(b[3]))


cdef uint8_t *_balance(uint8_t *p, uint8_t tag, int64_t timestamp,
                       const uint64_t *b) noexcept nogil:
    p[0] = tag
    p = _varint(p + 1, <uint64_t> _balance_size(timestamp, b))
    p = _field(p, 0x08, <uint64_t> timestamp)
    p = _field(p, 0x10, b[0])
    p = _field(p, 0x18, b[1])
    p = _field(p, 0x20, b[2])
    return _field(p, 0x28, b[3])


cdef Py_ssize_t _transfer_size(Row *row) noexcept nogil:
    cdef Py_ssize_t size = 3 * (2 + ID_BYTES)
    size += _field_size(row.amount)
    if not _is_zero_id(row.pending):
        size += 2 + ID_BYTES
    size += (_field_size(<uint64_t> row.ledger) + _field_size(<uint64_t> row.code)
             + _field_size(<uint64_t> row.flags) + _field_size(<uint64_t> row.timeout))
    if row.user_data_len:
        size += 1 + _varint_size(<uint64_t> row.user_data_len) + row.user_data_len
    return size + _field_size(<uint64_t> row.timestamp)


cdef uint8_t *_event(uint8_t *p, Row *row) noexcept nogil:
    cdef int cursor = _cursor_size(row)
    cdef Py_ssize_t transfer = _transfer_size(row)
    cdef int debit = _balance_size(row.timestamp, row.balances)
    cdef int credit = _balance_size(row.timestamp, row.balances + 4)
    cdef Py_ssize_t event = (2 + cursor + 2 + _field_size(<uint64_t> row.shard)
                             + _field_size(<uint64_t> row.seq)
                             + _field_size(<uint64_t> row.timestamp)
                             + 1 + _varint_size(<uint64_t> transfer) + transfer
                             + 1 + _varint_size(<uint64_t> debit) + debit
                             + 1 + _varint_size(<uint64_t> credit) + credit)
    p[0] = 0x0A  # EventBatch.events
    p = _varint(p + 1, <uint64_t> event)
    p[0] = 0x0A  # Event.cursor
    p[1] = <uint8_t> cursor
    p = _field(p + 2, 0x08, <uint64_t> row.commit_timestamp)
    p = _field(p, 0x10, <uint64_t> row.index)
    p[0] = 0x10  # Event.type
    p[1] = EVENT_TYPE_TRANSFER_COMMITTED
    p = _field(p + 2, 0x18, <uint64_t> row.shard)
    p = _field(p, 0x20, <uint64_t> row.seq)
    p = _field(p, 0x28, <uint64_t> row.timestamp)
    p[0] = 0x32  # Event.transfer
    p = _varint(p + 1, <uint64_t> transfer)
    p = _bytes(p, 0x0A, row.id, ID_BYTES)
    p = _bytes(p, 0x12, row.debit, ID_BYTES)
    p = _bytes(p, 0x1A, row.credit, ID_BYTES)
    p = _field(p, 0x20, row.amount)
    if not _is_zero_id(row.pending):
        p = _bytes(p, 0x2A, row.pending, ID_BYTES)
    p = _field(p, 0x30, <uint64_t> row.ledger)
    p = _field(p, 0x38, <uint64_t> row.code)
    p = _field(p, 0x40, <uint64_t> row.flags)
    p = _field(p, 0x48, <uint64_t> row.timeout)
    if row.user_data_len:
        p = _bytes(p, 0x52, row.user_data, row.user_data_len)
    p = _field(p, 0x58, <uint64_t> row.timestamp)
    p = _balance(p, 0x42, row.timestamp, row.balances)
    return _balance(p, 0x4A, row.timestamp, row.balances + 4)
