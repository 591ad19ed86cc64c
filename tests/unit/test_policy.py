"""The policy file: the shipped example loads, mistakes are refused at start-up, and the
entitlement predicates mean what the README says."""
from __future__ import annotations

import uuid

import pydantic
import pytest

from engine.security import policy
from tests.harness import ROOT

EXAMPLE = ROOT / "deploy" / "policy.example.toml"


def test_the_example_policy_loads():
    loaded = policy.load(EXAMPLE)
    payments = loaded.entitlement("spiffe://txengine.dev/payments")
    assert payments is not None and "CreateTransfers" in payments.rpcs
    assert loaded.limits("spiffe://txengine.dev/payments").transfers_per_second == 20_000
    assert loaded.limits("spiffe://txengine.dev/payments").requests_per_second == 1_000
    assert loaded.entitlement("nobody") is None


@pytest.mark.parametrize("text", [
    '[principals.a]\nrpcs = ["MoveAllTheMoney"]',
    '[principals.a]\nrpcs = ["*"]\nledgers = ["one"]',
    '[principals.a]\nrpcs = ["*"]\naccount_ids = ["not-a-uuid"]',
    '[principals.a]\nrpcs = ["*"]\nrequests_per_second = -1',
    '[principals.a]\nrpcs = ["*"]\nspeed = 3',
    '[defaults]\nburst_seconds = 0',
])
def test_mistakes_are_refused(tmp_path, text):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises((pydantic.ValidationError, ValueError)):
        policy.load(path)


def test_accounts_are_entitled_by_code_or_by_id_within_the_ledgers():
    mine = uuid.uuid4()
    entitlement = policy.Entitlement(rpcs=["*"], ledgers=[1], account_codes=[10],
                                     account_ids=[str(mine)])
    other = uuid.uuid4().bytes
    assert entitlement.account_ok(other, 1, 10)
    assert entitlement.account_ok(mine.bytes, 1, 99)
    assert not entitlement.account_ok(other, 1, 99)
    assert not entitlement.account_ok(mine.bytes, 2, 10)
    assert policy.Entitlement(rpcs=["*"]).unrestricted
    assert entitlement.rpcs == policy.RPC_NAMES
