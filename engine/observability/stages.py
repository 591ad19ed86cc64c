"""Where the time of a transfer goes: seconds per pipeline stage, summed since start."""
from __future__ import annotations

import collections
import contextlib
import time

STAGES = ("decode", "load_accounts", "load_transfers", "prepare", "kernel", "write", "encode")


class StageTimes:
    """Accumulated wall seconds per stage, plus committed batches and items."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self.batches = 0
        self.items = 0

    @contextlib.contextmanager
    def stage(self, name: str):
        assert name in STAGES, name
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def snapshot(self) -> dict:
        return {"batches": self.batches, "items": self.items,
                "seconds": {name: self.seconds.get(name, 0.0) for name in STAGES}}
