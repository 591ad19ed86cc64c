"""The committed-event format: what a commit writes to the outbox, and the Events read back.

A commit's transfers are not copied into the outbox: its row holds only the balances after each
transfer (8 uint64 per transfer, in timestamp order) and, serialized as an EventBatch, the rarer
events (accounts created, closed or reopened, reservations expired). Reading joins that row
with the transfers stamped in the commit's timestamp range, merges both by timestamp and
numbers the events: their cursor is (commit_timestamp, index).
"""
from __future__ import annotations

import heapq
import struct
from collections.abc import Sequence

import numpy as np

from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.ids import ZERO_ID
from engine.storage.store import TRANSFER_FIELDS, OutboxRow

BALANCE_WORDS = 8  # debit account dp, dpo, cp, cpo, then the credit account's
# Largest wire size of one transfer event as an EventBatch element: cursor 19, type 2, shard 6,
# seq 11, timestamp 11, transfer 139 (with 16 bytes of user_data), two balances 114, framing 3.
EVENT_WIRE_BYTES_MAX = 320
BALANCE_DTYPE = np.dtype("<u8")

# After a commit, outbox readers wait this long before reading, so that one read takes the
# commits made meanwhile (at most this much added to publication lag).
CONSUMER_GATHER_SECONDS = 0.02


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


# -- the fast path: transfers as columns, encoded by the events kernel -------------------------

HEX_DIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)
STATE_DTYPE = np.dtype([("id", "S32"), ("version", ">i8"), ("debits_pending", ">u8"),
                        ("debits_posted", ">u8"), ("credits_pending", ">u8"),
                        ("credits_posted", ">u8")])


class TransferArrays:
    """Transfers of consecutive commits as columns (EVENT_TRANSFER_COLUMNS), timestamp order."""

    def __init__(self, columns: dict):
        def ids(name: str) -> np.ndarray:
            return np.frombuffer(b"".join(columns[name]), np.uint8)

        self.id, self.debit, self.credit = ids("id"), ids("debit_account_id"), ids("credit_account_id")
        self.pending = ids("pending_id")
        self.amount = np.array(columns["amount"], np.uint64)
        self.ledger = np.array(columns["ledger"], np.int64)
        self.code = np.array(columns["code"], np.int64)
        self.flags = np.array(columns["flags"], np.int64)
        self.timeout = np.array(columns["timeout_seconds"], np.int64)
        self.timestamp = np.array(columns["timestamp"], np.int64)
        self.shard = np.array(columns["seq_shard"], np.int64)
        self.seq = np.array(columns["seq"], np.int64)
        self.user_data_list = list(columns["user_data"])
        self.user_data = np.frombuffer(b"".join(self.user_data_list) or b"\0", np.uint8)
        self.user_data_offsets = np.zeros(len(self.timestamp) + 1, np.int64)
        np.cumsum([len(u) for u in self.user_data_list], out=self.user_data_offsets[1:])

    @classmethod
    def empty(cls) -> "TransferArrays":
        return cls({name: [] for name in ("id", "debit_account_id", "credit_account_id",
                                          "pending_id", "amount", "ledger", "code", "flags",
                                          "timeout_seconds", "timestamp", "seq_shard", "seq",
                                          "user_data")})

    def __len__(self) -> int:
        return len(self.timestamp)

    def rows(self, start: int, end: int) -> list[dict]:
        """Rows start..end-1 as mappings, for the protobuf path."""
        def uid(column: np.ndarray, r: int) -> bytes:
            return column[r * 16:(r + 1) * 16].tobytes()

        return [{
            "id": uid(self.id, r), "debit_account_id": uid(self.debit, r),
            "credit_account_id": uid(self.credit, r), "amount": int(self.amount[r]),
            "pending_id": uid(self.pending, r), "ledger": int(self.ledger[r]),
            "code": int(self.code[r]), "flags": int(self.flags[r]),
            "timeout_seconds": int(self.timeout[r]), "user_data": self.user_data_list[r],
            "timestamp": int(self.timestamp[r]), "seq_shard": int(self.shard[r]),
            "seq": int(self.seq[r]),
        } for r in range(start, end)]


def _hex(ids: np.ndarray) -> np.ndarray:
    """16-byte ids (flat uint8) as 32-character lowercase hex strings (S32)."""
    digits = ids.reshape(-1, 16)
    out = np.empty((len(digits), 32), np.uint8)
    out[:, 0::2] = HEX_DIGITS[digits >> 4]
    out[:, 1::2] = HEX_DIGITS[digits & 15]
    return out.view("S32").ravel()


class EncodedCommit:
    """One commit's events in wire form: all of them, and per shard, plus the projection
    records of the balances they leave (see engine.events.relay for the layouts)."""

    def __init__(self, commit_timestamp: int, events: bytes, shard_events: dict[int, tuple[bytes, int]],
                 states: bytes, accounts: list[bytes], count: int):
        self.commit_timestamp = commit_timestamp
        self.events = events
        self.shard_events = shard_events
        self.states = states
        self.accounts = accounts
        self.count = count

    def messages(self) -> list[pb.Event]:
        return list(pb.EventBatch.FromString(self.events).events)


def encode_commit(outbox, arrays: TransferArrays, start: int, end: int) -> EncodedCommit:
    """Encode one commit whose transfers are rows start..end-1 of `arrays`."""
    count = outbox["transfer_count"]
    if end - start != count:
        raise OutboxCorrupt(f"commit {outbox['commit_timestamp']}: outbox counts {count} "
                            f"transfers, the transfers table has {end - start}")
    if outbox["other_events"]:
        return _encode_messages(outbox["commit_timestamp"],
                                commit_events(outbox, arrays.rows(start, end)))
    from engine.kernels._events import encode_transfer_events

    commit_timestamp = outbox["commit_timestamp"]
    balances = np.frombuffer(outbox["transfer_balances"], BALANCE_DTYPE)
    shard = arrays.shard[start:end]
    ids = slice(start * 16, end * 16)
    offsets = arrays.user_data_offsets[start:end + 1]
    columns = (
        np.arange(count, dtype=np.int64), shard, arrays.seq[start:end],
        arrays.timestamp[start:end], arrays.id[ids], arrays.debit[ids], arrays.credit[ids],
        arrays.pending[ids], arrays.amount[start:end], arrays.ledger[start:end],
        arrays.code[start:end], arrays.flags[start:end], arrays.timeout[start:end],
        arrays.user_data[offsets[0]:max(offsets[-1], offsets[0] + 1)], offsets - offsets[0],
        balances)
    in_order = np.arange(count, dtype=np.int64)
    out_offsets = np.empty(count + 1, np.int64)
    events = encode_transfer_events(commit_timestamp, *columns, in_order, out_offsets)
    by_shard = np.argsort(shard, kind="stable")
    grouped_offsets = np.empty(count + 1, np.int64)
    grouped = encode_transfer_events(commit_timestamp, *columns, by_shard, grouped_offsets)
    shard_events = {}
    sorted_shards = shard[by_shard]
    for value in np.unique(sorted_shards).tolist():
        first, last = np.searchsorted(sorted_shards, [value, value + 1])
        shard_events[value] = (grouped[grouped_offsets[first]:grouped_offsets[last]],
                               int(last - first))
    states = np.empty(2 * count, STATE_DTYPE)
    states["id"][0::2] = _hex(arrays.debit[ids])
    states["id"][1::2] = _hex(arrays.credit[ids])
    states["version"] = np.repeat(arrays.timestamp[start:end], 2)
    pairs = balances.reshape(count * 2, 4)
    for k, name in enumerate(("debits_pending", "debits_posted", "credits_pending",
                              "credits_posted")):
        states[name] = pairs[:, k]
    # Only each account's last state in the commit reaches Redis (the commit is applied as a
    # whole): the first occurrence of an id in the reversed records is its last change.
    _, last = np.unique(states["id"][::-1], return_index=True)
    states = states[np.sort(len(states) - 1 - last)]
    return EncodedCommit(commit_timestamp, events, shard_events, states.tobytes(), [], count)


def _encode_messages(commit_timestamp: int, events: list[pb.Event]) -> EncodedCommit:
    """The protobuf path, for commits with events other than transfers."""
    by_shard: dict[int, list[pb.Event]] = {}
    states = []
    accounts: list[bytes] = []
    for event in events:
        by_shard.setdefault(event.shard, []).append(event)
        if event.HasField("transfer"):
            transfer = event.transfer
            states.append((transfer.debit_account_id, event.debit_account_balance))
            states.append((transfer.credit_account_id, event.credit_account_balance))
        else:
            account = event.account
            states.append((account.id, pb.AccountBalance(
                timestamp=event.timestamp, debits_pending=account.debits_pending,
                debits_posted=account.debits_posted, credits_pending=account.credits_pending,
                credits_posted=account.credits_posted)))
            accounts += [account.id.hex().encode(), account_value(account)]
    records = np.empty(len(states), STATE_DTYPE)
    for k, (account_id, b) in enumerate(states):
        records[k] = (account_id.hex().encode(), b.timestamp, b.debits_pending, b.debits_posted,
                      b.credits_pending, b.credits_posted)
    return EncodedCommit(
        commit_timestamp, pb.EventBatch(events=events).SerializeToString(),
        {shard: (pb.EventBatch(events=e).SerializeToString(), len(e))
         for shard, e in by_shard.items()},
        records.tobytes(), accounts, len(events))


ACCOUNT_HEAD = struct.Struct(">IIIq")


def account_value(account: pb.Account) -> bytes:
    """The projection's `account` field: ledger, code, flags, timestamp, then user_data."""
    return ACCOUNT_HEAD.pack(account.ledger, account.code, account.flags,
                             account.timestamp) + account.user_data


def encode_commits(rows: list, columns: dict | None) -> list[EncodedCommit]:
    """Encode what EventStore.commits_after returned, one EncodedCommit per outbox row."""
    arrays = TransferArrays(columns) if columns is not None else TransferArrays.empty()
    bounds = np.searchsorted(arrays.timestamp, [r["commit_timestamp"] for r in rows], "right")
    out, start = [], 0
    for row, end in zip(rows, bounds.tolist()):
        out.append(encode_commit(row, arrays, start, end))
        start = end
    return out
