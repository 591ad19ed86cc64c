-- Two-phase transfers, balance history, and the indexes behind the account queries.

-- State of a pending transfer: 1 pending, 2 posted, 3 voided, 4 expired (0: not pending).
-- expires_at is the commit timestamp at which an open reservation lapses (0: never).
ALTER TABLE transfers
    ADD COLUMN pending_status smallint NOT NULL DEFAULT 0,
    ADD COLUMN expires_at bigint NOT NULL DEFAULT 0;

-- Open reservations by expiry, for the shard writer's expiry pass; tiny, as it holds only
-- pending transfers that can still lapse.
CREATE INDEX transfers_expiry ON transfers (expires_at) WHERE pending_status = 1 AND expires_at > 0;

-- GetAccountTransfers: each side of a transfer, in commit order.
CREATE INDEX transfers_debit_account ON transfers (debit_account_id, "timestamp");
CREATE INDEX transfers_credit_account ON transfers (credit_account_id, "timestamp");

-- One row per change of an account with the HISTORY flag, partitioned with the account.
CREATE TABLE account_balances (
    shard integer NOT NULL,
    account_id uuid NOT NULL,
    "timestamp" bigint NOT NULL,
    debits_pending bigint NOT NULL,
    debits_posted bigint NOT NULL,
    credits_pending bigint NOT NULL,
    credits_posted bigint NOT NULL,
    PRIMARY KEY (shard, account_id, "timestamp")
) PARTITION BY LIST (shard);
