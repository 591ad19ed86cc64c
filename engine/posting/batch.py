"""Requests as the posting engine sees them: columns decoded by the servicer, and a future.

A request is the unit of admission and of linked chains (a chain never crosses requests);
many requests go into one commit.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np

from engine.kernels import shard_of
from engine.ids import halves
from engine.posting.accounts import NewAccount


def shards_of(ids: list[bytes], shard_count: int) -> np.ndarray:
    """The shard of each 16-byte id (a stable hash, see ext/routing.pyx)."""
    hi, lo = halves(ids)
    out = np.empty(len(ids), np.int32)
    shard_of(hi, lo, shard_count, out)
    return out


@dataclasses.dataclass
class TransferColumns:
    """One CreateTransfers request, column by column; ids are exactly 16 bytes each."""

    ids: list[bytes]
    debit_ids: list[bytes]
    credit_ids: list[bytes]
    pending_ids: list[bytes]
    amount: np.ndarray  # uint64
    ledger: np.ndarray  # uint32
    code: np.ndarray  # uint32
    flags: np.ndarray  # uint32
    timeout_seconds: np.ndarray  # uint32
    user_data: list[bytes]
    # Per-item result decided before the balance kernel (0 = none), e.g. TIMESTAMP_MUST_BE_ZERO.
    precheck: np.ndarray  # uint32
    # Set only when an item names a fee schedule or refunds a fee transfer (engine/fees):
    # ZERO_ID where it does not.
    fee_schedule_ids: list[bytes] | None = None
    fee_schedule_versions: np.ndarray | None = None  # uint32, 0 = the latest
    refund_of: list[bytes] | None = None
    # Legs expanded by engine/fees: (index of the first leg, fee_transfers row without its
    # timestamp), stored when that leg commits.
    fee_records: list[tuple[int, tuple]] | None = None

    def __len__(self) -> int:
        return len(self.ids)


@dataclasses.dataclass
class Request:
    """A request waiting in the intake; `shard_items` is what it holds of each shard's queue."""

    future: asyncio.Future
    shard_items: dict[int, int]
    transfers: TransferColumns | None = None
    accounts: list[NewAccount] | None = None
    account_shards: list[int] | None = None
    # CloseAccounts / ReopenAccounts: the ids, and whether to set or clear CLOSED.
    closures: list[bytes] | None = None
    close: bool = True
    # Stored with the request's committed transfers (storage: request_log).
    correlation_id: str = ""
    enqueued_at: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def items(self) -> int:
        if self.transfers is not None:
            return len(self.transfers)
        return len(self.accounts if self.accounts is not None else self.closures or ())


@dataclasses.dataclass(frozen=True)
class Outcome:
    """Per-item results of one request, in request order."""

    results: list[int]
    timestamps: list[int]
    # Per item, for transfers with a fee schedule or refunds: their legs and schedule version.
    legs: list[list] | None = None
    fee_schedule_versions: list[int] | None = None
