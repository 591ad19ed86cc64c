"""Data-plane kernels: one call per batch over columns of integers.

apply_transfers, shard_of and transfer_shard_items are compiled from ext/*.pyx; engine.kernels.reference holds their
plain-Python oracles, and `results` (the module engine.kernels.constants) the result codes,
flag bits and limits as Python ints.
"""
from engine.kernels import constants as results
from engine.kernels._balance import apply_transfers
from engine.kernels._routing import shard_of, transfer_shard_items

__all__ = ["apply_transfers", "results", "shard_of", "transfer_shard_items"]
