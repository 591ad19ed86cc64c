"""Python client of txengine, the gRPC double-entry posting engine.

    from txengine_client import Client, Account, Transfer, new_id

    with Client("127.0.0.1:50051") as client:
        alice, bob = Account(ledger=1, code=1), Account(ledger=1, code=1)
        client.create_accounts([alice, bob])
        [result] = client.create_transfers([Transfer(debit_account_id=alice.id,
            credit_account_id=bob.id, amount=100, ledger=1, code=1)])
        assert result.is_ok_or_exists

`Client` blocks; `AsyncClient` (asyncio) also auto-batches concurrent `create_transfer` calls
and streams batches. See README.md beside this package for retries, errors and TLS.
"""
from txengine_client.aio import AsyncClient
from txengine_client.client import Client
from txengine_client.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TxengineError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from txengine_client.ids import ZERO_ID, IdLike, as_id, new_id
from txengine_client.options import ClientOptions, RetryPolicy
from txengine_client.types import (
    BATCH_ITEMS_MAX,
    ClosureOutcome,
    ClosureResult,
    Account,
    AccountBalance,
    AccountFilter,
    AccountFilterFlags,
    AccountFlags,
    AccountResult,
    CreateAccountResult,
    CreateResult,
    CreateTransferResult,
    Leg,
    LegKind,
    Transfer,
    TransferFlags,
    TransferResult,
)

__version__ = "0.1.0"

__all__ = [
    "BATCH_ITEMS_MAX", "ZERO_ID", "Account", "AccountBalance", "AccountFilter",
    "AccountFilterFlags", "AccountFlags", "AccountResult", "AsyncClient", "Cancelled", "Client",
    "ClientOptions", "ClosureOutcome", "ClosureResult", "CreateAccountResult", "CreateResult",
    "CreateTransferResult", "DeadlineExceeded", "FailedPrecondition", "FieldViolation", "IdLike",
    "Internal", "InvalidArgument", "Leg", "LegKind", "NotFound", "PermissionDenied",
    "ResourceExhausted", "RetryPolicy", "Transfer", "TransferFlags", "TransferResult",
    "TxengineError", "Unauthenticated", "Unavailable", "Unimplemented", "as_id", "new_id",
]
