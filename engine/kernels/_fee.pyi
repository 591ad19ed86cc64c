"""Typed signature of the compiled ext/fee.pyx (engine.kernels._fee)."""
import numpy as np
import numpy.typing as npt

_I32 = npt.NDArray[np.int32]
_U32 = npt.NDArray[np.uint32]
_U64 = npt.NDArray[np.uint64]

def layout() -> dict[str, int]: ...
def expand_fees(
    amount: _U64,
    schedule: _I32,
    schedules: _U64,
    fees: _U64,
    tiers: _U64,
    split_weights: _U64,
    legs: _U64,
    result: _U32,
) -> int: ...
def allocate_refunds(
    original: _U64,
    refunded: _U64,
    amount: _U64,
    out: _U64,
    result: _U32,
) -> int: ...
