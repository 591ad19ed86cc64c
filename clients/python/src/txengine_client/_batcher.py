"""Auto-batching for `AsyncClient.create_transfer`: many concurrent single transfers, one
CreateTransfers.

A batch opens with its first transfer and closes when `window_s` has passed or it holds
`items_max` transfers. A closed batch is sent when fewer than `in_flight_max` are in flight;
while they are all busy, an open batch whose window has passed stays open and keeps growing
(group commit: the busier the server, the larger the batches). Each caller's future gets its
own result, with index 0.

Linked transfers are refused: a chain must be one request, and a LINKED transfer in a batch of
strangers would chain to whichever transfer follows it.

A request rejected as a whole must not fail the strangers in its batch. When the server names
the bad items (INVALID_ARGUMENT with `transfers[i]` field violations) only their callers get the
error and the rest is sent again; other request-level rejections (INVALID_ARGUMENT without
indices, UNIMPLEMENTED) are bisected until each error lands on the caller who caused it. Both
re-sends are safe: a rejected request applied nothing, and ids are idempotency keys anyway.
"""
from __future__ import annotations

import asyncio
import collections
import re
from collections.abc import Awaitable, Callable

import grpc

from txengine_client.errors import FieldViolation, TxengineError
from txengine_client.types import CreateResult, CreateTransferResult, Transfer, TransferFlags

SendBatch = Callable[[list[Transfer]], Awaitable[list[CreateTransferResult]]]

TRANSFER_INDEX_RE = re.compile(r"^transfers\[(\d+)\]")
BISECTED_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED})

Item = tuple[Transfer, asyncio.Future]


class TransferBatcher:
    def __init__(self, send: SendBatch, *, window_s: float, items_max: int, in_flight_max: int):
        assert window_s >= 0 and items_max >= 1 and in_flight_max >= 1
        self._send = send
        self._window_s = window_s
        self._items_max = items_max
        self._in_flight_max = in_flight_max
        self._open: list[Item] = []
        self._window_elapsed = False
        self._timer: asyncio.TimerHandle | None = None
        self._closed: collections.deque[list[Item]] = collections.deque()
        self._in_flight: set[asyncio.Task] = set()
        self._stopping = False
        self.requests_sent = 0
        self.transfers_sent = 0

    def submit(self, transfer: Transfer) -> asyncio.Future:
        """The future of this transfer's result; enqueued before this returns."""
        if transfer.flags & TransferFlags.LINKED:
            raise ValueError("a LINKED transfer cannot be auto-batched: send its whole chain "
                             "with create_transfers([...])")
        if self._stopping:
            raise RuntimeError("the client is closed")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._open.append((transfer, future))
        if len(self._open) >= self._items_max:
            self._close_open_batch()
            self._dispatch()
        elif self._timer is None and not self._window_elapsed:
            self._timer = loop.call_later(self._window_s, self._on_window)
        return future

    async def drain(self) -> None:
        """Send everything submitted, without waiting for windows, and wait for the results."""
        self._stopping = True
        self._close_open_batch()
        self._dispatch()
        while self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
            self._dispatch()

    def _on_window(self) -> None:
        self._timer = None
        self._window_elapsed = True
        if len(self._in_flight) < self._in_flight_max:
            self._close_open_batch()
            self._dispatch()

    def _close_open_batch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._window_elapsed = False
        if self._open:
            self._closed.append(self._open)
            self._open = []

    def _dispatch(self) -> None:
        while len(self._in_flight) < self._in_flight_max:
            if not self._closed and self._open and (self._window_elapsed or self._stopping):
                self._close_open_batch()
            if not self._closed:
                return
            task = asyncio.create_task(self._deliver(self._closed.popleft()))
            self._in_flight.add(task)
            task.add_done_callback(self._on_sent)

    def _on_sent(self, task: asyncio.Task) -> None:
        self._in_flight.discard(task)
        self._dispatch()

    async def _deliver(self, batch: list[Item]) -> None:
        live = [item for item in batch if not item[1].done()]  # callers may have cancelled
        if not live:
            return
        self.requests_sent += 1
        self.transfers_sent += len(live)
        try:
            results = await self._send([transfer for transfer, _ in live])
        except TxengineError as error:
            await self._rejected(live, error)
            return
        except BaseException as error:
            _fail(live, error)
            if isinstance(error, asyncio.CancelledError):
                raise
            return
        for (_, future), result in zip(live, results):
            if not future.done():
                future.set_result(CreateResult(0, result.result, result.timestamp))

    async def _rejected(self, batch: list[Item], error: TxengineError) -> None:
        if len(batch) == 1 or error.code not in BISECTED_CODES:
            _fail(batch, error)
            return
        named = _violations_by_index(error.violations, len(batch))
        if named:
            for index, violations in named.items():
                _fail([batch[index]], _own_error(error, violations))
            rest = [item for index, item in enumerate(batch) if index not in named]
            if rest:
                await self._deliver(rest)
            return
        half = len(batch) // 2
        await asyncio.gather(self._deliver(batch[:half]), self._deliver(batch[half:]))


def _violations_by_index(violations, count: int) -> dict[int, list[FieldViolation]]:
    """Violations per transfer index, renamed to the caller's own view (`transfers[0]...`);
    empty unless every violation names a transfer of this batch."""
    named: dict[int, list[FieldViolation]] = {}
    for violation in violations:
        match = TRANSFER_INDEX_RE.match(violation.field)
        if match is None or int(match.group(1)) >= count:
            return {}
        own_field = "transfers[0]" + violation.field[match.end():]
        named.setdefault(int(match.group(1)), []).append(
            FieldViolation(own_field, violation.description))
    return named


def _own_error(error: TxengineError, violations: list[FieldViolation]) -> TxengineError:
    message = "; ".join(f"{v.field}: {v.description}" for v in violations)
    return type(error)(message, code=error.code, violations=tuple(violations),
                       reason=error.reason, retry_delay_s=error.retry_delay_s,
                       correlation_id=error.correlation_id, attempts=error.attempts)


def _fail(batch: list[Item], error: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(error)
