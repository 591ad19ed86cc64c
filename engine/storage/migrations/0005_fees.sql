-- Fee schedules and the fee transfers that used them.

-- One row per schedule version; a version is never updated. definition is the schedule as
-- engine.fees.schedule.FeeSchedule.to_json writes it (ids as hex, integers only).
CREATE TABLE fee_schedules (
    id uuid NOT NULL,
    version integer NOT NULL CHECK (version >= 1),
    definition jsonb NOT NULL,
    "timestamp" bigint NOT NULL,
    PRIMARY KEY (id, version)
);

-- One row per committed transfer with a fee schedule, and per committed refund of one, written
-- in the same transaction as its legs: the schedule version it used and its legs by slot, so
-- that a replay and the refunds reproduce them whatever versions came later.
CREATE TABLE fee_transfers (
    id uuid PRIMARY KEY,
    schedule_id uuid NOT NULL,
    schedule_version integer NOT NULL,
    refund_of uuid,
    debit_account_id uuid NOT NULL,
    credit_account_id uuid NOT NULL,
    ledger bigint NOT NULL,
    amount bigint NOT NULL CHECK (amount > 0),
    slots smallint[] NOT NULL,
    amounts bigint[] NOT NULL,
    "timestamp" bigint NOT NULL
);

CREATE INDEX fee_transfers_refund_of ON fee_transfers (refund_of) WHERE refund_of IS NOT NULL;
