"""The entitlement policy: which principal may call which RPCs, on which ledgers and accounts,
how fast, and how many at once.

The policy is a TOML file (``--policy-file``)::

    [defaults]                      # limits of every principal that does not set its own
    requests_per_second = 1000      # 0: no limit
    transfers_per_second = 100000   # transfers and accounts created per second; 0: no limit
    burst_seconds = 1.0             # a caller may run this far ahead of its rate
    concurrent_rpcs_max = 64

    [principals."spiffe://txengine.dev/payments"]   # the certificate URI SAN/CN or token `sub`
    rpcs = ["CreateTransfers", "LookupAccounts"]    # or ["*"]
    ledgers = [1, 2]                                # omitted: every ledger
    account_codes = [100, 200]                      # an account is entitled by its code ...
    account_ids = ["0192b7c0-...-..."]              # ... or by its id; both omitted: every account
    transfers_per_second = 20000

A principal that is not listed may do nothing. Account ledger and code never change once
created, so an entitlement decided for an account stays true.
"""
from __future__ import annotations

import pathlib
import tomllib
import uuid

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.gen.txengine.v1 import ledger_pb2 as pb

RPC_NAMES = frozenset(m.name for m in pb.DESCRIPTOR.services_by_name["LedgerService"].methods)
MUTATING_RPCS = frozenset({"CreateAccounts", "CreateTransfers", "StreamTransfers",
                           "CloseAccounts", "ReopenAccounts", "CreateWebhookSubscription",
                           "DeleteWebhookSubscription", "ReplayWebhookDeliveries",
                           "CreateFeeSchedule"})


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_second: float = Field(0, ge=0)
    transfers_per_second: float = Field(0, ge=0)
    burst_seconds: float = Field(1.0, gt=0, le=3600)
    concurrent_rpcs_max: int = Field(0, ge=0)


class Entitlement(BaseModel):
    """One principal's rights; None means unrestricted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpcs: frozenset[str] = frozenset()
    ledgers: frozenset[int] | None = None
    account_codes: frozenset[int] | None = None
    account_ids: frozenset[bytes] | None = None
    requests_per_second: float | None = Field(None, ge=0)
    transfers_per_second: float | None = Field(None, ge=0)
    burst_seconds: float | None = Field(None, gt=0, le=3600)
    concurrent_rpcs_max: int | None = Field(None, ge=0)

    @field_validator("rpcs", mode="before")
    @classmethod
    def _known_rpcs(cls, value):
        names = frozenset(value)
        if "*" in names:
            return RPC_NAMES
        unknown = names - RPC_NAMES
        if unknown:
            raise ValueError(f"unknown RPCs {sorted(unknown)}; known: {sorted(RPC_NAMES)}")
        return names

    @field_validator("account_ids", mode="before")
    @classmethod
    def _uuids(cls, value):
        if value is None:
            return None
        return frozenset(uuid.UUID(str(v)).bytes for v in value)

    @property
    def all_accounts(self) -> bool:
        """Every account of the entitled ledgers (no code or id restriction)."""
        return self.account_codes is None and self.account_ids is None

    @property
    def unrestricted(self) -> bool:
        return self.ledgers is None and self.all_accounts

    def ledger_ok(self, ledger: int) -> bool:
        return self.ledgers is None or ledger in self.ledgers

    def account_ok(self, account_id: bytes, ledger: int, code: int) -> bool:
        """Whether the principal may use an account with this id, ledger and code."""
        if not self.ledger_ok(ledger):
            return False
        if self.all_accounts:
            return True
        return ((self.account_codes is not None and code in self.account_codes)
                or (self.account_ids is not None and account_id in self.account_ids))


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    defaults: Limits = Limits()
    principals: dict[str, Entitlement] = {}

    def entitlement(self, principal: str) -> Entitlement | None:
        return self.principals.get(principal)

    def limits(self, principal: str) -> Limits:
        """The principal's limits, each falling back to the defaults."""
        own = self.principals.get(principal)
        if own is None:
            return self.defaults
        return Limits(**{name: getattr(self.defaults, name) if getattr(own, name) is None
                         else getattr(own, name) for name in Limits.model_fields})


def load(path: pathlib.Path) -> Policy:
    """Read and validate a policy file; a bad one fails the start with the reason."""
    with path.open("rb") as source:
        return Policy.model_validate(tomllib.load(source))

