"""Typed signature of the compiled ext/routing.pyx (engine.kernels._routing)."""
import numpy as np
import numpy.typing as npt

def shard_of(
    hi: npt.NDArray[np.uint64],
    lo: npt.NDArray[np.uint64],
    shard_count: int,
    out: npt.NDArray[np.int32],
) -> None: ...

def transfer_shard_items(
    debit_ids: list[bytes], credit_ids: list[bytes], shard_count: int
) -> dict[int, int]: ...
