"""`Client`: the blocking txengine client.

Every call has a deadline (`ClientOptions.deadline_s` per attempt unless given) and is retried
on UNAVAILABLE and DEADLINE_EXCEEDED with the same request, which is safe because ids are
idempotency keys. `create_transfer` sends one transfer per request; it does not batch. For
throughput, send explicit batches with `create_transfers`, or use `AsyncClient`, whose
`create_transfer` coalesces concurrent calls.
"""
from __future__ import annotations

import collections
import queue
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Self

import grpc

from txengine_client import _convert
from txengine_client._gen.txengine.v1 import ledger_pb2 as pb
from txengine_client._gen.txengine.v1 import ledger_pb2_grpc
from txengine_client.errors import Internal, from_rpc_error
from txengine_client.ids import IdLike
from txengine_client.options import ClientOptions
from txengine_client.types import (
    ClosureOutcome,
    ClosureResult,
    CreateResult,
    BATCH_ITEMS_MAX,
    Account,
    AccountBalance,
    AccountFilter,
    CreateAccountResult,
    CreateTransferResult,
    Transfer,
)

FilterLike = AccountFilter | IdLike


def new_correlation_id() -> str:
    return uuid.uuid4().hex


def open_channel(address: str, options: ClientOptions) -> grpc.Channel:
    credentials = options.credentials()
    channel_options = options.grpc_channel_options()
    if credentials is None:
        return grpc.insecure_channel(address, channel_options)
    return grpc.secure_channel(address, credentials, channel_options)


def check_results(results: list, sent: int) -> list:
    """The server answers one result per item: anything else is a broken contract."""
    if len(results) != sent:
        raise Internal(f"the server answered {len(results)} results for {sent} items")
    return results


class Client:
    """A blocking client of one txengine server, usable from many threads at once.

    >>> with Client("127.0.0.1:50051") as client:
    ...     [result] = client.create_accounts([Account(ledger=1, code=1)])
    """

    def __init__(self, address: str, *, options: ClientOptions | None = None):
        self.address = address
        self.options = options or ClientOptions()
        self._channel = open_channel(address, self.options)
        self._stub = ledger_pb2_grpc.LedgerServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- creating ---------------------------------------------------------------------------

    def create_accounts(self, accounts: Iterable[Account], *, deadline_s: float | None = None,
                        correlation_id: str | None = None) -> list[CreateAccountResult]:
        """One result per account, in order. At most 8,190 accounts; a LINKED chain must be
        whole within one call."""
        request = _convert.create_accounts_request(accounts)
        response = self._unary(self._stub.CreateAccounts, request, deadline_s, correlation_id)
        return check_results(_convert.account_results(response.results), len(request.accounts))

    def create_account(self, account: Account, *, deadline_s: float | None = None,
                       correlation_id: str | None = None) -> CreateAccountResult:
        [result] = self.create_accounts([account], deadline_s=deadline_s,
                                        correlation_id=correlation_id)
        return result

    def create_transfers(self, transfers: Iterable[Transfer], *,
                         deadline_s: float | None = None,
                         correlation_id: str | None = None) -> list[CreateTransferResult]:
        """One result per transfer, in order. At most 8,190 transfers; a LINKED chain must be
        whole within one call (it commits entirely or not at all)."""
        request = _convert.create_transfers_request(transfers)
        response = self._unary(self._stub.CreateTransfers, request, deadline_s, correlation_id)
        return check_results(_convert.transfer_results(response.results), len(request.transfers))

    def create_transfer(self, transfer: Transfer, *, deadline_s: float | None = None,
                        correlation_id: str | None = None) -> CreateTransferResult:
        """Sends this one transfer in its own request (no batching in the blocking client)."""
        [result] = self.create_transfers([transfer], deadline_s=deadline_s,
                                         correlation_id=correlation_id)
        return result

    # -- reading ----------------------------------------------------------------------------

    def close_accounts(self, ids: Iterable[IdLike], *, deadline_s: float | None = None,
                       correlation_id: str | None = None) -> list[ClosureOutcome]:
        """Set CLOSED: the accounts accept no new transfers (pending ones may still be posted
        or voided). Idempotent, so safe to retry."""
        return self._set_closed(True, ids, deadline_s, correlation_id)

    def reopen_accounts(self, ids: Iterable[IdLike], *, deadline_s: float | None = None,
                        correlation_id: str | None = None) -> list[ClosureOutcome]:
        """Clear CLOSED. Idempotent, so safe to retry."""
        return self._set_closed(False, ids, deadline_s, correlation_id)

    def _set_closed(self, close: bool, ids: Iterable[IdLike], deadline_s: float | None,
                    correlation_id: str | None) -> list[ClosureOutcome]:
        rpc = self._stub.CloseAccounts if close else self._stub.ReopenAccounts
        message = pb.CloseAccountsRequest if close else pb.ReopenAccountsRequest
        outcomes: list[ClosureOutcome] = []
        for chunk in _chunks(_convert.ids_message(ids)):
            response = self._unary(rpc, message(ids=chunk), deadline_s, correlation_id)
            base = len(outcomes)
            outcomes.extend(CreateResult(base + r.index, ClosureResult(r.result), r.timestamp)
                            for r in response.results)
        return outcomes

    def lookup_accounts(self, ids: Iterable[IdLike], *, deadline_s: float | None = None,
                        correlation_id: str | None = None) -> list[Account]:
        """The accounts found, in the order asked; more than 8,190 ids take several calls."""
        found: list[Account] = []
        for chunk in _chunks(_convert.ids_message(ids)):
            response = self._unary(self._stub.LookupAccounts, pb.LookupAccountsRequest(ids=chunk),
                                   deadline_s, correlation_id)
            found.extend(_convert.account_from(a) for a in response.accounts)
        return found

    def lookup_transfers(self, ids: Iterable[IdLike], *, deadline_s: float | None = None,
                         correlation_id: str | None = None) -> list[Transfer]:
        """The transfers found, in the order asked; more than 8,190 ids take several calls."""
        found: list[Transfer] = []
        for chunk in _chunks(_convert.ids_message(ids)):
            response = self._unary(self._stub.LookupTransfers,
                                   pb.LookupTransfersRequest(ids=chunk), deadline_s, correlation_id)
            found.extend(_convert.transfer_from(t) for t in response.transfers)
        return found

    def get_account_transfers(self, account: FilterLike, *, deadline_s: float | None = None,
                              correlation_id: str | None = None) -> list[Transfer]:
        """One page of an account's transfers: give an `AccountFilter`, or an account id for
        the first page of all its transfers, oldest first."""
        request = pb.GetAccountTransfersRequest(
            filter=_convert.account_filter(_convert.as_filter(account)))
        response = self._unary(self._stub.GetAccountTransfers, request, deadline_s,
                               correlation_id)
        return [_convert.transfer_from(t) for t in response.transfers]

    def get_account_balances(self, account: FilterLike, *, deadline_s: float | None = None,
                             correlation_id: str | None = None) -> list[AccountBalance]:
        """One page of the historical balances of an account with the HISTORY flag."""
        request = pb.GetAccountBalancesRequest(
            filter=_convert.account_filter(_convert.as_filter(account)))
        response = self._unary(self._stub.GetAccountBalances, request, deadline_s,
                               correlation_id)
        return [_convert.balance_from(b) for b in response.balances]

    def iter_account_transfers(self, account: FilterLike, *,
                               deadline_s: float | None = None) -> Iterator[Transfer]:
        """Every transfer the filter selects, page after page (`limit` is the page size)."""
        page_filter = _convert.as_filter(account)
        while True:
            page = self.get_account_transfers(page_filter, deadline_s=deadline_s)
            yield from page
            if len(page) < page_filter.limit:
                return
            page_filter = page_filter.next_page(page[-1].timestamp)

    def iter_account_balances(self, account: FilterLike, *,
                              deadline_s: float | None = None) -> Iterator[AccountBalance]:
        """Every historical balance the filter selects, page after page."""
        page_filter = _convert.as_filter(account)
        while True:
            page = self.get_account_balances(page_filter, deadline_s=deadline_s)
            yield from page
            if len(page) < page_filter.limit:
                return
            page_filter = page_filter.next_page(page[-1].timestamp)

    # -- streaming --------------------------------------------------------------------------

    def stream_transfers(self, batches: Iterable[Sequence[Transfer]], *,
                         in_flight_max: int | None = None,
                         correlation_id: str | None = None,
                         ) -> Iterator[list[CreateTransferResult]]:
        """Pipelined CreateTransfers over one StreamTransfers call: yields the results of each
        batch, in order, with at most `in_flight_max` batches sent and not yet answered.

        A background thread pulls batches from `batches` as the window allows. When the stream
        breaks with a retryable status, a new stream is opened and the unanswered batches are
        sent again (safe: same ids). Closing the generator early ends the stream; a thread
        blocked inside `batches` ends when that iterator next returns.
        """
        stream = _BlockingTransferStream(self, batches,
                                         in_flight_max or self.options.stream_in_flight_max,
                                         correlation_id or new_correlation_id())
        return stream.results()

    # -- calls ------------------------------------------------------------------------------

    def _unary(self, rpc, request, deadline_s: float | None, correlation_id: str | None):
        correlation_id = correlation_id or new_correlation_id()
        metadata = self.options.metadata(correlation_id)
        timeout = self.options.deadline_s if deadline_s is None else deadline_s
        policy = self.options.retry
        attempt = 1
        while True:
            try:
                return rpc(request, timeout=timeout, metadata=metadata)
            except grpc.RpcError as error:
                failure = from_rpc_error(error, correlation_id=correlation_id, attempts=attempt)
                if not policy.should_retry(failure.code, attempt):
                    raise failure from error
            time.sleep(policy.pause_s(attempt, failure.retry_delay_s))
            attempt += 1


def _chunks(ids: list[bytes]) -> Iterator[list[bytes]]:
    if not ids:
        yield []
    for start in range(0, len(ids), BATCH_ITEMS_MAX):
        yield ids[start:start + BATCH_ITEMS_MAX]


_END = object()


class _BlockingTransferStream:
    """One `Client.stream_transfers` run: a writer thread feeding request queues, the caller's
    thread reading responses. Each gRPC call drains its own queue, so a reconnect can start a
    new call with the unanswered batches while the old call's request thread ends."""

    def __init__(self, client: Client, batches: Iterable[Sequence[Transfer]],
                 in_flight_max: int, correlation_id: str):
        self._client = client
        self._source = iter(batches)
        self._correlation_id = correlation_id
        self._slots = threading.Semaphore(in_flight_max)
        self._lock = threading.Lock()
        self._unacked: collections.deque[list[Transfer]] = collections.deque()
        self._exhausted = False
        self._stopped = False
        self._source_error: BaseException | None = None
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._responses: Any = None  # the current call: an iterator of responses

    def results(self) -> Iterator[list[CreateTransferResult]]:
        with self._lock:
            self._open()
        writer = threading.Thread(target=self._write, name="txengine-stream-writer", daemon=True)
        writer.start()
        policy = self._client.options.retry
        attempt = 1
        try:
            while True:
                with self._lock:
                    if self._exhausted and not self._unacked:
                        return
                try:
                    response = next(self._responses)
                except StopIteration:
                    with self._lock:
                        if self._exhausted and not self._unacked:
                            return
                    raise Internal("the server ended the stream with batches unanswered") from None
                except grpc.RpcError as error:
                    if self._source_error is not None:
                        raise self._source_error from None
                    failure = from_rpc_error(error, correlation_id=self._correlation_id,
                                             attempts=attempt)
                    if not policy.should_retry(failure.code, attempt):
                        raise failure from error
                    time.sleep(policy.pause_s(attempt, failure.retry_delay_s))
                    attempt += 1
                    with self._lock:
                        self._open()
                    continue
                with self._lock:
                    batch = self._unacked.popleft()
                self._slots.release()
                attempt = 1
                yield check_results(_convert.transfer_results(response.results), len(batch))
        finally:
            with self._lock:
                self._stopped = True
                self._requests.put(_END)
                self._responses.cancel()
            self._slots.release()  # a writer waiting for a slot sees _stopped and ends

    def _open(self) -> None:
        """A new call carrying every unanswered batch (the caller holds the lock)."""
        if self._responses is not None:
            self._requests.put(_END)
            self._responses.cancel()
        self._requests = queue.SimpleQueue()
        for batch in self._unacked:
            self._requests.put(_convert.stream_request(batch))
        if self._exhausted:
            self._requests.put(_END)
        self._responses = self._client._stub.StreamTransfers(
            _drain(self._requests), metadata=self._client.options.metadata(self._correlation_id))

    def _write(self) -> None:
        while True:
            self._slots.acquire()
            if self._stopped:
                return
            try:
                batch = list(next(self._source))
            except StopIteration:
                break
            except BaseException as error:  # noqa: BLE001 - handed to the reading thread
                self._source_error = error
                with self._lock:
                    self._responses.cancel()
                return
            with self._lock:
                self._unacked.append(batch)
                self._requests.put(_convert.stream_request(batch))
        with self._lock:
            self._exhausted = True
            self._requests.put(_END)


def _drain(requests: queue.SimpleQueue) -> Iterator[pb.StreamTransfersRequest]:
    while True:
        item = requests.get()
        if item is _END:
            return
        yield item

