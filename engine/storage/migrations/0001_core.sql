-- Core ledger tables. Ids are uuid (16 bytes); uint32 fields are bigint; balances and amounts
-- are bigint within 0..2^63-1 (the engine reports anything beyond as an OVERFLOWS_* result).

CREATE TABLE ledger_meta (
    key text PRIMARY KEY,
    value text NOT NULL
);

-- One row per shard: the ownership epoch (fencing token) and the shard's committed position.
CREATE TABLE shards (
    shard integer PRIMARY KEY,
    epoch bigint NOT NULL DEFAULT 0,
    owner text,
    leased_at timestamptz,
    last_seq bigint NOT NULL DEFAULT 0,
    last_timestamp bigint NOT NULL DEFAULT 0
);

-- Accounts live in the partition of their shard (a stable hash of the id), so the primary key
-- (shard, id) is unique across the whole table.
CREATE TABLE accounts (
    shard integer NOT NULL,
    id uuid NOT NULL,
    ledger bigint NOT NULL CHECK (ledger BETWEEN 1 AND 4294967295),
    code bigint NOT NULL CHECK (code BETWEEN 1 AND 4294967295),
    flags integer NOT NULL,
    debits_pending bigint NOT NULL DEFAULT 0 CHECK (debits_pending >= 0),
    debits_posted bigint NOT NULL DEFAULT 0 CHECK (debits_posted >= 0),
    credits_pending bigint NOT NULL DEFAULT 0 CHECK (credits_pending >= 0),
    credits_posted bigint NOT NULL DEFAULT 0 CHECK (credits_posted >= 0),
    user_data bytea NOT NULL DEFAULT '',
    "timestamp" bigint NOT NULL,
    PRIMARY KEY (shard, id)
) PARTITION BY LIST (shard);

-- Transfers live in the partition of the shard of their own id, which makes (shard, id) - the
-- idempotency key - unique across the whole table. seq_shard/seq place the transfer in the
-- total order of the shard that applied it (its debit account's shard).
CREATE TABLE transfers (
    shard integer NOT NULL,
    id uuid NOT NULL,
    debit_account_id uuid NOT NULL,
    credit_account_id uuid NOT NULL,
    amount bigint NOT NULL CHECK (amount >= 0),
    pending_id uuid NOT NULL,
    ledger bigint NOT NULL,
    code bigint NOT NULL,
    flags integer NOT NULL,
    timeout_seconds bigint NOT NULL,
    user_data bytea NOT NULL DEFAULT '',
    "timestamp" bigint NOT NULL,
    seq_shard integer NOT NULL,
    seq bigint NOT NULL,
    PRIMARY KEY (shard, id)
) PARTITION BY LIST (shard);
