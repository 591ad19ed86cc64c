"""txengine in five calls: two accounts, a transfer, its replay, the balances.

    pip install ./clients/python
    python clients/python/examples/quickstart.py [HOST:PORT]   # default $TXENGINE_ADDRESS,
                                                               # else 127.0.0.1:50051
"""
import os
import sys

from txengine_client import Account, AccountFlags, Client, Transfer

address = sys.argv[1] if len(sys.argv) > 1 else os.environ.get(
    "TXENGINE_ADDRESS", "127.0.0.1:50051")

with Client(address) as client:
    # Ids are time-ordered UUIDs made by the SDK (or give your own: id=...).
    alice = Account(ledger=1, code=1)
    bob = Account(ledger=1, code=1, flags=AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
    for account, result in zip([alice, bob], client.create_accounts([alice, bob])):
        print(f"account {account.id}: {result.result.name}")

    payment = Transfer(debit_account_id=alice.id, credit_account_id=bob.id, amount=100,
                       ledger=1, code=1)
    [first] = client.create_transfers([payment])
    print(f"transfer {payment.id}: {first.result.name}")  # OK
    # The id is the idempotency key: sending the same transfer again changes nothing.
    [replay] = client.create_transfers([payment])
    print(f"replayed: {replay.result.name}, same commit: {replay.timestamp == first.timestamp}")
    assert first.ok and replay.is_ok_or_exists

    # bob may not spend more than he has been credited.
    [refused] = client.create_transfers([Transfer(
        debit_account_id=bob.id, credit_account_id=alice.id, amount=101, ledger=1, code=1)])
    print(f"bob pays 101: {refused.result.name}")  # EXCEEDS_CREDITS

    print("balances:")
    for account in client.lookup_accounts([alice.id, bob.id]):
        print(f"  {account.id}  debits {account.debits_posted}  credits {account.credits_posted}")
