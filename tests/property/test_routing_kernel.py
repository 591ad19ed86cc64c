"""The compiled shard_of against its oracle, and the hash pinned to literal values.

Shards are part of the storage layout, so a change of hash would move existing ids to other
shards: test_shards_are_stable fails on any such change.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.kernels import results, shard_of, transfer_shard_items
from engine.kernels.reference import shard_of_id, shard_of_reference, splitmix64

UINT64 = st.integers(0, 2**64 - 1)
SHARD_COUNTS = st.integers(results.SHARD_COUNT_MIN, results.SHARD_COUNT_MAX)


def kernel_shards(ids: list[tuple[int, int]], shard_count: int) -> list[int]:
    hi = np.array([i[0] for i in ids], dtype=np.uint64)
    lo = np.array([i[1] for i in ids], dtype=np.uint64)
    out = np.full(len(ids), -1, dtype=np.int32)
    shard_of(hi, lo, shard_count, out)
    return out.tolist()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(UINT64, UINT64), max_size=200), SHARD_COUNTS)
def test_kernel_matches_reference(ids: list[tuple[int, int]], shard_count: int) -> None:
    shards = kernel_shards(ids, shard_count)
    expected = [0] * len(ids)
    shard_of_reference([i[0] for i in ids], [i[1] for i in ids], shard_count, expected)
    assert shards == expected
    assert all(0 <= s < shard_count for s in shards)
    assert shards == [shard_of_id(hi.to_bytes(8, "big") + lo.to_bytes(8, "big"), shard_count)
                      for hi, lo in ids]


def test_splitmix64_matches_published_sequence() -> None:
    # The first outputs of the SplitMix64 generator seeded with 0: the k-th is
    # splitmix64(k * 0x9E3779B97F4A7C15).
    golden = 0x9E3779B97F4A7C15
    outputs = [splitmix64((k * golden) % 2**64) for k in range(3)]
    assert outputs == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


STABLE_IDS = [
    bytes(16),
    bytes(15) + b"\x01",
    b"\x01" + bytes(15),
    b"\xff" * 16,
    bytes(range(16)),
    bytes.fromhex("0123456789abcdeffedcba9876543210"),
    (2**64).to_bytes(16, "big"),
    (2**64 - 1).to_bytes(16, "big"),
]

# Computed once from the reference; they must never change.
STABLE_SHARDS = {
    1: [0, 0, 0, 0, 0, 0, 0, 0],
    2: [1, 0, 1, 0, 0, 0, 0, 1],
    7: [2, 0, 3, 3, 0, 1, 2, 2],
    16: [15, 14, 15, 6, 2, 4, 14, 7],
    1024: [623, 286, 943, 310, 498, 612, 270, 311],
}


@pytest.mark.parametrize("shard_count", STABLE_SHARDS)
def test_shards_are_stable(shard_count: int) -> None:
    ids = [(int.from_bytes(b[:8], "big"), int.from_bytes(b[8:], "big")) for b in STABLE_IDS]
    assert kernel_shards(ids, shard_count) == STABLE_SHARDS[shard_count]
    assert [shard_of_id(b, shard_count) for b in STABLE_IDS] == STABLE_SHARDS[shard_count]


@pytest.mark.parametrize("shard_count", [0, results.SHARD_COUNT_MAX + 1])
def test_shard_count_out_of_range_is_rejected(shard_count: int) -> None:
    with pytest.raises(ValueError):
        kernel_shards([(1, 2)], shard_count)
    with pytest.raises(ValueError):
        shard_of_reference([1], [2], shard_count, [0])
    with pytest.raises(ValueError):
        shard_of_id(bytes(16), shard_count)


@pytest.mark.parametrize(("hi", "lo", "out"), [(2, 1, 1), (1, 2, 1), (1, 1, 2), (1, 1, 0)])
def test_length_mismatch_is_rejected(hi: int, lo: int, out: int) -> None:
    with pytest.raises(ValueError):
        shard_of(np.ones(hi, np.uint64), np.ones(lo, np.uint64), 4, np.zeros(out, np.int32))
    with pytest.raises(ValueError):
        shard_of_reference([1] * hi, [1] * lo, 4, [0] * out)


def test_id_of_wrong_size_is_rejected() -> None:
    with pytest.raises(ValueError):
        shard_of_id(bytes(15), 4)


ID_BYTES = st.binary(min_size=16, max_size=16)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(ID_BYTES, ID_BYTES), max_size=60), SHARD_COUNTS)
def test_transfer_shard_items_count_each_touched_shard_once_per_transfer(pairs, shard_count):
    expected: dict[int, int] = {}
    for debit, credit in pairs:
        for shard in {shard_of_id(debit, shard_count), shard_of_id(credit, shard_count)}:
            expected[shard] = expected.get(shard, 0) + 1
    got = transfer_shard_items([d for d, _ in pairs], [c for _, c in pairs], shard_count)
    assert got == expected


def test_transfer_shard_items_refuse_bad_input():
    one = [bytes(16)]
    for debits, credits, count in ((one, one, 0), (one, one, 1025), (one, [], 8),
                                   ([bytes(15)], one, 8)):
        with pytest.raises(ValueError):
            transfer_shard_items(debits, credits, count)
