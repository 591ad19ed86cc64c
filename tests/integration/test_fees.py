"""Fee schedules, fee transfers, refunds and Simulate through the real server and Postgres.

A card payment of 100.00 with a 2.9 % + 0.30 fee, a 20 % partner commission, 20 % tax on the
fee and a 10 % rolling reserve: the legs post atomically, replay idempotently (also after a new
schedule version), refund in proportion, and the reserve lapses or is kept like any pending
transfer. The arithmetic itself is tests/property/test_fee_kernel.py.
"""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from engine.fees.expand import leg_id
from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.ids import new_id
from harness import account, transfer

R = pb.TransferResult
DMNEC = pb.ACCOUNT_FLAGS_DEBITS_MUST_NOT_EXCEED_CREDITS
LINKED = pb.TRANSFER_FLAGS_LINKED
PENDING = pb.TRANSFER_FLAGS_PENDING
POST = pb.TRANSFER_FLAGS_POST_PENDING_TRANSFER


def name(value: int) -> str:
    return R.Name(value).removeprefix("TRANSFER_RESULT_")


async def open_accounts(stub, count: int, flags: int = 0) -> list[bytes]:
    accounts = [account(flags=flags) for _ in range(count)]
    response = await stub.CreateAccounts(pb.CreateAccountsRequest(accounts=accounts))
    assert all(r.result == pb.ACCOUNT_RESULT_OK for r in response.results)
    return [a.id for a in accounts]


async def posted(stub, *ids: bytes) -> list[tuple[int, int, int, int]]:
    """(debits_pending, debits_posted, credits_pending, credits_posted) of each account."""
    response = await stub.LookupAccounts(pb.LookupAccountsRequest(ids=list(ids)))
    by_id = {a.id: a for a in response.accounts}
    return [(by_id[i].debits_pending, by_id[i].debits_posted, by_id[i].credits_pending,
             by_id[i].credits_posted) for i in ids]


async def create(stub, *transfers: pb.Transfer) -> list[pb.CreateTransferResult]:
    response = await stub.CreateTransfers(pb.CreateTransfersRequest(transfers=list(transfers)))
    return list(response.results)


class Marketplace:
    """A payer (card settlement), a merchant, the platform, a partner, the tax authority and
    a reserve account, with the payer funded by a bank account."""

    async def open(self, stub) -> "Marketplace":
        (self.bank, self.payer, self.merchant, self.platform, self.partner, self.tax,
         self.reserve) = await open_accounts(stub, 7)
        self.schedule_id = new_id()
        self.schedule = pb.FeeSchedule(
            id=self.schedule_id,
            fees=[pb.Fee(account_id=self.platform, rate_ppm=29_000, fixed_amount=30,
                         commission_account_id=self.partner, commission_ppm=200_000,
                         tax_account_id=self.tax, tax_ppm=200_000)],
            reserve_ppm=100_000, reserve_account_id=self.reserve, reserve_timeout_seconds=3_600,
        )
        response = await stub.CreateFeeSchedule(pb.CreateFeeScheduleRequest(schedule=self.schedule))
        assert response.schedule.version == 1
        assert response.schedule.rounding == pb.FEE_ROUNDING_HALF_EVEN  # recorded explicitly
        [funded] = await create(stub, transfer(self.bank, self.payer, 1_000_000))
        assert funded.result == R.TRANSFER_RESULT_OK
        return self

    def payment(self, amount: int, **fields) -> pb.Transfer:
        return transfer(self.payer, self.merchant, amount, fee_schedule_id=self.schedule_id,
                        **fields)

    def refund(self, original: pb.Transfer, amount: int, **fields) -> pb.Transfer:
        return transfer(self.merchant, self.payer, amount, refund_of=original.id, **fields)

    def parties(self) -> tuple[bytes, ...]:
        return self.merchant, self.platform, self.partner, self.tax, self.reserve


@pytest.fixture
async def market(stub) -> Marketplace:
    return await Marketplace().open(stub)


async def test_a_merchant_payment_posts_every_leg_atomically(stub, market):
    payment = market.payment(10_000)
    [result] = await create(stub, payment)
    assert name(result.result) == "OK" and result.timestamp > 0
    assert result.fee_schedule_version == 1
    legs = [(pb.LegKind.Name(leg.kind).removeprefix("LEG_KIND_"), leg.amount) for leg in result.legs]
    assert legs == [("NET", 9_616), ("FEE", 256), ("COMMISSION", 64), ("TAX", 64), ("RESERVE", 962)]
    assert result.legs[0].id == payment.id
    assert [leg.id for leg in result.legs[1:]] == [leg_id(payment.id, leg.slot) for leg in result.legs[1:]]
    assert [leg.flags for leg in result.legs] == [LINKED] * 4 + [PENDING]
    assert result.legs[-1].debit_account_id == market.merchant
    assert sum(leg.amount for leg in result.legs[:-1]) == 10_000
    assert await posted(stub, market.payer, *market.parties()) == [
        (0, 10_000, 0, 1_000_000),
        (962, 0, 0, 9_616),  # the reserve holds 9.62 of the merchant's 96.16
        (0, 0, 0, 256), (0, 0, 0, 64), (0, 0, 0, 64), (0, 0, 962, 0)]
    found = await stub.LookupTransfers(pb.LookupTransfersRequest(ids=[leg.id for leg in result.legs]))
    assert [t.amount for t in found.transfers] == [leg.amount for leg in result.legs]


async def test_a_replay_is_idempotent_even_after_a_new_schedule_version(stub, market):
    payment = market.payment(10_000)
    [first] = await create(stub, payment)
    before = await posted(stub, market.payer, *market.parties())
    cheaper = pb.FeeSchedule()
    cheaper.CopyFrom(market.schedule)
    cheaper.fees[0].rate_ppm = 10_000
    response = await stub.CreateFeeSchedule(pb.CreateFeeScheduleRequest(schedule=cheaper))
    assert response.schedule.version == 2
    [again] = await create(stub, payment)
    assert name(again.result) == "EXISTS" and again.timestamp == first.timestamp
    assert again.fee_schedule_version == 1 and list(again.legs) == list(first.legs)
    assert await posted(stub, market.payer, *market.parties()) == before
    [changed] = await create(stub, market.payment(10_001, id=payment.id))
    assert name(changed.result) == "EXISTS_WITH_DIFFERENT_AMOUNT"
    # A new payment takes the latest version; an explicit version pins an older one.
    [latest], [pinned] = await create(stub, market.payment(10_000)), await create(
        stub, market.payment(10_000, fee_schedule_version=1))
    assert (latest.fee_schedule_version, latest.legs[1].amount) == (2, 104)
    assert (pinned.fee_schedule_version, pinned.legs[1].amount) == (1, 256)


async def test_a_failing_leg_fails_the_whole_payment(stub, market):
    await stub.CloseAccounts(pb.CloseAccountsRequest(ids=[market.tax]))
    before = await posted(stub, market.payer, *market.parties())
    [result] = await create(stub, market.payment(10_000))
    assert name(result.result) == "CREDIT_ACCOUNT_CLOSED"
    assert await posted(stub, market.payer, *market.parties()) == before
    # The payer's limit applies to the legs like to any transfer.
    [payer] = await open_accounts(stub, 1, DMNEC)
    [result] = await create(stub, transfer(payer, market.merchant, 10_000,
                                           fee_schedule_id=market.schedule_id))
    assert name(result.result) == "EXCEEDS_CREDITS"
    assert await posted(stub, market.payer, *market.parties()) == before


async def test_schedule_and_amount_failures_are_results(stub, market):
    results = await create(stub, transfer(market.payer, market.merchant, 10,
                                          fee_schedule_id=new_id()),
                           market.payment(30), market.payment(31, fee_schedule_version=9),
                           market.payment(1_000))
    assert [name(r.result) for r in results] == [
        "FEE_SCHEDULE_NOT_FOUND", "FEES_EXCEED_AMOUNT", "FEE_SCHEDULE_NOT_FOUND", "OK"]


async def test_partial_refunds_reverse_fees_in_proportion_and_never_exceed(stub, market):
    payment = market.payment(10_000)
    await create(stub, payment)
    half = market.refund(payment, 5_000)
    [result] = await create(stub, half)
    assert name(result.result) == "OK"
    assert [(pb.LegKind.Name(leg.kind).removeprefix("LEG_KIND_"), leg.amount)
            for leg in result.legs] == [("NET", 4_808), ("FEE", 128), ("COMMISSION", 32), ("TAX", 32)]
    assert all(leg.credit_account_id == market.payer for leg in result.legs)
    [replayed] = await create(stub, half)
    assert name(replayed.result) == "EXISTS" and list(replayed.legs) == list(result.legs)
    [too_much] = await create(stub, market.refund(payment, 5_001))
    assert name(too_much.result) == "EXCEEDS_REFUNDABLE_AMOUNT"
    [rest] = await create(stub, market.refund(payment, 5_000))
    assert name(rest.result) == "OK"
    assert [leg.amount for leg in rest.legs] == [4_808, 128, 32, 32]
    [beyond] = await create(stub, market.refund(payment, 1))
    assert name(beyond.result) == "EXCEEDS_REFUNDABLE_AMOUNT"
    # Everything is back with the payer but the reserve, which is still the merchant's hold.
    assert await posted(stub, market.payer, *market.parties()) == [
        (0, 10_000, 0, 1_010_000), (962, 9_616, 0, 9_616), (0, 256, 0, 256), (0, 64, 0, 64),
        (0, 64, 0, 64), (0, 0, 962, 0)]
    [wrong] = await create(stub, transfer(market.payer, market.merchant, 1, refund_of=payment.id))
    assert name(wrong.result) == "REFUND_ORIGINAL_NOT_FOUND"


async def test_concurrent_refunds_never_exceed_the_original(stub, market):
    payment = market.payment(10_000)
    await create(stub, payment)
    results = await asyncio.gather(*(create(stub, market.refund(payment, 3_000)) for _ in range(5)))
    outcomes = sorted(name(r.result) for [r] in results)
    assert outcomes == ["EXCEEDS_REFUNDABLE_AMOUNT"] * 2 + ["OK"] * 3
    assert (await posted(stub, market.payer))[0][3] == 1_009_000


async def test_the_reserve_lapses_by_its_timeout_or_is_posted(engine_app, stub, market):
    kept, released = market.payment(10_000), market.payment(20_000)
    [kept_result], [released_result] = await create(stub, kept), await create(stub, released)
    reserve_leg = kept_result.legs[-1]
    [post] = await create(stub, pb.Transfer(id=new_id(), pending_id=reserve_leg.id, flags=POST))
    assert name(post.result) == "OK"
    engine_app.engine.clock = lambda: time.time_ns() + 7_200 * 10**9

    async def lapsed() -> bool:
        return (await posted(stub, market.merchant))[0][0] == 0
    for _ in range(200):
        if await lapsed():
            break
        await asyncio.sleep(0.05)
    merchant, reserve = await posted(stub, market.merchant, market.reserve)
    assert merchant == (0, 962, 0, 9_616 + released_result.legs[0].amount)
    assert reserve == (0, 0, 0, 962)


async def test_splits_share_the_net_by_largest_remainder(stub, market):
    seller_a, seller_b = await open_accounts(stub, 2)
    schedule = pb.FeeSchedule(id=new_id(), fees=[pb.Fee(account_id=market.platform, fixed_amount=1)],
                              splits=[pb.SplitParty(account_id=seller_a, weight=1),
                                      pb.SplitParty(account_id=seller_b, weight=1)],
                              net_weight=1, rounding=pb.FEE_ROUNDING_DOWN)
    await stub.CreateFeeSchedule(pb.CreateFeeScheduleRequest(schedule=schedule))
    [result] = await create(stub, transfer(market.payer, market.merchant, 101,
                                           fee_schedule_id=schedule.id))
    assert [(leg.credit_account_id, leg.amount) for leg in result.legs] == [
        (market.merchant, 34), (seller_a, 33), (seller_b, 33), (market.platform, 1)]


async def test_simulate_returns_legs_and_balances_without_writing(stub, market, db):
    payment = market.payment(10_000)
    rows_before = await db.fetchval("SELECT count(*) FROM transfers")
    response = await stub.Simulate(pb.SimulateRequest(transfers=[payment]))
    [result] = response.results
    assert name(result.result) == "OK" and result.timestamp == 0
    assert [leg.amount for leg in result.legs] == [9_616, 256, 64, 64, 962]
    balances = {a.id: (a.debits_pending, a.debits_posted, a.credits_pending, a.credits_posted)
                for a in response.accounts}
    assert balances[market.merchant] == (962, 0, 0, 9_616)
    assert balances[market.payer] == (0, 10_000, 0, 1_000_000)
    assert await db.fetchval("SELECT count(*) FROM transfers") == rows_before
    assert (await posted(stub, market.merchant))[0] == (0, 0, 0, 0)
    [applied] = await create(stub, payment)
    assert list(applied.legs) == list(result.legs)


async def test_schedule_rpcs(stub, market):
    got = await stub.GetFeeSchedule(pb.GetFeeScheduleRequest(id=market.schedule_id))
    assert got.schedule.version == 1 and got.schedule.fees[0].rate_ppm == 29_000
    listed = await stub.ListFeeSchedules(pb.ListFeeSchedulesRequest(limit=10))
    assert [s.id for s in listed.schedules] == [market.schedule_id]
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetFeeSchedule(pb.GetFeeScheduleRequest(id=new_id()))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    bad = pb.FeeSchedule(id=new_id(), fees=[pb.Fee(account_id=market.platform, rate_ppm=1_000_001)])
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await stub.CreateFeeSchedule(pb.CreateFeeScheduleRequest(schedule=bad))
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "fees[0].rate_ppm" in invalid.value.details()
    unknown = pb.FeeSchedule(id=new_id(), rounding=9)
    with pytest.raises(grpc.aio.AioRpcError) as rounding:
        await stub.CreateFeeSchedule(pb.CreateFeeScheduleRequest(schedule=unknown))
    assert rounding.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as flagged:
        await create(stub, market.payment(100, flags=PENDING))
    assert flagged.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_malformed_fee_fields_are_rejected_whole(stub, market):
    bad = [transfer(market.payer, market.merchant, 100, fee_schedule_id=b"\x01" * 5),
           transfer(market.payer, market.merchant, 1, fee_schedule_version=3),
           market.payment(100, refund_of=new_id()),
           market.payment(100, timeout_seconds=5)]
    for t in bad:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await create(stub, t)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_bench_fees_prints_the_kernel_figures():
    """The benchmark command runs (its end-to-end part is `make bench-fees`)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "engine", "bench-fees", "--no-end-to-end",
                          "--items", "2000", "--sample", "200"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    assert "three-leg: kernel" in out and "five-leg: kernel" in out and "legs/s" in out


async def test_the_sdk_sends_fee_transfers_and_refunds_and_returns_their_legs(engine_app, market):
    from txengine_client import AsyncClient, LegKind, Transfer, TransferResult

    async with AsyncClient(engine_app.address) as client:
        payment = Transfer(debit_account_id=market.payer, credit_account_id=market.merchant,
                           amount=10_000, ledger=1, code=1, fee_schedule_id=market.schedule_id)
        [paid] = await client.create_transfers([payment])
        assert paid.ok and paid.fee_schedule_version == 1
        assert [(leg.kind, leg.amount) for leg in paid.legs] == [
            (LegKind.NET, 9_616), (LegKind.FEE, 256), (LegKind.COMMISSION, 64), (LegKind.TAX, 64),
            (LegKind.RESERVE, 962)]
        assert paid.legs[0].id == payment.id
        [again] = await client.create_transfers([payment])
        assert again.exists and again.legs == paid.legs
        refund = Transfer(debit_account_id=market.merchant, credit_account_id=market.payer,
                          amount=20_000, ledger=1, code=1, refund_of=payment.id)
        [refused] = await client.create_transfers([refund])
        assert refused.result is TransferResult.EXCEEDS_REFUNDABLE_AMOUNT
        [refunded] = await client.create_transfers([refund.replace(amount=10_000, id=new_id())])
        assert refunded.ok and sum(leg.amount for leg in refunded.legs) == 10_000


async def test_random_schedules_are_stored_or_rejected_field_by_field(stub, market):
    """Any FeeSchedule is either stored (and read back the same) or INVALID_ARGUMENT naming a
    field; never another status."""
    import random

    rng = random.Random(5)
    # Mostly valid values, so that both outcomes are common.
    ids = [market.platform, market.partner, market.tax, market.reserve, b"", b"\x01" * 5]
    amounts = [0, 0, 1, 30, 2**63 - 1, 2**64 - 1]
    ppms = [0, 1, 29_000, 200_000, 1_000_000, 1_000_001]

    def fee() -> pb.Fee:
        return pb.Fee(account_id=rng.choice(ids), rate_ppm=rng.choice(ppms),
                      fixed_amount=rng.choice(amounts), minimum_amount=rng.choice(amounts),
                      maximum_amount=rng.choice(amounts),
                      tiers=[pb.FeeTier(amount_min=rng.choice(amounts), rate_ppm=rng.choice(ppms))
                             for _ in range(rng.choice([0, 0, 1, 9]))],
                      commission_account_id=rng.choice(ids), commission_ppm=rng.choice(ppms),
                      tax_account_id=rng.choice(ids), tax_ppm=rng.choice(ppms))

    stored = rejected = 0
    for _ in range(150):
        schedule = pb.FeeSchedule(
            id=rng.choice([new_id(), new_id(), b"", b"\x02" * 17]),
            fees=[fee() for _ in range(rng.choice([0, 1, 1, 5]))],
            splits=[pb.SplitParty(account_id=rng.choice(ids), weight=rng.choice([0, 1, 7]))
                    for _ in range(rng.choice([0, 0, 3, 9]))],
            net_weight=rng.choice([0, 1, 3]), reserve_ppm=rng.choice(ppms),
            reserve_account_id=rng.choice(ids), reserve_timeout_seconds=rng.choice([0, 60]),
            rounding=rng.choice([0, 1, 2, 3, 4, 5]))
        try:
            response = await stub.CreateFeeSchedule(pb.CreateFeeScheduleRequest(schedule=schedule))
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            assert "schedule." in error.details()
            rejected += 1
            continue
        stored += 1
        got = await stub.GetFeeSchedule(pb.GetFeeScheduleRequest(id=schedule.id, version=1))
        assert got.schedule == response.schedule
        assert list(got.schedule.fees) == list(schedule.fees)
    assert stored and rejected, (stored, rejected)
