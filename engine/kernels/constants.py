"""The kernels' constants as plain Python ints, for the reference implementations and tests.

Derived from the proto enums (engine.results) and engine.limits, so there is one source of each
number; ext/results.pxd is the C-level mirror, and tests/unit/test_kernel_constants.py checks
it against the proto. Plain ints, not IntEnums, because they are compared against numpy columns.
"""
from engine import limits
from engine.results import AccountFlags, TransferFlags, TransferResult

TRANSFER_UNSPECIFIED = 0
globals().update({f"TRANSFER_{m.name}": int(m) for m in TransferResult})
globals().update({f"TRANSFER_FLAG_{m.name}": int(m) for m in TransferFlags})
globals().update({f"ACCOUNT_FLAG_{m.name}": int(m) for m in AccountFlags})

BALANCE_MAX = limits.BALANCE_MAX
SHARD_COUNT_MIN = 1
SHARD_COUNT_MAX = limits.SHARDS_MAX
