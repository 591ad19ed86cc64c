"""The binary COPY encoder against its struct-based oracle, and against Postgres itself."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from engine.kernels._copy import BYTEA, INT16, INT32, INT64, UUID, encode_binary_copy
from engine.kernels.copy_reference import encode_binary_copy_reference

U64 = st.integers(0, 2**64 - 1)


@st.composite
def tables(draw):
    rows = draw(st.integers(0, 40))
    kinds = draw(st.lists(st.sampled_from([INT16, INT32, INT64, UUID, BYTEA]), min_size=1, max_size=8))
    columns = []
    for kind in kinds:
        if kind == INT16:
            values = draw(st.lists(st.integers(-2**15, 2**15 - 1), min_size=rows, max_size=rows))
            columns.append((INT16, np.array(values, np.int16)))
        elif kind == INT32:
            values = draw(st.lists(st.integers(-2**31, 2**31 - 1), min_size=rows, max_size=rows))
            columns.append((INT32, np.array(values, np.int32)))
        elif kind == INT64:
            values = draw(st.lists(st.integers(-2**63, 2**63 - 1), min_size=rows, max_size=rows))
            columns.append((INT64, np.array(values, np.int64)))
        elif kind == UUID:
            hi = draw(st.lists(U64, min_size=rows, max_size=rows))
            lo = draw(st.lists(U64, min_size=rows, max_size=rows))
            columns.append((UUID, np.array(hi, np.uint64), np.array(lo, np.uint64)))
        else:
            values = draw(st.lists(st.binary(max_size=20), min_size=rows, max_size=rows))
            offsets = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.int64)
            columns.append((BYTEA, b"".join(values), offsets))
    return rows, columns


@settings(max_examples=300, deadline=None)
@given(tables())
def test_kernel_equals_reference(table):
    rows, columns = table
    assert encode_binary_copy(rows, columns) == encode_binary_copy_reference(rows, columns)


def test_unsigned_int64_below_2_63_is_accepted():
    values = np.array([0, 2**63 - 1], np.uint64)
    assert encode_binary_copy(2, [(INT64, values)]) == encode_binary_copy_reference(2, [(INT64, values)])


@pytest.mark.parametrize("columns", [
    [(INT32, np.zeros(2, np.int32))],
    [(UUID, np.zeros(3, np.uint64), np.zeros(2, np.uint64))],
    [(BYTEA, b"ab", np.array([0, 3, 2, 2], np.int64))],
    [(BYTEA, b"ab", np.array([0, 1, 2], np.int64))],
    [(9, np.zeros(3, np.int32))],
])
def test_bad_columns_raise_value_error(columns):
    with pytest.raises(ValueError):
        encode_binary_copy(3, columns)


async def test_postgres_reads_what_the_kernel_writes(db):
    await db.execute("CREATE TABLE copy_check (a smallint, b integer, c bigint, d uuid, e bytea)")
    ids = [bytes(range(16)), bytes(16)]
    hi = np.array([int.from_bytes(i[:8], "big") for i in ids], np.uint64)
    lo = np.array([int.from_bytes(i[8:], "big") for i in ids], np.uint64)
    columns = [(INT16, np.array([-1, 7], np.int16)), (INT32, np.array([2**31 - 1, -5], np.int32)),
               (INT64, np.array([2**63 - 1, -2**63], np.int64)), (UUID, hi, lo),
               (BYTEA, b"xyz", np.array([0, 0, 3], np.int64))]
    await db.copy_to_table("copy_check", source=memoryview(encode_binary_copy(2, columns)), format="binary")
    rows = await db.fetch("SELECT a, b, c, d::text, e FROM copy_check ORDER BY b DESC")
    assert [tuple(r) for r in rows] == [
        (-1, 2**31 - 1, 2**63 - 1, "00010203-0405-0607-0809-0a0b0c0d0e0f", b""),
        (7, -5, -2**63, "00000000-0000-0000-0000-000000000000", b"xyz"),
    ]
