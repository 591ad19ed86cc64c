"""The wire kernel (ext/wire.pyx) against protobuf: CreateTransfers bodies decode to the same
columns as protobuf parsing plus decode_transfers, or go to that path (None); result bodies are
byte for byte what SerializeToString gives."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import limits
from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.ids import ZERO_ID
from engine.kernels import _wire as wire
from engine.results import TransferResult
from engine.server.errors import InvalidRequest
from engine.server.servicer import decode_transfers

U32 = st.integers(0, 2**32 - 1)
ID = st.binary(min_size=16, max_size=16)
ANY_ID = st.one_of(ID, st.just(b""), st.binary(max_size=20))
PLAIN = {"user_data": st.binary(max_size=limits.USER_DATA_BYTES_MAX)}


def kernel(body: bytes, items_max: int = limits.BATCH_ITEMS_MAX):
    return wire.decode_transfers(body, items_max, limits.USER_DATA_BYTES_MAX, ZERO_ID,
                                 TransferResult.TIMESTAMP_MUST_BE_ZERO)


def protobuf(body: bytes):
    """What the protobuf path decides: the columns, or the exception it raises."""
    try:
        return decode_transfers(pb.CreateTransfersRequest.FromString(body).transfers)
    except (DecodeError, InvalidRequest) as error:
        return error


def same_columns(columns, fields: tuple) -> None:
    expected = dataclasses.astuple(columns)[:len(fields)]
    for name, got, want in zip([f.name for f in dataclasses.fields(columns)], fields, expected):
        if isinstance(want, np.ndarray):
            assert got.dtype == want.dtype and np.array_equal(got, want), name
        else:
            assert got == want, name
    assert columns.fee_schedule_ids is None


@st.composite
def transfers(draw, ids=ID, user_data=PLAIN["user_data"], fees: bool = False):
    message = pb.Transfer(
        id=draw(ids), debit_account_id=draw(ids), credit_account_id=draw(ids),
        pending_id=draw(st.one_of(st.just(b""), ids)), amount=draw(st.integers(0, 2**64 - 1)),
        ledger=draw(U32), code=draw(U32), flags=draw(U32), timeout_seconds=draw(U32),
        user_data=draw(user_data), timestamp=draw(st.one_of(st.just(0), st.integers(-2**63, 2**63 - 1))))
    if fees and draw(st.booleans()):
        message.fee_schedule_id = draw(ID)
    return message


@given(st.lists(transfers(), max_size=30))
def test_plain_transfers_take_the_kernel_and_decode_as_protobuf_does(items):
    body = pb.CreateTransfersRequest(transfers=items).SerializeToString()
    fields = kernel(body)
    assert fields is not None
    same_columns(protobuf(body), fields)


@given(st.lists(transfers(ids=ANY_ID, user_data=st.binary(max_size=40), fees=True), max_size=12))
def test_anything_else_goes_to_protobuf_or_decodes_the_same(items):
    body = pb.CreateTransfersRequest(transfers=items).SerializeToString()
    fields, expected = kernel(body), protobuf(body)
    if fields is None:
        return
    assert not isinstance(expected, Exception), expected
    same_columns(expected, fields)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(transfers(), min_size=1, max_size=6), st.data())
def test_damaged_bodies_never_decode_differently(items, data):
    """Flipped, cut, inserted bytes: None, or exactly what protobuf makes of the body."""
    body = bytearray(pb.CreateTransfersRequest(transfers=items).SerializeToString())
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(body)))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip" and at < len(body):
            body[at] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del body[at:]
        else:
            body[at:at] = data.draw(st.binary(min_size=1, max_size=4))
    fields, expected = kernel(bytes(body)), protobuf(bytes(body))
    if fields is not None:
        assert not isinstance(expected, Exception), expected
        same_columns(expected, fields)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_decode_differently(body):
    fields, expected = kernel(body), protobuf(body)
    if fields is not None:
        assert not isinstance(expected, Exception), expected
        same_columns(expected, fields)


def test_unknown_fields_repeats_and_fees_go_to_protobuf():
    plain = pb.Transfer(id=bytes(range(16)), amount=5)
    unknown = plain.SerializeToString() + bytes([0xF8, 0x01, 0x01])  # field 31, varint
    repeated = plain.SerializeToString() + pb.Transfer(amount=6).SerializeToString()
    for transfer in (unknown, repeated, pb.Transfer(refund_of=bytes(16)).SerializeToString(),
                     pb.Transfer(id=bytes(15)).SerializeToString(),
                     pb.Transfer(user_data=bytes(limits.USER_DATA_BYTES_MAX + 1)).SerializeToString()):
        body = bytes([0x0A, len(transfer)]) + transfer
        assert kernel(body) is None
    many = pb.CreateTransfersRequest(transfers=[plain] * 3).SerializeToString()
    assert kernel(many, items_max=2) is None and kernel(many, items_max=3) is not None


@given(st.lists(st.tuples(st.integers(0, 2**31 - 1), st.integers(-2**63, 2**63 - 1)),
                max_size=40))
def test_result_bodies_are_what_protobuf_serializes(items):
    results, timestamps = [r for r, _ in items], [t for _, t in items]
    expected = pb.CreateTransfersResponse(results=[
        pb.CreateTransferResult(index=i, result=r, timestamp=t)
        for i, (r, t) in enumerate(items)]).SerializeToString()
    assert wire.encode_results(results, timestamps) == expected
    parsed = pb.StreamTransfersResponse.FromString(expected)  # the same wire shape
    assert [(r.index, r.result, r.timestamp) for r in parsed.results] == [
        (i, r, t) for i, (r, t) in enumerate(items)]


def test_result_bodies_need_a_timestamp_per_result():
    with pytest.raises(ValueError):
        wire.encode_results([1, 1], [5])
