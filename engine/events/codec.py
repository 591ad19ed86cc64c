"""The committed-event format: what a commit writes to the outbox, and the Events read back.

A commit's transfers are not copied into the outbox: its row holds only the balances after each
transfer (8 uint64 per transfer, in timestamp order) and, serialized as an EventBatch, the rarer
events (accounts created, closed or reopened, reservations expired). Reading joins that row
with the transfers stamped in the commit's timestamp range, merges both by timestamp and
numbers the events: their cursor is (commit_timestamp, index).
"""
from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.ids import ZERO_ID
from engine.storage.store import TRANSFER_FIELDS, OutboxRow

BALANCE_WORDS = 8  # debit account dp, dpo, cp, cpo, then the credit account's
BALANCE_DTYPE = np.dtype("<u8")


class OutboxEvents:
    """What one commit collects for its outbox row, in commit order."""

    def __init__(self) -> None:
        self.transfer_balances: list[np.ndarray] = []  # (n, 8) uint64 per kernel call
        self.other = pb.EventBatch()

    def account_created(self, row: tuple) -> None:
        """`row` in ACCOUNT_COLUMNS order, as just created."""
        self._account(pb.EVENT_TYPE_ACCOUNT_CREATED, row, row[10])

    def account_closed(self, row: tuple, timestamp: int, closed: bool) -> None:
        kind = pb.EVENT_TYPE_ACCOUNT_CLOSED if closed else pb.EVENT_TYPE_ACCOUNT_REOPENED
        self._account(kind, row, timestamp)

    def _account(self, kind: int, row: tuple, timestamp: int) -> None:
        self.other.events.append(pb.Event(
            type=kind, shard=row[0], timestamp=timestamp, account=pb.Account(
                id=row[1], ledger=row[2], code=row[3], flags=row[4], debits_pending=row[5],
                debits_posted=row[6], credits_pending=row[7], credits_posted=row[8],
                user_data=row[9], timestamp=row[10])))

    def transfer_expired(self, state: Sequence, shard: int, timestamp: int,
                         debit_balances: tuple, credit_balances: tuple) -> None:
        """`state` is the pending transfer in TRANSFER_STATE order."""
        self.other.events.append(pb.Event(
            type=pb.EVENT_TYPE_TRANSFER_EXPIRED, shard=shard, timestamp=timestamp,
            transfer=transfer_message(dict(zip(TRANSFER_FIELDS, state))),
            debit_account_balance=pb.AccountBalance(timestamp=timestamp, **_named(debit_balances)),
            credit_account_balance=pb.AccountBalance(timestamp=timestamp, **_named(credit_balances))))

    def outbox_row(self, first_timestamp: int, commit_timestamp: int) -> OutboxRow | None:
        """The commit's outbox row, or None when it changed nothing."""
        balances = (np.concatenate(self.transfer_balances) if self.transfer_balances
                    else np.zeros((0, BALANCE_WORDS), BALANCE_DTYPE))
        if not len(balances) and not self.other.events:
            return None
        return OutboxRow(
            commit_timestamp=commit_timestamp, first_timestamp=first_timestamp,
            transfer_count=len(balances),
            transfer_balances=np.ascontiguousarray(balances, BALANCE_DTYPE).tobytes(),
            other_events=self.other.SerializeToString(),
        )


def _named(balances) -> dict[str, int]:
    dp, dpo, cp, cpo = balances
    return {"debits_pending": dp, "debits_posted": dpo, "credits_pending": cp,
            "credits_posted": cpo}


def transfer_message(row) -> pb.Transfer:
    """A Transfer from a mapping with the TRANSFER_FIELDS keys (a record or a dict)."""
    pending_id = row["pending_id"]
    return pb.Transfer(
        id=row["id"], debit_account_id=row["debit_account_id"],
        credit_account_id=row["credit_account_id"], amount=row["amount"],
        pending_id=b"" if pending_id == ZERO_ID else pending_id, ledger=row["ledger"],
        code=row["code"], flags=row["flags"], timeout_seconds=row["timeout_seconds"],
        user_data=row["user_data"], timestamp=row["timestamp"],
    )


class OutboxCorrupt(Exception):
    """An outbox row does not match the transfers of its commit."""


def commit_events(outbox, transfers: Sequence) -> list[pb.Event]:
    """Every event of one commit, numbered, in commit order.

    `outbox` is an event_outbox row; `transfers` are the rows of transfers stamped in its range
    (TRANSFER_FIELDS, seq_shard, seq), in timestamp order."""
    count = outbox["transfer_count"]
    if len(transfers) != count:
        raise OutboxCorrupt(f"commit {outbox['commit_timestamp']}: outbox counts {count} "
                            f"transfers, the transfers table has {len(transfers)}")
    balances = np.frombuffer(outbox["transfer_balances"], BALANCE_DTYPE).reshape(count, 8).tolist()
    committed = []
    for row, b in zip(transfers, balances):
        timestamp = row["timestamp"]
        committed.append(pb.Event(
            type=pb.EVENT_TYPE_TRANSFER_COMMITTED, shard=row["seq_shard"], seq=row["seq"],
            timestamp=timestamp, transfer=transfer_message(row),
            debit_account_balance=pb.AccountBalance(
                timestamp=timestamp, debits_pending=b[0], debits_posted=b[1],
                credits_pending=b[2], credits_posted=b[3]),
            credit_account_balance=pb.AccountBalance(
                timestamp=timestamp, debits_pending=b[4], debits_posted=b[5],
                credits_pending=b[6], credits_posted=b[7])))
    others = pb.EventBatch.FromString(outbox["other_events"]).events
    events = list(heapq.merge(others, committed, key=lambda e: e.timestamp)) if others else committed
    commit_timestamp = outbox["commit_timestamp"]
    for index, event in enumerate(events):
        event.cursor.commit_timestamp = commit_timestamp
        event.cursor.index = index
    return events
