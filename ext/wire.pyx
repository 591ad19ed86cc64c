# cython: language_level=3
"""Wire-format kernels of CreateTransfers and StreamTransfers: request bodies straight into
columns, results straight into response bytes, with no protobuf objects in between.

The decoder reads the encoding that protobuf serializers produce for a plain transfer. Anything
else, such as a field it does not know (fees among them), a field given twice, an id that is
neither empty nor 16 bytes, an oversized user_data, a value that does not fit its field or a
truncated body, makes it return None: the caller then parses the body with protobuf and
validates it field by field as before, so errors and results never depend on which path ran.
tests/property/test_wire_kernel.py checks both against protobuf on generated messages.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

from protowire cimport put_varint, varint_size

import numpy as np

# Wire types.
DEF VARINT = 0
DEF LEN = 2
DEF ID_BYTES = 16


cdef inline bint _varint(const uint8_t* buf, Py_ssize_t end, Py_ssize_t* pos,
                         uint64_t* out) noexcept nogil:
    """Read a varint of at most 10 bytes whose value fits 64 bits."""
    cdef uint64_t value = 0
    cdef int shift = 0
    cdef uint8_t byte
    while pos[0] < end:
        byte = buf[pos[0]]
        pos[0] += 1
        if shift == 63 and byte > 1:
            return False
        value |= (<uint64_t>(byte & 0x7F)) << shift
        if byte < 0x80:
            out[0] = value
            return True
        shift += 7
        if shift > 63:
            return False
    return False


cdef inline bint _length(const uint8_t* buf, Py_ssize_t end, Py_ssize_t* pos,
                         Py_ssize_t* length) noexcept nogil:
    """Read a length prefix that stays inside the buffer."""
    cdef uint64_t value
    if not _varint(buf, end, pos, &value) or value > <uint64_t>(end - pos[0]):
        return False
    length[0] = <Py_ssize_t>value
    return True


cdef inline bint _count(const uint8_t* buf, Py_ssize_t end, Py_ssize_t* count) noexcept nogil:
    """The number of transfers (field 1) of a request body; False for any other field."""
    cdef Py_ssize_t pos = 0, length
    cdef uint64_t key
    count[0] = 0
    while pos < end:
        if not _varint(buf, end, &pos, &key) or key != ((1 << 3) | LEN):
            return False
        if not _length(buf, end, &pos, &length):
            return False
        pos += length
        count[0] += 1
    return True


cdef object _id(const uint8_t* buf, Py_ssize_t start, Py_ssize_t length, object zero):
    if length == ID_BYTES:
        return PyBytes_FromStringAndSize(<const char*>buf + start, ID_BYTES)
    return zero


def decode_transfers(bytes body, Py_ssize_t items_max, Py_ssize_t user_data_max,
                     object zero_id, uint32_t timestamp_must_be_zero):
    """The columns of a CreateTransfersRequest (or StreamTransfersRequest) body, or None.

    Returns (ids, debit_ids, credit_ids, pending_ids, amount, ledger, code, flags,
    timeout_seconds, user_data, precheck) in the order and types of TransferColumns, or None
    when the body holds anything but plain transfers in the usual encoding (see the module's
    docstring) or more than items_max of them."""
    cdef const uint8_t* buf = <const uint8_t*>PyBytes_AS_STRING(body)
    cdef Py_ssize_t end = len(body)
    cdef Py_ssize_t n, i, pos = 0, stop, length, start
    cdef uint64_t key, value
    cdef uint32_t seen, field, wire
    if not _count(buf, end, &n) or n > items_max:
        return None
    ids, debits, credits, pendings, user_data = [], [], [], [], []
    amount_array = np.zeros(n, np.uint64)
    ledger_array = np.zeros(n, np.uint32)
    code_array = np.zeros(n, np.uint32)
    flags_array = np.zeros(n, np.uint32)
    timeout_array = np.zeros(n, np.uint32)
    precheck_array = np.zeros(n, np.uint32)
    cdef uint64_t[:] amount = amount_array
    cdef uint32_t[:] ledger = ledger_array
    cdef uint32_t[:] code = code_array
    cdef uint32_t[:] flags = flags_array
    cdef uint32_t[:] timeout = timeout_array
    cdef uint32_t[:] precheck = precheck_array
    # Per transfer: where each LEN field starts and how long it is (-1: absent).
    cdef Py_ssize_t id_at, id_len, debit_at, debit_len, credit_at, credit_len
    cdef Py_ssize_t pending_at, pending_len, data_at, data_len
    for i in range(n):
        _varint(buf, end, &pos, &key)  # field 1, LEN: checked by _count
        _length(buf, end, &pos, &length)
        stop = pos + length
        seen = 0
        id_len = debit_len = credit_len = pending_len = data_len = 0
        id_at = debit_at = credit_at = pending_at = data_at = 0
        while pos < stop:
            if not _varint(buf, stop, &pos, &key) or key > 0xFF:
                return None
            field = <uint32_t>(key >> 3)
            wire = <uint32_t>(key & 7)
            if field == 0 or field > 11 or seen & (1u << field):
                return None  # unknown (fees: 12-14), invalid or repeated: protobuf decides
            seen |= 1u << field
            if field in (1, 2, 3, 5, 10):
                if wire != LEN or not _length(buf, stop, &pos, &length):
                    return None
                start = pos
                pos += length
                if field == 10:
                    if length > user_data_max:
                        return None
                    data_at, data_len = start, length
                elif length != 0 and length != ID_BYTES:
                    return None
                elif field == 1:
                    id_at, id_len = start, length
                elif field == 2:
                    debit_at, debit_len = start, length
                elif field == 3:
                    credit_at, credit_len = start, length
                else:
                    pending_at, pending_len = start, length
            else:
                if wire != VARINT or not _varint(buf, stop, &pos, &value):
                    return None
                if field == 4:
                    amount[i] = value
                elif field == 11:
                    if value != 0:
                        precheck[i] = timestamp_must_be_zero
                elif value > 0xFFFFFFFF:
                    return None  # protobuf would truncate it to 32 bits
                elif field == 6:
                    ledger[i] = <uint32_t>value
                elif field == 7:
                    code[i] = <uint32_t>value
                elif field == 8:
                    flags[i] = <uint32_t>value
                else:
                    timeout[i] = <uint32_t>value
        if pos != stop:
            return None
        ids.append(_id(buf, id_at, id_len, zero_id))
        debits.append(_id(buf, debit_at, debit_len, zero_id))
        credits.append(_id(buf, credit_at, credit_len, zero_id))
        pendings.append(_id(buf, pending_at, pending_len, zero_id))
        user_data.append(PyBytes_FromStringAndSize(<const char*>buf + data_at, data_len))
    return (ids, debits, credits, pendings, amount_array, ledger_array, code_array, flags_array,
            timeout_array, user_data, precheck_array)


def encode_results(list results, list timestamps):
    """A CreateTransfersResponse (or StreamTransfersResponse) body of results without legs:
    the bytes protobuf's SerializeToString gives for results[i], timestamps[i] at index i."""
    cdef Py_ssize_t n = len(results), i, size = 0, inner
    cdef uint64_t result, timestamp
    cdef int64_t signed_timestamp
    if len(timestamps) != n:
        raise ValueError("one timestamp per result")
    sizes = np.empty(n, np.intp)
    cdef Py_ssize_t[:] inner_sizes = sizes
    for i in range(n):
        result = <uint32_t>results[i]
        signed_timestamp = timestamps[i]
        timestamp = <uint64_t>signed_timestamp
        inner = 0
        if i:
            inner += 1 + varint_size(<uint64_t>i)
        if result:
            inner += 1 + varint_size(result)
        if timestamp:
            inner += 1 + varint_size(timestamp)
        inner_sizes[i] = inner
        size += 1 + varint_size(<uint64_t>inner) + inner
    body = PyBytes_FromStringAndSize(NULL, size)
    cdef uint8_t* out = <uint8_t*>PyBytes_AS_STRING(body)
    for i in range(n):
        out[0] = 0x0A  # field 1, LEN
        out = put_varint(out + 1, <uint64_t>inner_sizes[i])
        if i:
            out[0] = 0x08
            out = put_varint(out + 1, <uint64_t>i)
        result = <uint32_t>results[i]
        if result:
            out[0] = 0x10
            out = put_varint(out + 1, result)
        signed_timestamp = timestamps[i]
        timestamp = <uint64_t>signed_timestamp
        if timestamp:
            out[0] = 0x18
            out = put_varint(out + 1, timestamp)
    return body
