-- The committed-event stream: a transactional outbox, its consumers' progress, and webhooks.

-- One row per commit that changed anything, written in that commit's transaction. The commit's
-- transfers are not copied: they are the transfers rows whose timestamp lies in
-- [first_timestamp, commit_timestamp] (only that commit stamps timestamps in that range).
-- transfer_balances: for each of those transfers in timestamp order, the balances right after
-- it as 8 little-endian uint64 (debit account dp, dpo, cp, cpo, then the credit account's).
-- other_events: the commit's rarer events (accounts created, closed, reopened; reservations
-- expired) as a serialized txengine.v1.EventBatch without cursors.
CREATE TABLE event_outbox (
    commit_timestamp bigint PRIMARY KEY,
    first_timestamp bigint NOT NULL,
    transfer_count integer NOT NULL,
    transfer_balances bytea NOT NULL,
    other_events bytea NOT NULL,
    CHECK (first_timestamp <= commit_timestamp),
    CHECK (length(transfer_balances) = 64 * transfer_count)
);

-- The commits' transfers by timestamp range. Timestamps only grow, so every insert lands on
-- the rightmost leaf (Postgres' fast path for increasing keys).
CREATE INDEX transfers_timestamp ON transfers ("timestamp");

-- How far each consumer of the outbox has got (commit_timestamp of the last commit done).
-- 'trimmed': outbox rows up to here were deleted; a cursor older than that cannot resume.
CREATE TABLE event_progress (
    consumer text PRIMARY KEY,
    commit_timestamp bigint NOT NULL
);
INSERT INTO event_progress (consumer, commit_timestamp)
VALUES ('redis', 0), ('webhooks', 0), ('trimmed', 0);

CREATE TABLE webhook_subscriptions (
    id uuid PRIMARY KEY,
    url text NOT NULL,
    event_types integer[] NOT NULL,  -- empty: every type
    secret bytea NOT NULL,
    created_at bigint NOT NULL,
    -- the first commit after the one current at creation: earlier events are not delivered
    start_after bigint NOT NULL
);

-- One delivery per event and subscription, recorded before it is sent.
-- status: 0 pending, 1 delivered (acknowledged with a 2xx), 2 dead-lettered.
CREATE TABLE webhook_deliveries (
    subscription_id uuid NOT NULL REFERENCES webhook_subscriptions (id) ON DELETE CASCADE,
    commit_timestamp bigint NOT NULL,
    event_index integer NOT NULL,
    payload bytea NOT NULL,  -- the serialized txengine.v1.Event
    status smallint NOT NULL DEFAULT 0,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error text,
    delivered_at timestamptz,
    PRIMARY KEY (subscription_id, commit_timestamp, event_index)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 0;

-- The runtime role (migration 0003) trims the published outbox and deletes webhook
-- subscriptions (their deliveries go with them).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'txengine_runtime') THEN
        GRANT DELETE ON event_outbox, webhook_subscriptions, webhook_deliveries
            TO txengine_runtime;
    END IF;
END $$;

-- The identity of this ledger database. The relay claims a Redis database for it and will not
-- publish into one that another ledger database (or an earlier incarnation of this one) holds.
INSERT INTO ledger_meta (key, value) VALUES ('ledger_instance', gen_random_uuid()::text)
    ON CONFLICT (key) DO NOTHING;
