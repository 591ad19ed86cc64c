"""Typed signature of the compiled ext/balance.pyx (engine.kernels._balance)."""
import numpy as np
import numpy.typing as npt

_U8 = npt.NDArray[np.uint8]
_U32 = npt.NDArray[np.uint32]
_U64 = npt.NDArray[np.uint64]
_I64 = npt.NDArray[np.int64]

def apply_transfers(
    id_hi: _U64, id_lo: _U64,
    debit_hi: _U64, debit_lo: _U64,
    credit_hi: _U64, credit_lo: _U64,
    pending_hi: _U64, pending_lo: _U64,
    amount: _U64,
    ledger: _U32, code: _U32, flags: _U32,
    timeout_seconds: _U32,
    user_data_key: _I64,
    debit_slot: _I64, credit_slot: _I64,
    chain_break: _U8,
    dup_prev: _I64, exists_row: _I64,
    pending_prev: _I64, pending_row: _I64,
    existing_timestamp: _I64,
    precheck: _U32,
    timestamp_base: int,
    acc_ledger: _U32, acc_flags: _U32,
    acc_debits_pending: _U64, acc_debits_posted: _U64,
    acc_credits_pending: _U64, acc_credits_posted: _U64,
    status: _U8, expires_at: _I64,
    result: _U32, timestamp_out: _I64,
    amount_out: _U64, resolved_row: _I64,
    balances_after: _U64,  # shape (n, 8), C-contiguous
) -> int: ...

def pending_statuses() -> dict[str, int]: ...

def kernel_constants() -> dict[str, int]: ...
