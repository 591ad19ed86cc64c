"""Where the time of a transfer goes: seconds per pipeline stage, summed since start.

Every observation also feeds the Prometheus histograms of ``engine.observability.metrics``:
the seconds of each stage and the size of each committed batch. (A stage that raises is timed
too; it is not counted as a failure here, since the commit loop also raises on purpose, e.g.
to retry a batch with its ids looked up.)
"""
from __future__ import annotations

import collections
import contextlib
import time

from engine.observability import metrics

STAGES = ("decode", "fees", "load_accounts", "load_transfers", "prepare", "kernel", "write",
          "encode", "write_balances", "write_transfers")
# Parts of "write" (already counted in it): the balance UPDATE and the transfers COPY, the two
# statements whose cost grows with the batch; the rest of "write" is BEGIN, the shard fence,
# the request log, the outbox row and COMMIT.
WRITE_PARTS = ("write_balances", "write_transfers")

# Label children resolved once: observing costs a lock and an add, not a label lookup.
_STAGE_SECONDS = {name: metrics.STAGE_SECONDS.labels(stage=name) for name in STAGES}


class StageTimes:
    """Accumulated wall seconds per stage, plus committed batches and items."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self.batches = 0
        self._items = 0

    @property
    def items(self) -> int:
        return self._items

    @items.setter
    def items(self, value: int) -> None:
        # The commit loop adds each committed batch's item count once, after COMMIT, so the
        # increment is exactly one group-commit size.
        increment = value - self._items
        if increment > 0:
            metrics.COMMIT_BATCH_ITEMS.observe(increment)
        self._items = value

    @contextlib.contextmanager
    def stage(self, name: str):
        assert name in STAGES, name
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] += elapsed
            _STAGE_SECONDS[name].observe(elapsed)

    def snapshot(self) -> dict:
        return {"batches": self.batches, "items": self.items,
                "seconds": {name: self.seconds.get(name, 0.0) for name in STAGES}}
