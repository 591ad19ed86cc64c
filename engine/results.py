"""Result and flag enums of the v1 contract, derived from the proto so there is one source."""
from __future__ import annotations

import enum

from engine.gen.txengine.v1 import ledger_pb2


def _from_proto(name: str, proto_enum, prefix: str) -> type[enum.IntEnum]:
    members = {
        key.removeprefix(prefix): value
        for key, value in proto_enum.items()
        if not key.endswith("_UNSPECIFIED")
    }
    return enum.IntEnum(name, members)


AccountResult = _from_proto("AccountResult", ledger_pb2.AccountResult, "ACCOUNT_RESULT_")
TransferResult = _from_proto("TransferResult", ledger_pb2.TransferResult, "TRANSFER_RESULT_")
ClosureResult = _from_proto("ClosureResult", ledger_pb2.ClosureResult, "CLOSURE_RESULT_")
AccountFlags = _from_proto("AccountFlags", ledger_pb2.AccountFlags, "ACCOUNT_FLAGS_")
TransferFlags = _from_proto("TransferFlags", ledger_pb2.TransferFlags, "TRANSFER_FLAGS_")
