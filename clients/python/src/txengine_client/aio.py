"""`AsyncClient`: the asyncio (grpc.aio) txengine client, with auto-batching and streaming.

Deadlines and retries are those of `Client`. `create_transfer` coalesces concurrent calls into
few CreateTransfers requests (see `txengine_client._batcher`); `stream_transfers` pipelines
explicit batches over one StreamTransfers call.
"""
from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from typing import Any, Self

import grpc

from txengine_client import _convert
from txengine_client._batcher import TransferBatcher
from txengine_client._gen.txengine.v1 import ledger_pb2 as pb
from txengine_client._gen.txengine.v1 import ledger_pb2_grpc
from txengine_client.client import FilterLike, _chunks, check_results, new_correlation_id
from txengine_client.errors import Internal, from_rpc_error
from txengine_client.ids import IdLike
from txengine_client.options import ClientOptions
from txengine_client.types import (
    ClosureOutcome,
    ClosureResult,
    CreateResult,
    Account,
    AccountBalance,
    CreateAccountResult,
    CreateTransferResult,
    Transfer,
)

Batches = AsyncIterable[Sequence[Transfer]] | Iterable[Sequence[Transfer]]


def open_aio_channel(address: str, options: ClientOptions) -> grpc.aio.Channel:
    credentials = options.credentials()
    channel_options = options.grpc_channel_options()
    if credentials is None:
        return grpc.aio.insecure_channel(address, channel_options)
    return grpc.aio.secure_channel(address, credentials, channel_options)


class AsyncClient:
    """An asyncio client of one txengine server; create and use it inside one event loop.

    >>> async with AsyncClient("127.0.0.1:50051") as client:
    ...     result = await client.create_transfer(Transfer(debit_account_id=a,
    ...         credit_account_id=b, amount=100, ledger=1, code=1))
    """

    def __init__(self, address: str, *, options: ClientOptions | None = None):
        self.address = address
        self.options = options or ClientOptions()
        self._channel = open_aio_channel(address, self.options)
        self._stub = ledger_pb2_grpc.LedgerServiceStub(self._channel)
        self._batcher = TransferBatcher(
            self.create_transfers, window_s=self.options.batch_window_s,
            items_max=self.options.batch_items_max,
            in_flight_max=self.options.batch_in_flight_max)

    @property
    def auto_batching_stats(self) -> tuple[int, int]:
        """(CreateTransfers requests, transfers) sent so far for `create_transfer` callers."""
        return self._batcher.requests_sent, self._batcher.transfers_sent

    async def close(self) -> None:
        """Send what is still waiting in the auto-batcher, then close the channel."""
        await self._batcher.drain()
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- creating ---------------------------------------------------------------------------

    async def create_accounts(self, accounts: Iterable[Account], *,
                              deadline_s: float | None = None,
                              correlation_id: str | None = None) -> list[CreateAccountResult]:
        """One result per account, in order; see `Client.create_accounts`."""
        request = _convert.create_accounts_request(accounts)
        response = await self._unary(self._stub.CreateAccounts, request, deadline_s,
                                     correlation_id)
        return check_results(_convert.account_results(response.results), len(request.accounts))

    async def create_account(self, account: Account, *, deadline_s: float | None = None,
                             correlation_id: str | None = None) -> CreateAccountResult:
        [result] = await self.create_accounts([account], deadline_s=deadline_s,
                                              correlation_id=correlation_id)
        return result

    async def create_transfers(self, transfers: Iterable[Transfer], *,
                               deadline_s: float | None = None,
                               correlation_id: str | None = None,
                               ) -> list[CreateTransferResult]:
        """One explicit batch, one request: one result per transfer, in order. At most 8,190
        transfers; this is how to send a LINKED chain."""
        request = _convert.create_transfers_request(transfers)
        response = await self._unary(self._stub.CreateTransfers, request, deadline_s,
                                     correlation_id)
        return check_results(_convert.transfer_results(response.results), len(request.transfers))

    async def create_transfer(self, transfer: Transfer) -> CreateTransferResult:
        """One transfer, auto-batched with the other callers of this client.

        Calls made within `ClientOptions.batch_window_s` of each other (or up to
        `batch_items_max` of them) share one CreateTransfers request; each caller gets its own
        result (index 0) or error. The shared request has its own correlation id and the
        client's default deadline and retries. LINKED transfers are refused with ValueError:
        send a chain with `create_transfers`. Cancelling the await does not withdraw a
        transfer already sent.
        """
        return await self._batcher.submit(transfer)

    # -- reading ----------------------------------------------------------------------------

    async def close_accounts(self, ids: Iterable[IdLike], *, deadline_s: float | None = None,
                       correlation_id: str | None = None) -> list[ClosureOutcome]:
        """Set CLOSED: the accounts accept no new transfers (pending ones may still be posted
        or voided). Idempotent, so safe to retry."""
        return await self._set_closed(True, ids, deadline_s, correlation_id)

    async def reopen_accounts(self, ids: Iterable[IdLike], *, deadline_s: float | None = None,
                        correlation_id: str | None = None) -> list[ClosureOutcome]:
        """Clear CLOSED. Idempotent, so safe to retry."""
        return await self._set_closed(False, ids, deadline_s, correlation_id)

    async def _set_closed(self, close: bool, ids: Iterable[IdLike], deadline_s: float | None,
                    correlation_id: str | None) -> list[ClosureOutcome]:
        rpc = self._stub.CloseAccounts if close else self._stub.ReopenAccounts
        message = pb.CloseAccountsRequest if close else pb.ReopenAccountsRequest
        outcomes: list[ClosureOutcome] = []
        for chunk in _chunks(_convert.ids_message(ids)):
            response = await self._unary(rpc, message(ids=chunk), deadline_s, correlation_id)
            base = len(outcomes)
            outcomes.extend(CreateResult(base + r.index, ClosureResult(r.result), r.timestamp)
                            for r in response.results)
        return outcomes

    async def lookup_accounts(self, ids: Iterable[IdLike], *, deadline_s: float | None = None,
                              correlation_id: str | None = None) -> list[Account]:
        found: list[Account] = []
        for chunk in _chunks(_convert.ids_message(ids)):
            response = await self._unary(self._stub.LookupAccounts,
                                         pb.LookupAccountsRequest(ids=chunk), deadline_s,
                                         correlation_id)
            found.extend(_convert.account_from(a) for a in response.accounts)
        return found

    async def lookup_transfers(self, ids: Iterable[IdLike], *,
                               deadline_s: float | None = None,
                               correlation_id: str | None = None) -> list[Transfer]:
        found: list[Transfer] = []
        for chunk in _chunks(_convert.ids_message(ids)):
            response = await self._unary(self._stub.LookupTransfers,
                                         pb.LookupTransfersRequest(ids=chunk), deadline_s,
                                         correlation_id)
            found.extend(_convert.transfer_from(t) for t in response.transfers)
        return found

    async def get_account_transfers(self, account: FilterLike, *,
                                    deadline_s: float | None = None,
                                    correlation_id: str | None = None) -> list[Transfer]:
        """One page of an account's transfers; see `Client.get_account_transfers`."""
        request = pb.GetAccountTransfersRequest(
            filter=_convert.account_filter(_convert.as_filter(account)))
        response = await self._unary(self._stub.GetAccountTransfers, request, deadline_s,
                                     correlation_id)
        return [_convert.transfer_from(t) for t in response.transfers]

    async def get_account_balances(self, account: FilterLike, *,
                                   deadline_s: float | None = None,
                                   correlation_id: str | None = None) -> list[AccountBalance]:
        """One page of the historical balances of an account with the HISTORY flag."""
        request = pb.GetAccountBalancesRequest(
            filter=_convert.account_filter(_convert.as_filter(account)))
        response = await self._unary(self._stub.GetAccountBalances, request, deadline_s,
                                     correlation_id)
        return [_convert.balance_from(b) for b in response.balances]

    async def iter_account_transfers(self, account: FilterLike, *,
                                     deadline_s: float | None = None,
                                     ) -> AsyncIterator[Transfer]:
        page_filter = _convert.as_filter(account)
        while True:
            page = await self.get_account_transfers(page_filter, deadline_s=deadline_s)
            for transfer in page:
                yield transfer
            if len(page) < page_filter.limit:
                return
            page_filter = page_filter.next_page(page[-1].timestamp)

    async def iter_account_balances(self, account: FilterLike, *,
                                    deadline_s: float | None = None,
                                    ) -> AsyncIterator[AccountBalance]:
        page_filter = _convert.as_filter(account)
        while True:
            page = await self.get_account_balances(page_filter, deadline_s=deadline_s)
            for balance in page:
                yield balance
            if len(page) < page_filter.limit:
                return
            page_filter = page_filter.next_page(page[-1].timestamp)

    # -- streaming --------------------------------------------------------------------------

    def stream_transfers(self, batches: Batches, *, in_flight_max: int | None = None,
                         correlation_id: str | None = None,
                         ) -> AsyncIterator[list[CreateTransferResult]]:
        """Pipelined CreateTransfers over one StreamTransfers call.

        Yields the results of each batch of `batches` (an async or plain iterable), in order,
        with at most `in_flight_max` batches sent and not yet answered. If the stream breaks
        with a retryable status, a new stream is opened and the unanswered batches are sent
        again (safe: same ids), within the client's RetryPolicy. The stream has no deadline.
        """
        stream = _TransferStream(self, batches,
                                 in_flight_max or self.options.stream_in_flight_max,
                                 correlation_id or new_correlation_id())
        return stream.results()

    # -- calls ------------------------------------------------------------------------------

    async def _unary(self, rpc, request, deadline_s: float | None,
                     correlation_id: str | None):
        correlation_id = correlation_id or new_correlation_id()
        metadata = self.options.metadata(correlation_id)
        timeout = self.options.deadline_s if deadline_s is None else deadline_s
        policy = self.options.retry
        attempt = 1
        while True:
            try:
                return await rpc(request, timeout=timeout, metadata=metadata)
            except grpc.aio.AioRpcError as error:
                failure = from_rpc_error(error, correlation_id=correlation_id, attempts=attempt)
                if not policy.should_retry(failure.code, attempt):
                    raise failure from error
            await asyncio.sleep(policy.pause_s(attempt, failure.retry_delay_s))
            attempt += 1


async def _aiter(batches: Batches) -> AsyncIterator[Sequence[Transfer]]:
    if isinstance(batches, AsyncIterable):
        async for batch in batches:
            yield batch
    else:
        for batch in batches:
            yield batch


class _TransferStream:
    """One `AsyncClient.stream_transfers` run: a writer task sends batches as the in-flight
    window allows; the generator reads the answers. The lock makes "remember a batch as
    unanswered and write it to the current call" one step, so a reconnect (which swaps the call
    and re-sends every unanswered batch under the same lock) never loses or reorders one."""

    def __init__(self, client: AsyncClient, batches: Batches, in_flight_max: int,
                 correlation_id: str):
        self._client = client
        self._source = _aiter(batches)
        self._correlation_id = correlation_id
        self._slots = asyncio.Semaphore(in_flight_max)
        self._lock = asyncio.Lock()
        self._unacked: collections.deque[list[Transfer]] = collections.deque()
        self._exhausted = False
        self._call: Any = None  # the current grpc.aio stream-stream call

    async def results(self) -> AsyncIterator[list[CreateTransferResult]]:
        async with self._lock:
            await self._open()
        writer = asyncio.create_task(self._write())
        policy = self._client.options.retry
        attempt = 1
        read: asyncio.Future | None = None
        try:
            while not (self._exhausted and not self._unacked):
                if read is None:
                    read = asyncio.ensure_future(self._call.read())
                await asyncio.wait({read} if writer.done() else {read, writer},
                                   return_when=asyncio.FIRST_COMPLETED)
                source_error = writer.exception() if writer.done() else None
                if source_error is not None:
                    raise source_error  # the batches iterable failed
                if not read.done():
                    continue  # the writer has sent the last batch; the answers are coming
                answered, read = read, None
                try:
                    response = answered.result()
                except grpc.aio.AioRpcError as error:
                    failure = from_rpc_error(error, correlation_id=self._correlation_id,
                                             attempts=attempt)
                    if not policy.should_retry(failure.code, attempt):
                        raise failure from error
                    await asyncio.sleep(policy.pause_s(attempt, failure.retry_delay_s))
                    attempt += 1
                    async with self._lock:
                        await self._open()
                    continue
                if response is grpc.aio.EOF:
                    if self._exhausted and not self._unacked:
                        return
                    raise Internal("the server ended the stream with batches unanswered")
                batch = self._unacked.popleft()
                self._slots.release()
                attempt = 1
                yield check_results(_convert.transfer_results(response.results), len(batch))
        finally:
            writer.cancel()
            if read is not None:
                read.cancel()
            if self._call is not None:
                self._call.cancel()

    async def _open(self) -> None:
        """A new call carrying every unanswered batch (the caller holds the lock)."""
        if self._call is not None:
            self._call.cancel()
        self._call = self._client._stub.StreamTransfers(
            metadata=self._client.options.metadata(self._correlation_id))
        for batch in self._unacked:
            await _write_ignoring_failure(self._call, _convert.stream_request(batch))
        if self._exhausted:
            await _done_writing_ignoring_failure(self._call)

    async def _write(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = list(await self._source.__anext__())
            except StopAsyncIteration:
                break
            async with self._lock:
                self._unacked.append(batch)
                await _write_ignoring_failure(self._call, _convert.stream_request(batch))
        async with self._lock:
            self._exhausted = True
            await _done_writing_ignoring_failure(self._call)


# A write to a broken call fails; the reading side sees the same failure and re-sends every
# unanswered batch on a new call, so the write error itself carries nothing to act on.
_BROKEN_CALL_ERRORS = (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError)


async def _write_ignoring_failure(call, request) -> None:
    try:
        await call.write(request)
    except _BROKEN_CALL_ERRORS:
        pass


async def _done_writing_ignoring_failure(call) -> None:
    try:
        await call.done_writing()
    except _BROKEN_CALL_ERRORS:
        pass
