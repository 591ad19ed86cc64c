"""The event encoder kernel against its protobuf-runtime oracle (codec.commit_events), and the
outbox codec's framing: the same events whether a commit takes the kernel or the protobuf path."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from engine.events.codec import (BALANCE_DTYPE, STATE_DTYPE, OutboxEvents, TransferArrays,
                                 commit_events, encode_commits)
from engine.gen.txengine.v1 import ledger_pb2 as pb

ID = st.binary(min_size=16, max_size=16)
# Accounts from a small set, so that one commit changes an account several times.
ACCOUNT_ID = st.one_of(st.sampled_from([bytes([k]) * 16 for k in range(1, 6)]), ID)
U32 = st.integers(0, 2**32 - 1)
U63 = st.integers(0, 2**63 - 1)
BASE = 1_700_000_000_000_000_000


@st.composite
def commits(draw):
    """Consecutive commits: (outbox rows, transfer columns) as EventStore.commits_after returns."""
    sizes = draw(st.lists(st.integers(0, 12), min_size=1, max_size=4))
    columns = {name: [] for name in ("id", "debit_account_id", "credit_account_id", "pending_id",
                                     "amount", "ledger", "code", "flags", "timeout_seconds",
                                     "user_data", "timestamp", "seq_shard", "seq")}
    rows, stamp = [], BASE + draw(st.integers(0, 10**9))
    for size in sizes:
        first = stamp + 1
        for _ in range(size):
            stamp += draw(st.integers(1, 3))
            columns["id"].append(draw(ID))
            columns["debit_account_id"].append(draw(ACCOUNT_ID))
            columns["credit_account_id"].append(draw(ACCOUNT_ID))
            columns["pending_id"].append(draw(st.one_of(st.just(bytes(16)), ID)))
            columns["amount"].append(draw(U63))
            for name in ("ledger", "code", "flags", "timeout_seconds"):
                columns[name].append(draw(U32))
            columns["user_data"].append(draw(st.binary(max_size=16)))
            columns["timestamp"].append(stamp)
            columns["seq_shard"].append(draw(st.integers(0, 255)))
            columns["seq"].append(draw(U63))
        events = OutboxEvents()
        if draw(st.booleans()) or not size:
            row = (draw(st.integers(0, 255)), draw(ID), 1, 2, 0, 0, 0, 0, 0, b"", first)
            events.account_created(row)
        balances = np.array(draw(st.lists(U63, min_size=8 * size, max_size=8 * size)),
                            BALANCE_DTYPE).reshape(size, 8)
        events.transfer_balances.append(balances)
        stamp += 1
        rows.append(events.outbox_row(first, stamp).__dict__)
    return rows, columns


@settings(max_examples=200, deadline=None)
@given(commits())
def test_kernel_encodes_what_the_protobuf_runtime_builds(case):
    rows, columns = case
    encoded = encode_commits(rows, columns)
    arrays = TransferArrays(columns)
    start = 0
    for row, commit in zip(rows, encoded):
        end = start + row["transfer_count"]
        expected = commit_events(row, arrays.rows(start, end))
        start = end
        # Byte for byte: the kernel writes what the protobuf runtime serializes.
        assert commit.events == pb.EventBatch(events=expected).SerializeToString()
        assert commit.messages() == expected
        assert commit.count == len(expected)
        per_shard = []
        for shard, (payload, count) in commit.shard_events.items():
            batch = pb.EventBatch.FromString(payload).events
            assert len(batch) == count and {e.shard for e in batch} == {shard}
            per_shard.extend(batch)
        per_shard.sort(key=lambda e: e.cursor.index)
        assert per_shard == expected
        # The projection records leave each account in the state after its last event.
        records = np.frombuffer(commit.states, STATE_DTYPE)
        projected = {}
        for r in records:
            projected[bytes.fromhex(r["id"].decode())] = tuple(int(r[f]) for f in STATE_DTYPE.names[1:])
        final = {}
        for e in expected:
            if e.HasField("transfer"):
                for account_id, b in ((e.transfer.debit_account_id, e.debit_account_balance),
                                      (e.transfer.credit_account_id, e.credit_account_balance)):
                    final[account_id] = (b.timestamp, b.debits_pending, b.debits_posted,
                                         b.credits_pending, b.credits_posted)
            else:
                a = e.account
                final[a.id] = (e.timestamp, a.debits_pending, a.debits_posted,
                               a.credits_pending, a.credits_posted)
        assert projected == final
